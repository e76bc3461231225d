"""pacsai.planning.structures: exact answers on boxes, analytic spheres and brute force, on anisotropic grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pacsai.errors import PacsaiWarning, PlanningError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning import structures as st

SPACING = (0.8, 1.2, 2.5)  # (Δi, Δj, Δk) = x, y, z mm: deliberately anisotropic


def vol(array, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None, name="s"):
    direction = np.eye(3) if direction is None else direction
    return make_volume(np.asarray(array, dtype=bool), affine_from(origin, direction, spacing), name=name)


def box(shape, lo, hi):
    """Boolean (z, y, x) array with [lo, hi) set (index order z, y, x)."""
    a = np.zeros(shape, dtype=bool)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return a


def ball(shape, centre_mm, radius_mm, spacing=SPACING):
    """Voxels whose centre lies within radius of centre (grid origin at 0)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = (
        (x * spacing[0] - centre_mm[0]) ** 2
        + (y * spacing[1] - centre_mm[1]) ** 2
        + (z * spacing[2] - centre_mm[2]) ** 2
    )
    return d2 <= radius_mm**2 + 1e-9


# ------------------------------------------------------------------------------------------ size and shape
def test_volume_and_centroid_of_a_box_are_exact():
    mask = vol(box((10, 12, 14), (2, 3, 4), (6, 8, 10)), origin=(-10.0, 5.0, 100.0))  # 4×5×6 voxels
    assert st.volume_cc(mask) == pytest.approx(120 * 0.8 * 1.2 * 2.5 / 1000, rel=1e-12)
    # centre index (i, j, k) = (6.5, 5, 3.5)
    assert st.centroid(mask) == pytest.approx((-10 + 6.5 * 0.8, 5 + 5 * 1.2, 100 + 3.5 * 2.5), abs=1e-12)


def test_longest_diameter_of_a_box_is_its_space_diagonal_on_any_grid():
    arr = box((10, 12, 14), (2, 3, 4), (6, 8, 10))
    expected = math.sqrt((6 * 0.8) ** 2 + (5 * 1.2) ** 2 + (4 * 2.5) ** 2)
    assert st.longest_diameter(vol(arr)) == pytest.approx(expected, abs=1e-9)
    oblique = Rotation.from_euler("xyz", [17, -8, 31], degrees=True).as_matrix()
    assert st.longest_diameter(vol(arr, direction=oblique)) == pytest.approx(expected, abs=1e-9)
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    assert st.longest_diameter(vol(one)) == pytest.approx(math.hypot(0.8, 1.2, 2.5), abs=1e-12)
    assert st.longest_diameter(vol(np.zeros((3, 3, 3), bool))) == 0.0


def test_longest_diameter_of_a_digital_ball_is_bounded_by_its_cells():
    # Cells of a digital ball of radius r lie within r + δ of the centre (δ = half the voxel diagonal), and the
    # extreme voxel centres along x sit within one spacing of ±r: so 2(r − Δx) ≤ diameter ≤ 2(r + δ).
    r, delta = 9.0, 0.5 * math.hypot(*SPACING)
    mask = vol(ball((12, 24, 30), (12.0, 14.4, 15.0), r))
    d = st.longest_diameter(mask)
    assert 2 * (r - 0.8) <= d <= 2 * (r + delta)


def test_axial_diameters_use_in_plane_pixel_corners():
    arr = np.zeros((4, 50, 50), bool)
    arr[1, 5:35, 2:42] = True  # 40 columns × 30 rows at 1 mm → diagonal 50 mm
    arr[2, 10:16, 10:18] = True  # 8 × 6 → 10 mm
    mask = vol(arr, spacing=(1.0, 1.0, 3.0))
    assert st.axial_diameters(mask).tolist() == pytest.approx([0.0, 50.0, 10.0, 0.0], abs=1e-9)
    assert st.longest_axial_diameter(mask) == pytest.approx(50.0, abs=1e-9)
    # The 3D diameter also spans the slice thickness (3 mm): the large rectangle's cells dominate.
    assert st.longest_diameter(mask) == pytest.approx(math.hypot(40, 30, 3), abs=1e-9)


