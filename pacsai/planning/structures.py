"""Structure geometry for treatment planning: volumes, diameters, margins, PRVs, distances and overlaps.

Every function takes pacsai volumes (:mod:`pacsai.imaging.geometry`): boolean masks with dims ``("z", "y", "x")``
and ``attrs["affine"]``. Distances are in mm in the patient (LPS) frame and come from the affine, so anisotropic
grids are exact; oblique grids are exact wherever the grid axes are orthogonal (EDT-based operations need that,
and a sheared grid raises :class:`~pacsai.errors.PlanningError`).

Definitions (docs/clinical_definitions.md):

* **Volume** (cm³) = voxel count × voxel volume, on the mask's own grid (for an RTSTRUCT, the grid it was
  rasterised on — state it in the report).
* **Longest 3D diameter** = maximum distance between surface points. The mask is taken as the union of its voxel
  cells, so the points are the *corners* of surface voxels (see :func:`longest_diameter`).
* **Margins** (ICRU 50/62/83): CTV = GTV ⊕ CTV margin, clipped to the body; PTV = CTV ⊕ set-up margin; by an
  exact Euclidean distance transform with an ellipsoidal structuring element in mm, not voxel dilation steps.
  van Herk population margin M = 2.5 Σ + 0.7 σ. PRV = OAR ⊕ margin.
* **Geometry vs target**: minimum surface distance OAR↔PTV (mm), overlap (cm³ and % of the OAR).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from pacsai.errors import PacsaiWarning, PlanningError
from pacsai.imaging.geometry import like, same_grid, voxel_volume_cc

logger = logging.getLogger(__name__)

#: A margin: one isotropic value in mm, a ``(lr, ap, si)`` tuple, or a mapping with keys ``lr``/``ap``/``si``.
MarginLike = float | Sequence[float] | Mapping[str, float]

_PATIENT_AXES = ("lr", "ap", "si")  # LPS x (right→left), y (anterior→posterior), z (inferior→superior)
_AXIS_ALIASES = {
    "lr": "lr", "rl": "lr", "x": "lr", "left_right": "lr", "leftright": "lr",
    "ap": "ap", "pa": "ap", "y": "ap", "anterior_posterior": "ap", "antpost": "ap",
    "si": "si", "is": "si", "z": "si", "superior_inferior": "si", "supinf": "si",
}  # fmt: skip
_EPS = 1e-9  # float slack on "distance ≤ margin", so a voxel exactly at the margin counts as inside


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StructureStats:
    """Geometry of one structure (all lengths mm, LPS frame).

    Attributes
    ----------
    name
        Structure name.
    volume_cc
        Voxel count × voxel volume (cm³).
    n_voxels
        Number of voxels in the mask.
    longest_diameter_mm
        Longest 3D diameter (corner points of surface voxels, :func:`longest_diameter`).
    longest_axial_diameter_mm
        Longest in-plane (axial slice) diameter, the RECIST measurement (:func:`longest_axial_diameter`).
    centroid_lps
        Centre of mass of the voxel centres, LPS mm.
    n_components
        Number of 26-connected components.
    touches_edge
        True where the mask reaches the edge of its grid: the structure may be cut off by the field of view.
    """

    name: str
    volume_cc: float
    n_voxels: int
    longest_diameter_mm: float
    longest_axial_diameter_mm: float
    centroid_lps: tuple[float, float, float]
    n_components: int
    touches_edge: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        out = asdict(self)
        out["centroid_lps"] = list(self.centroid_lps)
        return out


@dataclass(frozen=True)
class TargetRelation:
    """How an organ at risk sits against a target (e.g. the PTV).

    Attributes
    ----------
    name
        OAR name.
    target
        Target name.
    min_distance_mm
        Minimum surface distance (:func:`min_surface_distance`); 0 when they overlap.
    overlap_cc
        Volume of OAR ∩ target (cm³).
    overlap_pct
        Overlap as % of the OAR volume (0 for an empty OAR).
    """

    name: str
    target: str
    min_distance_mm: float
    overlap_cc: float
    overlap_pct: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


# --------------------------------------------------------------------------------------------- helpers
def _as_mask(mask: xr.DataArray, *, what: str = "mask") -> np.ndarray:
    return _mask_and_affine(mask, what=what)[0]


def _mask_and_affine(mask: xr.DataArray, *, what: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """The mask's boolean voxels and its affine (read once: every ``geo`` access re-checks the grid)."""
    if not isinstance(mask, xr.DataArray):
        raise PlanningError(
            f"{what} must be a pacsai volume (xarray.DataArray with attrs['affine']); got {type(mask).__name__}"
        )
    affine = mask.geo.affine  # raises VolumeError naming the array when the affine is missing or stale
    values = np.asarray(mask.values)
    if values.ndim != 3:
        raise PlanningError(f"{what} {mask.name!r} must be 3-D (z, y, x); got shape {values.shape}")
    if values.dtype != bool:
        uniq = np.unique(values)
        if not np.all(np.isin(uniq, (0, 1))):
            raise PlanningError(
                f"{what} {mask.name!r} is not binary (values {uniq[:5].tolist()}...); threshold it first"
            )
        values = values.astype(bool)
    return values, affine


