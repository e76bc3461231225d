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
    """Definition (voxels as boxes): v in the expansion iff min over mask voxels u of
    Σ_a (max(|Δ_a| − s_a/2, 0) / m_a)² ≤ 1, Δ_a the centre offset along grid axis a (mm). The direction only
    rotates the grid rigidly, which changes no distance along its own axes."""
    kji_all = np.argwhere(np.ones(arr.shape, bool))
    kji_in = np.argwhere(arr)
    s = np.asarray(spacing, dtype=float)
    m = np.asarray(margins_xyz, dtype=float)
    gap = np.maximum(np.abs(kji_all[:, None, ::-1] - kji_in[None, :, ::-1]) * s - s / 2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(gap > 0, gap / m, 0.0)
    inside = (ratio**2).sum(-1).min(axis=1) <= 1 + 1e-9
    return inside.reshape(arr.shape)


def test_expand_matches_the_definition_exactly_for_anisotropic_margins():
    rng = np.random.default_rng(7)
    arr = np.zeros((9, 14, 16), bool)
    arr[3:6, 5:9, 6:10] = rng.random((3, 4, 4)) > 0.4
    margins = {"lr": 2.1, "ap": 3.0, "si": 5.0}
    got = st.expand(vol(arr), margins).values
    assert np.array_equal(got, brute_expand(arr, SPACING, (2.1, 3.0, 5.0)))
    flat = st.expand(vol(arr), {"lr": 0.0, "ap": 1.9, "si": 2.6}).values  # a zero margin on one axis
    assert np.array_equal(flat, brute_expand(arr, SPACING, (0.0, 1.9, 2.6)))


def test_isotropic_expand_is_exact_on_an_oblique_grid():
    rng = np.random.default_rng(3)
    arr = np.zeros((8, 12, 12), bool)
    arr[3:5, 4:8, 4:8] = rng.random((2, 4, 4)) > 0.3
    rot = Rotation.from_euler("zyx", [25, 10, -5], degrees=True).as_matrix()
    got = st.expand(vol(arr, direction=rot), 3.0).values
    assert np.array_equal(got, brute_expand(arr, SPACING, (3.0, 3.0, 3.0), direction=rot))


def test_five_mm_margin_on_3_mm_slices_reaches_two_slices_each_way():
    # One voxel, 1 × 1 mm pixels on 3 mm slices. The voxel's cell spans ±1.5 mm in z and ±0.5 mm in-plane.
    # Slice centres 3 mm and 6 mm away are 1.5 mm and 4.5 mm from its face (≤ 5 mm: in); 9 mm away is 7.5 mm
    # (out). In-plane, pixel centres n mm away are n − 0.5 mm from the face: n = 1..5 in, 6 (5.5 mm) out.
    spacing = (1.0, 1.0, 3.0)
    arr = np.zeros((9, 15, 15), bool)
    arr[4, 7, 7] = True
    out = st.expand(vol(arr, spacing=spacing), 5.0).values
    assert out[:, 7, 7].tolist() == [False, False, True, True, True, True, True, False, False]
    assert out[4, 7, :].tolist() == [False] * 2 + [True] * 11 + [False] * 2
    # Off-axis, by hand: 2 slices up and 1 pixel over: (4.5, 0.5) mm from the cell → 4.53 mm, in;
    # 2 slices up and 3 pixels over: (4.5, 2.5) → 5.15 mm, out; 1 slice up, 4 over: (1.5, 3.5) → 3.81, in.
    assert out[6, 7, 8] and not out[6, 7, 10] and out[5, 7, 11]
    assert out[5, 10, 10] and not out[5, 11, 11]  # (1.5, 2.5, 2.5) → 3.84 mm in; (1.5, 3.5, 3.5) → 5.17 out
    # Exactly at the margin counts as inside: 1.5 mm reaches the next slice's centre, 1.49 mm does not.
    assert st.expand(vol(arr, spacing=spacing), {"si": 1.5}).values[:, 7, 7].sum() == 3
    assert st.expand(vol(arr, spacing=spacing), {"si": 1.49}).values.sum() == 1
    # Voxel-centre distances would have added one slice each way; the surface rule adds floor(m/s + ½).
    assert out.sum(axis=(1, 2)).astype(bool).sum() == 1 + 2 * math.floor(5 / 3 + 0.5)


def test_box_grows_by_floor_of_margin_over_spacing_plus_half_along_each_axis():
    arr = box((24, 24, 24), (10, 10, 10), (14, 14, 14))
    out = st.expand(vol(arr), (5.0, 3.0, 10.0)).values  # (lr, ap, si)
    nz = np.argwhere(out)
    # x: floor(5/0.8 + ½)=6, y: floor(3/1.2 + ½)=3, z: floor(10/2.5 + ½)=4 voxels beyond each face.
    assert nz.min(axis=0).tolist() == [10 - 4, 10 - 3, 10 - 6]
    assert nz.max(axis=0).tolist() == [13 + 4, 13 + 3, 13 + 6]
    # Corners are ellipsoidal, not boxy: 4 steps out in z and 6 in x is (8.75/10)² + (4.4/5)² = 1.54 > 1.
    assert not out[13 + 4, 12, 13 + 6]
    assert out[13 + 4, 12, 13]


@pytest.mark.parametrize(("r", "m"), [(6.0, 4.0), (10.0, 7.5)])
def test_sphere_expanded_by_m_is_a_sphere_of_radius_r_plus_m(r, m):
    # Sandwich (δ = half the voxel diagonal): every grid point within r + m − 2δ of the centre has a mask
    # voxel centre within m (the nearest grid point to the point at distance r − δ is in the digital ball),
    # and none beyond r + m + δ can reach a mask cell (cell points lie within δ of a centre within r).
    shape = (22, 44, 64)
    centre = (25.6, 26.4, 27.5)
    delta = 0.5 * math.hypot(*SPACING)
    got = st.expand(vol(ball(shape, centre, r)), m).values
    outer = ball(shape, centre, r + m + delta)
    inner = ball(shape, centre, r + m - 2 * delta)
    assert not np.any(got & ~outer)
    assert not np.any(inner & ~got)
    # Volume: cells of the result lie between the balls r + m − 3δ and r + m + 2δ.
    v = got.sum() * np.prod(SPACING)
    assert 4 / 3 * math.pi * (r + m - 3 * delta) ** 3 <= v <= 4 / 3 * math.pi * (r + m + 2 * delta) ** 3


def test_anisotropic_margin_extents_on_a_sphere():
    # A sphere ⊕ ellipsoid (semi-axes m_a) reaches r + m_a along each axis; the mask's cells reach half a
    # spacing beyond its centres, so the furthest voxel centre lies within [r + m − s, r + m + s/2].
    shape, centre, r = (24, 40, 60), (24.0, 24.0, 30.0), 6.0
    margins = (8.0, 3.0, 12.5)
    got = st.expand(vol(ball(shape, centre, r)), margins).values
    kji = np.argwhere(got)
    for axis, (m, sp, c) in enumerate(zip(margins, SPACING, centre, strict=True)):
        coords = kji[:, 2 - axis] * sp
        reach = coords.max() - c
        assert r + m - sp - 1e-9 <= reach <= r + m + sp / 2 + 1e-9
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
    # The GTV (z 11..19) pokes out of the BODY (z < 17): the clip trims the margin, never the GTV.
    with pytest.warns(PacsaiWarning, match="outside 'BODY'"):
        ctv, ptv = st.ctv_ptv(gtv, ctv_margin=5.0, ptv_margin=(3.0, 3.0, 5.0), body=body)
    assert (ctv.name, ptv.name) == ("CTV", "PTV")
    outside = gtv.values & ~body.values
    assert outside.sum() > 0 and ctv.attrs["gtv_outside_body_cc"] == pytest.approx(outside.sum() / 1000)
    assert np.array_equal(ctv.values, (st.expand(gtv, 5.0).values & body.values) | gtv.values)
    assert not np.any(gtv.values & ~ctv.values) and not np.any(ctv.values & ~ptv.values)
    assert np.array_equal(ptv.values, st.expand(ctv, (3.0, 3.0, 5.0)).values)
    assert np.any(ptv.values & ~body.values)  # the PTV is not clipped unless asked
    with pytest.warns(PacsaiWarning, match="outside"):
        ctv2, ptv_clipped = st.ctv_ptv(gtv, ctv_margin=5.0, ptv_margin=3.0, body=body, clip_ptv_to_body=True)
    assert not np.any(ptv_clipped.values & ~body.values & ~ctv2.values)  # clipped, but never inside the CTV
    assert not np.any(ctv2.values & ~ptv_clipped.values)
    # An anatomy clip that excludes the whole GTV still leaves the GTV in the CTV.
    none = vol(np.zeros((30, 30, 30), bool), spacing=spacing)
    ctv3, _ = st.ctv_ptv(
        gtv,
        ctv_margin=5.0,
        ptv_margin=0.0,
        body=vol(np.ones((30, 30, 30), bool), spacing=spacing),
        anatomy=none,
    )
    assert np.array_equal(ctv3.values, gtv.values)
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


# ------------------------------------------------------------------------------------------ states, fragments
def test_structure_state_distinguishes_present_empty_and_missing():
    masks = {"Heart": vol(box((4, 4, 4), (1, 1, 1), (2, 2, 2))), "SpinalCord": vol(np.zeros((4, 4, 4)))}
    assert st.structure_state(masks, "heart") == "present"
    assert st.structure_state(masks, "SPINALCORD") == "empty"
    assert st.structure_state(masks, "Esophagus") == "missing"
    assert st.find_key(masks, "HEART") == "Heart" and st.find_key(masks, "Lung") is None


def test_components_above_a_volume_are_counted_largest_first():
    spacing = (1.0, 1.0, 1.0)  # 1 voxel = 0.001 cm³
    arr = np.zeros((30, 30, 30), bool)
    arr[0:10, 0:10, 0:10] = True  # 1.000 cm³
    arr[20:25, 20:30, 20:30] = True  # 0.500 cm³
    arr[15, 15, 15] = True  # 0.001 cm³
    arr[16, 16, 16] = True  # touches the one above by a corner: 26-connected, one 0.002 cm³ component
    mask = vol(arr, spacing=spacing, name="BODY")
    assert st.component_volumes_cc(mask) == pytest.approx([1.0, 0.5, 0.002])
    assert [st.count_components(mask, min_cc=c) for c in (0.0, 0.002, 0.5, 0.6)] == [3, 3, 2, 1]
    parts = st.components(mask, min_cc=0.5)
    assert [int(p.values.sum()) for p in parts] == [1000, 500] and parts[0].name == "BODY#1"
    assert (
        st.component_volumes_cc(vol(np.zeros((3, 3, 3)))) == []
        and st.components(vol(np.zeros((3, 3, 3)))) == []
    )


@pytest.mark.parametrize("lo", [3, 2])  # the box on the grid's far faces, then one voxel inside them
def test_structure_stats_of_two_pieces_far_apart_by_hand(lo):
    """Every measure runs on the structure's bounding box: the crop must not move, cut or join anything."""
    shape = (6, 6, 6)
    mask = box(shape, (lo,) * 3, (lo + 3,) * 3)
    mask[0, 0, 0] = True  # a single voxel in the opposite corner: a second 26-connected component
    sx, sy, sz = SPACING
    stats = st.structure_stats(vol(mask, origin=(10.0, -20.0, 5.0)))
    assert stats.n_voxels == 28 and stats.n_components == 2
    assert stats.volume_cc == pytest.approx(28 * sx * sy * sz / 1000.0)
    assert stats.touches_edge  # the single voxel lies on the grid's first faces either way
    mean_index = 9 * (3 * lo + 3) / 28  # 9 voxels at each of lo, lo + 1, lo + 2 and one at 0, on every axis
    assert stats.centroid_lps == pytest.approx((10.0 + mean_index * sx, -20.0 + mean_index * sy,
                                                5.0 + mean_index * sz))
    span = lo + 3  # voxel cells from the corner voxel's outer corner to the box's far corner
    assert stats.longest_diameter_mm == pytest.approx(math.sqrt((span * sx) ** 2 + (span * sy) ** 2 + (span * sz) ** 2))
    assert stats.longest_axial_diameter_mm == pytest.approx(3 * math.hypot(sx, sy))
    inner = box(shape, (lo,) * 3, (lo + 3,) * 3)
    assert st.structure_stats(vol(inner)).touches_edge == (lo == 3)
    diameters = st.axial_diameters(vol(mask))
    assert diameters[0] == pytest.approx(math.hypot(sx, sy)) and diameters[lo + 3 :].sum() == 0.0
    assert diameters[lo : lo + 3] == pytest.approx([3 * math.hypot(sx, sy)] * 3)
