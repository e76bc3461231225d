"""Validation by papermill on the real smoke model: pass → alias champion, fail → nothing set, exit 1; no PHI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from pacsai import tracking
from pacsai.errors import ConfigError
from pacsai.learning.validate import (
    check_thresholds,
    parse_thresholds,
    split_metric,
    template_path,
    thresholds_from_experiment,
)
from tests.test_cohort import N_PATIENTS
from tests.test_learning_train import DEMO, MODEL_NAME, smoke_model


def _clear_champion() -> None:
    c = tracking.client()
    if tracking.get_alias(MODEL_NAME) is not None:
        c.delete_registered_model_alias(MODEL_NAME, tracking.CHAMPION)


def test_thresholds_parse_in_every_form():
    limits = parse_thresholds(
        ["Heart=0.85", "hd95_Heart=10", "surface_dice_GTV=0.5", "delta_dmean_Lung_L=1", "apl_Lung_L=200"]
    )
    assert limits == {
        "dice_Heart": 0.85,
        "hd95_Heart": 10.0,
        "surface_dice_GTV": 0.5,
        "abs_delta_dmean_Lung_L": 1.0,
        "apl_Lung_L": 200.0,
    }
    yaml_form = {"Lung_L": {"dice": 0.97, "hd95": 5, "delta_dmean_gy": 1.0}, "SpinalCord": {"delta_d0_03cc_gy": 2}}
    assert parse_thresholds(yaml_form) == {
        "dice_Lung_L": 0.97,
        "hd95_Lung_L": 5.0,
        "abs_delta_dmean_Lung_L": 1.0,
        "abs_delta_d0_03cc_SpinalCord": 2.0,
    }
    assert split_metric("abs_delta_d0_03cc_Spinal_Cord") == ("abs_delta_d0_03cc", "Spinal_Cord")
    for bad in (["Heart"], ["Heart=high"], ["Heart=nan"], {"Heart": {"dise": 0.9}}):
        with pytest.raises(ConfigError):
            parse_thresholds(bad)


def test_gate_checks_directions_and_explains_what_it_could_not_measure():
    limits = parse_thresholds(["Heart=0.85", "hd95_Heart=10", "delta_dmean_Heart=1", "GTV=0.5"])
    metrics = {"dice_Heart": 0.9, "hd95_Heart": 9.0, "abs_delta_dmean_Heart": 0.4, "dice_GTV": 0.6}
    assert check_thresholds(metrics, limits, outputs=["Heart", "GTV"]) == []
    worse = {"dice_Heart": 0.8, "hd95_Heart": 11.0, "abs_delta_dmean_Heart": 1.5, "dice_GTV": math.nan}
    failed = check_thresholds(worse, limits, outputs=["Heart", "GTV"], notes={"GTV": "empty pred in 1 of 1"})
    assert failed == [
        "dice_Heart = 0.8 < 0.85",
        "hd95_Heart = 11 > 10",
        "abs_delta_dmean_Heart = 1.5 > 1",
        "dice_GTV: not evaluable (empty pred in 1 of 1), needs ≥ 0.5",
    ]


def test_the_gate_covers_every_output_and_a_missed_gtv_is_never_promoted():
    outputs = ["BODY", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus", "GTV"]
    good = {f"dice_{s}": 0.99 for s in outputs} | {f"hd95_{s}": 2.0 for s in outputs}
    good |= {f"abs_delta_{m}_{s}": 0.1 for s in outputs for m in ("dmean", "d0_03cc")}
    limits = thresholds_from_experiment(yaml.safe_load(DEMO.read_text()), source=str(DEMO))
    # the demo experiment's own gate lists every structure it trains
    assert {split_metric(m)[1] for m in limits} == set(yaml.safe_load(DEMO.read_text())["structures"])
    assert check_thresholds(good, limits, outputs=outputs) == []
    assert check_thresholds(good | {"dice_GTV": 0.0}, limits, outputs=outputs) == ["dice_GTV = 0 < 0.75"]
    # the old gate: thresholds for BODY, lungs and heart only. GTV and the cord pass nothing, so the gate fails.
    old = parse_thresholds(["BODY=0.85", "Lung_L=0.85", "Lung_R=0.85", "Heart=0.85"])
    failed = check_thresholds(good | {"dice_GTV": 0.0}, old, outputs=outputs)
    assert "no threshold for GTV: the gate must cover every output" in failed
    assert "no threshold for SpinalCord: the gate must cover every output" in failed
    assert check_thresholds(good, {}, outputs=["GTV"]) == ["no threshold for GTV: the gate must cover every output"]
    assert check_thresholds(good, {})[0].startswith("no thresholds")
    # a limit on a structure the model does not output cannot be met either
    assert check_thresholds(good, {"dice_Liver": 0.9}, outputs=["Liver2"])[-1] == (
        "dice_Liver: the model does not output Liver"
    )


def test_template_comes_from_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = template_path()
    assert path == Path(tracking.__file__).parent / "templates" / "03_evaluate.ipynb"
    # the user-facing notebook in the source tree is the same file (one source, no drift)
    user_facing = Path(tracking.__file__).parents[1] / "notebooks" / "03_evaluate.ipynb"
    if user_facing.exists():
        assert user_facing.resolve() == path.resolve()
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "pacsai"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert all(
        not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"
    )  # committed without outputs


BODY_MODEL = "pacsai-body-smoke"


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """Validate through the CLI: the 7-structure smoke model against the demo gate (it fails: 2 epochs find
    BODY only), then a BODY-only smoke model against a gate covering its one output (it passes)."""
    import contextlib
    import io

    from pacsai.cli import main
    from pacsai.config import load_settings
    from pacsai.learning.train import train

    info = smoke_model(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.chdir(info["work"])
    _clear_champion()

    def validate(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["validate", *args, "--smoke", "--pacs", info["pacs_url"]])
        return code, out.getvalue()

    uri = f"models:/{MODEL_NAME}/{info['version']}"
    # thresholds stored with the model; --experiment only serves models trained before they were stored
    failed = validate(uri, "--experiment", str(DEMO))
    alias_after_fail = tracking.get_alias(MODEL_NAME)
    body = train(
        DEMO,
        pacs=info["pacs_url"],
        smoke=True,
        overrides={
            "structures": ["BODY"],
            "model.name": BODY_MODEL,
            "train.class_weights": {"background": 1, "BODY": 1},
            "postprocess": {"BODY": {"fill_holes": True, "largest_component": True}},
        },
        progress=False,
        settings=load_settings(),
    )
    body_uri = f"models:/{BODY_MODEL}/{body.version}"
    passed = validate(body_uri, "--threshold", "BODY=0.5", "--threshold", "hd95_BODY=100")
    yield {
        **info,
        "uri": uri,
        "body_uri": body_uri,
        "body_version": body.version,
        "failed": failed,
        "passed": passed,
        "alias_after_fail": alias_after_fail,
    }
    mp.undo()


def _validation_runs(c, experiment_id: str, model: str) -> list:
    return c.search_runs(
        [experiment_id],
        filter_string=f"tags.`pacsai.kind` = 'validation' and tags.`pacsai.model_name` = '{model}'",
    )


@pytest.mark.slow
def test_a_model_that_misses_structures_is_not_promoted(validated, monkeypatch):
    monkeypatch.chdir(validated["work"])
    code, out = validated["failed"]
    assert code == 1, out
    assert validated["alias_after_fail"] is None
    assert "not promoted" in out
    # the smoke model finds no GTV: the gate says so instead of scoring it 0 or skipping it
    assert "FAIL dice_GTV: not evaluable (empty pred in 1 of 1), needs ≥ 0.75" in out
    assert "FAIL abs_delta_d0_03cc_SpinalCord: not evaluable" in out
    c = tracking.client()
    (run,) = _validation_runs(c, c.get_run(validated["run_id"]).info.experiment_id, MODEL_NAME)
    assert run.data.tags["pacsai.passed"] == "false" and "pacsai.promoted" not in run.data.tags
    assert run.data.tags["pacsai.validated_model"] == validated["uri"]
    assert run.data.tags["pacsai.model_version"] == validated["version"]
    assert run.data.tags["pacsai.training_run"] == validated["run_id"]
    assert run.data.tags["mlflow.source.name"] == "03_evaluate.ipynb"  # not ipykernel_launcher.py (#18)
    assert 0.0 <= run.data.metrics["dice_BODY"] <= 1.0
    for name in ("hd95_BODY", "surface_dice_BODY", "apl_BODY"):
        assert name in run.data.metrics
    assert "dice_GTV" not in run.data.metrics  # NaN: not evaluable, never logged as a number
    # the gate's numbers on the model version
    mv = c.get_model_version(MODEL_NAME, validated["version"])
    assert mv.tags["pacsai.validation.status"] == "fail"
    assert mv.tags["pacsai.validation.run_id"] == run.info.run_id
    assert mv.tags["pacsai.validation.limit.dice_GTV"] == "≥ 0.75"
    assert mv.tags["pacsai.validation.dice_GTV"] == "not evaluable"
    assert mv.tags["pacsai.validation.limit.abs_delta_dmean_Heart"] == "≤ 1 Gy"
    assert "| GTV | dice | ≥ 0.75 | not evaluable | **FAIL** |" in mv.description
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "notebook")}
    assert arts == {f"notebook/validation-{MODEL_NAME}-v{validated['version']}.ipynb"}
    executed = json.loads(Path(c.download_artifacts(run.info.run_id, next(iter(arts)))).read_text())
    assert executed["metadata"]["papermill"]["parameters"]["model_uri"] == validated["uri"]
    assert executed["metadata"]["papermill"]["parameters"]["thresholds"]["dice_GTV"] == 0.75
    # the smoke validation evaluates exactly one held-out patient
    with tracking.using_store(tracking.tracking_uri()):
        manifest = tracking._mlflow().artifacts.load_dict(f"runs:/{run.info.run_id}/inputs/manifest.json")
    assert len(manifest["rows"]) == 1


@pytest.mark.slow
def test_a_model_meeting_a_gate_over_all_its_outputs_becomes_champion(validated, monkeypatch):
    monkeypatch.chdir(validated["work"])
    code, out = validated["passed"]
    assert code == 0, out
    assert f"passed; alias champion -> {BODY_MODEL} version {validated['body_version']}" in out
    assert tracking.get_alias(BODY_MODEL) == validated["body_version"]
    c = tracking.client()
    mv = c.get_model_version(BODY_MODEL, validated["body_version"])
    assert mv.tags["pacsai.validation.status"] == "pass"
    assert float(mv.tags["pacsai.validation.dice_BODY"]) >= 0.5
    assert "## Validation: PASS" in mv.description
    (run,) = _validation_runs(c, c.get_run(mv.run_id).info.experiment_id, BODY_MODEL)
    assert run.data.tags["pacsai.promoted"] == "champion" and run.data.tags["pacsai.thresholds_source"] == "given"


@pytest.mark.slow
def test_no_phi_anywhere_in_mlruns(validated):
    """After training and validation, the store and every artifact are free of the patients' IDs and names."""
    identifiers = []
    for k in range(N_PATIENTS):
        identifiers += [f"SYN-{k:05d}", f"SYNTHETIC^PATIENT{k}", f"SYNTHETIC PATIENT{k}"]
    mlruns = Path(validated["work"]) / "mlruns"
    files = [p for p in mlruns.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "mlflow.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for ident in identifiers:
            assert ident.encode() not in data, f"{ident} found in {path}"