def test_structure_stats_components_and_edge():
    arr = np.zeros((6, 10, 10), bool)
    arr[1:3, 1:3, 1:3] = True
    arr[4, 7:10, 7] = True  # touches the x edge? no: y reaches index 9 = the grid edge
    stats = st.structure_stats(vol(arr, spacing=(1.0, 1.0, 1.0)), name="GTV")
    assert (stats.name, stats.n_voxels, stats.n_components, stats.touches_edge) == ("GTV", 11, 2, True)
    assert stats.volume_cc == pytest.approx(0.011, abs=1e-12)
    assert [c.values.sum() for c in st.components(vol(arr))] == [8, 3]
    arr[4] = False
    assert st.structure_stats(vol(arr)).touches_edge is False
    with pytest.warns(PacsaiWarning, match="empty"):
        empty = st.structure_stats(vol(np.zeros((3, 3, 3), bool)))
    assert empty.volume_cc == 0.0 and empty.n_components == 0


# ------------------------------------------------------------------------------------------ margins
def brute_expand(arr, spacing, margins_xyz, direction=None):
    """Definition: v in the expansion iff min over mask voxels u of sqrt(Σ((Δ_a)/m_a)²) ≤ 1 (patient axes)."""
    direction = np.eye(3) if direction is None else direction
    kji_all = np.argwhere(np.ones(arr.shape, bool))
    kji_in = np.argwhere(arr)
    to_mm = direction * np.asarray(spacing)[None, :]
    p_all = kji_all[:, ::-1] @ to_mm.T
    p_in = kji_in[:, ::-1] @ to_mm.T
    m = np.asarray(margins_xyz, dtype=float)
    d = ((p_all[:, None, :] - p_in[None, :, :]) / m) ** 2
    inside = d.sum(-1).min(axis=1) <= 1 + 1e-9
    return inside.reshape(arr.shape)


def test_expand_matches_the_definition_exactly_for_anisotropic_margins():
    rng = np.random.default_rng(7)
    arr = np.zeros((9, 14, 16), bool)
    arr[3:6, 5:9, 6:10] = rng.random((3, 4, 4)) > 0.4
    margins = {"lr": 2.1, "ap": 3.0, "si": 5.0}
    got = st.expand(vol(arr), margins).values
    assert np.array_equal(got, brute_expand(arr, SPACING, (2.1, 3.0, 5.0)))


def test_isotropic_expand_is_exact_on_an_oblique_grid():
    rng = np.random.default_rng(3)
    arr = np.zeros((8, 12, 12), bool)
    arr[3:5, 4:8, 4:8] = rng.random((2, 4, 4)) > 0.3
    rot = Rotation.from_euler("zyx", [25, 10, -5], degrees=True).as_matrix()
    got = st.expand(vol(arr, direction=rot), 3.0).values
    assert np.array_equal(got, brute_expand(arr, SPACING, (3.0, 3.0, 3.0), direction=rot))


def test_box_grows_by_floor_of_margin_over_spacing_along_each_axis():
    arr = box((20, 20, 20), (8, 8, 8), (12, 12, 12))
    out = st.expand(vol(arr), (5.0, 3.0, 10.0)).values  # (lr, ap, si)
    nz = np.argwhere(out)
    # x: floor(5/0.8)=6, y: floor(3/1.2)=2, z: floor(10/2.5)=4 voxels beyond each face.
    assert nz.min(axis=0).tolist() == [8 - 4, 8 - 2, 8 - 6]
    assert nz.max(axis=0).tolist() == [11 + 4, 11 + 2, 11 + 6]
    # Corners are ellipsoidal, not boxy: the voxel 4 steps out in z and 6 in x is beyond the ellipsoid.
    assert not out[11 + 4, 10, 11 + 6]
    assert out[11 + 4, 10, 11]


