"""Image series → geometry-exact volumes, and conversions to SimpleITK and MONAI.

:func:`read_series` assembles one single-frame series or one enhanced multi-frame object into a volume that
follows :mod:`pacsai.imaging.geometry`: dims ``("z", "y", "x")``, k increasing along the slice normal
``n = row_dir × col_dir`` whatever the file order or patient position, spacing between slices from the
positions (never from SliceThickness). Anything that is not a regular volume raises
:class:`pacsai.errors.VolumeError` unless the caller opts in (``tolerance=``, ``resample=True``), and the opt-in
is recorded in ``attrs["geometry_note"]``.

Pixel padding (PixelPaddingValue, e.g. CT outside the reconstruction circle) is kept as the rescaled value by
default, as SimpleITK does, and reported in ``attrs["pixel_padding_value"]``; ``padding="nan"`` or a number
replaces it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydicom
import xarray as xr
from pydicom.dataelem import RawDataElement

from pacsai.errors import DicomFileError, PacsaiWarning, VolumeError
from pacsai.imaging.dicomio import (
    Source,
    as_floats,
    check_pixel_data,
    decode_pixels,
    describe,
    expand_source,
    expected_pixel_bytes,
    read_file,
    transfer_syntax,
)
from pacsai.imaging.dicomio import value as get_value
from pacsai.imaging.geometry import affine_from, decompose, make_volume
from pacsai.uids import derive_uid

if TYPE_CHECKING:
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE_MM = 0.05
"""Default slack (mm) for slice positions against a regular grid along the normal, and for in-plane drift."""

_NON_IMAGE_MODALITIES = {
    "RTSTRUCT": "read it with pacsai.imaging.read_rtstruct",
    "RTDOSE": "read it with pacsai.imaging.read_dose",
    "SEG": "read it with pacsai.imaging.read_seg",
    "RTPLAN": "it holds no image",
    "RTRECORD": "it holds no image",
    "SR": "it holds no image",
    "PR": "it holds no image",
    "KO": "it holds no image",
    "REG": "it holds no image",
    "DOC": "it holds no image",
}
_SPLIT_HINT_KEYWORDS = (
    "AcquisitionNumber",
    "TemporalPositionIdentifier",
    "EchoNumbers",
    "EchoTime",
    "TriggerTime",
    "ImageType",
    "SeriesNumber",
)
_DEFER = 64 * 1024  # values larger than this (the pixel data) are read only when needed


@dataclass(frozen=True)
class _Frame:
    """One 2-D frame of the series with its geometry and value transform."""

    ds_index: int
    frame_index: int  # 0-based within its dataset
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing Δj, column spacing Δi), as DICOM orders it
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass(frozen=True)
class _Layout:
    """The regular grid the sorted frames form."""

    order: np.ndarray  # frame indices in slice (k) order
    affine: np.ndarray
    depths: np.ndarray  # positions of the sorted frames along n, mm
    max_deviation: float  # worst distance of a frame from its regular-grid place, mm
    irregular: bool  # gaps or in-plane drift beyond the default tolerance
    note: str


def read_series(
    source: Source,
    *,
    tolerance: float | None = None,
    resample: bool = False,
    padding: Literal["keep", "nan"] | float = "keep",
    workers: int | None = None,
) -> xr.DataArray:
    """Read one image series (single-frame files or one enhanced multi-frame object) into a volume.

    Parameters
    ----------
    source
        A folder, a list of paths, or a list of pydicom datasets of **one** series.
    tolerance
        Slack in mm for slice positions against a regular grid along the slice normal and for in-plane drift
        (default 0.05 mm). A larger value accepts an irregular stack *as if* regular; the worst deviation is
        recorded in ``attrs["geometry_note"]``.
    resample
        Resample an irregular (missing slice, uneven gaps) or tilted stack onto a regular orthogonal grid
        (linear along the normal, bilinear in plane; voxels outside the acquired field get the series minimum).
        Recorded in ``attrs["geometry_note"]``.
    padding
        ``"keep"`` (default) keeps PixelPaddingValue voxels as their rescaled value (as SimpleITK does);
        ``"nan"`` sets them to NaN (float output); a number replaces them by that value.
    workers
        Threads for reading and decoding pixel data (default: up to 4).

    Returns
    -------
    xarray.DataArray
        Dims ``("z", "y", "x")``; values in modality units (rescale applied: float32 where a rescale other than
        identity is present, the stored integer type otherwise). Attrs: ``affine``, ``spacing``, ``direction``,
        ``origin``, ``modality``, ``units``, ``frame_of_reference_uid``, ``series_instance_uid``,
        ``study_instance_uid``, ``patient_id``, ``sop_instance_uids`` and ``frame_numbers`` (slice order),
        ``source_files``, ``slice_thickness``, ``pixel_padding_value``, ``derived_uids``, ``geometry_note``.
        With ``resample=True`` on an irregular stack, ``sop_instance_uids``/``frame_numbers``/``source_files``
        list the *source* slices in depth order (the output slices are interpolated).

    Raises
    ------
    VolumeError
        Not a regular volume: gantry tilt, missing slice, several slices at one position, mixed orientation /
        pixel spacing / matrix size, several series, non-image objects.
    DicomFileError
        A file is not DICOM, truncated or cannot be decoded.
    """
    if tolerance is not None and tolerance < 0:
        raise VolumeError(f"tolerance must be ≥ 0 mm, got {tolerance}")
    datasets = _load_headers(source)
    _refuse_non_images(datasets)
    _refuse_mixed_series(datasets)
    frames = [f for i, ds in enumerate(datasets) for f in _frames_of(ds, i)]
    _refuse_mixed_geometry(frames, datasets)
    layout = _layout(frames, datasets, tolerance=tolerance, resample=resample)
    raw = _read_frames(datasets, frames, layout.order, workers=workers)
    values = _rescale(raw, [frames[i] for i in layout.order])
    values, padding_value = _apply_padding(values, raw, datasets[0], frames[layout.order[0]], padding)
    del raw
    affine = layout.affine
    note = layout.note
    if layout.irregular and resample:
        values, affine, note = _resample_stack(values, [frames[i] for i in layout.order], layout)
    elif resample:
        note = "; ".join(filter(None, [note, "resample=True not needed: the stack is regular"]))
    attrs = _attrs(datasets, frames, layout, padding_value=padding_value, note=note)
    return make_volume(values, affine, name=attrs["modality"] or None, attrs=attrs)


# --------------------------------------------------------------------------------------------- headers
def _load_headers(source: Source) -> list[pydicom.Dataset]:
    items = expand_source(source)
    out = []
    for item in items:
        if isinstance(item, pydicom.Dataset):
            out.append(item)
        else:
            # Deferred pixel data: the header is parsed now, pixels are read straight into the volume later.
            out.append(read_file(item, defer_size=_DEFER))
    return out


def _refuse_non_images(datasets: Sequence[pydicom.Dataset]) -> None:
    for ds in datasets:
        modality = str(_fast(ds, "Modality") or "").upper()
        if modality in _NON_IMAGE_MODALITIES:
            raise VolumeError(
                f"{describe(ds)} is a {modality} object, not an image: {_NON_IMAGE_MODALITIES[modality]}; "
                "pass only the image series' files to read_series"
            )
        if "PixelData" not in ds or "Rows" not in ds:
            raise VolumeError(
                f"{describe(ds)} (modality {modality or 'unknown'}) has no pixel data; pass only image files"
            )
        if int(_fast(ds, "SamplesPerPixel") or 1) != 1:
            raise VolumeError(
                f"{describe(ds)} is a colour image ({ds.get('PhotometricInterpretation')}); read_series reads "
                "greyscale volumes only"
            )


def _refuse_mixed_series(datasets: Sequence[pydicom.Dataset]) -> None:
    groups: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        groups.setdefault(str(_fast(ds, "SeriesInstanceUID") or ""), []).append(ds)
    if len(groups) > 1:
        # Name a file of each group: with an empty or corrupt UID, the UID alone does not say which file.
        parts = [
            f"{uid or '<empty>'} ({len(items)} file(s) such as {describe(items[0])}, "
            f"{get_value(items[0], 'Modality', '?')}, {get_value(items[0], 'SeriesDescription', '')!s})"
            for uid, items in groups.items()
        ]
        raise VolumeError(
            f"the source mixes {len(groups)} series: {'; '.join(parts)}; pass the files of one series "
            "(group them by SeriesInstanceUID)"
        )
    multiframe = [ds for ds in datasets if _is_multiframe(ds)]
    if multiframe and len(datasets) > 1:
        raise VolumeError(
            f"the source mixes {len(multiframe)} multi-frame object(s) with {len(datasets) - len(multiframe)} "
            f"other file(s) ({describe(multiframe[0])}, ...); pass one enhanced multi-frame object or only "
            "single-frame files"
        )


def _is_multiframe(ds: pydicom.Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(_fast(ds, "NumberOfFrames") or 1) > 1


def _frames_of(ds: pydicom.Dataset, ds_index: int) -> list[_Frame]:
    if not _is_multiframe(ds):
        return [_single_frame(ds, ds_index)]
    nframes = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if shared_seq else pydicom.Dataset()
    if len(per_frame) != nframes:
        raise VolumeError(
            f"{describe(ds)}: NumberOfFrames is {nframes} but PerFrameFunctionalGroupsSequence has "
            f"{len(per_frame)} items, so the frames' PlanePosition/PlaneOrientation are unknown; this object cannot "
            "be a volume"
        )
    frames = []
    for index, item in enumerate(per_frame):

        def group(keyword: str, item: pydicom.Dataset = item) -> pydicom.Dataset | None:
            # A functional group sits either in the frame's item or in the shared item (PS3.3 C.7.6.16).
            for holder in (item, shared):
                seq = holder.get(keyword)
                if seq:
                    return seq[0]
            return None

        position = group("PlanePositionSequence")
        orientation = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        if position is None or orientation is None or measures is None or "PixelSpacing" not in measures:
            raise VolumeError(
                f"{describe(ds)}: frame {index + 1} lacks PlanePosition/PlaneOrientation/PixelMeasures "
                "functional groups, so its place in the patient is unknown; this object cannot be a volume"
            )
        transform = group("PixelValueTransformationSequence")
        slope, intercept = _rescale_of(transform if transform is not None else ds, ds)
        rows, columns = _matrix(ds)
        frames.append(
            _Frame(
                ds_index=ds_index,
                frame_index=index,
                position=_floats(position.ImagePositionPatient, 3, ds, "ImagePositionPatient"),
                orientation=_floats(orientation.ImageOrientationPatient, 6, ds, "ImageOrientationPatient"),
                pixel_spacing=_pair(_floats(measures.PixelSpacing, 2, ds, "PixelSpacing")),
                rows=rows,
                columns=columns,
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _single_frame(ds: pydicom.Dataset, ds_index: int) -> _Frame:
    values = {k: _fast(ds, k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")}
    for keyword, value in values.items():
        if value is None:
            raise VolumeError(
                f"{describe(ds)} has no {keyword}, so its place in the patient is unknown (a secondary capture "
                "or a projection image?); read_series needs cross-sectional images"
            )
    slope, intercept = _rescale_of(ds, ds)
    return _Frame(
        ds_index=ds_index,
        frame_index=0,
        position=_floats(values["ImagePositionPatient"], 3, ds, "ImagePositionPatient"),
        orientation=_floats(values["ImageOrientationPatient"], 6, ds, "ImageOrientationPatient"),
        pixel_spacing=_pair(_floats(values["PixelSpacing"], 2, ds, "PixelSpacing")),
        rows=_matrix(ds)[0],
        columns=_matrix(ds)[1],
        slope=slope,
        intercept=intercept,
    )


def _rescale_of(holder: pydicom.Dataset, ds: pydicom.Dataset) -> tuple[float, float]:
    """(slope, intercept) of ``holder`` (the dataset or a frame's transformation item of ``ds``)."""
    out = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = _fast(holder, keyword)
        try:
            number = default if raw in (None, "") else float(raw)
        except (TypeError, ValueError) as err:
            raise VolumeError(f"{describe(ds)}: {keyword} {raw!r} is not a number; the file is corrupt") from err
        if not np.isfinite(number) or (keyword == "RescaleSlope" and number == 0):
            # NaN/inf would fill the volume with NaN; a zero slope flattens it: both are corrupt headers.
            raise VolumeError(f"{describe(ds)}: {keyword} is {raw!r}; the file is corrupt")
        out.append(number)
    return out[0], out[1]


_FAST_VR = {
    "Modality": "CS",
    "SeriesInstanceUID": "UI",
    "SOPInstanceUID": "UI",
    "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS",
    "PixelSpacing": "DS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "NumberOfFrames": "IS",
    "Rows": "US",
    "Columns": "US",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "PixelRepresentation": "US",
    "SamplesPerPixel": "US",
}
_FAST_TAGS = {keyword: pydicom.tag.Tag(keyword) for keyword in _FAST_VR}


def _fast(ds: pydicom.Dataset, keyword: str) -> Any:
    """The value of one of the header attributes read per file, or None where absent or empty.

    pydicom's attribute access costs ~0.1 ms per element (conversion, hooks); decoding the few raw byte strings
    read_series needs directly is what makes it faster than SimpleITK on a 100-file series. Anything unusual
    (big endian, an unexpected VR or length, an already converted element) takes pydicom's own path.
    """
    elem = ds._dict.get(_FAST_TAGS[keyword])  # raw, unconverted elements
    if elem is None:
        return None
    vr = _FAST_VR[keyword]
    raw = elem.value if isinstance(elem, RawDataElement) else None
    little = ds.original_encoding[1] if isinstance(elem, RawDataElement) else None
    if isinstance(raw, bytes) and little and elem.VR in (None, vr):
        try:
            if vr == "US":
                if len(raw) == 2:
                    return int.from_bytes(raw, "little")
            else:
                text = raw.decode("ascii").strip(" \x00")
                if not text:
                    return None
                if vr == "DS":
                    numbers = [float(part) for part in text.split("\\")]
                    return numbers if len(numbers) > 1 else numbers[0]
                if vr == "IS":
                    return int(text)
                return text
        except (UnicodeDecodeError, ValueError):
            pass  # let pydicom decide (and complain) below
    return get_value(ds, keyword)


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _floats(value: Any, n: int, ds: pydicom.Dataset, keyword: str) -> np.ndarray:
    return as_floats(value, n, ds=ds, keyword=keyword, error=VolumeError, positive=keyword == "PixelSpacing")


def _matrix(ds: pydicom.Dataset) -> tuple[int, int]:
    """(Rows, Columns), both ≥ 1."""
    rows, cols = (_fast(ds, k) for k in ("Rows", "Columns"))
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise VolumeError(f"{describe(ds)}: Rows {rows!r} × Columns {cols!r} is not an image matrix")
    return rows, cols


# --------------------------------------------------------------------------------------------- geometry
def _refuse_mixed_geometry(frames: Sequence[_Frame], datasets: Sequence[pydicom.Dataset]) -> None:
    first = frames[0]

    def name(frame: _Frame) -> str:
        ds = datasets[frame.ds_index]
        return describe(ds) if len(datasets) > 1 else f"{describe(ds)} frame {frame.frame_index + 1}"

    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=1e-4):
            raise VolumeError(
                f"mixed orientations in one series: {name(first)} has ImageOrientationPatient "
                f"{_fmt(first.orientation)} but {name(frame)} has {_fmt(frame.orientation)}; pass the files of "
                "one orientation (e.g. group them by ImageOrientationPatient)"
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=0, atol=1e-4):
            raise VolumeError(
                f"mixed pixel spacings in one series: {name(first)} has PixelSpacing {first.pixel_spacing} but "
                f"{name(frame)} has {frame.pixel_spacing}; pass the files of one acquisition"
            )
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise VolumeError(
                f"mixed matrix sizes in one series: {name(first)} is {first.rows}×{first.columns} but "
                f"{name(frame)} is {frame.rows}×{frame.columns}; pass the files of one acquisition"
            )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise VolumeError(
            f"{name(first)}: ImageOrientationPatient {_fmt(first.orientation)} is not two orthogonal unit vectors"
        )


