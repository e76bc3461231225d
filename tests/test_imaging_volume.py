"""pacsai.imaging.volume and pacsai.imaging.dicomio: real series against SimpleITK, refusals, conversions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacsai.errors import DicomFileError, PacsaiWarning, VolumeError
from pacsai.imaging import dicomio
from pacsai.imaging.dose import resample
from pacsai.imaging.geometry import index_to_world, make_volume
from pacsai.imaging.volume import from_sitk, read_series, to_metatensor, to_sitk
from pacsai.uids import derive_uid

REPO = Path(__file__).resolve().parents[1]
EDGE = "dicom2nifti_geometry_edge_cases"


# ------------------------------------------------------------------------------------------------ helpers
def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_matches_sitk(volume, image: sitk.Image, *, rtol: float = 0.0) -> None:
    """Same voxels (k, j, i) and the same origin / spacing / direction as SimpleITK."""
    reference = sitk.GetArrayFromImage(image)
    assert volume.shape == reference.shape
    if rtol:
        np.testing.assert_allclose(volume.values.astype(float), reference.astype(float), rtol=rtol)
    else:
        np.testing.assert_array_equal(volume.values.astype(float), reference.astype(float))
    np.testing.assert_allclose(volume.attrs["origin"], image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.attrs["spacing"], image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.attrs["direction"], np.reshape(image.GetDirection(), (3, 3)), atol=1e-6)
    # and the affine is what the attrs say: voxel [k, j, i] at affine @ [i, j, k, 1]
    corner = np.array(volume.shape[::-1]) - 1
    np.testing.assert_allclose(
        index_to_world(volume.attrs["affine"], corner[None])[0],
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner]),
        atol=1e-5,
    )


def write_series(
    folder: Path,
    positions: list[list[float]],
    *,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: float = 2.0,
    size: int = 16,
    values=None,
    intercept: float = -1024.0,
) -> None:
    """A small real CT series written with pydicom: one file per position, stored int16 with a rescale."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    for k, pos in enumerate(positions):
        if values is None:
            pixels = np.full((size, size), 1000 + 10 * k, dtype=np.int16)
        else:
            jj, ii = np.mgrid[:size, :size]
            world = (
                np.asarray(pos)[None, None] + ii[..., None] * spacing * row + jj[..., None] * spacing * col
            )
            pixels = np.round(values(world) - intercept).astype(np.int16)
        sop = derive_uid("test-volume", str(folder), k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
        ds.StudyInstanceUID = derive_uid("test-volume", str(folder), "study")
        ds.SeriesInstanceUID = derive_uid("test-volume", str(folder), "series")
        ds.FrameOfReferenceUID = derive_uid("test-volume", str(folder), "for")
        ds.PatientID = "P1"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = pixels.tobytes()
        # files named in reverse so that file order is not slice order
        ds.save_as(folder / f"f{len(positions) - k:03d}.dcm", enforce_file_format=True)


def world_of(volume) -> np.ndarray:
    """(z, y, x, 3) LPS positions of every voxel."""
    nz, ny, nx = volume.shape
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3)
    return index_to_world(volume.attrs["affine"], ijk).reshape(nz, ny, nx, 3)


# ------------------------------------------------------------------------------------------------ dicomio
def test_load_datasets_folder_skips_companions_but_named_non_dicom_fails(test_data):
    folder = test_data / EDGE / "enhanced_mr_philips"  # holds a reference .nii.gz beside the DICOM file
    datasets = dicomio.load_datasets(folder)
    assert len(datasets) == 1 and datasets[0].Modality == "MR"
    with pytest.raises(DicomFileError, match="reference_dicom2nifti.nii.gz is not a DICOM file"):
        dicomio.load_datasets([folder / "reference_dicom2nifti.nii.gz"])
    with pytest.raises(DicomFileError, match="subfolders mr_t2, rtstruct"):
        dicomio.load_datasets(test_data / "tcia_sts001_mr_t2_rtstruct")


def test_load_datasets_paths_datasets_and_preambleless(test_data):
    rt = test_data / "pydicom_variants" / "rt_tiny" / "rtstruct.dcm"  # no preamble, no file meta
    (ds,) = dicomio.load_datasets(rt)
    assert ds.Modality == "RTSTRUCT"
    mixed = dicomio.load_datasets([ds, str(rt)], stop_before_pixels=True)
    assert mixed[0] is ds and mixed[1].Modality == "RTSTRUCT"
    with pytest.raises(DicomFileError, match="empty list"):
        dicomio.load_datasets([])
    with pytest.raises(DicomFileError, match="does not exist"):
        dicomio.load_datasets(test_data / "no_such_folder")


