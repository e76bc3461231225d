"""RT Structure Set ↔ boolean masks, geometry exact.

Reading rasterises every closed planar contour **in patient coordinates** onto the grid of ``like`` (an image
volume or a dose grid): contour points go through the inverse of ``like``'s affine, so oblique planes,
feet-first series and dose grids need no special case. Holes follow the even-odd rule (see
:mod:`pacsai.imaging.contours`).

**Slice assignment.** Each contour plane represents a slab as thick as the distance between contour planes in
the structure set (the image slice spacing it was drawn on). A slice of ``like`` takes the contours of the
nearest contour plane when that plane is at most half a contour spacing away (ties: the lower plane), so on
the image grid every contour lands on exactly its own slice, and on a finer or coarser grid (a dose grid)
every slice gets the plane that covers it: nearest-neighbour interpolation between planes, no shape
interpolation. Slices outside every slab stay empty. This is how the voxel volume matches "shoelace area ×
spacing summed over planes".

Writing traces each mask slice with marching squares, writes outer boundaries and holes as separate
CLOSED_PLANAR contours (read back by the even-odd rule), and builds the object by hand: rt-utils' output fails
dciodvfy (``docs/dicom_notes.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from pacsai.errors import PacsaiWarning, StructureError
from pacsai.imaging import dicomwrite
from pacsai.imaging.contours import fill_polygons, mask_to_polygons
from pacsai.imaging.dicomio import MAX_MM
from pacsai.imaging.geometry import index_to_world, same_grid, world_to_index
from pacsai.imaging.geometry import like as like_grid
from pacsai.uids import derive_uid

logger = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
# RTReferencedStudySequence names the study with the (retired) Detached Study Management SOP class, as PS3.3
# C.8.8.5 still prescribes and every TPS writes.
_DETACHED_STUDY_MANAGEMENT = UID("1.2.840.10008.3.1.2.3.1")

_CLOSED = "CLOSED_PLANAR"

_DEFAULT_COLORS = (
    (255, 0, 0),
    (0, 170, 0),
    (0, 0, 255),
    (255, 200, 0),
    (255, 0, 255),
    (0, 200, 200),
    (255, 128, 0),
    (128, 0, 255),
    (128, 128, 0),
    (0, 128, 128),
)


def read_rtstruct(
    path: str | Path | Dataset,
    *,
    like: xr.DataArray,
    names: Iterable[str] | None = None,
    plane_tolerance_mm: float = 0.1,
) -> dict[str, xr.DataArray]:
    """Rasterise an RT Structure Set onto the grid of ``like``: one boolean mask per ROI.

    Parameters
    ----------
    path
        The RTSTRUCT file (files without a preamble/file meta are read too) or an already read dataset.
    like
        The grid (a pacsai volume: image series or dose grid). Its ``frame_of_reference_uid`` attr, where set,
        must match the ROIs'.
    names
        ROI names to return (after de-duplication, see below); all ROIs where None.
    plane_tolerance_mm
        How far (mm, along ``like``'s slice normal) the points of one contour may stray from their common
        plane, and how close two contours must be to count as the same plane.

    Returns
    -------
    dict[str, xarray.DataArray]
        ``{roi_name: bool mask}`` on ``like``'s grid, in Structure Set order. Duplicate ROI names get a suffix
        ``"_2"``, ``"_3"``, ... (with a warning). Each mask's attrs carry ``roi_number``, ``rasterisation``
        and ``source_file``.

    Raises
    ------
    StructureError
        Not an RTSTRUCT; an ROI on another frame of reference than ``like``; a contour whose plane is not
        parallel to ``like``'s slices (resample ``like`` to the structure's orientation first); a requested
        name that does not exist.

    Warns
    -----
    PacsaiWarning
        Empty ROIs (returned all False), skipped POINT / OPEN_PLANAR / OPEN_NONPLANAR contours, duplicate
        names, contours reaching outside ``like`` (the mask is cropped).
    """
    ds = _read(path)
    source = str(getattr(ds, "filename", None) or ds.get("SOPInstanceUID") or "RTSTRUCT")
    affine = like.geo.affine
    n_slices, n_rows, n_cols = like.shape
    slice_mm = float(np.linalg.norm(affine[:3, 2]))
    tol_k = plane_tolerance_mm / slice_mm
    like_for = like.attrs.get("frame_of_reference_uid")

    rois = _roi_table(ds, source)
    contours_by_roi = {
        _number(item, "ReferencedROINumber", source): item for item in _items(ds, "ROIContourSequence", source)
    }
    keys: dict[str, int] = {}
    for number, (name, _) in rois.items():
        keys[_unique(name, keys, source)] = number
    wanted = set(keys.values()) if names is None else {keys[n] for n in names if n in keys}
    missing = [] if names is None else [n for n in names if n not in keys]
    if missing:
        raise StructureError(f"{source}: no ROI named {missing}; it has {list(keys)}")

    # Planes per ROI in fractional k of like: {roi_number: [(k, [polygon (i, j)])...]}. Every ROI's planes
    # count towards the contour spacing, so the names filter never changes a mask; ROIs not asked for are
    # neither checked nor warned about.
    planes_by_roi: dict[int, list[tuple[float, list[np.ndarray]]]] = {}
    for number, (name, roi_for) in rois.items():
        item = contours_by_roi.get(number)
        strict = number in wanted
        if strict and roi_for and like_for and roi_for != like_for:
            raise StructureError(
                f"{source}: ROI {name!r} is on frame of reference {roi_for} but the grid is on {like_for}; "
                "rasterise onto a grid of the same frame of reference (the image series the structures were "
                "drawn on), or register the series first"
            )
        planes_by_roi[number] = (
            _roi_planes(item, name, source, affine, tol_k, strict=strict) if item is not None else []
        )

    spacing_k = _contour_spacing(planes_by_roi, tol_k)
    masks: dict[str, xr.DataArray] = {}
    for key, number in keys.items():
        if number not in wanted:
            continue
        name = rois[number][0]
        planes = planes_by_roi[number]
        volume = np.zeros((n_slices, n_rows, n_cols), dtype=bool)
        if not planes:
            warnings.warn(
                f"{source}: ROI {name!r} (number {number}) has no closed contours; its mask is empty",
                PacsaiWarning,
                stacklevel=2,
            )
        else:
            _rasterise(volume, planes, spacing_k, name=name, source=source)
        masks[key] = like_grid(
            like,
            volume,
            name=key,
            roi_number=number,
            source_file=source,
            rasterisation=(
                "even-odd, voxel centre inside; each slice takes the nearest contour plane within half the "
                f"contour spacing ({spacing_k * slice_mm:.4g} mm)"
            ),
        )
    return masks


def _read(path: str | Path | Dataset) -> Dataset:
    if isinstance(path, Dataset):
        ds = path
    else:
        from pacsai.imaging.dicomio import read_file

        ds = read_file(path)
    where = str(getattr(ds, "filename", None) or path)
    sop_class = str(_get(ds, "SOPClassUID", where) or "")
    if _get(ds, "Modality", where) != "RTSTRUCT" and sop_class != RT_STRUCTURE_SET_STORAGE:
        raise StructureError(
            f"{getattr(ds, 'filename', path)} is not an RT Structure Set (Modality {ds.get('Modality')!r}, "
            f"SOP class {sop_class!r}); for a DICOM SEG use pacsai.imaging.read_seg"
        )
    return ds


def _roi_table(ds: Dataset, source: str) -> dict[int, tuple[str, str | None]]:
    """{ROINumber: (ROIName, ReferencedFrameOfReferenceUID)} in Structure Set order."""
    rois: dict[int, tuple[str, str | None]] = {}
    for item in _items(ds, "StructureSetROISequence", source):
        number = _number(item, "ROINumber", source)
        name = str(_get(item, "ROIName", source) or f"ROI {number}")
        rois[number] = (name, str(_get(item, "ReferencedFrameOfReferenceUID", source) or "") or None)
    # Some writers leave an ROIContour without a StructureSetROI entry: keep its contours, name it by number.
    for item in _items(ds, "ROIContourSequence", source):
        number = _number(item, "ReferencedROINumber", source)
        if number not in rois:
            warnings.warn(
                f"{source}: contours for ROI number {number} have no StructureSetROISequence entry; named "
                f"'ROI {number}'",
                PacsaiWarning,
                stacklevel=3,
            )
            rois[number] = (f"ROI {number}", None)
    return rois


def _get(item: Dataset, keyword: str, source: str) -> Any:
    """``item.get(keyword)``, with pydicom's conversion errors (a corrupt value) as a StructureError."""
    try:
        return item.get(keyword)
    except Exception as err:  # noqa: BLE001 - ValueError, BytesLengthException, NotImplementedError (bad VR)...
        raise StructureError(
            f"{source}: {keyword} cannot be read ({type(err).__name__}: {err}); the RTSTRUCT is corrupt: export "
            "it again"
        ) from err