def _layout(
    frames: Sequence[_Frame],
    datasets: Sequence[pydicom.Dataset],
    *,
    tolerance: float | None,
    resample: bool,
) -> _Layout:
    first = frames[0]
    # Re-orthonormalise: IOP is written with a few decimals; the affine must be a rotation for ITK/MONAI.
    row_dir = first.orientation[:3] / np.linalg.norm(first.orientation[:3])
    col_dir = first.orientation[3:] - (first.orientation[3:] @ row_dir) * row_dir
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([f.position for f in frames])
    depths = positions @ normal
    order = np.argsort(depths, kind="stable")
    depths = depths[order]
    positions = positions[order]
    dy, dx = first.pixel_spacing  # DICOM PixelSpacing is (row spacing, column spacing)
    tol = DEFAULT_TOLERANCE_MM if tolerance is None else float(tolerance)
    names = [_frame_name(frames[i], datasets) for i in order]
    n = len(frames)

    if n == 1:
        ds = datasets[first.ds_index]
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        step = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else 1.0
        note = f"single slice: slice spacing {step:g} mm taken from SpacingBetweenSlices/SliceThickness (or 1 mm)"
        warnings.warn(f"{describe(ds)}: {note}", PacsaiWarning, stacklevel=3)
        direction = np.column_stack([row_dir, col_dir, normal])
        affine = affine_from(positions[0], direction, (dx, dy, step))
        return _Layout(order, affine, depths, 0.0, False, note)

    gaps = np.diff(depths)
    # Fixed threshold, not `tol`: a generous tolerance must not turn a thin-slice series into "duplicates".
    duplicate = np.flatnonzero(gaps < DEFAULT_TOLERANCE_MM)
    if duplicate.size:
        a, b = order[duplicate[0]], order[duplicate[0] + 1]
        raise VolumeError(
            f"several slices at one position: {names[duplicate[0]]} and {names[duplicate[0] + 1]} (and "
            f"{duplicate.size - 1} more pair(s)) lie {gaps[duplicate[0]]:.3f} mm apart along the slice normal; "
            f"the series holds several volumes (phases, echoes, repeats) or is not a volume"
            f"{_split_hint(frames[a], frames[b], datasets)}; pass the files of one volume"
        )
    step = (depths[-1] - depths[0]) / (n - 1)
    along = depths[0] + step * np.arange(n)
    depth_dev = np.abs(depths - along)
    in_plane = (positions - positions[0]) - np.outer(depths - depths[0], normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst_depth = float(depth_dev.max())
    worst_drift = float(drift.max())
    direction = np.column_stack([row_dir, col_dir, normal])
    affine = affine_from(positions[0], direction, (dx, dy, step))
    irregular = worst_depth > tol or worst_drift > tol
    if not irregular:
        note = ""
        if tolerance is not None and max(worst_depth, worst_drift) > DEFAULT_TOLERANCE_MM:
            note = (
                f"accepted as regular with tolerance={tolerance:g} mm: slices deviate up to "
                f"{worst_depth:.3f} mm along the normal and drift up to {worst_drift:.3f} mm in plane"
            )
        return _Layout(order, affine, depths, max(worst_depth, worst_drift), False, note)
    if resample:
        return _Layout(order, affine, depths, max(worst_depth, worst_drift), True, "")
    if worst_drift > tol:
        k = int(np.argmax(drift))
        tilt = float(np.degrees(np.arctan2(drift[k], abs(depths[k] - depths[0]))))
        raise VolumeError(
            f"gantry tilt / sheared stack: slice positions drift {worst_drift:.2f} mm in plane ({names[k]} vs "
            f"{names[0]}; about {tilt:.1f}° from the slice normal), so the slices do not stack along the normal "
            f"of ImageOrientationPatient {_fmt(first.orientation)}; pass resample=True to resample onto a "
            "regular orthogonal grid (recorded in attrs['geometry_note'])"
        )
    gap_text = ", ".join(f"{g:g}" for g in np.round(gaps, 3)[:12]) + (" ..." if gaps.size > 12 else "")
    big = int(np.argmax(gaps))
    raise VolumeError(
        f"irregular slice spacing: gaps along the slice normal are {gap_text} mm (up to {worst_depth:.3f} mm off "
        f"a regular grid, tolerance {tol:g} mm); the largest gap is between {names[big]} and {names[big + 1]} "
        "(a missing slice?); pass resample=True to interpolate onto a regular grid, or tolerance=<mm> to accept "
        "the deviation (both recorded in attrs['geometry_note'])"
    )


def _frame_name(frame: _Frame, datasets: Sequence[pydicom.Dataset]) -> str:
    ds = datasets[frame.ds_index]
    if _is_multiframe(ds):
        return f"{describe(ds)} frame {frame.frame_index + 1}"
    return os.path.basename(describe(ds)) if getattr(ds, "filename", None) else describe(ds)


def _split_hint(a: _Frame, b: _Frame, datasets: Sequence[pydicom.Dataset]) -> str:
    da, db = datasets[a.ds_index], datasets[b.ds_index]
    if da is db:
        return ""
    differ = [k for k in _SPLIT_HINT_KEYWORDS if da.get(k) != db.get(k)]
    if not differ:
        return " (no attribute tells them apart: the files may be duplicates or a localizer set)"
    return f" (they differ in {', '.join(differ)}: group the files by it)"


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# --------------------------------------------------------------------------------------------- pixels
def _pixel_dtype(ds: pydicom.Dataset) -> np.dtype:
    bits = _fast(ds, "BitsAllocated")
    if not isinstance(bits, int):
        raise DicomFileError(f"{describe(ds)}: BitsAllocated is {bits!r}; the pixel format is unknown (corrupt file)")
    if bits not in (8, 16, 32):
        raise DicomFileError(f"{describe(ds)}: BitsAllocated {bits} is not supported for image volumes")
    signed = int(_fast(ds, "PixelRepresentation") or 0) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _is_native_le(ds: pydicom.Dataset) -> bool:
    tsyntax = transfer_syntax(ds)
    if tsyntax is None:  # in-memory dataset without file meta: trust its own flag
        return bool(getattr(ds, "is_little_endian", True)) and "PixelData" in ds
    return (
        (not tsyntax.is_compressed)
        and tsyntax.is_little_endian
        and tsyntax != pydicom.uid.DeflatedExplicitVRLittleEndian
    )


def _read_frames(
    datasets: Sequence[pydicom.Dataset], frames: Sequence[_Frame], order: np.ndarray, *, workers: int | None
) -> np.ndarray:
    """Stored values of every frame, in slice order, as one ``(k, rows, columns)`` array."""
    first = datasets[frames[0].ds_index]
    dtype = _pixel_dtype(first)
    for ds in datasets[1:]:
        if _pixel_dtype(ds) != dtype or _fast(ds, "BitsStored") != _fast(first, "BitsStored"):
            raise VolumeError(
                f"mixed pixel formats in one series: {describe(first)} and {describe(ds)} differ in BitsAllocated/"
                "BitsStored/PixelRepresentation; pass the files of one acquisition"
            )
    for ds in datasets:
        if _is_native_le(ds):
            expected_pixel_bytes(ds)  # refuses zero/garbage NumberOfFrames, SamplesPerPixel, Rows (DicomFileError)
    rows, cols = frames[0].rows, frames[0].columns
    out = np.empty((len(order), rows, cols), dtype=dtype)
    if len(datasets) == 1:  # one (multi-frame or single) object: decode once, pick frames
        data = _all_frames(datasets[0], dtype).reshape(-1, rows, cols)
        out[:] = data[[frames[i].frame_index for i in order]]
        return out

    def fill(k: int) -> None:
        ds = datasets[frames[order[k]].ds_index]
        if _is_native_le(ds) and _read_native_into(ds, out[k]):
            return
        out[k] = _all_frames(ds, dtype).reshape(rows, cols)

    compressed = any(not _is_native_le(datasets[f.ds_index]) for f in frames)
    # Native reads are a memcpy from the page cache: threads only add overhead. Decoders (J2K, JPEG) release
    # the GIL, so compressed series are decoded in a pool.
    n_workers = workers or (min(4, os.cpu_count() or 1) if compressed else 1)
    if n_workers <= 1:
        for k in range(len(order)):
            fill(k)
    else:
        # File reads and most decoders release the GIL; the pool overlaps I/O and decoding.
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            list(pool.map(fill, range(len(order))))
    _correct_unused_bits(out, first)
    return out


def _read_native_into(ds: pydicom.Dataset, target: np.ndarray) -> bool:
    """Read a deferred native PixelData value straight from the file into ``target`` (False: not deferred)."""
    elem = ds._dict.get(pydicom.tag.Tag("PixelData"))  # the deferred raw element holds the offset
    filename = getattr(ds, "filename", None)
    if (
        not isinstance(elem, RawDataElement)
        or elem.value is not None
        or not isinstance(filename, (str, os.PathLike))
    ):
        return False
    need = target.nbytes
    if elem.length < need:
        raise DicomFileError(
            f"{filename}: PixelData has {elem.length} bytes but Rows×Columns×BitsAllocated needs {need}; the file "
            "is truncated or its group 0028 attributes are wrong: fetch it again from the PACS"
        )
    with open(filename, "rb") as fh:
        fh.seek(elem.value_tell)
        got = fh.readinto(target.data.cast("B"))  # target.data: the array's own buffer (memoryview)
    if got != need:
        raise DicomFileError(f"{filename} is truncated: PixelData ends after {got} of {need} bytes")
    return True


def _all_frames(ds: pydicom.Dataset, dtype: np.dtype) -> np.ndarray:
    """Every frame of one dataset as a flat-frames array of ``dtype``."""
    if _is_native_le(ds):
        check_pixel_data(ds)
        raw = get_value(ds, "PixelData")
        if not isinstance(raw, (bytes, bytearray)):  # a corrupt VR (e.g. UR) makes pydicom decode it as text
            raise DicomFileError(
                f"{describe(ds)}: PixelData is not binary (VR {ds['PixelData'].VR}); the file is corrupt: fetch it "
                "again from the PACS"
            )
        count = expected_pixel_bytes(ds) // dtype.itemsize
        return np.frombuffer(raw, dtype=dtype, count=count).copy()
    arr = decode_pixels(ds)
    return np.asarray(arr).astype(dtype, copy=False)


def _correct_unused_bits(out: np.ndarray, ds: pydicom.Dataset) -> None:
    """Mask (unsigned) or sign-extend (signed) bits above BitsStored, as pydicom and GDCM do."""
    stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    shift = out.dtype.itemsize * 8 - stored
    if shift > 0:
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)


