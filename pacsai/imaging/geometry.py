"""The one grid convention every pacsai array follows, and the ``.geo`` accessor that reads it.

A volume is an :class:`xarray.DataArray` with dims ``("z", "y", "x")`` = (slice k, row j, column i). Its geometry
has **one source of truth**: ``attrs["affine"]``, the 4×4 ITK/DICOM matrix of the grid it was *built* on
(``affine @ [i, j, k, 1]`` is the LPS position in mm of voxel ``[k, j, i]``), together with the integer index
coordinates ``k``, ``j``, ``i`` that :func:`make_volume` attaches along ``z``, ``y``, ``x``. xarray slices those
coordinates with the data, so after ``.isel``/slicing/reversal the accessor composes the built affine with the
kept indices and the answer cannot go stale. Anything that no longer describes a regular grid (a fancy index such
as ``[0, 2, 3]``, transposed dims, millimetre coordinates that disagree with the affine) raises
:class:`pacsai.errors.VolumeError` instead of answering.

The API speaks **one axis order, the array's (z, y, x)**: ``vol.geo.spacing`` is (Δz, Δy, Δx), ``vol.geo.world``
takes ``(k, j, i)`` indices and ``vol.geo.index`` returns them. Patient points stay LPS ``(x, y, z)`` triples, as
DICOM writes them (ImagePositionPatient, ContourData). See docs/geometry.md.

``attrs["spacing"]`` (Δi, Δj, Δk), ``attrs["direction"]`` and ``attrs["origin"]`` are the grid *as built*, kept
for older readers; they do not follow ``.isel`` — read ``vol.geo`` instead. Where the grid is axis-aligned
(direction diagonal), the dims also carry coordinates in mm.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from pacsai.errors import VolumeError

DIMS = ("z", "y", "x")
INDEX_COORDS = ("k", "j", "i")
"""Names of the integer index coordinates along ``DIMS``: the voxel's index on the grid ``attrs["affine"]`` maps."""


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
    name: Hashable | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a ``(z, y, x)`` array and its affine into a pacsai volume.

    Attaches ``attrs["affine"]`` (plus the as-built ``spacing``/``direction``/``origin`` for older readers), the
    index coordinates ``k``/``j``/``i`` that let :attr:`xarray.DataArray.geo` follow ``.isel``, and, where the
    grid is axis-aligned, millimetre coordinates on the dims.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"a volume needs 3 dimensions (z, y, x); got shape {array.shape}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError(f"a volume's affine must be a finite 4×4 matrix; got {affine.tolist()}")
    origin, direction, spacing = decompose(affine)
    all_attrs: dict[str, Any] = dict(attrs or {})
    all_attrs.update(
        affine=affine,
        spacing=tuple(float(s) for s in spacing),
        direction=direction,
        origin=tuple(float(o) for o in origin),
    )
    coords: dict[str, Any] = {
        index: (dim, np.arange(n)) for index, dim, n in zip(INDEX_COORDS, DIMS, array.shape, strict=True)
    }
    coords.update(_mm_coords(affine, array.shape))
    return xr.DataArray(array, dims=DIMS, coords=coords, name=name, attrs=all_attrs)


