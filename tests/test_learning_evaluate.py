"""Contour agreement metrics against brute-force and analytic answers, on anisotropic grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pacsai.errors import VolumeError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.learning.evaluate import agreement, evaluate_structures, summarize, surface

SPACING_ZYX = (3.0, 1.0, 2.0)  # deliberately anisotropic: z 3 mm, y 1 mm, x 2 mm


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _brute(pred, ref, spacing_zyx, tol):
    """Reference implementation: all pairwise distances between surface voxel centres (mm)."""
    sp = np.argwhere(surface(pred)) * np.asarray(spacing_zyx)
    sr = np.argwhere(surface(ref)) * np.asarray(spacing_zyx)
    d = cdist(sp, sr)
    pooled = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return np.percentile(pooled, 95), pooled.mean(), (pooled <= tol).mean(), pooled.max()


def test_surface_is_the_shell_of_a_box():
    m = _box((10, 10, 10), (2, 2, 2), (8, 8, 8))
    assert surface(m).sum() == 6**3 - 4**3


def test_shifted_box_matches_brute_force_and_hand_values():
    a = _box((12, 12, 12), (2, 2, 2), (8, 8, 8))
    b = _box((12, 12, 12), (3, 2, 2), (9, 8, 8))  # one slice (3 mm) further in z
    got = agreement(a, b, spacing_zyx=SPACING_ZYX, tolerance_mm=1.0)
    assert got.dice == pytest.approx(2 * 5 * 36 / (2 * 216))
    hd95, msd, sdice, hd = _brute(a, b, SPACING_ZYX, 1.0)
    assert got.hd95 == pytest.approx(hd95, abs=1e-9)
    assert got.msd == pytest.approx(msd, abs=1e-9)
    assert got.surface_dice == pytest.approx(sdice, abs=1e-12)
    assert hd == pytest.approx(3.0)  # the Hausdorff distance of a 3 mm shift is 3 mm
    assert got.volume_pred_cc == pytest.approx(216 * 6.0 / 1000)


def test_spheres_on_anisotropic_grid_give_the_radius_difference():
    spacing = (2.0, 0.8, 1.2)
    shape = (40, 100, 70)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    c = [n * s / 2 for n, s in zip(shape, spacing)]
    r = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    a, b = r <= 20.0, r <= 24.0
    got = agreement(a, b, spacing_zyx=spacing, tolerance_mm=2.0)
    assert got.dice == pytest.approx(2 * 20**3 / (20**3 + 24**3), abs=0.01)
    assert got.hd95 == pytest.approx(4.0, abs=1.0)
    assert got.msd == pytest.approx(4.0, abs=0.6)
    assert got.surface_dice < 0.2  # 4 mm apart, 2 mm tolerance: almost nothing within
    assert got.volume_pred_cc == pytest.approx(4 / 3 * math.pi * 20**3 / 1000, rel=0.02)


def test_identical_and_empty_masks():
    a = _box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    same = agreement(a, a, spacing_zyx=SPACING_ZYX)
    assert (same.dice, same.hd95, same.msd, same.surface_dice) == (1.0, 0.0, 0.0, 1.0)
    empty = np.zeros_like(a)
    both = agreement(empty, empty, spacing_zyx=SPACING_ZYX)
    assert (both.dice, both.hd95) == (1.0, 0.0)
    one = agreement(a, empty, spacing_zyx=SPACING_ZYX)
    assert one.dice == 0.0 and math.isnan(one.hd95) and one.surface_dice == 0.0


def test_evaluate_structures_uses_the_volume_spacing():
    affine = affine_from((0, 0, 0), np.eye(3), (2.0, 1.0, 3.0))  # spacing (x, y, z)
    a = _box((12, 12, 12), (2, 2, 2), (8, 8, 8))
    b = _box((12, 12, 12), (3, 2, 2), (9, 8, 8))
    pred = {"GTV": make_volume(a, affine), "Heart": make_volume(a, affine)}
    ref = {"GTV": make_volume(b, affine), "Heart": make_volume(a, affine)}
    table = evaluate_structures(pred, ref, patient="p-1", tolerance_mm=1.0)
    assert list(table["structure"]) == ["GTV", "Heart"]
    assert list(table["patient"]) == ["p-1", "p-1"]
    expected = agreement(a, b, spacing_zyx=SPACING_ZYX, tolerance_mm=1.0)
    assert table.iloc[0]["hd95"] == pytest.approx(expected.hd95)
    assert table.iloc[1]["dice"] == 1.0
    assert summarize(table).loc["GTV", "dice"] == pytest.approx(expected.dice)


def test_different_grids_are_refused():
    a = _box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    v1 = make_volume(a, affine_from((0, 0, 0), np.eye(3), (1, 1, 1)))
    v2 = make_volume(a, affine_from((0, 0, 1), np.eye(3), (1, 1, 1)))
    with pytest.raises(VolumeError, match="different grids"):
        evaluate_structures({"A": v1}, {"A": v2})
    with pytest.raises(VolumeError, match="missing from the prediction"):
        evaluate_structures({}, {"A": v2}, structures=["A"])