def _rescale(raw: np.ndarray, frames: Sequence[_Frame]) -> np.ndarray:
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    if np.all(slopes == 1.0) and np.all(intercepts == 0.0):
        return raw
    out = np.empty(raw.shape, dtype=np.float32)
    if np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0]):
        # One pass where possible (slope 1: the usual CT), straight into the float32 result.
        if slopes[0] == 1.0:
            np.add(raw, np.float32(intercepts[0]), out=out, dtype=np.float32)
        else:
            np.multiply(raw, np.float32(slopes[0]), out=out, dtype=np.float32)
            out += np.float32(intercepts[0])
        return out
    out[...] = raw
    out *= slopes.astype(np.float32)[:, None, None]  # per-frame rescale (enhanced objects, some PET)
    out += intercepts.astype(np.float32)[:, None, None]
    return out


def _apply_padding(
    values: np.ndarray,
    raw: np.ndarray,
    ds: pydicom.Dataset,
    frame: _Frame,
    padding: Literal["keep", "nan"] | float,
) -> tuple[np.ndarray, float | None]:
    pad = ds.get("PixelPaddingValue")
    if pad is None or pad == "":
        return values, None
    pad_value = int(pad)
    rescaled = float(pad_value * frame.slope + frame.intercept)
    if isinstance(padding, str) and padding == "keep":
        return values, rescaled
    limit = ds.get("PixelPaddingRangeLimit")
    # Wrap through int64: a signed image's padding may be written unsigned (63536 for −2000) and vice versa.
    stored = int(np.array(pad_value, dtype=np.int64).astype(raw.dtype))
    if limit is None or limit == "":
        mask = raw == stored
    else:
        bound = int(np.array(int(limit), dtype=np.int64).astype(raw.dtype))
        lo, hi = min(stored, bound), max(stored, bound)
        mask = (raw >= lo) & (raw <= hi)
    if isinstance(padding, str):
        if padding != "nan":
            raise VolumeError(f"padding must be 'keep', 'nan' or a number, got {padding!r}")
        values = values.astype(np.float32, copy=False)
        values[mask] = np.nan
    else:
        if not np.can_cast(np.min_scalar_type(padding), values.dtype) and values.dtype.kind in "iu":
            values = values.astype(np.float32)
        values[mask] = padding
    return values, rescaled


