"""RTDOSE → dose grid in Gy, and resampling of any volume onto another grid in patient coordinates."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom
import xarray as xr

from pacsai.errors import DicomFileError, DoseError, VolumeError
from pacsai.imaging.dicomio import (
    PathLike,
    check_orientation,
    decode_pixels,
    describe,
    floats,
    int_value,
    load_datasets,
    value,
)
from pacsai.imaging.geometry import affine_from, make_volume

logger = logging.getLogger(__name__)

#: DoseSummationType values that are a patient's total planned dose (PS3.3 C.8.8.3): constraints need one.
PLAN_SUMMATION_TYPES = ("PLAN", "MULTI_PLAN")
#: DoseType values that are dose (PHYSICAL; EFFECTIVE = physical × RBE, e.g. protons), not an ERROR map.
PLAN_DOSE_TYPES = ("PHYSICAL", "EFFECTIVE")
_SUMMATION_MEANING = {
    "FRACTION": "one fraction of a plan",
    "BEAM": "one beam of a plan",
    "BRACHY": "one brachytherapy application setup",
    "FRACTION_SESSION": "one fraction, delivered in a session",
    "BEAM_SESSION": "one beam, delivered in a session",
    "BRACHY_SESSION": "one brachytherapy setup, delivered in a session",
    "CONTROL_POINT": "one control point of a beam",
    "RECORD": "a treatment record (delivered so far)",
}
_GRID_TOLERANCE_MM = 0.01  # GridFrameOffsetVector values are written by the TPS, regular to well below this


def read_dose(source: PathLike | pydicom.Dataset, *, allow_relative: bool = False) -> xr.DataArray:
    """Read an RT Dose object into a dose grid in Gy.

    Parameters
    ----------
    source
        The RTDOSE file or dataset.
    allow_relative
        Accept ``DoseUnits = RELATIVE`` (values are then relative, not Gy; ``attrs["units"]`` says so).

    Returns
    -------
    xarray.DataArray
        float64, dims ``("z", "y", "x")`` with k increasing along the slice normal (frames reordered if the
        GridFrameOffsetVector decreases), DoseGridScaling applied. Attrs: the geometry (``affine``...),
        ``units`` (``"Gy"``), ``dose_units``, ``dose_type``, ``dose_summation_type``,
        ``referenced_rtplan_uid``, ``frame_of_reference_uid``, ``sop_instance_uid``, ``series_instance_uid``,
        ``study_instance_uid``, ``patient_id``, ``grid_frame_offsets`` (as read, mm).

    Raises
    ------
    DoseError
        Not an RTDOSE, relative units without ``allow_relative``, no or irregular GridFrameOffsetVector, or an
        absolute GridFrameOffsetVector on a non-axial grid.
    DicomFileError
        Unreadable, truncated or undecodable file.
    """
    datasets = load_datasets(source)
    if len(datasets) != 1:
        raise DoseError(f"read_dose reads one RTDOSE object, got {len(datasets)}; pass one file")
    ds = datasets[0]
    name = describe(ds)
    if str(value(ds, "Modality", "")).upper() != "RTDOSE" or "PixelData" not in ds:
        raise DoseError(f"{name} is not an RT Dose with pixel data (Modality {value(ds, 'Modality')!r})")
    units = str(value(ds, "DoseUnits", "")).upper()
    if units != "GY" and not (allow_relative and units == "RELATIVE"):
        raise DoseError(
            f"{name}: DoseUnits is {units or 'missing'}, not GY, so the values are not absolute dose; pass "
            "allow_relative=True to read them as relative values (and scale by the prescription yourself)"
        )
    # Every number is checked (count, finite, sign) before it enters the affine: a NaN position or a zero
    # spacing would otherwise give a grid of NaNs or a singular affine far from the file that caused it.
    scaling = float(floats(ds, "DoseGridScaling", 1, error=DoseError, positive=True)[0])
    position = floats(ds, "ImagePositionPatient", 3, error=DoseError)
    orientation = floats(ds, "ImageOrientationPatient", 6, error=DoseError)
    check_orientation(ds, orientation, error=DoseError)
    dy, dx = floats(ds, "PixelSpacing", 2, error=DoseError, positive=True)
    rows, cols = int_value(ds, "Rows", minimum=1), int_value(ds, "Columns", minimum=1)
    nframes = int_value(ds, "NumberOfFrames", default=1, minimum=1)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    offsets = _frame_offsets(ds, nframes, position, orientation, name)

    try:
        pixels = decode_pixels(ds).reshape(nframes, rows, cols)
    except DicomFileError:
        raise
    except ValueError as err:
        raise DicomFileError(
            f"{name}: pixel data does not hold {nframes}×{rows}×{cols} values ({err})"
        ) from err
    order = np.argsort(offsets, kind="stable")
    offsets_sorted = offsets[order]
    if nframes > 1:
        gaps = np.diff(offsets_sorted)
        step = (offsets_sorted[-1] - offsets_sorted[0]) / (nframes - 1)
        if np.any(gaps <= 0) or np.max(np.abs(gaps - step)) > _GRID_TOLERANCE_MM:
            raise DoseError(
                f"{name}: GridFrameOffsetVector is not a regular grid (gaps {np.unique(np.round(gaps, 3))} mm); "
                "such a dose grid cannot be represented by one affine: resample it in the TPS"
            )
    else:
        step = (
            floats(ds, "SliceThickness", 1, error=DoseError, positive=True)[0]
            if value(ds, "SliceThickness")
            else 1.0
        )
    dose = pixels[order].astype(np.float64) * scaling
    origin = position + offsets_sorted[0] * normal
    affine = affine_from(origin, np.column_stack([row_dir, col_dir, normal]), (dx, dy, step))
    plans = value(ds, "ReferencedRTPlanSequence") or []
    attrs: dict[str, Any] = {
        "modality": "RTDOSE",
        "units": "Gy" if units == "GY" else "relative",
        "dose_units": units,
        "dose_type": str(value(ds, "DoseType", "")),
        "dose_summation_type": str(value(ds, "DoseSummationType", "")),
        "dose_grid_scaling": scaling,
        "referenced_rtplan_uid": str(value(plans[0], "ReferencedSOPInstanceUID", "")) if plans else "",
        "frame_of_reference_uid": str(value(ds, "FrameOfReferenceUID", "")),
        "sop_instance_uid": str(value(ds, "SOPInstanceUID", "")),
        "series_instance_uid": str(value(ds, "SeriesInstanceUID", "")),
        "study_instance_uid": str(value(ds, "StudyInstanceUID", "")),
        "patient_id": str(value(ds, "PatientID", "")),
        "grid_frame_offsets": tuple(float(v) for v in offsets),
    }
    return make_volume(dose, affine, name="dose", attrs=attrs)


class NotPlanDoseError(DoseError):
    """An RTDOSE is not a total plan dose in Gy, so dose constraints cannot be evaluated on it."""


def check_plan_dose(dose: xr.DataArray) -> None:
    """Accept only a total plan dose in Gy: DoseSummationType PLAN or MULTI_PLAN, DoseType PHYSICAL or EFFECTIVE.

    Constraints (QUANTEC) are limits on the whole course: a FRACTION dose is 1/n of it, a BEAM dose a part
    of it, a RECORD what was delivered so far; evaluating any of them against a total-dose limit passes
    everything. An ERROR dose is an uncertainty map, not dose.

    Parameters
    ----------
    dose
        A dose grid from :func:`read_dose` (its attrs ``dose_summation_type``, ``dose_type``, ``units``).

    Raises
    ------
    NotPlanDoseError
        Naming the SOP instance UID, the value found (with its meaning) and the fix.
    """
    uid = str(dose.attrs.get("sop_instance_uid") or dose.name or "the dose grid")
    summation = str(dose.attrs.get("dose_summation_type") or "").upper()
    kind = str(dose.attrs.get("dose_type") or "").upper()
    units = str(dose.attrs.get("units") or "")
    if summation not in PLAN_SUMMATION_TYPES:
        found = (
            f"{summation} ({_SUMMATION_MEANING[summation]})"
            if summation in _SUMMATION_MEANING
            else (repr(summation) if summation else "missing")
        )
        raise NotPlanDoseError(
            f"RTDOSE {uid}: DoseSummationType is {found}, not a total plan dose (PLAN or MULTI_PLAN); "
            "constraints are limits on the whole course: export the plan's total dose from the TPS"
        )
    if kind not in PLAN_DOSE_TYPES:
        raise NotPlanDoseError(
            f"RTDOSE {uid}: DoseType is {kind or 'missing'}, not PHYSICAL or EFFECTIVE"
            + (" (an ERROR dose is an uncertainty map)" if kind == "ERROR" else "")
            + "; export the physical (or RBE-weighted effective) plan dose"
        )
    if units.lower() != "gy":
        raise NotPlanDoseError(
            f"RTDOSE {uid}: DoseUnits is {dose.attrs.get('dose_units') or units or 'missing'}, not GY: relative "
            "values cannot be compared with dose limits; export the dose in Gy"
        )


def _frame_offsets(
    ds: pydicom.Dataset, nframes: int, position: np.ndarray, orientation: np.ndarray, name: str
) -> np.ndarray:
    """GridFrameOffsetVector as distances along the slice normal from ImagePositionPatient (PS3.3 C.8.8.3.2)."""
    if nframes == 1 and "GridFrameOffsetVector" not in ds:
        return np.zeros(1)
    if value(ds, "GridFrameOffsetVector") is None:
        raise DoseError(f"{name}: {nframes} frames but no GridFrameOffsetVector; the frames cannot be placed")
    offsets = floats(ds, "GridFrameOffsetVector", None, error=DoseError)
    if offsets.size != nframes:
        raise DoseError(f"{name}: GridFrameOffsetVector has {offsets.size} values for {nframes} frames")
    if offsets[0] == 0.0:
        return offsets  # relative: the usual case
    # Absolute z coordinates: only allowed for axial, head-first grids (IOP 1\0\0\0\1\0), per the standard.
    if not np.allclose(orientation, [1, 0, 0, 0, 1, 0], atol=1e-6):
        raise DoseError(
            f"{name}: GridFrameOffsetVector starts at {offsets[0]:g} (absolute) but the grid is not axial "
            f"(IOP {orientation.tolist()}); the standard forbids that combination"
        )
    if abs(offsets[0] - position[2]) > _GRID_TOLERANCE_MM:
        raise DoseError(
            f"{name}: absolute GridFrameOffsetVector starts at z={offsets[0]:g} but ImagePositionPatient z is "
            f"{position[2]:g}; the first frame must be at ImagePositionPatient"
        )
    return offsets - position[2]


def resample(
    moving: xr.DataArray,
    *,
    like: xr.DataArray,
    order: int = 1,
    fill: float = 0.0,
) -> xr.DataArray:
    """Resample ``moving`` onto the grid of ``like``, in patient coordinates (oblique grids included).

    Each target voxel centre is mapped through ``like``'s affine to LPS mm and through the inverse of
    ``moving``'s affine to a fractional index of ``moving``, where ``moving`` is interpolated
    (:func:`scipy.ndimage.affine_transform`). Index maps within 1e-9 of an integer are snapped to it, so
    resampling onto the same grid (or a grid shifted by whole voxels) returns the values exactly.

    Parameters
    ----------
    moving
        The volume to resample (e.g. a dose grid, a mask).
    like
        The volume whose grid the result takes (shape and affine).
    order
        0 nearest neighbour (masks: bool stays bool), 1 linear, 3 cubic spline.
    fill
        Value for target voxels outside ``moving``.

    Returns
    -------
    xarray.DataArray
        On ``like``'s grid; ``moving``'s non-geometry attrs are kept, plus ``resampled_from`` (the source
        affine and shape) and ``resample_order``.

    Raises
    ------
    VolumeError
        The frames of reference differ (the grids are in different patient coordinate systems: register them
        first), or the order is not 0, 1 or 3.
    """
    from scipy import ndimage

    if order not in (0, 1, 3):
        raise VolumeError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order}")
    for_moving = str(moving.attrs.get("frame_of_reference_uid") or "")
    for_like = str(like.attrs.get("frame_of_reference_uid") or "")
    if for_moving and for_like and for_moving != for_like:
        raise VolumeError(
            f"cannot resample: frame of reference {for_moving} (moving) differs from {for_like} (like); the grids "
            "are in different patient coordinate systems: register them first"
        )
    a_moving, a_like = moving.geo.affine, like.geo.affine
    # Target index (i, j, k) → source index (i, j, k); arrays are indexed (k, j, i), hence the permutation.
    ijk_map = np.linalg.inv(a_moving) @ a_like
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    kji_map = perm @ ijk_map @ perm
    snapped = np.round(kji_map)
    close = np.abs(kji_map - snapped) < 1e-9
    kji_map[close] = snapped[close]

    values = np.asarray(moving.values)
    is_bool = values.dtype == bool
    if is_bool:
        if order != 0:
            raise VolumeError("boolean masks are resampled with order=0 (nearest) only; pass order=0")
        source = values.view(np.uint8)
        out_dtype: np.dtype = np.dtype(np.uint8)
    else:
        source = values
        out_dtype = values.dtype if (order == 0 or values.dtype.kind == "f") else np.dtype(np.float64)
    if np.array_equal(kji_map[:3, :3], np.eye(3)) and np.all(kji_map[:3, 3] == np.round(kji_map[:3, 3])):
        # Same axes, whole-voxel offset (resampling onto itself included): a copy, exact for every order.
        result = _shifted_copy(source, kji_map[:3, 3].astype(int), like.shape, out_dtype, fill)
    else:
        result = ndimage.affine_transform(
            source,
            kji_map[:3, :3],
            offset=kji_map[:3, 3],
            output_shape=like.shape,
            output=out_dtype,
            order=order,
            mode="constant",
            cval=float(fill),
            prefilter=order > 1,
        )
    if is_bool:
        result = result.astype(bool)
    keep = {k: v for k, v in moving.attrs.items() if k not in ("affine", "spacing", "direction", "origin")}
    keep["resampled_from"] = {"affine": a_moving.tolist(), "shape": list(moving.shape)}
    keep["resample_order"] = order
    if for_like and not for_moving:
        keep["frame_of_reference_uid"] = for_like
    return make_volume(result, a_like, name=moving.name, attrs=keep)


def _shifted_copy(
    source: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, fill: float
) -> np.ndarray:
    """``out[p] = source[p + offset]`` where that index exists, ``fill`` elsewhere."""
    out = np.full(shape, fill, dtype=dtype)
    dst, src = [], []
    for n_out, n_src, off in zip(shape, source.shape, offset, strict=True):
        lo, hi = max(0, -off), min(n_out, n_src - off)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + off, hi + off))
    out[tuple(dst)] = source[tuple(src)]
    return out