def _require_same_grid(a: xr.DataArray, b: xr.DataArray) -> None:
    if not same_grid(a, b):
        raise PlanningError(
            f"structures {a.name!r} and {b.name!r} are on different grids (shapes {a.shape} vs {b.shape}); "
            "resample one onto the other first: pacsai.imaging.resample(moving, like=fixed, order=0)"
        )


def _orthogonal_spacing(volume: xr.DataArray) -> np.ndarray:
    """Grid spacing (Δz, Δy, Δx) in mm, after checking the axes are orthogonal (an EDT needs that)."""
    direction = volume.geo.direction
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise PlanningError(
            f"grid of {volume.name!r} is sheared (non-orthogonal axes, e.g. gantry tilt); distances and margins "
            "need an orthogonal grid: resample onto one with pacsai.imaging.resample"
        )
    return volume.geo.spacing


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box (z, y, x slices) of a 3-D mask, ``None`` when empty; each search runs within the last."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    if z.size == 0:
        return None
    slab = mask[z[0] : z[-1] + 1]
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab[:, y[0] : y[-1] + 1].any(axis=(0, 1)))
    return slice(int(z[0]), int(z[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(x[0]), int(x[-1]) + 1)


def _cropped(values: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The mask's bounding box and its (k, j, i) origin in the grid; an empty mask gives an empty crop at 0."""
    box = _bbox(values)
    if box is None:
        return values[:0, :0, :0], (0, 0, 0)
    return values[box], (box[0].start, box[1].start, box[2].start)


def _padded(box: tuple[slice, ...], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(
        slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, shape, strict=True)
    )


# --------------------------------------------------------------------------------------------- size/shape
def volume_cc(mask: xr.DataArray) -> float:
    """Volume of a structure in cm³ = voxel count × voxel volume (docs/clinical_definitions.md "Volumes").

    Parameters
    ----------
    mask
        Boolean pacsai volume.

    Returns
    -------
    float
        cm³, on the mask's own grid.
    """
    return float(np.count_nonzero(_as_mask(mask))) * voxel_volume_cc(mask)


def centroid(mask: xr.DataArray) -> tuple[float, float, float]:
    """Centre of mass of the voxel centres, in LPS mm.

    Raises
    ------
    PlanningError
        When the mask is empty.
    """
    crop, origin = _cropped(_as_mask(mask))
    if crop.size == 0 or not crop.any():
        raise PlanningError(f"structure {mask.name!r} is empty: it has no centroid")
    a, b, c = (float(v) for v in mask.geo.world(_mean_index(crop, origin)))
    return a, b, c


def _mean_index(crop: np.ndarray, origin: Sequence[int]) -> np.ndarray:
    """Mean (k, j, i) grid index of the voxels of a crop at ``origin``, from per-axis voxel counts.

    The index sums are exact integers, so this equals the mean of every voxel's index (``np.argwhere(...).mean``,
    exact below 2⁵³) to the bit, without a (voxels × 3) index array.
    """
    n = int(np.count_nonzero(crop))
    sums = []
    for axis in range(3):
        counts = crop.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        sums.append(int(np.dot(counts, np.arange(origin[axis], origin[axis] + crop.shape[axis], dtype=np.int64))))
    return np.array([float(total) / n for total in sums])


def _row_extreme_corners(
    values: np.ndarray, *, through_slices: bool = True, origin: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """Corner points (index space, columns i, j, k) whose convex hull equals that of all voxel cells.

    Along each row (fixed k, j) only the first and the last voxel can contribute hull points, and of those only
    their outer corners, so the hull of these points is the hull of every cell of the mask — at a fraction of
    the points (2 × rows instead of 8 × surface voxels). With ``through_slices=False`` the corners stay in
    each slice's plane (k integer): the pixel corners used for in-plane diameters. ``values`` may be a crop of
    the grid at ``origin`` (k, j, i): the points are in the grid's index space either way, in the same order.
    """
    rows = values.any(axis=-1)
    k, j = np.nonzero(rows)
    if k.size == 0:
        return np.zeros((0, 3))
    first = values[k, j].argmax(axis=-1) + origin[2]
    last = origin[2] + values.shape[-1] - 1 - values[k, j, ::-1].argmax(axis=-1)
    k, j = k + origin[0], j + origin[1]
    depths = (-0.5, 0.5) if through_slices else (0.0,)
    corners = [
        np.column_stack([i_edge, j + dj, k + dk])
        for i_edge in (first - 0.5, last + 0.5)
        for dj in (-0.5, 0.5)
        for dk in depths
    ]
    return np.concatenate(corners).astype(float)


def _max_pairwise(points: np.ndarray) -> float:
    """Largest distance between any two points (N, d), over their convex hull's vertices."""
    if len(points) < 2:
        return 0.0
    return _farthest(points[_hull_candidates(points)])


def _hull_candidates(points: np.ndarray) -> np.ndarray:
    """Indices of the points (N ≥ 2, d) the largest distance is sought over: their convex hull's vertices, or
    all of them for a degenerate (collinear/coplanar) set, where Qhull has no hull."""
    if len(points) > points.shape[1] + 1:
        try:
            return np.asarray(ConvexHull(points).vertices)
        except QhullError:
            pass
    return np.arange(len(points))


def _farthest(candidates: np.ndarray) -> float:
    """Largest distance between any two of the points, by brute force."""
    best = 0.0
    chunk = max(1, 4_000_000 // max(len(candidates), 1))
    for start in range(0, len(candidates), chunk):
        block = candidates[start : start + chunk]
        d2 = ((block[:, None, :] - candidates[None, :, :]) ** 2).sum(axis=-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def longest_diameter(mask: xr.DataArray) -> float:
    """Longest 3D diameter (mm): the maximum distance between surface points (docs/clinical_definitions.md).

    The mask is taken as the union of its voxel *cells*, so the candidate points are the voxel corners (of the
    first and last voxel of every grid row, which span the same convex hull as all of them), mapped to LPS mm
    through the affine (anisotropic and oblique grids are exact); the maximum is taken over the vertices of
    their convex hull (``scipy.spatial.ConvexHull``). Corners rather than voxel
    centres because that is the extent of the voxelised object: a row of n voxels measures n·Δ, as a caliper on
    the image would, a box of voxels measures its exact space diagonal, and a single voxel is not 0 mm. Centres
    would bias every diameter short by about one voxel.

    Parameters
    ----------
    mask
        Boolean pacsai volume.

    Returns
    -------
    float
        mm; 0.0 for an empty mask.
    """
    crop, origin = _cropped(_as_mask(mask))
    return _longest_diameter(crop, origin, mask.geo.affine)


def _longest_diameter(crop: np.ndarray, origin: Sequence[int], affine: np.ndarray) -> float:
    corners = _row_extreme_corners(crop, origin=origin)
    if corners.size == 0:
        return 0.0
    return _max_pairwise(corners @ affine[:3, :3].T)  # translation does not change distances


def axial_diameters(mask: xr.DataArray) -> np.ndarray:
    """Longest in-plane diameter (mm) on every slice (grid index k) of the mask; 0 where the slice is empty.

    In-plane = within the grid's slice plane (the axial plane for an axial acquisition), measured like
    :func:`longest_diameter` over the pixel corners of the slice (only the slice plane's two in-plane axes).
    """
    values = _as_mask(mask)
    crop, origin = _cropped(values)
    return _axial_diameters(crop, origin, mask.geo.affine, values.shape[0])


def _axial_diameters(crop: np.ndarray, origin: Sequence[int], affine: np.ndarray, n_slices: int) -> np.ndarray:
    return _axial_hulls(crop, origin, affine, n_slices)[0]


def _axial_hulls(
    crop: np.ndarray, origin: Sequence[int], affine: np.ndarray, n_slices: int
) -> tuple[np.ndarray, np.ndarray]:
    """Longest in-plane diameter per slice, and the indices (into the in-plane corners of
    :func:`_row_extreme_corners`) of every slice's candidate points: its convex hull's vertices."""
    # i and j columns (pixel steps in mm) expressed in an orthonormal basis of the slice plane: 2-D points with
    # the same distances, which Qhull needs (3-D coplanar points make it fail).
    # numpy's stubs type qr() as the (Q, R) pair for every mode; mode="r" returns R alone.
    in_plane = np.linalg.qr(np.asarray(affine, dtype=float)[:3, :2], mode="r")
    out = np.zeros(n_slices)
    corners = _row_extreme_corners(crop, through_slices=False, origin=origin)
    if corners.size == 0:
        return out, np.zeros(0, dtype=np.int64)
    slice_of = corners[:, 2].astype(int)
    order = np.argsort(slice_of, kind="stable")
    corners, slice_of = corners[order], slice_of[order]
    bounds = np.flatnonzero(np.diff(slice_of)) + 1
    kept = []
    for block, ij, index in zip(
        np.split(slice_of, bounds), np.split(corners[:, :2], bounds), np.split(order, bounds), strict=True
    ):
        points = ij @ in_plane.T  # type: ignore[attr-defined]  # R, see above
        if len(points) < 2:
            kept.append(index)
            continue
        candidates = _hull_candidates(points)
        out[block[0]] = _farthest(points[candidates])  # as _max_pairwise(points)
        kept.append(index[candidates])
    return out, np.concatenate(kept)


def _diameters(
    crop: np.ndarray, origin: Sequence[int], affine: np.ndarray, n_slices: int
) -> tuple[float, np.ndarray]:
    """:func:`_longest_diameter` and :func:`_axial_diameters` together, the 3-D hull over far fewer points.

    A vertex of the 3-D hull of the cell corners is a vertex of the hull of the corners in its plane
    (k ± ½), so its in-plane position is a hull vertex of its slice's pixel corners, found for the axial
    diameters. The 3-D search runs over those positions at both depths (the very points, with the very
    coordinates, that :func:`_longest_diameter` maps), so its hull has the same vertices and the same
    largest distance, over a fraction of the points.
    """
    axial, kept = _axial_hulls(crop, origin, affine, n_slices)
    corners = _row_extreme_corners(crop, origin=origin)
    if corners.size == 0:
        return 0.0, axial
    mapped = corners @ affine[:3, :3].T  # translation does not change distances
    # In-plane corner t of row r lies at t = block·R + r (block: which end and which side of the row); the
    # same corner at depth k − ½ and k + ½ is 3-D corner (2·block)·R + r and (2·block + 1)·R + r.
    rows = len(corners) // 8
    block, row = np.divmod(kept, rows)
    index = np.unique(np.concatenate([2 * block * rows + row, (2 * block + 1) * rows + row]))
    return _max_pairwise(mapped[index]), axial


def longest_axial_diameter(mask: xr.DataArray) -> float:
    """Longest in-plane (axial) diameter over all slices (mm), the RECIST 1.1 measurement; 0.0 if empty."""
    diameters = axial_diameters(mask)
    return float(diameters.max()) if diameters.size else 0.0


def touches_edge(mask: xr.DataArray) -> bool:
    """True where the mask has a voxel on any face of its grid (the structure may extend past the FOV)."""
    v = _as_mask(mask)
    return bool(
        v[0].any() or v[-1].any() or v[:, 0].any() or v[:, -1].any() or v[:, :, 0].any() or v[:, :, -1].any()
    )


def _labels(values: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(values, structure=ndimage.generate_binary_structure(3, 3))


def component_volumes_cc(mask: xr.DataArray) -> list[float]:
    """Volumes (cm³) of the 26-connected components of a mask, largest first; ``[]`` for an empty mask.

    Cheap on whole-body masks (one labelling, no per-component arrays): the QA gate's fragmentation check.
    """
    crop, _ = _cropped(_as_mask(mask))  # components cannot join through the background around the box
    labels, n = _labels(crop)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    return sorted((float(c) * voxel_volume_cc(mask) for c in sizes), reverse=True)


def count_components(mask: xr.DataArray, *, min_cc: float = 0.0) -> int:
    """Number of 26-connected components of at least ``min_cc`` cm³ (e.g. ``min_cc=5`` for "BODY in pieces")."""
    return sum(v >= min_cc * (1 - 1e-9) for v in component_volumes_cc(mask))


def components(mask: xr.DataArray, *, min_cc: float = 0.0) -> list[xr.DataArray]:
    """26-connected components of a mask of at least ``min_cc`` cm³, largest first (same grid, same attrs).

    Each component is a full-grid array: for counting on large masks use :func:`count_components`.
    """
    values = _as_mask(mask)
    labels, n = _labels(values)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    voxel_cc = voxel_volume_cc(mask)
    return [
        like(mask, labels == lab, name=f"{mask.name or 'structure'}#{rank}")
        for rank, lab in enumerate(order, 1)
        if sizes[lab - 1] * voxel_cc >= min_cc * (1 - 1e-9)
    ]


def find_key(masks: Mapping[str, Any], name: str) -> str | None:
    """The key of ``masks`` equal to ``name`` ignoring case (the report's lookup); ``None`` when absent."""
    if name in masks:
        return name
    wanted = str(name).upper()
    return next((key for key in masks if str(key).upper() == wanted), None)


def structure_state(masks: Mapping[str, xr.DataArray], name: str) -> str:
    """``"present"`` (a non-empty mask), ``"empty"`` (the structure exists, no voxel) or ``"missing"``.

    Names match ignoring case (:func:`find_key`). "Empty" and "missing" are different facts: a model that
    segmented nothing produces an empty structure; a structure set without that organ has none.
    """
    key = find_key(masks, name)
    if key is None:
        return "missing"
    return "present" if bool(np.asarray(masks[key].values).any()) else "empty"


def structure_stats(mask: xr.DataArray, *, name: str | None = None) -> StructureStats:
    """All the geometry a report shows for one structure (see :class:`StructureStats`).

    Parameters
    ----------
    mask
        Boolean pacsai volume.
    name
        Defaults to ``mask.name``.
    """
    values, affine = _mask_and_affine(mask)
    label = name if name is not None else str(mask.name or "structure")
    n = int(np.count_nonzero(values))
    if n == 0:
        warnings.warn(f"structure {label!r} is empty", PacsaiWarning, stacklevel=2)
        nan = float("nan")
        return StructureStats(label, 0.0, 0, 0.0, 0.0, (nan, nan, nan), 0, False)
    # Every measure below needs only the structure's bounding box: one crop, instead of a pass over the whole
    # grid per measure (26-connected components cannot join through the background outside the box).
    box = _bbox(values)
    assert box is not None  # n > 0
    crop = values[box]
    origin = (box[0].start, box[1].start, box[2].start)
    _, n_comp = _labels(crop)
    longest, axial = _diameters(crop, origin, affine, values.shape[0])
    # geo.world and voxel_volume_cc, from the affine read above
    a, b, c = (float(v) for v in _mean_index(crop, origin)[::-1] @ affine[:3, :3].T + affine[:3, 3])
    return StructureStats(
        name=label,
        volume_cc=n * float(abs(np.linalg.det(affine[:3, :3])) / 1000.0),
        n_voxels=n,
        longest_diameter_mm=longest,
        longest_axial_diameter_mm=float(axial.max()),
        centroid_lps=(a, b, c),
        n_components=int(n_comp),
        touches_edge=any(s.start == 0 or s.stop == size for s, size in zip(box, values.shape, strict=True)),
    )


# --------------------------------------------------------------------------------------------- margins
def parse_margin(margin: MarginLike) -> tuple[float, float, float]:
    """Normalise a margin to ``(lr, ap, si)`` mm along the patient axes (LPS x, y, z).

    Parameters
    ----------
    margin
        A number (isotropic), a 3-tuple ``(lr, ap, si)``, or a mapping with keys ``lr``, ``ap``, ``si``
        (aliases: ``x``/``y``/``z``, ``rl``/``pa``/``is``, ``left_right``/``anterior_posterior``/
        ``superior_inferior``). Missing mapping keys are 0. Values are margins on *each* side (a 5 mm ``lr``
        margin grows the structure by 5 mm to the left and 5 mm to the right).

    Raises
    ------
    PlanningError
        For negative, non-finite or unknown entries.
    """
    if isinstance(margin, Mapping):
        out = dict.fromkeys(_PATIENT_AXES, 0.0)
        for key, value in margin.items():
            axis = _AXIS_ALIASES.get(str(key).lower().replace("-", "_").replace(" ", "_"))
            if axis is None:
                raise PlanningError(f"unknown margin axis {key!r}; use lr, ap and si (mm per side)")
            out[axis] = float(value)
        values = [out[a] for a in _PATIENT_AXES]
    elif isinstance(margin, (int, float, np.integer, np.floating)):
        values = [float(margin)] * 3
    else:
        values = [float(v) for v in margin]
        if len(values) != 3:
            raise PlanningError(f"a per-axis margin needs 3 values (lr, ap, si) in mm; got {margin!r}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise PlanningError(f"margins must be finite and ≥ 0 mm; got {margin!r} (shrinking is not supported)")
    return values[0], values[1], values[2]


def _grid_margins(
    volume: xr.DataArray, margin: tuple[float, float, float], *, max_obliquity_deg: float
) -> np.ndarray:
    """Per array axis (z, y, x) margin in mm, from patient-axis margins (lr, ap, si)."""
    direction = volume.geo.direction  # columns: the z, y, x axes
    if margin[0] == margin[1] == margin[2]:
        return np.full(3, margin[0])  # isotropic: exact on any orthogonal grid, oblique included
    # Anisotropic: the ellipsoid's axes are the patient axes, so each grid axis must run along one of them.
    patient_axis = np.argmax(np.abs(direction), axis=0)  # for grid axis a, the patient axis it runs along
    cosines = np.abs(direction[patient_axis, np.arange(3)])
    if sorted(patient_axis.tolist()) != [0, 1, 2]:
        raise PlanningError(
            f"grid of {volume.name!r} does not map one-to-one onto the patient axes; "
            "anisotropic margins need an axis-aligned grid: resample with pacsai.imaging.resample"
        )
    worst = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
    if worst > max_obliquity_deg:
        raise PlanningError(
            f"grid of {volume.name!r} is oblique by {worst:.2f}° (> max_obliquity_deg={max_obliquity_deg}); "
            "an anisotropic margin is defined along the patient axes: resample onto an axis-aligned grid with "
            "pacsai.imaging.resample, or use an isotropic margin"
        )
    if worst > 1e-3:
        warnings.warn(
            f"anisotropic margin on a grid {worst:.2f}° oblique: applied along the nearest patient axes",
            PacsaiWarning,
            stacklevel=3,
        )
    return np.array([margin[p] for p in patient_axis])


def _box_distance_mask(
    values: np.ndarray, spacing_kji: Sequence[float] | np.ndarray, margin_kji: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Voxels whose centre lies within the ellipsoidal margin of the *cells* (boxes) of ``values``.

    Normalised squared distance from a voxel centre v to the cell of a voxel u, along grid axes a with spacing
    s_a and margin m_a: ``Σ_a (max(|v_a − u_a|·s_a − s_a/2, 0) / m_a)²`` (0 inside the cell). The minimum over
    the mask is separable: a 1-D min-convolution per axis, each over the few offsets a margin can reach
    (``floor(m_a/s_a + 1/2)`` voxels), so it is exact and needs no distance-transform approximation. An axis
    with a zero margin allows no offset along it.
    """
    cost = np.where(values, 0.0, np.inf)
    for axis in range(3):
        s, m = float(spacing_kji[axis]), float(margin_kji[axis])
        if m <= 0:
            continue
        out = cost.copy()
        for step in range(1, _reach(m, s) + 1):
            penalty = ((step - 0.5) * s / m) ** 2
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -step), slice(step, None)
            # v = u + step and v = u − step along this axis.
            np.minimum(out[tuple(hi)], cost[tuple(lo)] + penalty, out=out[tuple(hi)])
            np.minimum(out[tuple(lo)], cost[tuple(hi)] + penalty, out=out[tuple(lo)])
        cost = out
    return cost <= 1.0 + _EPS


def _reach(margin_mm: float, spacing_mm: float) -> int:
    """Voxels a margin adds beyond a face: centres at (n − ½)·s from the cell's face, so n ≤ m/s + ½."""
    return math.floor(margin_mm / spacing_mm + 0.5 + _EPS) if margin_mm > 0 else 0


def expand(
    mask: xr.DataArray,
    margin: MarginLike,
    *,
    within: xr.DataArray | None = None,
    name: str | None = None,
    max_obliquity_deg: float = 1.0,
) -> xr.DataArray:
    """Grow the contoured volume by a margin in mm (ICRU 50/62/83), voxels taken as boxes.

    The structure is the union of its voxel *cells* (boxes of the grid spacing), as the contour it was
    rasterised from; the grown volume is that union ⊕ an ellipsoid with semi-axes m_a (a ball for an
    isotropic margin), and a voxel belongs to the result where its *centre* lies in the grown volume (the same
    centre rule that rasterises a contour). So distances run from the structure's surface, not between voxel
    centres: a voxel v is in the expansion where ``min over mask voxels u of
    Σ_a (max(|v_a − u_a| − s_a/2, 0) / m_a)² ≤ 1`` (mm along the axes a = lr, ap, si, spacing s_a).

    Along an axis the margin therefore adds ``floor(m/s + 1/2)`` voxels beyond each face: a one-slice GTV on
    3 mm slices grown by 5 mm reaches the slice centres 3 mm and 6 mm away (1.5 mm and 4.5 mm from the
    slice's face, both ≤ 5 mm) but not the one 9 mm away (7.5 mm): 2 slices each way; voxel-centre
    distances would add only one. A centre exactly at the margin is inside. Computed exactly (a separable
    min-convolution, :func:`_box_distance_mask`) on a crop around the structure, on anisotropic grids and, for
    isotropic margins, on oblique orthogonal grids.

    Parameters
    ----------
    mask
        Boolean pacsai volume.
    margin
        mm per side: a number, ``(lr, ap, si)`` or ``{"lr": .., "ap": .., "si": ..}`` (see :func:`parse_margin`).
        An axis with margin 0 does not grow.
    within
        Optional boolean volume on the same grid (e.g. BODY) to clip the result to.
    name
        Name of the result (default ``mask.name``).
    max_obliquity_deg
        Anisotropic margins need grid axes along the patient axes; grids oblique by more than this raise.

    Returns
    -------
    xarray.DataArray
        Boolean volume on the mask's grid; it contains the mask unless ``within`` removes part of it.

    Raises
    ------
    PlanningError
        Different grids, a sheared grid, or an oblique grid with an anisotropic margin.

    Warns
    -----
    PacsaiWarning
        When the expansion is cut off by the edge of the grid.
    """
    values = _as_mask(mask)
    spacing = _orthogonal_spacing(mask)
    m = _grid_margins(mask, parse_margin(margin), max_obliquity_deg=max_obliquity_deg)
    result = values.copy()
    box = _bbox(values)
    if box is not None and m.max() > 0:
        # m and spacing are in the arrays' (z, y, x) order.
        reach = [_reach(mm, s) for mm, s in zip(m, spacing, strict=True)]
        crop = _padded(box, [r + 1 for r in reach], values.shape)
        result[crop] = _box_distance_mask(values[crop], spacing, m)
        cut = [s.start - r < 0 or s.stop + r > n for s, r, n in zip(box, reach, values.shape, strict=True)]
        if any(cut):
            warnings.warn(
                f"expansion of {mask.name!r} by {parse_margin(margin)} mm is cut off by the edge of the grid "
                f"(shape {values.shape}): the structure would extend past the field of view",
                PacsaiWarning,
                stacklevel=2,
            )
    if within is not None:
        _require_same_grid(mask, within)
        result &= _as_mask(within, what="within")
    return like(mask, result, name=name if name is not None else mask.name)


def ctv_ptv(
    gtv: xr.DataArray,
    *,
    ctv_margin: MarginLike,
    ptv_margin: MarginLike,
    body: xr.DataArray | None = None,
    anatomy: xr.DataArray | None = None,
    clip_ptv_to_body: bool = False,
) -> tuple[xr.DataArray, xr.DataArray]:
    """GTV → CTV → PTV (ICRU 50/62/83), each containing the one before.

    CTV = ((GTV ⊕ ctv_margin) ∩ BODY [∩ anatomy]) ∪ GTV; PTV = (CTV ⊕ ptv_margin) [∩ BODY] ∪ CTV, with ⊕ the
    box-based expansion of :func:`expand`. The clips only trim the *margin*: the gross tumour is never cut
    from the CTV (ICRU 62: the CTV contains the GTV), nor the CTV from the PTV, even where a BODY outline
    misses part of the GTV (e.g. an auto-contoured BODY with a hole). Such a GTV part outside the BODY is
    stated in ``attrs["gtv_outside_body_cc"]`` of the CTV and warned about.

    Parameters
    ----------
    gtv
        Boolean pacsai volume.
    ctv_margin, ptv_margin
        mm per side (see :func:`parse_margin`).
    body
        BODY/External on the same grid; the CTV margin is clipped to it (strongly recommended: without it a
        CTV can extend into air).
    anatomy
        Optional extra clip for the CTV margin (e.g. "not bone"/"within the organ").
    clip_ptv_to_body
        Also clip the PTV margin to the body (off by default: the PTV is a geometric concept that may leave
        the body).

    Returns
    -------
    (ctv, ptv)
        Boolean volumes named ``"CTV"`` and ``"PTV"`` on the GTV's grid.

    Warns
    -----
    PacsaiWarning
        No BODY given, or part of the GTV lies outside the BODY.
    """
    gtv_values = _as_mask(gtv, what="GTV")
    outside_cc = 0.0
    if body is None:
        warnings.warn("CTV not clipped to the body: no BODY structure was given", PacsaiWarning, stacklevel=2)
    else:
        _require_same_grid(gtv, body)
        outside_cc = float(np.count_nonzero(gtv_values & ~_as_mask(body, what="BODY"))) * voxel_volume_cc(gtv)
        if outside_cc > 0:
            warnings.warn(
                f"{outside_cc:.3g} cm³ of {gtv.name!r} lies outside {body.name!r}: kept in the CTV (the CTV "
                "always contains the GTV); check the BODY outline",
                PacsaiWarning,
                stacklevel=2,
            )
    ctv_values = expand(gtv, ctv_margin, within=body).values
    if anatomy is not None:
        _require_same_grid(gtv, anatomy)
        ctv_values = ctv_values & _as_mask(anatomy, what="anatomy")
    ctv = like(gtv, ctv_values | gtv_values, name="CTV", gtv_outside_body_cc=outside_cc)
    ptv_values = expand(ctv, ptv_margin, within=body if clip_ptv_to_body else None).values
    ptv = like(gtv, ptv_values | ctv.values, name="PTV")
    return ctv, ptv


def prv(oar: xr.DataArray, margin: MarginLike, *, name: str | None = None) -> xr.DataArray:
    """Planning organ-at-risk volume: PRV = OAR ⊕ margin (ICRU 62/83), not clipped.

    Named ``"<OAR>_PRV"`` unless ``name`` is given.
    """
    return expand(oar, margin, name=name if name is not None else f"{oar.name or 'OAR'}_PRV")


def van_herk_margin(systematic_sd_mm: Any, random_sd_mm: Any) -> Any:
    """van Herk population CTV→PTV margin M = 2.5 Σ + 0.7 σ (mm), per axis when given arrays/tuples.

    Parameters
    ----------
    systematic_sd_mm
        Σ, the standard deviation of systematic set-up errors (mm); a number or per-axis values.
    random_sd_mm
        σ, the standard deviation of random errors (mm); a number or per-axis values.

    Returns
    -------
    float or tuple of float
        A float for scalar inputs, else a tuple per axis.

    References
    ----------
    van Herk M et al. The probability of correct target dosage. Int J Radiat Oncol Biol Phys 2000;47:1121–35.
    """
    big = np.asarray(systematic_sd_mm, dtype=float)
    small = np.asarray(random_sd_mm, dtype=float)
    if np.any(big < 0) or np.any(small < 0) or not np.all(np.isfinite(big)) or not np.all(np.isfinite(small)):
        raise PlanningError(
            f"standard deviations must be finite and ≥ 0 mm; got Σ={systematic_sd_mm}, σ={random_sd_mm}"
        )
    margin = 2.5 * big + 0.7 * small
    return float(margin) if margin.ndim == 0 else tuple(float(v) for v in margin)


# --------------------------------------------------------------------------------------------- relations
def min_surface_distance(a: xr.DataArray, b: xr.DataArray) -> float:
    """Minimum distance (mm) between two structures; 0.0 where they overlap.

    Measured between voxel centres: the smallest distance from a voxel of ``a`` to a voxel of ``b``, by an
    exact EDT with the grid spacing (so two structures in adjacent voxels are one voxel spacing apart; the gap
    between their contours is about one voxel less). Both must be on the same orthogonal grid.

    Raises
    ------
    PlanningError
        Different or sheared grids, or an empty structure.
    """
    va, vb = _as_mask(a), _as_mask(b)
    _require_same_grid(a, b)
    spacing = _orthogonal_spacing(a)
    if not va.any() or not vb.any():
        empty = a.name if not va.any() else b.name
        raise PlanningError(f"structure {empty!r} is empty: no distance can be measured")
    if (va & vb).any():
        return 0.0
    # Every voxel of b lies in this crop, so the EDT inside it is the exact distance to b; so does every voxel
    # of a that can be the nearest. Where b's box is a small part of the box of both (a small target, a large
    # or distant OAR), the crop shrinks to b and the part of a nearest to it (:func:`_nearest_region`).
    box = _bbox(va | vb)
    target = _bbox(vb)
    assert box is not None and target is not None
    if 4 * _box_size(target) < _box_size(box):
        box = _nearest_region(va, vb, spacing)
    dist = ndimage.distance_transform_edt(~vb[box], sampling=spacing)
    return float(dist[va[box]].min())


def _box_size(box: tuple[slice, ...]) -> int:
    return math.prod(s.stop - s.start for s in box)


def _surface_points(values: np.ndarray) -> np.ndarray:
    """(k, j, i) grid indices of the voxels of a non-empty mask with a face-neighbour outside it (or the grid)."""
    box = _bbox(values)
    assert box is not None
    crop = values[box]
    padded = np.pad(crop, 1)
    inner = crop.copy()
    for axis in range(3):
        for step in (-1, 1):
            shifted = [slice(1, -1)] * 3
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            inner &= padded[tuple(shifted)]
    return np.argwhere(crop & ~inner) + np.array([s.start for s in box])


def _nearest_region(va: np.ndarray, vb: np.ndarray, spacing: np.ndarray) -> tuple[slice, ...]:
    """A box holding every voxel of b and every voxel of a that can lie nearest to b (disjoint, non-empty).

    A voxel of a nearest to b has a face-neighbour outside a (one step towards b would otherwise be nearer, by
    at least s²/2d ≫ 1e-9 mm), and so has a nearest voxel of b with a face-neighbour outside b. So the nearest
    distance D between the two surfaces (k-d tree, in mm) is the EDT's minimum, to rounding (~1e-13 mm); the
    box spans b and the surface voxels of a within D + 1e-9 of b's surface, and every other voxel of a is
    farther than that.
    """
    from scipy.spatial import cKDTree  # only here: the module's other measures need no k-d tree

    surface_a, surface_b = _surface_points(va), _surface_points(vb)
    scale = np.asarray(spacing, dtype=float)
    distance, _ = cKDTree(surface_b * scale).query(surface_a * scale, k=1)
    near = surface_a[distance <= float(distance.min()) * (1 + 1e-9) + 1e-9]
    box = _bbox(vb)
    assert box is not None
    low = np.minimum(near.min(axis=0), [s.start for s in box])
    high = np.maximum(near.max(axis=0) + 1, [s.stop for s in box])
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high, strict=True))


def overlap(oar: xr.DataArray, target: xr.DataArray) -> tuple[float, float]:
    """Overlap of an OAR with a target: (cm³, % of the OAR volume). 0 % for an empty OAR."""
    vo, vt = _as_mask(oar), _as_mask(target)
    _require_same_grid(oar, target)
    n_oar = int(np.count_nonzero(vo))
    n_both = int(np.count_nonzero(vo & vt))
    return n_both * voxel_volume_cc(oar), (100.0 * n_both / n_oar if n_oar else 0.0)


def target_relations(
    oars: Mapping[str, xr.DataArray], target: xr.DataArray, *, target_name: str = "PTV"
) -> list[TargetRelation]:
    """Minimum distance and overlap of every OAR against a target (in the order given).

    Empty OARs get a :class:`PacsaiWarning` and NaN distance rather than disappearing from the table.
    """
    out = []
    for name, oar in oars.items():
        cc, pct = overlap(oar, target)
        if not _as_mask(oar).any() or not _as_mask(target).any():
            warnings.warn(
                f"{name!r} or {target_name!r} is empty: distance not measured", PacsaiWarning, stacklevel=2
            )
            distance = float("nan")
        else:
            distance = min_surface_distance(oar, target)
        out.append(TargetRelation(name, target_name, distance, cc, pct))
    return out