# --------------------------------------------------------------------------------------------- resampling
def _resample_stack(
    values: np.ndarray, frames: Sequence[_Frame], layout: _Layout
) -> tuple[np.ndarray, np.ndarray, str]:
    """Resample a sheared or unevenly spaced stack onto a regular orthogonal grid through its first slice."""
    from scipy import ndimage

    origin, direction, spacing = decompose(layout.affine)
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    dx, dy = spacing[0], spacing[1]
    depths = layout.depths
    gaps = np.diff(depths)
    step = float(np.median(gaps))
    n_out = int(np.floor((depths[-1] - depths[0]) / step + 1e-6)) + 1
    targets = depths[0] + step * np.arange(n_out)
    fill = float(np.nanmin(values))
    positions = np.array([f.position for f in frames])
    # In-plane offset (in pixels) of each source slice relative to the first one.
    offsets = positions - positions[0]
    shift_i = -(offsets @ row_dir) / dx
    shift_j = -(offsets @ col_dir) / dy
    src = values.astype(np.float32, copy=False)
    out = np.empty((n_out, values.shape[1], values.shape[2]), dtype=np.float32)

    def plane(index: int) -> np.ndarray:
        if abs(shift_i[index]) < 1e-6 and abs(shift_j[index]) < 1e-6:
            return src[index]
        # Sample slice `index` on the first slice's in-plane grid (a pure translation within the plane).
        return ndimage.shift(
            src[index], (-shift_j[index], -shift_i[index]), order=1, mode="constant", cval=fill
        )

    for k, t in enumerate(targets):
        b = int(np.clip(np.searchsorted(depths, t, side="right"), 1, len(depths) - 1))
        a = b - 1
        w = float(np.clip((t - depths[a]) / (depths[b] - depths[a]), 0.0, 1.0))
        if w < 1e-6:
            out[k] = plane(a)
        elif w > 1 - 1e-6:
            out[k] = plane(b)
        else:
            out[k] = (1 - w) * plane(a) + w * plane(b)
    affine = affine_from(origin, np.column_stack([row_dir, col_dir, normal]), (dx, dy, step))
    drift = float(np.max(np.hypot(shift_i * dx, shift_j * dy)))
    note = (
        f"resampled (resample=True) from {len(depths)} irregular/tilted slices (gaps "
        f"{', '.join(f'{g:g}' for g in np.round(gaps, 3)[:8])} mm, in-plane drift up to {drift:.2f} mm) onto "
        f"{n_out} slices {step:g} mm apart along the normal; linear along the normal, bilinear in plane, "
        f"outside the acquired field = {fill:g}"
    )
    return out, affine, note


