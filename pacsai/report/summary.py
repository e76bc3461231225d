"""Everything a planning report shows, computed once as a :class:`PlanSummary` (metrics.json is its serialisation).

The report notebook only displays a PlanSummary, so every number here is tested without papermill. Definitions
follow DESIGN.md "Clinical definitions" (ICRU 50/62/83, QUANTEC, RECIST 1.1); see :mod:`pacsai.planning`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

import pacsai
from pacsai import planning
from pacsai.errors import PacsaiWarning
from pacsai.report.inputs import PatientData, gather
from pacsai.report.params import ReportParameters

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
    qa: list[dict[str, str]]
    provenance: dict[str, Any]
    image: xr.DataArray = field(repr=False)
    masks: dict[str, xr.DataArray] = field(repr=False)
    dose: xr.DataArray | None = field(repr=False, default=None)
    prior_image: xr.DataArray | None = field(repr=False, default=None)
    prior_masks: dict[str, xr.DataArray] = field(repr=False, default_factory=dict)
    dvh_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "research_use_only": pacsai.RESEARCH_USE_ONLY,
                "patient_id": self.patient_id,
                "study_instance_uid": self.study_instance_uid,
                "study_date": self.study_date,
                "structures": self.structures,
                "margins": self.margins,
                "geometry": self.geometry,
                "dvh": self.dvh,
                "dvh_note": self.dvh_note,
                "plan_quality": self.plan_quality,
                "constraints": self.constraints,
                "fractionation": self.fractionation,
                "response": self.response,
                "qa": self.qa,
                "provenance": self.provenance,
            }
        )

    def save(self, folder: Path) -> Path:
        """Write metrics.json and the structure masks (for the DICOM outputs) into ``folder``; atomic."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / METRICS_FILE
        _atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False).encode())
        arrays = {name: np.asarray(m.values, dtype=bool) for name, m in self.masks.items()}
        tmp = folder / f".{MASKS_FILE}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, folder / MASKS_FILE)
        return path


def build_summary(params: ReportParameters, *, pacs: Any | None = None) -> PlanSummary:
    """Connect (``params.pacs_url`` or settings), gather the patient's data and compute its summary."""
    if pacs is None:
        from pacsai.pacs import connect

        pacs = connect(params.pacs_url or None)
    return summarize(gather(params, pacs=pacs), params, pacs_url=str(getattr(pacs, "url", "")))


