"""pacsai.planning.dvh and .fractionation: hand-computed DVHs, plan indices, and THE test against a real TPS."""

from __future__ import annotations

import pickle
import time
import warnings

import numpy as np
import pydicom
import pytest

from pacsai.errors import PacsaiWarning, PlanningError
from pacsai.imaging.geometry import affine_from, make_volume, refined_grid
from pacsai.planning import fractionation as fx
from pacsai.planning.dvh import DVH, coverage_of, dose_coverage, dvh, homogeneity_index, plan_quality

FOR = "1.2.3.4"


def grid(array, spacing=(10.0, 10.0, 10.0), origin=(0.0, 0.0, 0.0), name="v", **attrs):
    attrs.setdefault("frame_of_reference_uid", FOR)
    return make_volume(np.asarray(array), affine_from(origin, np.eye(3), spacing), name=name, attrs=attrs)


def ramp_dvh():
    """100 voxels of exactly 1 cm³ with doses 1, 2, ..., 100 Gy (dose and mask on one grid)."""
    dose = grid(np.arange(1.0, 101.0).reshape(1, 10, 10), units="Gy")
    return dvh(dose, grid(np.ones((1, 10, 10), bool), name="ramp"))


def test_dose_ramp_metrics_are_exact():
    h = ramp_dvh()
    assert h.method.startswith("dose grid voxels")
    assert (h.volume_cc, h.mean, h.min, h.max) == pytest.approx((100.0, 50.5, 1.0, 100.0), abs=1e-12)
    # Dx% = minimum dose to the hottest x %: the hottest 2 voxels are 99, 100 → D2 = 99.
    assert [h.d(x) for x in (0, 2, 50, 95, 98, 100)] == pytest.approx([100, 99, 51, 6, 3, 1], abs=1e-9)
    assert h.d_cc(0.03) == pytest.approx(100.0) and h.d_cc(2.5) == pytest.approx(98.0)
    # Vx: % receiving ≥ x Gy (inclusive).
    assert [h.v(x) for x in (0, 1, 50, 50.5, 100, 100.01)] == pytest.approx(
        [100, 100, 51, 50, 1, 0], abs=1e-9
    )
    assert h.v_cc(20) == pytest.approx(81.0)
    bins, pct = h.curve(bin_width=0.5)
    assert bins[0] == 0 and pct[0] == 100 and pct[bins.tolist().index(50.0)] == pytest.approx(51)
    assert np.all(np.diff(pct) <= 0)
    d = h.to_dict()
    assert {
        k: d[k] for k in ("mean_gy", "d98_gy", "d95_gy", "d50_gy", "d2_gy", "d0_03cc_gy", "volume_cc")
    } == (
        pytest.approx(
            {
                "mean_gy": 50.5,
                "d98_gy": 3,
                "d95_gy": 6,
                "d50_gy": 51,
                "d2_gy": 99,
                "d0_03cc_gy": 100,
                "volume_cc": 100,
            }
        )
    )
    assert homogeneity_index(h) == pytest.approx((99 - 3) / 51)
    clone = pickle.loads(pickle.dumps(h))
    assert (clone.name, clone.d(50), clone.mean) == ("ramp", h.d(50), h.mean)


def test_from_samples_weights_and_errors():
    h = DVH.from_samples([2.0, 4.0], [3.0, 1.0], name="w")
    assert (h.mean, h.d(50), h.d(25), h.v(3)) == pytest.approx((2.5, 2.0, 4.0, 25.0))
    assert h.level_volumes_cc.tolist() == pytest.approx([3.0, 1.0])
    with pytest.warns(PacsaiWarning, match="smaller than 10"):
        assert h.d_cc(10) == pytest.approx(2.0)
    with pytest.raises(PlanningError, match="empty"):
        DVH.from_samples([], 1.0)
    with pytest.raises(PlanningError, match="NaN"):
        DVH.from_samples([1.0, np.nan], 1.0)
    with pytest.raises(PlanningError, match="0–100"):
        h.d(101)


