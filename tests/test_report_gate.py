"""pacsai.report.gate and .uncertainty: every QA rule against a case built by hand, with its known answer."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning import load_constraints
from pacsai.report import gate
from pacsai.report.inputs import DrawnBy, written_by_pacsai
from pacsai.report.params import validate_parameters
from pacsai.report.summary import structure_states
from pacsai.report.uncertainty import HESITANT_SIGMA, summarize_uncertainty

SPACING = (2.0, 2.0, 2.5)  # x, y, z mm: one voxel = 0.01 cm³
SHAPE = (40, 60, 60)
MODEL = DrawnBy("model", "model pacsai-thorax v3")
PLANNER = DrawnBy("planner", "RTSTRUCT 'Clinical plan' 2024-08-08")


def vol(array, name="s"):
    return make_volume(np.asarray(array, dtype=bool), affine_from((0, 0, 0), np.eye(3), SPACING), name=name)


def box(lo, hi, shape=SHAPE):
    a = np.zeros(shape, dtype=bool)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return a


def thorax_masks() -> dict:
    """Seven non-overlapping boxes named as the thorax table expects (volumes in cm³ = voxels / 100)."""
    return {
        "BODY": vol(box((0, 2, 2), (40, 58, 58)), "BODY"),
        "Lung_L": vol(box((5, 10, 35), (35, 40, 50)), "Lung_L"),
        "Lung_R": vol(box((5, 10, 10), (35, 40, 25)), "Lung_R"),
        "Heart": vol(box((10, 25, 26), (25, 40, 34)), "Heart"),
        "SpinalCord": vol(box((0, 45, 29), (40, 48, 31)), "SpinalCord"),
        "Esophagus": vol(box((0, 41, 27), (40, 44, 30)), "Esophagus"),
        "GTV": vol(box((15, 15, 40), (20, 20, 45)), "GTV"),
    }


@pytest.fixture(scope="module")
def table():
    return load_constraints("thorax")


def states_of(masks, table, *, drawn_by=MODEL, offered=None, from_model=True):
    params = validate_parameters(patient_id="x", structures_from="model" if from_model else "pacs",
                                 model_uri="models:/m/1" if from_model else "")
    return structure_states(masks, drawn_by=drawn_by, offered=offered if offered is not None else list(masks),
                            from_model=from_model, params=params, table=table)


def test_states_present_empty_missing_not_requested(table):
    masks = thorax_masks()
    masks["SpinalCord"] = vol(np.zeros(SHAPE, bool), "SpinalCord")  # the model found nothing
    del masks["Esophagus"]
    states = states_of(masks, table, offered=[k for k in masks])
    assert states["SpinalCord"]["state"] == "empty"
    assert states["Esophagus"]["state"] == "not requested"  # the model does not segment it
    assert states["Heart"]["state"] == "present" and states["Heart"]["drawn_by"] == MODEL.to_dict()
    assert states["GTV"]["required"] and not states["BODY"]["required"]
    # the same structure set from a planner: the oesophagus is missing, not "not requested"
    planner = states_of(masks, table, drawn_by=PLANNER, from_model=False)
    assert planner["Esophagus"]["state"] == "missing"
    assert planner["Heart"]["drawn_by"]["label"] == "RTSTRUCT 'Clinical plan' 2024-08-08"
    codes = {(r.code, r.level, r.structure) for r in gate.state_reasons(planner)}
    assert ("EMPTY_STRUCTURE", "error", "SpinalCord") in codes
    assert ("MISSING_STRUCTURE", "error", "Esophagus") in codes
    review = {(r.code, r.level) for r in gate.state_reasons(states)}
    assert ("STRUCTURE_NOT_SEGMENTED", "review") in review


def test_aliases_match_a_planners_names(table):
    masks = thorax_masks()
    masks["Spinal Cord"] = masks.pop("SpinalCord")
    masks["Lt Lung"] = masks.pop("Lung_L")
    states = states_of(masks, table, drawn_by=PLANNER, from_model=False)
    assert states["SpinalCord"]["matched"] == "Spinal Cord" and states["SpinalCord"]["state"] == "present"
    assert states["Lung_L"]["matched"] == "Lt Lung"
    assert "Spinal Cord" not in states  # listed once, under the table's name


def test_constraint_rows_of_empty_parts_are_not_evaluable(table):
    masks = thorax_masks()
    masks["SpinalCord"] = vol(np.zeros(SHAPE, bool), "SpinalCord")
    masks["GTV"] = vol(np.zeros(SHAPE, bool), "GTV")
    states = states_of(masks, table)
    rows = [
        {"structure": "SpinalCord", "metric": "D0.03cc", "status": "pass", "value": 0.0, "reason": ""},
        {"structure": "Lungs-GTV", "metric": "V20Gy", "status": "pass", "value": 12.0, "reason": ""},
        {"structure": "Heart", "metric": "Dmean", "status": "fail", "value": 30.0, "reason": ""},
    ]
    out = {r["structure"]: r for r in gate.apply_states(rows, states, table)}
    assert out["SpinalCord"]["status"] == "not evaluable" and out["SpinalCord"]["value"] is None
    assert out["SpinalCord"]["reason"] == "not evaluable — SpinalCord is empty (the model found nothing)"
    # Lungs-GTV with an empty GTV would be "the lungs": not evaluable, not evaluated as the rest
    assert out["Lungs-GTV"]["status"] == "not evaluable" and "GTV is empty" in out["Lungs-GTV"]["reason"]
    assert out["Heart"]["status"] == "fail" and out["Heart"]["value"] == 30.0  # untouched


def test_fragmented_one_piece_organs_only_above_a_few_cc():
    heart = box((10, 10, 10), (20, 20, 20))  # 1000 voxels = 10 cm³
    speck = heart.copy()
    speck[30:32, 40:42, 40:42] = True  # 8 voxels = 0.08 cm³: a speck, not a piece
    second = heart.copy()
    second[25:35, 40:50, 40:45] = True  # 500 voxels = 5 cm³ far away: a second piece
    gtv = second.copy()  # two lesions are normal for a tumour
    reasons = gate.fragmentation_reasons({"Heart": vol(speck), "Esophagus": vol(heart)})
    assert reasons == []
    reasons = gate.fragmentation_reasons({"Heart": vol(second), "GTV": vol(gtv), "Lungs": vol(second)})
    assert [(r.code, r.structure) for r in reasons] == [("FRAGMENTED", "Heart")]  # GTV free, Lungs are two
    assert reasons[0].values["component_cc"] == pytest.approx([10.0, 5.0])
    assert gate.component_volumes_cc(vol(speck)) == pytest.approx([10.0, 0.08])


def test_implausible_change_per_organ_tolerance():
    now = {"Heart": 120.0, "SpinalCord": 21.0, "Lung_L": 1300.0, "GTV": 5.0, "Esophagus": 0.0}
    prior = {"Heart": 100.0, "SpinalCord": 20.0, "Lung_L": 1200.0, "GTV": 20.0, "Esophagus": 30.0}
    reasons = gate.change_reasons(now, prior, source="planner contours on both studies")
    assert [(r.code, r.structure) for r in reasons] == [("IMPLAUSIBLE_CHANGE", "Heart")]  # +20 % > 15 %
    assert reasons[0].values["change_pct"] == pytest.approx(20.0)
    assert reasons[0].level == "review"
    # a tumour may shrink by 75 %, the cord +5 % and the lung +8.3 % are within tolerance; empty: not compared


def test_uncertainty_of_an_empty_mask_is_never_zero():
    empty = vol(np.zeros(SHAPE, bool))
    calm = np.zeros(SHAPE, np.float32)
    u = summarize_uncertainty(empty, calm)
    assert u["mean_sigma"] is None and u["empty_mask"] and u["region_cc"] == 0.0  # not measurable, not 0
    hesitant = calm.copy()
    hesitant[10:20, 10:20, 10:20] = 0.2  # the model hesitated here but drew nothing
    u = summarize_uncertainty(empty, hesitant)
    assert u["mean_sigma"] == pytest.approx(0.2) and u["hesitant_cc"] == pytest.approx(10.0)
    # gated against what the model showed on held-out cases: 0.2 > 1.5 × 0.08 → review; 0.2 < 1.5 × 0.2 → nothing
    reasons = gate.uncertainty_reasons({"GTV": u}, calibration={"GTV": {"max": 0.08}})
    assert [(r.code, r.level) for r in reasons] == [("HIGH_UNCERTAINTY", "review")]
    assert "drew nothing" in reasons[0].message and reasons[0].values["limit"] == pytest.approx(0.12)
    assert gate.uncertainty_reasons({"GTV": u}, calibration={"GTV": {"max": 0.2}}) == []
    # no calibration: shown as a note, not gated (a flip-TTA spread is high on every asymmetric organ)
    (note,) = gate.uncertainty_reasons({"GTV": u})
    assert (note.code, note.level) == ("UNCERTAINTY_UNCALIBRATED", "note")
    # a confident, present mask: σ 0.01 inside, a 0.06 rim of 1 000 voxels → mean over both
    mask = box((10, 10, 10), (20, 20, 20))
    sigma = np.where(mask, 0.01, 0.0).astype(np.float32)
    rim = box((9, 9, 9), (21, 21, 21)) & ~mask
    sigma[rim] = 0.06
    u = summarize_uncertainty(vol(mask), sigma)
    assert u["mean_sigma"] == pytest.approx((1000 * 0.01 + rim.sum() * 0.06) / (1000 + rim.sum()), rel=1e-5)
    assert HESITANT_SIGMA <= 0.06 and gate.uncertainty_reasons({"Heart": u}) == []


def test_dose_that_is_not_a_plan_total_is_an_error():
    dose = make_volume(np.full((4, 4, 4), 2.0, np.float32), affine_from((0, 0, 0), np.eye(3), SPACING), name="dose",
                       attrs={"units": "Gy", "dose_type": "PHYSICAL", "dose_summation_type": "PLAN",
                              "sop_instance_uid": "1.2.3.4"})
    assert gate.plan_dose_reasons(dose) == []
    dose.attrs["dose_summation_type"] = "MULTI_PLAN"
    dose.attrs["dose_type"] = "EFFECTIVE"
    assert gate.plan_dose_reasons(dose) == []
    dose.attrs["dose_summation_type"] = "FRACTION"
    (reason,) = gate.plan_dose_reasons(dose)
    assert (reason.code, reason.level) == ("DOSE_NOT_PLAN_TOTAL", "error")
    assert "FRACTION" in reason.message and "1.2.3.4" in reason.message


def test_gate_status_and_order():
    from pacsai.qa import Reason

    note = Reason("DATA_NOTE", "note", "a note")
    review = Reason("FRAGMENTED", "review", "BODY in pieces", structure="BODY")
    error = Reason("EMPTY_STRUCTURE", "error", "GTV is empty", structure="GTV")
    assert gate.gate([note])["status"] == "PASS"  # notes change nothing
    assert gate.gate([note, review])["status"] == "REVIEW"
    result = gate.gate([note, review, error, error])
    assert result["status"] == "FAIL"
    assert [r["code"] for r in result["reasons"]] == ["EMPTY_STRUCTURE", "FRAGMENTED", "DATA_NOTE"]  # once each


def test_written_by_pacsai_reads_the_header():
    def header(manufacturer, model=""):
        ds = pydicom.Dataset()
        ds.Manufacturer, ds.ManufacturerModelName = manufacturer, model
        return ds

    assert written_by_pacsai(header("pacsai", "pacsai-thorax"))  # a report's model RTSTRUCT
    assert written_by_pacsai(header("PACSAI"))
    assert not written_by_pacsai(header("pacsai", "pacsai.synthetic"))  # the synthetic planner stand-in
    assert not written_by_pacsai(header("Varian Medical Systems", "ARIA RadOnc"))
    assert not written_by_pacsai(pydicom.Dataset())


def test_registration_matrix_composes_prior_to_current():
    """REG frame R; prior frame P shifted +10 mm in x into R, current frame C shifted +3 mm in x into R:
    a prior point at x = 0 is x = 10 in R and x = 7 in C."""
    from pacsai.report.inputs import registration_matrix

    def item(frame, dx):
        matrix = pydicom.Dataset()
        m = np.eye(4)
        m[0, 3] = dx
        matrix.FrameOfReferenceTransformationMatrix = [str(v) for v in m.ravel()]
        registration = pydicom.Dataset()
        registration.MatrixSequence = [matrix]
        entry = pydicom.Dataset()
        entry.FrameOfReferenceUID = frame
        entry.MatrixRegistrationSequence = [registration]
        return entry

    reg = pydicom.Dataset()
    reg.FrameOfReferenceUID = "1.2.3.100"
    reg.RegistrationSequence = [item("1.2.3.200", 10.0), item("1.2.3.300", 3.0)]
    matrix = registration_matrix(reg, prior="1.2.3.200", current="1.2.3.300")
    assert matrix @ np.array([0.0, 5.0, 1.0, 1.0]) == pytest.approx([7.0, 5.0, 1.0, 1.0])
    into_own = registration_matrix(reg, prior="1.2.3.200", current="1.2.3.100")  # the REG's own frame: identity
    assert into_own @ np.array([0.0, 0.0, 0.0, 1.0]) == pytest.approx([10.0, 0.0, 0.0, 1.0])
    assert registration_matrix(reg, prior="1.2.3.400", current="1.2.3.300") is None


def test_a_scan_much_shorter_than_the_training_scans_is_a_review():
    """Training scans 80 mm long; a 3-slice (12 mm) slab of the same anatomy cuts every organ → review; a longer
    scan (160 mm) holds them all → nothing."""
    from pacsai.domain import check_input, image_stats, training_domain

    def phantom(slices):
        hu = np.full((slices, 100, 100), -1000.0, np.float32)
        hu[:, 20:80, 10:90] = 0.0
        hu[:, 30:70, 20:45] = hu[:, 30:70, 55:80] = -800.0
        return make_volume(hu, affine_from((0, 0, 0), np.eye(3), (2.0, 2.0, 4.0)))

    domain = training_domain([image_stats(phantom(20))], [{}])
    assert check_input(domain, image_stats(phantom(40))) == []
    (reason,) = check_input(domain, image_stats(phantom(3)))
    assert (reason.code, reason.level) == ("DOMAIN_SCAN_LENGTH", "review")
    assert reason.values == {"scan_length_mm": 12.0, "trained_min_mm": 80.0}


def test_uncertainty_domain_is_what_the_gate_compares_with():
    """Held-out σ per structure → median/max; the gate then reviews only a case beyond 1.5 × the max."""
    from pacsai.domain import uncertainty_domain

    cases = [{"SpinalCord": {"mean_sigma": 0.40}, "GTV": {"mean_sigma": None}},
             {"SpinalCord": {"mean_sigma": 0.46}, "GTV": {"mean_sigma": 0.2}}]
    domain = uncertainty_domain(cases)
    assert domain == {"GTV": {"median": 0.2, "max": 0.2, "n": 1},
                      "SpinalCord": {"median": 0.43, "max": 0.46, "n": 2}}
    assert gate.uncertainty_reasons({"SpinalCord": {"mean_sigma": 0.45}}, calibration=domain) == []
    (reason,) = gate.uncertainty_reasons({"GTV": {"mean_sigma": 0.35}}, calibration=domain)
    assert reason.code == "HIGH_UNCERTAINTY" and reason.values["held_out_max"] == 0.2
