"""pacsai.planning.response: RECIST 1.1-style categories exactly at the thresholds, from numbers and masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pacsai.errors import PlanningError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning.response import assess_response, recist_category


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


def study(rects, *, spacing=1.0, frame="1.2.3", extra=None, shape=(3, 80, 80)):
    """A GTV with axis-aligned rectangles [(slice, row0, col0, rows, cols)], in-plane pixels of ``spacing`` mm."""
    arr = np.zeros(shape, bool)
    for k, r0, c0, rows, cols in rects:
        arr[k, r0 : r0 + rows, c0 : c0 + cols] = True
    affine = affine_from((0, 0, 0), np.eye(3), (spacing, spacing, 3.0))
    out = {"GTV": make_volume(arr, affine, name="GTV", attrs={"frame_of_reference_uid": frame})}
    for name, value in (extra or {}).items():
        out[name] = make_volume(value, affine, name=name, attrs={"frame_of_reference_uid": frame})
    return out


def test_partial_response_at_minus_30_percent_from_masks():
    prior = study([(1, 5, 5, 30, 40)], frame="A")  # 30 × 40 mm → diagonal 50 mm
    now = study([(1, 5, 5, 21, 28)], frame="B")  # 21 × 28 mm → diagonal 35 mm: −30 % exactly
    r = assess_response(now, prior)
    assert r.category == "PR"
    assert (r.sld_prior_mm, r.sld_now_mm) == pytest.approx((50.0, 35.0), abs=1e-9)
    assert (r.change_pct, r.change_mm) == pytest.approx((-30.0, -15.0), abs=1e-9)
    assert r.new_lesions is None and any("not assessed" in n for n in r.notes)
    assert r.volume_change_pct["GTV"] == pytest.approx(100 * (21 * 28 - 30 * 40) / (30 * 40))
    d = r.to_dict()
    assert d["category"] == "PR" and d["target_lesions_prior_mm"] == pytest.approx([50.0])


def test_plus_20_percent_but_4_mm_is_stable_across_pixel_sizes():
    prior = study([(1, 5, 5, 12, 16)], spacing=1.0, frame="A")  # 12 × 16 mm → 20 mm
    now = study([(1, 5, 5, 12, 16)], spacing=1.2, frame="B")  # 14.4 × 19.2 mm → 24 mm: +20 %, +4 mm
    r = assess_response(now, prior)
    assert (r.sld_now_mm, r.category) == (pytest.approx(24.0, abs=1e-9), "SD")
    assert r.volume_change_pct["GTV"] == pytest.approx(100 * (1.44 - 1.0))


def test_progression_and_complete_response():
    prior = study([(1, 5, 5, 30, 40)])  # 50 mm
    grown = study([(1, 5, 5, 36, 48)])  # 60 mm: +20 %, +10 mm
    assert assess_response(grown, prior).category == "PD"
    gone = study([])
    r = assess_response(gone, prior)
    assert (r.category, r.sld_now_mm, r.target_lesions_now_mm) == ("CR", 0.0, (0.0,))


def test_new_lesion_in_the_same_frame_is_progression():
    prior = study([(1, 5, 5, 30, 40)])
    shrunk_plus_new = study([(1, 5, 5, 21, 28), (1, 50, 50, 12, 16)])  # the new one is 20 mm, far away
    r = assess_response(shrunk_plus_new, prior)
    assert (r.category, r.new_lesions, r.sld_now_mm) == ("PD", 1, pytest.approx(35.0))
    small_new = study([(1, 5, 5, 21, 28), (1, 50, 50, 3, 4)])  # 5 mm: below the 10 mm a new lesion needs
    r2 = assess_response(small_new, prior)
    assert (r2.category, r2.new_lesions) == ("PR", 0)


def test_target_lesions_rules_and_not_evaluable():
    # Six measurable lesions and one of 5 mm: at most 5 targets, the largest, are summed.
    rects = [(1, 2 + 12 * n, 2, 6, 8) for n in range(6)] + [(1, 2, 60, 3, 4)]
    prior = study(rects)
    r = assess_response(prior, prior)
    assert r.target_lesions_prior_mm == pytest.approx((10.0,) * 5)
    assert (r.category, r.change_pct) == ("SD", 0.0)
    tiny = study([(1, 5, 5, 3, 4)])  # 5 mm: not measurable
    r2 = assess_response(study([(1, 5, 5, 30, 40)]), tiny)
    assert r2.category == "NE" and math.isnan(r2.change_pct)
    with pytest.raises(PlanningError, match="not among the prior"):
        assess_response(study([]), {"Heart": tiny["GTV"]})


def test_volume_change_per_structure_and_name_matching():
    heart = np.zeros((3, 80, 80), bool)
    heart[:, 40:50, 40:50] = True
    heart_now = heart.copy()
    heart_now[:, 40:45, 40:50] = False
    prior = study([(1, 5, 5, 30, 40)], extra={"Heart": heart})
    now = study([(1, 5, 5, 30, 40)], extra={"HEART": heart_now, "Cord": heart})
    r = assess_response(now, prior, target="gtv")
    assert r.volume_change_pct == pytest.approx({"GTV": 0.0, "HEART": -50.0})
    assert r.volumes_prior_cc["HEART"] == pytest.approx(300 * 3 / 1000)
    assert any("no prior volume for Cord" in n for n in r.notes)