def test_dose_on_another_grid_is_interpolated_and_edge_voxels_supersampled():
    # A dose linear in x is reproduced exactly by trilinear interpolation: D(x) = 2 + 0.1·x Gy.
    coarse = grid(
        np.broadcast_to(2 + 0.1 * (np.arange(20) * 4.0), (6, 8, 20)).copy(),
        spacing=(4.0, 4.0, 4.0),
        units="Gy",
    )
    fine = np.zeros((12, 16, 40), bool)
    fine[3:7, 4:9, 10:20] = True  # x centres 20.0 ... 38.0 mm (2 mm grid)
    mask = grid(fine, spacing=(2.0, 2.0, 2.0), name="PTV")
    h = dvh(coarse, mask)
    assert "sub-sampled 2×2×2" in h.method and "trilinear" in h.method
    assert h.volume_cc == pytest.approx(200 * 8 / 1000)
    # Sub-points are symmetric about each voxel centre, so the mean is the dose at the centroid (x = 29 mm);
    # the extreme sub-points sit a quarter voxel (0.5 mm) beyond the outer centres.
    assert h.mean == pytest.approx(2 + 0.1 * 29.0, abs=1e-12)
    assert (h.min, h.max) == pytest.approx((2 + 0.1 * 19.5, 2 + 0.1 * 38.5), abs=1e-12)
    centre = dvh(coarse, mask, method="centre")
    assert (centre.min, centre.max) == pytest.approx((2 + 0.1 * 20.0, 2 + 0.1 * 38.0), abs=1e-12)
    with pytest.raises(PlanningError, match="one grid"):
        dvh(coarse, mask, method="voxel")


def test_structure_half_outside_the_dose_grid_is_measured_and_never_silently_zero():
    dose = grid(np.full((4, 4, 4), 10.0), spacing=(1.0, 1.0, 1.0), units="Gy")
    mask = np.zeros((4, 4, 12), bool)
    mask[1:3, 1:3, 2:6] = True  # x 2..5 mm: voxels at 4 and 5 mm lie beyond the dose grid's edge (3.5 mm)
    structure = grid(mask, spacing=(1.0, 1.0, 1.0))
    # Half of the 16 voxels (8 × 1 mm³) are outside; every sub-point of a voxel is on the voxel's side of
    # the edge (the grid faces coincide), so centre and supersample agree exactly.
    for method in ("centre", "supersample"):
        assert dose_coverage(dose, structure, method=method) == pytest.approx((0.008, 0.5))
    with pytest.warns(PacsaiWarning, match=r"0.008 cm³ \(50 %\).*excluded"):
        h = dvh(dose, structure, method="centre")
    assert (h.volume_cc, h.uncovered_cc, h.min, h.v(10)) == pytest.approx((0.008, 0.008, 10.0, 100.0))
    assert "0.008 cm³ outside the dose grid excluded" in h.method and h.to_dict()["uncovered_cc"] == 0.008
    with pytest.warns(PacsaiWarning, match="counted as 0 Gy"):
        z = dvh(dose, structure, method="centre", outside="zero")
    assert (z.volume_cc, z.v(10), z.min) == pytest.approx((0.016, 50.0, 0.0))
    with pytest.raises(PlanningError, match="0.008 cm³ .* outside the dose grid"):
        dvh(dose, structure, method="centre", outside="error")
    with pytest.warns(PacsaiWarning, match="excluded"):
        q = plan_quality(dose, structure, prescription_gy=10.0)
    assert (q.target_volume_cc, q.target_uncovered_cc, q.coverage_v95_pct) == pytest.approx(
        (0.008, 0.008, 100.0)
    )
    far = np.zeros((4, 4, 12), bool)
    far[1, 1, 9:11] = True
    with pytest.raises(PlanningError, match="entirely outside"):
        dvh(dose, grid(far, spacing=(1.0, 1.0, 1.0)))
    assert dose_coverage(dose, grid(far, spacing=(1.0, 1.0, 1.0))) == pytest.approx((0.002, 1.0))
    assert dose_coverage(dose, grid(np.ones((4, 4, 4), bool), spacing=(1.0, 1.0, 1.0))) == (0.0, 0.0)


def test_incompatible_inputs_raise():
    dose = grid(np.ones((2, 2, 2)), units="Gy")
    mask = grid(np.ones((2, 2, 2), bool))
    with pytest.raises(PlanningError, match="different patient frames"):
        dvh(dose, grid(np.ones((2, 2, 2), bool), frame_of_reference_uid="9.9"))
    with pytest.raises(PlanningError, match="not Gy"):
        dvh(grid(np.ones((2, 2, 2)), units="relative"), mask)
    with pytest.raises(PlanningError, match="empty"):
        dvh(dose, grid(np.zeros((2, 2, 2), bool)))
    with pytest.raises(PlanningError, match="unknown DVH method"):
        dvh(dose, grid(np.ones((2, 2, 2), bool), spacing=(5.0, 5.0, 5.0)), method="magic")  # type: ignore[arg-type]