def _items(ds: Dataset, keyword: str, source: str) -> list[Dataset]:
    """The items of a sequence (empty where absent), refusing a value that is not a sequence."""
    seq = _get(ds, keyword, source)
    if seq is None or seq == "":
        return []
    if not all(isinstance(item, Dataset) for item in seq):
        raise StructureError(f"{source}: {keyword} is not a sequence of items; the RTSTRUCT is corrupt")
    return list(seq)


def _number(item: Dataset, keyword: str, source: str) -> int:
    """An integer attribute every ROI item needs (ROINumber, ReferencedROINumber)."""
    raw = _get(item, keyword, source)
    try:
        return int(raw)
    except (TypeError, ValueError) as err:
        raise StructureError(
            f"{source}: an item has {keyword} {raw!r}, not an integer, so its contours cannot be matched to "
            "an ROI; the RTSTRUCT is corrupt: export it again"
        ) from err


def _unique(name: str, taken: Mapping[str, Any], source: str) -> str:
    if name not in taken:
        return name
    suffix = 2
    while f"{name}_{suffix}" in taken:
        suffix += 1
    warnings.warn(
        f"{source}: ROI name {name!r} occurs more than once; this one is returned as {name}_{suffix!s}",
        PacsaiWarning,
        stacklevel=3,
    )
    return f"{name}_{suffix}"


