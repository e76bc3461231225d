"""Find and read what a patient's report needs on the PACS: planning image, structures, dose, the prior study.

Where the structures come from matters as much as the structures themselves, so every set of masks carries who
drew it (:class:`DrawnBy`): the planner's RTSTRUCT (its SeriesDescription and date) or a model (name, version).
"Structures from the PACS" means a planner's RTSTRUCT, never one that pacsai wrote back earlier: pacsai's own
objects are recognised in the retrieved header (:func:`written_by_pacsai`), because QIDO's series search does not
return the Manufacturer.

Response compares like with like (docs/clinical_definitions.md "Response"):
on the model path the prior study gets the same source as
the current one — the planner's contours of both studies where both exist, otherwise the model run on the prior
too (and the report says which).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pydicom
import xarray as xr

# The rule that picks a study's structure set lives in pacsai.structure_sets (notebook 01 uses it too); its
# names stay importable from here.
from pacsai import structure_sets
from pacsai.errors import PacsaiError, ReportError
from pacsai.report.params import ReportParameters
from pacsai.structure_sets import PACSAI_MANUFACTURER as PACSAI_MANUFACTURER
from pacsai.structure_sets import SYNTHETIC_PLANNER_MODEL as SYNTHETIC_PLANNER_MODEL
from pacsai.structure_sets import written_by_pacsai as written_by_pacsai

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.learning.infer import LoadedModel  # torch: imported at run time only on the model path
    from pacsai.pacs import Pacs

log = logging.getLogger(__name__)

#: Modalities a report can be made on (the planning image), in order of preference.
IMAGE_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class DrawnBy:
    """Who drew a set of structures: ``kind`` is ``"planner"``, ``"model"`` or ``"derived"``."""

    kind: str
    label: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "label": self.label}


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
    modality: str = "CT"
    drawn_by: DrawnBy | None = None
    #: The structures the source could have produced (ROI names of the RTSTRUCT, outputs of the model).
    offered: tuple[str, ...] = ()
    uncertainty: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    uncertainty: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The planner's structures of the planning study when the report's structures came from a model.
    reference: StudyData | None = None
    #: How the prior's structures were obtained (same source as ``current``), for the response section.
    response_source: str = ""
    #: The planner's structures of both studies (when both exist): the response is computed from them.
    reference_prior: StudyData | None = None
    #: What the model was trained on (``LoadedModel.domain``) and the input's statistics (pacsai.domain).
    model_domain: dict[str, Any] = field(default_factory=dict)
    input_stats: dict[str, Any] = field(default_factory=dict)
    #: The prior image's statistics where the model segmented the prior too (its domain is checked as well).
    prior_input_stats: dict[str, Any] = field(default_factory=dict)
    dose_header: dict[str, Any] = field(default_factory=dict)
    #: 4×4 matrix mapping the prior's patient coordinates (LPS mm) into the current study's, from a DICOM
    #: Spatial Registration on the PACS; None where the frames are the same or no registration links them.
    registration: np.ndarray | None = None
    registration_note: str = ""

    @property
    def inputs(self) -> list[SeriesRef]:
        refs = list(self.current.inputs)
        for extra in (self.reference, self.prior, self.reference_prior):
            if extra is not None:
                refs += [r for r in extra.inputs if r not in refs]
        return refs


def gather(params: ReportParameters, *, pacs: Pacs) -> PatientData:
    """Pull a patient's planning study (and the most recent prior) from ``pacs`` and read it.

    The planning study is ``params.study_uid`` or the latest study with a CT (or MR). Structures come from the
    study's planner RTSTRUCT (``structures_from="pacs"``) or from ``params.model_uri`` (``"model"``: imports
    torch only then; the planner RTSTRUCT, where there is one, is read too as the reference).
    """
    studies = _studies_with_image(pacs, params.patient_id)
    if params.study_uid:
        chosen = studies[studies.StudyInstanceUID == params.study_uid]
        if chosen.empty:
            raise ReportError(
                f"study {params.study_uid} of patient {params.patient_id} has no CT or MR series on {pacs.url}; "
                "check the UID with `pacsai pacs search --level series`"
            )
        current_row = chosen.iloc[0]
    else:
        current_row = studies.iloc[-1]
    from_model = params.structures_from == "model"
    current = _read_study(pacs, current_row, structures_from="pacs" if not from_model else "reference")
    reference: StudyData | None = None
    model_info: dict[str, Any] = {}
    domain: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    loaded = None
    if from_model:
        if current.structures:  # the planner's contours of the planning study: the reference
            reference = StudyData(
                study_instance_uid=current.study_instance_uid, study_date=current.study_date,
                image=current.image, structures=current.structures, structures_source=current.structures_source,
                inputs=[r for r in current.inputs if r.modality == "RTSTRUCT"], modality=current.modality,
                drawn_by=current.drawn_by, offered=current.offered,
            )
            current.inputs = [r for r in current.inputs if r.modality != "RTSTRUCT"]
        loaded, model_info, domain = _load_model(params.model_uri)
        stats = _input_stats(current)
        _segment_into(current, loaded, model_info)
    dose, dose_note, dose_header = _read_dose(pacs, current)

    earlier = studies[studies.sort_key < current_row.sort_key]
    prior, prior_note, reference_prior, response_source = None, "no earlier study of this patient on the PACS", None, ""
    prior_stats: dict[str, Any] = {}
    for _, row in earlier.iloc[::-1].iterrows():  # most recent first
        try:
            candidate = _read_study(pacs, row, structures_from="pacs" if not from_model else "reference")
        except ReportError as err:
            prior_note = f"prior study {row.StudyInstanceUID} unusable: {err}"
            log.info(prior_note)
            continue
        if not from_model:
            prior, prior_note = candidate, ""
            response_source = f"planner contours on both studies ({candidate.structures_source} in the prior)"
            break
        if reference is not None and candidate.structures:
            # Both studies have planner contours: the response is computed from them (never model vs planner).
            reference_prior = candidate
        model_prior = StudyData(
            study_instance_uid=candidate.study_instance_uid, study_date=candidate.study_date,
            image=candidate.image, structures={}, structures_source="",
            inputs=[r for r in candidate.inputs if r.modality != "RTSTRUCT"], modality=candidate.modality,
        )
        if reference_prior is None:
            # No planner contours on both studies: the model segments the prior too, so both come from it.
            _segment_into(model_prior, loaded, model_info)
            prior_stats = _input_stats(model_prior)
            response_source = (f"model {model_info.get('name')} v{model_info.get('version')} on both studies "
                               "(the model was run on the prior study too)")
        else:
            response_source = ("planner contours on both studies (reference); the model's contours are not "
                               "compared with the planner's")
        prior, prior_note = model_prior, ""
        break
    uncertainty = dict(current.uncertainty)
    registration, registration_note = None, ""
    if prior is not None:
        studies_to_search = [current.study_instance_uid, prior.study_instance_uid]
        registration, registration_note, reg_ref = find_registration(
            pacs, studies_to_search, prior=_frame(prior.image), current=_frame(current.image)
        )
        if reg_ref is not None:
            current.inputs.append(reg_ref)
    return PatientData(
        patient_id=params.patient_id,
        current=current,
        dose=dose,
        dose_note=dose_note,
        prior=prior,
        prior_note=prior_note,
        model=model_info,
        uncertainty=uncertainty,
        reference=reference,
        response_source=response_source,
        reference_prior=reference_prior,
        model_domain=domain,
        input_stats=stats,
        prior_input_stats=prior_stats,
        dose_header=dose_header,
        registration=registration,
        registration_note=registration_note,
    )


def _frame(image: xr.DataArray) -> str:
    return str(image.attrs.get("frame_of_reference_uid") or "")


def find_registration(
    pacs: Pacs, study_uids: list[str], *, prior: str, current: str
) -> tuple[np.ndarray | None, str, SeriesRef | None]:
    """The rigid/affine matrix prior → current (LPS mm) from a DICOM Spatial Registration (REG) in the studies.

    A REG maps each listed frame of reference into its own (``FrameOfReferenceUID`` of the REG): item frame F
    with matrix M_F means x_REG = M_F · x_F (PS3.3 C.20.2). Prior and current frames both listed (or one of them
    the REG's own frame, identity) give x_current = M_current⁻¹ · M_prior · x_prior.

    Returns
    -------
    (matrix or None, note, the REG series read or None)
        None with an empty note where the frames are equal or unknown; None with a note where no registration
        links them.
    """
    if not prior or not current or prior == current:
        return None, "", None
    for study_uid in study_uids:
        series = _series(pacs, study_uid)
        for _, row in series[series.Modality == "REG"].iterrows():
            paths, ref = _pull(pacs, study_uid, row)
            for path in paths:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                matrix = registration_matrix(ds, prior=prior, current=current)
                if matrix is not None:
                    note = f"registration: DICOM REG {ds.SOPInstanceUID} (series {ref.series_instance_uid})"
                    return matrix, note, ref
    return None, (f"no DICOM Spatial Registration links the prior's frame of reference {prior} to the current "
                  f"{current}"), None


def registration_matrix(reg: pydicom.Dataset, *, prior: str, current: str) -> np.ndarray | None:
    """prior → current (4×4, LPS mm) from one Spatial Registration, or None when it does not list both frames.

    Item frame F with matrix M_F maps F into the REG's own frame: x_REG = M_F · x_F (the REG's own frame is the
    identity), so x_current = M_current⁻¹ · M_prior · x_prior.
    """
    matrices = {str(reg.get("FrameOfReferenceUID", "")): np.eye(4)}
    for item in reg.get("RegistrationSequence", []):
        try:
            values = item.MatrixRegistrationSequence[0].MatrixSequence[0]
            matrix = np.asarray(values.FrameOfReferenceTransformationMatrix, float).reshape(4, 4)
        except (AttributeError, IndexError, ValueError):
            continue  # a deformable or malformed item: not a matrix registration
        matrices[str(item.get("FrameOfReferenceUID", ""))] = matrix
    if prior not in matrices or current not in matrices:
        return None
    return np.linalg.inv(matrices[current]) @ matrices[prior]


def _studies_with_image(pacs: Pacs, patient_id: str) -> pd.DataFrame:
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
        keep.append(not series.empty and series.Modality.isin(IMAGE_MODALITIES).any())
    studies = studies[keep].sort_values("sort_key", kind="stable")
    if studies.empty:
        raise ReportError(f"patient {patient_id!r} has no study with a CT or MR series on {pacs.url}")
    return studies.reset_index(drop=True)


def _series(pacs: Pacs, study_uid: str) -> pd.DataFrame:
    series = pacs.search_series(StudyInstanceUID=study_uid)
    for col in ("SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"):
        if col not in series:
            series[col] = None
    return series


def _pull(pacs: Pacs, study_uid: str, row: Any) -> tuple[list[Path], SeriesRef]:
    paths = [Path(p) for p in pacs.retrieve_series(study_uid, row.SeriesInstanceUID, progress=False)]
    # The cache names every file by its SOPInstanceUID (pacsai.pacs.cache): no need to read the headers again.
    sops = sorted(path.stem for path in paths)
    return paths, SeriesRef(str(row.Modality), study_uid, str(row.SeriesInstanceUID), tuple(sops), tuple(paths))


def _pick_image(series: pd.DataFrame) -> Any:
    for modality in IMAGE_MODALITIES:  # a CT when there is one: the planning scan
        images = series[series.Modality == modality].copy()
        if not images.empty:
            images["n"] = pd.to_numeric(images.NumberOfSeriesRelatedInstances, errors="coerce").fillna(0)
            return images.sort_values("n", kind="stable").iloc[-1]  # the largest series is the planning scan
    raise ReportError(f"study {series.StudyInstanceUID.iloc[0]} has no CT or MR series")


def _date(ds: pydicom.Dataset) -> str:
    for keyword in ("StructureSetDate", "SeriesDate", "StudyDate"):
        value = str(ds.get(keyword, "") or "")
        if len(value) == 8 and value.isdigit():
            return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return "undated"


def _planner_rtstruct(
    pacs: Pacs, study_uid: str, series: pd.DataFrame, image_series_uid: str
) -> tuple[Path, SeriesRef, pydicom.Dataset] | None:
    """The study's planner RTSTRUCT for the image series by :func:`pacsai.structure_sets.choose` (pacsai's own
    skipped; referencing the image; latest StructureSetDate/Time; most ROIs), or None."""
    found: dict[Path, SeriesRef] = {}
    headers = []
    for _, row in series[series.Modality == "RTSTRUCT"].iterrows():
        paths, ref = _pull(pacs, study_uid, row)
        for path in paths:
            header = structure_sets.read_header(path)
            if header.written_by_pacsai:
                log.info("RTSTRUCT %s was written by pacsai: not a planner's structure set", ref.series_instance_uid)
            headers.append(header)
            found[header.path] = ref
    chosen = structure_sets.choose(headers, image_series_uid=image_series_uid)
    if chosen is None:
        return None
    return chosen.path, found[chosen.path], chosen.header


def _read_study(pacs: Pacs, row: Any, *, structures_from: str) -> StudyData:
    """Read a study's planning image and its planner RTSTRUCT.

    ``structures_from="pacs"``: the planner RTSTRUCT is required. ``"reference"``: read where there is one (the
    model path), the image alone otherwise.
    """
    from pacsai.imaging import read_rtstruct, read_series

    study_uid = str(row.StudyInstanceUID)
    series = _series(pacs, study_uid)
    image_row = _pick_image(series)
    paths, image_ref = _pull(pacs, study_uid, image_row)
    try:
        image = read_series(paths)
    except PacsaiError as err:
        raise ReportError(f"planning image {image_ref.series_instance_uid} cannot be read: {err}") from err
    study = StudyData(
        study_instance_uid=study_uid,
        study_date=str(row.get("StudyDate", "") or ""),
        image=image,
        structures={},
        structures_source="",
        inputs=[image_ref],
        modality=image_ref.modality,
    )
    planner = _planner_rtstruct(pacs, study_uid, series, image_ref.series_instance_uid)
    if planner is None:
        if structures_from == "pacs":
            raise ReportError(
                f"study {study_uid} has no RTSTRUCT drawn by a planner (pacsai's own are not used); "
                "use --structures-from model"
            )
        return study
    path, ref, ds = planner
    try:
        study.structures = read_rtstruct(path, like=image)
    except PacsaiError as err:
        raise ReportError(f"RTSTRUCT {ref.series_instance_uid} of study {study_uid} cannot be read: {err}") from err
    description = str(ds.get("SeriesDescription", "") or ds.get("StructureSetLabel", "") or "unnamed")
    study.drawn_by = DrawnBy("planner", f"RTSTRUCT '{description}' {_date(ds)}")
    study.structures_source = study.drawn_by.label
    study.offered = tuple(study.structures)
    study.inputs.append(ref)
    return study


def _load_model(uri: str) -> tuple[LoadedModel, dict[str, Any], dict[str, Any]]:
    from pacsai.learning.infer import load_model  # torch only on this path

    loaded = load_model(uri)
    name, version, run_id = loaded.name, loaded.version, loaded.run_id
    if not name or not version:  # a runs:/ URI: no registry entry, the run names the model
        name, version = name or uri, version or "unregistered"
    info: dict[str, Any] = {"uri": uri, "name": name, "version": str(version), "run_id": run_id,
            "structures": list(loaded.spec.structures)}
    if loaded.postprocess:
        info["postprocess"] = dict(loaded.postprocess)
    if loaded.card:
        info["card"] = loaded.card  # the model card (markdown): shown at the end of the report
    return loaded, info, dict(loaded.domain or {})


def _input_stats(study: StudyData) -> dict[str, Any]:
    """The planning image's statistics, for the comparison with the model's training domain."""
    try:
        from pacsai.domain import image_stats
    except ImportError:  # pacsai.domain not installed yet: the gate says the domain was not checked
        return {}
    return dict(image_stats(study.image, modality=study.modality))


def _segment_into(study: StudyData, loaded: Any, model_info: dict[str, Any]) -> None:
    """Segment ``study.image`` with the model; masks, uncertainty and who drew them go into ``study``."""
    from pacsai.learning.infer import segment
    from pacsai.report.uncertainty import summarize_uncertainty

    result = segment(study.image, model=loaded, return_uncertainty=True)
    masks, maps = result if isinstance(result, tuple) else (result, {})
    study.structures = dict(masks)
    study.offered = tuple(masks)
    study.uncertainty = {name: summarize_uncertainty(study.structures[name], umap)
                         for name, umap in dict(maps).items()}
    study.drawn_by = DrawnBy("model", f"model {model_info.get('name')} v{model_info.get('version')}")
    study.structures_source = study.drawn_by.label


def _read_dose(pacs: Pacs, study: StudyData) -> tuple[xr.DataArray | None, str, dict[str, Any]]:
    series = _series(pacs, study.study_instance_uid)
    doses = series[series.Modality == "RTDOSE"]
    if doses.empty:
        return None, "no RTDOSE in the planning study", {}
    from pacsai.imaging import read_dose

    paths, ref = _pull(pacs, study.study_instance_uid, doses.iloc[-1])
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    info = {key: str(header.get(key, "") or "") for key in ("DoseSummationType", "DoseType", "DoseUnits",
                                                              "SOPInstanceUID")}
    try:
        dose = read_dose(paths[0])
    except PacsaiError as err:
        return None, f"RTDOSE {ref.sop_instance_uids[0]} unusable: {err}", info
    study.inputs.append(ref)
    return dose, "", info
