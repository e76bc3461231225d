"""Shared helpers for writing DICOM Part-10 objects that are standard-conformant and byte-for-byte repeatable.

Everything pacsai writes (SEG, RTSTRUCT, and later SR and Encapsulated PDF) goes through these helpers so that
the same inputs give the same bytes: UIDs come from :func:`pacsai.uids.derive_uid` over the inputs, dates and
times come from the source study (never the clock), and decimal strings (DS) are formatted to at most 16
characters, as the standard demands (rt-utils gets this wrong; ``docs/dicom_notes.md``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pacsai.errors import PacsaiWarning

logger = logging.getLogger(__name__)

#: Written into (0002,0013) so that an object can be traced to the code that wrote it.
IMPLEMENTATION_VERSION_NAME = "PACSAI_0_1"

# : Used only where a source has no date at all (a type 1 date must still be filled; see
# :func:`content_datetime`).
FALLBACK_DATE = "19700101"
FALLBACK_TIME = "000000"

# Patient and General Study module attributes copied from the source so that a derived object lands in the
# patient's study. Type 2 attributes must be present even when empty (dciodvfy flags their absence).
_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OPTIONAL = ("PatientAge", "PatientIdentityRemoved", "DeidentificationMethod", "IssuerOfPatientID")
_STUDY_TYPE2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_STUDY_OPTIONAL = ("StudyDescription",)


_FIXED4 = "{:.4f}"
_FIXED4_LIMIT = 9.99995e9  # |v| below this: "{:.4f}" has at most 16 characters (sign, 10 digits, point, 4)


def format_ds(value: float) -> str:
    """Format a number as a DICOM decimal string (DS) of at most 16 characters.

    Parameters
    ----------
    value
        Any finite real number.

    Returns
    -------
    str
        Fixed-point with 4 decimals where that fits (0.1 µm for mm values: far below any voxel), fewer
        decimals for large numbers, scientific notation only for magnitudes that need it. ``-0`` is written
        as ``0`` so that re-runs on mirrored inputs stay byte-identical.

    Raises
    ------
    ValueError
        For NaN or infinity, which DS cannot represent.
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"a DICOM decimal string cannot hold {v!r}")
    for decimals in (4, 3, 2, 1, 0):
        text = f"{v:.{decimals}f}"
        if float(text) == 0.0:
            text = f"{0.0:.{decimals}f}"
        if len(text) <= 16:
            return text
    for digits in range(10, 0, -1):
        text = f"{v:.{digits}e}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot format {v!r} as a DICOM decimal string")  # pragma: no cover - unreachable


def format_ds_list(values: Iterable[float]) -> list[str]:
    """Format many numbers with :func:`format_ds` (e.g. ContourData, ImagePositionPatient)."""
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float).ravel()
    if array.size and np.all(np.isfinite(array)) and float(np.max(np.abs(array))) < _FIXED4_LIMIT:
        # The common case (mm coordinates): every value fits fixed-point with 4 decimals, which is what
        # format_ds returns for it; formatting the list in one comprehension is ~10× faster than per-value
        # calls. "-0.0000" is written "0.0000" as format_ds does, so the bytes are the same.
        return ["0.0000" if text == "-0.0000" else text for text in map(_FIXED4.format, array.tolist())]
    return [format_ds(v) for v in array]