def _roi_planes(
    item: Dataset, name: str, source: str, affine: np.ndarray, tol_k: float, *, strict: bool = True
) -> list[tuple[float, list[np.ndarray]]]:
    """Closed contours of one ROI, mapped into like's index space and grouped by plane (sorted by k).

    ``strict=False`` (an ROI the caller did not ask for) drops non-parallel contours instead of raising, and
    warns about nothing."""
    contours: list[tuple[float, np.ndarray]] = []
    skipped: dict[str, int] = {}
    for number, contour in enumerate(_items(item, "ContourSequence", source), start=1):
        kind = str(_get(contour, "ContourGeometricType", source) or _CLOSED)
        if kind != _CLOSED:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        data = _contour_data(contour, f"{source}: contour {number} of ROI {name!r}")
        if data.size < 9 or data.size % 3:
            skipped["degenerate"] = skipped.get("degenerate", 0) + 1
            continue
        ijk = world_to_index(affine, data.reshape(-1, 3))
        spread = float(ijk[:, 2].max() - ijk[:, 2].min())
        if spread > tol_k and not strict:
            continue
        if spread > tol_k:
            raise StructureError(
                f"{source}: contour {number} of ROI {name!r} is not in a slice plane of the grid (it spans "
                f"{spread:.3f} slices); the grid's slices must be parallel to the contour planes: rasterise "
                "onto the image series the contours were drawn on, or resample the grid to that orientation"
            )
        contours.append((float(ijk[:, 2].mean()), ijk[:, :2]))
    for kind, count in skipped.items() if strict else ():
        warnings.warn(
            f"{source}: ROI {name!r}: skipped {count} {kind} contour(s); only CLOSED_PLANAR contours enclose "
            "a volume",
            PacsaiWarning,
            stacklevel=3,
        )
    contours.sort(key=lambda c: c[0])
    planes: list[tuple[float, list[np.ndarray]]] = []
    for k, polygon in contours:
        if planes and k - planes[-1][0] <= tol_k:
            planes[-1][1].append(polygon)
        else:
            planes.append((k, [polygon]))
    return planes


