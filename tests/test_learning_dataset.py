"""Cohort → preprocessed, cached cases → class-balanced patches; resampling checked against exact answers."""

from __future__ import annotations

import numpy as np
import pytest

from pacsai.cohort import CohortQuery, select_cohort
from pacsai.imaging.geometry import affine_from, make_volume, voxel_volume_cc
from pacsai.learning.dataset import (
    Augment,
    Case,
    PatchSampler,
    PreprocessSpec,
    body_box,
    class_map,
    load_cases,
    preprocess_case,
    sample,
    training_grid,
)
from tests.test_cohort import SMOKE_SPACING, STRUCTURES, seeded_store, store_url


def _ramp(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """f(x, y, z) = 2x − 3y + 0.5z + 7 at every voxel centre (LPS mm): trilinear sampling reproduces it exactly."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    w = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ np.asarray(affine).T
    return 2 * w[..., 0] - 3 * w[..., 1] + 0.5 * w[..., 2] + 7


def test_sample_is_exact_for_linear_fields_between_oblique_grids():
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    src_aff = affine_from((0, 0, 0), np.eye(3), (1.0, 1.5, 2.0))
    dst_aff = affine_from((20, 15, 20), rot, (1.7, 1.1, 2.3))
    src = _ramp(src_aff, (30, 40, 50))
    dst_shape = (6, 8, 8)
    got = sample(src, src_aff, dst_aff, dst_shape, order=1, cval=np.nan)
    np.testing.assert_allclose(got, _ramp(dst_aff, dst_shape), atol=1e-6)


def test_training_grid_keeps_origin_and_direction():
    volume = make_volume(np.zeros((10, 20, 30)), affine_from((5, 6, 7), np.diag([-1, 1, 1]), (0.5, 0.7, 3.0)))
    grid, shape = training_grid(volume, (2.0, 2.0, 6.0))
    assert shape == (5, 7, 8)  # floor(extent / spacing) + 1 along z, y, x: 27/6, 13.3/2, 14.5/2
    np.testing.assert_allclose(grid[:3, 3], (5, 6, 7))
    np.testing.assert_allclose(grid[:3, :3], np.diag([-2.0, 2.0, 6.0]))


def test_body_box_takes_the_largest_region_plus_margin():
    hu = np.full((20, 30, 30), -1000.0)
    hu[5:15, 10:20, 8:22] = 0  # body
    hu[1, 1, 1] = 0  # a speck outside
    box = body_box(hu, threshold_hu=-500, margin_vox=(1, 2, 3))
    assert box == (slice(4, 16), slice(8, 22), slice(5, 25))


def test_preprocess_case_resamples_masks_onto_the_cropped_image_grid():
    affine = affine_from((-100, -100, -50), np.eye(3), (2.0, 2.0, 5.0))
    shape = (20, 100, 100)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    w = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ affine.T
    body = (w[..., 0] / 70) ** 2 + (w[..., 1] / 50) ** 2 <= 1
    ball = (w[..., 0] - 20) ** 2 + w[..., 1] ** 2 + w[..., 2] ** 2 <= 25**2
    hu = np.where(body, 40.0, -1000.0)
    masks = {"BODY": make_volume(body, affine), "Ball": make_volume(ball & body, affine)}
    spec = PreprocessSpec(spacing_mm=(4.0, 4.0, 4.0), structures=("Ball", "BODY"), margin_mm=8)
    image, label = preprocess_case(make_volume(hu, affine), masks, spec)
    assert label.shape == (2, *image.shape) and label.dtype == np.uint8
    assert image.attrs["spacing"] == (4.0, 4.0, 4.0)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    cc = voxel_volume_cc(image)
    assert label[0].sum() * cc == pytest.approx(4 / 3 * np.pi * 25**3 / 1000, rel=0.05)
    mid = label[1][label.shape[1] // 2]
    assert mid.sum() * 16.0 == pytest.approx(np.pi * 70 * 50, rel=0.03)  # ellipse area in mm²
    # the crop keeps the body whole: two voxels of margin (8 mm) are empty on each in-plane side
    assert not label[1][:, :, :2].any() and not label[1][:, :, -2:].any()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from pacsai.pacs import connect

    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-dataset")
    cohort = select_cohort(pacs, CohortQuery(structures=STRUCTURES))
    spec = PreprocessSpec(spacing_mm=(8.0, 8.0, 8.0), structures=STRUCTURES)
    cache = tmp_path_factory.mktemp("preprocessed")
    first = load_cases(pacs, cohort, spec, cache_dir=cache, progress=False)
    return {"pacs": pacs, "cohort": cohort, "spec": spec, "cache": cache, "cases": first}


def test_cohort_to_cached_cases(cases):
    first = cases["cases"]
    assert len(first) == 3 and len(list(cases["cache"].glob("*.npz"))) == 3
    for case in first:
        assert case.image.shape[0] == 1 and case.label.shape == (len(STRUCTURES), *case.image.shape[1:])
        assert len(case.sop_instance_uids) == 16
        assert case.label[STRUCTURES.index("BODY")].sum() > 0 and case.label[STRUCTURES.index("Lung_L")].any()
        # the BODY channel holds every other structure (on the training grid, up to resampling)
        inside = case.label[STRUCTURES.index("BODY")].astype(bool)
        assert (case.label[STRUCTURES.index("Heart")].astype(bool) & ~inside).sum() == 0
    again = load_cases(
        cases["pacs"],
        cases["cohort"],
        cases["spec"],
        cache_dir=cases["cache"],
        progress=False,
        patients=["SYN-00001"],
        patient_label=lambda p: "p-x",
    )
    (one,) = again
    ref = next(c for c in first if c.series_instance_uid == one.series_instance_uid)
    np.testing.assert_array_equal(one.image, ref.image)
    np.testing.assert_array_equal(one.label, ref.label)
    np.testing.assert_array_equal(one.affine, ref.affine)
    assert one.patient == "p-x"
    # the raw image's statistics and the structure volumes come back from the cache unchanged
    assert one.stats == ref.stats and one.volumes_cc == ref.volumes_cc
    assert one.stats["modality"] == "CT" and one.stats["spacing_mm"] == pytest.approx(list(SMOKE_SPACING))
    assert set(one.volumes_cc) == set(STRUCTURES) and one.volumes_cc["BODY"] > one.volumes_cc["Heart"] > 0


def test_sampler_yields_patches_of_real_cases(cases):
    sampler = PatchSampler(
        cases["cases"], patch_size=(16, 32, 32), class_weights=[1] * (len(STRUCTURES) + 1),
        rng=np.random.default_rng(0),
    )
    image, label = sampler.batch(3)
    assert image.shape == (3, 1, 16, 32, 32) and image.dtype == np.float32
    assert label.shape == (3, len(STRUCTURES), 16, 32, 32)


def _toy_case() -> Case:
    """40 voxels in a row: background, a big structure A (30 voxels) and a single voxel of B."""
    label = np.zeros((2, 1, 1, 40), dtype=np.uint8)
    label[0, ..., 5:35] = 1
    label[1, ..., 20] = 1  # B inside A: B wins in the class map
    image = np.arange(40, dtype=np.float32).reshape(1, 1, 1, 40)
    return Case("toy", image, label, np.eye(4), "p", "s")


def test_class_map_later_structures_win():
    cm = class_map(_toy_case().label)
    assert cm[0, 0, 4] == 0 and cm[0, 0, 5] == 1 and cm[0, 0, 20] == 2 and (cm == 2).sum() == 1


def test_sampler_centres_follow_the_class_weights():
    """Weights (0, 0, 1): every 1-voxel-wide patch is the single B voxel, however rare it is; (1, 0, 0): never."""
    case = _toy_case()
    only_b = PatchSampler([case], patch_size=(1, 1, 1), class_weights=[0, 0, 1], rng=np.random.default_rng(1),
                          augment=Augment(p_scale=0, p_shift=0))
    for _ in range(20):
        image, label = only_b.draw()
        assert image.item() == 20.0 and label[:, 0, 0, 0].tolist() == [1.0, 1.0]
    only_bg = PatchSampler([case], patch_size=(1, 1, 1), class_weights=[1, 0, 0], rng=np.random.default_rng(1),
                           augment=Augment(p_scale=0, p_shift=0))
    seen = {only_bg.draw()[0].item() for _ in range(50)}
    assert seen <= set(range(5)) | set(range(35, 40))
    # the patch stays inside the case (shifted at the edges) and a case smaller than a patch is padded
    big = PatchSampler([case], patch_size=(2, 2, 8), class_weights=[1, 1, 1], rng=np.random.default_rng(2))
    image, label = big.draw()
    assert image.shape == (1, 2, 2, 8) and label.shape == (2, 2, 2, 8)
    with pytest.raises(Exception, match="class weights"):
        PatchSampler([case], patch_size=(1, 1, 1), class_weights=[1, 1], rng=np.random.default_rng(0))


def test_sampler_is_deterministic_from_its_generator():
    case = _toy_case()
    aug = Augment(noise=0.05, p_noise=1.0, blur=1.0, p_blur=0.5)
    draws = [
        PatchSampler([case], patch_size=(1, 1, 8), class_weights=[1, 1, 1], rng=np.random.default_rng(7),
                     augment=aug).batch(4)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(draws[0][0], draws[1][0])
    np.testing.assert_array_equal(draws[0][1], draws[1][1])


def test_spec_key_and_round_trip():
    spec = PreprocessSpec(spacing_mm=(4, 4, 4), structures=("A", "B"))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.key() == PreprocessSpec.from_dict(spec.to_dict()).key()
    assert spec.key() != PreprocessSpec(spacing_mm=(4, 4, 5), structures=("A", "B")).key()
    with pytest.raises(Exception, match="window"):
        PreprocessSpec(window=(1, 0))


def test_antialias_smooths_only_what_gets_coarser():
    from pacsai.learning.dataset import antialiased

    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 100.0, size=(8, 64, 64)).astype(np.float32)
    same = antialiased(noise, spacing_zyx=(4.0, 2.5, 2.5), target_zyx=(4.0, 2.5, 2.5))
    assert same is noise  # the training grid itself: untouched
    # 1 mm → 2.5 mm in-plane: σ = 0.75 voxel; white noise of 100 HU drops to about 100 / (2·√π·σ) ≈ 38 HU
    smooth = antialiased(noise, spacing_zyx=(4.0, 1.0, 1.0), target_zyx=(4.0, 2.5, 2.5))
    assert 30.0 < float(smooth[:, 8:-8, 8:-8].std()) < 45.0
    # z is not coarser: slices stay independent (no mixing along z)
    assert np.corrcoef(smooth[0].ravel(), smooth[1].ravel())[0, 1] < 0.05


def test_zoom_shows_the_anatomy_larger_or_smaller_with_labels_in_step():
    """A 20 × 40 voxel block seen through a zoom of 0.75 covers 1/0.75² of the area (0.75: larger anatomy)."""
    image = np.zeros((1, 4, 100, 160), np.float32)
    label = np.zeros((1, 4, 100, 160), np.uint8)
    image[0, :, 40:60, 60:100] = 1.0
    label[0, :, 40:60, 60:100] = 1
    case = Case("k", image, label, np.eye(4), "p", "s")
    for f, area in ((0.75, 800 / 0.75**2), (1.25, 800 / 1.25**2)):
        aug = Augment(p_scale=0, p_shift=0, zoom=(f, f * 1.0001), p_zoom=1.0)
        sampler = PatchSampler([case], patch_size=(4, 96, 128), class_weights=[0, 1], rng=np.random.default_rng(1),
                               augment=aug)
        im, lb = sampler.draw()
        assert im.shape == (1, 4, 96, 128) and lb.shape == (1, 4, 96, 128)
        assert lb[0, 0].sum() == pytest.approx(area, rel=0.05)  # nearest: whole voxels
        # the label follows the image: voxels inside the block are labelled, voxels outside are not
        assert np.array_equal(im[0] > 0.5, lb[0] > 0.5)
    with pytest.raises(Exception, match="unknown keys"):
        Augment.from_dict({"rotate": 10})
