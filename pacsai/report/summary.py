"""Everything a planning report shows, computed once as a :class:`PlanSummary` (metrics.json is its serialisation).

The report notebook only displays a PlanSummary, so every number here is tested without papermill. Definitions
follow docs/clinical_definitions.md (ICRU 50/62/83, QUANTEC, RECIST 1.1, the QA gate); see :mod:`pacsai.planning`
and :mod:`pacsai.report.gate`.

Every statement is made from contours of a known author (:class:`pacsai.report.inputs.DrawnBy`) and passes the QA
gate first: structure states, the input against the model's training domain, fragments, volumes, uncertainty,
changes since the prior of the same source, and — when the planner's contours exist beside the model's — the same
verdicts computed from the planner's contours, disagreements marked REVIEW with both values.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

import pacsai
from pacsai import planning
from pacsai.errors import PacsaiWarning, PlanningError
from pacsai.qa import FAIL, Reason
from pacsai.report import gate
from pacsai.report.inputs import DrawnBy, PatientData, gather
from pacsai.report.params import ReportParameters

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs
    from pacsai.planning.constraints import ConstraintSet

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MASKS_FILE = "structures.npz"
DERIVED = ("CTV", "PTV")


@dataclass
class PlanSummary:
    """One patient's planning analytics. ``to_dict()`` is metrics.json; arrays stay for the figures."""

    params: ReportParameters
    patient_id: str
    study_instance_uid: str
    study_date: str
    structures: list[dict[str, Any]]
    margins: dict[str, Any]
    geometry: list[dict[str, Any]]
    dvh: dict[str, dict[str, float]]
    dvh_note: str
    plan_quality: dict[str, Any]
    constraints: list[dict[str, Any]]
    fractionation: dict[str, Any]
    response: dict[str, Any]
    qa: dict[str, Any]
    provenance: dict[str, Any]
    image: xr.DataArray = field(repr=False)  # the planning image (every summary has one)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    agreement: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, xr.DataArray] = field(repr=False, default_factory=dict)
    dose: xr.DataArray | None = field(repr=False, default=None)
    prior_image: xr.DataArray | None = field(repr=False, default=None)
    prior_masks: dict[str, xr.DataArray] = field(repr=False, default_factory=dict)
    response_masks: dict[str, xr.DataArray] = field(repr=False, default_factory=dict)
    dvh_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    @property
    def qa_status(self) -> str:
        return str(self.qa.get("status", FAIL))

    def headline(self) -> dict[str, Any]:
        """What a clinician must see first: QA, failed / not evaluable constraints, coverage, response."""
        return {
            "qa_status": self.qa_status,
            "qa_reasons": [r["message"] for r in self.qa.get("reasons", []) if r["level"] != "note"],
            "constraints_failed": [_constraint_line(c) for c in self.constraints if c.get("status") == "fail"],
            "constraints_review": [_constraint_line(c) for c in self.constraints if c.get("status") == "review"],
            "constraints_not_evaluable": [
                _constraint_line(c) for c in self.constraints if c.get("status") in ("not evaluable", "unreliable")
            ],
            "constraint_set": self.params.constraint_set,
            "coverage": self.coverage,
            "response": {k: self.response.get(k) for k in ("category", "source", "note", "prior_study_date")},
        }

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "research_use_only": pacsai.RESEARCH_USE_ONLY,
                "patient_id": self.patient_id,
                "study_instance_uid": self.study_instance_uid,
                "study_date": self.study_date,
                "qa": self.qa,
                "headline": self.headline(),
                "structures": self.structures,
                "structure_states": self.states,
                "margins": self.margins,
                "geometry": self.geometry,
                "dvh": self.dvh,
                "dvh_note": self.dvh_note,
                "plan_quality": self.plan_quality,
                "coverage": self.coverage,
                "constraints": self.constraints,
                "fractionation": self.fractionation,
                "response": self.response,
                "reference": self.reference,
                "agreement": self.agreement,
                "provenance": self.provenance,
            }
        )

    def save(self, folder: Path) -> Path:
        """Write metrics.json and the structure masks (for the DICOM outputs) into ``folder``; atomic."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / METRICS_FILE
        _atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False).encode())
        tmp = folder / f".{MASKS_FILE}.tmp.npz"
        _save_masks(tmp, {name: np.asarray(m.values, dtype=bool) for name, m in self.masks.items()})
        os.replace(tmp, folder / MASKS_FILE)
        return path


def _save_masks(path: Path, masks: Mapping[str, np.ndarray]) -> None:
    """The masks as an ``.npz`` (what :func:`numpy.savez_compressed` writes, read back by :func:`numpy.load`), at
    the fastest deflate level: masks are long runs of zeros and ones, which level 1 packs nearly as tightly in a
    third of the time (the summary cell writes ~25 CT-sized masks)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, values in masks.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, values, allow_pickle=False)


