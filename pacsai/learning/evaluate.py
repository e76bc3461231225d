"""Contour agreement in mm on the true grid, and what a contour difference does to the plan's dose numbers.

Definitions (docs/clinical_definitions.md, "Contour agreement"): Dice = 2|A∩B| / (|A| + |B|).
The surface of a mask is its voxels
with at least one face-neighbour outside it (6-connectivity; the volume's edge counts as outside). Surface
distances are Euclidean distances in mm between voxel centres, from each surface voxel of A to the nearest
surface voxel of B and back, by an exact Euclidean distance transform with the grid's spacing (so anisotropic
grids are handled exactly). HD95 is the 95th percentile of the pooled symmetric distances, MSD their mean, and
surface Dice at τ the fraction of both surfaces lying within τ mm of the other.

Added path length (APL; Vaassen F et al., "Evaluation of measures for assessing time-saving of automatic
organ-at-risk segmentation in radiotherapy", Phys Imaging Radiat Oncol 2020;13:1-6): the length in mm of the
reference contour, slice by slice on the image's axial (k) planes, that lies farther than τ from the predicted
contour of the same slice, i.e. the contour a person must redraw. A slice's contour here is the boundary of the
union of its pixel squares (edges of length Δx or Δy); an edge's distance to the predicted contour is taken from
its midpoint to the nearest midpoint or corner of a predicted edge (exact between parallel edges, within a
quarter pixel otherwise).

Dose-aware comparison (:func:`dose_aware_agreement`): the same plan dose read under the reference and the
predicted contour (DVHs by :func:`pacsai.planning.dvh`), ΔDmean, ΔD0.03cc and ΔV20Gy = model − reference. Only
a total plan dose counts (:func:`pacsai.imaging.dose.check_plan_dose`), and a structure more than 1 % or 0.5 cm³
outside the dose grid gets no dose figures (the planning rule, :func:`pacsai.planning.dose_coverage`).

An empty or missing structure has no agreement: its metrics are NaN and its ``state`` says why, never a silent
Dice of 0 or 1.

Pure NumPy/SciPy (no torch), so it runs anywhere; MONAI's metrics use a different HD95 (max of the two
directed percentiles) and surface extraction, which is why they are not used here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage
from scipy.spatial import cKDTree

from pacsai.errors import ConfigError, PacsaiWarning, PlanningError, VolumeError
from pacsai.imaging.dose import check_plan_dose
from pacsai.imaging.geometry import affine_of, same_grid, spacing_of, voxel_volume_cc
from pacsai.planning.constraints import MAX_UNCOVERED_CC, MAX_UNCOVERED_PCT
from pacsai.planning.dvh import DVH, coverage_of, dose_coverage, dvh

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs

logger = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "msd", "surface_dice")


@dataclass(frozen=True)
class Agreement:
    """Agreement of one predicted structure with its reference (distances in mm)."""

    dice: float
    hd95: float
    msd: float
    surface_dice: float
    volume_pred_cc: float
    volume_ref_cc: float


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: voxels of the mask with a face-neighbour outside it (or on the array edge)."""
    mask = np.asarray(mask, dtype=bool)
    # The erosion by the 6-connected cross with a zero border (ndimage.binary_erosion's voxels), as six shifted
    # ANDs at a fraction of its cost.
    padded = np.pad(mask, 1)
    eroded = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = [slice(1, -1)] * mask.ndim
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            eroded &= padded[tuple(shifted)]
    return mask & ~eroded


