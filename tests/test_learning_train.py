"""A real smoke training run: embedded PACS with synthetic patients → MONAI → MLflow (SQLite) → registry.

``smoke_model`` (also used by the inference, tracking and validation tests) trains once per test session in a
work folder under pytest's base temp folder; its MLflow store is ``<work>/mlruns``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import pytest

from tests.test_cohort import N_PATIENTS, STRUCTURES, seeded_store, store_url

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
MODEL_NAME = "pacsai-thorax"


@contextlib.contextmanager
def working_directory(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train the demo experiment with --smoke once; returns {"work", "pacs_url", "run_id", "version", ...}."""
    from pacsai.config import load_settings
    from pacsai.learning.train import train

    root = seeded_store(tmp_path_factory)
    work = root / "work"
    work.mkdir(exist_ok=True)
    record = work / "smoke-model.json"
    with open(root / ".train-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            with working_directory(work):
                result = train(
                    DEMO, pacs=store_url(root), smoke=True, progress=False, settings=load_settings()
                )
            record.write_text(
                json.dumps(
                    {
                        "run_id": result.run_id,
                        "version": result.version,
                        "model_uri": result.model_uri,
                        "best_epoch": result.best_epoch,
                        "best_val_dice": dict(result.best_val_dice),
                        "epochs": result.epochs,
                        "split": {k: list(v) for k, v in result.split.items()},
                        "checkpoint": str(result.checkpoint),
                    }
                )
            )
    return {**json.loads(record.read_text()), "work": work, "pacs_url": store_url(root), "root": root}


class _Payload:
    """What a tampered checkpoint could smuggle in: code that runs when it is unpickled."""

    def __reduce__(self):
        return (print, ("code ran",))


@pytest.fixture
def trained(tmp_path_factory, monkeypatch) -> dict:
    info = smoke_model(tmp_path_factory)
    monkeypatch.chdir(info["work"])
    return info


def test_training_run_has_tags_metrics_and_artifacts(trained):
    from pacsai import tracking

    c = tracking.client()
    run = c.get_run(trained["run_id"])
    tags = run.data.tags
    assert tags["pacsai.kind"] == "training"
    assert tags["pacsai.git_sha"] == tracking.git_sha()
    assert len(tags["pacsai.cohort_hash"]) == 64
    assert tags["pacsai.version"]
    assert tags["pacsai.model_name"] == MODEL_NAME and tags["pacsai.smoke"] == "true"
    assert tags["pacsai.model_version"] == trained["version"]
    metrics = run.data.metrics
    for name in ("train_loss", "val_dice_mean", *[f"val_dice_{s}" for s in STRUCTURES]):
        history = c.get_metric_history(trained["run_id"], name)
        assert [m.step for m in history] == [0, 1], name  # smoke: 2 epochs, validated every epoch
        assert 0.0 <= history[-1].value <= (10.0 if name == "train_loss" else 1.0)
    assert metrics["best_val_dice_mean"] == pytest.approx(
        sum(trained["best_val_dice"].values()) / len(STRUCTURES)
    )
    assert run.data.params["model.name"] == MODEL_NAME
    assert run.data.params["train.epochs"] == "2"
    artifacts = {a.path for a in c.list_artifacts(trained["run_id"])}
    assert {"inputs", "split.json", "preprocess.json", "model_card.md", "domain.json"} <= artifacts
    assert {a.path for a in c.list_artifacts(trained["run_id"], "inputs")} == {
        "inputs/manifest.json",
        "inputs/cohort.parquet",
        "inputs/instances.json",
    }
    # the artifacts live in mlruns/artifacts of the working directory, the store in mlruns/mlflow.db
    assert run.info.artifact_uri.startswith((trained["work"] / "mlruns" / "artifacts").as_uri())
    assert (trained["work"] / "mlruns" / "mlflow.db").is_file()


def test_split_and_manifest_record_uids_under_pseudonyms(trained):
    from pacsai import tracking

    mlflow = tracking._mlflow()
    with tracking.using_store(tracking.tracking_uri()):
        split = mlflow.artifacts.load_dict(f"runs:/{trained['run_id']}/split.json")
        manifest = mlflow.artifacts.load_dict(f"runs:/{trained['run_id']}/inputs/manifest.json")
        instances = mlflow.artifacts.load_dict(f"runs:/{trained['run_id']}/inputs/instances.json")
    assert sorted(len(v) for v in split["patients"].values()) == [1, 1, 1]
    assert split["patients"] == trained["split"]
    assert all(p.startswith("p-") for v in split["patients"].values() for p in v)
    assert len(manifest["rows"]) == N_PATIENTS
    series = {r["series_instance_uid"] for r in manifest["rows"]}
    assert series == {s for v in split["series"].values() for s in v}
    assert set(instances) == set(split["series"]["train"]) | set(split["series"]["val"])
    assert all(len(v) == 16 for v in instances.values())  # one UID per CT slice of the smoke grid
    # the cohort table: the same pseudonyms and hashes, the real cohort's hash, and it resolves in the PACS
    from pacsai.cohort import Cohort, resolve_cohort
    from pacsai.pacs import connect

    with tracking.using_store(tracking.tracking_uri()):
        logged = Cohort.from_parquet(
            mlflow.artifacts.download_artifacts(f"runs:/{trained['run_id']}/inputs/cohort.parquet")
        )
    assert logged.uids_hashed and set(logged.table.series_instance_uid) == series
    assert sorted(logged.patients) == sorted(p for v in split["patients"].values() for p in v)
    run = tracking.client().get_run(trained["run_id"])
    assert logged.content_hash == run.data.tags["pacsai.cohort_hash"]
    resolved = resolve_cohort(connect(trained["pacs_url"]), logged, key=tracking.pseudonym_key())
    assert resolved.content_hash == logged.content_hash and not resolved.uids_hashed


def test_model_is_registered_with_metadata_and_signature(trained):
    from pacsai import tracking

    ref = tracking.resolve_model(f"models:/{MODEL_NAME}/{trained['version']}")
    assert ref.run_id == trained["run_id"]
    assert tracking.resolve_model(f"models:/{MODEL_NAME}/latest").version >= trained["version"]
    mlflow = tracking._mlflow()
    with tracking.using_store(tracking.tracking_uri()):
        info = mlflow.models.get_model_info(ref.uri)
        reqs = Path(mlflow.artifacts.download_artifacts(f"{ref.uri}/requirements.txt")).read_text()
    meta = info.metadata["pacsai"]
    assert meta["preprocess"]["structures"] == list(STRUCTURES)
    assert meta["preprocess"]["spacing_mm"] == [8.0, 8.0, 8.0]
    assert meta["head"] == {"kind": "softmax", "contains": {"BODY": list(STRUCTURES[1:])}}
    inputs = info.signature.inputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 1, -1, -1, -1]
    # softmax head: background + one class per structure
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [
        -1,
        len(STRUCTURES) + 1,
        -1,
        -1,
        -1,
    ]
    assert "torch==" in reqs and "monai==" in reqs
    # everything segment() and the QA gate need travels with the model
    assert meta["domain"]["n_cases"] == 1 and meta["domain"]["modality"] == "CT"
    assert set(meta["domain"]["structure_volumes_cc"]) == set(STRUCTURES)
    # the held-out TTA uncertainty the gate compares a report's with (measured, never a made-up 0)
    unc = meta["domain"]["uncertainty"]
    assert unc and all(0.0 < v["median"] <= v["max"] and v["n"] >= 1 for v in unc.values())
    assert meta["experiment"]["name"] == "demo-thorax" and "thresholds" in meta["experiment"]["validation"]
    assert meta["postprocess"]["BODY"] == {"fill_holes": True, "largest_component": True, "min_component_cc": 0.0}
    assert meta["network"]["architecture"] == "UNet"
    # the model card on the version (tracking.set_model_card), as logged with the run
    with tracking.using_store(tracking.tracking_uri()):
        card = mlflow.artifacts.load_text(f"runs:/{trained['run_id']}/model_card.md")
    description = tracking.client().get_model_version(MODEL_NAME, trained["version"]).description
    assert description.startswith(card.rstrip()) and f"{MODEL_NAME} v{trained['version']}" in card


