"""RTSTRUCT read/write, the rasteriser and contour tracer (pacsai.imaging.contours), and the Part-10 writing
helpers (pacsai.imaging.dicomwrite) they share with SEG."""

from __future__ import annotations

import datetime
import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import xarray as xr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacsai.errors import PacsaiWarning, StructureError
from pacsai.imaging import dicomwrite
from pacsai.imaging.contours import even_odd_area, fill_polygons, mask_to_polygons, polygon_area
from pacsai.imaging.geometry import affine_from, index_to_world, make_volume, voxel_volume_cc, world_to_index
from pacsai.imaging.rtstruct import RT_STRUCTURE_SET_STORAGE, read_rtstruct, write_rtstruct
from pacsai.uids import derive_uid
from tests.dciodvfy import assert_dciodvfy_clean

MR = "tcia_sts001_mr_t2_rtstruct"
FOR_UID = "1.2.826.0.1.3680043.8.498.1"


# ----------------------------------------------------------------------------------------------- synthetic
# data
def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A proper rotation (columns: unit vectors of i, j, k) from angles in degrees about x, y, z."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def synthetic_series(
    shape: tuple[int, int, int],
    *,
    spacing: tuple[float, float, float] = (0.9, 0.8, 2.5),
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] = (-100.0, -80.0, 30.0),
    tag: str = "a",
) -> tuple[list[Dataset], xr.DataArray]:
    """A small single-frame CT series as pydicom datasets (in reverse slice order: nothing may trust file
    order) and the empty grid it spans. ``spacing`` is (Δi, Δj, Δk)."""
    n_slices, rows, cols = shape
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    affine = affine_from(origin, direction, spacing)
    study = derive_uid("test-study", tag)
    series = derive_uid("test-series", tag)
    datasets = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = derive_uid("test-instance", tag, k)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PACSAI-TEST"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.SeriesDate = "20240102"
        ds.SeriesTime = "101600"
        ds.FrameOfReferenceUID = FOR_UID
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "pacsai tests"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in index_to_world(affine, [[0, 0, k]])[0]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.PixelData = np.zeros((rows, cols), dtype=np.int16).tobytes()
        datasets.append(ds)
    grid = make_volume(np.zeros(shape, dtype=np.int16), affine, attrs={"frame_of_reference_uid": FOR_UID})
    return datasets[::-1], grid


def rtstruct_from_polygons(
    rois: dict[str, list[np.ndarray]],
    *,
    frame_of_reference: str = FOR_UID,
    kinds: dict[str, str] | None = None,
) -> Dataset:
    """A minimal RTSTRUCT dataset with the given contours (each (N, 3) in LPS mm), for reader tests."""
    ds = Dataset()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = derive_uid("test-rtstruct", *rois)
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        if contours:
            item.ContourSequence = []
            for points in contours:
                contour = Dataset()
                contour.ContourGeometricType = (kinds or {}).get(name, "CLOSED_PLANAR")
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [float(v) for v in np.asarray(points).ravel()]
                item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    return ds


def to_world(grid: xr.DataArray, ij: np.ndarray, k: float) -> np.ndarray:
    """Polygon vertices given in (i, j) index units on slice k → LPS mm through the grid's affine."""
    ij = np.asarray(ij, dtype=float)
    return index_to_world(grid.attrs["affine"], np.column_stack([ij, np.full(len(ij), float(k))]))


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def nrrd_volume(path: Path) -> xr.DataArray:
    """A reference label NRRD on its own grid, read with SimpleITK (LPS, like DICOM)."""
    image = sitk.ReadImage(str(path))
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = affine_from(image.GetOrigin(), direction, image.GetSpacing())
    return make_volume(sitk.GetArrayFromImage(image), affine)