def _contour_data(contour: Dataset, where: str) -> np.ndarray:
    """ContourData as finite floats (StructureError naming ``where`` otherwise). Parsed from the raw bytes where
    possible: pydicom builds one DSfloat object per number, which takes seconds on a real structure set (≈ 10⁵
    points)."""
    element = contour.get_item("ContourData")
    if element is None:
        return np.zeros(0)
    raw = getattr(element, "value", None)
    data = None
    if isinstance(raw, bytes):
        text = raw.decode("latin-1").strip(" \x00")
        if not text:
            return np.zeros(0)
        try:
            data = np.array(text.split("\\"), dtype=float)
        except ValueError:
            pass  # an odd value: let pydicom parse it and report
    if data is None:
        try:
            data = np.asarray(contour.ContourData or [], dtype=float).ravel()
        except Exception as err:  # noqa: BLE001 - pydicom's DS conversion: ValueError, TypeError, length errors
            raise StructureError(
                f"{where}: ContourData is not a list of numbers ({type(err).__name__}: {err}); the RTSTRUCT is "
                "corrupt: export it again"
            ) from err
    if not np.isfinite(data).all() or (np.abs(data) > MAX_MM).any():
        raise StructureError(
            f"{where}: ContourData holds non-finite or implausibly large coordinates; the RTSTRUCT is corrupt"
        )
    return data


def _contour_spacing(
    planes_by_roi: Mapping[int, list[tuple[float, list[np.ndarray]]]], tol_k: float
) -> float:
    """Distance between contour planes (in slices of like): the median gap between distinct plane positions
    of all ROIs together, i.e. the slice spacing of the images the contours were drawn on. 1 (one slice of
    like)
    where every contour lies in one plane."""
    positions = np.sort(np.array([k for planes in planes_by_roi.values() for k, _ in planes]))
    if positions.size < 2:
        return 1.0
    gaps = np.diff(positions)
    gaps = gaps[gaps > tol_k]
    return float(np.median(gaps)) if gaps.size else 1.0


def _rasterise(
    volume: np.ndarray,
    planes: list[tuple[float, list[np.ndarray]]],
    spacing_k: float,
    *,
    name: str,
    source: str,
) -> None:
    n_slices, n_rows, n_cols = volume.shape
    positions = np.array([k for k, _ in planes])
    half = spacing_k / 2.0 + 1e-6
    used: set[int] = set()
    for k in range(n_slices):
        nearest = int(np.argmin(np.abs(positions - k)))  # argmin picks the lower plane on a tie
        if abs(positions[nearest] - k) <= half:
            volume[k] = fill_polygons(planes[nearest][1], (n_rows, n_cols))
            used.add(nearest)
    outside_planes = len(planes) - len(used)
    all_points = np.concatenate([p for _, polygons in planes for p in polygons])
    # The grid covers index −0.5 … n − 0.5 along each axis; a mask touching its border is traced exactly
    # there,
    # so allow for the rounding of contour points to 0.1 µm.
    margin = 1e-3
    in_plane_outside = bool(
        (all_points[:, 0] < -0.5 - margin).any()
        or (all_points[:, 0] > n_cols - 0.5 + margin).any()
        or (all_points[:, 1] < -0.5 - margin).any()
        or (all_points[:, 1] > n_rows - 0.5 + margin).any()
    )
    beyond = positions.min() < -0.5 - margin or positions.max() > n_slices - 0.5 + margin
    if in_plane_outside or beyond:
        warnings.warn(
            f"{source}: ROI {name!r} reaches outside the grid it is rasterised onto; the mask is cropped",
            PacsaiWarning,
            stacklevel=3,
        )
    elif outside_planes:
        logger.info("ROI %r: %d contour plane(s) fall between slices of a coarser grid", name, outside_planes)


