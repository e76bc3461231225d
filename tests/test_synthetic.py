"""Synthetic patients (issue 4): anatomy, ground truth, dose, prior study, DICOM validity, determinism, seeding."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pacsai.cli import main
from pacsai.imaging.dicomwrite import to_bytes
from pacsai.imaging.geometry import affine_of, index_to_world, world_to_index
from pacsai.imaging.rtstruct import read_rtstruct
from pacsai.synthetic import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    ROI_NAMES,
    SyntheticPatient,
    make_patient,
    patient_id_for,
    seed_pacs,
    write_patient,
)
from tests.dciodvfy import assert_dciodvfy_clean

# Small grids keep the suite fast; the field of view still holds a whole thorax.
SMALL = {"shape": (40, 96, 96), "spacing": (4.2, 4.2, 7.0)}
TINY = {"shape": (20, 80, 80), "spacing": (5.0, 5.0, 7.0)}
N_TINY = TINY["shape"][0]
REQUIRED = ("BODY", "GTV", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus")


@pytest.fixture(scope="module")
def small() -> SyntheticPatient:
    return make_patient(11, **SMALL)


@pytest.fixture(scope="module")
def tiny() -> SyntheticPatient:
    return make_patient(5, **TINY)


@pytest.fixture(scope="module")
def default() -> SyntheticPatient:
    """The default grid once (HU statistics need realistic voxel sizes: partial volume)."""
    return make_patient(2, with_prior=False)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _centroid_lps(mask) -> np.ndarray:
    k, j, i = np.nonzero(mask.values)
    return index_to_world(affine_of(mask), np.column_stack([i, j, k])).mean(axis=0)


def _dose_in(patient: SyntheticPatient, mask: np.ndarray) -> np.ndarray:
    """Dose (Gy) at the CT voxels of ``mask``: trilinear from the dose grid, 0 outside it."""
    k, j, i = np.nonzero(mask)
    world = index_to_world(affine_of(patient.image), np.column_stack([i, j, k]))
    ijk = world_to_index(affine_of(patient.dose), world)
    return ndimage.map_coordinates(patient.dose.values, ijk[:, ::-1].T, order=1, mode="constant", cval=0.0)


def _uids(patient: SyntheticPatient) -> set[str]:
    found = set()
    for ds in patient.datasets():
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            found.add(str(ds[keyword].value))
    return found


# --- the default planning CT ---------------------------------------------------------------------------------
def test_default_grid_and_hu_plausible_in_every_structure(default):
    assert default.image.shape == DEFAULT_SHAPE == (96, 256, 256)
    assert len(default.ct) == 96
    first = default.ct[0]
    assert (first.Rows, first.Columns) == (256, 256)
    assert [float(v) for v in first.PixelSpacing] == [DEFAULT_SPACING[1], DEFAULT_SPACING[0]]
    assert (
        float(default.ct[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
        == DEFAULT_SPACING[2]
    )
    hu = default.image.values
    mean = {name: float(hu[mask.values].mean()) for name, mask in default.masks.items()}
    assert mean["Lung_L"] < -600 and mean["Lung_R"] < -600
    for name in ("Heart", "GTV", "SpinalCord"):
        assert -20.0 <= mean[name] <= 100.0, (name, mean[name])
    assert mean["Vertebrae"] > 300.0
    body = default.masks["BODY"].values
    assert float(hu[~body].mean()) < -700  # air (and the couch) outside
    assert 8.0 < float(np.std(hu[:, :10, :10])) < 25.0  # noise in air, away from the body


def test_default_dose_is_plan_like(default):
    m = {name: mask.values for name, mask in default.masks.items()}
    ptv = _dose_in(default, m["PTV"])
    assert np.percentile(ptv, 5) >= 0.95 * 60.0  # D95
    assert default.dose.values.max() < 1.10 * 60.0
    assert default.dose.values.max() >= 1.03 * 60.0  # a hot spot, as in any real plan
    v20 = float((_dose_in(default, m["Lung_L"] | m["Lung_R"]) >= 20.0).mean())
    assert 0.0 < v20 < 0.35  # QUANTEC-plausible lung V20
    assert float(_dose_in(default, m["Heart"]).mean()) < 30.0
    assert float(_dose_in(default, m["SpinalCord"]).max()) < 50.0
    # no dose in the air: dose-grid voxels whose nearest CT voxel is more than a voxel outside the body
    body = ndimage.binary_dilation(m["BODY"], iterations=1)
    dose_aff, ct_aff = affine_of(default.dose), affine_of(default.image)
    nearest = []
    for axis, n_dose, n_ct in (
        (2, default.dose.shape[0], body.shape[0]),
        (1, default.dose.shape[1], body.shape[1]),
        (0, default.dose.shape[2], body.shape[2]),
    ):
        world = dose_aff[axis, 3] + np.arange(n_dose) * dose_aff[axis, axis]  # both grids are axis-aligned
        index = np.rint((world - ct_aff[axis, 3]) / ct_aff[axis, axis]).astype(int)
        nearest.append(np.clip(index, 0, n_ct - 1))
    in_body = body[np.ix_(*nearest)]
    assert float(default.dose.values[~in_body].max()) == 0.0


# --- anatomy and ground truth ------------------------------------------------------------------------------
def test_left_is_left_and_the_spine_is_behind(small):
    m = small.masks
    left, right = _centroid_lps(m["Lung_L"]), _centroid_lps(m["Lung_R"])
    assert left[0] > 0 > right[0]  # LPS: +x is the patient's left
    assert _centroid_lps(m["Heart"])[0] > _centroid_lps(m["SpinalCord"])[0]  # heart to the left
    assert _centroid_lps(m["SpinalCord"])[1] > _centroid_lps(m["Esophagus"])[1] > _centroid_lps(m["Heart"])[1]
    assert small.ct[0].PatientPosition == "HFS"
    assert [float(v) for v in small.ct[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    for name, mask in m.items():
        assert mask.values.any(), name
        if name != "BODY":
            assert not (mask.values & ~m["BODY"].values).any(), f"{name} outside BODY"
    assert not (m["GTV"].values & (m["Lung_L"] | m["Lung_R"]).values).any()
    assert (m["PTV"].values >= m["GTV"].values).all()


def test_ct_geometry_and_pixels_read_back_by_simpleitk(small, tmp_path):
    files = write_patient(small, tmp_path)
    ct_files = sorted(str(p) for p in files if p.parent.name == "planning" and p.name.startswith("CT_"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(ct_files)
    image = reader.Execute()
    affine = affine_of(small.image)
    assert np.allclose(image.GetOrigin(), affine[:3, 3], atol=1e-3)
    assert np.allclose(image.GetSpacing(), SMALL["spacing"], atol=1e-4)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3))
    expected = np.clip(np.rint(small.image.values), -1024, 3071)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


def test_pacsai_readers_get_back_the_same_arrays(small):
    from pacsai.imaging.dose import read_dose
    from pacsai.imaging.volume import read_series

    image = read_series(small.ct)
    assert np.allclose(affine_of(image), affine_of(small.image), atol=1e-4)
    assert np.array_equal(image.values, np.clip(np.rint(small.image.values), -1024, 3071))
    assert image.attrs["frame_of_reference_uid"] == small.image.attrs["frame_of_reference_uid"]
    dose = read_dose(small.rtdose)
    assert np.allclose(affine_of(dose), affine_of(small.dose), atol=1e-4)
    assert np.allclose(dose.values, small.dose.values, atol=1e-4)


def test_structures_read_back_equal_the_generator_masks(small):
    read = read_rtstruct(small.rtstruct, like=small.image)
    assert list(read)[: len(REQUIRED)] == list(REQUIRED) == list(ROI_NAMES)
    assert set(read) == set(small.masks)
    for name, mask in small.masks.items():
        assert _dice(read[name].values, mask.values) >= 0.97, name
    prior = read_rtstruct(small.prior_rtstruct, like=small.prior_image)
    for name, mask in small.prior_masks.items():
        assert _dice(prior[name].values, mask.values) >= 0.97, name


def test_dose_objects_and_plan(small):
    ds = small.rtdose
    assert ds.DoseUnits == "GY" and ds.DoseType == "PHYSICAL" and ds.DoseSummationType == "PLAN"
    assert float(ds.GridFrameOffsetVector[0]) == 0.0
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == small.rtplan.SOPInstanceUID
    assert ds.FrameOfReferenceUID == small.ct[0].FrameOfReferenceUID
    stored = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    assert np.allclose(stored, small.dose.values, atol=1e-4)
    # its own grid: coarser than and offset from the CT
    assert small.dose.shape != small.image.shape
    assert not np.allclose(affine_of(small.dose)[:3, 3], affine_of(small.image)[:3, 3])
    plan = small.rtplan
    assert float(plan.DoseReferenceSequence[0].TargetPrescriptionDose) == 60.0
    assert plan.FractionGroupSequence[0].NumberOfFractionsPlanned == 30
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == small.rtstruct.SOPInstanceUID
    assert 3 <= len(plan.BeamSequence) <= 5
    assert np.percentile(_dose_in(small, small.masks["PTV"].values), 5) >= 0.95 * 60.0
    assert small.dose.values.max() < 1.10 * 60.0


def test_prior_study_of_the_same_patient(small):
    prior, now = small.prior_ct[0], small.ct[0]
    assert prior.PatientID == now.PatientID == small.patient_id == "SYN-00011"
    assert prior.StudyInstanceUID != now.StudyInstanceUID
    assert prior.FrameOfReferenceUID != now.FrameOfReferenceUID
    days = (
        dt.datetime.strptime(now.StudyDate, "%Y%m%d") - dt.datetime.strptime(prior.StudyDate, "%Y%m%d")
    ).days
    assert 80 <= days <= 120
    assert small.prior_rtstruct.StudyInstanceUID == prior.StudyInstanceUID
    assert (
        small.prior_rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
        == prior.FrameOfReferenceUID
    )
    scale = small.truth["prior_tumour_scale"]
    ratio = small.prior_masks["GTV"].values.sum() / small.masks["GTV"].values.sum()
    assert (ratio > 1.0) == (scale > 1.0)
    assert small.truth["expected_response"] in ("PR", "SD", "PD")


def test_prior_response_categories_vary():
    from pacsai.synthetic import _prior_scale

    categories = {_prior_scale(12.0, np.random.default_rng(s))[1] for s in range(30)}
    assert categories == {"PR", "SD", "PD"}
    scale, category = _prior_scale(7.5, np.random.default_rng(3))
    if category == "PD":  # PD needs ≥ 5 mm absolute growth too
        assert 15.0 * (1.0 - scale) >= 5.0


def test_dciodvfy_clean_on_every_object_kind(small, tmp_path):
    for ds in (
        small.ct[0],
        small.ct[-1],
        small.rtstruct,
        small.rtplan,
        small.rtdose,
        small.prior_ct[0],
        small.prior_rtstruct,
        small.registration,
    ):
        assert_dciodvfy_clean(ds)


def test_registration_maps_the_prior_anatomy_onto_the_planning_ct(small):
    """The REG's prior → planning matrix (read as the report reads it) puts the prior's spinal cord onto the
    planning CT's in the axial plane (the scans cover different lengths, so z centroids differ), and equals the
    generator's own translation."""
    from pacsai.planning import centroid
    from pacsai.report.inputs import registration_matrix

    reg = small.registration
    assert reg.Modality == "REG" and reg.StudyInstanceUID == small.ct[0].StudyInstanceUID
    matrix = registration_matrix(
        reg, prior=str(small.prior_ct[0].FrameOfReferenceUID), current=str(small.ct[0].FrameOfReferenceUID)
    )
    np.testing.assert_allclose(matrix, small.truth["prior_to_current"], atol=1e-4)
    moved = (matrix @ np.r_[centroid(small.prior_masks["SpinalCord"]), 1.0])[:3]
    np.testing.assert_allclose(moved[:2], centroid(small.masks["SpinalCord"])[:2], atol=0.5)
    assert make_patient(11, **SMALL, with_registration=False).registration is None