def dice(a: xr.DataArray, b: xr.DataArray) -> float:
    a, b = np.asarray(a.values, bool), np.asarray(b.values, bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def today_stamps() -> set[bytes]:
    now = datetime.datetime.now()
    return {now.strftime("%Y%m%d").encode(), (now - datetime.timedelta(days=1)).strftime("%Y%m%d").encode()}


# --------------------------------------------------------------------------------------------- contours (2-D)
def test_fill_pixel_aligned_rectangle_covers_its_area_with_half_open_edges():
    mask = fill_polygons([square(2, 1, 6, 4)], (8, 10))
    # centres on the left/bottom edges are in, on the right/top edges out: columns 2..5, rows 1..3
    expected = np.zeros((8, 10), bool)
    expected[1:4, 2:6] = True
    assert np.array_equal(mask, expected)
    # two rectangles tiling [2, 8) share no pixel and miss none
    left, right = fill_polygons([square(2, 1, 5, 4)], (8, 10)), fill_polygons([square(5, 1, 8, 4)], (8, 10))
    assert not (left & right).any()
    assert np.array_equal(left | right, fill_polygons([square(2, 1, 8, 4)], (8, 10)))


def test_fill_holes_islands_and_keyholes_by_even_odd():
    outer, hole, island = square(0.5, 0.5, 11.5, 11.5), square(2.5, 2.5, 9.5, 9.5), square(4.5, 4.5, 7.5, 7.5)
    ring = fill_polygons([outer, hole], (12, 12))
    assert ring.sum() == 11 * 11 - 7 * 7
    nested = fill_polygons([outer, hole, island], (12, 12))
    assert nested.sum() == 11 * 11 - 7 * 7 + 3 * 3
    assert nested[6, 6] and not nested[3, 3] and nested[1, 1]
    # a keyhole: one polygon runs in along a cut at y = 6.5 (between pixel rows), around the hole, back out
    keyhole = np.array(
        [
            [0.5, 0.5],
            [11.5, 0.5],
            [11.5, 11.5],
            [0.5, 11.5],
            [0.5, 6.5],
            [2.5, 6.5],
            [2.5, 9.5],
            [9.5, 9.5],
            [9.5, 2.5],
            [2.5, 2.5],
            [2.5, 6.5],
            [0.5, 6.5],
        ]
    )
    assert np.array_equal(fill_polygons([keyhole], (12, 12)), ring)
    # orientation does not matter
    assert np.array_equal(fill_polygons([outer[::-1], hole], (12, 12)), ring)


def test_fill_two_disjoint_contours_and_clipping():
    both = fill_polygons([square(0.5, 0.5, 3.5, 3.5), square(5.5, 5.5, 7.5, 7.5)], (8, 8))
    assert both.sum() == 9 + 4
    # a polygon reaching beyond the slice is clipped, not wrapped
    clipped = fill_polygons([square(-10, -10, 2.5, 100)], (8, 8))
    assert clipped.sum() == 8 * 3 and clipped[:, :3].all()


def test_fill_disc_matches_the_analytic_inclusion_rule():
    theta = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    radius, cx, cy = 20.3, 31.4, 27.7
    disc = fill_polygons(
        [np.column_stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)])], (64, 64)
    )
    jj, ii = np.mgrid[:64, :64]
    distance = np.hypot(ii - cx, jj - cy)
    sagitta = radius * (1 - np.cos(np.pi / 2000))  # the inscribed polygon's largest gap to the circle
    certain = np.abs(distance - radius) > sagitta
    assert np.array_equal(disc[certain], (distance < radius)[certain])


def test_trace_then_fill_is_exact_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(100):
        mask = rng.random((17, 23)) > 0.55
        polygons = mask_to_polygons(mask)
        assert np.array_equal(fill_polygons(polygons, mask.shape), mask)
    assert mask_to_polygons(np.zeros((4, 4), bool)) == []


def test_trace_writes_holes_as_separate_contours_and_drops_collinear_points():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    mask[6:14, 6:14] = False
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    # marching squares cuts each convex corner by half a pixel: 8 vertices per square ring
    assert sorted(len(p) for p in polygons) == [8, 8]
    # each square loses its four corner triangles (0.125 each): outer 256 - 0.5, hole 64 - 0.5
    assert even_odd_area(polygons) == pytest.approx((16 * 16 - 0.5) - (8 * 8 - 0.5))
    assert polygon_area(square(0, 0, 3, 2)) == 6.0


