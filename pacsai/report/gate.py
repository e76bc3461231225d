"""The report's QA gate: structure states, and every reason pacsai could not trust what it is about to state.

Vocabulary and levels: :mod:`pacsai.qa` (``error`` → FAIL, ``review`` → REVIEW, ``note`` changes nothing); the
codes and thresholds are listed in docs/clinical_definitions.md ("The QA gate"). Each check here is a small pure
function of masks and numbers, so every rule is tested on a case built by hand.

States (docs/clinical_definitions.md "Structures") of every structure a report asks for — the target, BODY and the
structures of the constraint set (with the parts of derived ones such as Lungs-GTV):

- ``present``: drawn, non-empty;
- ``empty``: the source holds it without a voxel (e.g. the model found nothing);
- ``missing``: the planner's RTSTRUCT has no ROI of that name (or alias);
- ``not requested``: the model does not segment it (it was never asked for it), so nobody drew it.

Who decides what "required" means: the target (margins, coverage, response) and each constraint's structure are
required — empty or missing → error; not requested → review (a constraint that cannot be checked here).

Reasons made here (the report adds pacsai.domain's DOMAIN_* / VOLUME_OUT_OF_RANGE and the response's own):

=========================  ======  =====================================================================
code                       level   when
=========================  ======  =====================================================================
EMPTY_STRUCTURE            error   a required structure is empty (note for one nobody needs)
MISSING_STRUCTURE          error   a required structure is not in the planner's structure set
STRUCTURE_NOT_SEGMENTED    review  a required structure the model does not segment
FRAGMENTED                 review  a one-piece organ in more than one piece of ≥ 1 cm³ (model contours)
IMPLAUSIBLE_CHANGE         review  |ΔV| since the prior beyond the organ's tolerance (same source only)
HIGH_UNCERTAINTY           review  mean TTA σ over the candidate region > 1.5 × the model's held-out maximum
                                   (and > 0.1); UNCERTAINTY_UNCALIBRATED (note) where the model records none
DOSE_NOT_PLAN_TOTAL        error   the RTDOSE is not a total plan dose (PLAN/MULTI_PLAN, PHYSICAL/EFFECTIVE)
DOSE_UNCOVERED             review  a constraint structure (or the PTV) > 1 % or 0.5 cm³ outside the dose grid
MODEL_REFERENCE_DISAGREE   review  a constraint or coverage verdict differs on the planner's contours
TOUCHES_EDGE, NO_BODY,     note    a structure at the image edge, no BODY to clip the CTV, a data note
DATA_NOTE
=========================  ======  =====================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from pacsai.planning.structures import component_volumes_cc  # one definition: the cropped labelling
from pacsai.qa import Reason, gate_status

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.planning.constraints import ConstraintSet

PRESENT, EMPTY, MISSING, NOT_REQUESTED = "present", "empty", "missing", "not requested"
STATES = (PRESENT, EMPTY, MISSING, NOT_REQUESTED)

#: Organs that are one piece in the body → fragmented when more than this many components ≥ FRAGMENT_MIN_CC.
ONE_PIECE = {"body": 1, "heart": 1, "spinalcord": 1, "esophagus": 1, "lungl": 1, "lungr": 1, "lungs": 2}
#: A component smaller than this (cm³) is a speck, not a second piece of the organ ("a few cm³"; a real stray
#: blob of heart or cord in the wrong place is larger, while partial-volume specks of a good contour are smaller).
FRAGMENT_MIN_CC = 1.0
#: Tolerated |ΔV| (% of the prior) since the prior study for organs that do not shrink within weeks. The organ
#: itself changes a few per cent (heart filling, breathing); beyond these, the contour is the likelier cause.
#: Lungs get more (inspiration depth, effusion, atelectasis); oesophagus and cord depend on the scan length too.
CHANGE_TOLERANCE_PCT = {"heart": 15.0, "spinalcord": 15.0, "esophagus": 20.0, "lungl": 20.0, "lungr": 20.0,
                        "lungs": 20.0}
#: Name variants (normalised) of those organs: planner RTSTRUCTs spell them in many ways.
ORGAN_ALIASES = {
    "body": ("body", "external", "skin", "outline"),
    "heart": ("heart", "cor", "heartnrg"),
    "spinalcord": ("spinalcord", "cord", "spinalcanal", "medulla"),
    "esophagus": ("esophagus", "oesophagus", "esophagusnrg", "oesophag"),
    "lungl": ("lungl", "lunglt", "ltlung", "leftlung", "lungleft", "llung"),
    "lungr": ("lungr", "lungrt", "rtlung", "rightlung", "lungright", "rlung"),
    "lungs": ("lungs", "lungtotal", "totallung", "lung"),
}
#: A structure's TTA uncertainty above this multiple of the most its model showed on held-out cases → review.
CALIBRATION_FACTOR = 1.5
#: A PTV V95% (share of the PTV receiving ≥ 95 % of the prescription) at or above this is adequate coverage
#: (ICRU 83's usual aim: 95 % of the PTV within 95 % of the prescription).
COVERAGE_V95_MIN_PCT = 95.0


def normalise(name: str) -> str:
    from pacsai.planning.constraints import normalise_name

    return normalise_name(name)


def organ_of(name: str) -> str | None:
    """The organ key of :data:`ORGAN_ALIASES` a structure name stands for, or None."""
    n = normalise(name)
    return next((organ for organ, names in ORGAN_ALIASES.items() if n in names), None)


def mask_state(mask: xr.DataArray | None) -> str:
    if mask is None:
        return MISSING
    return PRESENT if bool(np.asarray(mask.values).any()) else EMPTY


# ------------------------------------------------------------------------------------------------- reasons


def state_reasons(states: Mapping[str, Mapping[str, Any]]) -> list[Reason]:
    """Empty or missing required structures → error; not requested → review; empty optional ones → note."""
    reasons = []
    for name, info in states.items():
        state, required, who = info["state"], info.get("required", False), info.get("drawn_by") or {}
        label = who.get("label", "")
        if state == EMPTY:
            found_nothing = "the model found nothing" if who.get("kind") == "model" else "the ROI has no contour"
            reasons.append(Reason(
                "EMPTY_STRUCTURE", "error" if required else "note",
                f"{name} is empty ({found_nothing}; {label})"
                + (f": {info['needed_for']} cannot be stated" if required and info.get("needed_for") else ""),
                structure=name, values={"volume_cc": 0.0, "drawn_by": label},
            ))
        elif state == MISSING and required:
            reasons.append(Reason(
                "MISSING_STRUCTURE", "error",
                f"{name} is missing (no structure of that name or its aliases in {label or 'the structure set'})"
                + (f": {info['needed_for']} cannot be stated" if info.get("needed_for") else ""),
                structure=name, values={"drawn_by": label},
            ))
        elif state == NOT_REQUESTED and required:
            reasons.append(Reason(
                "STRUCTURE_NOT_SEGMENTED", "review",
                f"{name} is not segmented by {label or 'the model'} (not requested)"
                + (f": {info['needed_for']} cannot be checked here" if info.get("needed_for") else ""),
                structure=name, values={"drawn_by": label},
            ))
    return reasons


def fragmentation_reasons(masks: Mapping[str, xr.DataArray], *, min_cc: float = FRAGMENT_MIN_CC) -> list[Reason]:
    """One-piece organs (:data:`ONE_PIECE`) with more components of ≥ ``min_cc`` cm³ than they have in a body."""
    reasons = []
    for name, mask in masks.items():
        organ = organ_of(name)
        if organ is None:
            continue
        sizes = component_volumes_cc(mask)
        large = [v for v in sizes if v >= min_cc]
        if len(large) > ONE_PIECE[organ]:
            reasons.append(Reason(
                "FRAGMENTED", "review",
                f"{name} is in {len(large)} pieces of ≥ {min_cc:g} cm³ ({len(sizes)} in all; "
                f"largest {', '.join(f'{v:.1f}' for v in large[:4])} cm³); it is one piece in a body",
                structure=name,
                values={"n_components": len(sizes), "n_large": len(large), "min_cc": min_cc,
                        "component_cc": [round(v, 3) for v in large[:10]]},
            ))
    return reasons


def change_reasons(now_cc: Mapping[str, float], prior_cc: Mapping[str, float], *, source: str) -> list[Reason]:
    """|ΔV| since the prior beyond :data:`CHANGE_TOLERANCE_PCT` for organs that do not shrink in weeks.

    Only call with volumes of the same source on both studies (the caller's responsibility: a model current
    against a planner prior measures the model, not the patient).
    """
    reasons = []
    for name, now in now_cc.items():
        organ = organ_of(name)
        tolerance = CHANGE_TOLERANCE_PCT.get(organ or "")
        before = prior_cc.get(name)
        if tolerance is None or before is None or before <= 0 or now <= 0:
            continue
        change = 100.0 * (now - before) / before
        if abs(change) > tolerance:
            reasons.append(Reason(
                "IMPLAUSIBLE_CHANGE", "review",
                f"{name} changed {change:+.1f} % since the prior study ({before:.1f} → {now:.1f} cm³, {source}); "
                f"an organ that does not shrink within weeks: tolerance ±{tolerance:g} % — likely a contour error",
                structure=name,
                values={"prior_cc": round(before, 3), "now_cc": round(now, 3), "change_pct": round(change, 2),
                        "tolerance_pct": tolerance},
            ))
    return reasons


def uncertainty_reasons(
    uncertainty: Mapping[str, Mapping[str, Any]],
    *,
    calibration: Mapping[str, Mapping[str, Any]] | None = None,
    limit: float | None = None,
) -> list[Reason]:
    """Model uncertainty (mean TTA σ over the candidate region, :mod:`pacsai.report.uncertainty`) above its limit.

    A TTA spread means something only against what the same model shows on contours known to be good: a network
    not trained to be invariant to the test-time flips spreads widely on every asymmetric organ (measured: the
    demo model's cord σ 0.45, Dice 0.92). So the limit is relative where the model records its held-out
    uncertainty (``calibration[structure]`` with ``max``, from the validation cases): review above
    max(``limit``, :data:`CALIBRATION_FACTOR` × that max). Without a calibration the figure is shown as a note
    only (not gated): flagging every good cord would teach users to ignore the gate.
    """
    from pacsai.report.uncertainty import HIGH_UNCERTAINTY

    limit = HIGH_UNCERTAINTY if limit is None else limit
    reasons = []
    for name, u in uncertainty.items():
        sigma = u.get("mean_sigma")
        if sigma is None:
            continue
        where = ("where the model hesitated (it drew nothing)" if u.get("empty_mask")
                 else "over the contour and its hesitant rim")
        known = (calibration or {}).get(name) or {}
        values = {"mean_sigma": round(float(sigma), 4), "region_cc": round(float(u.get("region_cc", 0.0)), 3)}
        if known.get("max") is not None:
            bound = max(limit, CALIBRATION_FACTOR * float(known["max"]))
            if sigma > bound:
                reasons.append(Reason(
                    "HIGH_UNCERTAINTY", "review",
                    f"{name}: model uncertainty {sigma:.2f} (mean TTA σ {where}, {u.get('region_cc', 0):.1f} cm³) "
                    f"exceeds {bound:.2f} ({CALIBRATION_FACTOR:g} × the most seen on held-out cases, "
                    f"{float(known['max']):.2f}): review the contour",
                    structure=name, values={**values, "limit": round(bound, 4), "held_out_max": known["max"]},
                ))
        elif sigma > limit:
            reasons.append(Reason(
                "UNCERTAINTY_UNCALIBRATED", "note",
                f"{name}: model uncertainty {sigma:.2f} (mean TTA σ {where}); the model records no held-out "
                "uncertainty to compare it with, so it is shown, not gated",
                structure=name, values={**values, "limit": limit},
            ))
    return reasons


def plan_dose_reasons(dose: xr.DataArray) -> list[Reason]:
    """The plan-dose check of :func:`pacsai.imaging.dose.check_plan_dose` as a gate reason (error)."""
    from pacsai.imaging.dose import NotPlanDoseError, check_plan_dose

    try:
        check_plan_dose(dose)
    except NotPlanDoseError as err:
        return [Reason("DOSE_NOT_PLAN_TOTAL", "error", f"{err}; constraints, DVH verdicts and coverage are not "
                       "evaluable on it", values={"DoseSummationType": dose.attrs.get("dose_summation_type"),
                                                  "DoseType": dose.attrs.get("dose_type")})]
    return []


def uncovered_reasons(rows: Sequence[Mapping[str, Any]], *, coverage: Mapping[str, Any] | None = None) -> list[Reason]:
    """Constraint structures partly outside the dose grid (rows ``unreliable``) → review, with the cm³."""
    reasons = []
    for row in rows:
        if row.get("status") != "unreliable":
            continue
        name = str(row.get("matched") or row.get("structure"))
        reasons.append(Reason(
            "DOSE_UNCOVERED", "review",
            f"constraint {row.get('structure')} {row.get('metric')} unreliable: {row.get('reason')}",
            structure=name,
            values={"uncovered_cc": row.get("uncovered_cc"), "uncovered_pct": row.get("uncovered_pct")},
        ))
    from pacsai.planning.constraints import MAX_UNCOVERED_CC, MAX_UNCOVERED_PCT

    outside = float((coverage or {}).get("target_uncovered_cc") or 0.0)
    total = outside + float((coverage or {}).get("target_volume_cc") or 0.0)
    if outside > MAX_UNCOVERED_CC or (total > 0 and 100.0 * outside / total > MAX_UNCOVERED_PCT):
        reasons.append(Reason(
            "DOSE_UNCOVERED", "review", f"{outside:.3g} cm³ of the PTV lies outside the dose grid: its coverage "
            "is measured on the part inside", structure="PTV", values={"uncovered_cc": outside},
        ))
    return reasons


def gate(reasons: Iterable[Reason]) -> dict[str, Any]:
    """``{"status", "reasons"}``: reasons de-duplicated (code, structure, message), errors first."""
    seen, unique = set(), []
    for r in reasons:
        key = (r.code, r.structure, r.message)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    order = {"error": 0, "review": 1, "note": 2}
    unique.sort(key=lambda r: order[r.level])
    return {"status": gate_status(unique), "reasons": [r.to_dict() for r in unique]}


def constraint_parts(structure: str, table: ConstraintSet) -> list[str]:
    """The structures a constraint's structure is made of: itself, or the union and minus parts it derives from."""
    spec = (getattr(table, "structures", {}) or {}).get(structure) or {}
    derive = spec.get("derive") or {}
    parts = [*derive.get("union", []), *derive.get("minus", [])]
    return [str(p) for p in parts] or [structure]


def not_evaluable_reason(name: str, info: Mapping[str, Any]) -> str:
    """The reason text of a constraint row whose structure (or one of its parts) is not present."""
    who = info.get("drawn_by") or {}
    state = info.get("state")
    if state == EMPTY:
        why = "the model found nothing" if who.get("kind") == "model" else "the ROI has no contour"
        return f"not evaluable — {name} is empty ({why})"
    if state == NOT_REQUESTED:
        return f"not evaluable — {name} is not segmented by {who.get('label') or 'the model'} (not requested)"
    return f"not evaluable — {name} is missing (no such structure in {who.get('label') or 'the structure set'})"


def apply_states(
    rows: Sequence[dict[str, Any]], states: Mapping[str, Mapping[str, Any]], table: ConstraintSet
) -> list[dict[str, Any]]:
    """Constraint rows whose structure, or a part of a derived one, is not present become ``not evaluable``.

    A row the planning evaluation already marked not evaluable/unreliable keeps its own reason; a pass or fail
    computed on a structure that is empty, missing or not requested (e.g. Lungs-GTV with an empty GTV, which
    would be evaluated as "the lungs") is withdrawn: value and verdict are cleared, the reason says why.
    """
    out = []
    for row in rows:
        row = dict(row)
        for part in constraint_parts(str(row.get("structure")), table):
            info = states.get(part)
            if info is None or info["state"] == PRESENT:
                continue
            if row.get("status") in ("pass", "fail") or info["state"] == NOT_REQUESTED:
                row.update(status="not evaluable", value=None, passed=None, goal_met=None,
                           reason=not_evaluable_reason(part, info))
            break
        if row.get("status") == "not evaluable" and not str(row.get("reason", "")).startswith("not evaluable"):
            row["reason"] = f"not evaluable — {row.get('reason') or 'no reason given'}"
        out.append(row)
    return out


__all__ = [
    "CHANGE_TOLERANCE_PCT",
    "COVERAGE_V95_MIN_PCT",
    "EMPTY",
    "FRAGMENT_MIN_CC",
    "MISSING",
    "NOT_REQUESTED",
    "PRESENT",
    "apply_states",
    "change_reasons",
    "component_volumes_cc",
    "plan_dose_reasons",
    "uncovered_reasons",
    "fragmentation_reasons",
    "gate",
    "mask_state",
    "state_reasons",
    "uncertainty_reasons",
]
