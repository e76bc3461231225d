"""segment(): masks on the input grid exactly, from models:/...@champion (real MLflow registry, SQLite).

Geometry is checked with a model whose answer is known: a voxelwise network that thresholds the windowed input at
-500 HU, logged and registered like a trained one. Its masks must equal the thresholded input, exactly where the
training grid equals the input grid and up to the resampling where it does not, on an oblique anisotropic grid.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pacsai import tracking
from pacsai.imaging.geometry import affine_from, make_volume, same_grid
from pacsai.learning.dataset import PreprocessSpec
from pacsai.learning.evaluate import agreement
from tests.test_learning_train import MODEL_NAME, smoke_model


def threshold_net() -> torch.nn.Module:
    """A Voxelwise network (1×1×1 convolution) whose logit is "windowed intensity above -500 HU" (window
    -1000..500 → 1/3), steep enough to be a step: a model with a known answer, stored like a trained one."""
    from pacsai.learning.networks import build_network

    net = build_network({"architecture": "Voxelwise"}, in_channels=1, out_channels=1)
    with torch.no_grad():
        net.weight.fill_(200.0)
        net.bias.fill_(-200.0 / 3.0)
    return net


def _oblique_phantom() -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid of 0 HU in air (-1000 HU) on a rotated grid with spacing (0.9, 1.3, 2.5) mm."""
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = affine_from((-40.0, -35.0, -30.0), direction, (0.9, 1.3, 2.5))
    shape = (24, 60, 80)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    world = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ affine.T
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    inside = (x / 25.0) ** 2 + ((y + 5) / 18.0) ** 2 + ((z + 2) / 20.0) ** 2 <= 1.0
    return np.where(inside, 0.0, -1000.0).astype(np.float32), affine


@pytest.fixture(scope="module")
def threshold_models(tmp_path_factory):
    """Register the threshold net twice (training grid = input grid; a coarser, non-integer multiple) in a fresh store."""
    from pacsai.config import load_settings
    from pacsai.learning.train import log_model

    work = tmp_path_factory.mktemp("infer-store")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    hu, affine = _oblique_phantom()
    cfg = {"train": {"patch_size": [16, 32, 32], "overlap": 0.25}, "model": {"architecture": "Voxelwise"}}
    versions = {}
    for label, spacing in (("same", (0.9, 1.3, 2.5)), ("coarse", (1.7, 2.3, 3.9))):
        spec = PreprocessSpec(
            spacing_mm=spacing, window=(-1000.0, 500.0), structures=("BODY",), margin_mm=4.0
        )
        with tracking.start_run("training", experiment="infer-test", settings=load_settings()):
            info = log_model(threshold_net(), spec=spec, cfg=cfg, name="threshold-test")
        versions[label] = str(info.registered_model_version)
    tracking.set_alias("threshold-test", versions["same"], "champion")
    yield {"work": work, "versions": versions, "hu": hu, "affine": affine}
    mp.undo()


def test_masks_equal_the_known_answer_on_the_same_grid(threshold_models, monkeypatch):
    from pacsai.learning.infer import segment

    monkeypatch.chdir(threshold_models["work"])
    volume = make_volume(threshold_models["hu"], threshold_models["affine"])
    masks = segment(volume, model="models:/threshold-test@champion")
    assert list(masks) == ["BODY"]
    body = masks["BODY"]
    assert body.dtype == bool and body.shape == volume.shape and same_grid(body, volume, atol=0)
    np.testing.assert_array_equal(body.values, threshold_models["hu"] > -500)
    assert body.attrs["source_model"] == "models:/threshold-test@champion"


