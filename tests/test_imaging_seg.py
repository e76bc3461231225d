"""DICOM SEG read/write (pacsai.imaging.seg): dcmqi's, highdicom's and pydicom's real SEGs, round trips."""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
import xarray as xr
from pydicom.sr.codedict import codes

from pacsai.errors import PacsaiWarning, StructureError
from pacsai.imaging import dicomwrite
from pacsai.imaging.geometry import index_to_world, make_volume, same_grid
from pacsai.imaging.seg import (
    LABEL_MAP_SEGMENTATION_STORAGE,
    SEGMENTATION_STORAGE,
    read_seg,
    segment_codes,
    write_seg,
)
from tests.dciodvfy import assert_dciodvfy_clean
from tests.test_imaging_rtstruct import FOR_UID, nrrd_volume, rotation, synthetic_series, today_stamps

DCMQI = "dcmqi_ct_seg"


def read_series(source):
    from pacsai.imaging.volume import read_series as _read_series

    return _read_series(source)


def on_grid(volume: hd.Volume, grid: xr.DataArray) -> np.ndarray:
    """highdicom's volume (its array indexed [slice, row, column]) sampled at our grid's voxel centres."""
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    world = index_to_world(grid.attrs["affine"], np.column_stack([ii.ravel(), jj.ravel(), kk.ravel()]))
    index = world @ np.linalg.inv(volume.affine)[:3, :3].T + np.linalg.inv(volume.affine)[:3, 3]
    rounded = np.round(index).astype(int)
    assert np.abs(index - rounded).max() < 1e-3
    array = volume.array.reshape(volume.array.shape[:3])
    return array[rounded[:, 0], rounded[:, 1], rounded[:, 2]].reshape(grid.shape)


@pytest.fixture(scope="module")
def ct3(test_data):
    return read_series(test_data / DCMQI / "ct_3slice")


# -------------------------------------------------------------------------------------------- reading: dcmqi
@pytest.mark.parametrize(
    ("seg", "nrrd"),
    [
        ("seg/liver.dcm", "reference_nrrd/liver_seg.nrrd"),
        ("tiny_23x38x3/seg/label.seg", "tiny_23x38x3/nrrd/label.nrrd"),  # frames not byte aligned
        ("tiny_24x38x3/seg/label.seg", "tiny_24x38x3/nrrd/label.nrrd"),
        (
            "seg/sparse-labelmap-noppv.dcm",
            "reference_nrrd/sparse_labelmap_noppv_seg.nrrd",
        ),  # LABELMAP, 2 of 3
        ("seg/sparse-labelmap-ppv5.dcm", "reference_nrrd/sparse_labelmap_ppv5_seg.nrrd"),  # NRRD pads with 5
    ],
)
def test_dcmqi_segs_equal_the_reference_nrrds(test_data, seg, nrrd):
    reference = nrrd_volume(test_data / DCMQI / nrrd)
    masks = read_seg(test_data / DCMQI / seg, like=reference)
    assert list(masks) == ["Liver"]
    assert masks["Liver"].dtype == bool
    assert np.array_equal(masks["Liver"].values, reference.values == 1)
    assert masks["Liver"].values.sum() > 0


def test_liver_on_the_ct_grid_equals_the_nrrd_and_highdicom(test_data, ct3):
    reference = nrrd_volume(test_data / DCMQI / "reference_nrrd" / "liver_seg.nrrd")
    assert same_grid(ct3, reference)
    liver = read_seg(test_data / DCMQI / "seg" / "liver.dcm", like=ct3)["Liver"]
    assert np.array_equal(liver.values, reference.values == 1)
    assert liver.values.sum() == 107098
    assert liver.attrs["frame_of_reference_uid"] == ct3.attrs["frame_of_reference_uid"]
    assert liver.attrs["segmentation_type"] == "BINARY"


