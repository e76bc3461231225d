"""The report's DICOM outputs, back into the patient's study: SEG, RTSTRUCT, TID 1500 SR and Encapsulated PDF.

:func:`build_outputs` makes the objects, :func:`push_outputs` stores them. Each object is a new series in the
study of the source images, with correct references (frame of reference, source images, the SR → the SEG's
segments) and UIDs derived from everything that shapes it (:func:`output_uid_parts`: pacsai version, model
name/version/run id, the report parameters; plus each object's own content: masks, measurements, the PDF).
Re-running the same report therefore gives the same UIDs and adds nothing to the PACS, while any change gives new
UIDs, hence new instances, never a silent discard (Orthanc keeps the old object when a different one arrives under
a known SOP Instance UID; ``docs/dicom_notes.md``).

Series numbers: SEG 900, RTSTRUCT 901, SR 902, PDF 903.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import xarray as xr
from pydicom.dataset import Dataset

from pacsai.errors import ReportError
from pacsai.report.pdf import encapsulated_pdf
from pacsai.report.sr import measurement_report

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs, StoreSummary

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 900
RTSTRUCT_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902
PDF_SERIES_NUMBER = 903


def output_uid_parts(model_info: Mapping[str, Any] | None, params: Any) -> tuple[str, ...]:
    """The inputs, besides each object's own content, that enter every output UID.

    Parameters
    ----------
    model_info
        ``{"name", "version", "run_id", ...}`` of the model that made the structures (empty when they came
        from the PACS).
    params
        The report parameters: a mapping or a pydantic model (``model_dump``).

    Returns
    -------
    tuple of str
        ``("pacsai <version>", model JSON, parameters JSON)``, JSON with sorted keys so that the order of the
        parameters does not matter but every value does.
    """
    from pacsai import __version__

    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    return (
        f"pacsai {__version__}",
        "model=" + _canonical(dict(model_info or {})),
        "params=" + _canonical(dict(params or {})),
    )


def build_outputs(
    *,
    source_images: Any,
    masks: Mapping[str, xr.DataArray],
    measurements: Mapping[str, Mapping[str, float | None]],
    pdf_bytes: bytes | None,
    model_info: Mapping[str, Any] | None,
    params: Any,
    include_seg: bool = True,
    include_rtstruct: bool = True,
    qa: Mapping[str, Any] | None = None,
    pushed_despite_fail: bool = False,
    drawn_by: Mapping[str, str] | None = None,
) -> list[Dataset]:
    """Build the DICOM objects a report sends back to the PACS.

    Parameters
    ----------
    source_images
        The planning CT the masks were made on: datasets, paths or a folder (headers suffice).
    masks
        ``{structure: bool DataArray}`` on the grid of ``source_images`` (for the SEG and the RTSTRUCT).
    measurements
        ``{structure: {"volume_cc", "mean_dose_gy", "max_dose_gy", "longest_diameter_mm"}}`` for the SR
        (``None`` values are left out); every structure must be one of ``masks``. Empty: no SR.
    pdf_bytes
        The rendered report; None (no PDF could be rendered): no Encapsulated PDF.
    model_info
        ``{"name", "version", "run_id"}`` of the model that made the structures; empty or None when they came
        from the PACS. Name and version are the SEG's algorithm identification and the SR's device observer.
    params
        The report parameters (mapping or pydantic model); they enter every UID.
    include_seg
        Write the DICOM SEG (BINARY). The SR references the SEG, so without it there is no SR either.
    include_rtstruct
        Write an RTSTRUCT (for treatment-planning systems; when the model made the contours).
    qa
        The report's QA gate (``PlanSummary.qa``): the SR carries it as a qualitative evaluation.
    pushed_despite_fail
        The gate failed and the user insisted (``--push-anyway``): the SR says so.
    drawn_by
        ``{structure: who drew it}`` for the SR (planner RTSTRUCT, model, margin).

    Returns
    -------
    list of pydicom.Dataset
        In the order SEG, RTSTRUCT, SR, PDF (those that apply), each a complete Part-10 dataset in the study of
        ``source_images``; the same inputs give byte-identical datasets.

    Raises
    ------
    ReportError
        Nothing to write, measurements for structures that are not in ``masks``, or a writer refusing the
        input (its message, which names the object and the fix, is kept).
    StructureError
        Masks that are not on the grid of ``source_images`` (from the SEG/RTSTRUCT writers).
    """
    from pacsai import __version__
    from pacsai.imaging import write_rtstruct, write_seg
    from pacsai.imaging.dicomio import load_datasets

    sources = load_datasets(source_images, stop_before_pixels=True)
    model = dict(model_info or {})
    parts = output_uid_parts(model, params)
    algorithm_name = str(model.get("name") or "pacsai")
    algorithm_version = str(model.get("version") or f"pacsai {__version__}")
    unknown = sorted(set(measurements) - set(masks))
    if unknown:
        raise ReportError(
            f"build_outputs: measurements for {unknown} but no masks of those structures (masks: "
            f"{sorted(masks)}); the SR must reference a segment of each measured structure"
        )
    if not masks and not pdf_bytes:
        raise ReportError("build_outputs: no masks and no PDF: nothing to send to the PACS")

    datasets: list[Dataset] = []
    seg = None
    if masks and include_seg:
        seg = write_seg(
            masks,
            source=sources,
            segment_type="BINARY",  # the SR can only reference BINARY segments (docs/dicom_notes.md)
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
            series_description="pacsai structures (research use only)",
            series_number=SEG_SERIES_NUMBER,
            uid_parts=parts,
        )
        datasets.append(seg)
    if masks and include_rtstruct:
        datasets.append(
            write_rtstruct(
                masks,
                source=sources,
                label="PACSAI",
                series_description="pacsai structures (research use only)",
                algorithm_name=algorithm_name,
                algorithm_version=algorithm_version,
                series_number=RTSTRUCT_SERIES_NUMBER,
                uid_parts=parts,
            )
        )
    if measurements and seg is not None:
        datasets.append(
            measurement_report(
                seg,
                source_images=sources,
                measurements=measurements,
                uid_parts=parts,
                series_number=SR_SERIES_NUMBER,
                algorithm_name=algorithm_name,
                algorithm_version=algorithm_version,
                qa=qa,
                pushed_despite_fail=pushed_despite_fail,
                drawn_by=drawn_by,
            )
        )
    elif measurements:
        logger.info("no SEG written (include_seg=False), so no measurement SR either: it must reference one")
    if pdf_bytes:
        patient = str(sources[0].get("PatientID", "") or "")
        datasets.append(
            encapsulated_pdf(
                pdf_bytes,
                source=sources,
                title=f"Treatment planning report {patient}".strip(),
                uid_parts=parts,
                series_number=PDF_SERIES_NUMBER,
            )
        )
    logger.info(
        "report outputs for study %s: %s",
        sources[0].get("StudyInstanceUID"),
        ", ".join(f"{ds.Modality} {ds.SOPInstanceUID}" for ds in datasets),
    )
    return datasets


def push_outputs(pacs: Pacs, datasets: Sequence[Dataset]) -> StoreSummary:
    """Store the report's objects on ``pacs``; objects it already holds are not sent again.

    Parameters
    ----------
    pacs
        A connection (:func:`pacsai.pacs.connect`).
    datasets
        As :func:`build_outputs` returns them.

    Returns
    -------
    pacsai.pacs.StoreSummary
        ``stored`` (new), ``already_present`` (a re-run of the same report), ``failed`` (with reasons).

    Raises
    ------
    ReportError
        A dataset without Study/Series/SOP Instance UID (not built by :func:`build_outputs`).
    PacsAuthError, PacsConnectionError
        From the store: credentials refused, or the PACS cannot be reached.
    """
    datasets = list(datasets)
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise ReportError(
                    f"push_outputs: a {ds.get('Modality', 'DICOM')} object has no {keyword}; build the "
                    "outputs with pacsai.report.outputs.build_outputs"
                )
    summary = pacs.store(datasets, progress=False)
    logger.info("pushed report outputs to %s: %s", getattr(pacs, "url", pacs), summary)
    return summary


def _canonical(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError) as err:
        raise ReportError(f"build_outputs: cannot serialise {value!r} for the output UIDs: {err}") from err


__all__ = [
    "PDF_SERIES_NUMBER",
    "RTSTRUCT_SERIES_NUMBER",
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "build_outputs",
    "output_uid_parts",
    "push_outputs",
]
