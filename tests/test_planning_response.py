"""pacsai.planning.response: RECIST 1.1 as written, on hand-built masks with known answers.

Masks are axis-aligned rectangles on one slice with 1 mm pixels, so every longest axial diameter is the
rectangle's diagonal (pixel corners): 30 × 40 px → 50 mm, 21 × 28 → 35 mm, 12 × 16 → 20 mm, 9 × 12 → 15 mm,
12 × 35 → 37 mm, 3 × 4 → 5 mm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pacsai.errors import PlanningError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning.response import StudyContours, assess_response, measurable_threshold_mm, recist_category


@pytest.mark.parametrize(
    ("prior", "now", "new", "expected"),
    [
        (100.0, 70.0, False, "PR"),  # −30 % exactly
        (100.0, 70.1, False, "SD"),  # −29.9 %
        (50.0, 60.0, False, "PD"),  # +20 % and +10 mm
        (20.0, 24.0, False, "SD"),  # +20 % but only +4 mm
        (25.0, 30.0, False, "PD"),  # +20 % and +5 mm exactly
        (100.0, 119.9, False, "SD"),  # +19.9 %, +19.9 mm
        (100.0, 0.0, False, "CR"),
        (100.0, 0.0, True, "PD"),  # a new lesion beats everything
        (100.0, 50.0, True, "PD"),
        (0.0, 10.0, False, "NE"),
    ],
)
def test_recist_category_thresholds(prior, now, new, expected):
    assert recist_category(prior, now, new_lesion=new) == expected


def test_recist_category_rejects_negative():
    with pytest.raises(PlanningError, match="≥ 0"):
        recist_category(-1.0, 2.0)


def masks(
    rects, *, spacing=1.0, frame="1.2.3", extra=None, shape=(3, 80, 80), origin=(0.0, 0.0, 0.0), **attrs
):
    """A GTV with axis-aligned rectangles [(slice, row0, col0, rows, cols)], in-plane pixels of ``spacing`` mm."""
    arr = np.zeros(shape, bool)
    for k, r0, c0, rows, cols in rects:
        arr[k, r0 : r0 + rows, c0 : c0 + cols] = True
    affine = affine_from(origin, np.eye(3), (spacing, spacing, 3.0))
    out = {"GTV": make_volume(arr, affine, name="GTV", attrs={"frame_of_reference_uid": frame, **attrs})}
    for name, value in (extra or {}).items():
        out[name] = make_volume(value, affine, name=name, attrs={"frame_of_reference_uid": frame})
    return out


def ref(rects, **kw):
    return StudyContours(masks(rects, **kw), source="reference", label="RTSTRUCT 'plan'")


def model(rects, **kw):
    return StudyContours(
        masks(rects, source_model="thorax v3", **kw), source="model", label="model thorax v3"
    )


def codes(r, level=None):
    return [x["code"] for x in r.reasons if level is None or x["level"] == level]


BIG = (1, 5, 5, 30, 40)  # 50 mm


# ------------------------------------------------------------------------------------------ the table
def test_disappearance_on_reference_contours_is_cr():
    r = assess_response(ref([]), ref([BIG]))
    assert (r.category, r.final, r.sld_prior_mm, r.sld_now_mm) == ("CR", True, 50.0, 0.0)
    assert r.change_pct == pytest.approx(-100.0) and r.reasons == ()
    assert r.lesions[0] | {} == {
        "lesion": 1,
        "kind": "target",
        "organ": "GTV",
        "prior_mm": 50.0,
        "now_mm": 0.0,
        "prior_components": 1,
        "now_components": 0,
        "note": "disappeared",
    }
    assert r.sources["current"] == {"source": "reference", "label": "RTSTRUCT 'plan'", "trustworthy": True}


def test_empty_model_segmentation_is_ne_with_an_error_never_cr():
    r = assess_response(model([]), model([BIG]))
    assert (r.category, r.final) == ("NE", False)
    assert codes(r, "error") == ["EMPTY_MODEL_SEGMENTATION"]
    assert "the model found no GTV in the current study" in r.reasons[0]["message"]
    assert math.isnan(r.sld_now_mm) and r.lesions == ()
    assert "GTV" not in r.volume_change_pct  # an empty model mask is no volume change either


def test_mixed_sources_are_ne():
    r = assess_response(model([BIG]), ref([BIG]))
    assert (r.category, r.final, codes(r, "error")) == ("NE", False, ["MIXED_SOURCES"])
    assert (
        "prior contours from reference (RTSTRUCT 'plan'), current from model (model thorax v3)" in r.notes[0]
    )
    assert r.volume_change_pct == {}  # nor volume changes across sources
    assert "VOLUME_CHANGE_NOT_COMPARABLE" in codes(r)


def test_untrustworthy_contours_are_ne():
    current = StudyContours(
        masks([BIG]), source="model", trustworthy=False, why_untrusted="QA FAIL: FRAGMENTED"
    )
    r = assess_response(current, StudyContours(masks([BIG]), source="model"))
    assert (r.category, codes(r, "error")) == ("NE", ["UNTRUSTED_CONTOURS"])
    assert r.notes[0] == "the current contours (model) are not trustworthy: QA FAIL: FRAGMENTED"


def test_split_lesion_fragments_are_summed():
    # One 50 mm lesion; now two fragments inside its footprint, 20 mm and 15 mm: 35 mm, −30 % → PR.
    r = assess_response(ref([(1, 5, 5, 12, 16), (1, 25, 25, 9, 12)]), ref([BIG]))
    assert (r.category, r.final, r.sld_now_mm, r.change_pct) == ("PR", True, 35.0, pytest.approx(-30.0))
    (lesion,) = r.lesions
    assert (lesion["prior_components"], lesion["now_components"], lesion["now_mm"]) == (1, 2, 35.0)
    assert "2 fragments now: their diameters are summed (35.0 mm)" in lesion["note"]
    assert r.new_lesions == 0 and codes(r) == ["LESION_ASSOCIATION"]


def test_merged_lesions_count_the_coalesced_diameter_once():
    # Two 20 mm target lesions 3 px apart; now one 12 × 35 lesion covering both: 37 mm against 40 → SD.
    prior = ref([(1, 5, 5, 12, 16), (1, 5, 24, 12, 16)])
    r = assess_response(ref([(1, 5, 5, 12, 35)]), prior)
    assert r.target_lesions_prior_mm == (20.0, 20.0) and r.target_lesions_now_mm == (37.0, 0.0)
    assert (r.category, r.sld_now_mm, r.change_pct) == ("SD", 37.0, pytest.approx(-7.5))
    assert r.lesions[1]["note"] == "coalesced with target lesion 1" and r.new_lesions == 0
    assert "has coalesced with 2" in r.lesions[0]["note"]


def test_new_lesion_below_10_mm_is_equivocal_not_progression():
    small_new = ref([BIG, (1, 60, 60, 3, 4)])  # the same lesion + a 5 mm component far away
    r = assess_response(small_new, ref([BIG]))
    assert (r.category, r.new_lesions, r.final) == ("SD", 0, False)
    assert codes(r, "review") == ["NEW_LESION_EQUIVOCAL"]
    assert [x["kind"] for x in r.lesions] == ["target", "equivocal new"]
    big_new = ref([BIG, (1, 55, 55, 12, 16)])  # 20 mm: unequivocal → PD whatever the target lesions do
    r2 = assess_response(big_new, ref([BIG]))
    assert (r2.category, r2.new_lesions, r2.final) == ("PD", 1, True)
    assert r2.lesions[1]["kind"] == "new" and r2.lesions[1]["now_mm"] == 20.0


def test_different_frames_without_registration_are_provisional():
    r = assess_response(ref([(1, 5, 5, 21, 28)], frame="B"), ref([BIG], frame="A"))
    assert (r.category, r.final, r.new_lesions) == ("PR", False, None)
    assert codes(r) == ["FRAME_UNREGISTERED"] and r.frames == {
        "prior": "A",
        "current": "B",
        "registration": False,
    }
    unknown = assess_response(ref([(1, 5, 5, 21, 28)], frame=""), ref([BIG], frame=""))
    assert (unknown.final, codes(unknown)) == (False, ["FRAME_UNREGISTERED"])


def test_shift_without_registration_is_not_progression_and_with_one_is_followed():
    # The patient lies 45 mm further left in the current scan's frame: same lesion, no overlap in coordinates.
    shifted = ref([BIG], frame="B", origin=(45.0, 0.0, 0.0))
    r = assess_response(shifted, ref([BIG], frame="A"))
    assert (r.category, r.final, r.new_lesions, r.sld_now_mm) == ("SD", False, None, 50.0)
    # The same shift in one frame would look like a disappearance plus a new lesion: only a registration
    # lets positions be compared, and then the lesion is followed exactly.
    moved = np.eye(4)
    moved[0, 3] = 45.0
    followed = assess_response(shifted, ref([BIG], frame="A"), registration=moved)
    assert (followed.category, followed.final, followed.new_lesions, followed.change_pct) == (
        "SD",
        True,
        0,
        0.0,
    )
    assert followed.frames["registration"] is True
    wrong = assess_response(shifted, ref([BIG], frame="A"), registration=np.eye(4))
    assert (wrong.category, wrong.new_lesions) == ("PD", 1)  # the registration is trusted as given


def test_partial_response_at_exactly_minus_30_percent():
    r = assess_response(ref([(1, 5, 5, 21, 28)]), ref([BIG]))  # 35 mm against 50
    assert (r.category, r.final, r.change_pct, r.change_mm) == ("PR", True, pytest.approx(-30.0), -15.0)
    assert r.volume_change_pct["GTV"] == pytest.approx(100 * (21 * 28 - 30 * 40) / (30 * 40))
    d = r.to_dict()
    assert d["category"] == "PR" and d["target_lesions_prior_mm"] == [50.0] and isinstance(d["reasons"], list)


def test_plus_20_percent_but_under_5_mm_is_stable_disease():
    # 12 × 16 (20 mm) → 14.4 × 19.2 mm (24 mm) on 1.2 mm pixels: +20 %, +4 mm → SD; 15 × 20 (25 mm) → PD.
    prior = ref([(1, 5, 5, 12, 16)])
    r = assess_response(ref([(1, 5, 5, 12, 16)], spacing=1.2), prior)
    assert (r.category, r.sld_now_mm, r.change_mm) == ("SD", pytest.approx(24.0), pytest.approx(4.0))
    grown = assess_response(ref([(1, 5, 5, 15, 20)]), ref([(1, 5, 5, 12, 16)]))  # 25 mm: +25 %, +5 mm
    assert grown.category == "PD"


# ------------------------------------------------------------------------------------------ further rules
def test_target_cr_with_a_non_target_lesion_left_is_pr():
    prior = ref([BIG, (1, 60, 60, 3, 4)])  # a 50 mm target and a 5 mm non-measurable lesion
    r = assess_response(ref([(1, 60, 60, 3, 4)]), prior)
    assert (r.category, r.sld_now_mm) == ("PR", 0.0)
    assert "NON_TARGET_REMAINS" in codes(r)
    assert [x["kind"] for x in r.lesions] == ["target", "non-target"]
    assert r.lesions[1]["note"].startswith("non-measurable (5.0 mm < 10 mm)")


def test_at_most_two_targets_per_organ_and_five_in_all():
    six = [(1, 2 + 12 * n, 2, 6, 8) for n in range(6)]  # six 10 mm lesions
    r = assess_response(ref(six), ref(six))
    assert r.target_lesions_prior_mm == (10.0, 10.0) and r.category == "SD"  # one organ: 2 targets
    assert sum(x["kind"] == "non-target" for x in r.lesions) == 4
    assert "already 2 target lesions in GTV" in r.lesions[-1]["note"]
    # Three structures (organs) with 2 lesions each: 5 targets in all.
    arrays = {}
    for n, name in enumerate(("GTVp", "GTVn", "GTVm")):
        a = np.zeros((3, 80, 80), bool)
        a[1, 2 + 24 * n : 8 + 24 * n, 2:10] = True
        a[1, 14 + 24 * n : 20 + 24 * n, 2:10] = True
        arrays[name] = make_volume(
            a,
            affine_from((0, 0, 0), np.eye(3), (1.0, 1.0, 3.0)),
            name=name,
            attrs={"frame_of_reference_uid": "1.2.3"},
        )
    study = StudyContours(arrays, source="reference")
    r3 = assess_response(study, study, target=["GTVp", "GTVn", "GTVm"])
    assert len(r3.target_lesions_prior_mm) == 5 and "already 5 target lesions" in r3.lesions[-1]["note"]
    merged = assess_response(study, study, target=["GTVp", "GTVn"], organ_of={"GTVp": "lung", "GTVn": "lung"})
    assert len(merged.target_lesions_prior_mm) == 2  # one organ across two structures


def test_no_measurable_disease_and_thick_slices():
    r = assess_response(ref([BIG]), ref([(1, 5, 5, 3, 4)]))  # 5 mm at baseline
    assert (r.category, r.final, codes(r)) == ("NE", False, ["NO_MEASURABLE_DISEASE"])
    thick = make_volume(np.zeros((2, 2, 2), bool), affine_from((0, 0, 0), np.eye(3), (1.0, 1.0, 6.0)))
    assert measurable_threshold_mm(thick) == 12.0  # > 5 mm slices: twice the slice thickness
    assert measurable_threshold_mm(masks([])["GTV"]) == 10.0


def test_missing_target_and_unstated_sources():
    r = assess_response(ref([BIG]), StudyContours({"Heart": masks([BIG])["GTV"]}, source="reference"))
    assert (r.category, codes(r, "error")) == ("NE", ["TARGET_MISSING"])
    assert "no structure named 'GTV' in the prior study (Heart)" in r.notes[0]
    plain = assess_response(masks([(1, 5, 5, 21, 28)]), masks([BIG]))  # plain masks: source unstated
    assert (plain.category, plain.final, codes(plain)) == ("PR", False, ["SOURCE_UNSTATED"])
    with pytest.raises(PlanningError, match="source must be one of"):
        StudyContours({}, source="ai")
    with pytest.raises(PlanningError, match="4×4"):
        assess_response(ref([BIG]), ref([BIG]), registration=np.eye(3))


def test_volume_change_per_structure_and_name_matching():
    heart = np.zeros((3, 80, 80), bool)
    heart[:, 40:50, 40:50] = True
    heart_now = heart.copy()
    heart_now[:, 40:45, 40:50] = False
    prior = StudyContours(masks([BIG], extra={"Heart": heart}), source="reference")
    now = StudyContours(masks([BIG], extra={"HEART": heart_now, "Cord": heart}), source="reference")
    r = assess_response(now, prior, target="gtv")
    assert r.volume_change_pct == pytest.approx({"GTV": 0.0, "HEART": -50.0})
    assert r.volumes_prior_cc["HEART"] == pytest.approx(300 * 3 / 1000) and "Cord" not in r.volumes_now_cc