def test_plan_quality_indices_by_hand():
    # 1 cm³ voxels. Target: 2×2×2 = 8 cc. Prescription isodose (60 Gy) region: a 3×3×2 block = 18 cc that
    # holds 6 of the 8 target voxels; 30–59 Gy shell: another 12 voxels; 0 elsewhere.
    rx = 60.0
    dose = np.zeros((6, 6, 6))
    dose[1:3, 1:4, 1:4] = rx  # 18 voxels ≥ Rx
    dose[3, 1:4, 1:5] = 35.0  # 12 voxels in [50 %, 100 %)
    target = np.zeros((6, 6, 6), bool)
    target[2:4, 2:4, 2:4] = True  # z=2 slice (4 voxels) at Rx; z=3 slice (4 voxels) at 35 Gy
    d, t = grid(dose, units="Gy"), grid(target, name="PTV")
    q = plan_quality(d, t, prescription_gy=rx)
    assert (q.target_volume_cc, q.piv_cc, q.piv50_cc, q.tv_piv_cc) == pytest.approx((8, 18, 30, 4))
    assert q.coverage_v95_pct == pytest.approx(50.0)
    assert q.ci_rtog == pytest.approx(18 / 8)
    assert q.ci_paddick == pytest.approx(4**2 / (8 * 18))
    assert q.gradient_index == pytest.approx(30 / 18)
    assert q.homogeneity_index == pytest.approx((60 - 35) / 60)  # D2 = 60, D98 = 35, D50 = 60 (V(≥60) = 50 %)
    body = np.zeros((6, 6, 6), bool)
    body[:, :, :3] = True  # the body holds x < 3: 12 of the Rx voxels, 6 of the 35 Gy ones
    qb = plan_quality(d, t, prescription_gy=rx, body=grid(body, name="BODY"))
    assert (qb.piv_cc, qb.piv50_cc) == pytest.approx((12, 18)) and "BODY" in qb.isodose_region
    assert q.to_dict()["ci_rtog"] == pytest.approx(2.25)
    with pytest.raises(PlanningError, match="prescription"):
        plan_quality(d, t, prescription_gy=0)


def test_bed_eqd2():
    assert fx.bed(30, 2.0, 10.0) == pytest.approx(72.0)
    assert fx.eqd2(30, 2.0, 10.0) == pytest.approx(60.0)  # 2 Gy fractions are their own EQD2
    assert fx.bed(5, 7.0, 3.0) == pytest.approx(35 * (1 + 7 / 3))
    assert fx.eqd2(5, 7.0, 3.0) == pytest.approx(70.0)
    assert fx.eqd2(20, 2.75, 10.0) == pytest.approx(55 * 1.275 / 1.2)
    assert fx.eqd2_total(np.array([0.0, 40.0]), 20, 3.0) == pytest.approx([0.0, 40.0])
    assert fx.bed(np.array([1, 2]), 8.0, 10.0) == pytest.approx([14.4, 28.8])
    with pytest.raises(PlanningError, match="α/β"):
        fx.bed(5, 2.0, 0.0)
    h = DVH.from_samples([10.0, 35.0], [1.0, 3.0], name="x")
    e = fx.eqd2_dvh(h, n_fractions=5, alpha_beta=3.0)
    assert (e.min, e.max) == pytest.approx((10 * (2 + 3) / 5, 70.0))
    assert e.mean == pytest.approx((1 * 10.0 + 3 * 70.0) / 4, abs=1e-3)
    assert e.v(70) == pytest.approx(75.0) and "EQD2" in e.method


# ------------------------------------------------------------------------------------------ real TPS
PRESCRIPTION_GY = 14.0