def test_tiny_seg_on_its_image_series_and_legacy_multiframe(test_data):
    reference = nrrd_volume(test_data / DCMQI / "tiny_23x38x3" / "nrrd" / "label.nrrd")
    for source in ("image", "multiframe/mf.dcm"):
        grid = read_series(test_data / DCMQI / "tiny_23x38x3" / source)
        assert same_grid(grid, reference), source
        mask = read_seg(test_data / DCMQI / "tiny_23x38x3" / "seg" / "label.seg", like=grid)["Liver"]
        assert np.array_equal(mask.values, reference.values == 1), source


def test_seg_onto_a_grid_with_flipped_and_permuted_axes(test_data, ct3):
    path = test_data / DCMQI / "seg" / "liver.dcm"
    liver = read_seg(path, like=ct3)["Liver"].values
    affine = ct3.attrs["affine"]
    # the same voxels indexed with rows reversed (j runs towards anterior), as in LAS NIfTI files
    flipped = affine.copy()
    flipped[:3, 3] = affine[:3, 3] + (ct3.shape[1] - 1) * affine[:3, 1]
    flipped[:3, 1] = -affine[:3, 1]
    on_flipped = read_seg(path, like=make_volume(np.zeros(ct3.shape, np.int8), flipped))["Liver"].values
    assert np.array_equal(on_flipped, liver[:, ::-1, :])
    # rows and columns swapped (i along the patient's y axis): the transpose
    swapped = affine[:, [1, 0, 2, 3]]
    shape = (ct3.shape[0], ct3.shape[2], ct3.shape[1])
    on_swapped = read_seg(path, like=make_volume(np.zeros(shape, np.int8), swapped))["Liver"].values
    assert np.array_equal(on_swapped, liver.transpose(0, 2, 1))