def set_ds_fast(item: Dataset, keyword: str, values: Iterable[float]) -> None:
    """Set a multi-valued DS attribute from numbers without pydicom's per-value parsing.

    pydicom builds and validates one ``DSfloat`` per number (≈ 0.1 ms each), which makes the ContourData of a
    real structure set (10⁵–10⁶ numbers) take seconds to minutes. The values are formatted with
    :func:`format_ds` (valid DS, ≤ 16 characters) and stored as a raw Explicit VR Little Endian element that
    pydicom writes byte for byte; reading the attribute back (``item.ContourData``) still gives numbers.

    Parameters
    ----------
    item
        The dataset to modify; its original encoding is set to Explicit VR Little Endian (what
        :func:`finalize` writes) so that pydicom keeps the raw bytes when saving.
    keyword
        A DS attribute, e.g. ``"ContourData"``.
    values
        The numbers.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or dictionary_VR(tag) != "DS":
        raise ValueError(f"{keyword!r} is not a DS attribute")
    data = "\\".join(format_ds_list(values)).encode("ascii")
    if len(data) % 2:
        data += b" "  # DS values are padded to even length with a space
    item[tag] = RawDataElement(Tag(tag), "DS", len(data), data, 0, False, True)
    # pydicom writes raw elements as they are only when the dataset's original encoding and character set
    # match the output's; DS is plain ASCII, so declaring pydicom's default character set is exact.
    item.set_original_encoding(False, True, default_encoding)


def first_value(datasets: Sequence[Dataset], keyword: str, default: Any = None) -> Any:
    """The first non-empty value of ``keyword`` among ``datasets`` (one series' instances agree on it)."""
    for ds in datasets:
        value = ds.get(keyword)
        if value not in (None, ""):
            return value
    return default


def content_datetime(datasets: Sequence[Dataset], *, what: str = "object") -> tuple[str, str]:
    """A date and time for a derived object taken from its source, so that a re-run writes the same bytes.

    The first of SeriesDate/Time, StudyDate/Time, ContentDate/Time, AcquisitionDate/Time that is filled in.
    The clock is never read: a derived object that carried the current time would differ on every run.

    Parameters
    ----------
    datasets
        The source instances.
    what
        Names the object in the warning issued when no source date exists.

    Returns
    -------
    tuple[str, str]
        ``(YYYYMMDD, HHMMSS[.ffffff])``. Where no source has a date, :data:`FALLBACK_DATE` and
        :data:`FALLBACK_TIME` with a :class:`~pacsai.errors.PacsaiWarning`.
    """
    for date_kw, time_kw in (
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
    ):
        date = first_value(datasets, date_kw)
        if date:
            time = first_value(datasets, time_kw) or FALLBACK_TIME
            return str(date), _clean_time(str(time))
    warnings.warn(
        f"the source of this {what} has no date (SeriesDate, StudyDate, ContentDate, AcquisitionDate all "
        f"empty); writing {FALLBACK_DATE} {FALLBACK_TIME} so that re-runs stay identical",
        PacsaiWarning,
        stacklevel=2,
    )
    return FALLBACK_DATE, FALLBACK_TIME


def _clean_time(time: str) -> str:
    """Drop separators some writers put into TM values (``12:30:00`` is retired syntax)."""
    return time.replace(":", "").strip()


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and General Study modules from ``source`` into ``target`` (type 2 kept if empty).

    Parameters
    ----------
    source
        One instance of the source series.
    target
        The derived object being built; modified in place.
    """
    charset = source.get("SpecificCharacterSet")
    if charset:  # present-but-empty is a real-world trap (docs/dicom_notes.md): leave it out then
        target.SpecificCharacterSet = charset
    for keyword in _PATIENT_TYPE2 + _STUDY_TYPE2:
        value = source.get(keyword)
        setattr(target, keyword, value if value is not None else "")
    for keyword in _PATIENT_OPTIONAL + _STUDY_OPTIONAL:
        if source.get(keyword) not in (None, ""):
            setattr(target, keyword, source.get(keyword))
    target.StudyInstanceUID = source.StudyInstanceUID


def file_meta_for(ds: Dataset, *, transfer_syntax: str | UID = ExplicitVRLittleEndian) -> FileMetaDataset:
    """The Part-10 file meta information of ``ds`` (SOP class and instance from the dataset itself).

    Parameters
    ----------
    ds
        A dataset with SOPClassUID and SOPInstanceUID set.
    transfer_syntax
        Explicit VR Little Endian unless a caller needs another one.
    """
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(str(transfer_syntax))
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def finalize(ds: Dataset, *, transfer_syntax: str | UID | None = None) -> Dataset:
    """Make ``ds`` a complete Part-10 dataset: file meta, preamble, and the encoding that matches it.

    Parameters
    ----------
    ds
        The dataset; modified in place and returned.
    transfer_syntax
        Defaults to the dataset's existing file meta transfer syntax, else Explicit VR Little Endian.
    """
    if transfer_syntax is None:
        existing = getattr(ds, "file_meta", None)
        transfer_syntax = existing.get("TransferSyntaxUID") if existing is not None else None
        transfer_syntax = transfer_syntax or ExplicitVRLittleEndian
    ds.file_meta = file_meta_for(ds, transfer_syntax=transfer_syntax)
    ds.preamble = b"\x00" * 128
    ts = UID(str(transfer_syntax))
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The Part-10 file bytes of ``ds`` (what :func:`save` writes): use it to compare re-runs."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def save(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a Part-10 file and return the path."""
    path = Path(path)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def masks_digest(masks: Mapping[str, Any]) -> str:
    """A SHA-256 over the names, shapes, affines and voxels of ``{name: mask}``: the content part of a UID.

    Bit-packed voxels are hashed, so any changed voxel, name, order or grid gives a different digest.
    """
    digest = hashlib.sha256()
    for name, mask in masks.items():
        array = np.asarray(getattr(mask, "values", mask)).astype(bool, copy=False)
        digest.update(name.encode("utf-8") + b"\x00")
        digest.update(repr(array.shape).encode())
        affine = getattr(mask, "attrs", {}).get("affine")
        if affine is not None:
            digest.update(np.round(np.asarray(affine, dtype=float), 6).tobytes())
        digest.update(np.packbits(array, axis=None).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceFrame:
    """One slice of a source series: a single-frame instance, or one frame of a multi-frame instance."""

    dataset: Dataset
    frame_number: int | None  # 1-based; None for a single-frame instance

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    def reference(self) -> Dataset:
        """An image reference item (Referenced SOP Class/Instance UID, ReferencedFrameNumber)."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            item.ReferencedFrameNumber = self.frame_number
        return item


def _planes(
    ds: Dataset, name: str, what: str
) -> list[tuple[int | None, np.ndarray, np.ndarray, float, float]]:
    """(frame number, IPP, IOP, row spacing, column spacing) of each frame of a single/multi-frame image."""
    from pacsai.errors import StructureError

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if n_frames > 1 or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise StructureError(
                f"{what}: source {name} has no ImagePositionPatient/ImageOrientationPatient per frame; it "
                "cannot be matched to the masks' grid"
            )
        if "PixelSpacing" not in ds:
            raise StructureError(f"{what}: source {name} has no PixelSpacing")
        row, col = (float(v) for v in ds.PixelSpacing)
        return [
            (
                None,
                np.asarray(ds.ImagePositionPatient, float),
                np.asarray(ds.ImageOrientationPatient, float),
                row,
                col,
            )
        ]

    def group(f: int, keyword: str) -> Dataset:
        for source in (per_frame[f] if f < len(per_frame) else Dataset(), shared):
            if keyword in source and source[keyword].value:
                return source[keyword][0]
        raise StructureError(f"{what}: frame {f + 1} of source {name} has no {keyword}")

    planes: list[tuple[int | None, np.ndarray, np.ndarray, float, float]] = []
    for f in range(n_frames):
        row, col = (float(v) for v in group(f, "PixelMeasuresSequence").PixelSpacing)
        planes.append(
            (
                f + 1,
                np.asarray(group(f, "PlanePositionSequence").ImagePositionPatient, float),
                np.asarray(group(f, "PlaneOrientationSequence").ImageOrientationPatient, float),
                row,
                col,
            )
        )
    return planes


def source_frames(
    datasets: Sequence[Dataset], grid: Any, *, what: str = "object", tolerance: float = 0.05
) -> list[SourceFrame]:
    """The source frame of every slice ``k`` of ``grid``, matched by patient position.

    A derived object must reference the image each of its frames or contours lies on; matching by
    ImagePositionPatient against the grid's affine (rather than trusting file order) also proves that the
    masks really are on the grid of ``source``. Works for single-frame series and for one enhanced multi-frame
    image.

    Parameters
    ----------
    datasets
        The source image instances (headers suffice).
    grid
        A pacsai volume (``attrs["affine"]``, dims z, y, x): the masks' grid.
    what
        Names the object being written in error messages.
    tolerance
        Largest distance, in voxels, of a source frame's position from a grid slice.

    Returns
    -------
    list of SourceFrame
        ``result[k]`` is the source frame at slice ``k``.

    Raises
    ------
    StructureError
        When a source instance lacks the UIDs a reference needs, has another size, orientation or pixel
        spacing than the grid, or when the grid's slices and the source's frames do not correspond one to one.
    """
    from pacsai.errors import StructureError
    from pacsai.imaging.geometry import world_to_index

    affine = grid.geo.affine
    n_slices, n_rows, n_cols = grid.shape
    found: dict[int, SourceFrame] = {}
    for ds in datasets:
        name = getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "?")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise StructureError(
                    f"{what}: source {name} has no {keyword}; a derived object must reference its source by "
                    "UID. Assign UIDs to the source series first (e.g. pacsai.uids.derive_uid) and store it"
                )
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (n_rows, n_cols):
            raise StructureError(
                f"{what}: source {name} is {ds.get('Rows')}x{ds.get('Columns')} pixels but the masks are "
                f"{n_rows}x{n_cols}; masks must be on the grid of the source series (read it with "
                "read_series)"
            )
        for frame_number, ipp, iop, row_spacing, col_spacing in _planes(ds, name, what):
            label = name if frame_number is None else f"{name} frame {frame_number}"
            # The voxel one column / one row further must be one index further along i / j of the grid.
            corners = np.stack([ipp, ipp + col_spacing * iop[:3], ipp + row_spacing * iop[3:]])
            ijk = world_to_index(affine, corners)
            expected = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
            k = ijk[0, 2]
            if (
                np.abs(ijk[:, :2] - expected).max() > tolerance
                or np.abs(ijk[:, 2] - k).max() > tolerance
                or abs(k - round(k)) > tolerance
            ):
                raise StructureError(
                    f"{what}: source {label} does not lie on a slice of the masks' grid (its first voxel "
                    "maps to "
                    f"index (i, j, k) = {np.round(ijk[0], 3).tolist()}); masks must be on the grid of the "
                    "source"
                )
            index = int(round(k))
            if not 0 <= index < n_slices:
                raise StructureError(
                    f"{what}: source {label} lies at slice {index}, outside the masks' {n_slices} slices"
                )
            if index in found:
                raise StructureError(
                    f"{what}: source {label} and {found[index].sop_instance_uid} both lie at slice {index}; "
                    "pass exactly one image series"
                )
            found[index] = SourceFrame(ds, frame_number)
    missing = [k for k in range(n_slices) if k not in found]
    if missing:
        raise StructureError(
            f"{what}: no source instance for slice(s) {missing[:10]} of the masks' grid; pass every instance "
            "of the source series"
        )
    series = {str(f.dataset.SeriesInstanceUID) for f in found.values()}
    if len(series) > 1:
        raise StructureError(
            f"{what}: the source instances belong to several series {sorted(series)}; pass one"
        )
    return [found[k] for k in range(n_slices)]