@pytest.mark.slow
def test_dvh_agrees_with_the_tps(test_data):
    """Dmean and Dmax within 3 % of the 14 Gy prescription of the TPS's DVH statistics (dicompyler breast set).

    Structures are rasterised on the dose grid supersampled 2× in-plane (1.25 mm; the contours lie on the 3 mm
    CT slices, which coincide with the dose frames) and the dose is interpolated with the default method
    (trilinear, surface voxels sub-sampled 2×2×2). Rasterised on the 2.5 mm dose grid itself, Lt Lung's Dmax
    misses by 0.62 Gy: the coarse grid loses the hot rim where the lung meets the tangential fields.
    """
    from pacsai.imaging import read_dose, read_rtstruct

    folder = test_data / "dicompyler_breast_rt"
    dose = read_dose(folder / "rtdose.dcm")
    header = pydicom.dcmread(folder / "rtdose.dcm", stop_before_pixels=True)
    rois = {
        r.ROINumber: r.ROIName
        for r in pydicom.dcmread(folder / "rtss.dcm", stop_before_pixels=True).StructureSetROISequence
    }
    # Units trap (SOURCES.md): DVHMean/MaximumDose are in % of the 14 Gy prescription although DoseUnits is GY.
    tps = {
        rois[item.DVHReferencedROISequence[0].ReferencedROINumber]: (
            float(item.DVHMeanDose) / 100 * PRESCRIPTION_GY,
            float(item.DVHMaximumDose) / 100 * PRESCRIPTION_GY,
            float(item.DVHData[1]),  # cumulative volume of the first bin = the structure volume (cm³)
        )
        for item in header.DVHSequence
    }
    assert tps["BODY"][1] == pytest.approx(float(dose.values.max()), abs=0.01)  # the units reading is right
    big = sorted(name for name, (_, _, cc) in tps.items() if cc >= 10)
    assert big == ["BODY", "Breast", "Heart", "Lt Lung", "Tumor Bed", "Tumor Bed Block"]

    template = refined_grid(dose)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", PacsaiWarning
        )  # rasterisation notes (contours reaching past the grid)
        masks = read_rtstruct(folder / "rtss.dcm", like=template, names=big)
        start = time.perf_counter()
        ours = {name: dvh(dose, masks[name]) for name in big}
    elapsed = time.perf_counter() - start

    tolerance = 0.03 * PRESCRIPTION_GY
    print(f"\nDVH of {len(big)} structures in {elapsed:.1f} s; method: {ours['Heart'].method}")
    print(f"{'structure':16} {'Dmean ours/TPS':>18} {'Dmax ours/TPS':>18} {'cc ours/TPS':>20}")
    for name in big:
        mean, mx, cc = tps[name]
        h = ours[name]
        print(f"{name:16} {h.mean:8.3f} {mean:8.3f} {h.max:8.3f} {mx:8.3f} {h.volume_cc:9.1f} {cc:9.1f}")
    _print_dicompyler(folder, rois, ["Heart", "Tumor Bed", "Tumor Bed Block"])
    for name in big:
        mean, mx, _ = tps[name]
        assert abs(ours[name].mean - mean) <= tolerance, name
        assert abs(ours[name].max - mx) <= tolerance, name


def _print_dicompyler(folder, rois, names):
    """dicompyler-core's dvhcalc on the same files, printed for information only (not asserted)."""
    try:
        from dicompylercore import dvhcalc
    except ImportError:  # pragma: no cover - a test extra
        print("dicompyler-core not installed: no second reference")
        return
    numbers = {name: number for number, name in rois.items()}
    for name in names:
        try:
            calc = dvhcalc.get_dvh(str(folder / "rtss.dcm"), str(folder / "rtdose.dcm"), int(numbers[name]))
        except ImportError as err:  # dicompyler-core 0.5.6 imports APIs that pydicom 3 removed
            print(f"dicompyler-core cannot run with pydicom {pydicom.__version__}: {err}")
            return
        except Exception as err:  # noqa: BLE001 - informational only; our assertions stand alone
            print(f"dicompyler-core failed on {name}: {err}")
            continue
        print(f"dicompyler-core {name:16} mean {calc.mean:.3f} max {calc.max:.3f} volume {calc.volume:.1f}")


def test_mask_on_an_oblique_grid_samples_dose_in_patient_coordinates():
    from scipy.spatial.transform import Rotation

    # Dose linear in patient z (the LPS superior axis): D = 5 + 0.2·z Gy, on an axis-aligned 2 mm grid.
    z = np.arange(30) * 2.0
    dose = grid(
        np.broadcast_to((5 + 0.2 * z)[:, None, None], (30, 30, 30)).copy(),
        spacing=(2.0, 2.0, 2.0),
        units="Gy",
    )
    rot = Rotation.from_euler("xyz", [20, 30, 10], degrees=True).as_matrix()
    arr = np.zeros((6, 6, 6), bool)
    arr[1:5, 1:5, 1:5] = True
    affine = affine_from((30.0, 30.0, 30.0), rot, (1.5, 1.0, 2.0))
    mask = make_volume(arr, affine, name="oblique", attrs={"frame_of_reference_uid": FOR})
    centre_z = (affine[:3, :3] @ np.array([2.5, 2.5, 2.5]) + affine[:3, 3])[2]
    h = dvh(dose, mask)
    assert h.mean == pytest.approx(5 + 0.2 * centre_z, abs=1e-9)
    assert h.volume_cc == pytest.approx(64 * 1.5 * 1.0 * 2.0 / 1000)