def summarize(data: PatientData, params: ReportParameters, *, pacs_url: str = "") -> PlanSummary:
    """Compute every planning metric of one patient (pure: no I/O).

    Data notes raised on the way (:class:`PacsaiWarning`: an empty structure, dose samples outside the dose
    grid ...) become QA flags of the report, once each, instead of stderr noise in it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PacsaiWarning)
        summary = _summarize(data, params, pacs_url=pacs_url)
    seen = {q["message"] for q in summary.qa}
    for w in caught:
        if issubclass(w.category, PacsaiWarning) and str(w.message) not in seen:
            seen.add(str(w.message))
            summary.qa.append(_flag("note", str(w.message)))
        elif not issubclass(w.category, PacsaiWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return summary


def _summarize(data: PatientData, params: ReportParameters, *, pacs_url: str) -> PlanSummary:
    image = data.current.image
    masks = {name: m for name, m in data.current.structures.items()}
    qa: list[dict[str, str]] = []
    target = _find(masks, params.target)
    body = _find(masks, "BODY")

    margins: dict[str, Any] = {
        "ctv_margin_mm": params.ctv_margin_mm,
        "ptv_margin_mm": params.ptv_margin_mm,
        "method": "exact Euclidean distance transform in mm (ICRU 62/83); CTV clipped to BODY",
    }
    if target is None:
        qa.append(_flag("error", f"no {params.target} structure: margins, coverage and response not computed"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PacsaiWarning)  # a missing BODY is flagged just below
            ctv, ptv = planning.ctv_ptv(
                masks[target], ctv_margin=params.ctv_margin_mm, ptv_margin=params.ptv_margin_mm,
                body=masks[body] if body else None,
            )
        masks["CTV"], masks["PTV"] = ctv, ptv
        if body is None:
            qa.append(_flag("warning", "no BODY structure: CTV not clipped to the body outline"))

    structures = [_structure_row(name, m, source=data.current.structures_source) for name, m in masks.items()]
    for row in structures:
        if row["volume_cc"] == 0:
            qa.append(_flag("warning", f"{row['name']} is empty"))
        if row["touches_edge"] and row["name"].upper() != "BODY":
            qa.append(_flag("warning", f"{row['name']} touches the edge of the field of view: volume may be cut"))
    for name, value in sorted(data.uncertainty.items()):
        if value > 0.1:
            qa.append(_flag("warning", f"model uncertainty of {name} is high ({value:.2f}): review the contour"))
    for row in structures:
        if row["name"] in DERIVED:
            margins[f"{row['name'].lower()}_cc"] = row["volume_cc"]
    if target is not None:
        margins["gtv_cc"] = next(r["volume_cc"] for r in structures if r["name"] == target)

    geometry = []
    if "PTV" in masks:
        oars = {n: m for n, m in masks.items() if n not in DERIVED and n not in (target, body)}
        geometry = [r.to_dict() for r in planning.target_relations(oars, masks["PTV"], target_name="PTV")]

    dvhs: dict[str, Any] = {}
    dvh_rows: dict[str, dict[str, float]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plan_quality: dict[str, Any] = {}
    constraints: list[dict[str, Any]] = []
    dvh_note = data.dose_note
    if data.dose is not None:
        # Derived constraint structures (e.g. Lungs-GTV = Lung_L ∪ Lung_R − GTV) get DVHs but are not drawn.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PacsaiWarning)
            derived = planning.derive_structures(masks, params.constraint_set)
        for name, m in {**masks, **derived}.items():
            # BODY's DVH costs seconds and answers no clinical question; its isodose volumes come from
            # plan_quality below.
            if name == body or not bool(m.values.any()):
                continue
            dvhs[name] = planning.dvh(data.dose, m, name=name)
            dvh_rows[name] = dvhs[name].to_dict()
            curves[name] = dvhs[name].curve()
        if "PTV" in dvhs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PacsaiWarning)  # same sampling notes as the DVHs above
                plan_quality = planning.plan_quality(
                    data.dose, masks["PTV"], prescription_gy=params.prescription_gy,
                    body=masks[body] if body else None, target_dvh=dvhs["PTV"], name="PTV",
                ).to_dict()
        table = planning.evaluate_constraints(dvhs, params.constraint_set)
        table = table.astype(object).where(table.notna(), None)
        constraints = table.to_dict(orient="records")
        dvh_note = dvhs[next(iter(dvhs))].method if dvhs else "no non-empty structure to compute a DVH for"
        for row in constraints:
            if row.get("status") == "fail":
                qa.append(_flag("warning", f"constraint not met: {row['structure']} {row['metric']}"))

    fractionation = {
        "prescription_gy": params.prescription_gy,
        "fractions": params.fractions,
        "dose_per_fraction_gy": params.dose_per_fraction_gy,
        "bed_tumour_gy": planning.bed(params.fractions, params.dose_per_fraction_gy, params.alpha_beta_tumour_gy),
        "eqd2_tumour_gy": planning.eqd2(params.fractions, params.dose_per_fraction_gy, params.alpha_beta_tumour_gy),
        "alpha_beta_tumour_gy": params.alpha_beta_tumour_gy,
        "alpha_beta_oar_gy": params.alpha_beta_oar_gy,
    }

    if data.prior is None:
        response: dict[str, Any] = {"category": None, "note": data.prior_note}
    elif target is None:
        response = {"category": None, "note": f"no {params.target} in the current study"}
    else:
        response = planning.assess_response(
            {k: v for k, v in masks.items() if k not in DERIVED}, data.prior.structures, target=target
        ).to_dict()
        response["prior_study_instance_uid"] = data.prior.study_instance_uid
        response["prior_study_date"] = data.prior.study_date
        response["note"] = ""

    provenance = {
        "research_use_only": pacsai.RESEARCH_USE_ONLY,
        "pacsai_version": pacsai.__version__,
        "git_sha": _git_sha(),
        "pacs_url": _redact(pacs_url),
        "parameters": {**params.model_dump(mode="json"), "pacs_url": _redact(params.pacs_url)},
        "structures_source": data.current.structures_source,
        "model": data.model,
        "inputs": [ref.to_dict() for ref in data.inputs],
        "grid": {
            "shape_zyx": list(image.shape),
            "spacing_mm": list(image.attrs["spacing"]),
            "note": "volumes from voxel counts on the planning CT grid; RTSTRUCT rasterised there",
        },
        "definitions": "DESIGN.md clinical definitions: ICRU 50/62/83 margins and HI, RTOG/Paddick CI, "
        "QUANTEC constraints, RECIST 1.1-style response",
    }
    return PlanSummary(
        params=params,
        patient_id=data.patient_id,
        study_instance_uid=data.current.study_instance_uid,
        study_date=data.current.study_date,
        structures=structures,
        margins=margins,
        geometry=geometry,
        dvh=dvh_rows,
        dvh_note=dvh_note,
        plan_quality=plan_quality,
        constraints=constraints,
        fractionation=fractionation,
        response=response,
        qa=qa,
        provenance=provenance,
        image=image,
        masks=masks,
        dose=data.dose,
        prior_image=data.prior.image if data.prior else None,
        prior_masks=data.prior.structures if data.prior else {},
        dvh_curves=curves,
    )


def _structure_row(name: str, mask: xr.DataArray, *, source: str) -> dict[str, Any]:
    values = np.asarray(mask.values, dtype=bool)
    if values.any():
        row = planning.structure_stats(mask, name=name).to_dict()
    else:
        row = {"name": name, "volume_cc": 0.0, "n_voxels": 0, "longest_diameter_mm": 0.0,
               "longest_axial_diameter_mm": 0.0, "centroid_lps": None, "n_components": 0, "touches_edge": False}
    row["slices"] = int(values.any(axis=(1, 2)).sum())
    row["source"] = "derived (margin)" if name in DERIVED else source
    return row


def _find(masks: dict[str, Any], name: str) -> str | None:
    for key in masks:
        if key.upper() == name.upper():
            return key
    return None


def _flag(level: str, message: str) -> dict[str, str]:
    return {"level": level, "message": message}


def _redact(url: str) -> str:
    """Never write credentials embedded in a URL (user:password@host) anywhere."""
    from pacsai.pacs.client import redact_url

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


__all__ = ["PlanSummary", "build_summary", "summarize"]
