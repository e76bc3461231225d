"""Small statements of the report summary (regressions from issue #14)."""

from __future__ import annotations

from pacsai.report.summary import _grid_note


def test_grid_note_names_where_the_structures_came_from():
    """Before: the note said "RTSTRUCT rasterised there" even when a model drew every contour."""
    assert "RTSTRUCT" not in _grid_note(True) and "model" in _grid_note(True)
    assert "RTSTRUCT" in _grid_note(False) and "model" not in _grid_note(False)


def test_a_ptv_the_plan_gives_no_dose_makes_coverage_not_evaluable_not_a_crash():
    """A PTV entirely in 0 Gy (e.g. a model's target away from the planned one): D50 = 0, so no homogeneity index
    exists; the summary says coverage is not evaluable and why (REVIEW), instead of the report failing."""
    import numpy as np

    from pacsai import planning
    from pacsai.imaging.geometry import make_volume
    from pacsai.report import gate
    from pacsai.report.params import validate_parameters
    from pacsai.report.summary import _dose_analysis

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (20, 20, 20)
    ptv = np.zeros(shape, bool)
    ptv[2:6, 2:6, 2:6] = True  # 4×4×4 voxels of 8 mm³: 0.512 cm³, all where the plan gives 0 Gy
    dose = np.full(shape, 60.0, np.float32)
    dose[:8, :8, :8] = 0.0
    dose_volume = make_volume(dose, affine, name="dose", attrs={
        "units": "Gy", "dose_units": "GY", "dose_type": "PHYSICAL", "dose_summation_type": "PLAN"})
    masks = {"PTV": make_volume(ptv, affine, name="PTV"),
             "BODY": make_volume(np.ones(shape, bool), affine, name="BODY")}
    params = validate_parameters(patient_id="x")
    part = _dose_analysis(dose_volume, masks, body="BODY", table=planning.load_constraints("thorax"), params=params,
                          states={}, target_info={"state": gate.PRESENT}, dose_note="", dose_reasons=[])
    assert part.coverage["state"] == "not evaluable"
    assert "D50 of 'PTV' is 0 Gy" in part.coverage["note"]
    assert "verdict" not in part.coverage and part.plan_quality == {}
    (reason,) = [r for r in part.reasons if r.code == "PLAN_QUALITY_UNDEFINED"]
    assert (reason.level, reason.structure) == ("review", "PTV")
    assert part.dvh_rows["PTV"]["max_gy"] == 0.0  # the DVH itself is measured and stated: 0 Gy everywhere


def test_masks_file_reads_back_with_numpy_load(tmp_path):
    """structures.npz (read by the DICOM outputs with np.load) holds every mask bit for bit, names as given."""
    import numpy as np

    from pacsai.report.summary import _save_masks

    rng = np.random.default_rng(3)
    masks = {"Lung L": rng.random((7, 30, 31)) < 0.4, "Lungs-GTV": np.zeros((7, 30, 31), bool),
             "PTV": np.ones((2, 3, 4), bool)}
    masks["Lungs-GTV"][3, 4, 5] = True
    _save_masks(tmp_path / "m.npz", masks)
    with np.load(tmp_path / "m.npz") as data:
        assert sorted(data.files) == sorted(masks)
        for name, values in masks.items():
            assert data[name].dtype == bool and np.array_equal(data[name], values)