def test_registered_version_loads_without_unpickling(trained, monkeypatch):
    """No file of the stored model is a pickle, and loading works with every unpickler disabled."""
    import pickle
    import zipfile

    from pacsai import tracking
    from pacsai.learning.infer import load_model

    uri = f"models:/{MODEL_NAME}/{trained['version']}"
    mlflow = tracking._mlflow()
    with tracking.using_store(tracking.tracking_uri()):
        local = Path(mlflow.artifacts.download_artifacts(uri))
    files = [f for f in local.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"MLmodel", "model.json", "weights.npz", "model_card.md"}
    for f in files:
        assert f.suffix not in (".pkl", ".pickle", ".pt", ".pth"), f
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{f} starts like a pickle stream"
        if zipfile.is_zipfile(f):  # an .npz: numpy arrays only, no pickled members
            names = zipfile.ZipFile(f).namelist()
            assert all(n.endswith(".npy") for n in names), names

    def refuse(*args, **kwargs):
        raise AssertionError("the model store was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_model(uri)
    assert loaded.name == MODEL_NAME and loaded.version == trained["version"]
    assert loaded.run_id == trained["run_id"]
    assert loaded.card.startswith(f"# Model card: {MODEL_NAME} v{trained['version']}")
    assert "Intended use" in loaded.card and "Known limitations" in loaded.card
    assert loaded.domain["n_cases"] == 1 and loaded.postprocess["GTV"]["min_component_cc"] == 0.5
    assert loaded.experiment["validation"]["thresholds"]["GTV"]["dice"] == 0.75


def test_checkpoints_live_under_the_cache_dir_and_load_weights_only(trained, tmp_path):
    import torch

    from pacsai.config import load_settings
    from pacsai.errors import ConfigError
    from pacsai.learning.train import load_checkpoint

    checkpoint = Path(trained["checkpoint"])
    # PACSAI_CACHE_DIR (conftest: <env>/cache) / checkpoints / <run id> / best.npz; nothing beside the cache dir
    assert checkpoint.parent.name == trained["run_id"] and checkpoint.parents[1].name == "checkpoints"
    assert checkpoint.parents[2].name == Path(load_settings().cache_dir).name == "cache"
    state = load_checkpoint(checkpoint.with_name("last.pt"), torch.device("cpu"))
    assert state["run_id"] == trained["run_id"] and state["epoch"] == 1

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload()}, evil)
    with pytest.raises(ConfigError, match="safely"):
        load_checkpoint(evil, torch.device("cpu"))


