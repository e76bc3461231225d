"""pacsai.planning.structures.min_surface_distance on a crop around a small target equals, bit for bit, the
minimum of the EDT over the whole grid and the brute-force minimum over every voxel pair, including structures
on the grid's edge and anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning import structures as st


def vol(array, spacing, name):
    return make_volume(np.asarray(array), affine_from((0.0, 0.0, 0.0), np.eye(3), spacing), name=name)


def blob(shape, centre, radii):
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1


CASES = [
    # (shape, OAR centre, OAR radii, target centre, target radii): large OARs, small targets (the cropped path)
    ((30, 60, 64), (15, 30, 10), (14, 25, 9), (14, 31, 50), (2, 3, 3)),
    ((30, 60, 64), (0, 0, 0), (12, 30, 30), (25, 50, 55), (2, 2, 3)),  # the OAR in the grid's corner
    ((30, 60, 64), (15, 30, 60), (10, 28, 6), (3, 5, 5), (1, 1, 1)),  # on a face; a target of a few voxels
    ((20, 40, 40), (10, 20, 20), (6, 12, 12), (10, 20, 36), (4, 4, 3)),  # a target beside the OAR
]


@pytest.mark.parametrize("spacing", [(1.8, 1.8, 3.0), (0.977, 0.977, 2.5), (1.0, 2.0, 1.0)])
@pytest.mark.parametrize("case", CASES)
def test_equals_the_whole_grid_edt_and_brute_force(case, spacing):
    shape, oc, orad, tc, trad = case
    oar, target = blob(shape, oc, orad), blob(shape, tc, trad)
    target &= ~oar
    assert oar.any() and target.any() and not (oar & target).any()
    zyx = np.asarray(spacing[::-1])
    whole = float(ndimage.distance_transform_edt(~target, sampling=zyx)[oar].min())
    got = st.min_surface_distance(vol(oar, spacing, "oar"), vol(target, spacing, "ptv"))
    assert got == whole
    brute = cdist(np.argwhere(oar) * zyx, np.argwhere(target) * zyx).min()
    assert got == pytest.approx(brute, rel=1e-12)


def test_the_crop_is_used_where_the_target_is_small():
    shape, oc, orad, tc, trad = CASES[0]
    oar, target = blob(shape, oc, orad), blob(shape, tc, trad)
    region = st._nearest_region(oar, target, np.array([3.0, 1.8, 1.8]))
    size = st._box_size(region)
    assert 4 * st._box_size(st._bbox(target)) < st._box_size(st._bbox(oar | target))
    assert size < st._box_size(st._bbox(oar | target)) / 4  # far smaller than the box of both