def test_partial_overlaps_five_overlapping_segments(test_data, ct3):
    masks = read_seg(test_data / DCMQI / "seg" / "partial_overlaps.dcm", like=ct3)
    assert list(masks) == ["GREEN", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"]
    references = [
        nrrd_volume(test_data / DCMQI / "reference_nrrd" / f"partial_overlaps-{i}.nrrd") for i in (1, 2, 3)
    ]
    for number, mask in enumerate(masks.values(), start=1):
        assert mask.attrs["segment_number"] == number
        holder = next(r for r in references if (r.values == number).any())
        assert np.array_equal(mask.values, holder.values == number), number
    stacked = np.stack([m.values for m in masks.values()])
    assert (stacked.sum(axis=0) > 1).any()  # the segments do overlap


def test_duplicate_segment_labels_are_disambiguated(test_data, ct3):
    ds = pydicom.dcmread(test_data / DCMQI / "seg" / "partial_overlaps.dcm")
    ds.SegmentSequence[1].SegmentLabel = "GREEN"
    with pytest.warns(PacsaiWarning, match="segment label 'GREEN' occurs more than once"):
        masks = read_seg(ds, like=ct3)
    assert list(masks)[:3] == ["GREEN", "GREEN_2", "PURPLE"]
    assert masks["GREEN_2"].attrs["segment_number"] == 2


def test_big_endian_and_single_frame_segs(test_data, ct3):
    liver = read_seg(test_data / DCMQI / "seg" / "liver.dcm", like=ct3)["Liver"].values
    variants = test_data / "pydicom_variants" / "seg"
    assert np.array_equal(read_seg(variants / "liver_expb.dcm", like=ct3)["Liver"].values, liver)
    for name in ("liver_1frame.dcm", "liver_expb_1frame.dcm"):
        single = read_seg(variants / name, like=ct3)["Liver"].values
        assert np.array_equal(single[0], liver[0]) and not single[1:].any(), name


def test_seg_without_its_source_on_its_own_grid_agrees_with_highdicom(test_data):
    path = test_data / DCMQI / "pet_seg_without_source" / "seg.dcm"
    masks = read_seg(path, like=None)
    mask = masks["Neoplasm, Primary"]
    assert mask.shape == (13, 128, 128)
    assert mask.values.sum() == 795
    assert mask.attrs["spacing"] == pytest.approx((3.537818, 3.537818, 3.375))
    reference = hd.seg.segread(path).get_volume()
    assert np.array_equal(mask.values, on_grid(reference, mask) > 0)


# --------------------------------------------------------------------------------------- reading: highdicom
HIGHDICOM_SOURCE = (
    "17136.dcm",
    "17166.dcm",
    "17196.dcm",
)  # z = 103.02, 104.27, 105.52 (17106 lies 202 mm away)


@pytest.fixture(scope="module")
def ct16(test_data):
    return read_series([test_data / "highdicom_seg" / "source_ct_16x16" / n for n in HIGHDICOM_SOURCE])


@pytest.mark.parametrize(
    "name",
    [
        "seg_image_ct_binary.dcm",
        "seg_image_ct_binary_fractional.dcm",
        "seg_image_ct_true_fractional.dcm",
        "seg_image_ct_binary_overlap.dcm",
    ],
)
def test_highdicom_segs_agree_with_highdicom_by_source_instance(test_data, ct16, name):
    path = test_data / "highdicom_seg" / name
    uids = [
        str(
            pydicom.dcmread(
                test_data / "highdicom_seg" / "source_ct_16x16" / n, stop_before_pixels=True
            ).SOPInstanceUID
        )
        for n in HIGHDICOM_SOURCE
    ]
    seg = hd.seg.segread(path)
    # highdicom looks frames up by source instance; read_seg places them by position: the two must agree.
    reference = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    with warnings.catch_warnings():
        # the overlap SEG also has frames on the 4th slice, 202 mm away from this 3-slice grid
        warnings.simplefilter("ignore", PacsaiWarning)
        masks = read_seg(path, like=ct16)
    assert len(masks) == reference.shape[-1]
    for index, mask in enumerate(masks.values()):
        assert np.array_equal(mask.values, reference[..., index] >= 0.5), (name, index)
    assert any(m.values.any() for m in masks.values())


def test_fractional_threshold(test_data, ct16):
    path = test_data / "highdicom_seg" / "seg_image_ct_true_fractional.dcm"
    ds = pydicom.dcmread(path)
    fractions = ds.pixel_array / float(ds.MaximumFractionalValue)
    assert np.unique(fractions).size > 2  # really fractional, not 0/1
    low = read_seg(path, like=ct16, threshold=0.1)["first segment"].values.sum()
    mid = read_seg(path, like=ct16)["first segment"].values.sum()
    high = read_seg(path, like=ct16, threshold=0.9)["first segment"].values.sum()
    assert low >= mid >= high and low > high
    assert mid == int((fractions >= 0.5).sum())


def test_single_frame_seg_on_a_one_slice_series(test_data):
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", PacsaiWarning
        )  # one slice: read_series says where its spacing comes from
        grid = read_series([test_data / "highdicom_seg" / "ct_image.dcm"])
    path = test_data / "highdicom_seg" / "seg_image_ct_binary_single_frame.dcm"
    mask = read_seg(path, like=grid)["first segment"]
    uid = str(
        pydicom.dcmread(test_data / "highdicom_seg" / "ct_image.dcm", stop_before_pixels=True).SOPInstanceUID
    )
    reference = hd.seg.segread(path).get_pixels_by_source_instance([uid])
    assert np.array_equal(mask.values[0], reference[0, ..., 0] > 0)
    assert mask.values.sum() == 1832


