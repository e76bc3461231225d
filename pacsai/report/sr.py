"""Planning measurements as a TID 1500 Measurement Report (highdicom Comprehensive 3D SR, …88.34).

One *Volumetric ROI Measurements* group per structure, each pointing at its segment in a **BINARY** DICOM SEG
(dciodvfy flags ``ReferencedSegmentNumber`` when the SEG is LABELMAP; ``docs/dicom_notes.md``). The codes
are the ones that validate here: Volume (SCT 118565006, ``cm3``), Mean / Maximum Absorbed Radiation Dose (DCM
128533 / 128531, ``Gy``), Long axis (SCT 103339001, ``mm``); procedure reported LN 25045-6 (CT) or 25056-3 (MR).

Repeatability: highdicom stamps the clock into InstanceCreationDate/Time, ContentDate/Time and the
ContributingEquipmentSequence, and makes a random TrackingIdentifier UID unless given one. Here every UID comes
from :func:`pacsai.uids.derive_uid` over the inputs and every date/time from the source study, so the same inputs
give byte-identical objects.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from pacsai.errors import ReportError
from pacsai.imaging import dicomwrite
from pacsai.uids import derive_uid

logger = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")
BINARY_SEG_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")

#: Procedure reported (TID 1500 row 3) by source modality.
PROCEDURE_CODES: Mapping[str, Code] = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
}

#: The QA gate as a TID 1501 measurement group (no ROI): a coded qualitative evaluation "QA status" with the
#: value PASS / REVIEW / FAIL, and each reason as a TEXT qualitative evaluation. DICOM has no codes for a model QA
#: gate, so they are in pacsai's private coding scheme (designators starting with "99" are reserved for that).
QA_SCHEME = "99PACSAI"
QA_TRACKING_ID = "pacsai QA gate"
QA_STATUS = Code("QA-STATUS", QA_SCHEME, "QA status")
QA_REASON = Code("QA-REASON", QA_SCHEME, "QA reason")
QA_VALUES: Mapping[str, Code] = {
    "PASS": Code("QA-PASS", QA_SCHEME, "PASS: no reason to distrust the structures and inputs"),
    "REVIEW": Code("QA-REVIEW", QA_SCHEME, "REVIEW: a person must review the reasons first"),
    "FAIL": Code("QA-FAIL", QA_SCHEME, "FAIL: the report's statements cannot be made from this input"),
}
#: Who drew a structure (TEXT in its volumetric group): a planner's RTSTRUCT, a model, or a margin.
DRAWN_BY = Code("DRAWN-BY", QA_SCHEME, "Structure drawn by")
#: The statement a report pushed despite a failed gate carries (``--push-anyway``).
PUSHED_DESPITE_FAIL = "pushed despite QA FAIL by user request"

#: ``measurements`` key → (concept name, unit) of each measurement written.
MEASUREMENT_CODES: Mapping[str, tuple[Code, Code]] = {
    "volume_cc": (Code("118565006", "SCT", "Volume"), Code("cm3", "UCUM", "cubic centimeter")),
    "mean_dose_gy": (Code("128533", "DCM", "Mean Absorbed Radiation Dose"), Code("Gy", "UCUM", "Gray")),
    "max_dose_gy": (Code("128531", "DCM", "Maximum Absorbed Radiation Dose"), Code("Gy", "UCUM", "Gray")),
    "longest_diameter_mm": (Code("103339001", "SCT", "Long axis"), Code("mm", "UCUM", "millimeter")),
}


def measurement_report(
    seg: Dataset,
    *,
    source_images: Sequence[Dataset],
    measurements: Mapping[str, Mapping[str, float | None]],
    uid_parts: Sequence[object] = (),
    series_number: int = 902,
    series_description: str = "pacsai planning measurements (research use only)",
    algorithm_name: str = "pacsai",
    algorithm_version: str | None = None,
    procedure_reported: Code | None = None,
    content_datetime: dt.datetime | None = None,
    manufacturer: str = "pacsai",
    qa: Mapping[str, Any] | None = None,
    pushed_despite_fail: bool = False,
    drawn_by: Mapping[str, str] | None = None,
) -> Dataset:
    """A TID 1500 Comprehensive 3D SR with volume, dose and size per structure, referencing a BINARY SEG.

    Parameters
    ----------
    seg
        The BINARY DICOM SEG the structures are segments of (e.g. from :func:`pacsai.imaging.write_seg`);
        segments are found by SegmentLabel = structure name.
    source_images
        The image instances the SEG was made on (headers suffice): they are the SR's evidence together with
        the SEG, and the first gives the Patient and Study modules.
    measurements
        ``{structure_name: {"volume_cc": float, "mean_dose_gy": float | None, "max_dose_gy": float | None,
        "longest_diameter_mm": float | None}}``; ``None``, NaN or a missing key leaves that measurement out
        (e.g. no dose). Other keys are refused; ``volume_cc`` is required.
    uid_parts
        Further inputs that shape the content (model version, parameters, pacsai version); they enter the
        UIDs with the SEG's SOP instance UID and the measurements.
    series_number, series_description
        Of the new SR series.
    algorithm_name, algorithm_version
        The device observer (TID 1004) that made the measurements.
    procedure_reported
        Defaults to LN 25045-6 for CT and 25056-3 for MR sources (:data:`PROCEDURE_CODES`).
    content_datetime
        ContentDate/Time; taken from the source study where None, never from the clock.
    manufacturer
        General Equipment Manufacturer.
    qa
        The report's QA gate ``{"status": "PASS"|"REVIEW"|"FAIL", "reasons": [{"code", "level", "message"}, ...]}``:
        written first, as a measurement group of its own (:data:`QA_TRACKING_ID`) with the coded status and each
        error/review reason as text (read back with :func:`read_qa`).
    pushed_despite_fail
        The gate failed and the user stored the report anyway: the QA group says so (:data:`PUSHED_DESPITE_FAIL`).
    drawn_by
        ``{structure: "RTSTRUCT '<description>' <date>" | "model <name> v<version>" | ...}``: who drew each
        structure, a TEXT item in its group (:data:`DRAWN_BY`; read back with :func:`read_drawn_by`).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A Part-10 ready dataset (file meta, Explicit VR Little Endian). Read it back with
        ``hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()``.

    Raises
    ------
    ReportError
        A SEG that is not BINARY, a structure that is not a segment of it, an unknown measurement key, a value
        that is not a finite number, no measurements, a source modality without a procedure code, or highdicom
        refusing the content (its message included).
    """
    _check_seg(seg)
    if not measurements:
        raise ReportError("measurement_report: no measurements given; pass {structure_name: {...}}")
    sources = list(source_images)
    if not sources:
        raise ReportError("measurement_report: no source images; pass the image series the SEG was made on")
    first = sources[0]
    segments = _segment_numbers(seg)
    procedure = procedure_reported or _procedure(first)
    version = algorithm_version or _pacsai_version()
    rows = {name: _values(name, values) for name, values in measurements.items()}
    qa_lines = _qa_lines(qa, pushed_despite_fail, charset=first.get("SpecificCharacterSet"))
    authors = {name: _encodable(str(label), first.get("SpecificCharacterSet"))[:1024]
               for name, label in (drawn_by or {}).items() if name in rows}
    missing = [name for name in rows if name not in segments]
    if missing:
        raise ReportError(
            f"measurement_report: structure(s) {missing} are not segments of SEG {seg.SOPInstanceUID} "
            f"(its segments: {sorted(segments)}); write the SEG from the same masks as the measurements"
        )
    parts = (
        str(seg.SOPInstanceUID),
        sorted((name, sorted(values.items())) for name, values in rows.items()),
        series_number,
        series_description,
        algorithm_name,
        version,
        str(procedure),
        qa_lines,
        sorted(authors.items()),
        *uid_parts,
    )
    sop_instance_uid = derive_uid("pacsai-sr-instance", *parts)
    if content_datetime is None:
        date, time = dicomwrite.content_datetime(sources, what="measurement report")
    else:
        date, time = content_datetime.strftime("%Y%m%d"), content_datetime.strftime("%H%M%S")

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("pacsai-sr-device", algorithm_name, version),
            name=algorithm_name[:64],
            manufacturer_name=manufacturer,
            model_name=version[:64],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=version)
    groups: list[Any] = []
    if qa_lines:
        groups.append(_qa_group(qa_lines, algorithm, seg))
    for name, values in rows.items():
        number = segments[name]
        group_measurements = []
        for key, (concept, unit) in MEASUREMENT_CODES.items():
            value = values.get(key)
            if value is not None:
                group_measurements.append(
                    hd.sr.Measurement(name=concept, value=float(value), unit=unit, algorithm_id=algorithm))
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid("pacsai-sr-tracking", seg.SOPInstanceUID, number, name),
                identifier=name[:64],
            ),
            referenced_segment=_referenced_segment(seg, number),
            finding_type=_finding_type(seg, number),
            algorithm_id=algorithm,
            measurements=group_measurements,
        )
        if authors.get(name):  # who drew the structure: a planner's RTSTRUCT, a model, or a margin
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(name=DRAWN_BY, value=authors[name], relationship_type="CONTAINS")
            )
        groups.append(group)
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups,
        )
        with warnings.catch_warnings():
            # Person names are copied verbatim from the source; highdicom's one-component warning is noise.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            sr = hd.sr.Comprehensive3DSR(
                evidence=[*sources, seg],
                content=report,
                series_instance_uid=derive_uid("pacsai-sr-series", *parts),
                series_number=int(series_number),
                sop_instance_uid=sop_instance_uid,
                instance_number=1,
                manufacturer=manufacturer,
                is_complete=True,
                series_description=series_description[:64],
                software_versions=version[:64],
                content_date=date,
                content_time=time,
                series_date=date,
                series_time=time,
                specific_character_set=first.get("SpecificCharacterSet") or None,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ReportError(
            f"measurement_report: highdicom refused the report for SEG {seg.SOPInstanceUID}: {err}"
        ) from err
    _make_repeatable(sr, date, time)
    logger.debug("TID1500 SR %s: %d structure(s)", sop_instance_uid, len(groups))
    return dicomwrite.finalize(sr)


def _report(sr: Any) -> hd.sr.MeasurementReport:
    """The TID 1500 content of an SR given as a path or a dataset."""
    document = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True) if isinstance(sr, Dataset) else hd.sr.srread(sr)
    # highdicom types ``.content`` as a plain ContentSequence; for a TID 1500 document it is the report.
    return cast(hd.sr.MeasurementReport, document.content)


def read_measurements(sr: Any) -> dict[str, dict[str, tuple[float, str]]]:
    """The measurements of a TID 1500 report, by tracking identifier (structure name).

    Parameters
    ----------
    sr
        A path to the SR file, or a dataset (as :func:`measurement_report` returns or a PACS sends back).

    Returns
    -------
    dict
        ``{structure: {key: (value, UCUM unit)}}`` with the keys of :data:`MEASUREMENT_CODES`.
    """
    result: dict[str, dict[str, tuple[float, str]]] = {}
    for group in _report(sr).get_volumetric_roi_measurement_groups():
        entry: dict[str, tuple[float, str]] = {}
        for key, (concept, _unit) in MEASUREMENT_CODES.items():
            found = group.get_measurements(name=concept)
            if found:
                entry[key] = (float(found[0].value), str(found[0].unit.value))
        result[str(group.tracking_identifier)] = entry
    return result


def read_qa(sr: Any) -> dict[str, Any]:
    """The QA gate of a report SR: ``{"status": str | None, "statements": [text, ...]}``.

    ``statements`` are the group's TEXT items in order: each reason as ``"LEVEL CODE: message"`` and, where the
    report was pushed despite a FAIL, :data:`PUSHED_DESPITE_FAIL`.
    """
    for group in _report(sr).get_image_measurement_groups():  # TID 1501: groups without an ROI
        if str(group.tracking_identifier) != QA_TRACKING_ID:
            continue
        status, statements = None, []
        for item in group[0].ContentSequence:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "CODE" and name.CodeValue == QA_STATUS.value:
                status = str(item.ConceptCodeSequence[0].CodeValue).removeprefix("QA-")
            elif item.ValueType == "TEXT" and name.CodeValue == QA_REASON.value:
                statements.append(str(item.TextValue))
        return {"status": status, "statements": statements}
    return {"status": None, "statements": []}


#: Typography of pacsai's messages → what a single-byte character set (e.g. ISO_IR 100, Latin-1) can hold.
_PLAIN = {"—": "-", "–": "-", "−": "-", "≥": ">=", "≤": "<=", "→": "->", "∪": "+", "σ": "sigma", "…": "...",
          "Δ": "delta ", "α": "alpha", "β": "beta", "’": "'", "“": '"', "”": '"'}


def _encodable(text: str, charset: Any) -> str:
    """``text`` as the SR's SpecificCharacterSet (copied from the source) can encode it: typographic signs made
    plain where needed, anything else left unencodable replaced by "?" (never a failed store)."""
    from pydicom.charset import convert_encodings

    names = [charset] if isinstance(charset, str) else list(charset or [])
    codecs = convert_encodings(names or ["ISO_IR 6"])
    try:
        text.encode(codecs[0])
        return text
    except UnicodeEncodeError:
        plain = "".join(_PLAIN.get(c, c) for c in text)
        return plain.encode(codecs[0], errors="replace").decode(codecs[0])


def read_drawn_by(sr: Any) -> dict[str, str]:
    """Who drew each measured structure of a report SR: ``{structure: label}`` (see ``drawn_by``)."""
    out = {}
    for group in _report(sr).get_volumetric_roi_measurement_groups():
        for item in group[0].ContentSequence:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == DRAWN_BY.value:
                out[str(group.tracking_identifier)] = str(item.TextValue)
    return out


def _qa_lines(
    qa: Mapping[str, Any] | None, pushed_despite_fail: bool, *, charset: Any = None
) -> tuple[str, tuple[str, ...]] | tuple[()]:
    if not qa:
        if pushed_despite_fail:
            raise ReportError("measurement_report: pushed_despite_fail without a QA gate (qa=None)")
        return ()
    status = str(qa.get("status", ""))
    if status not in QA_VALUES:
        raise ReportError(f"measurement_report: QA status {status!r} is not one of {sorted(QA_VALUES)}")
    if pushed_despite_fail and status != "FAIL":
        raise ReportError(f"measurement_report: pushed_despite_fail with QA {status}; only a FAIL can be overridden")
    lines = [f"{str(r['level']).upper()} {r['code']}: {r['message']}"
             for r in qa.get("reasons", []) if r.get("level") != "note"]
    if pushed_despite_fail:
        lines.append(PUSHED_DESPITE_FAIL)
    # One reason per TEXT item; 1024 characters keep any of them readable in a viewer.
    return status, tuple(_encodable(line, charset)[:1024] for line in lines)


def _qa_group(lines: tuple[str, tuple[str, ...]], algorithm: Any, seg: Dataset) -> Any:
    status, texts = lines
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid("pacsai-sr-qa", seg.SOPInstanceUID, status, *texts), identifier=QA_TRACKING_ID,
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=QA_STATUS, value=QA_VALUES[status])],
    )
    container = group[0]
    for text in texts:
        item = hd.sr.TextContentItem(name=QA_REASON, value=text, relationship_type="CONTAINS")
        container.ContentSequence.append(item)
    return group


def _check_seg(seg: Dataset) -> None:
    sop_class = str(seg.get("SOPClassUID", ""))
    seg_type = str(seg.get("SegmentationType", ""))
    if sop_class != BINARY_SEG_STORAGE or seg_type != "BINARY":
        raise ReportError(
            f"measurement_report: SEG {seg.get('SOPInstanceUID', '?')} is {seg_type or sop_class!r}, not a "
            "BINARY Segmentation; a TID 1500 report must reference a BINARY SEG (dciodvfy flags references "
            "to LABELMAP segments): write it with pacsai.imaging.write_seg(..., segment_type='BINARY')"
        )


def _segment_numbers(seg: Dataset) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for item in seg.SegmentSequence:
        label = str(item.get("SegmentLabel", ""))
        if label in numbers:
            raise ReportError(
                f"measurement_report: SEG {seg.SOPInstanceUID} has two segments labelled {label!r}; "
                "labels must identify the structures"
            )
        numbers[label] = int(item.SegmentNumber)
    return numbers


def _values(name: str, values: Mapping[str, float | None]) -> dict[str, float | None]:
    unknown = sorted(set(values) - set(MEASUREMENT_CODES))
    if unknown:
        raise ReportError(
            f"measurement_report: structure {name!r} has unknown measurement(s) {unknown}; known: "
            f"{sorted(MEASUREMENT_CODES)}"
        )
    clean: dict[str, float | None] = {}
    for key in MEASUREMENT_CODES:
        value = values.get(key)
        if value is None:
            clean[key] = None
            continue
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ReportError(f"measurement_report: {name!r} {key} = {value!r} is not a number") from err
        if math.isnan(number):  # "not computed" (e.g. metrics.json from pandas): the same as None
            clean[key] = None
            continue
        if math.isinf(number):
            raise ReportError(
                f"measurement_report: {name!r} {key} = {number!r}; a measurement must be finite (pass None "
                "to leave it out)"
            )
        clean[key] = number
    if clean["volume_cc"] is None:
        raise ReportError(f"measurement_report: structure {name!r} has no volume_cc")
    return clean


def _procedure(first: Dataset) -> Code:
    modality = str(first.get("Modality", ""))
    try:
        return PROCEDURE_CODES[modality]
    except KeyError as err:
        raise ReportError(
            f"measurement_report: no procedure code for source modality {modality!r} (known: "
            f"{sorted(PROCEDURE_CODES)}); pass procedure_reported=Code(...)"
        ) from err


def _referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    # With source_series the SEG alone is sufficient evidence; the source images are added to it anyway.
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series),
    )


def _finding_type(seg: Dataset, number: int) -> hd.sr.CodedConcept | None:
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == number and item.get("SegmentedPropertyTypeCodeSequence"):
            return hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0])
    return None


def _make_repeatable(sr: Dataset, date: str, time: str) -> None:
    """Replace what highdicom stamps from the clock with the source's date and time."""
    sr.InstanceCreationDate = date
    sr.InstanceCreationTime = time
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{date}{time}"


def _pacsai_version() -> str:
    from pacsai import __version__

    return f"pacsai {__version__}"


__all__ = [
    "COMPREHENSIVE_3D_SR_STORAGE",
    "MEASUREMENT_CODES",
    "PROCEDURE_CODES",
    "PUSHED_DESPITE_FAIL",
    "QA_TRACKING_ID",
    "measurement_report",
    "read_drawn_by",
    "read_measurements",
    "read_qa",
]