def _distances_to(
    target_surface: np.ndarray, at: np.ndarray, sampling: tuple[float, float, float]
) -> np.ndarray:
    """Distance (mm) from each voxel of ``at`` (C order) to the nearest voxel of ``target_surface``.

    The nearest target voxel comes from a k-d tree over the target's voxel centres in mm (surfaces hold a small
    share of a box's voxels, so this costs far less than a distance transform of the whole box), and the
    distance is then computed from the integer offsets exactly as ``ndimage.distance_transform_edt`` does:
    sqrt((Δk·s_z)² + (Δj·s_y)² + (Δi·s_x)²). Both are exact Euclidean distances; where two target voxels at
    different offsets are equally near, the two may differ in the last bit.
    """
    targets = np.argwhere(target_surface)
    points = np.argwhere(at)
    if targets.size == 0 or points.size == 0:  # nothing to measure to or from: the transform's own answer
        edt = ndimage.distance_transform_edt(~target_surface, sampling=sampling)
        return np.asarray(edt[at], dtype=float)
    scale = np.asarray(sampling, dtype=np.float64)
    # A voxel on both surfaces is its own nearest target (the only one at 0 mm): 0.0, as the query would give.
    # The others are queried alone; each query's answer does not depend on the rest of the batch.
    distances = np.zeros(len(points))
    away = ~target_surface[at]  # in the C order of np.argwhere(at)
    if away.any():
        points = points[away]
        _, nearest = cKDTree(targets * scale).query(points * scale, k=1)
        offsets = (targets[nearest] - points).astype(np.float64) * scale
        offsets *= offsets
        distances[away] = np.sqrt(offsets[:, 0] + offsets[:, 1] + offsets[:, 2])
    return distances


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, *, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface → ref surface, ref surface → pred surface).

    Parameters
    ----------
    pred, ref
        Boolean arrays of the same shape, axes (z, y, x).
    spacing_zyx
        Voxel size along (z, y, x) in mm.
    """
    sp, sr = surface(pred), surface(ref)
    return _distances_to(sr, sp, spacing_zyx), _distances_to(sp, sr, spacing_zyx)


def agreement(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> Agreement:
    """Dice, HD95, MSD and surface Dice of two boolean masks on one grid.

    Both empty: Dice 1, distances 0. One empty: Dice 0, distances NaN (no surface to measure to), surface Dice 0.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise VolumeError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    vols = {"volume_pred_cc": n_pred * voxel_cc, "volume_ref_cc": n_ref * voxel_cc}
    if n_pred == 0 and n_ref == 0:
        return Agreement(dice=1.0, hd95=0.0, msd=0.0, surface_dice=1.0, **vols)
    dice = 2.0 * int(np.logical_and(pred, ref).sum()) / (n_pred + n_ref)
    if n_pred == 0 or n_ref == 0:
        return Agreement(dice=dice, hd95=math.nan, msd=math.nan, surface_dice=0.0, **vols)
    # Both surfaces lie in the masks' common bounding box; one voxel of background around it keeps every
    # surface voxel a surface voxel, so the distances are exact and a small organ costs a small box, not a CT.
    box = _bounding_box(pred | ref, margin=1)
    d_pr, d_rp = surface_distances(pred[box], ref[box], spacing_zyx=spacing_zyx)
    pooled = np.concatenate([d_pr, d_rp])
    within = int((d_pr <= tolerance_mm).sum() + (d_rp <= tolerance_mm).sum())
    return Agreement(
        dice=float(dice),
        hd95=float(np.percentile(pooled, 95)),
        msd=float(pooled.mean()),
        surface_dice=within / pooled.size,
        **vols,
    )


def _bounding_box(mask: np.ndarray, *, margin: int) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def _zyx_spacing(volume: xr.DataArray) -> tuple[float, float, float]:
    sx, sy, sz = spacing_of(volume)
    return float(sz), float(sy), float(sx)


def evaluate_structures(
    pred: Mapping[str, xr.DataArray],
    ref: Mapping[str, xr.DataArray],
    *,
    structures: Iterable[str] | None = None,
    tolerance_mm: float = 2.0,
    patient: str = "",
) -> pd.DataFrame:
    """Agreement per structure of predicted and reference masks on the same grid → one row per structure.

    Parameters
    ----------
    pred, ref
        Boolean volumes by structure name (pacsai volumes: dims z, y, x and ``attrs["affine"]``).
    structures
        Names to evaluate; default: those present in both, in ``ref`` order. A requested name missing from
        either side raises :class:`VolumeError`.
    tolerance_mm
        τ of the surface Dice.
    patient
        Label put in the ``patient`` column (a pseudonym where the table goes to MLflow).

    Returns
    -------
    pandas.DataFrame
        Columns ``patient, structure, dice, hd95, msd, surface_dice, volume_pred_cc, volume_ref_cc, tolerance_mm``.
    """
    names = list(structures) if structures is not None else [n for n in ref if n in pred]
    rows = []
    for name in names:
        if name not in pred or name not in ref:
            side = "prediction" if name not in pred else "reference"
            raise VolumeError(
                f"structure {name!r} is missing from the {side}; evaluate only common structures"
            )
        p, r = pred[name], ref[name]
        if not same_grid(p, r):
            raise VolumeError(
                f"structure {name!r}: prediction and reference are on different grids "
                f"({p.shape} vs {r.shape}, affines {affine_of(p).tolist()} vs {affine_of(r).tolist()}); "
                "resample the prediction onto the reference grid first"
            )
        a = agreement(p.values, r.values, spacing_zyx=_zyx_spacing(r), tolerance_mm=tolerance_mm)
        if not np.asarray(r.values).any():
            warnings.warn(f"reference {name!r} of patient {patient!r} is empty", PacsaiWarning, stacklevel=2)
        rows.append(
            {"patient": patient, "structure": name, **a.__dict__, "tolerance_mm": float(tolerance_mm)}
        )
    return pd.DataFrame(
        rows,
        columns=["patient", "structure", *METRICS, "volume_pred_cc", "volume_ref_cc", "tolerance_mm"],
    )




