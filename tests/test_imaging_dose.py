"""pacsai.imaging.dose: RTDOSE grids in Gy and resampling in patient coordinates."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pacsai.errors import DoseError, VolumeError
from pacsai.imaging.dose import NotPlanDoseError, check_plan_dose, read_dose, resample
from pacsai.imaging.geometry import affine_from, index_to_world, make_volume
from pacsai.imaging.volume import read_series

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(scope="module")
def breast(test_data):
    return test_data / "dicompyler_breast_rt"


@pytest.fixture()
def tiny_dose(test_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its ReferencedSOPInstanceUID has a component with a leading zero
        return pydicom.dcmread(test_data / "pydicom_variants" / "rt_tiny" / "rtdose.dcm")


def world_of(volume) -> np.ndarray:
    nz, ny, nx = volume.shape
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3)
    return index_to_world(volume.attrs["affine"], ijk).reshape(nz, ny, nx, 3)


# ------------------------------------------------------------------------------------------------ read_dose
def test_breast_dose_in_gy_with_references(breast):
    dose = read_dose(breast / "rtdose.dcm")
    assert dose.shape == (98, 129, 194) and dose.dtype == np.float64
    ds = pydicom.dcmread(breast / "rtdose.dcm")
    np.testing.assert_array_equal(dose.values, ds.pixel_array.astype(np.float64) * 1.4e-5)
    # The TPS's own DVH: BODY's DVHMaximumDose is in percent of the 14 Gy prescription (SOURCES.md's trap).
    body_max_percent = max(float(item.DVHMaximumDose) for item in ds.DVHSequence)
    assert float(dose.max()) == pytest.approx(body_max_percent / 100 * 14.0, abs=0.005)
    assert float(dose.max()) == pytest.approx(14.68, abs=0.005)
    assert dose.attrs["units"] == "Gy" and dose.attrs["dose_units"] == "GY"
    assert dose.attrs["dose_type"] == "PHYSICAL" and dose.attrs["dose_summation_type"] == "PLAN"
    plan = pydicom.dcmread(breast / "rtplan.dcm", stop_before_pixels=True)
    assert dose.attrs["referenced_rtplan_uid"] == plan.SOPInstanceUID
    assert dose.attrs["frame_of_reference_uid"] == plan.FrameOfReferenceUID
    np.testing.assert_allclose(dose.coords["z"].values[[0, 1, -1]], [-122.4407, -119.4407, 168.5593])
    assert dose.attrs["spacing"] == pytest.approx((2.5, 2.5, 3.0))


def test_dose_resampled_onto_the_ct_slice(breast):
    dose = read_dose(breast / "rtdose.dcm")
    with pytest.warns(UserWarning, match="single slice"):
        ct = read_series(breast / "ct.0.dcm")
    assert ct.attrs["frame_of_reference_uid"] == dose.attrs["frame_of_reference_uid"]
    on_ct = resample(dose, like=ct)
    assert on_ct.shape == ct.shape and on_ct.attrs["units"] == "Gy" and on_ct.attrs["resample_order"] == 1
    # The CT slice lies exactly on the last dose frame: the result is a bilinear in-plane interpolation of it.
    xyz = world_of(ct)[0].reshape(-1, 3)
    ij = (xyz[:, :2] - np.array(dose.attrs["origin"][:2])) / 2.5
    inside = (ij >= 0).all(axis=1) & (ij[:, 0] <= 193) & (ij[:, 1] <= 128)
    expected = ndimage.map_coordinates(dose.values[-1], [ij[inside, 1], ij[inside, 0]], order=1)
    np.testing.assert_allclose(on_ct.values[0].reshape(-1)[inside], expected, rtol=1e-9, atol=1e-12)
    assert np.all(on_ct.values[0].reshape(-1)[~inside] == 0.0)


def test_relative_units_and_all_encodings(test_data):
    folder = test_data / "pydicom_variants" / "rt_tiny"
    with pytest.raises(DoseError, match="DoseUnits is RELATIVE.*allow_relative=True"):
        read_dose(folder / "rtdose.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doses = [
            read_dose(folder / name, allow_relative=True)
            for name in ("rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm")
        ]
    assert doses[0].attrs["units"] == "relative" and doses[0].shape == (15, 10, 10)
    for other in doses[1:]:  # big endian and RLE decode to the same grid
        np.testing.assert_array_equal(other.values, doses[0].values)
        np.testing.assert_array_equal(other.attrs["affine"], doses[0].attrs["affine"])


def test_absolute_and_descending_frame_offsets(tiny_dose):
    tiny_dose.DoseUnits = "GY"
    relative = read_dose(tiny_dose)
    z0 = float(tiny_dose.ImagePositionPatient[2])
    absolute = copy.deepcopy(tiny_dose)
    absolute.GridFrameOffsetVector = [z0 + float(v) for v in tiny_dose.GridFrameOffsetVector]
    np.testing.assert_array_equal(read_dose(absolute).values, relative.values)
    np.testing.assert_allclose(read_dose(absolute).attrs["affine"], relative.attrs["affine"], atol=1e-9)
    # Frames stored top-down: the reader reorders so k increases along the normal; same dose at the same place.
    descending = copy.deepcopy(tiny_dose)
    descending.GridFrameOffsetVector = [-float(v) for v in tiny_dose.GridFrameOffsetVector]
    flipped = read_dose(descending)
    np.testing.assert_array_equal(flipped.values, relative.values[::-1])
    np.testing.assert_allclose(flipped.attrs["origin"][2], z0 - 70.0)
    assert flipped.attrs["spacing"][2] == pytest.approx(5.0)


def test_only_a_total_plan_dose_in_gy_is_accepted(breast, tiny_dose):
    check_plan_dose(read_dose(breast / "rtdose.dcm"))  # PLAN, PHYSICAL, GY: accepted
    tiny_dose.DoseUnits = "GY"
    uid = str(tiny_dose.SOPInstanceUID)
    for summation, kind in (("PLAN", "PHYSICAL"), ("MULTI_PLAN", "PHYSICAL"), ("PLAN", "EFFECTIVE")):
        tiny_dose.DoseSummationType, tiny_dose.DoseType = summation, kind
        dose = read_dose(tiny_dose)
        assert (dose.attrs["dose_summation_type"], dose.attrs["dose_type"], dose.attrs["dose_units"]) == (
            summation,
            kind,
            "GY",
        )
        check_plan_dose(dose)
    for summation, meaning in (
        ("FRACTION", "one fraction of a plan"),
        ("BEAM", "one beam of a plan"),
        ("BRACHY", "one brachytherapy"),
        ("CONTROL_POINT", "one control point"),
        ("RECORD", "a treatment record"),
    ):
        tiny_dose.DoseSummationType, tiny_dose.DoseType = summation, "PHYSICAL"
        with pytest.raises(
            NotPlanDoseError,
            match=rf"RTDOSE {uid}: DoseSummationType is {summation} \({meaning}.*PLAN or MULTI_PLAN.*export",
        ):
            check_plan_dose(read_dose(tiny_dose))
    tiny_dose.DoseSummationType, tiny_dose.DoseType = "PLAN", "ERROR"
    with pytest.raises(NotPlanDoseError, match=rf"{uid}: DoseType is ERROR.*uncertainty map"):
        check_plan_dose(read_dose(tiny_dose))
    tiny_dose.DoseType, tiny_dose.DoseUnits = "PHYSICAL", "RELATIVE"
    with pytest.raises(NotPlanDoseError, match="DoseUnits is RELATIVE, not GY"):
        check_plan_dose(read_dose(tiny_dose, allow_relative=True))
    del tiny_dose.DoseSummationType
    tiny_dose.DoseUnits = "GY"
    with pytest.raises(NotPlanDoseError, match="DoseSummationType is missing"):
        check_plan_dose(read_dose(tiny_dose))


def test_bad_frame_offsets_refused(tiny_dose):
    tiny_dose.DoseUnits = "GY"
    irregular = copy.deepcopy(tiny_dose)
    offsets = [float(v) for v in tiny_dose.GridFrameOffsetVector]
    offsets[5] += 1.0
    irregular.GridFrameOffsetVector = offsets
    with pytest.raises(DoseError, match="not a regular grid"):
        read_dose(irregular)
    oblique_absolute = copy.deepcopy(tiny_dose)
    oblique_absolute.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    oblique_absolute.GridFrameOffsetVector = [5.0 + v for v in offsets]
    with pytest.raises(DoseError, match="not axial"):
        read_dose(oblique_absolute)
    with pytest.raises(DoseError, match="not an RT Dose"):
        read_dose(pydicom.Dataset())


# ------------------------------------------------------------------------------------------------ resample
def linear(world: np.ndarray) -> np.ndarray:
    return 2.0 * world[..., 0] - 3.0 * world[..., 1] + 0.5 * world[..., 2] + 7.0


def oblique_affine(angle_deg: float, origin, spacing) -> np.ndarray:
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    tilt = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return affine_from(origin, rot @ tilt, spacing)


def test_resample_onto_itself_and_whole_voxel_shifts_is_exact():
    rng = np.random.default_rng(3)
    affine = oblique_affine(20, (10.0, -5.0, 3.0), (1.5, 2.0, 2.5))
    moving = make_volume(rng.normal(size=(6, 7, 8)), affine, attrs={"frame_of_reference_uid": "1.2.3"})
    for order in (0, 1, 3):
        same = resample(moving, like=moving, order=order)
        np.testing.assert_array_equal(same.values, moving.values)
        assert same.dtype == moving.dtype
    shifted = affine.copy()
    shifted[:3, 3] = index_to_world(affine, [[2, 1, 1]])[0]  # like starts 2 columns, 1 row, 1 slice in
    like = make_volume(np.zeros((5, 6, 6)), shifted)
    out = resample(moving, like=like, order=1, fill=-1.0)
    np.testing.assert_array_equal(out.values[:, :, :], moving.values[1:6, 1:7, 2:8])


def test_linear_function_on_two_different_oblique_grids():
    source_affine = oblique_affine(15, (0.0, 0.0, 0.0), (1.0, 1.2, 2.0))
    source = make_volume(np.zeros((20, 30, 30)), source_affine)
    source = source.copy(data=linear(world_of(source)))
    target_affine = oblique_affine(-25, (8.0, 10.0, 8.0), (0.7, 0.9, 1.3))
    target = make_volume(np.zeros((12, 14, 16)), target_affine)
    expected = linear(world_of(target))
    out = resample(source, like=target, order=1, fill=np.nan)
    inside = ~np.isnan(out.values)
    assert inside.sum() > 0.9 * out.size  # the target sits inside the source
    np.testing.assert_allclose(out.values[inside], expected[inside], atol=1e-9)
    cubic = resample(source, like=target, order=3, fill=np.nan)
    # Cubic B-splines reproduce a linear function, up to the prefilter's mirror boundary condition, whose
    # effect decays by 0.27 per source voxel (measured < 2e-3 here, on values of ±100).
    core = (slice(3, -3), slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(cubic.values[core], expected[core], atol=5e-3)
    nearest = resample(source, like=target, order=0, fill=np.nan)
    step = np.abs(source_affine[:3, :3]).sum(axis=1)  # a half voxel at most in each direction
    bound = 0.5 * (2.0 * step[0] + 3.0 * step[1] + 0.5 * step[2])
    assert np.nanmax(np.abs(nearest.values - expected)) <= bound


def test_masks_stay_bool_and_frames_of_reference_must_match():
    affine = affine_from((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0))
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[3:7, 2:8, 4:6] = True
    moving = make_volume(mask, affine, attrs={"frame_of_reference_uid": "1.2.3"})
    fine = make_volume(
        np.zeros((20, 20, 20)),
        affine_from((0, 0, 0), np.eye(3), (0.5, 0.5, 0.5)),
        attrs={"frame_of_reference_uid": "1.2.3"},
    )
    out = resample(moving, like=fine, order=0)
    assert out.dtype == bool
    assert int(out.values.sum()) == pytest.approx(mask.sum() * 8, rel=0.35)
    assert bool(out.values[10, 8, 9]) and not bool(out.values[0, 0, 0])  # (4.5, 4, 5) mm is inside the box
    with pytest.raises(VolumeError, match="order=0"):
        resample(moving, like=fine, order=1)
    other = make_volume(np.zeros((2, 2, 2)), affine, attrs={"frame_of_reference_uid": "9.9.9"})
    with pytest.raises(VolumeError, match="register them first"):
        resample(moving, like=other)
    with pytest.raises(VolumeError, match="order must be"):
        resample(moving, like=fine, order=2)
