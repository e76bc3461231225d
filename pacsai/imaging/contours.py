"""Planar polygons ↔ pixel masks, in the index space of one slice (i = column, j = row).

The two halves are exact inverses on a pixel grid:

- :func:`fill_polygons` rasterises closed polygons by the **even-odd rule over all polygons of a plane at
  once**, so a contour inside another is a hole, an island inside that hole is filled again, and a "keyhole"
  contour (one polygon that runs in along a cut, around the hole and back out) is a hole as well: the cut is
  crossed twice and cancels. Both DICOM encodings of holes (PS3.3 C.8.8.6: separate inner contours, or
  keyholes) thus read the same. **Inclusion rule:** a pixel belongs to the mask when its centre is inside the
  polygon; a centre exactly on an edge belongs to the pixel on the left/bottom-index side of a
  vertical/horizontal edge (half-open intervals ``[x_left, x_right)`` and ``[y_low, y_high)``), so that
  polygons which tile the plane share no pixel and miss none, and a pixel-aligned rectangle of area A covers
  exactly A pixels.
- :func:`mask_to_polygons` traces a slice with marching squares (scikit-image) at level 0.5 on a zero-padded
  copy (so every contour closes), which puts each boundary half-way between an inside and an outside pixel
  centre. Holes come out as separate contours; re-rasterising the result with :func:`fill_polygons` gives
  back the mask exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage import measure

# Vertex coordinates are snapped to this many decimals (in pixels) before filling, so that a point meant to
# lie
# on a pixel centre (e.g. 3.9999999998 after a round trip through mm) is treated as on it, not beside it.
_SNAP_DECIMALS = 6


def fill_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise closed polygons of one plane by the even-odd rule (holes and keyholes included).

    Parameters
    ----------
    polygons
        Each an ``(N, 2)`` array of vertices ``(i, j)`` = (column, row) in pixel index units; the closing edge
        from the last vertex back to the first is implied (a repeated first vertex is harmless). Vertices may
        lie outside the slice: the result is clipped.
    shape
        ``(rows, columns)`` of the slice.

    Returns
    -------
    numpy.ndarray
        Boolean ``(rows, columns)`` mask: pixel ``[j, i]`` is True when its centre ``(i, j)`` is inside an odd
        number of the polygons (see the module docstring for the edge convention).
    """
    n_rows, n_cols = int(shape[0]), int(shape[1])
    all_rows: list[np.ndarray] = []
    all_xs: list[np.ndarray] = []
    for polygon in polygons:
        points = np.round(np.asarray(polygon, dtype=float).reshape(-1, 2), _SNAP_DECIMALS)
        if len(points) < 3:
            continue
        x0, y0 = points[:, 0], points[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # Row centres r with min(y0, y1) <= r < max(y0, y1): half-open, so a vertex shared by two edges counts
        # once and horizontal edges (an empty range) never count.
        first = np.clip(np.ceil(np.minimum(y0, y1)), 0, n_rows).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1)), 0, n_rows).astype(np.int64)
        counts = stop - first
        total = int(counts.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(points)), counts)
        offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = first[edge] + offset
        t = (rows - y0[edge]) / (y1[edge] - y0[edge])
        all_rows.append(rows)
        all_xs.append(np.round(x0[edge] + t * (x1[edge] - x0[edge]), _SNAP_DECIMALS))
    mask = np.zeros((n_rows, n_cols), dtype=bool)
    if not all_rows:
        return mask
    rows = np.concatenate(all_rows)
    xs = np.concatenate(all_xs)
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Every closed polygon crosses each row centre an even number of times, so after sorting, crossings pair
    # up
    # within rows: (0, 1), (2, 3), ...; the pairs are the even-odd "inside" intervals.
    starts = np.clip(np.ceil(xs[0::2]), 0, n_cols).astype(np.int64)
    stops = np.clip(np.ceil(xs[1::2]), 0, n_cols).astype(np.int64)
    pair_rows = rows[0::2]
    # Accumulate only over the bounding box of the crossings: most structures cover a small part of a slice.
    r0, r1 = int(pair_rows.min()), int(pair_rows.max()) + 1
    c0, c1 = int(starts.min()), int(stops.max())
    if c1 <= c0:
        return mask
    diff = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(diff, (pair_rows - r0, starts - c0), 1)
    np.add.at(diff, (pair_rows - r0, stops - c0), -1)
    mask[r0:r1, c0:c1] = np.cumsum(diff, axis=1)[:, :-1] > 0
    return mask


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Trace the boundaries of a 2-D boolean mask as closed polygons (outer boundaries and holes alike).

    Parameters
    ----------
    mask
        Boolean ``(rows, columns)`` slice.

    Returns
    -------
    list of numpy.ndarray
        Each ``(N, 2)`` with vertices ``(i, j)`` in pixel index units, not repeating the first vertex, with
        collinear vertices removed (straight runs along pixel edges become one edge). Diagonally touching
        pixels belong to one polygon (8-connectivity of the foreground). Empty list for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons needs a 2-D slice, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    # Trace only the bounding box (most structures cover a small part of a slice), padded with one empty pixel
    # on every side so that every contour closes.
    r0, c0 = rows[0], cols[0]
    padded = np.pad(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1).astype(np.float64)
    offset = np.array([c0 - 1.0, r0 - 1.0])
    polygons = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="high"):
        ij = contour[:, ::-1] + offset  # (row, col) of the padded box → (i, j) of the mask
        if len(ij) > 1 and np.array_equal(ij[0], ij[-1]):
            ij = ij[:-1]
        ij = _drop_collinear(ij)
        if len(ij) >= 3:
            polygons.append(ij)
    return polygons


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on the straight line through their neighbours (exact for half-pixel grids)."""
    if len(points) < 4:
        return points
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    a = points - prev
    b = nxt - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return points[keep]


def polygon_area(polygon: np.ndarray) -> float:
    """Unsigned area of a simple closed polygon (shoelace formula), in the squared units of its vertices."""
    points = np.asarray(polygon, dtype=float).reshape(-1, 2)
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def even_odd_area(polygons: Sequence[np.ndarray]) -> float:
    """Area enclosed by non-crossing polygons of one plane under the even-odd rule (holes subtracted).

    Each polygon adds its shoelace area when it is nested inside an even number of the others and subtracts it
    when nested inside an odd number: an outer contour adds, a hole subtracts, an island in a hole adds.
    """
    from matplotlib.path import Path  # local: matplotlib is heavy and only this helper needs it

    shapes = [np.asarray(p, dtype=float).reshape(-1, 2) for p in polygons if len(p) >= 3]
    paths = [Path(p) for p in shapes]
    total = 0.0
    for idx, points in enumerate(shapes):
        depth = sum(
            1
            for other, path in enumerate(paths)
            if other != idx and path.contains_point(points[0], radius=0.0)
        )
        total += polygon_area(points) * (-1 if depth % 2 else 1)
    return total
