"""pacsai.learning.evaluate surfaces and surface distances: the shifted-AND erosion is ndimage's, and voxels on
both surfaces (0 mm, not queried) leave every distance bit for bit as querying all of them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from pacsai.learning.evaluate import _distances_to, agreement, surface


def masks(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 24, 26)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    out = []
    for _ in range(2):
        c, r = rng.uniform(0, 1, 3) * shape, rng.uniform(3, 10, 3)
        m = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        m[:, :, 0] |= m[:, :, 1]  # reaching the array's edge
        out.append(m)
    return out


def query_all(target_surface, at, sampling):
    """Every voxel of ``at`` queried (the computation without the shortcut)."""
    targets, points = np.argwhere(target_surface), np.argwhere(at)
    scale = np.asarray(sampling, dtype=np.float64)
    _, nearest = cKDTree(targets * scale).query(points * scale, k=1)
    offsets = (targets[nearest] - points).astype(np.float64) * scale
    offsets *= offsets
    return np.sqrt(offsets[:, 0] + offsets[:, 1] + offsets[:, 2])


@pytest.mark.parametrize("seed", range(6))
def test_surface_is_the_binary_erosion_rim(seed):
    for m in masks(seed):
        eroded = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
        assert np.array_equal(surface(m), m & ~eroded)
    full = np.ones((3, 4, 5), bool)
    assert np.array_equal(surface(full), full & ~ndimage.binary_erosion(full, border_value=0))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sampling", [(3.0, 1.0, 2.0), (2.5, 0.977, 0.977)])
def test_distances_equal_querying_every_voxel(seed, sampling):
    a, b = masks(seed)
    b = a.copy() if seed == 0 else b  # identical masks: every distance 0
    b[4:6] |= a[4:6]  # shared surface voxels
    sa, sb = surface(a), surface(b)
    for target, at in ((sb, sa), (sa, sb)):
        got = _distances_to(target, at, sampling)
        assert got.dtype == np.float64 and np.array_equal(got, query_all(target, at, sampling))
    if seed == 0:
        assert agreement(a, b, spacing_zyx=sampling).hd95 == 0.0