# --------------------------------------------------------------------------------------------- attrs
def _attrs(
    datasets: Sequence[pydicom.Dataset],
    frames: Sequence[_Frame],
    layout: _Layout,
    *,
    padding_value: float | None,
    note: str,
) -> dict[str, Any]:
    first = datasets[0]
    derived: list[str] = []
    sop_uids = []
    for ds in datasets:
        uid = str(_fast(ds, "SOPInstanceUID") or "") or str(
            getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or ""
        )
        if not uid:
            uid = derive_uid("sop-instance-from-content", describe(ds))
            derived.append("sop_instance_uids")
        sop_uids.append(uid)
    series_uid = str(first.get("SeriesInstanceUID") or "")
    if not series_uid:
        series_uid = derive_uid("series-from-instances", *sorted(sop_uids))
        derived.append("series_instance_uid")
    study_uid = str(first.get("StudyInstanceUID") or "")
    if not study_uid:
        study_uid = derive_uid("study-from-series", series_uid)
        derived.append("study_instance_uid")
    if derived:
        warnings.warn(
            f"{describe(first)}: empty {', '.join(sorted(set(derived)))} in the files; derived deterministic UIDs "
            "from the instances (attrs['derived_uids']) — assign real UIDs before sending derived objects to a PACS",
            PacsaiWarning,
            stacklevel=3,
        )
    modality = str(first.get("Modality") or "")
    ordered = [frames[i] for i in layout.order]
    thickness = _first_value(first, "SliceThickness", ("PixelMeasuresSequence", "SliceThickness"))
    attrs: dict[str, Any] = {
        "modality": modality,
        "units": _units(first, modality, ordered[0]),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID") or ""),
        "series_instance_uid": series_uid,
        "study_instance_uid": study_uid,
        "patient_id": str(first.get("PatientID") or ""),
        "sop_class_uid": str(
            first.get("SOPClassUID")
            or getattr(getattr(first, "file_meta", None), "MediaStorageSOPClassUID", "")
            or ""
        ),
        "series_description": str(first.get("SeriesDescription") or ""),
        # With resample=True these list the *source* slices in depth order (the output has its own slices).
        "sop_instance_uids": tuple(sop_uids[f.ds_index] for f in ordered),
        "frame_numbers": tuple(f.frame_index + 1 for f in ordered),
        "source_files": tuple(
            str(datasets[f.ds_index].filename)
            if isinstance(getattr(datasets[f.ds_index], "filename", None), (str, os.PathLike))
            else ""
            for f in ordered
        ),
        "slice_thickness": float(thickness) if thickness not in (None, "") else None,
        "pixel_padding_value": padding_value,
        "rescale_applied": any(f.slope != 1.0 or f.intercept != 0.0 for f in ordered),
        "derived_uids": tuple(sorted(set(derived))),
        "geometry_note": note,
    }
    return attrs


