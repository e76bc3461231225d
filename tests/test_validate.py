"""Validation by papermill on the real smoke model: pass → alias champion, fail → nothing set, exit 1; no PHI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pacsai import tracking
from pacsai.errors import ConfigError
from pacsai.learning.validate import check_thresholds, parse_thresholds, template_path
from tests.test_cohort import N_PATIENTS
from tests.test_learning_train import MODEL_NAME, smoke_model


def _clear_champion() -> None:
    c = tracking.client()
    if tracking.get_alias(MODEL_NAME) is not None:
        c.delete_registered_model_alias(MODEL_NAME, tracking.CHAMPION)


def test_thresholds_parse_and_check():
    limits = parse_thresholds(["Heart=0.85", "hd95_Heart=10", "surface_dice_GTV=0.5"])
    assert limits == {"dice_Heart": 0.85, "hd95_Heart": 10.0, "surface_dice_GTV": 0.5}
    assert check_thresholds({"dice_Heart": 0.9, "hd95_Heart": 9.0, "surface_dice_GTV": 0.5}, limits) == []
    failed = check_thresholds({"dice_Heart": 0.8, "hd95_Heart": 11.0, "surface_dice_GTV": math.nan}, limits)
    assert len(failed) == 3 and failed[0].startswith("dice_Heart = 0.8000 < 0.85")
    assert check_thresholds({"dice_A": 0.1}, {}) == []
    assert check_thresholds({"dice_A": math.nan}, {}) == ["dice_A: not finite"]
    with pytest.raises(ConfigError):
        parse_thresholds(["Heart"])
    with pytest.raises(ConfigError):
        parse_thresholds(["Heart=high"])


def test_template_comes_from_the_installed_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = template_path()
    assert path == Path(tracking.PROJECT_DIR) / "notebooks" / "03_evaluate.ipynb"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "pacsai"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert all(
        not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"
    )  # committed without outputs


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """Validate the smoke model twice through the CLI: a threshold it surely fails, then one it surely passes."""
    import contextlib
    import io

    from pacsai.cli import main

    info = smoke_model(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.chdir(info["work"])
    _clear_champion()
    uri = f"models:/{MODEL_NAME}/{info['version']}"
    outcomes = []
    for threshold in ("Lung_L=1.0", "BODY=0.0"):  # Dice 1.0 exactly: never for a 2-epoch model; 0.0: always
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["validate", uri, "--smoke", "--pacs", info["pacs_url"], "--threshold", threshold])
        outcomes.append((code, out.getvalue(), tracking.get_alias(MODEL_NAME)))
    yield {**info, "uri": uri, "outcomes": outcomes}
    mp.undo()


@pytest.mark.slow
def test_validation_fails_then_passes_and_sets_champion_only_on_pass(validated, monkeypatch):
    monkeypatch.chdir(validated["work"])
    (fail_code, fail_out, alias_after_fail), (pass_code, pass_out, alias_after_pass) = validated["outcomes"]
    assert fail_code == 1, fail_out
    assert "FAIL dice_Lung_L" in fail_out and "not promoted" in fail_out
    assert alias_after_fail is None
    assert pass_code == 0, pass_out
    assert alias_after_pass == validated["version"]
    assert tracking.resolve_model(f"models:/{MODEL_NAME}@champion").run_id == validated["run_id"]

    c = tracking.client()
    runs = c.search_runs(
        [c.get_run(validated["run_id"]).info.experiment_id],
        filter_string="tags.`pacsai.kind` = 'validation'",
        order_by=["attributes.start_time ASC"],
    )
    assert len(runs) == 2
    failed, passed = runs
    assert failed.data.tags["pacsai.passed"] == "false" and "pacsai.promoted" not in failed.data.tags
    assert passed.data.tags["pacsai.passed"] == "true" and passed.data.tags["pacsai.promoted"] == "champion"
    for run in (failed, passed):
        assert run.data.tags["pacsai.model_version"] == validated["version"]
        assert run.data.tags["pacsai.training_run"] == validated["run_id"]
        for s in ("BODY", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus", "GTV"):
            assert 0.0 <= run.data.metrics[f"dice_{s}"] <= 1.0
        assert any(k.startswith("hd95_") for k in run.data.metrics)
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "notebook")}
        assert arts == {f"notebook/validation-{MODEL_NAME}-v{validated['version']}.ipynb"}
        executed = json.loads(Path(c.download_artifacts(run.info.run_id, next(iter(arts)))).read_text())
        assert executed["metadata"]["papermill"]["parameters"]["model_uri"] == validated["uri"]
    # the smoke validation evaluates exactly one held-out patient
    with tracking.using_store(tracking.tracking_uri()):
        manifest = tracking._mlflow().artifacts.load_dict(f"runs:/{passed.info.run_id}/inputs/manifest.json")
    assert len(manifest["rows"]) == 1


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