# ------------------------------------------------------------------------------------------- reading:
# synthetic
def test_read_sphere_on_an_oblique_grid():
    _, grid = synthetic_series((21, 48, 52), spacing=(1.0, 1.0, 1.0), direction=rotation(20, -15, 35))
    centre_ijk = np.array([25.3, 23.6, 10.0])
    radius = 8.2
    contours = []
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    for k in range(21):
        r = np.sqrt(max(radius**2 - (k - centre_ijk[2]) ** 2, 0.0))
        if r > 0.5:
            ij = np.column_stack([centre_ijk[0] + r * np.cos(theta), centre_ijk[1] + r * np.sin(theta)])
            contours.append(to_world(grid, ij, k))
    masks = read_rtstruct(rtstruct_from_polygons({"sphere": contours}), like=grid)
    mask = masks["sphere"].values
    kk, jj, ii = np.mgrid[:21, :48, :52]
    in_plane_r2 = np.maximum(radius**2 - (kk - centre_ijk[2]) ** 2, 0)
    d2 = (ii - centre_ijk[0]) ** 2 + (jj - centre_ijk[1]) ** 2
    certain = np.abs(np.sqrt(d2) - np.sqrt(in_plane_r2)) > 0.01
    expected = (d2 < in_plane_r2) & (np.sqrt(in_plane_r2) > 0.5)
    assert np.array_equal(mask[certain], expected[certain])
    assert mask.sum() * voxel_volume_cc(grid) == pytest.approx(4 / 3 * np.pi * radius**3 / 1000, rel=0.03)
    assert masks["sphere"].attrs["frame_of_reference_uid"] == FOR_UID
    assert np.array_equal(masks["sphere"].attrs["affine"], grid.attrs["affine"])


def test_read_ring_with_hole_keyhole_and_two_contours_on_one_slice():
    _, grid = synthetic_series((3, 16, 16), direction=rotation(0, 0, 90))
    ring = [to_world(grid, square(0.5, 0.5, 11.5, 11.5), 1), to_world(grid, square(2.5, 2.5, 9.5, 9.5), 1)]
    pair = [to_world(grid, square(0.5, 0.5, 3.5, 3.5), 2), to_world(grid, square(5.5, 5.5, 7.5, 7.5), 2)]
    masks = read_rtstruct(rtstruct_from_polygons({"ring": ring, "pair": pair}), like=grid)
    assert masks["ring"].values[1].sum() == 11 * 11 - 7 * 7
    assert masks["ring"].values[[0, 2]].sum() == 0  # one plane only: no spill onto neighbouring slices
    assert masks["pair"].values[2].sum() == 9 + 4
    assert list(masks) == ["ring", "pair"]


def test_contour_planes_map_to_the_nearest_slice_of_finer_and_coarser_grids():
    # contours every 3 mm (k = 0, 3, 6 on a 1 mm grid): each fills the slab of ±1.5 mm around its plane
    _, fine = synthetic_series((10, 8, 8), spacing=(1.0, 1.0, 1.0))
    planes = [to_world(fine, square(1.5, 1.5, 5.5, 5.5), k) for k in (0, 3, 6)]
    mask = read_rtstruct(rtstruct_from_polygons({"slab": planes}), like=fine)["slab"].values
    assert [int(s.sum()) for s in mask] == [16] * 8 + [0, 0]
    # contours every 1 mm onto a 3 mm grid: each grid slice takes its coincident plane
    _, coarse = synthetic_series((3, 8, 8), spacing=(1.0, 1.0, 3.0))
    sizes = {k: square(1.5, 1.5, 1.5 + (k % 4 + 1), 5.5) for k in range(9)}
    dense = [to_world(coarse, sizes[k], k / 3) for k in range(9)]
    with pytest.warns(PacsaiWarning, match="reaches outside the grid"):  # planes k = 2.33, 2.67 lie beyond it
        mask = read_rtstruct(rtstruct_from_polygons({"dense": dense}), like=coarse)["dense"].values
    assert [int(s.sum()) for s in mask] == [4 * (0 % 4 + 1), 4 * (3 % 4 + 1), 4 * (6 % 4 + 1)]


def test_rt_tiny_without_file_meta_skips_points_with_warnings(test_data):
    path = test_data / "pydicom_variants" / "rt_tiny" / "rtstruct.dcm"
    grid = make_volume(
        np.zeros((3, 40, 50), np.int16), affine_from((-245, -195, -200), np.eye(3), (10, 10, 10))
    )
    with pytest.warns(PacsaiWarning) as record:
        masks = read_rtstruct(path, like=grid)
    messages = [str(w.message) for w in record]
    assert sum("POINT" in m for m in messages) == 2
    assert sum("no closed contours" in m for m in messages) == 2  # the isocentres have nothing else
    # 400 × 300 mm rectangles on 10 mm pixels whose centres are 5 mm off the edges: 40 × 30 per slice
    assert [int(s.sum()) for s in masks["patient"].values] == [1200, 1200, 1200]
    assert masks["Isocenter 1"].values.sum() == 0


