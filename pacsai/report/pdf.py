"""The report as a DICOM Encapsulated PDF (SOP class 1.2.840.10008.5.1.4.1.1.104.1) in the patient's study.

Neither pydicom nor highdicom writes this IOD, so it is built here from the modules dciodvfy demands
(``docs/dicom_notes.md``): Patient, General Study (type 2 attributes present even when empty), Encapsulated
Document Series (Modality ``DOC``), General Equipment, SC Equipment (ConversionType ``WSD``: a workstation made
it), Encapsulated Document and SOP Common.

Repeatability: UIDs come from :func:`pacsai.uids.derive_uid` over a digest of the PDF, the source instance UIDs
and the caller's ``uid_parts``; dates come from the source study (or an explicit ``content_datetime``), never
from the clock. The digest ignores what a PDF writer stamps from the clock (Info ``/CreationDate`` and
``/ModDate``, XMP dates, the trailer ``/ID``): headless Chromium stamps them on every print, and a re-run of the
same report must map to the same SOP instance, or every re-run would add one more copy to the PACS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacsai.errors import ReportError
from pacsai.imaging import dicomwrite
from pacsai.uids import derive_uid

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
RESEARCH_NOTICE = "research use only"

# What PDF writers fill from the clock or at random (not content): blanked before hashing.
_VOLATILE = (
    re.compile(rb"/(CreationDate|ModDate)\s*\((?:[^()\\]|\\.)*\)"),
    re.compile(rb"/(CreationDate|ModDate)\s*<[0-9A-Fa-f\s]*>"),
    re.compile(rb"<(xmp:(?:CreateDate|ModifyDate|MetadataDate))>[^<]*</xmp:\w+>"),
    re.compile(rb"(xmp:(?:CreateDate|ModifyDate|MetadataDate))=\"[^\"]*\""),
    re.compile(rb"<(xmpMM:(?:DocumentID|InstanceID))>[^<]*</xmpMM:\w+>"),
    re.compile(rb"/(ID)\s*\[\s*<[0-9A-Fa-f]*>\s*<[0-9A-Fa-f]*>\s*\]"),
)


def pdf_digest(pdf_bytes: bytes) -> str:
    """SHA-256 of a PDF's content, ignoring the timestamps and random IDs PDF writers add.

    Parameters
    ----------
    pdf_bytes
        The PDF file.

    Returns
    -------
    str
        Hex digest: equal for two prints of the same document that differ only in ``/CreationDate``,
        ``/ModDate``, XMP create/modify/metadata dates and document/instance IDs, or the trailer ``/ID``.
    """
    text = bytes(pdf_bytes)
    for pattern in _VOLATILE:
        text = pattern.sub(_blank, text)
    return hashlib.sha256(text).hexdigest()


def _blank(match: re.Match[bytes]) -> bytes:
    # Keep the key name so that blanking can never make two documents with different keys collide.
    return b"<" + match.group(1) + b":volatile>"


def encapsulated_pdf(
    pdf_bytes: bytes,
    *,
    source: Dataset | Sequence[Dataset],
    title: str,
    uid_parts: Sequence[object] = (),
    series_number: int = 903,
    series_description: str = "pacsai planning report (research use only)",
    content_datetime: dt.datetime | str | None = None,
    manufacturer: str = "pacsai",
    software_versions: str | None = None,
) -> Dataset:
    """Wrap a PDF as a DICOM Encapsulated PDF in the study of ``source``.

    Parameters
    ----------
    pdf_bytes
        The PDF document (must start with ``%PDF-``).
    source
        One instance or the instances of the series the report describes (e.g. the planning CT; headers
        suffice): the Patient and General Study modules are copied from the first, and every instance is
        listed in SourceInstanceSequence.
    title
        DocumentTitle; ``" (research use only)"`` is appended unless the title says so already.
    uid_parts
        Further inputs that shape the document (model version, parameters, pacsai version): they enter the
        UIDs together with the PDF's digest (:func:`pdf_digest`) and the source instance UIDs.
    series_number
        SeriesNumber of the new series.
    series_description
        SeriesDescription of the new series.
    content_datetime
        ContentDate/Time and AcquisitionDateTime; ``datetime`` or DICOM ``YYYYMMDDHHMMSS``. Taken from the
        source (series, study, content or acquisition date) where None, never from the clock.
    manufacturer, software_versions
        General Equipment; ``software_versions`` defaults to ``"pacsai <version>"``.

    Returns
    -------
    pydicom.Dataset
        Part-10 dataset (file meta, Explicit VR Little Endian) of SOP class
        :data:`ENCAPSULATED_PDF_STORAGE`. ``EncapsulatedDocument[:EncapsulatedDocumentLength]`` is the PDF,
        byte for byte (an odd-length PDF is padded with one ``0x00``).

    Raises
    ------
    ReportError
        Empty or non-PDF bytes, no source instance, a source without Study/SOP Instance UIDs, a title longer than
        DocumentTitle (ST) allows.
    """
    pdf = bytes(pdf_bytes or b"")
    if not pdf.startswith(b"%PDF-"):
        raise ReportError(
            f"encapsulated_pdf: the document is not a PDF (it starts with {pdf[:8]!r}, {len(pdf)} bytes); "
            "pass the bytes of the rendered report.pdf"
        )
    sources = _sources(source)
    first = sources[0]
    full_title = title if RESEARCH_NOTICE in title.lower() else f"{title} ({RESEARCH_NOTICE})"
    if len(full_title) > 1024:
        raise ReportError(
            f"encapsulated_pdf: title {title[:40]!r}... exceeds 1024 characters (DocumentTitle, ST)"
        )
    date, time = _when(content_datetime, sources)
    source_uids = [str(ds.SOPInstanceUID) for ds in sources]
    parts = (pdf_digest(pdf), *source_uids, full_title, series_number, series_description, *uid_parts)

    ds = Dataset()
    dicomwrite.copy_patient_study(first, ds)
    # SOP Common
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = derive_uid("pacsai-pdf-instance", *parts)
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = derive_uid("pacsai-pdf-series", *parts)
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = date
    ds.SeriesTime = time
    # General Equipment + SC Equipment
    ds.Manufacturer = manufacturer
    ds.SoftwareVersions = software_versions or _pacsai_version()
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = f"{date}{time}"
    # The report prints the patient's name and ID on every page.
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = full_title
    ds.ConceptNameCodeSequence = []
    ds.SourceInstanceSequence = [_reference(s) for s in sources]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    # OB values have even length; the standard pads with 0x00 and EncapsulatedDocumentLength keeps the true size.
    ds.EncapsulatedDocument = pdf + b"\x00" if len(pdf) % 2 else pdf
    logger.debug(
        "Encapsulated PDF %s (%d bytes) in study %s", ds.SOPInstanceUID, len(pdf), ds.StudyInstanceUID
    )
    return dicomwrite.finalize(ds)


def read_encapsulated_pdf(ds: Dataset) -> bytes:
    """The PDF inside an Encapsulated PDF dataset, without the padding byte.

    Parameters
    ----------
    ds
        An Encapsulated PDF dataset (as written by :func:`encapsulated_pdf` or read back from a PACS).

    Raises
    ------
    ReportError
        Not an Encapsulated PDF.
    """
    if str(ds.get("SOPClassUID", "")) != ENCAPSULATED_PDF_STORAGE or "EncapsulatedDocument" not in ds:
        raise ReportError(
            f"{ds.get('SOPInstanceUID', 'dataset')} is not an Encapsulated PDF (SOP class {ds.get('SOPClassUID')})"
        )
    data = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    if length is not None:
        return data[: int(length)]
    # Objects from older writers lack the length (added to the standard in 2019): strip the single padding byte
    # the standard prescribes for odd lengths; a PDF itself ends in "%%EOF" and an end-of-line, never in 0x00.
    return data[:-1] if data.endswith(b"\x00") else data


def _sources(source: Dataset | Sequence[Dataset]) -> list[Dataset]:
    sources = [source] if isinstance(source, Dataset) else list(source)
    if not sources:
        raise ReportError("encapsulated_pdf: no source instance given; pass the planning CT's datasets")
    for ds in sources:
        for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise ReportError(
                    f"encapsulated_pdf: source {getattr(ds, 'filename', None) or ds.get('SOPInstanceUID', '?')} "
                    f"has no {keyword}; the PDF must go into the source's study and reference it"
                )
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) > 1:
        raise ReportError(
            f"encapsulated_pdf: the source instances belong to several studies {sorted(studies)}; pass the "
            "instances of the one study the report is filed in"
        )
    return sources


def _when(content_datetime: dt.datetime | str | None, sources: Sequence[Dataset]) -> tuple[str, str]:
    if content_datetime is None:
        return dicomwrite.content_datetime(sources, what="Encapsulated PDF")
    if isinstance(content_datetime, dt.datetime):
        return content_datetime.strftime("%Y%m%d"), content_datetime.strftime("%H%M%S")
    text = str(content_datetime).strip()
    if not re.fullmatch(r"\d{8}(\d{2,6}(\.\d{1,6})?)?", text):
        raise ReportError(
            f"encapsulated_pdf: content_datetime {text!r} is not a DICOM date-time (YYYYMMDD[HHMMSS]); pass a "
            "datetime or such a string"
        )
    return text[:8], text[8:] or "000000"


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _pacsai_version() -> str:
    from pacsai import __version__

    return f"pacsai {__version__}"


__all__ = ["ENCAPSULATED_PDF_STORAGE", "encapsulated_pdf", "pdf_digest", "read_encapsulated_pdf"]
