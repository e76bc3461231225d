"""segment(): masks on the input grid exactly, from models:/...@champion (real MLflow registry, SQLite).

Geometry is checked with a model whose answer is known: a fixed "network" that thresholds the windowed input at
-500 HU, logged and registered like a trained one. Its masks must equal the thresholded input, exactly where the
training grid equals the input grid and up to the resampling where it does not, on an oblique anisotropic grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pacsai import tracking
from pacsai.imaging.geometry import affine_from, make_volume, same_grid
from pacsai.learning.dataset import PreprocessSpec
from pacsai.learning.evaluate import agreement
from tests.test_learning_train import MODEL_NAME, smoke_model


class ThresholdNet(torch.nn.Module):
    """Logits of "windowed intensity above -500 HU" (window -1000..500 → 1/3), steep enough to be a step."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(200.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x - 1.0 / 3.0)


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
    cfg = {"train": {"patch_size": [16, 32, 32], "overlap": 0.25}, "model": {"architecture": "fixed"}}
    versions = {}
    for label, spacing in (("same", (0.9, 1.3, 2.5)), ("coarse", (1.7, 2.3, 3.9))):
        spec = PreprocessSpec(
            spacing_mm=spacing, window=(-1000.0, 500.0), structures=("BODY",), margin_mm=4.0
        )
        with tracking.start_run("training", experiment="infer-test", settings=load_settings()):
            info = log_model(ThresholdNet(), spec=spec, cfg=cfg, name="threshold-test")
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