def test_resume_continues_the_same_run(trained, tmp_path_factory):
    from pacsai import tracking
    from pacsai.config import load_settings
    from pacsai.learning.train import train

    checkpoint = Path(trained["checkpoint"]).with_name("last.pt")
    result = train(
        DEMO,
        pacs=trained["pacs_url"],
        smoke=True,
        overrides={"train.epochs": 3},
        resume=checkpoint,
        progress=False,
        settings=load_settings(),
    )
    assert result.run_id == trained["run_id"]
    history = tracking.client().get_metric_history(trained["run_id"], "train_loss")
    assert sorted({m.step for m in history}) == [0, 1, 2]
    assert int(result.version) > int(trained["version"])


def test_load_experiment_smoke_and_overrides():
    from pacsai.errors import ConfigError
    from pacsai.learning.train import load_experiment, parse_set

    full = load_experiment(DEMO)
    smoke = load_experiment(
        DEMO, smoke=True, overrides=parse_set(["train.epochs=1", "model.channels=[4, 8, 16]"])
    )
    assert full["train"]["epochs"] > smoke["train"]["epochs"] == 1
    assert smoke["model"]["channels"] == [4, 8, 16] and smoke["cohort"]["max_patients"] == 3
    assert full["structures"] == list(STRUCTURES)
    with pytest.raises(ConfigError, match="patch_size"):
        load_experiment(DEMO, overrides={"train.patch_size": [10, 48, 48]})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["epochs"])