def _mm_coords(affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Millimetre coordinates of an axis-aligned grid's dims (empty for an oblique one)."""
    _, direction, _ = decompose(affine)
    if not is_axis_aligned(direction):
        return {}
    nz, ny, nx = shape
    coords = {}
    for dim, n, axis in (("x", nx, 0), ("y", ny, 1), ("z", nz, 2)):
        row = int(np.argmax(np.abs(direction[:, axis])))
        coords[dim] = affine[row, 3] + np.arange(n) * affine[row, axis]
    return coords


def refined_grid(volume: xr.DataArray, in_plane: int = 2) -> xr.DataArray:
    """An empty boolean grid over the same cells as ``volume`` with each row/column cell split ``in_plane`` ways.

    The outer cell edges stay where ``volume``'s are, so structures rasterised on it (e.g. for a DVH on a coarse
    dose grid) sample each dose cell ``in_plane``² times. Slices are kept as they are.
    """
    a = volume.geo.affine
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


def like(
    template: xr.DataArray, array: np.ndarray, *, name: Hashable | None = None, **attrs: Any
) -> xr.DataArray:
    """A new volume on the grid of ``template`` (same geometry and frame of reference)."""
    keep = {k: template.attrs[k] for k in ("frame_of_reference_uid",) if k in template.attrs}
    keep.update(attrs)
    return make_volume(array, template.geo.affine, name=name, attrs=keep)


def affine_of(volume: xr.DataArray) -> np.ndarray:
    """The affine of ``volume``'s array as it is now (``volume.geo.affine``; follows ``.isel``)."""
    return GeometryAccessor(volume).affine


def spacing_of(volume: xr.DataArray) -> np.ndarray:
    """Voxel size in (x, y, z) = (Δi, Δj, Δk) order, mm — the ITK order; new code reads ``volume.geo.spacing``
    (z, y, x)."""
    return GeometryAccessor(volume).spacing[::-1].copy()


def voxel_volume_cc(volume: xr.DataArray) -> float:
    """Volume of one voxel in cm³ (|det| of the affine's 3×3 part, mm³ → cm³)."""
    return GeometryAccessor(volume).voxel_volume_cc


def index_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices (i, j, k) → (N, 3) LPS mm, for a raw affine (volumes: ``vol.geo.world``)."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_to_index(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm → (N, 3) fractional voxel indices (i, j, k), for a raw affine (volumes: ``vol.geo.index``)."""
    xyz = np.asarray(xyz, dtype=float)
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def same_grid(a: xr.DataArray, b: xr.DataArray, *, atol: float = 1e-3) -> bool:
    """True when both arrays have the same shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a.geo.affine, b.geo.affine, atol=atol))


# --------------------------------------------------------------------------------------------- the accessor
@xr.register_dataarray_accessor("geo")
class GeometryAccessor:
    """``vol.geo``: the geometry of a pacsai volume as its array is now, in (z, y, x) order.

    Computed from ``attrs["affine"]`` and the ``k``/``j``/``i`` index coordinates, and remembered only together
    with the exact bytes of those and of the mm coordinates (a summary reads it hundreds of times; the checks cost
    ~2 ms each), so it holds after ``.isel``, slicing with steps, reversal, or an edit of ``attrs["affine"]``.

    Raises
    ------
    VolumeError
        On any access where the array is not a (z, y, x) volume with an affine, or where its coordinates no
        longer describe a regular grid under that affine.
    """

    def __init__(self, volume: xr.DataArray) -> None:
        self._volume = volume
        self._memo: tuple[tuple[Any, ...], np.ndarray] | None = None

    def _memo_key(self) -> tuple[Any, ...] | None:
        """Everything the affine and its checks read, as bytes: equal keys give the same answer."""
        volume = self._volume
        built = volume.attrs.get("affine")
        if built is None:
            return None
        parts: list[Any] = [tuple(volume.dims), volume.shape, np.asarray(built, dtype=float).tobytes()]
        for name in (*INDEX_COORDS, *DIMS):
            if name in volume.coords:
                coord = volume.coords[name]
                parts.append((name, coord.dims, np.asarray(coord.values).tobytes()))
        return tuple(parts)

    # ----------------------------------------------------------------------------------------- core
    @property
    def affine(self) -> np.ndarray:
        """4×4 ITK/DICOM affine of the array as it is: ``affine @ [i, j, k, 1]`` = LPS mm of voxel ``[k, j, i]``."""
        key = self._memo_key()
        if key is not None and self._memo is not None and self._memo[0] == key:
            return self._memo[1].copy()
        affine = self._affine()
        if key is not None:
            self._memo = (key, affine.copy())
        return affine

    def _affine(self) -> np.ndarray:
        volume = self._volume
        if tuple(volume.dims) != DIMS:
            raise VolumeError(
                f"array {volume.name!r} has dims {tuple(volume.dims)}; a volume's geometry needs dims {DIMS} "
                "(transpose it back, or select slices with a list/slice rather than a scalar)"
            )
        try:
            built = np.array(volume.attrs["affine"], dtype=float)
        except KeyError as err:
            raise VolumeError(
                f"array {volume.name!r} has no attrs['affine']; build volumes with pacsai.imaging.make_volume"
            ) from err
        if built.shape != (4, 4):
            raise VolumeError(f"array {volume.name!r}: attrs['affine'] has shape {built.shape}, not 4×4")
        # Column c of the built affine advances index (i, j, k)[c]; the kept indices say where this array sits.
        affine = built.copy()
        for column, (index, dim) in enumerate(zip(INDEX_COORDS[::-1], DIMS[::-1], strict=True)):
            if index not in volume.coords:
                continue
            start, step = self._progression(index, dim)
            affine[:3, 3] = affine[:3, 3] + built[:3, column] * start
            affine[:3, column] = built[:3, column] * step
        self._check_mm_coords(affine)
        return affine

    def _progression(self, index: str, dim: str) -> tuple[float, float]:
        """(first index, step) of the index coordinate ``index``; refuses an irregular one."""
        values = np.asarray(self._volume.coords[index].values, dtype=float)
        if values.ndim != 1 or self._volume.coords[index].dims != (dim,):
            raise VolumeError(f"array {self._volume.name!r}: index coordinate {index!r} must lie along {dim!r}")
        if values.size == 0:
            raise VolumeError(f"array {self._volume.name!r} has no voxels along {dim!r}")
        if values.size == 1:
            return float(values[0]), 1.0
        steps = np.diff(values)
        if not np.allclose(steps, steps[0]) or steps[0] == 0:
            raise VolumeError(
                f"array {self._volume.name!r} keeps {dim} indices {values[:8].astype(int).tolist()}... of its grid, "
                "which are not evenly spaced: no affine describes it; select a regular slice (e.g. "
                f"isel({dim}=slice(a, b, step))) or resample"
            )
        return float(values[0]), float(steps[0])

    def _check_mm_coords(self, affine: np.ndarray) -> None:
        """Refuse mm coordinates on the dims that disagree with the affine (edited coords or attrs)."""
        volume = self._volume
        expected = _mm_coords(affine, volume.shape)
        for dim in DIMS:
            if dim not in volume.coords:
                continue
            have = np.asarray(volume.coords[dim].values, dtype=float)
            want = expected.get(dim)
            if want is None or have.shape != want.shape or not np.allclose(have, want, atol=1e-3):
                raise VolumeError(
                    f"array {volume.name!r}: its {dim!r} coordinates ({have[:3].tolist()}...) no longer match "
                    f"attrs['affine'] ({None if want is None else want[:3].tolist()}...); the affine is stale: "
                    "rebuild the volume with pacsai.imaging.make_volume (or drop the coordinates you assigned)"
                )

    # ----------------------------------------------------------------------------------------- derived
    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (Δz, Δy, Δx) in mm: the distance between neighbours along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)[::-1].copy()

    @property
    def direction(self) -> np.ndarray:
        """3×3 whose columns are the LPS unit vectors of the z, y, x array axes (k, j, i)."""
        _, direction, _ = decompose(self.affine)
        return direction[:, ::-1].copy()

    @property
    def origin(self) -> np.ndarray:
        """LPS position (x, y, z) in mm of voxel ``[0, 0, 0]``."""
        return self.affine[:3, 3].copy()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels along (z, y, x)."""
        nz, ny, nx = self._volume.shape
        return int(nz), int(ny), int(nx)

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm³ (|det| of the affine's 3×3 part, mm³ → cm³)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    @property
    def is_axis_aligned(self) -> bool:
        """True where each array axis runs along one patient axis (either sign)."""
        return is_axis_aligned(decompose(self.affine)[1])

    @property
    def frame_of_reference_uid(self) -> str:
        """The FrameOfReferenceUID the positions are in ('' when unknown)."""
        return str(self._volume.attrs.get("frame_of_reference_uid") or "")

    # ----------------------------------------------------------------------------------------- mapping
    def world(self, index: Any) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in (k, j, i) = (z, y, x) order → LPS points ``(..., 3)`` (x, y, z) mm."""
        kji = np.asarray(index, dtype=float)
        if kji.shape[-1:] != (3,):
            raise VolumeError(f"geo.world takes (..., 3) indices in (z, y, x) order; got shape {kji.shape}")
        affine = self.affine
        return kji[..., ::-1] @ affine[:3, :3].T + affine[:3, 3]

    def index(self, world: Any) -> np.ndarray:
        """LPS points ``(..., 3)`` (x, y, z) mm → fractional voxel indices ``(..., 3)`` in (k, j, i) order."""
        xyz = np.asarray(world, dtype=float)
        if xyz.shape[-1:] != (3,):
            raise VolumeError(f"geo.index takes (..., 3) LPS points (x, y, z); got shape {xyz.shape}")
        inv = np.linalg.inv(self.affine)
        return (xyz @ inv[:3, :3].T + inv[:3, 3])[..., ::-1]

    def same_grid(self, other: xr.DataArray, *, atol: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and affine (within ``atol`` mm)."""
        return same_grid(self._volume, other, atol=atol)

    def check(self) -> None:
        """Raise :class:`VolumeError` unless the geometry is consistent (the same checks as every access)."""
        self.affine  # noqa: B018 - computed for its checks