def test_segment_applies_the_growth_rule_on_the_input_grid(threshold_models, monkeypatch):
    """A model whose rule grows its structure into the tissue below -500 HU: ``segment`` grows the mask on the
    input grid from the input's own HU (here the whole air around the phantom is connected to it)."""
    import dataclasses

    from pacsai.learning.infer import load_model, segment

    monkeypatch.chdir(threshold_models["work"])
    volume = make_volume(threshold_models["hu"], threshold_models["affine"])
    loaded = load_model("models:/threshold-test@champion")
    grown = dataclasses.replace(loaded, postprocess={"BODY": {"grow_below_hu": -500.0}})
    assert segment(volume, model=grown)["BODY"].values.all()
    np.testing.assert_array_equal(segment(volume, model=loaded)["BODY"].values, threshold_models["hu"] > -500)


def test_masks_come_back_on_the_input_grid_from_a_coarser_training_grid(threshold_models, monkeypatch):
    from pacsai.learning.infer import segment

    monkeypatch.chdir(threshold_models["work"])
    volume = make_volume(threshold_models["hu"], threshold_models["affine"])
    uri = f"models:/threshold-test/{threshold_models['versions']['coarse']}"
    masks, uncertainty = segment(volume, model=uri, return_uncertainty=True)
    body = masks["BODY"]
    assert same_grid(body, volume, atol=0)
    truth = threshold_models["hu"] > -500
    a = agreement(body.values, truth, spacing_zyx=(2.5, 1.3, 0.9))
    # partial-volume error of a ~36 cc ellipsoid on a 1.7×2.3×3.9 mm grid: ~0.5 mm mean surface error
    assert a.dice > 0.95 and a.msd < 0.6
    assert a.volume_pred_cc == pytest.approx(a.volume_ref_cc, rel=0.05)
    assert a.hd95 <= 2.5  # at most one input slice
    unc = uncertainty["BODY"]
    assert same_grid(unc, volume, atol=0) and unc.dtype == np.float32
    assert float(unc.values.min()) >= 0.0 and float(unc.values.max()) <= 0.5


def test_segment_a_synthetic_ct_with_the_trained_champion(tmp_path_factory, monkeypatch):
    from pacsai.imaging import read_series
    from pacsai.learning.infer import segment
    from pacsai.pacs import connect

    info = smoke_model(tmp_path_factory)
    monkeypatch.chdir(info["work"])
    tracking.set_alias(MODEL_NAME, info["version"], "champion")
    pacs = connect(info["pacs_url"])
    ct = pacs.search_series(Modality="CT").iloc[0]
    volume = read_series(
        pacs.retrieve_series(ct["StudyInstanceUID"], ct["SeriesInstanceUID"], progress=False)
    )
    masks = segment(volume, model=f"models:/{MODEL_NAME}@champion", structures=["BODY", "Heart"])
    assert list(masks) == ["BODY", "Heart"]
    for mask in masks.values():
        assert mask.dtype == bool and same_grid(mask, volume, atol=0)
        assert mask.attrs.get("frame_of_reference_uid") == volume.attrs.get("frame_of_reference_uid")


def test_unknown_structure_or_model_is_an_error(threshold_models, monkeypatch):
    from pacsai.errors import TrackingError, VolumeError
    from pacsai.learning.infer import segment

    monkeypatch.chdir(threshold_models["work"])
    volume = make_volume(threshold_models["hu"], threshold_models["affine"])
    with pytest.raises(VolumeError, match="Heart"):
        segment(volume, model="models:/threshold-test@champion", structures=["Heart"])
    with pytest.raises(TrackingError, match="no-such"):
        segment(volume, model="models:/no-such/1")


# ---------------------------------------------------------------------------------------------------- post-processing