def test_cli_train_smoke(trained, capsys):
    from pacsai.cli import main

    code = main(
        [
            "train",
            str(DEMO),
            "--smoke",
            "--pacs",
            trained["pacs_url"],
            "--set",
            "train.epochs=1",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"models:/{MODEL_NAME}/" in out and "validation Dice: BODY" in out


@pytest.mark.parametrize(
    "spec",
    [
        {"architecture": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        {"architecture": "SegResNet", "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
        {"architecture": "DynUNet", "filters": [4, 8, 16], "strides": [1, 2, 2]},
    ],
)
def test_networks_from_config_keep_the_input_size(spec):
    import torch

    from pacsai.learning.networks import build_network, divisor

    net = build_network(spec, in_channels=1, out_channels=3).eval()
    assert divisor(spec) == 4
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 8, 12, 16))
    assert tuple(out.shape) == (2, 3, 8, 12, 16)


def test_unknown_network_is_a_config_error():
    from pacsai.errors import ConfigError
    from pacsai.learning.networks import build_network

    with pytest.raises(ConfigError, match="VNet"):
        build_network({"architecture": "VNet"}, in_channels=1, out_channels=1)
    with pytest.raises(ConfigError, match="strides"):
        build_network(
            {"architecture": "UNet", "channels": [4, 8], "strides": [2, 2]}, in_channels=1, out_channels=1
        )


@pytest.mark.slow
def test_train_notebook_runs_with_smoke_parameters(tmp_path_factory, tmp_path, monkeypatch):
    """notebooks/02_train.ipynb, executed as CI does (papermill, kernel pacsai, smoke), in a fresh store."""
    import papermill

    from pacsai import tracking

    root = seeded_store(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "02_train.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "02_train.ipynb"),
        str(out),
        parameters={"experiment": str(DEMO), "smoke": True, "pacs_url": store_url(root)},
        kernel_name="pacsai",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    cells = json.loads(out.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # live curves, then the MLflow curves
    c = tracking.client()
    (experiment,) = [e for e in c.search_experiments() if e.name == "demo-thorax"]
    (run,) = c.search_runs([experiment.experiment_id])
    assert run.data.tags["pacsai.kind"] == "training" and run.data.tags["pacsai.smoke"] == "true"


# ---------------------------------------------------------------------------------------------------- units


def test_dice_per_channel_hand_computed():
    import numpy as np

    from pacsai.learning.train import dice_per_channel

    pred = np.zeros((3, 1, 2, 4), dtype=bool)
    ref = np.zeros_like(pred)
    pred[0, 0, 0, :3] = True  # 3 voxels
    ref[0, 0, 0, 1:] = True  # 3 voxels, 2 shared → 2·2 / 6
    pred[1, 0, 1, 0] = True  # predicted, reference empty → 0
    # channel 2: both empty → 1 by convention
    np.testing.assert_allclose(dice_per_channel(pred, ref), [4 / 6, 0.0, 1.0])


def test_head_softmax_probabilities_and_target_hand_computed():
    import torch

    from pacsai.learning.train import Head

    head = Head(kind="softmax", structures=("BODY", "Lung", "GTV"), contains={"BODY": ("Lung", "GTV")})
    assert head.channels == 4
    # one voxel, logits with softmax → classes (bg, BODY, Lung, GTV) = (0.1, 0.2, 0.3, 0.4)
    classes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = classes.log().reshape(1, 4, 1, 1, 1)
    probs = head.probabilities(logits).reshape(3)
    # BODY holds Lung and GTV: 0.2 + 0.3 + 0.4; the others are their own class
    torch.testing.assert_close(probs, torch.tensor([0.9, 0.3, 0.4]))
    # multi-label → class map, later structures win where they overlap
    label = torch.zeros(1, 3, 1, 1, 4)
    label[0, 0, 0, 0, 1:] = 1  # BODY at voxels 1..3
    label[0, 1, 0, 0, 2:] = 1  # Lung at 2..3
    label[0, 2, 0, 0, 3] = 1  # GTV at 3 (inside the lung)
    assert head.target(label).reshape(4).tolist() == [0, 1, 2, 3]
    sigmoid = Head(kind="sigmoid", structures=("A", "B"))
    assert sigmoid.channels == 2
    torch.testing.assert_close(sigmoid.probabilities(torch.zeros(1, 2, 1, 1, 1)), torch.full((1, 2, 1, 1, 1), 0.5))
    assert Head.from_dict(head.to_dict(), head.structures) == head


def test_containment_hand_computed():
    import numpy as np

    from pacsai.learning.dataset import Case
    from pacsai.learning.train import containment

    label = np.zeros((3, 1, 1, 20), dtype=np.uint8)
    label[0, ..., :18] = 1  # BODY: 0..17
    label[1, ..., 2:12] = 1  # Lung: 2..11, inside BODY
    label[2, ..., 10:20] = 1  # Tumour: 10..19, 8 of 10 voxels in BODY (80 %), 2 of 10 in the lung
    case = Case("k", np.zeros((1, 1, 1, 20), np.float32), label, np.eye(4), "p", "s")
    names = ("BODY", "Lung", "Tumour")
    assert containment([case], names) == {"BODY": ("Lung",)}
    assert containment([case], names, fraction=0.8) == {"BODY": ("Lung", "Tumour")}


def _separable_case(seed: int):
    """A 24³ case: noise around 0.2 and a bright 10³ cube (the structure) at a random place."""
    import numpy as np

    from pacsai.learning.dataset import Case

    rng = np.random.default_rng(seed)
    image = (0.2 + 0.05 * rng.standard_normal((1, 24, 24, 24))).astype(np.float32)
    label = np.zeros((1, 24, 24, 24), dtype=np.uint8)
    z, y, x = rng.integers(2, 12, size=3)
    image[0, z : z + 10, y : y + 10, x : x + 10] += 0.6
    label[0, z : z + 10, y : y + 10, x : x + 10] = 1
    return Case(f"c{seed}", image, label, np.eye(4), f"p{seed}", f"s{seed}")


def test_a_tiny_model_learns_a_separable_structure():
    """Loss falls and Dice on an unseen case rises from chance to > 0.8 within seconds."""
    import numpy as np
    import torch

    from pacsai.learning.dataset import PatchSampler
    from pacsai.learning.train import (
        build_training,
        load_experiment,
        make_head,
        make_loss,
        train_epoch,
        validate_cases,
    )

    cfg = load_experiment(
        {
            "name": "tiny",
            "structures": ["Cube"],
            "model": {"name": "tiny", "channels": [4, 8], "strides": [2], "num_res_units": 0},
            "train": {"epochs": 10, "steps_per_epoch": 5, "batch_size": 2, "patch_size": [16, 16, 16],
                      "lr": 0.01, "seed": 0},
        }
    )
    cases = [_separable_case(s) for s in range(3)]
    unseen = [_separable_case(99)]
    device = torch.device("cpu")
    head = make_head(cfg, cases)
    net, optimiser, scheduler = build_training(cfg, head, device)
    sampler = PatchSampler(cases, patch_size=(16, 16, 16), class_weights=[1, 1], rng=np.random.default_rng(0))
    loss_fn = make_loss(cfg, head)
    before = validate_cases(net, unseen, patch_size=(16, 16, 16), device=device, overlap=0.25, head=head)[0]
    losses = [
        train_epoch(net, sampler, optimiser=optimiser, scheduler=scheduler, loss_fn=loss_fn, head=head,
                    steps=5, batch_size=2, device=device)
        for _ in range(10)
    ]
    after = validate_cases(net, unseen, patch_size=(16, 16, 16), device=device, overlap=0.25, head=head)[0]
    assert losses[-1] < 0.5 * losses[0], losses
    assert after > 0.8 and after > before + 0.3, (before, after)


def test_network_init_leaves_the_global_random_state_alone():
    import torch

    from pacsai.learning.train import Head, build_training, load_experiment

    cfg = load_experiment(
        {"name": "t", "structures": ["A"], "model": {"name": "t", "channels": [4, 8], "strides": [2]},
         "train": {"patch_size": [8, 8, 8], "seed": 3}}
    )
    state = torch.random.get_rng_state()
    net_a, *_ = build_training(cfg, Head("softmax", ("A",)), torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    net_b, *_ = build_training(cfg, Head("softmax", ("A",)), torch.device("cpu"))
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same seed gives the same network


def test_model_card_states_use_cohort_domain_metrics_rules_and_limits():
    from pacsai.learning.card import model_card

    card = model_card(
        name="m",
        version="4",
        run_id="r1",
        experiment={"name": "e", "structures": ["BODY", "GTV"], "preprocess": {"spacing_mm": [2.5, 2.5, 4.0]},
                    "card": {"limitations": ["Only tested on phantoms."]}},
        cohort={"train": 20, "val": 5, "test": 5, "series": 30, "sources": ["pacsai.synthetic"]},
        domain={"n_cases": 20, "modality": "CT", "spacing_mm": {"min": [2.5, 2.5, 4.0], "max": [2.5, 2.5, 4.0]},
                "hu": {"p50": [-120.0, -80.0]},
                "structure_volumes_cc": {"GTV": {"min": 2.0, "max": 60.0, "median": 14.0, "n": 20}}},
        metrics={"BODY": {"dice": 0.995, "hd95": 1.0}, "GTV": {"dice": 0.81, "hd95": 4.2}},
        postprocess={"BODY": "largest connected component kept", "GTV": "components below 0.5 cc dropped"},
        train_seconds=240.0,
        best_epoch=29,
    )
    assert card.startswith("# Model card: m v4")
    for text in ("## Intended use", "Research only", "20 training, 5 validation, 5 held out", "pacsai.synthetic",
                 "| p50 | -120–-80 |", "| GTV | 2 | 14 | 60 |", "| GTV | 0.81 | 4.2 |",
                 "| GTV | components below 0.5 cc dropped |", "- Only tested on phantoms.", "240 s"):
        assert text in card, text