def test_duplicate_names_empty_rois_and_names_filter():
    _, grid = synthetic_series((2, 8, 8))
    ds = rtstruct_from_polygons({"A": [to_world(grid, square(1, 1, 3, 3), 0)], "empty": []})
    ds.StructureSetROISequence[1].ROIName = "A"
    with pytest.warns(PacsaiWarning) as record:
        masks = read_rtstruct(ds, like=grid)
    assert list(masks) == ["A", "A_2"]
    assert any("occurs more than once" in str(w.message) for w in record)
    assert any("'A' (number 2) has no closed contours" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)
        assert list(read_rtstruct(ds, like=grid, names=["A_2"])) == ["A_2"]
        with pytest.raises(StructureError, match="no ROI named \\['B'\\]"):
            read_rtstruct(ds, like=grid, names=["B"])


def test_read_refusals():
    _, grid = synthetic_series((4, 8, 8))
    other = rtstruct_from_polygons(
        {"A": [to_world(grid, square(1, 1, 3, 3), 0)]}, frame_of_reference="1.2.3.4"
    )
    with pytest.raises(StructureError, match="frame of reference 1.2.3.4"):
        read_rtstruct(other, like=grid)
    tilted = to_world(grid, square(1, 1, 5, 5), 1)
    tilted[:2, 2] += 2.0  # two vertices 2 mm off the plane
    with pytest.raises(StructureError, match="not in a slice plane of the grid"):
        read_rtstruct(rtstruct_from_polygons({"A": [tilted]}), like=grid)
    # an ROI the caller did not ask for neither raises nor changes the others
    mixed = rtstruct_from_polygons({"bad": [tilted], "A": [to_world(grid, square(1, 1, 3, 3), 0)]})
    assert read_rtstruct(mixed, like=grid, names=["A"])["A"].values.sum() == 4
    not_rt = Dataset()
    not_rt.Modality = "CT"
    not_rt.SOPClassUID = CTImageStorage
    with pytest.raises(StructureError, match="not an RT Structure Set"):
        read_rtstruct(not_rt, like=grid)
    with pytest.warns(PacsaiWarning) as record:
        masks = read_rtstruct(
            rtstruct_from_polygons(
                {"A": [to_world(grid, square(1, 1, 3, 3), 0)]}, kinds={"A": "OPEN_PLANAR"}
            ),
            like=grid,
        )
    assert masks["A"].values.sum() == 0
    assert any("skipped 1 OPEN_PLANAR contour" in str(w.message) for w in record)
    with pytest.warns(PacsaiWarning, match="reaches outside the grid"):
        read_rtstruct(rtstruct_from_polygons({"A": [to_world(grid, square(-5, 1, 3, 3), 0)]}), like=grid)


# ------------------------------------------------------------------------------------------- reading: real
# data
def contour_points(contour: Dataset) -> np.ndarray:
    """(N, 3) ContourData, parsed from the raw bytes: pydicom's DSfloat-per-number parsing takes seconds."""
    element = contour.get_item("ContourData")
    if isinstance(element.value, bytes):
        return np.array(element.value.decode().strip(" \x00").split("\\"), dtype=float).reshape(-1, 3)
    return np.asarray(element.value, dtype=float).reshape(-1, 3)


def polygon_volumes_cc(path: Path, grid: xr.DataArray) -> dict[str, float]:
    """Σ over planes of the even-odd shoelace area (in-plane, mm²) × the contour spacing: the TPS volume."""
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    affine = grid.attrs["affine"]
    spacing = grid.attrs["spacing"]
    volumes = {}
    for item in ds.ROIContourSequence:
        planes: dict[float, list[np.ndarray]] = {}
        for contour in item.get("ContourSequence", []):
            ijk = world_to_index(affine, contour_points(contour))
            planes.setdefault(round(float(ijk[:, 2].mean()), 2), []).append(
                ijk[:, :2] * np.asarray(spacing[:2])
            )
        volumes[names[int(item.ReferencedROINumber)]] = (
            sum(even_odd_area(p) for p in planes.values()) * spacing[2] / 1000.0
        )
    return volumes


@pytest.fixture(scope="module")
def mr(test_data):
    from pacsai.imaging.volume import read_series

    return read_series(test_data / MR / "mr_t2")


@pytest.fixture(scope="module")
def mr_masks(test_data, mr):
    return read_rtstruct(test_data / MR / "rtstruct" / "1-1.dcm", like=mr)


