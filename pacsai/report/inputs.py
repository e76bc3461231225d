"""Find and read what a patient's report needs on the PACS: planning CT, structures, dose, the prior study."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pacsai.errors import PacsaiError, ReportError
from pacsai.report.params import ReportParameters

log = logging.getLogger(__name__)

# Series that pacsai itself wrote back carry this Manufacturer; a report "from the PACS" must not read its own
# model contours back as if a planner had drawn them.
PACSAI_MANUFACTURER = "pacsai"


@dataclass(frozen=True)
class SeriesRef:
    """One series the report read: what it is and which instances (for provenance)."""

    modality: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    paths: tuple[Path, ...] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uids": list(self.sop_instance_uids),
        }


@dataclass
class StudyData:
    """One study's image and structures (the planning study, or the prior)."""

    study_instance_uid: str
    study_date: str
    image: xr.DataArray
    structures: dict[str, xr.DataArray]
    structures_source: str
    inputs: list[SeriesRef]


@dataclass
class PatientData:
    """Everything a report is computed from."""

    patient_id: str
    current: StudyData
    dose: xr.DataArray | None
    dose_note: str
    prior: StudyData | None
    prior_note: str
    model: dict[str, Any]
    uncertainty: dict[str, float] = field(default_factory=dict)

    @property
    def inputs(self) -> list[SeriesRef]:
        refs = list(self.current.inputs)
        if self.prior is not None:
            refs += self.prior.inputs
        return refs


def gather(params: ReportParameters, *, pacs: Any) -> PatientData:
    """Pull a patient's planning study (and the most recent prior) from ``pacs`` and read it.

    The planning study is ``params.study_uid`` or the latest study with a CT. Structures come from the study's
    RTSTRUCT (``structures_from="pacs"``) or from ``params.model_uri`` (``"model"``: imports torch only then).
    """
    studies = _studies_with_ct(pacs, params.patient_id)
    if params.study_uid:
        chosen = studies[studies.StudyInstanceUID == params.study_uid]
        if chosen.empty:
            raise ReportError(
                f"study {params.study_uid} of patient {params.patient_id} has no CT series on {pacs.url}; "
                "check the UID with `pacsai pacs search --level series`"
            )
        current_row = chosen.iloc[0]
    else:
        current_row = studies.iloc[-1]
    current, dose, dose_note, model, uncertainty = _read_current(params, pacs, current_row)
    earlier = studies[studies.sort_key < current_row.sort_key]
    prior, prior_note = None, "no earlier study of this patient on the PACS"
    for _, row in earlier.iloc[::-1].iterrows():  # most recent first
        try:
            prior = _read_study(pacs, row, target=params.target, structures_from="pacs")
            prior_note = ""
            break
        except ReportError as err:
            prior_note = f"prior study {row.StudyInstanceUID} unusable: {err}"
            log.info(prior_note)
    return PatientData(
        patient_id=params.patient_id,
        current=current,
        dose=dose,
        dose_note=dose_note,
        prior=prior,
        prior_note=prior_note,
        model=model,
        uncertainty=uncertainty,
    )


def _studies_with_ct(pacs: Any, patient_id: str) -> pd.DataFrame:
    studies = pacs.search_studies(PatientID=patient_id)
    if studies.empty:
        raise ReportError(f"no studies of patient {patient_id!r} on {pacs.url}; check the PatientID")
    studies = studies.copy()
    for col in ("StudyDate", "StudyTime"):
        if col not in studies:
            studies[col] = ""
    studies["sort_key"] = studies.StudyDate.fillna("").astype(str) + studies.StudyTime.fillna("").astype(str)
    keep = []
    for _, row in studies.iterrows():
        series = pacs.search_series(StudyInstanceUID=row.StudyInstanceUID)
        keep.append(not series.empty and (series.Modality == "CT").any())
    studies = studies[keep].sort_values("sort_key", kind="stable")
    if studies.empty:
        raise ReportError(f"patient {patient_id!r} has no study with a CT series on {pacs.url}")
    return studies.reset_index(drop=True)


def _series(pacs: Any, study_uid: str) -> pd.DataFrame:
    series = pacs.search_series(StudyInstanceUID=study_uid)
    for col in ("SeriesDescription", "Manufacturer", "SeriesNumber", "NumberOfSeriesRelatedInstances"):
        if col not in series:
            series[col] = None
    return series