def write_rtstruct(
    masks: Mapping[str, xr.DataArray],
    *,
    source: Any,
    label: str = "PACSAI",
    series_description: str = "pacsai structures",
    roi_colors: Mapping[str, Sequence[int]] | None = None,
    roi_types: Mapping[str, str] | None = None,
    algorithm_name: str = "pacsai",
    algorithm_version: str | None = None,
    manufacturer: str = "pacsai",
    series_number: int | None = None,
    uid_parts: Sequence[object] = (),
) -> Dataset:
    """Write boolean masks as a complete, standard-conformant RT Structure Set referencing ``source``.

    Parameters
    ----------
    masks
        ``{roi_name: bool DataArray}``, all on the grid of ``source`` (as returned by
        ``read_series(source)``).
        Empty masks are written as ROIs without contours.
    source
        The image series the masks were made on: a folder, paths or pydicom datasets (headers suffice); single
        frame instances or one enhanced multi-frame image (contours then reference frame numbers).
    label
        StructureSetLabel (≤ 16 characters).
    series_description
        SeriesDescription of the new series.
    roi_colors
        ``{roi_name: (r, g, b)}``; a fixed palette otherwise.
    roi_types
        ``{roi_name: RTROIInterpretedType}`` (e.g. ``"ORGAN"``, ``"GTV"``, ``"PTV"``, ``"EXTERNAL"``); guessed
        from the name otherwise (GTV/CTV/PTV prefixes, BODY/EXTERNAL, else ORGAN).
    algorithm_name, algorithm_version
        Recorded in ROIGenerationDescription and SoftwareVersions.
    manufacturer
        General Equipment Manufacturer.
    series_number
        SeriesNumber; empty (type 2) where None.
    uid_parts
        Further inputs that shape the content (model version, parameters): they enter the UIDs.

    Returns
    -------
    pydicom.Dataset
        With file meta; Explicit VR Little Endian. UIDs derive from the source SOP instance UIDs, the masks'
        content and ``uid_parts``, and dates/times come from the source, so the same inputs give
        byte-identical
        output (compare with :func:`pacsai.imaging.dicomwrite.to_bytes`) and changed content new UIDs.

    Raises
    ------
    StructureError
        No masks, masks not boolean or not on one grid, a grid that does not match ``source``, source
        instances without UIDs, a frame of reference mismatch, an ROI name too long for DICOM (64 characters).
    """
    grid = _check_masks(masks)
    from pacsai.imaging.dicomio import load_datasets

    datasets = load_datasets(source, stop_before_pixels=True)
    frames = dicomwrite.source_frames(datasets, grid, what="write_rtstruct")
    first = frames[0].dataset
    frame_of_reference = str(first.get("FrameOfReferenceUID") or "")
    if not frame_of_reference:
        raise StructureError(
            f"write_rtstruct: source {getattr(first, 'filename', first.SOPInstanceUID)} has no "
            "FrameOfReferenceUID; "
            "an RTSTRUCT needs one (assign it to the whole series first)"
        )
    mask_for = grid.attrs.get("frame_of_reference_uid")
    if mask_for and str(mask_for) != frame_of_reference:
        raise StructureError(
            f"write_rtstruct: the masks are on frame of reference {mask_for} but the source series is on "
            f"{frame_of_reference}; pass the series the masks were made on"
        )
    if len(label) > 16:
        raise StructureError(
            f"write_rtstruct: label {label!r} is longer than 16 characters (StructureSetLabel, SH)"
        )

    sop_uids = [f"{f.sop_instance_uid}/{f.frame_number or ''}" for f in frames]
    digest = dicomwrite.masks_digest(masks)
    parts = (
        *sop_uids,
        digest,
        label,
        series_description,
        algorithm_name,
        algorithm_version,
        series_number,
        sorted((roi_colors or {}).items()),
        sorted((roi_types or {}).items()),
        *uid_parts,
    )
    date, time = dicomwrite.content_datetime([f.dataset for f in frames], what="RTSTRUCT")
    affine = grid.geo.affine

    ds = Dataset()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = derive_uid("pacsai-rtstruct-instance", *parts)
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    dicomwrite.copy_patient_study(first, ds)
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = derive_uid("pacsai-rtstruct-series", *parts)
    ds.SeriesNumber = "" if series_number is None else int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name
    ds.SoftwareVersions = algorithm_version or _pacsai_version()
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator") or ""
    # Structure Set
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    ds.InstanceNumber = 1
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(first, frames, frame_of_reference)]

    roi_items, contour_items, observation_items = [], [], []
    for number, (name, mask) in enumerate(masks.items(), start=1):
        if not name or len(name) > 64:
            raise StructureError(
                f"write_rtstruct: ROI name {name!r} must have 1 to 64 characters (ROIName, LO)"
            )
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version or _pacsai_version()}".strip()
        roi_items.append(roi)

        roi_contour = Dataset()
        color = (roi_colors or {}).get(name) or _DEFAULT_COLORS[(number - 1) % len(_DEFAULT_COLORS)]
        roi_contour.ROIDisplayColor = [int(c) for c in color]
        contours = _mask_contours(np.asarray(mask.values, dtype=bool), affine, frames)
        if contours:
            roi_contour.ContourSequence = contours
        roi_contour.ReferencedROINumber = number
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = (roi_types or {}).get(name) or _guess_type(name)
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    return dicomwrite.finalize(ds)