def test_read_refusals(test_data, ct3, tmp_path):
    path = test_data / DCMQI / "seg" / "liver.dcm"
    other_for = ct3.copy()
    other_for.attrs = {**ct3.attrs, "frame_of_reference_uid": "1.2.3"}
    with pytest.raises(StructureError, match="frame of reference"):
        read_seg(path, like=other_for)
    coarse = make_volume(np.zeros((3, 256, 256)), ct3.attrs["affine"] @ np.diag([2.0, 2.0, 1.0, 1.0]))
    with pytest.raises(StructureError, match="not on the grid of `like`"):
        read_seg(path, like=coarse)
    half = ct3.attrs["affine"].copy()
    half[:3, 3] += 0.5 * half[:3, 0]
    with pytest.raises(StructureError, match="falls between voxels"):
        read_seg(path, like=make_volume(np.zeros(ct3.shape), half))
    with pytest.raises(StructureError, match="not a DICOM Segmentation"):
        read_seg(test_data / "tcia_sts001_mr_t2_rtstruct" / "rtstruct" / "1-1.dcm", like=ct3)
    # a smaller grid crops with a warning, never silently
    cropped = make_volume(np.zeros((3, 100, 100)), ct3.attrs["affine"])
    with pytest.warns(PacsaiWarning, match="'Liver' has voxels outside the grid"):
        small = read_seg(path, like=cropped)["Liver"]
    full = read_seg(path, like=ct3)["Liver"].values
    assert np.array_equal(small.values, full[:, :100, :100])