# --- determinism and uniqueness ----------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    a = write_patient(tiny, tmp_path / "a")
    b = write_patient(make_patient(5, **TINY), tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert len(a) == 2 * N_TINY + 4
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_different_seeds_never_share_ids(small):
    other = make_patient(12, **SMALL)
    assert other.patient_id == "SYN-00012" != small.patient_id
    assert _uids(small).isdisjoint(_uids(other))
    assert not np.array_equal(other.image.values, small.image.values)
    assert patient_id_for(123456) == "SYN-123456"
    assert small.ct[0].PatientName == "SYNTHETIC^PATIENT11"
    # every object of one patient has its own SOP instance UID
    sops = [str(ds.SOPInstanceUID) for ds in small.datasets()]
    assert len(sops) == len(set(sops)) == 2 * 40 + 5  # 2 CTs, RTSTRUCT ×2, RTPLAN, RTDOSE, REG


def test_options_without_prior_and_dose(tiny):
    patient = make_patient(5, **TINY, with_prior=False, with_dose=False)
    assert patient.prior_ct is None and patient.prior_rtstruct is None and patient.prior_masks is None
    assert patient.rtdose is None and patient.rtplan is None and patient.dose is None
    assert len(list(patient.datasets())) == N_TINY + 1
    # the planning CT and its structures do not depend on those options (same UIDs and bytes)
    assert to_bytes(patient.ct[3]) == to_bytes(tiny.ct[3])
    assert to_bytes(patient.rtstruct) == to_bytes(tiny.rtstruct)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "non-negative"),
        ({"seed": 1, "shape": (40, 64, 64)}, "too small"),
        ({"seed": 1, "shape": (40, 96), "spacing": (4.2, 4.2, 7.0)}, "3 axes"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_patient(**kwargs)


# --- into a PACS -----------------------------------------------------------------------------------------------
def test_seed_pacs_is_idempotent_and_seeds_share_a_pacs(pacs):
    first = seed_pacs(pacs, patients=2, seed=40, with_prior=False, progress=False, **TINY)
    assert [r.patient_id for r in first] == ["SYN-00040", "SYN-00041"]
    for result in first:
        assert result.summary.ok
        assert len(result.summary.stored) == result.objects == N_TINY + 3
    again = seed_pacs(pacs, patients=1, seed=41, progress=True, **TINY)  # now with the prior study
    assert len(again[0].summary.already_present) == N_TINY + 3
    assert len(again[0].summary.stored) == N_TINY + 2  # the prior CT, its RTSTRUCT and the REG
    studies = pacs.search_studies()
    assert sorted(studies["PatientID"]) == ["SYN-00040", "SYN-00041", "SYN-00041"]


def test_cli_seed_into_the_embedded_store(tmp_path, capsys):
    url = f"file://{tmp_path / 'store'}"
    args = [
        "seed",
        "--patients",
        "1",
        "--seed",
        "7",
        "--pacs",
        url,
        "--no-prior",
        "--no-progress",
        "--shape",
        *map(str, TINY["shape"]),
        "--spacing",
        *map(str, TINY["spacing"]),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        f"SYN-00007 (seed 7): {N_TINY + 3} objects → stored {N_TINY + 3}, already present 0, failed 0" in out
    )
    assert main(["seed", "--patients", "1", "--shape", "40", "20", "96", "--pacs", url]) == 2
    assert "too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["seed", "--patients", "0"])