def test_a_structure_far_from_the_grid_origin_is_sampled_where_it_is():
    """Sampling runs on the structure's bounding box: its points must keep their place on the grid. Dose = x + 10
    Gy on a 2 mm grid, structure on a 1 mm grid: a 3×3×3 box on the far faces (its centre voxel the only interior
    one) and a single voxel at the origin; a linear dose is interpolated exactly and the 2×2×2 sub-points of an
    edge voxel average to its centre."""
    x_mm = np.arange(4) * 2.0 - 0.5  # dose voxel centres -0.5, 1.5, 3.5, 5.5 mm: faces -1.5 … 6.5 mm
    dose = grid(np.broadcast_to(x_mm + 10.0, (4, 4, 4)), spacing=(2.0, 2.0, 2.0), origin=(-0.5, -0.5, -0.5),
                units="Gy")
    mask = np.zeros((6, 6, 6), bool)
    mask[3:6, 3:6, 3:6] = True
    mask[0, 0, 0] = True
    h = dvh(dose, grid(mask, spacing=(1.0, 1.0, 1.0)))
    assert h.volume_cc == pytest.approx(0.028) and h.uncovered_cc == 0.0
    assert h.mean == pytest.approx(10.0 + 9 * (3 + 4 + 5) / 28)
    assert (h.min, h.max) == pytest.approx((10.0 - 0.25, 15.0 + 0.25))  # outer sub-points of edge voxels


def test_coverage_of_a_dvh_is_dose_coverage_without_sampling_again():
    dose = grid(np.full((4, 4, 4), 10.0), spacing=(1.0, 1.0, 1.0), units="Gy")
    mask = np.zeros((4, 4, 12), bool)
    mask[1:3, 1:3, 2:6] = True  # half of it beyond the dose grid (see the test above)
    structure = grid(mask, spacing=(1.0, 1.0, 1.0))
    with pytest.warns(PacsaiWarning, match="excluded"):
        h = dvh(dose, structure)
    assert coverage_of(h) == dose_coverage(dose, structure) == pytest.approx((0.008, 0.5))
    assert h.sampled_cc == pytest.approx(0.016)
    on_grid = dvh(dose, grid(np.ones((4, 4, 4), bool), spacing=(1.0, 1.0, 1.0)))
    assert coverage_of(on_grid) == (0.0, 0.0) and on_grid.sampled_cc == on_grid.volume_cc


def test_plan_quality_uses_a_given_body_dvh():
    """The report passes BODY's DVH it already has: the isodose volumes come from it, equal to computing it here."""
    dose = grid(np.arange(64, dtype=float).reshape(4, 4, 4), spacing=(1.0, 1.0, 1.0), units="Gy")
    target = np.zeros((4, 4, 8), bool)
    target[1:3, 1:3, 1:5] = True
    spacing, origin = (0.5, 1.0, 1.0), (-0.25, 0.0, 0.0)  # x, y, z mm: 8 columns of cells on the dose's 4 mm
    t = grid(target, spacing=spacing, origin=origin)
    b = grid(np.ones((4, 4, 8), bool), spacing=spacing, origin=origin, name="BODY")
    own = plan_quality(dose, t, prescription_gy=30.0, body=b)
    assert own == plan_quality(dose, t, prescription_gy=30.0, body=b, body_dvh=dvh(dose, b, name="BODY"))
    made_up = DVH.from_samples([40.0, 20.0, 10.0], 1.0, name="BODY")  # ≥ 30 Gy: 1 cm³, ≥ 15 Gy: 2 cm³
    given = plan_quality(dose, t, prescription_gy=30.0, body=b, body_dvh=made_up)
    assert (given.piv_cc, given.piv50_cc) == (1.0, 2.0) and given.gradient_index == 2.0