# -------------------------------------------------------------------------------------------------- writing
def test_write_binary_overlapping_round_trip_clean_and_repeatable(test_data, ct3, tmp_path):
    source = test_data / DCMQI / "ct_3slice"
    masks = read_seg(test_data / DCMQI / "seg" / "partial_overlaps.dcm", like=ct3)
    seg = write_seg(masks, source=source, uid_parts=("model", "1"))
    again = write_seg(masks, source=source, uid_parts=("model", "1"))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    path = dicomwrite.save(seg, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(path)
    back = read_seg(path, like=ct3)
    assert list(back) == list(masks)
    for name in masks:
        assert np.array_equal(back[name].values, masks[name].values), name
    data = dicomwrite.to_bytes(seg)
    assert dicomwrite.to_bytes(again) == data
    assert not any(stamp in data for stamp in today_stamps())
    src = pydicom.dcmread(next(iter(sorted(source.iterdir()))), stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    referenced = {
        i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in source.iterdir()
    }
    assert str(seg.ContentDate) == str(src.get("SeriesDate") or src.StudyDate)
    # changed content or uid_parts → new UIDs
    changed = dict(masks)
    flipped = masks["GREEN"].values.copy()
    flipped[1, 0, 0] = ~flipped[1, 0, 0]
    changed["GREEN"] = masks["GREEN"].copy(data=flipped)
    other = write_seg(changed, source=source, uid_parts=("model", "1"))
    model2 = write_seg(masks, source=source, uid_parts=("model", "2"))
    assert len({s.SOPInstanceUID for s in (seg, other, model2)}) == 3
    assert len({s.SeriesInstanceUID for s in (seg, other, model2)}) == 3


def test_write_labelmap_round_trip_and_overlap_refusal(test_data, ct3, tmp_path):
    source = test_data / DCMQI / "ct_3slice"
    labels = nrrd_volume(test_data / DCMQI / "reference_nrrd" / "liver_spine_seg.nrrd").values
    masks = {
        "Liver": ct3.copy(data=labels == 1),
        "Spinal cord": ct3.copy(data=labels == 2),
    }
    seg = write_seg(masks, source=source, segment_type="LABELMAP")
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    path = dicomwrite.save(seg, tmp_path / "labelmap.dcm")
    assert_dciodvfy_clean(path)
    back = read_seg(path, like=ct3)
    assert list(back) == ["Liver", "Spinal cord"]
    for name in masks:
        assert np.array_equal(back[name].values, masks[name].values), name
    overlapping = {"A": ct3.copy(data=labels > 0), "B": ct3.copy(data=labels == 1)}
    with pytest.raises(StructureError, match="masks overlap"):
        write_seg(overlapping, source=source, segment_type="LABELMAP")


def test_write_seg_on_the_oblique_mr(test_data, tmp_path):
    from pacsai.imaging.rtstruct import read_rtstruct

    source = test_data / "tcia_sts001_mr_t2_rtstruct" / "mr_t2"
    mr = read_series(source)
    masks = read_rtstruct(test_data / "tcia_sts001_mr_t2_rtstruct" / "rtstruct" / "1-1.dcm", like=mr)
    seg = write_seg(masks, source=source)
    path = dicomwrite.save(seg, tmp_path / "mr_seg.dcm")
    assert_dciodvfy_clean(path)
    back = read_seg(path, like=mr)
    for name in masks:
        assert np.array_equal(back[name].values, masks[name].values), name
    assert seg.NumberOfFrames == sum(
        int(m.values.any(axis=(1, 2)).sum()) for m in masks.values()
    )  # empty omitted
    morphology = seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0]
    assert morphology.CodeValue == codes.SCT.MorphologicallyAbnormalStructure.value


def test_write_seg_synthetic_oblique_in_memory_source():
    datasets, grid = synthetic_series((5, 20, 24), direction=rotation(-30, 15, 60), tag="seg-oblique")
    kk, jj, ii = np.mgrid[:5, :20, :24]
    heart = (np.hypot(ii - 10, jj - 9) < 6) & (kk > 0)
    lung = (ii > 15) & (jj > 3) & (kk < 4)
    masks = {
        name: make_volume(values, grid.attrs["affine"], attrs={"frame_of_reference_uid": FOR_UID})
        for name, values in (("Heart", heart), ("Lung", lung))
    }
    for kind in ("BINARY", "LABELMAP"):
        seg = write_seg(masks, source=datasets, segment_type=kind)
        assert_dciodvfy_clean(seg)
        back = read_seg(seg, like=grid)
        for name in masks:
            assert np.array_equal(back[name].values, masks[name].values), (kind, name)
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Heart.value


def test_write_seg_referencing_a_legacy_enhanced_multiframe_source(test_data):
    folder = test_data / DCMQI / "tiny_23x38x3"
    reference = nrrd_volume(folder / "nrrd" / "label.nrrd")
    source = pydicom.dcmread(folder / "multiframe" / "mf.dcm", stop_before_pixels=True)
    masks = {"Liver": reference.copy(data=reference.values == 1)}
    for kind in ("BINARY", "LABELMAP"):
        seg = write_seg(masks, source=folder / "multiframe" / "mf.dcm", segment_type=kind)
        assert_dciodvfy_clean(seg)
        assert {
            i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        } == {source.SOPInstanceUID}
        assert np.array_equal(read_seg(seg, like=reference)["Liver"].values, masks["Liver"].values), kind


def test_write_refusals(test_data):
    datasets, grid = synthetic_series((2, 6, 6), tag="seg-refuse")
    mask = make_volume(np.ones(grid.shape, bool), grid.attrs["affine"])
    with pytest.raises(StructureError, match="segment_type"):
        write_seg({"A": mask}, source=datasets, segment_type="FRACTIONAL")
    with pytest.raises(StructureError, match="must be boolean"):
        write_seg({"A": make_volume(np.ones(grid.shape), grid.attrs["affine"])}, source=datasets)
    folder = test_data / "totalsegmentator_ct_j2k" / "dicom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)  # read_series reports the empty UIDs too
        ct = read_series(folder)
    with pytest.raises(StructureError, match="has no (SOPClassUID|SOPInstanceUID|StudyInstanceUID)"):
        write_seg({"Liver": make_volume(np.zeros(ct.shape, bool), ct.attrs["affine"])}, source=folder)


def test_segment_codes():
    assert segment_codes("Lung_L") == (codes.SCT.AnatomicalStructure, codes.SCT.Lung)
    assert segment_codes("Spinal Cord") == (codes.SCT.AnatomicalStructure, codes.SCT.SpinalCord)
    assert segment_codes("oesophagus")[1] == codes.SCT.Esophagus
    assert segment_codes("BODY")[1] == codes.SCT.EntireBody
    assert segment_codes("GTV_Mass") == (
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.GrossTumorVolume,
    )
    assert segment_codes("Whatever") == (codes.SCT.Tissue, codes.SCT.Tissue)
