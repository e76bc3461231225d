"""Dose-volume histograms, DVH metrics and plan quality indices.

Definitions (docs/clinical_definitions.md; ICRU 83 for the notation):

* cumulative DVH: V(D) = volume of the structure receiving a dose ≥ D;
* Dmean, Dmin, Dmax over the structure (Gy); D0.03cc is reported as the near-maximum;
* Dx% = the minimum dose to the hottest x % of the volume, i.e. the largest D with V(D) ≥ x % (D98, D95, D50, D2);
  Dcc likewise with an absolute volume;
* Vx = volume receiving ≥ x Gy, in % of the structure and in cm³;
* coverage = V95% of the PTV; homogeneity index (ICRU 83) HI = (D2 − D98) / D50;
* conformity: RTOG CI = V_RI / TV; Paddick CI = TV_PIV² / (TV · PIV); gradient index GI = PIV50% / PIV100%.

How the dose reaches the structure (stated in :attr:`DVH.method`): when the dose and the mask share a grid, the
dose of each mask voxel is used as is. Otherwise the dose grid is interpolated trilinearly (in patient
coordinates, through both affines) at the centre of every mask voxel, and every voxel on the structure's
surface is sub-sampled on an s×s×s lattice of points (default s = 2, equal weights): dose gradients are steepest
at target edges, and a finer structure grid (e.g. contours rasterised on the CT grid) should see the dose vary
within its edge voxels.

Structure outside the dose grid (a sample point beyond the grid's outer voxel faces) has no dose: it is never
silently counted as 0 Gy. :func:`dose_coverage` measures it (cm³ and fraction, with the same sample points as
the DVH), and :func:`dvh` handles it as its ``outside`` argument says: ``"exclude"`` (default: the DVH covers
the part inside the grid, :attr:`DVH.uncovered_cc` and :attr:`DVH.method` state the rest, with a
:class:`~pacsai.errors.PacsaiWarning`), ``"error"`` (raise), or ``"zero"`` (count it as 0 Gy, stated the same
way — only where the dose there is known to be negligible). Constraint evaluation marks a structure more than
1 % or 0.5 cm³ uncovered as unreliable (:mod:`pacsai.planning.constraints`).

Statistics: mean, min and max are exact over the samples; Dx/Dcc/Vx are computed from the samples quantised to
``resolution`` (0.1 mGy by default, far below any clinical relevance) so that a DVH of millions of voxels stays
small; :meth:`DVH.curve` bins the cumulative DVH (0.01 Gy by default) for plotting.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr
from scipy import ndimage

from pacsai.errors import PacsaiWarning, PlanningError
from pacsai.imaging.geometry import same_grid, voxel_volume_cc

logger = logging.getLogger(__name__)

Method = Literal["auto", "voxel", "centre", "supersample"]
Outside = Literal["exclude", "error", "zero"]

_REL_TOL = 1e-9  # relative slack on volume comparisons (sums of float weights)
_DENSE_LEVELS = 20_000_000  # dose levels (2000 Gy at 0.1 mGy) up to which the histogram is a dense bincount
_CHUNK = 1_000_000  # sample points per interpolation call: bounds memory on whole-body structures


class DVH:
    """Cumulative dose-volume histogram of one structure (Gy, cm³).

    Build with :func:`dvh` (from a dose grid and a mask) or :meth:`from_samples`. All doses are in Gy.

    Attributes
    ----------
    name
        Structure name.
    method
        How the dose was mapped onto the structure (human-readable, for the report).
    volume_cc
        Structure volume (cm³) = sum of the sample weights.
    mean, min, max
        Exact Dmean, Dmin, Dmax (Gy).
    resolution
        Dose quantisation of the histogram (Gy).
    uncovered_cc
        Structure volume outside the dose grid (cm³): not in the histogram (``outside="exclude"``) or counted
        as 0 Gy (``outside="zero"``, then included in :attr:`volume_cc`). 0 for a fully covered structure.
    sampled_cc
        Volume of every sample point the structure was given, inside the dose grid or not (cm³): the
        denominator of :func:`dose_coverage`'s fraction (see :func:`coverage_of`).
    """

    __slots__ = (
        "_cum", "_q", "max", "mean", "method", "min", "name", "resolution", "sampled_cc", "uncovered_cc",
        "volume_cc",
    )  # fmt: skip

    def __init__(
        self,
        quantised: np.ndarray,
        volumes_cc: np.ndarray,
        *,
        name: str,
        method: str,
        mean: float,
        min: float,
        max: float,
        resolution: float,
    ) -> None:
        self._q = np.asarray(quantised, dtype=np.int64)
        weights = np.asarray(volumes_cc, dtype=float)
        # _cum[i] = volume receiving ≥ _q[i] (the cumulative DVH at each distinct dose).
        self._cum = np.cumsum(weights[::-1])[::-1]
        self.name = name
        self.method = method
        self.volume_cc = float(self._cum[0]) if self._cum.size else 0.0
        self.mean = float(mean)
        self.min = float(min)
        self.max = float(max)
        self.resolution = float(resolution)
        self.uncovered_cc = 0.0
        self.sampled_cc = self.volume_cc

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(
        cls,
        doses_gy: np.ndarray,
        volumes_cc: np.ndarray | float,
        *,
        name: str = "structure",
        method: str = "samples",
        resolution: float = 1e-4,
    ) -> DVH:
        """A DVH from dose samples and the volume each represents.

        Parameters
        ----------
        doses_gy
            Dose at each sample point (Gy).
        volumes_cc
            Volume of each sample (cm³), or one value for all.
        name, method
            Stored as is.
        resolution
            Dose quantisation for Dx/Vx (Gy).

        Raises
        ------
        PlanningError
            No samples, non-finite doses, or negative volumes.
        """
        doses = np.asarray(doses_gy, dtype=float).ravel()
        weights = np.broadcast_to(np.asarray(volumes_cc, dtype=float), doses.shape).ravel()
        if doses.size == 0:
            raise PlanningError(f"structure {name!r} is empty: no DVH can be computed")
        if not np.all(np.isfinite(doses)):
            raise PlanningError(f"dose samples of {name!r} contain NaN/inf; check the dose grid")
        if np.any(weights < 0) or not resolution > 0:
            raise PlanningError(f"volumes must be ≥ 0 and resolution > 0 for {name!r}")
        total = float(weights.sum())
        if total <= 0:
            raise PlanningError(f"structure {name!r} has zero volume: no DVH can be computed")
        q = np.rint(doses / resolution).astype(np.int64)
        lo, hi = int(q.min()), int(q.max())
        if hi - lo <= _DENSE_LEVELS:
            # Dose levels are bounded integers: a dense bincount is O(N), unlike the sort inside unique().
            dense = np.bincount(q - lo, weights=weights, minlength=hi - lo + 1)
            levels = np.flatnonzero(dense)
            uniq, binned = levels + lo, dense[levels]
        else:
            uniq, inverse = np.unique(q, return_inverse=True)
            binned = np.bincount(inverse.ravel(), weights=weights, minlength=uniq.size)
        return cls(
            uniq,
            binned,
            name=name,
            method=method,
            mean=float(np.dot(doses, weights) / total),
            min=float(doses.min()),
            max=float(doses.max()),
            resolution=resolution,
        )

    # ------------------------------------------------------------------ metrics
    @property
    def doses(self) -> np.ndarray:
        """Distinct (quantised) doses, ascending (Gy)."""
        return self._q * self.resolution

    @property
    def cumulative_cc(self) -> np.ndarray:
        """Volume receiving ≥ each of :attr:`doses` (cm³), non-increasing."""
        return self._cum.copy()

    @property
    def level_volumes_cc(self) -> np.ndarray:
        """Volume at each distinct dose level of :attr:`doses` (cm³): the differential DVH."""
        return self._cum - np.append(self._cum[1:], 0.0)

    def _last_at_least(self, volume_cc: float) -> int:
        """Index of the highest dose whose cumulative volume is ≥ ``volume_cc`` (with float slack)."""
        target = volume_cc - _REL_TOL * self.volume_cc
        # _cum is non-increasing: count entries ≥ target.
        return int(np.searchsorted(-self._cum, -target, side="right")) - 1

    def d(self, percent: float) -> float:
        """Dx%: the minimum dose to the hottest ``percent`` % of the volume (Gy).

        ``d(0)`` is the maximum and ``d(100)`` the minimum (to the histogram's resolution).

        Raises
        ------
        PlanningError
            ``percent`` outside [0, 100].
        """
        if not 0 <= percent <= 100:
            raise PlanningError(f"D{percent}%: the volume must be within 0–100 %")
        if percent == 0:
            return float(self._q[-1] * self.resolution)
        return float(self._q[self._last_at_least(percent / 100.0 * self.volume_cc)] * self.resolution)

    def d_cc(self, cc: float) -> float:
        """Dcc: the minimum dose to the hottest ``cc`` cm³ (Gy); ``d_cc(0.03)`` is the near-maximum D0.03cc.

        Warns (and returns the minimum) where the structure is smaller than ``cc``.
        """
        if cc < 0:
            raise PlanningError(f"D{cc}cc: the volume must be ≥ 0 cm³")
        if cc > self.volume_cc * (1 + _REL_TOL):
            warnings.warn(
                f"{self.name!r} ({self.volume_cc:.4g} cm³) is smaller than {cc} cm³: D{cc}cc is its minimum dose",
                PacsaiWarning,
                stacklevel=2,
            )
            return float(self._q[0] * self.resolution)
        if cc == 0:
            return float(self._q[-1] * self.resolution)
        return float(self._q[self._last_at_least(cc)] * self.resolution)

    def v_cc(self, dose_gy: float) -> float:
        """Vx in cm³: the volume receiving ≥ ``dose_gy``."""
        # A threshold within float noise of a histogram level counts that level as reached.
        threshold = math.ceil(dose_gy / self.resolution - 1e-6)
        idx = int(np.searchsorted(self._q, threshold, side="left"))
        return float(self._cum[idx]) if idx < self._cum.size else 0.0

    def v(self, dose_gy: float) -> float:
        """Vx in % of the structure volume: the volume receiving ≥ ``dose_gy``."""
        return 100.0 * self.v_cc(dose_gy) / self.volume_cc

    def curve(self, *, bin_width: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative DVH for plotting: (dose bins from 0 Gy, volume % receiving ≥ each bin)."""
        if not bin_width > 0:
            raise PlanningError("bin_width must be > 0 Gy")
        bins = np.arange(0.0, self.max + bin_width, bin_width)
        thresholds = np.ceil(bins / self.resolution - 1e-6).astype(np.int64)
        idx = np.searchsorted(self._q, thresholds, side="left")
        cum = np.append(self._cum, 0.0)[idx]
        return bins, 100.0 * cum / self.volume_cc

    def to_dict(self) -> dict[str, Any]:
        """The standard metrics: mean/min/max, D98/D95/D50/D2, D0.03cc (all Gy), volume_cc, method."""
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", PacsaiWarning
            )  # a < 0.03 cm³ structure: D0.03cc = min, stated here
            near_max = self.d_cc(0.03)
        return {
            "name": self.name,
            "volume_cc": self.volume_cc,
            "mean_gy": self.mean,
            "min_gy": self.min,
            "max_gy": self.max,
            "d98_gy": self.d(98),
            "d95_gy": self.d(95),
            "d50_gy": self.d(50),
            "d2_gy": self.d(2),
            "d0_03cc_gy": near_max,
            "uncovered_cc": self.uncovered_cc,
            "method": self.method,
        }

    def __repr__(self) -> str:
        return (
            f"DVH({self.name!r}, {self.volume_cc:.2f} cm³, mean {self.mean:.3f} Gy, "
            f"min {self.min:.3f} Gy, max {self.max:.3f} Gy)"
        )