def test_rules_keep_the_largest_piece_fill_holes_and_drop_specks():
    from pacsai.learning.postprocess import Rule, apply_rule, parse_rules

    mask = np.zeros((3, 10, 10), dtype=bool)
    mask[:, 1:6, 1:6] = True  # 75 voxels
    mask[1, 3, 3] = False  # an enclosed hole in the middle slice
    mask[:, 8, 8] = True  # a 3-voxel column elsewhere
    mask[0, 0, 9] = True  # a single voxel
    assert apply_rule(mask, Rule(), voxel_cc=1.0) is not None
    filled = apply_rule(mask, Rule(fill_holes=True), voxel_cc=1.0)
    assert filled[1, 3, 3] and filled.sum() == mask.sum() + 1
    largest = apply_rule(mask, Rule(largest_component=True, fill_holes=True), voxel_cc=1.0)
    assert largest.sum() == 75 and not largest[:, 8, 8].any() and not largest[0, 0, 9]
    # voxels of 0.5 cc: the column is 1.5 cc (kept at 1 cc), the single voxel 0.5 cc (dropped)
    pruned = apply_rule(mask, Rule(min_component_cc=1.0), voxel_cc=0.5)
    assert pruned[:, 8, 8].all() and not pruned[0, 0, 9] and pruned.sum() == mask.sum() - 1
    # diagonal neighbours are one piece (26-connectivity)
    diagonal = np.zeros((2, 2, 2), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert apply_rule(diagonal, Rule(largest_component=True), voxel_cc=1.0).sum() == 2
    rules = parse_rules({"BODY": {"fill_holes": True}}, ["BODY", "GTV"])
    assert rules["BODY"] == Rule(fill_holes=True) and rules["GTV"] == Rule()


def test_bad_rules_are_config_errors():
    from pacsai.errors import ConfigError
    from pacsai.learning.postprocess import parse_rules

    with pytest.raises(ConfigError, match="Liver"):
        parse_rules({"Liver": {"largest_component": True}}, ["BODY"])
    with pytest.raises(ConfigError, match="biggest"):
        parse_rules({"BODY": {"biggest": True}}, ["BODY"])
    with pytest.raises(ConfigError, match="≥ 0"):
        parse_rules({"BODY": {"min_component_cc": -1}}, ["BODY"])


def test_segment_applies_the_recorded_rules(tmp_path, monkeypatch):
    """The threshold model with a largest-component rule: a speck beside the ellipsoid (inside the body crop)
    is not returned; without the rule it is."""
    from scipy import ndimage

    from pacsai.config import load_settings
    from pacsai.learning.infer import load_model, segment
    from pacsai.learning.postprocess import Rule
    from pacsai.learning.train import log_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hu, affine = _oblique_phantom()
    inside = hu > -500
    box = ndimage.find_objects(inside.astype(np.int8))[0]
    free = np.zeros_like(inside)
    free[box] = True
    free &= ~ndimage.binary_dilation(inside, iterations=3)
    speck = tuple(int(v) for v in np.argwhere(free)[0])
    hu[speck] = 0.0
    spec = PreprocessSpec(spacing_mm=(0.9, 1.3, 2.5), window=(-1000.0, 500.0), structures=("BODY",), margin_mm=4.0)
    cfg = {"train": {"patch_size": [16, 32, 32], "overlap": 0.25}, "model": {"architecture": "Voxelwise"}}
    versions = {}
    with tracking.start_run("training", experiment="rules-test", settings=load_settings()):
        for label, rules in (("plain", None), ("largest", {"BODY": Rule(largest_component=True)})):
            info = log_model(threshold_net(), spec=spec, cfg=cfg, name="rules-test", rules=rules)
            versions[label] = info.registered_model_version
    volume = make_volume(hu, affine)
    loaded = load_model(f"models:/rules-test/{versions['largest']}")
    assert loaded.postprocess["BODY"]["largest_component"] is True
    np.testing.assert_array_equal(segment(volume, model=loaded)["BODY"].values, inside)
    plain = segment(volume, model=f"models:/rules-test/{versions['plain']}")["BODY"].values
    assert plain[speck] and plain.sum() == inside.sum() + 1


def test_importing_the_networks_skips_the_iri_grammar_that_monai_would_compile():
    """MONAI imports jsonschema; pacsai's import of it first leaves out rfc3987-syntax's grammar (~1.5 s of CPU)."""
    code = ("import sys, pacsai.learning.networks, monai, jsonschema; "
            "print('rfc3987_syntax' in sys.modules, 'monai.bundle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True"]  # MONAI's bundle code (and its jsonschema) loaded all the same