def _first_value(ds: pydicom.Dataset, keyword: str, functional: tuple[str, str]) -> Any:
    if keyword in ds and ds.get(keyword) not in (None, ""):
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if seq:
            inner = seq[0].get(functional[0])
            if inner and functional[1] in inner[0]:
                return inner[0].get(functional[1])
    return None


def _units(ds: pydicom.Dataset, modality: str, frame: _Frame) -> str:
    rescale_type = ds.get("RescaleType")
    if rescale_type:
        return str(rescale_type)
    if modality == "CT":
        return "HU"
    if modality == "PT" and ds.get("Units"):
        return str(ds.get("Units"))
    return "stored values" if frame.slope == 1.0 and frame.intercept == 0.0 else "rescaled values"


# --------------------------------------------------------------------------------------------- conversions
def to_sitk(volume: xr.DataArray) -> sitk.Image:
    """A pacsai volume as a SimpleITK image (same voxels, origin, spacing and direction; LPS like ITK).

    Raises
    ------
    VolumeError
        The affine is sheared (SimpleITK needs an orthonormal direction).
    """
    import SimpleITK as sitk

    origin, direction, spacing = decompose(volume.geo.affine)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise VolumeError(
            f"volume {volume.name!r} has a sheared affine; SimpleITK cannot hold it: resample it first"
        )
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(volume.values)
    )  # array (k, j, i) → ITK index (i, j, k)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))  # row-major; columns are the i, j, k axes
    return image