@pytest.mark.parametrize(("r", "m"), [(6.0, 4.0), (10.0, 7.5)])
def test_sphere_expanded_by_m_is_a_sphere_of_radius_r_plus_m(r, m):
    # Sandwich (δ = half the voxel diagonal): every grid point within r + m − 2δ of the centre has a mask
    # voxel within m (the nearest grid point to the point at distance r − δ is in the digital ball), and none
    # beyond r + m can (triangle inequality).
    shape = (20, 44, 64)
    centre = (25.6, 26.4, 25.0)
    delta = 0.5 * math.hypot(*SPACING)
    got = st.expand(vol(ball(shape, centre, r)), m).values
    outer = ball(shape, centre, r + m)
    inner = ball(shape, centre, r + m - 2 * delta)
    assert not np.any(got & ~outer)
    assert not np.any(inner & ~got)
    # Volume: cells of a digital ball of radius R lie between the balls R − δ and R + δ.
    v = got.sum() * np.prod(SPACING)
    assert 4 / 3 * math.pi * (r + m - 3 * delta) ** 3 <= v <= 4 / 3 * math.pi * (r + m + delta) ** 3
    assert v == pytest.approx(4 / 3 * math.pi * (r + m) ** 3, rel=0.15)


def test_anisotropic_margin_extents_on_a_sphere():
    # A sphere ⊕ ellipsoid (semi-axes m_a) reaches r + m_a along each axis: the furthest voxel centre along
    # the axis lies within one spacing of it.
    shape, centre, r = (24, 40, 60), (24.0, 24.0, 30.0), 6.0
    margins = (8.0, 3.0, 12.5)
    got = st.expand(vol(ball(shape, centre, r)), margins).values
    kji = np.argwhere(got)
    for axis, (m, sp, c) in enumerate(zip(margins, SPACING, centre)):
        coords = kji[:, 2 - axis] * sp
        reach = coords.max() - c
        assert r + m - sp - 1e-9 <= reach <= r + m + 1e-9
        assert c - coords.min() == pytest.approx(reach, abs=sp)


def test_margin_zero_clipping_and_edge_warning():
    arr = box((10, 10, 10), (4, 4, 4), (6, 6, 6))
    assert np.array_equal(st.expand(vol(arr), 0.0).values, arr)
    assert np.array_equal(
        st.expand(vol(arr), {"si": 0, "lr": 0, "ap": 1.2}).values.sum(axis=(0, 2)) > 0,
        np.isin(np.arange(10), [3, 4, 5, 6]),
    )
    within = vol(box((10, 10, 10), (0, 0, 0), (10, 10, 5)))
    clipped = st.expand(vol(arr), 3.0, within=within).values
    assert clipped[:, :, 5:].sum() == 0 and clipped[:, :, 4].any()
    with pytest.warns(PacsaiWarning, match="cut off by the edge"):
        st.expand(vol(arr), 20.0)


def test_ctv_ptv_prv_and_van_herk():
    spacing = (1.0, 1.0, 1.0)
    gtv = vol(ball((30, 30, 30), (15, 15, 15), 4.0, spacing), spacing=spacing, name="GTV")
    body = vol(box((30, 30, 30), (0, 0, 0), (30, 30, 17)), spacing=spacing, name="BODY")
    ctv, ptv = st.ctv_ptv(gtv, ctv_margin=5.0, ptv_margin=(3.0, 3.0, 5.0), body=body)
    assert (ctv.name, ptv.name) == ("CTV", "PTV")
    assert not np.any(ctv.values & ~body.values)
    assert np.array_equal(ctv.values, st.expand(gtv, 5.0).values & body.values)
    assert np.array_equal(ptv.values, st.expand(ctv, (3.0, 3.0, 5.0)).values)
    assert np.any(ptv.values & ~body.values)  # the PTV is not clipped unless asked
    _, ptv_clipped = st.ctv_ptv(gtv, ctv_margin=5.0, ptv_margin=3.0, body=body, clip_ptv_to_body=True)
    assert not np.any(ptv_clipped.values & ~body.values)
    with pytest.warns(PacsaiWarning, match="not clipped"):
        st.ctv_ptv(gtv, ctv_margin=1.0, ptv_margin=1.0)
    oar = vol(box((30, 30, 30), (5, 5, 5), (8, 8, 8)), spacing=spacing, name="Cord")
    p = st.prv(oar, 2.0)
    assert p.name == "Cord_PRV" and p.values.sum() == np.count_nonzero(st.expand(oar, 2.0).values)
    assert st.van_herk_margin(2.0, 3.0) == pytest.approx(7.1)
    assert st.van_herk_margin((1.0, 2.0, 4.0), (2.0, 2.0, 0.0)) == pytest.approx((3.9, 6.4, 10.0))


