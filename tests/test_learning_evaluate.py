"""Contour agreement and dose-aware comparison against brute-force and hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from pacsai.errors import DoseError, VolumeError
from pacsai.imaging.geometry import affine_from, make_volume, same_grid
from pacsai.learning.evaluate import (
    added_path_length,
    agreement,
    dose_aware_agreement,
    evaluate_structures,
    summarize,
    summary_metrics,
    surface,
)
from pacsai.planning.constraints import MAX_UNCOVERED_CC, MAX_UNCOVERED_PCT
from pacsai.planning.dvh import DVH, dvh

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
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    c = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
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


# ------------------------------------------------------------------------------------------ dose-aware agreement


def _vol(mask, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    return make_volume(mask, affine_from(origin, np.eye(3), spacing_xyz))


PLAN_DOSE = {"units": "Gy", "dose_summation_type": "PLAN", "dose_type": "PHYSICAL", "sop_instance_uid": "1.2.3.4"}


def _dose(values, spacing_xyz=(1.0, 1.0, 1.0)):
    """A total plan dose in Gy (the attributes read_dose sets) on a grid from the origin."""
    dose = _vol(np.ascontiguousarray(values, dtype=float), spacing_xyz)
    dose.attrs.update(PLAN_DOSE)
    return dose


def _square_slices(shape, y, x):
    """A (z, y, x) mask holding the same rectangle rows y[0]:y[1], columns x[0]:x[1] on every slice."""
    m = np.zeros(shape, bool)
    m[:, y[0] : y[1], x[0] : x[1]] = True
    return m


def test_added_path_length_of_a_shifted_square_by_hand():
    # 10 × 10 px square, 1 mm pixels, on 3 slices; the prediction is the same square 5 px (5 mm) to the right.
    ref = _square_slices((3, 20, 30), (5, 15), (5, 15))
    pred = _square_slices((3, 20, 30), (5, 15), (10, 20))
    apl, length = added_path_length(pred, ref, spacing_zyx=(3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert length == pytest.approx(3 * 40.0)  # perimeter of 10 × 10 mm, three slices
    # Per slice, by hand (distances from each reference edge's midpoint to the predicted contour):
    # - left side, x = 4.5 px: 5 mm from the predicted left side, ≥ 5 mm from its corners → all 10 mm redrawn;
    # - right side, x = 14.5 px, runs inside the prediction: its edges at y = 5, 6 and 13, 14 lie 0.5 or 1.5 mm
    #   from the predicted top or bottom edge, the middle 6 lie ≥ 2.5 mm from everything → 6 mm;
    # - top and bottom: the predicted top starts at x = 9.5 px; reference edges at x = 5, 6, 7 lie 4.5, 3.5,
    #   2.5 mm from that corner (x = 8 at 1.5 mm, the rest on it) → 3 mm each.
    # 10 + 6 + 3 + 3 = 22 mm per slice.
    assert apl == pytest.approx(3 * 22.0)
    # identical contours: nothing to draw; no prediction at all: everything
    assert added_path_length(ref, ref, spacing_zyx=(3.0, 1.0, 1.0))[0] == 0.0
    assert added_path_length(np.zeros_like(ref), ref, spacing_zyx=(3.0, 1.0, 1.0))[0] == pytest.approx(120.0)


def test_added_path_length_on_anisotropic_pixels_and_partial_slices():
    # pixels 1 mm (y) × 2 mm (x): a 10 × 10 px square is 10 mm high and 20 mm wide (perimeter 60 mm).
    ref = _square_slices((2, 20, 20), (5, 15), (5, 15))
    pred = _square_slices((2, 20, 20), (5, 15), (7, 17))  # 2 px = 4 mm to the right
    pred[1] = False  # nothing predicted on the second slice
    apl, length = added_path_length(pred, ref, spacing_zyx=(2.0, 1.0, 2.0), tolerance_mm=2.0)
    assert length == pytest.approx(2 * 60.0)
    # slice 0: the left side (4 mm off, 10 edges of 1 mm); the right side runs inside the prediction, its edges
    # at y = 5, 6, 13, 14 within 1.5 mm of the predicted top/bottom, the middle 6 not (6 mm); on top and bottom
    # the leftmost 2 mm edge lies 1.5 px = 3 mm from the predicted corner, the next 1 mm (2 + 2 mm):
    # 10 + 6 + 2 + 2 = 20 mm. Slice 1 has no prediction: the whole 60 mm.
    assert apl == pytest.approx(20.0 + 60.0)


def test_dose_aware_agreement_geometry_states_and_dose_gradient_by_hand():
    shape = (10, 20, 50)  # 1 mm voxels; dose = x in mm, so Gy rises 1 Gy per mm to the right
    ref_box = _box(shape, (2, 5, 10), (8, 15, 30))  # x 10..29 mm
    pred_box = _box(shape, (2, 5, 15), (8, 15, 35))  # the same box 5 mm to the right
    dose = _dose(np.broadcast_to(np.arange(50, dtype=float), shape))
    empty = np.zeros(shape, bool)
    pred = {"Heart": _vol(pred_box), "GTV": _vol(empty), "Cord": _vol(ref_box)}
    ref = {"Heart": _vol(ref_box), "GTV": _vol(ref_box), "Cord": _vol(empty), "Lung": _vol(ref_box)}
    table = dose_aware_agreement(pred, ref, dose, patient="p-1").set_index("structure")
    assert list(table.index) == ["Heart", "GTV", "Cord", "Lung"]
    heart = table.loc["Heart"]
    assert heart.state == "present" and heart.dose_state == "evaluated"
    assert heart.dice == pytest.approx(15 / 20)  # 15 of 20 columns overlap
    assert heart.hd95 == pytest.approx(agreement(pred_box, ref_box, spacing_zyx=(1, 1, 1)).hd95)
    assert heart.dmean_ref_gy == pytest.approx(19.5) and heart.dmean_pred_gy == pytest.approx(24.5)
    assert heart.delta_dmean_gy == pytest.approx(5.0)
    # D0.03cc: the hottest 0.03 cm³ (30 voxels) lies in the last column slab (60 voxels): x = 29 vs 34 Gy
    assert heart.delta_d0_03cc_gy == pytest.approx(5.0)
    assert heart.v20_ref_pct == pytest.approx(50.0) and heart.v20_pred_pct == pytest.approx(75.0)
    assert heart.delta_v20_pct == pytest.approx(25.0)
    # 6 slices, each the 22 mm of the shifted square of test_added_path_length_of_a_shifted_square_by_hand
    assert heart.added_path_length_mm == pytest.approx(6 * 22.0)
    # empty or missing: NaN metrics and the state, never a silent 0 or 1
    for name, state in (("GTV", "empty pred"), ("Cord", "empty ref"), ("Lung", "missing")):
        row = table.loc[name]
        assert row.state == state and row.dose_state == "not evaluable"
        for col in ("dice", "hd95", "surface_dice", "added_path_length_mm", "delta_dmean_gy"):
            assert math.isnan(row[col]), (name, col)
        assert row.reason
    assert "the model found nothing" in table.loc["GTV", "reason"]
    assert table.loc["GTV", "volume_ref_cc"] == pytest.approx(1.2)  # the volumes that were measured stay
    assert "missing from the prediction" in table.loc["Lung", "reason"]
    # no dose: geometry only
    plain = dose_aware_agreement(pred, ref).set_index("structure")
    assert plain.loc["Heart", "dose_state"] == "no dose" and math.isnan(plain.loc["Heart", "delta_dmean_gy"])
    assert plain.loc["Heart", "dice"] == pytest.approx(0.75)


def test_dose_on_its_own_coarser_grid_and_partly_uncovered():
    shape = (10, 20, 50)
    ref_box = _box(shape, (2, 5, 10), (8, 15, 30))
    pred_box = _box(shape, (2, 5, 15), (8, 15, 35))
    # a 2 mm dose grid, dose = x mm again: trilinear interpolation of a linear dose is exact
    coarse = _dose(np.broadcast_to(np.arange(25, dtype=float) * 2.0, (5, 10, 25)), (2.0, 2.0, 2.0))
    row = dose_aware_agreement({"H": _vol(pred_box)}, {"H": _vol(ref_box)}, coarse).iloc[0]
    assert row.dose_state == "evaluated" and row.dose_uncovered_ref_cc == 0.0
    assert row.delta_dmean_gy == pytest.approx(5.0, abs=1e-6)
    # a dose grid that ends at x = 19.5 mm: 10 of the reference box's 20 mm (0.6 cm³) get no dose
    half = _dose(np.broadcast_to(np.arange(20, dtype=float), shape[:2] + (20,)))
    row = dose_aware_agreement({"H": _vol(pred_box)}, {"H": _vol(ref_box)}, half).iloc[0]
    assert row.dose_state == "unreliable" and row.dose_uncovered_ref_cc == pytest.approx(0.6)
    assert math.isnan(row.delta_dmean_gy) and "outside the dose grid" in row.reason
    assert row.dice == pytest.approx(0.75)  # the geometry is still measured


def test_dvhs_already_computed_are_used_as_they_are():
    """A report's analysis has the DVHs: passed in, they give the table computing them here gives, and are
    really used (a made-up DVH shows in the figures), with their coverage."""
    shape = (10, 20, 50)
    ref_box = _box(shape, (2, 5, 10), (8, 15, 30))
    pred_box = _box(shape, (2, 5, 15), (8, 15, 35))
    coarse = _dose(np.broadcast_to(np.arange(25, dtype=float) * 2.0, (5, 10, 25)), (2.0, 2.0, 2.0))
    pred, ref = {"H": _vol(pred_box)}, {"H": _vol(ref_box)}
    plain = dose_aware_agreement(pred, ref, coarse)
    computed = {("H", "pred"): dvh(coarse, pred["H"]), ("H", "ref"): dvh(coarse, ref["H"])}
    pd.testing.assert_frame_equal(dose_aware_agreement(pred, ref, coarse, dvhs=computed), plain)
    made_up = DVH.from_samples(np.full(10, 40.0), 0.12, name="H")  # 1.2 cm³ at 40 Gy
    row = dose_aware_agreement(pred, ref, coarse, dvhs={("H", "ref"): made_up}).iloc[0]
    assert row.dmean_ref_gy == pytest.approx(40.0) and row.v20_ref_pct == 100.0 and row.dose_uncovered_ref_cc == 0.0
    assert row.dmean_pred_gy == pytest.approx(24.5, abs=1e-6)  # the other side computed here
    # a DVH counting uncovered volume as 0 Gy is not what the comparison needs: computed again
    zero = DVH.from_samples(np.full(10, 40.0), 0.12, name="H", method="...; 0.1 cm³ counted as 0 Gy")
    row = dose_aware_agreement(pred, ref, coarse, dvhs={("H", "ref"): zero}).iloc[0]
    assert row.dmean_ref_gy == plain.iloc[0].dmean_ref_gy


def test_a_prediction_entirely_outside_the_dose_grid_is_unreliable_not_a_crash():
    shape = (10, 20, 50)
    ref_box = _box(shape, (2, 5, 2), (8, 15, 10))
    pred_box = _box(shape, (2, 5, 30), (8, 15, 40))  # x 30..39 mm, the dose grid ends at 19.5 mm
    half = _dose(np.broadcast_to(np.arange(20, dtype=float), shape[:2] + (20,)))
    row = dose_aware_agreement({"H": _vol(pred_box)}, {"H": _vol(ref_box)}, half).iloc[0]
    assert row.dose_state == "unreliable" and row.dose_uncovered_pred_cc == pytest.approx(0.6)
    assert row.dose_uncovered_ref_cc == 0.0 and math.isnan(row.dmean_pred_gy)


def test_only_a_total_plan_dose_is_compared():
    m = _vol(_box((4, 4, 4), (1, 1, 1), (3, 3, 3)))
    for attrs, match in (
        ({"dose_summation_type": "BEAM"}, "DoseSummationType is BEAM"),
        ({"dose_summation_type": "FRACTION"}, "DoseSummationType is FRACTION"),
        ({"dose_summation_type": ""}, "DoseSummationType is missing"),
        ({"dose_type": "ERROR"}, "DoseType is ERROR"),
        ({"units": "relative"}, "not GY"),
    ):
        dose = _dose(np.ones((4, 4, 4)))
        dose.attrs.update(attrs)
        with pytest.raises(DoseError, match=match) as err:
            dose_aware_agreement({"A": m}, {"A": m}, dose)
        assert "1.2.3.4" in str(err.value)


def test_summary_hides_no_empty_case_and_checks_the_worst_dose_delta():
    shape = (10, 20, 50)
    ref_box = _box(shape, (2, 5, 10), (8, 15, 30))
    dose = _dose(np.broadcast_to(np.arange(50, dtype=float), shape))
    shifted = {"H": _vol(_box(shape, (2, 5, 15), (8, 15, 35))), "G": _vol(ref_box)}  # H: +5 Gy
    back = {"H": _vol(_box(shape, (2, 5, 7), (8, 15, 27))), "G": _vol(np.zeros(shape, bool))}  # H: −3 Gy
    ref = {"H": _vol(ref_box), "G": _vol(ref_box)}
    table = pd.concat(
        [dose_aware_agreement(shifted, ref, dose, patient="a"), dose_aware_agreement(back, ref, dose, patient="b")]
    )
    summary = summarize(table)
    assert summary.loc["H", "delta_dmean_gy"] == pytest.approx(1.0)  # mean bias (+5 − 3) / 2
    assert summary.loc["H", "abs_delta_dmean_gy"] == pytest.approx(5.0)  # the worst patient
    assert summary.loc["H", "dice"] == pytest.approx((0.75 + 17 / 20) / 2)
    # G is perfect in patient a and empty in patient b: no mean over a alone
    assert math.isnan(summary.loc["G", "dice"]) and summary.loc["G", "n_present"] == 1
    assert "empty pred in 1 of 2" in summary.loc["G", "note"]
    metrics = summary_metrics(summary)
    assert metrics["abs_delta_dmean_H"] == pytest.approx(5.0) and metrics["apl_H"] > 0
    assert math.isnan(metrics["dice_G"])


def test_a_synthetic_patients_plan_dose_and_contours(tmp_path_factory):
    """The real path: CT, RTSTRUCT and the study's plan RTDOSE from a PACS, compared on their own grids."""
    from pacsai.cohort import CohortQuery, select_cohort
    from pacsai.imaging import read_rtstruct, read_series
    from pacsai.learning.evaluate import plan_dose_of_study
    from pacsai.pacs import connect
    from tests.test_cohort import STRUCTURES, seeded_store, store_url

    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-evaluate")
    row = next(select_cohort(pacs, CohortQuery(structures=STRUCTURES)).table.itertuples())
    ct = read_series(pacs.retrieve_series(row.study_instance_uid, row.series_instance_uid, progress=False))
    rt = pacs.retrieve_series(row.study_instance_uid, row.rtstruct_series_uid, progress=False)
    masks = {k: v for k, v in read_rtstruct(rt[0], like=ct).items() if k in STRUCTURES}
    dose, why = plan_dose_of_study(pacs, row.study_instance_uid)
    assert dose is not None, why
    assert dose.attrs["dose_summation_type"] == "PLAN" and not same_grid(dose, ct)

    same = dose_aware_agreement(masks, masks, dose).set_index("structure")
    assert (same["state"] == "present").all() and (same["dice"] == 1.0).all()
    assert (same["added_path_length_mm"] == 0.0).all() and (same["ref_path_length_mm"] > 0).all()
    for name, row_ in same.iterrows():
        limit = min(MAX_UNCOVERED_CC, MAX_UNCOVERED_PCT / 100.0 * row_.volume_ref_cc)
        if row_.dose_uncovered_ref_cc > limit * (1 + 1e-9):
            assert row_.dose_state == "unreliable" and math.isnan(row_.delta_dmean_gy), name
        else:
            assert row_.dose_state == "evaluated" and row_.delta_dmean_gy == 0.0, name
    gtv = same.loc["GTV"]  # the target sits well inside the dose grid, at the prescription (60 Gy)
    assert gtv.dose_state == "evaluated" and 55.0 < gtv.dmean_ref_gy < 66.0

    # the GTV drawn two CT voxels (12 mm) off: geometry and dose both see it
    shifted = {"GTV": masks["GTV"].copy(data=np.roll(masks["GTV"].values, 2, axis=2))}
    off = dose_aware_agreement(shifted, {"GTV": masks["GTV"]}, dose).iloc[0]
    assert off.dice < 0.5 and off.added_path_length_mm > 0 and off.hd95 >= 12.0 - 1e-9
    assert off.delta_dmean_gy < 0  # part of it moved out of the high-dose region
