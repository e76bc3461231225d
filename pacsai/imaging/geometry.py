"""The one grid convention every pacsai array follows.

A volume is an :class:`xarray.DataArray` with dims ``("z", "y", "x")`` = (slice k, row j, column i) and
``attrs["affine"]``, a 4×4 array such that ``affine @ [i, j, k, 1]`` is the DICOM patient (LPS) position in mm
of voxel ``[k, j, i]`` — the ITK/SimpleITK index convention. Other attrs derived from it: ``spacing``
(Δi, Δj, Δk in mm), ``direction`` (3×3, columns are the unit vectors of i, j, k), ``origin`` (LPS of voxel 0).
Where the grid is axis-aligned (direction diagonal), the dims carry coordinates in mm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from pacsai.errors import VolumeError

DIMS = ("z", "y", "x")


def affine_from(origin: Any, direction: Any, spacing: Any) -> np.ndarray:
    """Build the 4×4 affine from an origin (LPS mm), a 3×3 direction (columns i, j, k) and spacing (Δi, Δj, Δk)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=float) * np.asarray(spacing, dtype=float)[None, :]
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def decompose(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an affine into (origin, direction, spacing)."""
    affine = np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise VolumeError(f"affine has a zero-length axis: {affine.tolist()}")
    return affine[:3, 3].copy(), affine[:3, :3] / spacing[None, :], spacing


def make_volume(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    name: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a ``(z, y, x)`` array and its affine into a pacsai volume (attrs and, where axis-aligned, coords)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"a volume needs 3 dimensions (z, y, x); got shape {array.shape}")
    affine = np.asarray(affine, dtype=float)
    origin, direction, spacing = decompose(affine)
    all_attrs: dict[str, Any] = dict(attrs or {})
    all_attrs.update(
        affine=affine,
        spacing=tuple(float(s) for s in spacing),
        direction=direction,
        origin=tuple(float(o) for o in origin),
    )
    coords: dict[str, np.ndarray] = {}
    if is_axis_aligned(direction):
        nz, ny, nx = array.shape
        for dim, n, axis in (("x", nx, 0), ("y", ny, 1), ("z", nz, 2)):
            row = int(np.argmax(np.abs(direction[:, axis])))
            coords[dim] = origin[row] + np.arange(n) * affine[row, axis]
    return xr.DataArray(array, dims=DIMS, coords=coords, name=name, attrs=all_attrs)


def refined_grid(volume: xr.DataArray, in_plane: int = 2) -> xr.DataArray:
    """An empty boolean grid over the same cells as ``volume`` with each row/column cell split ``in_plane`` ways.

    The outer cell edges stay where ``volume``'s are, so structures rasterised on it (e.g. for a DVH on a coarse
    dose grid) sample each dose cell ``in_plane``² times. Slices are kept as they are.
    """
    a = np.asarray(volume.attrs["affine"], dtype=float)
    fine = a.copy()
    fine[:3, :2] /= in_plane
    # Cell centres move inwards by (1 - 1/n)/2 of a coarse cell along rows and columns.
    fine[:3, 3] -= (a[:3, 0] + a[:3, 1]) * (1 - 1 / in_plane) / 2
    nz, ny, nx = volume.shape
    return make_volume(
        np.zeros((nz, ny * in_plane, nx * in_plane), bool),
        fine,
        attrs={"frame_of_reference_uid": volume.attrs.get("frame_of_reference_uid")},
    )


def is_axis_aligned(direction: np.ndarray, atol: float = 1e-6) -> bool:
    """True where each grid axis runs along one patient axis (i→x, j→y, k→z, either sign)."""
    direction = np.asarray(direction, dtype=float)
    return bool(np.allclose(np.abs(direction), np.eye(3), atol=atol))


def like(template: xr.DataArray, array: np.ndarray, *, name: str | None = None, **attrs: Any) -> xr.DataArray:
    """A new volume on the grid of ``template`` (same affine and frame of reference)."""
    keep = {k: template.attrs[k] for k in ("frame_of_reference_uid",) if k in template.attrs}
    keep.update(attrs)
    return make_volume(array, template.attrs["affine"], name=name, attrs=keep)


def affine_of(volume: xr.DataArray) -> np.ndarray:
    try:
        return np.asarray(volume.attrs["affine"], dtype=float)
    except KeyError as err:
        raise VolumeError(
            f"array {volume.name!r} has no attrs['affine']; build volumes with pacsai.imaging.make_volume"
        ) from err


def spacing_of(volume: xr.DataArray) -> np.ndarray:
    """Voxel size (Δi, Δj, Δk) = (x, y, z) in mm."""
    return decompose(affine_of(volume))[2]


def voxel_volume_cc(volume: xr.DataArray) -> float:
    """Volume of one voxel in cm³ (|det| of the affine's 3×3 part, mm³ → cm³)."""
    return float(abs(np.linalg.det(affine_of(volume)[:3, :3])) / 1000.0)


def index_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices (i, j, k) → (N, 3) LPS mm."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_to_index(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm → (N, 3) fractional voxel indices (i, j, k)."""
    xyz = np.asarray(xyz, dtype=float)
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def same_grid(a: xr.DataArray, b: xr.DataArray, *, atol: float = 1e-3) -> bool:
    """True when both arrays have the same shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(affine_of(a), affine_of(b), atol=atol))