# ------------------------------------------------------------------------------------------ added path length


def contour_edges(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel edges that bound a 2-D mask: (edges between rows, edges between columns).

    ``rows[r, c]`` is the edge between pixel rows ``r - 1`` and ``r`` in column ``c`` (shape ``(ny + 1, nx)``,
    length Δx each); ``cols[r, c]`` the edge between columns ``c - 1`` and ``c`` in row ``r`` (shape
    ``(ny, nx + 1)``, length Δy each). The array's border counts as outside.
    """
    m = np.pad(np.asarray(mask2d, dtype=bool), 1)
    rows = m[1:, 1:-1] != m[:-1, 1:-1]
    cols = m[1:-1, 1:] != m[1:-1, :-1]
    return rows, cols


def _edge_points(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Midpoints and end points of the given edges on the half-pixel lattice (shape ``(2ny + 1, 2nx + 1)``).

    Lattice point (a, b) is the position (a/2 - 1/2, b/2 - 1/2) in pixel units: pixel centres at odd (a, b).
    """
    ny, nx = shape
    lattice = np.zeros((2 * ny + 1, 2 * nx + 1), dtype=bool)
    lattice[0::2, 1::2] |= rows  # midpoint of the edge between rows
    lattice[0::2, 0:-1:2] |= rows  # its two corners
    lattice[0::2, 2::2] |= rows
    lattice[1::2, 0::2] |= cols  # midpoint of the edge between columns
    lattice[0:-1:2, 0::2] |= cols
    lattice[2::2, 0::2] |= cols
    return lattice


def added_path_length(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> tuple[float, float]:
    """Added path length (Vaassen et al. 2020) and the reference contour's total length, both in mm.

    Parameters
    ----------
    pred, ref
        Boolean arrays (z, y, x) of one grid; contours are compared slice by slice along z.
    spacing_zyx
        Voxel size along (z, y, x) in mm (only y and x matter: APL is measured in-plane).
    tolerance_mm
        Reference contour within this distance of the predicted contour needs no editing.

    Returns
    -------
    (apl_mm, reference_length_mm)
        The reference contour farther than ``tolerance_mm`` from the predicted contour of its slice (a slice
        without predicted contour counts whole), and the reference contour's full length.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or ref.ndim != 3:
        raise VolumeError(
            f"added path length needs two 3-D masks of one shape, got {pred.shape} and {ref.shape}"
        )
    _, sy, sx = (float(v) for v in spacing_zyx)
    slices = np.flatnonzero(ref.any(axis=(1, 2)))
    if slices.size == 0:
        return 0.0, 0.0
    # Every slice's contours at once: edge counts per slice, and which reference edges lie within τ of the
    # predicted contour of their slice (:func:`_near_edges`). A slice where some distance is within rounding
    # of τ is measured as before, by a distance transform of that slice (:func:`_slice_apl`).
    # On the reference's bounding box grown by more than τ: predicted contour beyond it is farther than τ from
    # every reference edge (and the box's border, where a cut predicted mask gets edges of its own, too).
    margin = int(math.ceil(tolerance_mm / min(sy, sx))) + 2
    ys = np.flatnonzero(ref.any(axis=(0, 2)))
    xs = np.flatnonzero(ref.any(axis=(0, 1)))
    box = (slices, slice(max(int(ys[0]) - margin, 0), min(int(ys[-1]) + margin + 1, ref.shape[1])),
           slice(max(int(xs[0]) - margin, 0), min(int(xs[-1]) + margin + 1, ref.shape[2])))
    r_rows, r_cols = _slice_edges(ref[box])
    p_rows, p_cols = _slice_edges(pred[box])
    drawn = np.asarray(p_rows.any(axis=(1, 2)) | p_cols.any(axis=(1, 2)))
    far_rows, far_cols, unsure = _far_edge_counts(r_rows, r_cols, p_rows, p_cols, sy, sx, tolerance_mm)
    row_counts, col_counts = r_rows.sum(axis=(1, 2)), r_cols.sum(axis=(1, 2))
    apl = total = 0.0
    for n, k in enumerate(slices):
        # sums in slice order, each slice's terms from its integer edge counts: as the slice-by-slice loop
        length = float(row_counts[n]) * sx + float(col_counts[n]) * sy
        total += length
        if not drawn[n]:
            apl += length  # nothing drawn on this slice: the whole reference contour is to be drawn
        elif unsure[n]:
            apl += _slice_apl(pred[k], ref[k], sy, sx, tolerance_mm)
        else:
            apl += float(far_rows[n]) * sx + float(far_cols[n]) * sy
    return apl, total


def _slice_edges(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`contour_edges` of every slice of a (slices, y, x) stack."""
    m = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    return m[:, 1:, 1:-1] != m[:, :-1, 1:-1], m[:, 1:-1, 1:] != m[:, 1:-1, :-1]


def _far_edge_counts(
    r_rows: np.ndarray, r_cols: np.ndarray, p_rows: np.ndarray, p_cols: np.ndarray,
    sy: float, sx: float, tolerance_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: reference edges between rows and between columns farther than τ from the predicted contour,
    and whether some edge's distance lies within 1e-7 mm of τ (then the counts of that slice are not used).

    Distances are those of the slice's distance transform (:func:`_slice_apl`): from an edge's midpoint to the
    nearest midpoint or corner of a predicted edge (:func:`_edge_points`) of the same slice, found with a k-d
    tree over all slices (a slice's points are set apart from the others' by more than τ). Both are exact
    Euclidean distances whose rounding (~1e-13 mm) is far below the 1e-7 mm band, so outside the band both
    give the same answer to "farther than τ"; inside it, the slice's own transform decides.
    """
    n_slices = r_rows.shape[0]
    # The lattice points of :func:`_edge_points` (a, b on the half-pixel lattice), each edge's midpoint and two
    # corners (a point shared by two edges comes twice: the nearest distance is the same).
    n, r, c = np.nonzero(p_rows)
    rows = [np.column_stack([n, 2 * r, 2 * c + step]) for step in (0, 1, 2)]
    n, r, c = np.nonzero(p_cols)
    cols = [np.column_stack([n, 2 * r + step, 2 * c]) for step in (0, 1, 2)]
    gap = 2.0 * tolerance_mm + 1.0  # between slices: farther than any distance that is looked at
    scale = np.array([gap, sy / 2.0, sx / 2.0])
    band = 1e-7
    far_counts, unsure = [], np.zeros(n_slices, dtype=bool)
    tree = cKDTree(np.concatenate(rows + cols) * scale)
    for edges, (da, db) in ((r_rows, (0, 1)), (r_cols, (1, 0))):
        n, r, c = np.nonzero(edges)
        points = np.column_stack([n, 2 * r + da, 2 * c + db]) * scale
        dist, _ = tree.query(points, k=1, distance_upper_bound=tolerance_mm + 1.0)
        far = dist > tolerance_mm + band
        unsure |= np.bincount(n[np.abs(dist - tolerance_mm) <= band], minlength=n_slices) > 0
        far_counts.append(np.bincount(n[far], minlength=n_slices))
    return far_counts[0], far_counts[1], unsure


def _slice_apl(pred2d: np.ndarray, ref2d: np.ndarray, sy: float, sx: float, tolerance_mm: float) -> float:
    """Added path length (mm) of one slice with predicted contour, by a distance transform of the half-pixel
    lattice on the reference's bounding box grown beyond τ."""
    # Predicted contour beyond this many pixels of the reference's bounding box is farther than τ from every
    # reference edge, so the slice is cropped to that box (a 512×512 CT would otherwise cost a full lattice).
    margin = int(math.ceil(tolerance_mm / min(sy, sx))) + 2
    ys, xs = np.nonzero(ref2d)
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, ref2d.shape[0])
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, ref2d.shape[1])
    r2, p2 = ref2d[y0:y1, x0:x1], pred2d[y0:y1, x0:x1]
    r_rows, r_cols = contour_edges(r2)
    p_rows, p_cols = contour_edges(p2)
    if not (p_rows.any() or p_cols.any()):
        return float(r_rows.sum()) * sx + float(r_cols.sum()) * sy
    marks = _edge_points(p_rows, p_cols, r2.shape)
    dist = ndimage.distance_transform_edt(~marks, sampling=(sy / 2.0, sx / 2.0))
    far_rows = r_rows & (dist[0::2, 1::2] > tolerance_mm)
    far_cols = r_cols & (dist[1::2, 0::2] > tolerance_mm)
    return float(far_rows.sum()) * sx + float(far_cols.sum()) * sy


# ---------------------------------------------------------------------------------------- dose-aware comparison

STATES = ("present", "empty pred", "empty ref", "missing")
V_GY = 20.0  # V20Gy: the lung figure of QUANTEC (pneumonitis), reported for every structure

CONTOUR_COLUMNS = (
    "dice",
    "hd95",
    "msd",
    "surface_dice",
    "added_path_length_mm",
    "ref_path_length_mm",
)
DOSE_COLUMNS = (
    "dmean_ref_gy",
    "dmean_pred_gy",
    "delta_dmean_gy",
    "d0_03cc_ref_gy",
    "d0_03cc_pred_gy",
    "delta_d0_03cc_gy",
    "v20_ref_pct",
    "v20_pred_pct",
    "delta_v20_pct",
    "dose_uncovered_ref_cc",
    "dose_uncovered_pred_cc",
)
AGREEMENT_COLUMNS = (
    "patient",
    "structure",
    "state",
    *CONTOUR_COLUMNS,
    "volume_pred_cc",
    "volume_ref_cc",
    "tolerance_mm",
    "dose_state",
    *DOSE_COLUMNS,
    "reason",
)


def _histogram(dose: xr.DataArray, mask: xr.DataArray, cached: DVH | None) -> tuple[DVH | None, float, bool]:
    """The structure's DVH under ``dose`` (``None`` when it lies entirely outside the grid), the volume outside
    the dose grid (cm³), and whether that makes its dose figures unreliable: the planning rule
    (:data:`pacsai.planning.constraints.MAX_UNCOVERED_PCT` or ``MAX_UNCOVERED_CC``), one rule for both.

    The DVH and the coverage come from one sampling of the structure (:func:`pacsai.planning.dvh.coverage_of`
    gives exactly what :func:`pacsai.planning.dose_coverage` would), or none where ``cached`` already holds its DVH.
    """
    histogram = cached if cached is not None and "counted as 0 Gy" not in cached.method else None
    if histogram is None:
        try:
            with warnings.catch_warnings():
                # what lies outside the dose grid (within the limits) is excluded and reported as dose_uncovered_*_cc
                warnings.simplefilter("ignore", PacsaiWarning)
                histogram = dvh(dose, mask, outside="exclude")  # named as the mask, as dose_coverage's errors
        except PlanningError as err:
            if "entirely outside" not in str(err):
                raise
            cc, _ = dose_coverage(dose, mask)
            return None, cc, True
    cc, fraction = coverage_of(histogram)
    return histogram, cc, (cc > MAX_UNCOVERED_CC or 100.0 * fraction > MAX_UNCOVERED_PCT)


def _dose_figures(histogram: DVH) -> tuple[float, float, float]:
    """(Dmean, D0.03cc, V20Gy %) of a structure's DVH (:func:`pacsai.planning.dvh`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)  # a structure under 0.03 cm³: D0.03cc is its minimum
        figures = histogram.to_dict()
        v20 = histogram.v(V_GY)
    return float(figures["mean_gy"]), float(figures["d0_03cc_gy"]), float(v20)


def _geometry(
    name: str, p: xr.DataArray | None, r: xr.DataArray | None, tolerance_mm: float
) -> tuple[dict[str, object], str]:
    """State, volumes and contour metrics of one structure, and why a metric is missing ("" if none is)."""
    row: dict[str, object] = {"volume_pred_cc": math.nan, "volume_ref_cc": math.nan}
    if p is None or r is None:
        for key, mask in (("volume_pred_cc", p), ("volume_ref_cc", r)):
            if mask is not None:
                row[key] = float(np.asarray(mask.values, dtype=bool).sum()) * voxel_volume_cc(mask)
        row["state"] = "missing"
        return row, f"{name} is missing from the {'prediction' if p is None else 'reference'}"
    if not same_grid(p, r):
        raise VolumeError(
            f"structure {name!r}: prediction and reference are on different grids "
            f"({p.shape} vs {r.shape}, affines {affine_of(p).tolist()} vs {affine_of(r).tolist()}); "
            "resample the prediction onto the reference grid first"
        )
    pv, rv = np.asarray(p.values, dtype=bool), np.asarray(r.values, dtype=bool)
    voxel_cc = voxel_volume_cc(r)
    row.update(volume_pred_cc=float(pv.sum()) * voxel_cc, volume_ref_cc=float(rv.sum()) * voxel_cc)
    if not rv.any():
        row["state"] = "empty ref"
        return row, f"the reference {name} is empty" + (" and so is the prediction" if not pv.any() else "")
    if not pv.any():
        row["state"] = "empty pred"
        return row, f"the predicted {name} is empty (the model found nothing)"
    spacing = _zyx_spacing(r)
    a = agreement(pv, rv, spacing_zyx=spacing, tolerance_mm=tolerance_mm)
    apl, length = added_path_length(pv, rv, spacing_zyx=spacing, tolerance_mm=tolerance_mm)
    row.update(
        state="present",
        dice=a.dice,
        hd95=a.hd95,
        msd=a.msd,
        surface_dice=a.surface_dice,
        added_path_length_mm=apl,
        ref_path_length_mm=length,
    )
    return row, ""


def _dose_difference(
    name: str,
    p: xr.DataArray,
    r: xr.DataArray,
    dose: xr.DataArray,
    cached: Mapping[tuple[str, str], DVH],
) -> tuple[dict[str, object], str]:
    """Dose figures under both contours of a present structure, unless too much of either lies off the grid."""
    h_ref, out_ref, bad_ref = _histogram(dose, r, cached.get((name, "ref")))
    h_pred, out_pred, bad_pred = _histogram(dose, p, cached.get((name, "pred")))
    row: dict[str, object] = {"dose_uncovered_ref_cc": out_ref, "dose_uncovered_pred_cc": out_pred}
    if bad_ref or bad_pred or h_ref is None or h_pred is None:
        row["dose_state"] = "unreliable"
        return row, (
            f"{name} lies partly outside the dose grid (reference {out_ref:.2f} cm³, prediction "
            f"{out_pred:.2f} cm³; limit {MAX_UNCOVERED_PCT:g} % or {MAX_UNCOVERED_CC:g} cm³): no dose figures"
        )
    dm_r, d03_r, v_r = _dose_figures(h_ref)
    dm_p, d03_p, v_p = _dose_figures(h_pred)
    row.update(
        dose_state="evaluated",
        dmean_ref_gy=dm_r,
        dmean_pred_gy=dm_p,
        delta_dmean_gy=dm_p - dm_r,
        d0_03cc_ref_gy=d03_r,
        d0_03cc_pred_gy=d03_p,
        delta_d0_03cc_gy=d03_p - d03_r,
        v20_ref_pct=v_r,
        v20_pred_pct=v_p,
        delta_v20_pct=v_p - v_r,
    )
    return row, ""


def _compare_one(
    name: str,
    p: xr.DataArray | None,
    r: xr.DataArray | None,
    dose: xr.DataArray | None,
    tolerance_mm: float,
    cached: Mapping[tuple[str, str], DVH],
) -> dict[str, object]:
    row: dict[str, object] = {c: math.nan for c in (*CONTOUR_COLUMNS, *DOSE_COLUMNS)}
    row.update(structure=name, tolerance_mm=tolerance_mm)
    geometry, why = _geometry(name, p, r, tolerance_mm)
    row.update(geometry)
    reasons = [why]
    if dose is None:
        row["dose_state"] = "no dose"
    elif p is None or r is None or row["state"] != "present":
        row["dose_state"] = "not evaluable"
    else:
        figures, why = _dose_difference(name, p, r, dose, cached)
        row.update(figures)
        reasons.append(why)
    row["reason"] = "; ".join(text for text in reasons if text)
    return row


def dose_aware_agreement(
    pred: Mapping[str, xr.DataArray],
    ref: Mapping[str, xr.DataArray],
    dose: xr.DataArray | None = None,
    *,
    tolerance_mm: float = 2.0,
    structures: Iterable[str] | None = None,
    patient: str = "",
    dvhs: Mapping[tuple[str, str], DVH] | None = None,
) -> pd.DataFrame:
    """Model contours against reference contours: geometry, editing effort and, with a plan dose, the dose.

    Parameters
    ----------
    pred, ref
        Boolean masks by structure name (pacsai volumes), each predicted mask on its reference's grid.
    dose
        The plan dose in Gy (e.g. :func:`pacsai.imaging.read_dose`) in the masks' frame of reference, on any
        grid; ``None``: geometry only.
    tolerance_mm
        τ of the surface Dice and of the added path length (2 mm: about a CT pixel or two, within which
        clinicians accept a contour unedited).
    structures
        Names to compare; default every name of ``ref`` then those only in ``pred``.
    patient
        Label of the ``patient`` column (a pseudonym where the table goes to MLflow).
    dvhs
        DVHs already computed under this ``dose`` for these very masks, keyed by ``(structure, "pred")`` and
        ``(structure, "ref")``, by :func:`pacsai.planning.dvh` with its default sampling and ``outside="exclude"``
        (e.g. those of a planning report's analysis): used as they are, with their coverage
        (:func:`pacsai.planning.dvh.coverage_of`), instead of sampling the structure again. The others (and a
        DVH that counts uncovered volume as 0 Gy) are computed here.

    Returns
    -------
    pandas.DataFrame
        One row per structure, columns :data:`AGREEMENT_COLUMNS`: ``state`` ("present", "empty pred",
        "empty ref", "missing"); ``dice``, ``hd95``, ``msd`` (mm), ``surface_dice``, ``added_path_length_mm``,
        ``ref_path_length_mm``; ``volume_pred_cc``, ``volume_ref_cc``; ``dose_state`` ("evaluated", "no dose",
        "not evaluable", "unreliable"); ``dmean_ref_gy``, ``dmean_pred_gy``, ``delta_dmean_gy``,
        ``d0_03cc_ref_gy``, ``d0_03cc_pred_gy``, ``delta_d0_03cc_gy``, ``v20_ref_pct``, ``v20_pred_pct``,
        ``delta_v20_pct`` (deltas = prediction − reference), ``dose_uncovered_ref_cc``,
        ``dose_uncovered_pred_cc``; ``reason`` (why a figure is missing). Metrics of a structure that is not
        "present", and dose figures that are not "evaluated", are NaN.

    Raises
    ------
    DoseError
        ``dose`` is not a total plan dose in Gy (:class:`pacsai.imaging.dose.NotPlanDoseError`, from
        :func:`pacsai.imaging.dose.check_plan_dose`).
    VolumeError
        A predicted mask is not on its reference's grid.
    PlanningError
        Dose and masks in different frames of reference (from :func:`pacsai.planning.dvh`).
    """
    if not float(tolerance_mm) > 0:
        raise ConfigError(f"tolerance_mm must be > 0 mm, got {tolerance_mm!r}")
    if dose is not None:
        check_plan_dose(dose)
    names = list(structures) if structures is not None else [*ref, *(n for n in pred if n not in ref)]
    rows = [
        {"patient": patient, **_compare_one(n, pred.get(n), ref.get(n), dose, float(tolerance_mm), dvhs or {})}
        for n in names
    ]
    return pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS))


# ------------------------------------------------------------------------------------------ over a cohort

SUMMARY_CONTOUR = ("dice", "hd95", "msd", "surface_dice", "added_path_length_mm")
SUMMARY_DELTAS = ("delta_dmean_gy", "delta_d0_03cc_gy", "delta_v20_pct")
# summary column → MLflow metric prefix (metric name = prefix + "_" + structure)
METRIC_PREFIX = {
    "dice": "dice",
    "hd95": "hd95",
    "msd": "msd",
    "surface_dice": "surface_dice",
    "added_path_length_mm": "apl",
    "delta_dmean_gy": "delta_dmean",
    "abs_delta_dmean_gy": "abs_delta_dmean",
    "delta_d0_03cc_gy": "delta_d0_03cc",
    "abs_delta_d0_03cc_gy": "abs_delta_d0_03cc",
    "delta_v20_pct": "delta_v20",
    "abs_delta_v20_pct": "abs_delta_v20",
}


def _counted(states: pd.Series, skip: Iterable[str]) -> str:
    counts = states[~states.isin(list(skip))].value_counts()
    return ", ".join(f"{state} in {n} of {len(states)}" for state, n in counts.items())


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per structure over patients: mean contour metrics, mean and worst dose deltas → index ``structure``.

    A contour metric is NaN unless the structure is "present" in every case (an empty prediction in one patient
    must not vanish into the mean of the others); the dose deltas likewise over the cases that have a plan dose
    (NaN when one of them is "not evaluable" or "unreliable", or none has a dose). ``abs_delta_*`` is the
    largest |Δ| over patients (what a per-patient dose limit is checked against), ``delta_*`` the mean signed
    Δ (the model's bias). ``note`` says why a figure is NaN. Tables without ``state`` (from
    :func:`evaluate_structures`) count every row as present.
    """
    out = []
    for name, sub in table.groupby("structure", sort=False):
        sub = sub.reset_index(drop=True)
        states = sub["state"] if "state" in sub else pd.Series(["present"] * len(sub))
        dose_states = sub["dose_state"] if "dose_state" in sub else pd.Series(["no dose"] * len(sub))
        row: dict[str, object] = {
            "structure": name,
            "n_cases": len(sub),
            "n_present": int((states == "present").sum()),
        }
        notes = []
        all_present = bool((states == "present").all())
        for col in SUMMARY_CONTOUR:
            row[col] = float(sub[col].mean()) if all_present and col in sub else math.nan
        if not all_present:
            notes.append(_counted(states, ["present"]))
        dosed = sub[dose_states != "no dose"]
        row["n_dose"] = len(dosed)
        dose_ok = len(dosed) > 0 and bool((dose_states[dosed.index] == "evaluated").all())
        for col in SUMMARY_DELTAS:
            values = dosed[col].astype(float) if dose_ok else pd.Series(dtype=float)
            row[col] = float(values.mean()) if dose_ok else math.nan
            row[f"abs_{col}"] = float(values.abs().max()) if dose_ok else math.nan
        if len(dosed) == 0:
            notes.append("no case has a plan dose")
        elif not dose_ok and all_present:  # else the contour note already says why
            notes.append("dose " + _counted(dose_states[dosed.index], ["evaluated"]))
        row["note"] = "; ".join(notes)
        out.append(row)
    columns = ["structure", "n_cases", "n_present", *SUMMARY_CONTOUR, "n_dose"]
    columns += [c for d in SUMMARY_DELTAS for c in (d, f"abs_{d}")] + ["note"]
    return pd.DataFrame(out, columns=columns).set_index("structure")


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The summary as flat metric names: ``dice_<S>``, ``hd95_<S>``, ``apl_<S>``, ``delta_dmean_<S>``,
    ``abs_delta_dmean_<S>`` ... (see :data:`METRIC_PREFIX`); NaN where not evaluable."""
    metrics: dict[str, float] = {}
    for structure, values in summary.iterrows():
        for col, prefix in METRIC_PREFIX.items():
            if col in values:
                metrics[f"{prefix}_{structure}"] = float(values[col])
    return metrics


def plan_dose_of_study(pacs: Pacs, study_uid: str) -> tuple[xr.DataArray | None, str]:
    """The total plan dose of a study on the PACS, or ``None`` and why not.

    Every RTDOSE series of the study is read; the last one that :func:`check_plan_dose` accepts is used (a
    study with beam or fraction doses beside the plan dose still gets its plan dose).
    """
    from pacsai.errors import PacsaiError
    from pacsai.imaging import read_dose

    series = pacs.search_series(StudyInstanceUID=study_uid)
    if series.empty or "Modality" not in series:
        return None, f"study {study_uid} has no RTDOSE"
    doses = series[series.Modality == "RTDOSE"]
    if doses.empty:
        return None, f"study {study_uid} has no RTDOSE"
    refused = []
    chosen = None
    for uid in doses.SeriesInstanceUID:
        for path in pacs.retrieve_series(study_uid, str(uid), progress=False):
            try:
                dose = read_dose(path)
                check_plan_dose(dose)
            except PacsaiError as err:
                refused.append(str(err))
                continue
            chosen = dose
    if chosen is None:
        return None, "no usable plan dose: " + "; ".join(refused)
    return chosen, ""