def test_margin_errors():
    arr = box((6, 6, 6), (2, 2, 2), (4, 4, 4))
    with pytest.raises(PlanningError, match="≥ 0"):
        st.parse_margin(-1.0)
    with pytest.raises(PlanningError, match="unknown margin axis"):
        st.parse_margin({"up": 3})
    assert st.parse_margin({"x": 1, "superior_inferior": 2}) == (1.0, 0.0, 2.0)
    rot = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    with pytest.raises(PlanningError, match="oblique"):
        st.expand(vol(arr, direction=rot), (1.0, 2.0, 3.0))
    sheared = make_volume(
        arr, np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), name="t"
    )
    with pytest.raises(PlanningError, match="sheared"):
        st.expand(sheared, 2.0)
    with pytest.raises(PlanningError, match="different grids"):
        st.expand(vol(arr), 1.0, within=vol(arr, spacing=(1, 1, 1)))


# ------------------------------------------------------------------------------------------ relations
def test_min_surface_distance_and_overlap():
    a = box((20, 20, 20), (2, 2, 2), (5, 5, 5))
    b = box((20, 20, 20), (9, 2, 2), (12, 5, 5))  # 4 empty slices between: centres 5 slices apart in z
    assert st.min_surface_distance(vol(a), vol(b)) == pytest.approx(5 * 2.5, abs=1e-12)
    c = box((20, 20, 20), (7, 8, 10), (9, 10, 12))  # offset in z (3), y (4) and x (6) voxels
    expected = math.sqrt((3 * 2.5) ** 2 + (4 * 1.2) ** 2 + (6 * 0.8) ** 2)
    assert st.min_surface_distance(vol(a), vol(c)) == pytest.approx(expected, abs=1e-12)
    d = box((20, 20, 20), (4, 4, 4), (8, 8, 8))  # overlaps a in a 1×1×1 corner
    assert st.min_surface_distance(vol(a), vol(d)) == 0.0
    cc, pct = st.overlap(vol(a), vol(d))
    assert cc == pytest.approx(0.8 * 1.2 * 2.5 / 1000, rel=1e-12)
    assert pct == pytest.approx(100 / 27, rel=1e-12)
    rows = st.target_relations({"A": vol(a), "B": vol(b)}, vol(d), target_name="PTV")
    assert [(r.name, r.target) for r in rows] == [("A", "PTV"), ("B", "PTV")]
    assert rows[0].to_dict()["overlap_pct"] == pytest.approx(100 / 27)
    with pytest.raises(PlanningError, match="empty"):
        st.min_surface_distance(vol(a), vol(np.zeros_like(a)))


def test_diameters_equal_brute_force_over_all_voxel_corners_on_an_oblique_grid():
    rng = np.random.default_rng(11)
    arr = np.zeros((5, 9, 11), bool)
    arr[1:4, 2:8, 2:9] = rng.random((3, 6, 7)) > 0.5
    rot = Rotation.from_euler("xyz", [12, -20, 40], degrees=True).as_matrix()
    mask = vol(arr, direction=rot)
    to_mm = rot * np.asarray(SPACING)[None, :]
    cube = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    ijk = np.argwhere(arr)[:, ::-1]
    pts = ((ijk[:, None, :] + cube[None]).reshape(-1, 3)) @ to_mm.T
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1).max())
    assert st.longest_diameter(mask) == pytest.approx(brute, abs=1e-9)
    for k in range(arr.shape[0]):
        sl = np.argwhere(arr[k])[:, ::-1]
        square = np.array([[a, b] for a in (-0.5, 0.5) for b in (-0.5, 0.5)])
        p2 = ((sl[:, None, :] + square[None]).reshape(-1, 2)) @ to_mm[:, :2].T
        expected = np.sqrt(((p2[:, None] - p2[None]) ** 2).sum(-1).max()) if len(sl) else 0.0
        assert st.axial_diameters(mask)[k] == pytest.approx(expected, abs=1e-9)