def from_sitk(
    image: sitk.Image, *, attrs: dict[str, Any] | None = None, name: str | None = None
) -> xr.DataArray:
    """A 3-D SimpleITK image as a pacsai volume (voxels and geometry exact).

    Parameters
    ----------
    image
        A 3-D, single-component SimpleITK image.
    attrs
        Extra attrs for the volume (e.g. ``frame_of_reference_uid``).
    name
        The DataArray's name.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"from_sitk needs a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = affine_from(image.GetOrigin(), direction, image.GetSpacing())
    return make_volume(array, affine, name=name, attrs=attrs)


def to_metatensor(volume: xr.DataArray, *, space: Literal["RAS", "LPS"] = "RAS") -> Any:
    """A pacsai volume as a MONAI ``MetaTensor``, channel-first ``(1, x, y, z)`` like MONAI's image readers.

    MONAI indexes arrays as (i, j, k) and, by default, expresses affines in RAS; pacsai volumes are (k, j, i)
    in LPS. The array is transposed to ``(1, i, j, k)`` and the affine becomes ``diag(-1, -1, 1, 1) @ affine``
    for ``space="RAS"`` (the default, what ``LoadImage`` produces), or stays LPS for ``space="LPS"``; the meta
    dict records ``space``, ``original_affine``, ``spatial_shape`` and the pacsai attrs that are plain strings.
    torch and MONAI are imported here only.
    """
    import torch
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    affine = volume.geo.affine
    if space == "RAS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space != "LPS":
        raise VolumeError(f"space must be 'RAS' or 'LPS', got {space!r}")
    data = np.ascontiguousarray(np.transpose(np.asarray(volume.values), (2, 1, 0))[None])
    meta: dict[str, Any] = {
        MetaKeys.ORIGINAL_AFFINE: torch.as_tensor(affine, dtype=torch.float64),
        MetaKeys.SPATIAL_SHAPE: np.array(data.shape[1:]),
        MetaKeys.SPACE: SpaceKeys.RAS if space == "RAS" else SpaceKeys.LPS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
    }
    meta.update({k: v for k, v in volume.attrs.items() if isinstance(v, str)})
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
