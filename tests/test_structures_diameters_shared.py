"""pacsai.planning.structures.structure_stats measures the longest 3-D diameter over the slices' in-plane hull
vertices only: bit for bit what longest_diameter finds over every row's corners, on axis-aligned and oblique
grids, for blobs, thin and flat structures, single voxels and structures on the grid's edge."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning import structures as st


def shapes():
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(np.arange(12), np.arange(30), np.arange(28), indexing="ij")
    for seed in range(4):
        mask = np.zeros((12, 30, 28), bool)
        for _ in range(3):
            c, r = rng.uniform(0, 1, 3) * mask.shape, rng.uniform(1.5, 8, 3)
            mask |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        yield f"blobs{seed}", mask
    single = np.zeros((12, 30, 28), bool)
    single[5, 7, 9] = True
    yield "one voxel", single
    row = np.zeros((12, 30, 28), bool)
    row[3, 4, 2:20] = True
    yield "one row (collinear in its slice)", row
    flat = np.zeros((12, 30, 28), bool)
    flat[6, 3:25, 1:27] = True
    yield "one slice", flat
    edge = np.zeros((12, 30, 28), bool)
    edge[:, 0:5, -6:] = True
    edge[0, :, 0] = True
    yield "on the grid's edge", edge
    diagonal = np.zeros((12, 30, 28), bool)
    for k in range(12):
        diagonal[k, 2 * k : 2 * k + 3, k : k + 2] = True
    yield "a slanted rod", diagonal


AFFINES = {
    "axis-aligned anisotropic": affine_from((-100.0, 20.0, 5.0), np.eye(3), (0.977, 0.977, 2.5)),
    "oblique": affine_from((3.0, -7.0, 11.0), Rotation.from_euler("xyz", [8, -5, 21], degrees=True).as_matrix(),
                           (1.8, 1.2, 3.0)),
}


@pytest.mark.parametrize("grid", sorted(AFFINES))
@pytest.mark.parametrize("name_mask", list(shapes()), ids=lambda nm: nm[0])
def test_shared_hulls_give_the_same_diameters_bit_for_bit(grid, name_mask):
    _, mask = name_mask
    volume = make_volume(mask, AFFINES[grid], name="s")
    stats = st.structure_stats(volume)
    assert stats.longest_diameter_mm == st.longest_diameter(volume)
    assert stats.longest_axial_diameter_mm == st.longest_axial_diameter(volume)
    crop, origin = st._cropped(mask)
    longest, axial = st._diameters(crop, origin, AFFINES[grid], mask.shape[0])
    assert np.array_equal(axial, st.axial_diameters(volume)) and longest == st.longest_diameter(volume)
