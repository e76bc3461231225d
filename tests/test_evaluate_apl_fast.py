"""pacsai.learning.evaluate.added_path_length over all slices at once equals, bit for bit, the slice-by-slice
distance transform on each slice's cropped half-pixel lattice (the definition's own computation), including
distances exactly at τ, slices without prediction, predictions cut by the crop and masks at the grid's edge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from pacsai.learning.evaluate import _edge_points, _far_edge_counts, _slice_edges, added_path_length, contour_edges


def slice_by_slice(pred, ref, spacing_zyx, tol):
    """Added path length slice by slice, each by a distance transform of its cropped half-pixel lattice."""
    _, sy, sx = spacing_zyx
    margin = int(math.ceil(tol / min(sy, sx))) + 2
    apl = total = 0.0
    for k in np.flatnonzero(ref.any(axis=(1, 2))):
        ys, xs = np.nonzero(ref[k])
        y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, ref.shape[1])
        x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, ref.shape[2])
        r2, p2 = ref[k, y0:y1, x0:x1], pred[k, y0:y1, x0:x1]
        r_rows, r_cols = contour_edges(r2)
        length = float(r_rows.sum()) * sx + float(r_cols.sum()) * sy
        total += length
        p_rows, p_cols = contour_edges(p2)
        if not (p_rows.any() or p_cols.any()):
            apl += length
            continue
        dist = ndimage.distance_transform_edt(~_edge_points(p_rows, p_cols, r2.shape), sampling=(sy / 2, sx / 2))
        far_rows, far_cols = r_rows & (dist[0::2, 1::2] > tol), r_cols & (dist[1::2, 0::2] > tol)
        apl += float(far_rows.sum()) * sx + float(far_cols.sum()) * sy
    return apl, total


def blobs(shape, seed, n=4):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.uniform(0, 1, 3) * np.array(shape)
        r = rng.uniform(2, 7, 3)
        mask |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    return mask


@pytest.mark.parametrize("spacing", [(3.0, 1.0, 1.0), (2.0, 1.0, 2.0), (3.0, 1.8, 1.8), (2.5, 0.977, 0.977)])
@pytest.mark.parametrize("tol", [1.0, 2.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_slice_by_slice_transform_bit_for_bit(spacing, tol, seed):
    shape = (8, 30, 34)
    ref = blobs(shape, seed)
    pred = np.roll(blobs(shape, seed), (0, 1, -2), axis=(0, 1, 2)) | blobs(shape, seed + 10, n=1)
    pred[3] = False  # a slice without prediction
    ref[:, :, -1] |= ref[:, :, -2]  # reaching the grid's edge
    assert added_path_length(pred, ref, spacing_zyx=spacing, tolerance_mm=tol) == slice_by_slice(
        pred, ref, spacing, tol)


def test_ties_at_tau_and_predictions_beyond_the_crop():
    # 1 mm pixels, τ = 2 mm: edges exactly 4 half-pixels from the prediction lie at 2.0 mm, not farther.
    ref = np.zeros((3, 40, 40), bool)
    ref[:, 10:20, 10:20] = True
    pred = np.zeros_like(ref)
    pred[0, 10:20, 12:22] = True  # 2 px to the right: the reference's left side lies exactly τ from it
    pred[1, :, :] = True  # covers the whole slice: its only contour is the grid's border
    pred[2, 0:3, 0:3] = True  # drawn, but far outside the reference's box
    spacing = (3.0, 1.0, 1.0)
    r_rows, r_cols = _slice_edges(ref)
    p_rows, p_cols = _slice_edges(pred)
    # the tie is seen, and that slice measured by its own distance transform
    assert _far_edge_counts(r_rows, r_cols, p_rows, p_cols, 1.0, 1.0, 2.0)[2].tolist() == [True, False, False]
    assert added_path_length(pred, ref, spacing_zyx=spacing, tolerance_mm=2.0) == slice_by_slice(
        pred, ref, spacing, 2.0)
    apl, total = added_path_length(pred, ref, spacing_zyx=spacing, tolerance_mm=2.0)
    assert total == 3 * 40.0 and apl == pytest.approx(40.0 + 40.0 + slice_by_slice(pred[:1], ref[:1], spacing, 2.0)[0])


def test_no_reference_contour_is_zero():
    empty = np.zeros((2, 5, 5), bool)
    assert added_path_length(empty, empty, spacing_zyx=(1.0, 1.0, 1.0)) == (0.0, 0.0)