def test_truncated_pixel_data_names_the_file(test_data):
    path = test_data / "pydicom_variants" / "mr" / "MR_truncated.dcm"
    with pytest.raises(DicomFileError, match=r"MR_truncated\.dcm is truncated"):
        dicomio.load_datasets(path)
    with pytest.raises(DicomFileError, match=r"MR_truncated\.dcm"):
        read_series([path])


def test_truncated_header_and_short_pixels_are_refused(test_data, tmp_path):
    source = min((test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2").iterdir())
    raw = source.read_bytes()
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(raw[:500])  # inside an element: pydicom alone returns a short dataset
    with pytest.raises(DicomFileError, match="cut_header.dcm is truncated"):
        dicomio.load_datasets(cut_header)
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(raw[:-1000])
    with pytest.raises(DicomFileError, match="cut_pixels.dcm is truncated"):
        read_series([cut_pixels])
    with pytest.raises(DicomFileError, match="cut_pixels.dcm"):
        dicomio.load_datasets([cut_pixels], stop_before_pixels=False)


# ------------------------------------------------------------------------------------------------ vs SimpleITK
def test_oblique_mr_matches_sitk(test_data):
    folder = test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2"
    volume = read_series(folder)
    assert volume.shape == (40, 384, 384) and volume.dtype == np.uint16  # no rescale: ints kept
    assert_matches_sitk(volume, sitk_series(folder))
    normal = volume.attrs["direction"][:, 2]
    np.testing.assert_allclose(normal, [0.0038, 0.0356, 0.9994], atol=2e-4)  # oblique: not z
    assert volume.attrs["spacing"][2] == pytest.approx(5.2, abs=1e-3)  # from positions, not SliceThickness 4
    assert volume.attrs["slice_thickness"] == pytest.approx(4.0)
    assert "z" not in volume.coords  # oblique grid: no axis-aligned coordinates
    assert len(set(volume.attrs["sop_instance_uids"])) == 40
    assert volume.attrs["modality"] == "MR" and volume.attrs["geometry_note"] == ""
    unneeded = read_series(folder, resample=True)
    np.testing.assert_array_equal(unneeded.values, volume.values)
    assert unneeded.attrs["geometry_note"] == "resample=True not needed: the stack is regular"
    # k increases along the normal whatever the order the files come in
    shuffled = [Path(p) for p in volume.attrs["source_files"]][::-1]
    again = read_series(shuffled)
    np.testing.assert_array_equal(again.values, volume.values)
    assert again.attrs["sop_instance_uids"] == volume.attrs["sop_instance_uids"]


def test_uidless_j2k_ct_matches_sitk_and_liver_is_where_the_labels_say(test_data):
    import nibabel as nib

    folder = test_data / "totalsegmentator_ct_j2k" / "dicom"
    with pytest.warns(PacsaiWarning, match="empty series_instance_uid, study_instance_uid"):
        volume = read_series(folder)
    assert volume.dtype == np.float32 and volume.attrs["units"] == "HU"
    assert_matches_sitk(volume, sitk_series(folder))
    assert float(volume.min()) == -1024.0 and float(volume.max()) == 1839.0
    assert volume.attrs["derived_uids"] == ("series_instance_uid", "study_instance_uid")
    assert volume.attrs["series_instance_uid"].startswith("2.25.")
    assert volume.attrs["sop_instance_uids"][0].startswith("1.3.12.2.1107.5.1.4.60064")  # from the file meta
    np.testing.assert_allclose(volume.coords["z"].values[[0, -1]], [-804.5, -766.5])

    # Put the NIfTI label map on our grid through both affines (RAS → LPS), with our own resample.
    nifti = nib.load(test_data / "totalsegmentator_ct_j2k" / "labels" / "example_seg_dicom.nii.gz")
    labels_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti.affine
    labels = make_volume(np.asarray(nifti.dataobj).transpose(2, 1, 0), labels_lps)
    on_ct = resample(labels, like=volume, order=0)
    assert on_ct.attrs["resampled_from"]["shape"] == [20, 512, 512]
    hu = volume.values
    liver, spleen, aorta = (float(hu[on_ct.values == label].mean()) for label in (5, 1, 52))
    assert 70 < liver < 110 and 60 < spleen < 100 and 150 < aorta < 210  # SOURCES.md: 89, 80, 177
    wrong = float(hu[on_ct.values[:, ::-1, :] == 5].mean())  # a row flip would put it elsewhere
    assert wrong < 0


@pytest.mark.parametrize("name", ["tiny_23x38x3", "tiny_24x38x3"])
def test_dcmqi_multiframe_equals_its_single_frame_series_and_sitk(test_data, name):
    base = test_data / "dcmqi_ct_seg" / name
    single = read_series(base / "image")
    multi = read_series(base / "multiframe")
    assert_matches_sitk(single, sitk_series(base / "image"))
    assert_matches_sitk(multi, sitk.ReadImage(str(base / "multiframe" / "mf.dcm")))
    np.testing.assert_array_equal(multi.values, single.values)
    np.testing.assert_allclose(multi.attrs["affine"], single.attrs["affine"], atol=1e-9)
    assert multi.attrs["frame_numbers"] == (1, 2, 3)
    assert len(set(multi.attrs["sop_instance_uids"])) == 1


def test_three_slice_ct_matches_sitk_and_padding_options(test_data):
    folder = test_data / "dcmqi_ct_seg" / "ct_3slice"
    volume = read_series(folder)
    assert_matches_sitk(volume, sitk_series(folder))
    assert volume.attrs["spacing"][2] == pytest.approx(1.0)  # thickness 1.25: positions rule
    assert volume.attrs["pixel_padding_value"] == -3024.0  # PixelPaddingValue −2000 stored, rescaled
    stored = np.stack(
        [
            ds.pixel_array
            for ds in sorted(dicomio.load_datasets(folder), key=lambda d: float(d.ImagePositionPatient[2]))
        ]
    )
    padded = stored == -2000
    assert padded.sum() > 0
    masked = read_series(folder, padding="nan")
    np.testing.assert_array_equal(np.isnan(masked.values), padded)
    air = read_series(folder, padding=-1024.0)
    assert np.all(air.values[padded] == -1024.0)
    np.testing.assert_array_equal(air.values[~padded], volume.values[~padded])


@pytest.mark.parametrize("vendor", ["enhanced_mr_siemens", "enhanced_mr_philips"])
def test_enhanced_mr_matches_sitk(test_data, vendor):
    (path,) = (test_data / EDGE / vendor).glob("*.dcm")
    volume = read_series(path)
    assert volume.shape == (8, 256, 256)
    # Philips stores a per-frame slope of 4.2588: float32 against SimpleITK's float64
    assert_matches_sitk(volume, sitk.ReadImage(str(path)), rtol=1e-6 if "philips" in vendor else 0.0)
    assert volume.attrs["frame_numbers"] == tuple(range(1, 9))


def test_enhanced_ct_descending_frames_agree_with_sitk_in_patient_space(test_data):
    """IOP (-1,0,0,0,1,0) makes the normal −z; GDCM keeps +z with a left-handed direction. Same voxels in LPS."""
    path = test_data / "pydicom_variants" / "enhanced_multiframe" / "eCT_Supplemental.dcm"
    volume = read_series(path)
    image = sitk.ReadImage(str(path))
    reference = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(volume.attrs["direction"][:, 2], [0, 0, -1])
    assert np.linalg.det(volume.attrs["direction"]) == pytest.approx(1.0)
    for k in range(volume.shape[0]):
        z = index_to_world(volume.attrs["affine"], [[0, 0, k]])[0, 2]
        k_sitk = image.TransformPhysicalPointToIndex((99.5, -301.5, float(z)))[2]
        np.testing.assert_array_equal(volume.values[k], reference[k_sitk])


def test_benchmark_series_matches_sitk(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import read_series as bench
    finally:
        sys.path.pop(0)
    bench.write_ct_series(tmp_path, shape=(6, 32, 32))
    volume = read_series(tmp_path)
    assert volume.shape == (6, 32, 32)
    assert_matches_sitk(volume, sitk_series(tmp_path))


# ------------------------------------------------------------------------------------------------ refusals
def test_gantry_tilt_refused_then_resampled(test_data):
    folder = test_data / EDGE / "ct_gantry_tilt"
    with pytest.raises(VolumeError, match=r"gantry tilt.*about 14\.0°.*resample=True"):
        read_series(folder)
    volume = read_series(folder, resample=True)
    assert "resampled (resample=True)" in volume.attrs["geometry_note"]
    assert volume.shape == (4, 512, 512)
    assert volume.attrs["spacing"][2] == pytest.approx(4.851, abs=1e-3)


def test_missing_slice_refused_then_tolerated_or_resampled(test_data):
    folder = test_data / EDGE / "ct_missing_slice"
    with pytest.raises(VolumeError, match=r"gaps along the slice normal are 5, 5, 10 mm.*missing slice"):
        read_series(folder)
    tolerated = read_series(folder, tolerance=3.5)
    assert tolerated.shape[0] == 4 and "tolerance=3.5" in tolerated.attrs["geometry_note"]
    resampled = read_series(folder, resample=True)
    assert resampled.shape[0] == 5 and resampled.attrs["spacing"][2] == pytest.approx(5.0)
    # slices at acquired positions are copied, the missing one is interpolated between its neighbours
    original = read_series(folder, tolerance=3.5).values
    np.testing.assert_array_equal(resampled.values[[0, 1, 2, 4]], original)
    np.testing.assert_allclose(resampled.values[3], (original[2] + original[3]) / 2, rtol=1e-6)


def test_same_position_and_mixed_orientation_refused(test_data):
    with pytest.raises(VolumeError, match=r"several slices at one position.*differ in AcquisitionNumber"):
        read_series(test_data / EDGE / "ct_all_same_position")
    with pytest.raises(VolumeError, match=r"several slices at one position"):
        read_series(test_data / EDGE / "ct_all_same_position", resample=True, tolerance=1.0)
    with pytest.raises(VolumeError, match=r"mixed orientations.*group them by ImageOrientationPatient"):
        read_series(test_data / EDGE / "mr_mixed_orientation")


def test_irregular_source_ct_and_non_images_and_mixed_series_refused(test_data):
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        read_series(test_data / "highdicom_seg" / "source_ct_16x16")
    with pytest.raises(VolumeError, match="RTSTRUCT object, not an image: read it with"):
        read_series([test_data / "tcia_sts001_mr_t2_rtstruct" / "rtstruct" / "1-1.dcm"])
    with pytest.raises(VolumeError, match="RTDOSE object.*read_dose"):
        read_series([test_data / "dicompyler_breast_rt" / "rtdose.dcm"])
    mr = sorted((test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2").iterdir())[:2]
    ct = sorted((test_data / "dcmqi_ct_seg" / "ct_3slice").iterdir())[:1]
    with pytest.raises(VolumeError, match="mixes 2 series"):
        read_series([*mr, *ct])
    with pytest.raises(VolumeError, match="PlanePosition"):  # pydicom's stripped enhanced MR: no geometry
        read_series(test_data / "pydicom_variants" / "enhanced_multiframe" / "emri_small.dcm")


# ------------------------------------------------------------------------------------------------ synthetic
def test_resample_opt_in_is_exact_for_a_linear_field_on_a_tilted_stack(tmp_path):
    """Linear interpolation reproduces a linear function: every voxel in the field equals f(its LPS position)."""
    f = lambda w: 3.0 * w[..., 0] - 2.0 * w[..., 1] + 5.0 * w[..., 2]
    # 20° tilt: positions move along y as well as z, spacing 4 mm along z
    positions = [[0.0, 4.0 * k * np.tan(np.radians(20)), 4.0 * k] for k in range(5)]
    write_series(tmp_path / "tilt", positions, values=f, size=24)
    with pytest.raises(VolumeError, match="gantry tilt"):
        read_series(tmp_path / "tilt")
    volume = read_series(tmp_path / "tilt", resample=True)
    expected = f(world_of(volume))
    inside = volume.values != volume.values.min()  # voxels outside the acquired field get the minimum
    inside[:, -2:, :] = False  # rows beyond the shifted last source row are partly extrapolated
    assert inside.sum() > 0.5 * volume.size
    # stored values are f rounded to integers at the source pixels: ±0.5; a one-pixel (2 mm) error would be ≥ 4
    np.testing.assert_allclose(volume.values[inside], expected[inside], atol=0.5)


def test_feet_first_file_order_and_single_slice(tmp_path):
    positions = [[0.0, 0.0, -2.5 * k] for k in range(4)]  # files written in descending z
    write_series(tmp_path / "ff", positions)
    volume = read_series(tmp_path / "ff")
    np.testing.assert_allclose(volume.coords["z"].values, [-7.5, -5.0, -2.5, 0.0])
    np.testing.assert_array_equal(volume.values[:, 0, 0], [-1024 + 1030, -1024 + 1020, -1024 + 1010, -24])
    write_series(tmp_path / "one", [[0.0, 0.0, 0.0]])
    with pytest.warns(PacsaiWarning, match="single slice"):
        single = read_series(tmp_path / "one")
    assert single.shape == (1, 16, 16) and "single slice" in single.attrs["geometry_note"]


def test_in_memory_datasets_equal_files(test_data):
    folder = test_data / "dcmqi_ct_seg" / "ct_3slice"
    from_files = read_series(folder)
    from_datasets = read_series(dicomio.load_datasets(folder))
    np.testing.assert_array_equal(from_datasets.values, from_files.values)
    np.testing.assert_array_equal(from_datasets.attrs["affine"], from_files.attrs["affine"])


# ------------------------------------------------------------------------------------------------ conversions
def test_sitk_roundtrip_exact(test_data):
    volume = read_series(test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2")
    image = to_sitk(volume)
    assert image.GetSize() == (384, 384, 40)
    back = from_sitk(image, attrs={"frame_of_reference_uid": volume.attrs["frame_of_reference_uid"]})
    np.testing.assert_array_equal(back.values, volume.values)
    assert back.dtype == volume.dtype
    np.testing.assert_allclose(back.attrs["affine"], volume.attrs["affine"], rtol=0, atol=1e-12)
    sheared = make_volume(
        np.zeros((2, 2, 2)), np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    )
    with pytest.raises(VolumeError, match="sheared"):
        to_sitk(sheared)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
@pytest.mark.slow  # importing MONAI takes 20-40 s on the 2 shared cores (shared with learning tests in make test)
def test_to_metatensor_matches_monai_loading_the_same_image(test_data, tmp_path):
    from monai.transforms import LoadImage

    volume = read_series(test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2")
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(to_sitk(volume), str(path))
    loaded = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(str(path))
    ours = to_metatensor(volume)
    assert tuple(ours.shape) == tuple(loaded.shape) == (1, 384, 384, 40)
    np.testing.assert_array_equal(ours.numpy(), loaded.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), loaded.affine.numpy(), atol=1e-4)
    assert str(ours.meta["space"]) == "RAS"
    lps = to_metatensor(volume, space="LPS")
    np.testing.assert_allclose(lps.affine.numpy(), volume.attrs["affine"])


def test_importing_imaging_never_imports_torch(test_data):
    code = (
        "import sys, pacsai.imaging as im; im.read_series; im.read_dose; im.to_sitk; "
        f"im.read_series({str(test_data / 'dcmqi_ct_seg' / 'ct_3slice')!r}); "
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.filterwarnings("ignore::pacsai.errors.PacsaiWarning")  # single-slice spacing warning
def test_every_transfer_syntax_gives_the_same_volume(test_data):
    folder = test_data / "pydicom_variants" / "mr"
    names = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_padded.dcm",
    ]
    reference = read_series([folder / names[0]])
    assert reference.shape == (1, 64, 64)
    np.testing.assert_array_equal(reference.values[0], pydicom.dcmread(folder / names[0]).pixel_array)
    for name in names[1:]:
        other = read_series([folder / name])
        np.testing.assert_array_equal(other.values, reference.values, err_msg=name)
        np.testing.assert_array_equal(other.attrs["affine"], reference.attrs["affine"], err_msg=name)
    np.testing.assert_array_equal(
        read_series([folder / "MR2_J2KR.dcm"]).values, read_series([folder / "MR2_UNCR.dcm"]).values
    )


def test_mixed_pixel_spacing_and_matrix_size_refused(test_data):
    folder = test_data / "dcmqi_ct_seg" / "ct_3slice"
    datasets = dicomio.load_datasets(folder)
    datasets[1].PixelSpacing = [0.5, 0.5]
    with pytest.raises(VolumeError, match=r"mixed pixel spacings.*\(0\.5, 0\.5\)"):
        read_series(datasets)
    datasets = dicomio.load_datasets(folder)
    datasets[2].Rows = 256
    with pytest.raises(VolumeError, match=r"mixed matrix sizes.*512×512.*256×512"):
        read_series(datasets)


def test_refined_grid_splits_cells_and_keeps_the_outer_edges():
    from pacsai.imaging.geometry import affine_from, index_to_world, make_volume, refined_grid

    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows and columns swapped
    coarse = make_volume(np.zeros((2, 3, 4)), affine_from([10.0, -5.0, 2.5], direction, [3.0, 2.0, 2.5]),
                         attrs={"frame_of_reference_uid": "1.2.3"})
    for n in (2, 3):
        fine = refined_grid(coarse, n)
        assert fine.shape == (2, 3 * n, 4 * n) and fine.dtype == bool
        assert fine.attrs["frame_of_reference_uid"] == "1.2.3"
        a, f = np.asarray(coarse.attrs["affine"]), np.asarray(fine.attrs["affine"])
        # The first and last cell edges along columns (i) and rows (j) are the same in both grids.
        edges_coarse = index_to_world(a, np.array([[-0.5, -0.5, 0.0], [3.5, 2.5, 1.0]]))
        edges_fine = index_to_world(f, np.array([[-0.5, -0.5, 0.0], [4 * n - 0.5, 3 * n - 0.5, 1.0]]))
        np.testing.assert_allclose(edges_fine, edges_coarse, atol=1e-9)