def test_oblique_mr_rasterised_volumes_match_the_contour_polygons(test_data, mr, mr_masks):
    expected = polygon_volumes_cc(test_data / MR / "rtstruct" / "1-1.dcm", mr)
    assert set(mr_masks) == {"GTV_Mass", "GTV_Edema"}
    for name, mask in mr_masks.items():
        measured = mask.values.sum() * voxel_volume_cc(mr)
        assert measured == pytest.approx(expected[name], rel=0.002), name  # measured: 0.02 % and 0.005 %
    # the contours lie on 20 and 32 distinct slices: each lands on exactly one slice of the oblique grid
    assert int(mr_masks["GTV_Mass"].values.any(axis=(1, 2)).sum()) == 20
    assert int(mr_masks["GTV_Edema"].values.any(axis=(1, 2)).sum()) == 32


def test_breast_rtstruct_volumes_match_the_contour_polygons(test_data):
    ct = pydicom.dcmread(test_data / "dicompyler_breast_rt" / "ct.0.dcm", stop_before_pixels=True)
    # Only one CT slice is distributed: the grid is that slice's in-plane grid, extended down over the 98
    # contour planes 3 mm apart (z −122.44 … 168.56).
    ipp = np.asarray(ct.ImagePositionPatient, float)
    spacing = (float(ct.PixelSpacing[1]), float(ct.PixelSpacing[0]), 3.0)
    grid = make_volume(
        np.zeros((98, 512, 512), np.int8),
        affine_from((ipp[0], ipp[1], -122.44), np.eye(3), spacing),
        attrs={"frame_of_reference_uid": ct.FrameOfReferenceUID},
    )
    path = test_data / "dicompyler_breast_rt" / "rtss.dcm"
    with pytest.warns(PacsaiWarning, match="'Areola' \\(number 2\\) has no closed contours"):
        masks = read_rtstruct(path, like=grid)
    expected = polygon_volumes_cc(path, grid)
    assert masks["Areola"].values.sum() == 0
    # Tolerance by size: the boundary error is about half a pixel × perimeter, relatively larger for small
    # ROIs.
    for name, mask in masks.items():
        if name == "Areola":
            continue
        measured = mask.values.sum() * voxel_volume_cc(grid)
        rel = 0.005 if expected[name] > 100 else 0.01 if expected[name] > 10 else 0.04
        assert measured == pytest.approx(expected[name], rel=rel), name


# ------------------------------------------------------------------------------------------------------
# writing
def test_write_read_back_mr_exactly_dciodvfy_clean_and_repeatable(test_data, mr, mr_masks, tmp_path):
    source = test_data / MR / "mr_t2"
    ds = write_rtstruct(mr_masks, source=source, uid_parts=("model-1",))
    path = dicomwrite.save(ds, tmp_path / "rs.dcm")
    assert_dciodvfy_clean(path)
    back = read_rtstruct(path, like=mr)
    for name, mask in mr_masks.items():
        assert dice(back[name], mask) == 1.0, name
    # references: study, frame of reference, the 40 MR instances, one source slice per contour
    src = pydicom.dcmread(next(iter(sorted(source.iterdir()))), stop_before_pixels=True)
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert len(series.ContourImageSequence) == 40
    by_uid = {
        str(d.SOPInstanceUID): d
        for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in source.iterdir())
    }
    normal = np.cross(
        np.asarray(src.ImageOrientationPatient[:3], float), np.asarray(src.ImageOrientationPatient[3:], float)
    )
    for contour in ds.ROIContourSequence[0].ContourSequence:
        image = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        offset = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
        assert np.abs(offset).max() < 1e-3
    # DS values as written in the file: at most 16 characters each (rt-utils' trap)
    written = pydicom.dcmread(path)
    for contour in written.ROIContourSequence[1].ContourSequence:
        raw = contour.get_item("ContourData").value
        assert max(len(v) for v in raw.split(b"\\")) <= 16
    # same inputs → same bytes, no clock anywhere
    data = dicomwrite.to_bytes(ds)
    assert dicomwrite.to_bytes(write_rtstruct(mr_masks, source=source, uid_parts=("model-1",))) == data
    assert not any(stamp in data for stamp in today_stamps())
    assert ds.StructureSetDate == (src.get("SeriesDate") or src.StudyDate)