def _check_masks(masks: Mapping[str, xr.DataArray]) -> xr.DataArray:
    if not masks:
        raise StructureError("write_rtstruct: no masks given; pass {roi_name: bool DataArray}")
    grid = None
    for name, mask in masks.items():
        if not isinstance(mask, xr.DataArray) or "affine" not in mask.attrs or mask.ndim != 3:
            raise StructureError(
                f"write_rtstruct: mask {name!r} is not a pacsai volume (3-D DataArray with attrs['affine'])"
            )
        if mask.dtype != bool:
            raise StructureError(
                f"write_rtstruct: mask {name!r} has dtype {mask.dtype}; masks must be boolean"
            )
        if grid is None:
            grid = mask
        elif not same_grid(grid, mask):
            raise StructureError(f"write_rtstruct: mask {name!r} is on another grid than the first mask")
    assert grid is not None
    return grid


def _referenced_frame(
    first: Dataset, frames: Sequence[dicomwrite.SourceFrame], frame_of_reference: str
) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [frame.reference() for frame in frames]
    study = Dataset()
    study.ReferencedSOPClassUID = _DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference
    frame.RTReferencedStudySequence = [study]
    return frame


def _mask_contours(
    mask: np.ndarray, affine: np.ndarray, frames: Sequence[dicomwrite.SourceFrame]
) -> DicomSequence:
    items: list[Dataset] = []
    for k in map(int, np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))):
        for polygon in mask_to_polygons(mask[k]):
            ijk = np.column_stack([polygon, np.full(len(polygon), float(k))])
            points = index_to_world(affine, ijk)
            contour = Dataset()
            contour.ContourImageSequence = [frames[k].reference()]
            contour.ContourGeometricType = _CLOSED
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(items) + 1
            dicomwrite.set_ds_fast(contour, "ContourData", points)
            items.append(contour)
    return DicomSequence(items)


def _guess_type(name: str) -> str:
    upper = name.upper()
    for prefix in ("GTV", "CTV", "PTV", "ITV"):
        if upper.startswith(prefix):
            return prefix
    if upper in ("BODY", "EXTERNAL", "SKIN", "OUTLINE") or upper.startswith("BODY"):
        return "EXTERNAL"
    return "ORGAN"


def _pacsai_version() -> str:
    from pacsai import __version__

    return f"pacsai {__version__}"


__all__ = ["read_rtstruct", "write_rtstruct"]
