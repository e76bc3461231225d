"""pacsai.planning.dvh sampling: the axis-by-axis coordinates and the "surely inside" shortcut give the very
samples of the plain algorithm (index matrix × affine, every point checked against the grid), bit for bit."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
from scipy import ndimage

from pacsai.errors import PacsaiWarning
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning.dvh import DVH, dose_coverage, dvh

FOR = "1.2.3.4"
dvh_module = importlib.import_module("pacsai.planning.dvh")  # the package exports a function of that name


def volume(array, spacing, origin, direction=None, name="v", **attrs):
    attrs.setdefault("frame_of_reference_uid", FOR)
    return make_volume(np.asarray(array), affine_from(origin, np.eye(3) if direction is None else direction,
                                                      spacing), name=name, attrs=attrs)


def plain_dvh(dose, mask, subsamples=2):
    """The DVH by the plain algorithm: an (N, 3) index matrix through the affine, every point checked."""
    values = np.asarray(mask.values, dtype=bool)
    voxel_cc = float(abs(np.linalg.det(mask.geo.affine[:3, :3])) / 1000.0)
    interior = ndimage.binary_erosion(values, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    core, edge = values & interior, values & ~interior
    perm = np.eye(4)[[2, 1, 0, 3]]
    kji_map = perm @ np.linalg.inv(dose.geo.affine) @ mask.geo.affine @ perm
    lin, shift = kji_map[:3, :3], kji_map[:3, 3]
    ticks = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    offsets = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3)
    dose_values = np.asarray(dose.values, dtype=float)
    bounds = np.asarray(dose_values.shape, dtype=float)[:, None]
    doses, weights, uncovered, total = [], [], 0.0, 0.0
    for where, offs, weight in ((core, np.zeros((1, 3)), voxel_cc), (edge, offsets, voxel_cc / len(offsets))):
        if not where.any():
            continue
        centres = np.argwhere(where).astype(np.float64) @ lin.T + shift
        src = (centres[:, None, :] + (offs @ lin.T)[None, :, :]).reshape(-1, 3).T
        sampled = ndimage.map_coordinates(dose_values, src, order=1, mode="nearest", prefilter=False)
        out = np.any((src < -0.5) | (src > bounds - 0.5), axis=0)
        uncovered += int(out.sum()) * weight
        total += sampled.size * weight
        doses.append(sampled[~out])
        weights.append(np.full(int((~out).sum()), weight))
    h = DVH.from_samples(np.concatenate(doses), np.concatenate(weights), resolution=1e-4)
    return h, uncovered, total


def smooth_dose(shape, spacing, origin):
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    return volume(40.0 + 10 * np.sin(z / 3.0) + 7 * np.cos(y / 4.0) + 0.37 * x, spacing, origin, units="Gy")


def ball(shape, centre, radius):
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


@pytest.mark.parametrize(
    "mask_origin, centre, direction",
    [
        ((0.0, 0.0, 0.0), (10, 20, 20), None),  # well inside the dose grid: the shortcut decides
        ((-50.0, -45.0, 0.0), (10, 20, 20), None),  # partly beyond the dose grid: every point checked
        ((0.0, 0.0, 0.0), (0, 0, 39), None),  # touching the mask grid's corner and faces
        ((1.0, -2.0, 0.5), (10, 20, 20), "oblique"),  # an oblique mask grid: the matrix product path
    ],
)
def test_samples_equal_the_plain_algorithm_bit_for_bit(mask_origin, centre, direction):
    rotation = None
    if direction == "oblique":
        angle = np.radians(7.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    dose = smooth_dose((30, 40, 45), (3.0, 3.0, 2.5), (-10.0, -12.0, -5.0))
    mask = volume(ball((20, 40, 40), centre, 9), (1.8, 1.8, 2.0), mask_origin, rotation, name="ball")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)
        fast = dvh(dose, mask)
        cc, fraction = dose_coverage(dose, mask)
    plain, uncovered, total = plain_dvh(dose, mask)
    assert (fast.mean, fast.min, fast.max, fast.volume_cc) == (plain.mean, plain.min, plain.max, plain.volume_cc)
    assert np.array_equal(fast.doses, plain.doses) and np.array_equal(fast.cumulative_cc, plain.cumulative_cc)
    assert (fast.uncovered_cc, fast.sampled_cc) == (uncovered, total)
    assert (cc, fraction) == (uncovered, uncovered / total)
    if mask_origin == (-50.0, -45.0, 0.0):
        assert uncovered > 0  # the case really exercises the per-point check


def test_the_inside_shortcut_never_claims_a_point_beyond_the_grid():
    shape = (4, 5, 6)
    # a box whose far corner lies exactly on the outer voxel face: not "surely" inside
    assert not dvh_module._surely_inside(shape, np.array([0.0, 0.0, 0.0]), np.array([3.5, 2.0, 2.0]))
    assert not dvh_module._surely_inside(shape, np.array([-0.5, 0.0, 0.0]), np.array([3.0, 2.0, 2.0]))
    assert dvh_module._surely_inside(shape, np.array([-0.49, 0.0, 0.0]), np.array([3.49, 4.49, 5.49]))
    points = np.array([[-0.5, 3.5, 3.5000001, 0.0], [0.0, 4.5, 0.0, -0.6], [0.0, 5.5, 0.0, 0.0]])
    assert dvh_module._outside(shape, points).tolist() == [False, False, True, True]