def test_write_uids_follow_content_and_uid_parts():
    datasets, grid = synthetic_series((4, 12, 14), direction=rotation(10, 20, -30), tag="uids")
    mask = np.zeros(grid.shape, bool)
    mask[1:3, 3:8, 4:9] = True
    masks = {"GTV": make_volume(mask, grid.attrs["affine"], attrs={"frame_of_reference_uid": FOR_UID})}
    first = write_rtstruct(masks, source=datasets)
    changed = mask.copy()
    changed[1, 3, 4] = False
    other = write_rtstruct(
        {"GTV": make_volume(changed, grid.attrs["affine"], attrs={"frame_of_reference_uid": FOR_UID})},
        source=datasets,
    )
    parts = write_rtstruct(masks, source=datasets, uid_parts=("model v2",))
    uids = {(d.SOPInstanceUID, d.SeriesInstanceUID) for d in (first, other, parts)}
    assert len(uids) == 3
    assert first.SOPInstanceUID == write_rtstruct(masks, source=datasets[::-1]).SOPInstanceUID  # order-free


def test_write_synthetic_oblique_masks_with_holes_round_trip(tmp_path):
    datasets, grid = synthetic_series((6, 30, 34), direction=rotation(25, -10, 40), tag="oblique")
    kk, jj, ii = np.mgrid[:6, :30, :34]
    r = np.hypot(ii - 16.2, jj - 14.7)
    ring = (r < 11) & (r >= 5) & (kk >= 1) & (kk <= 4)
    ring[2] |= r[2] < 2  # an island inside the hole
    blobs = ((np.abs(ii - 5) < 3) & (np.abs(jj - 5) < 3)) | ((np.abs(ii - 28) < 3) & (np.abs(jj - 25) < 2))
    masks = {
        name: make_volume(values, grid.attrs["affine"], attrs={"frame_of_reference_uid": FOR_UID})
        for name, values in (("Ring", ring), ("Blobs", blobs), ("Empty", np.zeros(grid.shape, bool)))
    }
    ds = write_rtstruct(masks, source=datasets, roi_colors={"Ring": (1, 2, 3)}, series_number=7)
    assert_dciodvfy_clean(ds)
    assert ds.ROIContourSequence[0].ROIDisplayColor == [1, 2, 3]
    assert ds.SeriesNumber == 7
    assert "ContourSequence" not in ds.ROIContourSequence[2]
    with pytest.warns(PacsaiWarning, match="'Empty'"):
        back = read_rtstruct(dicomwrite.save(ds, tmp_path / "rs.dcm"), like=grid)
    for name, mask in masks.items():
        assert np.array_equal(back[name].values, mask.values), name
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["ORGAN", "ORGAN", "ORGAN"]


def test_write_referencing_a_legacy_enhanced_multiframe_source(test_data, tmp_path):
    folder = test_data / "dcmqi_ct_seg" / "tiny_23x38x3"
    reference = nrrd_volume(folder / "nrrd" / "label.nrrd")
    liver = reference.copy(data=reference.values == 1)  # touches the grid's border: no "outside" warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", PacsaiWarning)
        ds = write_rtstruct({"Liver": liver}, source=folder / "multiframe" / "mf.dcm")
        back = read_rtstruct(dicomwrite.save(ds, tmp_path / "rs.dcm"), like=reference)
    assert_dciodvfy_clean(tmp_path / "rs.dcm")
    assert np.array_equal(back["Liver"].values, liver.values)
    images = (
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    )
    assert [int(i.ReferencedFrameNumber) for i in images.ContourImageSequence] == [1, 2, 3]
    for contour in ds.ROIContourSequence[0].ContourSequence:
        k = round(
            world_to_index(reference.attrs["affine"], np.asarray(contour.ContourData, float).reshape(-1, 3))[
                0, 2
            ]
        )
        assert int(contour.ContourImageSequence[0].ReferencedFrameNumber) == k + 1  # frames run along z here


