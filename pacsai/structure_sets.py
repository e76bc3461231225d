"""Which RTSTRUCT of a study holds a patient's structures: one rule for the notebooks and the report.

A planning study often has several structure sets: the planner's first draft and its revisions, a physician's
edit, contours sent back by an auto-contouring tool (pacsai's own among them). The rule
(docs/structure_set_selection.md explains why):

1. pacsai's own structure sets never count (a report's model contours are no planner's structures);
2. one that references the image series comes first; one that references no series is taken only when none
   references it; one that references only other series is drawn on another image and never taken;
3. the latest by StructureSetDate and StructureSetTime (the revision the plan was made on); undated ones last;
4. most ROIs as a tie-break, then the lowest SOP Instance UID, so that the choice never depends on the order in
   which the PACS answered.

Torch-free and PACS-free: callers read the headers (:func:`read_header`) of the study's RTSTRUCTs and pass them to
:func:`choose`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pacsai.errors import StructureError

logger = logging.getLogger(__name__)

#: General Equipment Manufacturer of every object pacsai writes (SEG, RTSTRUCT, SR, PDF; pacsai.imaging writers).
PACSAI_MANUFACTURER = "pacsai"
#: ManufacturerModelName of the synthetic generator's structure sets: they stand in for a planner's RTSTRUCT
#: (pacsai.synthetic draws the ground truth a planner would), so they count as planner structures.
SYNTHETIC_PLANNER_MODEL = "pacsai.synthetic"


def written_by_pacsai(ds: pydicom.Dataset) -> bool:
    """True for an object a pacsai report wrote back (its SEG, RTSTRUCT, SR or PDF).

    pacsai's writers stamp ``Manufacturer = "pacsai"`` in the General Equipment module; the synthetic generator's
    structure sets (``ManufacturerModelName`` ``pacsai.synthetic``) stand in for a planner and do not count.
    UIDs cannot tell: pacsai derives ``2.25.<uuid5>`` UIDs, a root any software may use.
    """
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().lower()
    model = str(ds.get("ManufacturerModelName", "") or "").strip()
    return manufacturer == PACSAI_MANUFACTURER and not model.startswith(SYNTHETIC_PLANNER_MODEL)


@dataclass(frozen=True)
class StructureSet:
    """What the rule needs of one RTSTRUCT instance (its header; no contour decoded)."""

    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    roi_names: tuple[str, ...]
    referenced_series: frozenset[str]
    #: StructureSetDate + StructureSetTime as digits (``YYYYMMDDHHMMSS``), ``""`` when undated.
    date_time: str
    label: str
    written_by_pacsai: bool
    header: pydicom.Dataset


def read_header(path: str | Path) -> StructureSet:
    """Read an RTSTRUCT's header for :func:`choose`.

    Raises
    ------
    StructureError
        The file is no readable RTSTRUCT (the message names it).
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:
        raise StructureError(f"cannot read RTSTRUCT {path}: {err}") from err
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise StructureError(f"{path} is a {ds.get('Modality', 'DICOM')} object, not an RTSTRUCT")
    referenced = {
        str(s.SeriesInstanceUID)
        for ref in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in ref.get("RTReferencedStudySequence", [])
        for s in study.get("RTReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in s
    }
    date = "".join(ch for ch in str(ds.get("StructureSetDate", "") or "") if ch.isdigit())
    time = "".join(ch for ch in str(ds.get("StructureSetTime", "") or "").split(".")[0] if ch.isdigit())
    label = str(ds.get("SeriesDescription", "") or ds.get("StructureSetLabel", "") or "unnamed")
    return StructureSet(
        path=Path(path),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        roi_names=tuple(str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])),
        referenced_series=frozenset(referenced),
        date_time=(date + time.ljust(6, "0")) if len(date) == 8 else "",
        label=label,
        written_by_pacsai=written_by_pacsai(ds),
        header=ds,
    )


def _sop_key(uid: str) -> tuple[int, ...]:
    """Numeric order of a UID's components (``1.2.10`` after ``1.2.9``)."""
    return tuple(int(part) if part.isdigit() else -1 for part in uid.split("."))


def choose(candidates: Iterable[StructureSet], *, image_series_uid: str | None = None) -> StructureSet | None:
    """The study's structure set by the rule of this module, or None when no candidate qualifies.

    Parameters
    ----------
    candidates
        Headers of the study's RTSTRUCT instances (:func:`read_header`).
    image_series_uid
        The image series the structures are wanted on; None: any (step 2 of the rule is skipped).
    """
    usable = [c for c in candidates if not c.written_by_pacsai]
    if image_series_uid is not None:
        on_image = [c for c in usable if image_series_uid in c.referenced_series]
        usable = on_image or [c for c in usable if not c.referenced_series]
    if not usable:
        return None
    best = max(usable, key=lambda c: (c.date_time, len(c.roi_names), tuple(-n for n in _sop_key(c.sop_instance_uid))))
    if len(usable) > 1:
        logger.info("RTSTRUCT %s chosen among %d structure sets (referenced image series, latest, most ROIs)",
                    best.sop_instance_uid, len(usable))
    return best


__all__ = [
    "PACSAI_MANUFACTURER",
    "SYNTHETIC_PLANNER_MODEL",
    "StructureSet",
    "choose",
    "read_header",
    "written_by_pacsai",
]