def _constraint_line(c: Mapping[str, Any]) -> str:
    unit = c.get("unit", "")
    limit = f"{c.get('comparator', '')} {_num(c.get('limit'))} {unit}".strip()
    if c.get("status") in ("not evaluable", "unreliable"):
        reason = str(c.get("reason") or "").removeprefix("not evaluable — ")
        text = f"{c.get('structure')} {c.get('metric')} (limit {limit}): {reason}"
        if c.get("reference_status") in ("pass", "fail"):  # what the planner's contours say instead
            text += f" — on the reference contours: {c['reference_status'].upper()} " \
                    f"{_num(c.get('reference_value'))} {unit}"
        return text
    text = f"{c.get('structure')} {c.get('metric')} {_num(c.get('value'))} {unit} (limit {limit})"
    if c.get("status") == "review":
        text += f": model {c.get('model_status')}, reference {c.get('reference_status')} " \
                f"({_num(c.get('reference_value'))} {unit})"
    elif c.get("reference_status") == c.get("status"):
        text += f"; the reference contours agree ({_num(c.get('reference_value'))} {unit})"
    return text


def _num(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{float(value):.1f}"


def build_summary(params: ReportParameters, *, pacs: Pacs | None = None) -> PlanSummary:
    """Connect (``params.pacs_url`` or settings), gather the patient's data and compute its summary.

    Data notes raised while reading (e.g. an ROI without contours) join the QA notes, as those of the computation.
    """
    if pacs is None:
        from pacsai.pacs import connect

        pacs = connect(params.pacs_url or None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PacsaiWarning)
        data = gather(params, pacs=pacs)
    return summarize(data, params, pacs_url=str(getattr(pacs, "url", "")), notes=data_notes(caught))


def data_notes(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """The messages of PacsaiWarnings (data notes); other warnings are re-issued."""
    notes = []
    for w in caught:
        if issubclass(w.category, PacsaiWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return notes


def summarize(
    data: PatientData, params: ReportParameters, *, pacs_url: str = "", notes: Sequence[str] = ()
) -> PlanSummary:
    """Compute every planning metric of one patient and its QA gate (pure: no I/O).

    Data notes raised on the way (:class:`PacsaiWarning`: dose samples outside the dose grid ...) and ``notes``
    become QA reasons of level ``note`` (they change no status), once each, instead of stderr noise in the report.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PacsaiWarning)
        summary = _summarize(data, params, pacs_url=pacs_url)
    reasons = [Reason.from_dict(r) for r in summary.qa["reasons"]]
    reasons += [Reason("DATA_NOTE", "note", message) for message in [*notes, *data_notes(caught)]]
    summary.qa = gate.gate(reasons)
    return summary


@dataclass
class Analysis:
    """What one set of structures says on the plan: the same computation for the model's and the planner's."""

    masks: dict[str, xr.DataArray]
    states: dict[str, dict[str, Any]]
    structures: list[dict[str, Any]]
    margins: dict[str, Any]
    geometry: list[dict[str, Any]]
    dvhs: dict[str, Any]
    dvh_rows: dict[str, dict[str, float]]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    plan_quality: dict[str, Any]
    constraints: list[dict[str, Any]]
    coverage: dict[str, Any]
    dvh_note: str
    reasons: list[Reason]
    #: Every DVH computed on these masks under the plan dose (default sampling), by mask key, BODY's included:
    #: the model-vs-reference comparison reuses them instead of sampling the structures again.
    dose_cache: dict[str, Any] = field(default_factory=dict)


def _required(params: ReportParameters, table: ConstraintSet) -> dict[str, str]:
    """Required structure (canonical name) → what needs it."""
    needs: dict[str, list[str]] = {params.target: ["margins, target coverage and response"]}
    for c in table.constraints:
        for part in gate.constraint_parts(c.structure, table):
            needs.setdefault(part, []).append(f"constraint {c.structure} {c.metric}")
    return {name: "; ".join(dict.fromkeys(what)) for name, what in needs.items()}


def structure_states(
    masks: Mapping[str, xr.DataArray],
    *,
    drawn_by: DrawnBy | None,
    offered: Sequence[str],
    from_model: bool,
    params: ReportParameters,
    table: ConstraintSet,
) -> dict[str, dict[str, Any]]:
    """State and author of every required structure (canonical names) and of every structure the source holds.

    A required structure the source does not hold is ``missing`` (a planner's structure set without it) or
    ``not requested`` (the model does not segment it).
    """
    from pacsai.planning.constraints import find_structure

    who = drawn_by.to_dict() if drawn_by else {"kind": "", "label": ""}
    states: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for name, needed_for in _required(params, table).items():
        key, _ = find_structure(name, list(masks), table.aliases.get(name, (name,)))
        if key is not None:
            state = gate.mask_state(masks[key])
            used.add(key)
        else:
            offered_key, _ = find_structure(name, list(offered), table.aliases.get(name, (name,)))
            state = gate.NOT_REQUESTED if from_model and offered_key is None else gate.MISSING
        states[name] = {"state": state, "matched": key, "required": True, "needed_for": needed_for,
                        "drawn_by": who if state != gate.NOT_REQUESTED else {"kind": "", "label": who["label"]}}
    for key, mask in masks.items():
        if key not in used and key not in states:
            states[key] = {"state": gate.mask_state(mask), "matched": key, "required": False, "needed_for": "",
                           "drawn_by": who}
    return states


def _analyse(
    masks_in: Mapping[str, xr.DataArray],
    *,
    drawn_by: DrawnBy | None,
    offered: Sequence[str],
    from_model: bool,
    dose: xr.DataArray | None,
    dose_note: str,
    dose_reasons: Sequence[Reason],
    params: ReportParameters,
    table: ConstraintSet,
) -> Analysis:
    masks = dict(masks_in)
    states = structure_states(masks, drawn_by=drawn_by, offered=offered, from_model=from_model, params=params,
                              table=table)
    reasons = gate.state_reasons(states)
    target_info = states[params.target]
    target = target_info["matched"] if target_info["state"] == gate.PRESENT else None
    body = _find(masks, "BODY")
    margins: dict[str, Any] = {
        "ctv_margin_mm": params.ctv_margin_mm,
        "ptv_margin_mm": params.ptv_margin_mm,
        "method": "exact Euclidean distance transform in mm (ICRU 62/83); CTV clipped to BODY, always containing "
        "the GTV",
    }
    derived_by = DrawnBy("derived", f"{params.target} + CTV {params.ctv_margin_mm} mm, PTV "
                                    f"{params.ptv_margin_mm} mm (ICRU 62/83)")
    if target is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PacsaiWarning)  # a missing BODY is flagged just below
            ctv, ptv = planning.ctv_ptv(
                masks[target], ctv_margin=params.ctv_margin_mm, ptv_margin=params.ptv_margin_mm,
                body=masks[body] if body else None,
            )
        masks["CTV"], masks["PTV"] = ctv, ptv
        if body is None:
            reasons.append(Reason("NO_BODY", "note", "no BODY structure: CTV not clipped to the body outline"))
    for name in DERIVED:
        states[name] = {
            "state": gate.PRESENT if target is not None else target_info["state"],
            "matched": name if target is not None else None, "required": False,
            "needed_for": "coverage, constraints of the target", "drawn_by": derived_by.to_dict(),
        }
    structures = [_structure_row(name, m, info=states.get(name) or _state_of(states, name))
                  for name, m in masks.items()]
    structures += [_absent_row(name, info) for name, info in states.items()
                   if info["matched"] is None and name not in DERIVED]
    for row in structures:
        if row["state"] == gate.PRESENT and row["touches_edge"] and gate.organ_of(row["name"]) != "body":
            reasons.append(Reason("TOUCHES_EDGE", "note",
                                  f"{row['name']} touches the edge of the image: its volume may be cut",
                                  structure=row["name"]))
    for row in structures:
        if row["name"] in DERIVED:
            margins[f"{row['name'].lower()}_cc"] = row["volume_cc"]
    if target is not None:
        margins["gtv_cc"] = next(r["volume_cc"] for r in structures if r["name"] == target)

    geometry = []
    if "PTV" in masks:
        oars = {n: m for n, m in masks.items()
                if n not in DERIVED and n not in (target, body) and bool(np.asarray(m.values).any())}
        geometry = [r.to_dict() for r in planning.target_relations(oars, masks["PTV"], target_name="PTV")]

    dose_part = _dose_analysis(dose, masks, body=body, table=table, params=params, states=states,
                               target_info=target_info, dose_note=dose_note, dose_reasons=dose_reasons)
    reasons += dose_part.reasons
    return Analysis(masks=masks, states=states, structures=structures, margins=margins, geometry=geometry,
                    dvhs=dose_part.dvhs, dvh_rows=dose_part.dvh_rows, curves=dose_part.curves,
                    plan_quality=dose_part.plan_quality, constraints=dose_part.constraints,
                    coverage=dose_part.coverage, dvh_note=dose_part.dvh_note, reasons=reasons,
                    dose_cache=dose_part.dose_cache)


@dataclass
class _DosePart:
    """What the plan dose adds to an analysis (all empty without a usable dose)."""

    dvhs: dict[str, Any]
    dvh_rows: dict[str, dict[str, float]]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    plan_quality: dict[str, Any]
    constraints: list[dict[str, Any]]
    coverage: dict[str, Any]
    dvh_note: str
    reasons: list[Reason]
    dose_cache: dict[str, Any] = field(default_factory=dict)


def _dose_analysis(
    dose: xr.DataArray | None,
    masks: Mapping[str, xr.DataArray],
    *,
    body: str | None,
    table: ConstraintSet,
    params: ReportParameters,
    states: Mapping[str, Any],
    target_info: Mapping[str, Any],
    dose_note: str,
    dose_reasons: Sequence[Reason],
) -> _DosePart:
    reasons: list[Reason] = []
    dvhs: dict[str, Any] = {}
    dvh_rows: dict[str, dict[str, float]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plan_quality: dict[str, Any] = {}
    constraints: list[dict[str, Any]] = []
    coverage: dict[str, Any] = {"state": "no dose", "note": dose_note or "no RTDOSE in the planning study"}
    dvh_note = dose_note
    dose_cache: dict[str, Any] = {}
    if dose is not None:
        # The planning evaluation checks the dose type, each structure's state (derived ones from their parts),
        # its coverage by the dose grid and the fractionation before any verdict; its DVHs are reused here.
        cache: dict[str, Any] = {}
        table_rows = planning.evaluate_plan(dose, masks, table, fractions=params.fractions,
                                            prescription_gy=params.prescription_gy, dvhs=cache)
        table_rows = table_rows.astype(object).where(table_rows.notna(), None)
        constraints = gate.apply_states(table_rows.to_dict(orient="records"), states, table)
        if not dose_reasons:
            for name, m in masks.items():
                # BODY's DVH costs seconds and answers no clinical question; its isodose volumes come from
                # plan_quality below.
                if name == body or not bool(m.values.any()):
                    continue
                dvhs[name] = cache.get(name) or planning.dvh(dose, m, name=name)
            for name, h in cache.items():
                dvhs.setdefault(name, h)  # derived constraint structures (e.g. Lungs-GTV): DVHs, not drawn
            for name, h in dvhs.items():
                dvh_rows[name] = h.to_dict()
                curves[name] = h.curve()
            quality_problem = ""
            if "PTV" in dvhs:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", PacsaiWarning)  # same sampling notes as the DVHs above
                        body_dvh = None
                        if body:  # the DVH plan_quality would compute, kept for the model-vs-reference comparison
                            body_dvh = planning.dvh(dose, masks[body], name=str(masks[body].name or "BODY"))
                            dose_cache[body] = body_dvh
                        plan_quality = planning.plan_quality(
                            dose, masks["PTV"], prescription_gy=params.prescription_gy,
                            body=masks[body] if body else None, target_dvh=dvhs["PTV"], body_dvh=body_dvh,
                            name="PTV",
                        ).to_dict()
                except PlanningError as err:
                    # e.g. a PTV the plan gives no dose (a model's target away from the planned one): no index is
                    # defined there, so coverage is not evaluable and the gate says why; the report still runs.
                    quality_problem = f"PTV plan quality not computed: {err}"
                    reasons.append(Reason("PLAN_QUALITY_UNDEFINED", "review", quality_problem, structure="PTV"))
            dvh_note = dvhs[next(iter(dvhs))].method if dvhs else "no non-empty structure to compute a DVH for"
            coverage = ({"state": "not evaluable", "note": quality_problem} if quality_problem
                        else _coverage(plan_quality, dvh_rows, params, target_info))
            reasons += gate.uncovered_reasons(constraints, coverage=plan_quality)
            dose_cache.update((name, h) for name, h in dvhs.items() if name in masks)
        else:
            why = "; ".join(r.message for r in dose_reasons)
            coverage = {"state": "not evaluable", "note": why}
            dvh_note = why
    return _DosePart(dvhs=dvhs, dvh_rows=dvh_rows, curves=curves, plan_quality=plan_quality,
                     constraints=constraints, coverage=coverage, dvh_note=dvh_note, reasons=reasons,
                     dose_cache=dose_cache)


def _grid_note(from_model: bool) -> str:
    """How the structures reached the planning grid: a model segments on it, an RTSTRUCT is rasterised onto it."""
    how = ("the model's masks were resampled back to it" if from_model
           else "the RTSTRUCT's contours were rasterised onto it")
    return f"volumes from voxel counts on the planning image grid; {how}"


def _state_of(states: Mapping[str, Mapping[str, Any]], key: str) -> Mapping[str, Any]:
    return next((info for info in states.values() if info.get("matched") == key), {"state": gate.PRESENT})


def _coverage(plan_quality: Mapping[str, Any], dvh_rows: Mapping[str, Mapping[str, Any]],
              params: ReportParameters, target_info: Mapping[str, Any]) -> dict[str, Any]:
    """PTV coverage: D95 (Gy, % of the prescription) and V95% with the verdict adequate/inadequate."""
    if target_info["state"] != gate.PRESENT:
        return {"state": "not evaluable",
                "note": f"{params.target} is {target_info['state']}: no CTV/PTV, coverage not evaluable"}
    ptv = dvh_rows.get("PTV") or {}
    v95 = plan_quality.get("coverage_v95_pct")
    d95 = ptv.get("d95_gy")
    if v95 is None or d95 is None:
        return {"state": "not evaluable", "note": "no PTV dose-volume histogram"}
    adequate = float(v95) >= gate.COVERAGE_V95_MIN_PCT
    return {
        "state": "evaluated",
        "ptv_d95_gy": float(d95),
        "ptv_d95_pct": 100.0 * float(d95) / params.prescription_gy,
        "ptv_v95_pct": float(v95),
        "verdict": "adequate" if adequate else "inadequate",
        "criterion": f"PTV V95% ≥ {gate.COVERAGE_V95_MIN_PCT:g} % (ICRU 83)",
    }


def _summarize(data: PatientData, params: ReportParameters, *, pacs_url: str) -> PlanSummary:
    image = data.current.image
    from_model = params.structures_from == "model"
    table = planning.load_constraints(params.constraint_set)
    reasons: list[Reason] = []

    # Input vs the model's training domain: before anything is stated from its contours.
    if from_model:
        reasons += _domain_reasons(data)
    header_reasons = gate.plan_dose_reasons(data.dose) if data.dose is not None else []
    reasons += header_reasons
    main = _analyse(
        data.current.structures, drawn_by=data.current.drawn_by, offered=data.current.offered,
        from_model=from_model, dose=data.dose, dose_note=data.dose_note, dose_reasons=header_reasons,
        params=params, table=table,
    )
    reasons += main.reasons
    for row in main.structures:  # model uncertainty per structure (None: not measurable, never a false 0)
        u = data.uncertainty.get(row["name"])
        if u is not None:
            row["uncertainty"] = u.get("mean_sigma")
            row["uncertainty_region_cc"] = u.get("region_cc")
    if from_model:
        source_masks = {k: v for k, v in main.masks.items() if k not in DERIVED}
        reasons += gate.fragmentation_reasons(source_masks)
        reasons += gate.uncertainty_reasons(data.uncertainty, calibration=data.model_domain.get("uncertainty"))
        if data.model_domain:
            from pacsai.domain import check_volumes, structure_volumes

            present = {k: v for k, v in source_masks.items() if bool(np.asarray(v.values).any())}
            reasons += check_volumes(data.model_domain, structure_volumes(present))

    # Model vs reference: the same verdicts from the planner's contours, disagreements → REVIEW with both values.
    reference: dict[str, Any] = {}
    agreement: list[dict[str, Any]] = []
    constraints, coverage = main.constraints, main.coverage
    if from_model and data.reference is not None:
        with warnings.catch_warnings():
            # the reference's own data notes (its dose sampling) are not notes on this report's contours
            warnings.simplefilter("ignore", PacsaiWarning)
            ref = _analyse(
                data.reference.structures, drawn_by=data.reference.drawn_by, offered=data.reference.offered,
                from_model=False, dose=data.dose, dose_note=data.dose_note, dose_reasons=header_reasons,
                params=params, table=table,
            )
        constraints, disagree_c = _compare_constraints(main.constraints, ref.constraints)
        coverage, disagree_v = _compare_coverage(main.coverage, ref.coverage)
        reasons += disagree_c + disagree_v
        reference = {
            "drawn_by": data.reference.drawn_by.to_dict() if data.reference.drawn_by else {},
            "states": ref.states,
            "constraints": ref.constraints,
            "coverage": ref.coverage,
            "structures": ref.structures,
        }
        agreement = _agreement(main.masks, ref.masks, data.dose, main.states, ref.states,
                               dvhs={"pred": main.dose_cache, "ref": ref.dose_cache})

    response, response_masks, prior_masks, prior_image = _response(data, params, main, table)
    reasons += response.pop("_reasons", [])

    fractionation = {
        "prescription_gy": params.prescription_gy,
        "fractions": params.fractions,
        "dose_per_fraction_gy": params.dose_per_fraction_gy,
        "bed_tumour_gy": planning.bed(params.fractions, params.dose_per_fraction_gy, params.alpha_beta_tumour_gy),
        "eqd2_tumour_gy": planning.eqd2(params.fractions, params.dose_per_fraction_gy, params.alpha_beta_tumour_gy),
        "alpha_beta_tumour_gy": params.alpha_beta_tumour_gy,
        "alpha_beta_oar_gy": params.alpha_beta_oar_gy,
    }
    provenance = {
        "research_use_only": pacsai.RESEARCH_USE_ONLY,
        "pacsai_version": pacsai.__version__,
        "git_sha": _git_sha(),
        "pacs_url": _redact(pacs_url),
        "parameters": {**params.model_dump(mode="json"), "pacs_url": _redact(params.pacs_url)},
        "structures_source": data.current.structures_source,
        "drawn_by": data.current.drawn_by.to_dict() if data.current.drawn_by else {},
        "image_modality": data.current.modality,
        "model": data.model,
        "model_domain_checked": bool(data.model_domain),
        "input_stats": data.input_stats,
        "constraint_set": {"name": params.constraint_set, "site": table.site, "title": table.title},
        "dose": data.dose_header,
        "inputs": [ref.to_dict() for ref in data.inputs],
        "grid": {
            "shape_zyx": list(image.shape),
            "spacing_mm": list(image.attrs["spacing"]),
            "note": _grid_note(params.structures_from == "model"),
        },
        "definitions": "docs/clinical_definitions.md: ICRU 50/62/83 margins and HI, RTOG/Paddick CI, "
        "QUANTEC constraints, RECIST 1.1 response, the QA gate",
    }
    return PlanSummary(
        params=params,
        patient_id=data.patient_id,
        study_instance_uid=data.current.study_instance_uid,
        study_date=data.current.study_date,
        structures=main.structures,
        margins=main.margins,
        geometry=main.geometry,
        dvh=main.dvh_rows,
        dvh_note=main.dvh_note,
        plan_quality=main.plan_quality,
        constraints=constraints,
        fractionation=fractionation,
        response=response,
        qa=gate.gate(reasons),
        provenance=provenance,
        states=main.states,
        coverage=coverage,
        reference=reference,
        agreement=agreement,
        image=image,
        masks=main.masks,
        dose=data.dose,
        prior_image=prior_image,
        prior_masks=prior_masks,
        response_masks=response_masks,
        dvh_curves=main.curves,
    )


def _domain_reasons(data: PatientData) -> list[Reason]:
    try:
        from pacsai.domain import check_input
    except ImportError:  # pragma: no cover - pacsai.domain ships with pacsai
        return [Reason("DOMAIN_UNKNOWN", "review", "pacsai.domain is not installed: the input was not compared "
                       "with the model's training domain")]
    stats = data.input_stats or {"modality": data.current.modality}
    reasons = check_input(data.model_domain, stats)
    if data.prior is not None and data.prior_input_stats:  # the model segmented the prior too: same check
        reasons += [Reason(r.code, r.level, f"prior study: {r.message}", r.structure, r.values)
                    for r in check_input(data.model_domain, data.prior_input_stats) if r.code != "DOMAIN_UNKNOWN"]
    return reasons


def _compare_constraints(
    model_rows: Sequence[dict[str, Any]], ref_rows: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Reason]]:
    """Each constraint row with the reference's value and status; pass/fail disagreements become ``review``."""
    by_key = {(r["structure"], r["metric"]): r for r in ref_rows}
    out, reasons = [], []
    for row in model_rows:
        row = dict(row)
        ref = by_key.get((row["structure"], row["metric"])) or {}
        row["reference_value"] = ref.get("value")
        row["reference_status"] = ref.get("status")
        row["model_status"] = row.get("status")
        row["model_value"] = row.get("value")
        evaluable = row["status"] in ("pass", "fail") and ref.get("status") in ("pass", "fail")
        if evaluable and row["status"] != ref["status"]:
            row["status"] = "review"
            row["reason"] = (f"model and reference disagree: model {row['model_status'].upper()} "
                             f"{_num(row['model_value'])} {row.get('unit', '')}, reference "
                             f"{ref['status'].upper()} {_num(ref.get('value'))} {row.get('unit', '')}")
            reasons.append(Reason(
                "MODEL_REFERENCE_DISAGREE", "review",
                f"constraint {row['structure']} {row['metric']}: {row['reason']}",
                structure=row["structure"],
                values={"verdict": "constraint", "metric": row["metric"], "model": row["model_status"],
                        "model_value": row["model_value"], "reference": ref["status"],
                        "reference_value": ref.get("value")},
            ))
        out.append(row)
    return out, reasons


def _compare_coverage(model: dict[str, Any], ref: dict[str, Any]) -> tuple[dict[str, Any], list[Reason]]:
    out = dict(model)
    out["reference"] = ref
    if model.get("verdict") and ref.get("verdict") and model["verdict"] != ref["verdict"]:
        out["verdict"] = "review"
        message = (f"PTV coverage: model {model['verdict']} (V95% {model['ptv_v95_pct']:.1f} %, D95 "
                   f"{model['ptv_d95_gy']:.1f} Gy), reference {ref['verdict']} (V95% {ref['ptv_v95_pct']:.1f} %, "
                   f"D95 {ref['ptv_d95_gy']:.1f} Gy)")
        return out, [Reason("MODEL_REFERENCE_DISAGREE", "review", message, structure="PTV",
                            values={"verdict": "coverage", "model": model["verdict"], "reference": ref["verdict"],
                                    "model_v95_pct": model["ptv_v95_pct"], "reference_v95_pct": ref["ptv_v95_pct"]})]
    return out, []


def _agreement(
    model_masks: Mapping[str, xr.DataArray], ref_masks: Mapping[str, xr.DataArray], dose: xr.DataArray | None,
    model_states: Mapping[str, Mapping[str, Any]], ref_states: Mapping[str, Mapping[str, Any]],
    *, dvhs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Model vs reference per structure both hold (canonical names): Dice, HD95, surface Dice, APL, Δdose.

    ``dvhs``: the analyses' DVHs under ``dose`` by side (``"pred"``, ``"ref"``) and mask key, reused as they are.
    """
    pred, ref = {}, {}
    cached: dict[tuple[str, str], Any] = {}
    for name, info in model_states.items():
        other = ref_states.get(name)
        if name in DERIVED or not other or info.get("matched") is None or other.get("matched") is None:
            continue
        if info["state"] != gate.PRESENT or other["state"] != gate.PRESENT:
            continue
        pred[name], ref[name] = model_masks[info["matched"]], ref_masks[other["matched"]]
        for side, key in (("pred", info["matched"]), ("ref", other["matched"])):
            histogram = (dvhs or {}).get(side, {}).get(key)
            if histogram is not None:
                cached[(name, side)] = histogram
    if not pred:
        return []
    try:
        from pacsai.learning.evaluate import dose_aware_agreement
    except ImportError:
        from pacsai.learning.evaluate import evaluate_structures

        frame = evaluate_structures(pred, ref)
    else:
        frame = dose_aware_agreement(pred, ref, dose, tolerance_mm=2.0, dvhs=cached)
    frame = frame.reset_index() if "structure" not in frame.columns else frame
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def _volumes(masks: Mapping[str, xr.DataArray]) -> dict[str, float]:
    return {k: planning.volume_cc(m) for k, m in masks.items() if bool(np.asarray(m.values).any())}


def _response(
    data: PatientData, params: ReportParameters, main: Analysis, table: ConstraintSet
) -> tuple[dict[str, Any], dict[str, xr.DataArray], dict[str, xr.DataArray], xr.DataArray | None]:
    """Response against the prior from contours of one source (docs/clinical_definitions.md "Response")."""
    from_model = params.structures_from == "model"
    if data.prior is None:
        return {"category": None, "note": data.prior_note, "source": ""}, {}, {}, None
    if from_model and data.reference is not None and data.reference_prior is not None:
        now, prior = data.reference.structures, data.reference_prior.structures
        now_who, prior_who = data.reference.drawn_by, data.reference_prior.drawn_by
        prior_study = data.reference_prior
    else:
        now = {k: v for k, v in main.masks.items() if k not in DERIVED}
        prior, prior_study = data.prior.structures, data.prior
        now_who, prior_who = data.current.drawn_by, data.prior.drawn_by
    source = data.response_source or "planner contours on both studies"
    base = {"source": source, "drawn_by_now": now_who.to_dict() if now_who else {},
            "drawn_by_prior": prior_who.to_dict() if prior_who else {},
            "prior_study_instance_uid": prior_study.study_instance_uid, "prior_study_date": prior_study.study_date}
    reasons: list[Reason] = []
    # Same source on both (inputs.gather chose them so): implausible changes of organs that do not shrink
    # in weeks are contour errors, not anatomy.
    if now_who and prior_who and now_who.kind == prior_who.kind:
        reasons += gate.change_reasons(_volumes(now), _volumes(prior), source=source)
    result = planning.assess_response(
        _contours(now, now_who), _contours(prior, prior_who), target=params.target,
        registration=data.registration,
    ).to_dict()
    result["registration"] = data.registration_note
    reasons += [Reason.from_dict(r) for r in result.get("reasons", [])]
    note = "" if result["category"] != "NE" else "; ".join(
        r["message"] for r in result.get("reasons", []) if r.get("level") == "error") or "not evaluable"
    return {**base, **result, "note": note, "_reasons": reasons}, now, prior, prior_study.image


def _contours(masks: Mapping[str, xr.DataArray], who: DrawnBy | None) -> Any:
    """Masks with their source for the like-with-like rule: the planner's are the reference, a model's are model."""
    from pacsai.planning.response import StudyContours

    source = "model" if who and who.kind == "model" else "reference"
    return StudyContours(structures=dict(masks), source=source, label=who.label if who else "")


def _structure_row(name: str, mask: xr.DataArray, *, info: Mapping[str, Any]) -> dict[str, Any]:
    values = np.asarray(mask.values, dtype=bool)
    if values.any():
        row = planning.structure_stats(mask, name=name).to_dict()
    else:
        row = {"name": name, "volume_cc": 0.0, "n_voxels": 0, "longest_diameter_mm": 0.0,
               "longest_axial_diameter_mm": 0.0, "centroid_lps": None, "n_components": 0, "touches_edge": False}
    row["slices"] = int(values.any(axis=(1, 2)).sum())
    row["state"] = info.get("state", gate.PRESENT if values.any() else gate.EMPTY)
    row["required"] = bool(info.get("required", False))
    row["drawn_by"] = dict(info.get("drawn_by") or {})
    row["source"] = row["drawn_by"].get("label", "")
    return row


def _absent_row(name: str, info: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "volume_cc": None, "n_voxels": 0, "longest_diameter_mm": None,
            "longest_axial_diameter_mm": None, "centroid_lps": None, "n_components": None, "touches_edge": False,
            "slices": 0, "state": info["state"], "required": bool(info.get("required")),
            "drawn_by": dict(info.get("drawn_by") or {}), "source": (info.get("drawn_by") or {}).get("label", "")}


def _find(masks: Mapping[str, Any], name: str) -> str | None:
    for key in masks:
        if key.upper() == name.upper():
            return key
    return None


def _redact(url: str) -> str:
    """Never write credentials embedded in a URL (user:password@host) anywhere."""
    from pacsai.pacs.address import redact_url

    return redact_url(url) if "://" in url else url


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return None if not np.isfinite(v) else round(v, 4)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _git_sha() -> str:
    from pacsai.tracking import git_sha  # one definition of the code version for MLflow and reports

    return git_sha()


__all__ = ["PlanSummary", "build_summary", "structure_states", "summarize"]