def test_write_refusals(test_data):
    datasets, grid = synthetic_series((3, 8, 8), tag="refuse")
    mask = np.zeros(grid.shape, bool)
    mask[1, 2:4, 2:4] = True
    good = make_volume(mask, grid.attrs["affine"])
    shifted = make_volume(mask, grid.attrs["affine"] + np.array([[0, 0, 0, 0.4], [0] * 4, [0] * 4, [0] * 4]))
    with pytest.raises(StructureError, match="does not lie on a slice of the masks' grid"):
        write_rtstruct({"A": shifted}, source=datasets)
    with pytest.raises(StructureError, match="no source instance for slice"):
        write_rtstruct({"A": good}, source=datasets[:2])
    with pytest.raises(StructureError, match="must be boolean"):
        write_rtstruct({"A": make_volume(mask.astype(np.uint8), grid.attrs["affine"])}, source=datasets)
    with pytest.raises(StructureError, match="no masks"):
        write_rtstruct({}, source=datasets)
    with pytest.raises(StructureError, match="frame of reference"):
        write_rtstruct(
            {"A": make_volume(mask, grid.attrs["affine"], attrs={"frame_of_reference_uid": "1.2"})},
            source=datasets,
        )
    # the UID-less TotalSegmentator CT cannot be referenced
    from pacsai.imaging.volume import read_series

    folder = test_data / "totalsegmentator_ct_j2k" / "dicom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)  # read_series reports the empty UIDs too
        ct = read_series(folder)
    with pytest.raises(StructureError, match="has no (SOPClassUID|SOPInstanceUID|StudyInstanceUID)"):
        write_rtstruct({"A": make_volume(np.zeros(ct.shape, bool), ct.attrs["affine"])}, source=folder)


# --------------------------------------------------------------------------------------------- dicomwrite
def test_format_ds_fits_16_characters_and_is_stable():
    values = [0.0, -0.0, -0.00001, 1.23456789, -1234.56789, 123456789012.5, -9.87654321e20, 1e-30]
    texts = [dicomwrite.format_ds(v) for v in values]
    assert all(len(t) <= 16 for t in texts)
    assert texts[:5] == ["0.0000", "0.0000", "0.0000", "1.2346", "-1234.5679"]
    for value, text in zip(values[5:], texts[5:], strict=True):
        assert float(text) == pytest.approx(value, rel=1e-6, abs=1e-4)
    with pytest.raises(ValueError):
        dicomwrite.format_ds(float("nan"))


def test_content_datetime_prefers_series_then_study_and_warns_without_any():
    a, b = Dataset(), Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # pydicom warns about the retired TM form: it is the point
        a.StudyDate, a.StudyTime = "20200101", "08:30:00"
    b.SeriesDate, b.SeriesTime = "20200202", "093000.5"
    assert dicomwrite.content_datetime([a, b]) == ("20200202", "093000.5")
    assert dicomwrite.content_datetime([a]) == ("20200101", "083000")
    with pytest.warns(PacsaiWarning, match="has no date"):
        assert dicomwrite.content_datetime([Dataset()]) == (
            dicomwrite.FALLBACK_DATE,
            dicomwrite.FALLBACK_TIME,
        )


def test_masks_digest_sees_every_voxel_name_and_grid():
    grid = make_volume(np.zeros((2, 3, 4), bool), np.eye(4))
    base = {"A": grid}
    flipped = grid.copy(data=grid.values.copy())
    flipped.values[1, 2, 3] = True
    moved = make_volume(np.zeros((2, 3, 4), bool), np.diag([1.0, 1.0, 2.0, 1.0]))
    digests = {dicomwrite.masks_digest(m) for m in (base, {"A": flipped}, {"B": grid}, {"A": moved})}
    assert len(digests) == 4
    assert dicomwrite.masks_digest(base) == dicomwrite.masks_digest({"A": grid.copy()})


def eclipse_grid(
    path: Path, *, pixel: float, slice_mm: float | None = None, shift_mm: float = 0.0
) -> xr.DataArray:
    """A grid spanning every contour of an RTSTRUCT whose CT is absent (its planes are 2.5 mm apart)."""
    ds = pydicom.dcmread(path)
    points = np.concatenate(
        [contour_points(c) for item in ds.ROIContourSequence for c in item.get("ContourSequence", [])]
    )
    planes = np.unique(np.round(points[:, 2], 3))
    step = slice_mm or float(np.median(np.diff(planes)))
    low = np.floor(points.min(axis=0)) - 4
    size = np.ceil((points.max(axis=0) - low + 4) / pixel).astype(int)
    n_slices = int(np.floor((planes[-1] - planes[0]) / step)) + 1
    return make_volume(
        np.zeros((n_slices, size[1], size[0]), np.int8),
        affine_from((low[0], low[1], planes[0] + shift_mm), np.eye(3), (pixel, pixel, step)),
        attrs={"frame_of_reference_uid": ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID},
    )