def _pull(pacs: Any, study_uid: str, row: Any) -> tuple[list[Path], SeriesRef]:
    paths = [Path(p) for p in pacs.retrieve_series(study_uid, row.SeriesInstanceUID, progress=False)]
    # The cache names every file by its SOPInstanceUID (pacsai.pacs.cache): no need to read the headers again.
    sops = sorted(path.stem for path in paths)
    return paths, SeriesRef(str(row.Modality), study_uid, str(row.SeriesInstanceUID), tuple(sops), tuple(paths))


def _pick_ct(series: pd.DataFrame) -> Any:
    cts = series[series.Modality == "CT"].copy()
    cts["n"] = pd.to_numeric(cts.NumberOfSeriesRelatedInstances, errors="coerce").fillna(0)
    return cts.sort_values("n", kind="stable").iloc[-1]  # the largest CT series is the planning scan


def _planner_rtstructs(series: pd.DataFrame) -> pd.DataFrame:
    rts = series[series.Modality == "RTSTRUCT"]
    return rts[rts.Manufacturer.fillna("").astype(str).str.lower() != PACSAI_MANUFACTURER]


def _read_study(pacs: Any, row: Any, *, target: str, structures_from: str) -> StudyData:
    from pacsai.imaging import read_rtstruct, read_series

    study_uid = str(row.StudyInstanceUID)
    series = _series(pacs, study_uid)
    ct_paths, ct_ref = _pull(pacs, study_uid, _pick_ct(series))
    try:
        image = read_series(ct_paths)
    except PacsaiError as err:
        raise ReportError(f"planning CT {ct_ref.series_instance_uid} cannot be read: {err}") from err
    inputs = [ct_ref]
    structures: dict[str, xr.DataArray] = {}
    source = ""
    if structures_from == "pacs":
        candidates = _planner_rtstructs(series)
        if candidates.empty:
            raise ReportError(
                f"study {study_uid} has no RTSTRUCT drawn by a planner; use --structures-from model"
            )
        rt_paths, rt_ref = _pull(pacs, study_uid, candidates.iloc[-1])
        structures = read_rtstruct(rt_paths[0], like=image)
        inputs.append(rt_ref)
        source = "RTSTRUCT from the PACS"
    return StudyData(
        study_instance_uid=study_uid,
        study_date=str(row.get("StudyDate", "") or ""),
        image=image,
        structures=structures,
        structures_source=source,
        inputs=inputs,
    )


def _read_current(
    params: ReportParameters, pacs: Any, row: Any
) -> tuple[StudyData, xr.DataArray | None, str, dict[str, Any], dict[str, float]]:
    study = _read_study(pacs, row, target=params.target, structures_from=params.structures_from)
    model: dict[str, Any] = {}
    uncertainty: dict[str, float] = {}
    if params.structures_from == "model":
        from pacsai.learning.infer import segment  # torch only on this path

        result = segment(study.image, model=params.model_uri, return_uncertainty=True)
        masks, unc = result if isinstance(result, tuple) else (result, {})
        study.structures = dict(masks)
        # One figure per structure for the QA section: the mean TTA standard deviation over the predicted mask.
        for name, umap in dict(unc).items():
            inside = np.asarray(study.structures[name].values, dtype=bool)
            values = np.asarray(umap.values if hasattr(umap, "values") else umap)
            uncertainty[name] = float(values[inside].mean()) if inside.any() else 0.0
        from pacsai.tracking import resolve_model

        ref = resolve_model(params.model_uri)
        model = {"uri": params.model_uri, "name": ref.name, "version": str(ref.version), "run_id": ref.run_id}
        study.structures_source = f"model {model.get('name', params.model_uri)} v{model.get('version', '?')}"
    dose, note = None, "no RTDOSE in the planning study"
    series = _series(pacs, study.study_instance_uid)
    doses = series[series.Modality == "RTDOSE"]
    if not doses.empty:
        from pacsai.imaging import read_dose

        paths, ref = _pull(pacs, study.study_instance_uid, doses.iloc[-1])
        try:
            dose = read_dose(paths[0])
            study.inputs.append(ref)
            note = ""
        except PacsaiError as err:
            note = f"RTDOSE {ref.sop_instance_uids[0]} unusable: {err}"
    return study, dose, note, model, uncertainty
