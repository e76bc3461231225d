"""pacsai.imaging.geometry: the ``.geo`` accessor on hand-built oblique and flipped grids, after ``.isel``."""

from __future__ import annotations

import numpy as np
import pytest

from pacsai.errors import VolumeError
from pacsai.imaging.geometry import affine_of, make_volume, spacing_of, voxel_volume_cc


def _oblique_flipped() -> np.ndarray:
    """i along a 30° rotation in the axial plane (0.7 mm), j flipped and tilted (0.9 mm), k towards feet (2.5 mm)."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = np.column_stack([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array([0.7, 0.9, 2.5])
    affine[:3, 3] = [-120.0, 40.0, 300.0]
    return affine


def _by_hand(affine: np.ndarray, k: float, j: float, i: float) -> np.ndarray:
    return affine[:3, :3] @ np.array([i, j, k]) + affine[:3, 3]


def test_spacing_direction_origin_in_array_order() -> None:
    affine = _oblique_flipped()
    vol = make_volume(np.zeros((6, 5, 4), np.int16), affine)
    np.testing.assert_allclose(vol.geo.spacing, [2.5, 0.9, 0.7])  # (z, y, x), like the array
    np.testing.assert_allclose(spacing_of(vol), [0.7, 0.9, 2.5])  # the legacy (x, y, z) helper
    np.testing.assert_allclose(vol.geo.direction[:, 0], [0, 0, -1])  # column 0 = the z axis (k)
    np.testing.assert_allclose(vol.geo.origin, [-120.0, 40.0, 300.0])
    assert vol.geo.voxel_volume_cc == pytest.approx(0.7 * 0.9 * 2.5 / 1000)
    assert not vol.geo.is_axis_aligned
    assert vol.geo.shape == (6, 5, 4)


def test_world_and_index_take_zyx_indices() -> None:
    affine = _oblique_flipped()
    vol = make_volume(np.zeros((6, 5, 4)), affine)
    points = vol.geo.world([[0, 0, 0], [5, 4, 3], [2, 1, 3]])
    for point, (k, j, i) in zip(points, [(0, 0, 0), (5, 4, 3), (2, 1, 3)], strict=True):
        np.testing.assert_allclose(point, _by_hand(affine, k, j, i), atol=1e-9)
    np.testing.assert_allclose(vol.geo.index(points), [[0, 0, 0], [5, 4, 3], [2, 1, 3]], atol=1e-9)
    with pytest.raises(VolumeError, match="z, y, x"):
        vol.geo.world([1, 2])


def test_isel_slicing_steps_and_reversal_keep_the_geometry() -> None:
    affine = _oblique_flipped()
    data = np.arange(6 * 5 * 4).reshape(6, 5, 4)
    vol = make_volume(data, affine, name="ct")
    sub = vol.isel(z=slice(2, 6, 2), y=slice(None, None, -1), x=slice(1, 3))
    assert sub.shape == (2, 5, 2)
    # Every kept voxel sits where the full grid put it: voxel [a, b, c] of `sub` is [2 + 2a, 4 - b, 1 + c].
    for a, b, c in [(0, 0, 0), (1, 4, 1), (1, 2, 0)]:
        np.testing.assert_allclose(sub.geo.world([a, b, c]), _by_hand(affine, 2 + 2 * a, 4 - b, 1 + c), atol=1e-9)
        assert sub.values[a, b, c] == data[2 + 2 * a, 4 - b, 1 + c]
    np.testing.assert_allclose(sub.geo.spacing, [5.0, 0.9, 0.7])
    np.testing.assert_allclose(affine_of(sub), sub.geo.affine)  # the module helper follows isel too
    assert voxel_volume_cc(sub) == pytest.approx(5.0 * 0.9 * 0.7 / 1000)
    # The positional form and a single-slice selection kept as a list agree.
    np.testing.assert_allclose(vol[3:].geo.origin, _by_hand(affine, 3, 0, 0))
    np.testing.assert_allclose(vol.isel(z=[4]).geo.origin, _by_hand(affine, 4, 0, 0))


def test_axis_aligned_volume_keeps_mm_coords_consistent_after_isel() -> None:
    affine = np.diag([0.8, 0.8, -3.0, 1.0])
    affine[:3, 3] = [-100.0, -50.0, 60.0]
    vol = make_volume(np.zeros((10, 8, 8), bool), affine)
    sub = vol.isel(z=slice(3, 7))
    np.testing.assert_allclose(sub.geo.origin, [-100.0, -50.0, 60.0 - 9.0])
    np.testing.assert_allclose(sub.coords["z"].values, sub.geo.world([[k, 0, 0] for k in range(4)])[:, 2])
    # sel by mm lands on the same voxels as isel
    assert float(vol.sel(z=51.0).coords["k"]) == 3


def test_refuses_what_no_affine_describes() -> None:
    affine = _oblique_flipped()
    vol = make_volume(np.zeros((6, 5, 4)), affine, name="ct")
    with pytest.raises(VolumeError, match="not evenly spaced"):
        vol.isel(z=[0, 2, 3]).geo.check()
    with pytest.raises(VolumeError, match="dims"):
        vol.transpose("x", "y", "z").geo.check()
    with pytest.raises(VolumeError, match="dims"):
        vol.isel(z=0).geo.check()  # a scalar selection drops z: a 2-D slice is not a volume
    bare = vol.copy()
    del bare.attrs["affine"]
    with pytest.raises(VolumeError, match="make_volume"):
        bare.geo.check()
    aligned = make_volume(np.zeros((4, 3, 3)), np.diag([1.0, 1.0, 2.0, 1.0]), name="mask")
    moved = aligned.assign_coords(z=aligned.coords["z"].values + 5.0)  # mm coords edited, affine not
    with pytest.raises(VolumeError, match="stale"):
        moved.geo.check()


def test_attrs_affine_edit_is_followed_not_cached() -> None:
    vol = make_volume(np.zeros((3, 3, 3)), _oblique_flipped())
    first = vol.geo.origin
    vol.attrs["affine"] = vol.attrs["affine"].copy()
    vol.attrs["affine"][:3, 3] += 1.0
    np.testing.assert_allclose(vol.geo.origin, first + 1.0)


def test_in_place_edits_after_a_remembered_answer_are_followed() -> None:
    """The accessor remembers its answer only with the exact bytes it was computed from: an in-place edit of the
    affine is followed, and one that contradicts the mm coordinates is refused (the check runs again). (Index
    coordinates cannot be edited in place: xarray makes them read-only.)"""
    vol = make_volume(np.zeros((3, 4, 5)), _oblique_flipped())
    first = vol.geo.affine
    np.testing.assert_array_equal(vol.geo.affine, first)  # remembered, same answer
    vol.attrs["affine"][:3, 3] += 2.0  # the same array object, edited in place
    np.testing.assert_allclose(vol.geo.affine[:3, 3], first[:3, 3] + 2.0)
    axis_aligned = make_volume(np.zeros((3, 4, 5)), np.diag([0.7, 0.9, 2.5, 1.0]))
    assert axis_aligned.geo.spacing.tolist() == [2.5, 0.9, 0.7]
    axis_aligned.attrs["affine"][0, 3] += 10.0  # now the mm coordinates no longer match the affine
    with pytest.raises(VolumeError, match="no longer match"):
        _ = axis_aligned.geo.affine
    returned = vol.geo.affine
    returned[0, 0] = 99.0  # a caller's copy: the remembered affine is not changed through it
    assert vol.geo.affine[0, 0] != 99.0