def test_eclipse_rtstruct_without_its_ct_reports_empty_rois_and_keeps_volumes(test_data):
    path = next((test_data / "slicerrt_eclipse_rando_prostate_rt_no_ct").glob("RS.*.dcm"))
    grid = eclipse_grid(path, pixel=1.5)
    with pytest.warns(PacsaiWarning) as record:
        masks = read_rtstruct(path, like=grid)
    empty = sorted(n for n, m in masks.items() if not m.values.any())
    assert empty == sorted(
        [
            "CTV",
            "PROS",
            "Vessels - left",
            "Vessels - right",
            "X1",
            "X2",
            "X3",
            "XApprox",
            "optBladder",
            "optRectum",
        ]
    )
    assert sum("has no closed contours" in str(w.message) for w in record) == len(empty)
    expected = polygon_volumes_cc(path, grid)
    for name, mask in masks.items():
        if name not in empty:  # measured: within 0.15 % on 1.5 mm pixels
            assert mask.values.sum() * voxel_volume_cc(grid) == pytest.approx(expected[name], rel=0.005), name
    # a dose-like grid: 2 mm slices offset by 0.7 mm from the 2.5 mm contour planes, 2.5 mm pixels. Each slice
    # takes the nearest plane's contours, so volumes hold to within the slab sampling error.
    dose_like = eclipse_grid(path, pixel=2.5, slice_mm=2.0, shift_mm=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)
        coarse = read_rtstruct(path, like=dose_like, names=["BODY", "Bladder"])
    assert list(coarse) == ["BODY", "Bladder"]
    for name, mask in coarse.items():
        measured = mask.values.sum() * voxel_volume_cc(dose_like)
        assert measured == pytest.approx(expected[name], rel=0.02), name  # measured: 0.8 % and 1.0 %


def test_breast_rtstruct_on_the_real_dose_grid(test_data):
    from pacsai.imaging.dose import read_dose

    folder = test_data / "dicompyler_breast_rt"
    dose = read_dose(folder / "rtdose.dcm")  # 2.5 mm pixels, 3 mm frames on the contour planes
    with pytest.warns(PacsaiWarning, match="'Areola'"):
        masks = read_rtstruct(folder / "rtss.dcm", like=dose)
    expected = polygon_volumes_cc(folder / "rtss.dcm", dose)
    assert masks["BODY"].attrs["frame_of_reference_uid"] == dose.attrs["frame_of_reference_uid"]
    # measured: ≤ 0.12 % above 100 cc, ≤ 0.8 % above 10 cc, ≤ 7.2 % for the 0.5–1.3 cc ROIs (2.5 mm pixels)
    for name, mask in masks.items():
        if expected[name] == 0:
            continue
        measured = mask.values.sum() * voxel_volume_cc(dose)
        rel = 0.005 if expected[name] > 100 else 0.02 if expected[name] > 10 else 0.1
        assert measured == pytest.approx(expected[name], rel=rel), name


def test_set_ds_fast_writes_the_formatted_text_and_reads_back_as_numbers():
    values = [1.0, -2.5, 1234.56789, -0.0, 3e-7]
    item = Dataset()
    dicomwrite.set_ds_fast(item, "ContourData", values)
    ds = Dataset()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = derive_uid("set-ds-fast")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ROIContourSequence = [Dataset()]
    ds.ROIContourSequence[0].ContourSequence = [item]
    data = dicomwrite.to_bytes(dicomwrite.finalize(ds))
    assert b"1.0000\\-2.5000\\1234.5679\\0.0000\\0.0000" in data
    back = pydicom.dcmread(io.BytesIO(data)).ROIContourSequence[0].ContourSequence[0]
    assert [float(v) for v in back.ContourData] == [1.0, -2.5, 1234.5679, 0.0, 0.0]
    with pytest.raises(ValueError, match="not a DS attribute"):
        dicomwrite.set_ds_fast(item, "ROIName", [1.0])


def test_format_ds_list_fast_path_writes_the_same_strings_as_format_ds():
    # The list formatter's one-comprehension path must give format_ds's bytes, or RTSTRUCT UIDs/bytes would move.
    rng = np.random.default_rng(7)
    values = np.concatenate([
        rng.normal(0.0, 300.0, 5000),
        [0.0, -0.0, -4e-5, 4e-5, -5e-5, 5e-5, 0.00005, -1e-12, 123.45675, 9999949999.9999, -9999949999.9999],
    ])
    assert dicomwrite.format_ds_list(values) == [dicomwrite.format_ds(v) for v in values]
    assert "-0.0000" not in dicomwrite.format_ds_list(values)
    huge = np.array([1.5e10, -2.25e11, 1e-3])  # beyond fixed-point with 4 decimals: the per-value path
    assert dicomwrite.format_ds_list(huge) == [dicomwrite.format_ds(v) for v in huge]