# --------------------------------------------------------------------------------------------- sampling
def _outside(shape: tuple[int, ...], kji: np.ndarray) -> np.ndarray:
    """Points (3, N) beyond the outer voxel faces of a grid of ``shape`` (half a voxel past the last centre)."""
    out = np.zeros(kji.shape[1], dtype=bool)
    for axis, size in enumerate(shape):  # row by row: each a contiguous pass over one coordinate
        row = kji[axis]
        out |= row < -0.5
        out |= row > float(size) - 0.5
    return out


def _surely_inside(shape: tuple[int, ...], low: np.ndarray, high: np.ndarray) -> bool:
    """Whether every point whose exact coordinates lie in the box ``[low, high]`` (per axis) is inside the grid,
    with a margin (1e-6 voxel) far beyond the rounding of the computed coordinates (about 1e-13 voxel).

    ``False`` decides nothing: the caller then checks each point (:func:`_outside`).
    """
    slack = 1e-6
    bounds = np.asarray(shape, dtype=float) - 0.5
    return bool(np.all(low >= -0.5 + slack) and np.all(high <= bounds - slack))


def _bounding_box(values: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box (z, y, x slices) of a non-empty 3-D mask; each search runs within the previous one."""
    z = np.flatnonzero(values.any(axis=(1, 2)))
    slab = values[z[0] : z[-1] + 1]
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab[:, y[0] : y[-1] + 1].any(axis=(0, 1)))
    return slice(int(z[0]), int(z[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(x[0]), int(x[-1]) + 1)


def _interior(values: np.ndarray) -> np.ndarray:
    """Voxels of a 3-D mask whose six face-neighbours all belong to it (outside the array counts as outside).

    The erosion by the 6-connected cross, as six shifted ANDs: the same voxels as ``ndimage.binary_erosion``
    with a zero border, at a fraction of its cost.
    """
    padded = np.pad(values, 1)
    inner = values.copy()
    core = (slice(1, -1),) * 3
    for axis in range(3):
        for step in (-1, 1):
            shifted = list(core)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            inner &= padded[tuple(shifted)]
    return inner


def _sample(dose: np.ndarray, kji: np.ndarray, *, inside: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear dose at fractional (k, j, i) points (3, N), and which points lie outside the grid.

    Within the outer half voxel the nearest edge value is used (``mode="nearest"``), as a TPS does; the
    values of outside points are meaningless and must be handled by the caller. ``inside``: the caller knows
    every point is inside (:func:`_surely_inside`), so none is looked at again.
    """
    values = ndimage.map_coordinates(dose, kji, order=1, mode="nearest", prefilter=False)
    return values, (np.zeros(kji.shape[1], dtype=bool) if inside else _outside(dose.shape, kji))


def _supersample_offsets(s: int) -> np.ndarray:
    """(s³, 3) sub-voxel offsets in index units, centred on the voxel centre."""
    ticks = (np.arange(s) + 0.5) / s - 0.5
    grid = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid


def _check_inputs(dose: xr.DataArray, mask: xr.DataArray, label: str) -> np.ndarray:
    """The mask as a 3-D bool array, after checking units and frames of reference."""
    values = np.asarray(mask.values)
    if values.ndim != 3:
        raise PlanningError(f"mask {label!r} must be 3-D (z, y, x); got shape {values.shape}")
    values = values.astype(bool, copy=False)
    units = dose.attrs.get("units")
    if units is not None and str(units).lower() != "gy":
        raise PlanningError(
            f"dose {dose.name!r} is in {units!r}, not Gy: scale it to absolute dose before computing a DVH of {label!r}"
        )
    for_dose = str(dose.attrs.get("frame_of_reference_uid") or "")
    for_mask = str(mask.attrs.get("frame_of_reference_uid") or "")
    if for_dose and for_mask and for_dose != for_mask:
        raise PlanningError(
            f"dose (frame of reference {for_dose}) and {label!r} ({for_mask}) are in different patient frames; "
            "register them first"
        )
    return values


def _resolve_method(dose: xr.DataArray, mask: xr.DataArray, method: str, subsamples: Any, label: str) -> str:
    grid_shared = same_grid(dose, mask)
    if method == "auto":
        return "voxel" if grid_shared else "supersample"
    if method == "voxel":
        if not grid_shared:
            raise PlanningError(
                f"method='voxel' needs the dose and {label!r} on one grid; use method='supersample' or 'centre'"
            )
        return method
    if method not in ("centre", "supersample"):
        raise PlanningError(f"unknown DVH method {method!r}: use auto, voxel, centre or supersample")
    if method == "supersample" and (not isinstance(subsamples, (int, np.integer)) or subsamples < 1):
        raise PlanningError(f"subsamples must be a positive integer, got {subsamples!r}")
    return method


def _sample_points(
    dose: xr.DataArray, mask: xr.DataArray, values: np.ndarray, method: str, subsamples: int
) -> Iterator[tuple[np.ndarray, float, bool]]:
    """The structure's sample points in the dose grid's (k, j, i) index space, in chunks: (points (3, N), weight
    cc, whether every point of the chunk is surely inside the dose grid).

    ``"centre"``: every mask voxel centre; ``"supersample"``: interior voxel centres plus every surface voxel
    on a ``subsamples``³ lattice with equal shares of its volume.
    """
    mask_affine = mask.geo.affine  # each access re-checks the grid: read once
    voxel_cc = float(abs(np.linalg.det(mask_affine[:3, :3])) / 1000.0)  # as voxel_volume_cc(mask)
    # Everything below happens inside the structure's bounding box: the erosion and the index search cost the
    # structure's extent, not the grid's (a small organ on a 512² CT). The box is tight, so every neighbour the
    # erosion looks at outside it is background, exactly as the grid's own padding; the indices come out in the
    # same (k, j, i) order as on the whole grid, so the samples (and every sum over them) are unchanged.
    box = _bounding_box(values)
    origin = np.array([s.start for s in box], dtype=np.int64)
    crop = values[box]
    if method == "supersample" and subsamples > 1:
        interior = _interior(crop)
        edge = crop & ~interior
        core = crop & interior
    else:
        edge = np.zeros_like(crop)
        core = crop
    # mask (i, j, k) → dose (i, j, k), in the (k, j, i) order of the arrays, so no index columns need reversing.
    ijk_map = np.linalg.inv(dose.geo.affine) @ mask_affine
    perm = np.eye(4)[[2, 1, 0, 3]]
    kji_map = perm @ ijk_map @ perm
    lin, shift = kji_map[:3, :3], kji_map[:3, 3]
    # Axis-aligned grids (the usual CT and dose): each dose coordinate is one product and one sum of its own
    # index, k·l + t, exactly what the matrix product computes there (the other terms are exact zeros), so the
    # coordinates are built axis by axis without the (N, 3) index and coordinate arrays.
    diagonal = not np.any(lin[~np.eye(3, dtype=bool)])
    box_low = origin.astype(np.float64)
    box_high = box_low + np.asarray(crop.shape, dtype=np.float64) - 1.0

    def bounds(k_low: float, k_high: float, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact range of the dose coordinates of every index in the chunk's box and their sub-point steps."""
        low, high = box_low.copy(), box_high.copy()
        low[0], high[0] = k_low, k_high
        ends = np.stack([lin * low[None, :], lin * high[None, :]])
        return (shift + ends.min(axis=0).sum(axis=1) + steps.min(axis=0),
                shift + ends.max(axis=0).sum(axis=1) + steps.max(axis=0))

    def run(where: np.ndarray, offsets: np.ndarray, weight: float) -> Iterator[tuple[np.ndarray, float, bool]]:
        index = [axis_index + origin[axis] for axis, axis_index in enumerate(np.nonzero(where))]
        steps = offsets @ lin.T  # sub-point offsets, already mapped into the dose grid's index space
        per = max(1, _CHUNK // len(offsets))
        for start in range(0, len(index[0]), per):
            part = [axis_index[start : start + per] for axis_index in index]
            if diagonal:
                centres = [part[a].astype(np.float64) * lin[a, a] + shift[a] for a in range(3)]
            else:
                matrix = np.column_stack(part).astype(np.float64) @ lin.T + shift  # float: BLAS matmul
                centres = [matrix[:, a] for a in range(3)]
            if len(offsets) == 1:
                src = np.stack(centres)
            else:
                src = np.stack([(centres[a][:, None] + steps[None, :, a]).ravel() for a in range(3)])
            low, high = bounds(float(part[0][0]), float(part[0][-1]), steps)  # k ascends in C order
            yield src, weight, _surely_inside(dose.shape, low, high)

    yield from run(core, np.zeros((1, 3)), voxel_cc)
    if edge.any():
        offsets = _supersample_offsets(int(subsamples))
        yield from run(edge, offsets, voxel_cc / len(offsets))


def dose_coverage(
    dose: xr.DataArray,
    mask: xr.DataArray,
    *,
    method: Method = "auto",
    subsamples: int = 2,
) -> tuple[float, float]:
    """Structure volume outside the dose grid: ``(uncovered_cc, uncovered_fraction)``.

    Measured on the same sample points as :func:`dvh` with the same ``method``/``subsamples`` (a point is
    uncovered beyond the grid's outer voxel faces), so it is exactly the volume a DVH would have no dose for.
    A structure on the dose grid itself is fully covered.

    Raises
    ------
    PlanningError
        Empty mask, different frames of reference, non-absolute dose.
    """
    label = str(mask.name or "structure")
    values = _check_inputs(dose, mask, label)
    if not values.any():
        raise PlanningError(f"structure {label!r} is empty: its dose coverage is undefined")
    resolved = _resolve_method(dose, mask, method, subsamples, label)
    if resolved == "voxel":
        return 0.0, 0.0
    total = uncovered = 0.0
    for points, weight, inside in _sample_points(dose, mask, values, resolved, subsamples):
        outside = 0 if inside else int(_outside(dose.shape, points).sum())
        uncovered += outside * weight
        total += points.shape[1] * weight
    return uncovered, (uncovered / total if total > 0 else 0.0)


def dvh(
    dose: xr.DataArray,
    mask: xr.DataArray,
    *,
    name: str | None = None,
    method: Method = "auto",
    subsamples: int = 2,
    resolution: float = 1e-4,
    outside: Outside = "exclude",
) -> DVH:
    """Cumulative DVH of a structure (docs/clinical_definitions.md "DVH").

    Parameters
    ----------
    dose
        Dose grid in Gy (a pacsai volume, e.g. from :func:`pacsai.imaging.read_dose`).
    mask
        Boolean structure mask on any grid in the same frame of reference.
    name
        Structure name (default ``mask.name``).
    method
        ``"voxel"``: dose and mask share a grid, each voxel's dose is used as is. ``"centre"``: trilinear
        dose at every mask voxel centre. ``"supersample"``: like ``"centre"``, plus the surface voxels of the
        mask sampled at ``subsamples``³ points each. ``"auto"`` (default): ``"voxel"`` on a shared grid, else
        ``"supersample"``.
    subsamples
        Points per axis inside each surface voxel for ``"supersample"``.
    resolution
        Dose quantisation of the histogram (Gy); mean/min/max are exact regardless.
    outside
        Sample points beyond the dose grid: ``"exclude"`` them (the DVH is that of the covered part),
        raise (``"error"``), or count them as 0 Gy (``"zero"``). Either way :attr:`DVH.uncovered_cc` and
        :attr:`DVH.method` state the uncovered volume; see also :func:`dose_coverage`.

    Returns
    -------
    DVH

    Raises
    ------
    PlanningError
        Empty mask, different frames of reference, non-absolute dose, ``"voxel"`` on different grids, a
        structure entirely outside the dose grid, or any of it outside with ``outside="error"``.

    Warns
    -----
    PacsaiWarning
        Part of the structure lies outside the dose grid (with its cm³ and what was done).
    """
    label = name if name is not None else str(mask.name or "structure")
    if outside not in ("exclude", "error", "zero"):
        raise PlanningError(f"outside must be 'exclude', 'error' or 'zero', got {outside!r}")
    values = _check_inputs(dose, mask, label)
    if not values.any():
        raise PlanningError(f"structure {label!r} is empty: no DVH can be computed")
    resolved = _resolve_method(dose, mask, method, subsamples, label)
    if resolved == "voxel":
        return DVH.from_samples(
            np.asarray(dose.values, dtype=float)[values],
            voxel_volume_cc(mask),
            name=label,
            method="dose grid voxels (structure on the dose grid)",
            resolution=resolution,
        )

    dose_values = np.asarray(dose.values, dtype=float)
    doses: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    uncovered = total = 0.0
    for points, weight, inside in _sample_points(dose, mask, values, resolved, subsamples):
        sampled, out = _sample(dose_values, points, inside=inside)
        n_out = int(out.sum())
        uncovered += n_out * weight
        total += sampled.size * weight
        if n_out and outside == "zero":
            sampled[out] = 0.0
        elif n_out:
            sampled = sampled[~out]
        doses.append(sampled)
        weights.append(np.full(sampled.size, weight))
    if resolved == "centre" or subsamples == 1:
        text = "dose grid interpolated trilinearly at the structure's voxel centres (structure grid)"
    else:
        text = (
            "dose grid interpolated trilinearly at the structure's voxel centres (structure grid); surface "
            f"voxels sub-sampled {subsamples}×{subsamples}×{subsamples}"
        )
    if uncovered > 0:
        share = (
            f"{uncovered:.3g} cm³ ({100 * uncovered / total:.3g} %) of {label!r} lies outside the dose grid"
        )
        if outside == "error":
            raise PlanningError(
                f"{share} (dose {dose.attrs.get('sop_instance_uid') or dose.name!r}): no dose is known there; "
                "export a dose grid that covers the structure, or pass outside='exclude'"
            )
        if uncovered >= total * (1 - _REL_TOL):
            raise PlanningError(f"{label!r} lies entirely outside the dose grid: no DVH can be computed")
        done = "excluded from the DVH" if outside == "exclude" else "counted as 0 Gy"
        warnings.warn(f"{share}: {done}", PacsaiWarning, stacklevel=2)
        text += f"; {uncovered:.3g} cm³ outside the dose grid {done}"
    out_dvh = DVH.from_samples(
        np.concatenate(doses), np.concatenate(weights), name=label, method=text, resolution=resolution
    )
    out_dvh.uncovered_cc = uncovered
    out_dvh.sampled_cc = total
    return out_dvh


def coverage_of(histogram: DVH) -> tuple[float, float]:
    """``(uncovered_cc, uncovered_fraction)`` of a structure from its DVH, as :func:`dose_coverage` measures it.

    A DVH from :func:`dvh` was computed on the same sample points :func:`dose_coverage` counts, with the same
    sums in the same order, so this is the same pair (to the bit) without sampling the structure again.
    """
    total = histogram.sampled_cc
    return histogram.uncovered_cc, (histogram.uncovered_cc / total if total > 0 else 0.0)


# --------------------------------------------------------------------------------------------- plan quality
@dataclass(frozen=True)
class PlanQuality:
    """Target coverage, homogeneity and conformity of a plan (docs/clinical_definitions.md; ICRU 83, RTOG,
    Paddick 2000/2006).

    Attributes
    ----------
    target
        Target name (normally the PTV).
    prescription_gy
        Prescribed dose (Gy).
    target_volume_cc
        TV (cm³).
    coverage_v95_pct
        V95%: % of the target receiving ≥ 95 % of the prescription.
    homogeneity_index
        HI = (D2 − D98) / D50 (ICRU 83).
    piv_cc, piv50_cc
        Volume enclosed by the 100 % and 50 % prescription isodoses (cm³), within the body when given.
    tv_piv_cc
        Target volume covered by the prescription isodose (cm³).
    ci_rtog
        RTOG conformity index V_RI / TV (reference isodose = prescription).
    ci_paddick
        Paddick CI = TV_PIV² / (TV · PIV).
    gradient_index
        GI = PIV50% / PIV100% (Paddick & Lippitz 2006); NaN when PIV is 0.
    isodose_region
        Where the isodose volumes were measured.
    target_uncovered_cc
        Target volume outside the dose grid (cm³), not in TV or the indices (no dose is known there): a
        coverage figure is only as good as this is small.
    """

    target: str
    prescription_gy: float
    target_volume_cc: float
    coverage_v95_pct: float
    homogeneity_index: float
    piv_cc: float
    piv50_cc: float
    tv_piv_cc: float
    ci_rtog: float
    ci_paddick: float
    gradient_index: float
    isodose_region: str
    target_uncovered_cc: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def homogeneity_index(target: DVH) -> float:
    """ICRU 83 homogeneity index HI = (D2 − D98) / D50 of a target DVH."""
    d50 = target.d(50)
    if d50 <= 0:
        raise PlanningError(f"D50 of {target.name!r} is 0 Gy: the homogeneity index is undefined")
    return (target.d(2) - target.d(98)) / d50


def plan_quality(
    dose: xr.DataArray,
    target: xr.DataArray,
    *,
    prescription_gy: float,
    body: xr.DataArray | None = None,
    target_dvh: DVH | None = None,
    body_dvh: DVH | None = None,
    name: str | None = None,
) -> PlanQuality:
    """Coverage (V95%), homogeneity (ICRU 83 HI), conformity (RTOG, Paddick) and gradient index of a plan.

    Parameters
    ----------
    dose
        Dose grid (Gy).
    target
        Target mask (normally the PTV).
    prescription_gy
        Prescribed dose; the reference isodose for the conformity indices is 100 % of it.
    body
        BODY/External mask: isodose volumes (PIV, PIV50) are measured inside it, on its grid, with the same
        dose mapping as :func:`dvh`. Without it they are measured over the whole dose grid.
    target_dvh
        The target's DVH when already computed (saves recomputing it).
    body_dvh
        ``body``'s DVH (by :func:`dvh`, default sampling) when already computed; ignored without ``body``.
    name
        Target name (default ``target.name``).

    Returns
    -------
    PlanQuality
    """
    if not prescription_gy > 0:
        raise PlanningError(f"prescription must be > 0 Gy, got {prescription_gy}")
    label = name if name is not None else str(target.name or "PTV")
    tdvh = target_dvh if target_dvh is not None else dvh(dose, target, name=label)
    if body is not None:
        bdvh = body_dvh if body_dvh is not None else dvh(dose, body, name=str(body.name or "BODY"))
        piv, piv50 = bdvh.v_cc(prescription_gy), bdvh.v_cc(0.5 * prescription_gy)
        region = f"inside {bdvh.name!r} ({bdvh.method})"
    else:
        values = np.asarray(dose.values, dtype=float)
        cc = voxel_volume_cc(dose)
        # Same ≥ rule as DVH.v_cc, on the dose grid's voxels.
        piv = float(np.count_nonzero(values >= prescription_gy - 1e-9)) * cc
        piv50 = float(np.count_nonzero(values >= 0.5 * prescription_gy - 1e-9)) * cc
        region = "whole dose grid (no body given)"
    tv = tdvh.volume_cc
    tv_piv = tdvh.v_cc(prescription_gy)
    return PlanQuality(
        target=label,
        prescription_gy=float(prescription_gy),
        target_volume_cc=tv,
        coverage_v95_pct=tdvh.v(0.95 * prescription_gy),
        homogeneity_index=homogeneity_index(tdvh),
        piv_cc=piv,
        piv50_cc=piv50,
        tv_piv_cc=tv_piv,
        ci_rtog=piv / tv,
        ci_paddick=(tv_piv**2 / (tv * piv)) if piv > 0 else 0.0,
        gradient_index=(piv50 / piv) if piv > 0 else float("nan"),
        isodose_region=region,
        target_uncovered_cc=tdvh.uncovered_cc,
    )
