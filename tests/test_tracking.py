"""MLflow conventions on a real SQLite store in tmp_path: URIs, tags, manifests, pseudonyms, registry, UI."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from pacsai import privacy, tracking
from pacsai.cohort import Cohort, CohortQuery
from pacsai.config import load_settings
from pacsai.errors import TrackingError
from tests.test_learning_train import MODEL_NAME, smoke_model


def _cohort() -> Cohort:
    table = pd.DataFrame(
        {
            "patient_id": ["PAT-123", "PAT-456"],
            "patient_name": ["DOE^JANE", "ROE^RICHARD"],
            "study_instance_uid": ["1.2.3.1", "1.2.3.2"],
            "series_instance_uid": ["1.2.3.1.1", "1.2.3.2.1"],
            "rtstruct_series_uid": ["1.2.3.1.2", "1.2.3.2.2"],
            "rtstruct_sop_instance_uid": ["1.2.3.1.2.1", "1.2.3.2.2.1"],
            "roi_names": [("BODY",), ("BODY",)],
        }
    )
    return Cohort(query=CohortQuery(structures=("BODY",)), table=table)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "PACSAI_MLFLOW_URI", "PACSAI_PSEUDONYM_KEY", "PACSAI_LOG_PHI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_default_uri_is_sqlite_under_cwd_and_env_overrides(store, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri()) == (store / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("PACSAI_MLFLOW_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"
    assert tracking.artifact_location("http://127.0.0.1:5999") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/db.sqlite")
    assert tracking.tracking_uri() == "sqlite:////elsewhere/db.sqlite"


def test_start_run_tags_manifest_and_no_phi(store):
    cohort = _cohort()
    with tracking.start_run(
        "training", experiment="t", cohort=cohort, params={"lr": 0.1, "sizes": [1, 2]}
    ) as ctx:
        run_id = ctx.run_id
    c = tracking.client()
    run = c.get_run(run_id)
    assert run.data.tags["pacsai.kind"] == "training"
    assert run.data.tags["pacsai.cohort_hash"] == cohort.content_hash
    assert run.data.tags["pacsai.git_sha"] == tracking.git_sha()
    assert run.data.params == {"lr": "0.1", "sizes": "[1, 2]"}
    assert run.info.artifact_uri.startswith((store / "mlruns" / "artifacts").as_uri())
    mlflow = tracking._mlflow()
    with tracking.using_store(tracking.tracking_uri()):
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/inputs/manifest.json")
        logged = Cohort.from_parquet(
            mlflow.artifacts.download_artifacts(f"runs:/{run_id}/inputs/cohort.parquet")
        )
    assert (
        "MLFLOW_TRACKING_URI" not in os.environ
    )  # the store used for the run does not leak into the process
    key = tracking.pseudonym_key()
    # patients by pseudonym, UIDs by keyed hash, in the manifest and the parquet alike (rows in pseudonym order: the
    # order of the real IDs is not kept either)
    assert {r["patient"]: r["rtstruct_sop_instance_uid"] for r in manifest["rows"]} == {
        tracking.pseudonymize("PAT-123", key): privacy.hash_uid("1.2.3.1.2.1", key),
        tracking.pseudonymize("PAT-456", key): privacy.hash_uid("1.2.3.2.2.1", key),
    }
    assert "1.2.3.1" not in json.dumps(manifest)
    assert logged.pseudonymized and logged.content_hash == cohort.content_hash
    # the cohort is the run's dataset: pseudonymised rows, digest from the content hash, context = the run's kind
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cohort" and dataset_input.dataset.digest == cohort.content_hash[:20]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert "PAT-123" not in dataset_input.dataset.profile + dataset_input.dataset.schema
    assert "1.2.3.1" not in dataset_input.dataset.schema + dataset_input.dataset.profile
    # named by kind, experiment and time; the source is what started it, not the Python file
    assert re.fullmatch(r"train t \d{4}-\d\d-\d\d \d\d:\d\d", run.info.run_name)
    assert run.data.tags["mlflow.source.name"] != "ipykernel_launcher.py"
    for path in (store / "mlruns").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for ident in (b"PAT-123", b"PAT-456", b"DOE^JANE", b"ROE^RICHARD", b"DOE JANE"):
                assert ident not in data, (path, ident)


def test_identifiers_in_params_or_tags_are_refused_unless_opted_in(store, monkeypatch):
    cohort = _cohort()
    phi_params = tracking.start_run("report", experiment="t", cohort=cohort, params={"patient": "PAT-123"})
    with pytest.raises(TrackingError, match="patient identifier"), phi_params:
        pass
    phi_tags = tracking.start_run("report", experiment="t", cohort=cohort, tags={"who": "DOE^JANE"})
    with pytest.raises(TrackingError, match="patient identifier"), phi_tags:
        pass
    with pytest.raises(TrackingError, match="kind"), tracking.start_run("other", experiment="t"):
        pass
    monkeypatch.setenv("PACSAI_LOG_PHI", "true")
    with tracking.start_run("report", experiment="t", cohort=cohort, params={"patient": "PAT-123"}) as ctx:
        assert ctx.patient_label("PAT-123") == "PAT-123"
    assert tracking.client().get_run(ctx.run_id).data.tags["pacsai.log_phi"] == "true"


def test_pseudonym_key_is_created_once_with_mode_0600(store, monkeypatch):
    key = tracking.pseudonym_key()
    path = store / "mlruns" / ".pseudonym_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tracking.pseudonym_key() == key and len(key) == 64
    p = tracking.pseudonymize("SYN-00001", key)
    assert p == tracking.pseudonymize("SYN-00001", key) and p.startswith("p-") and len(p) == 18
    assert p != tracking.pseudonymize("SYN-00001", "another key")
    assert p != tracking.pseudonymize("SYN-00002", key)
    monkeypatch.setenv("PACSAI_PSEUDONYM_KEY", "configured")
    assert tracking.pseudonym_key() == "configured"
    assert load_settings().pseudonym_key.get_secret_value() == "configured"
    with pytest.raises(TrackingError):
        tracking.pseudonymize("x", "")


def test_git_sha_is_the_projects_head():
    out = subprocess.run(
        ["git", "-C", str(tracking.PROJECT_DIR), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    expected = out.stdout.strip() if out.returncode == 0 else "unknown"
    assert tracking.git_sha() == (expected or "unknown")


def test_registry_alias_and_resolution(tmp_path_factory, monkeypatch):
    info = smoke_model(tmp_path_factory)
    monkeypatch.chdir(info["work"])
    ref = tracking.resolve_model(f"models:/{MODEL_NAME}/{info['version']}")
    assert (ref.name, ref.version, ref.run_id) == (MODEL_NAME, info["version"], info["run_id"])
    tracking.set_alias(MODEL_NAME, info["version"], "candidate")
    assert tracking.get_alias(MODEL_NAME, "candidate") == info["version"]
    assert tracking.resolve_model(f"models:/{MODEL_NAME}@candidate") == ref
    assert tracking.get_alias(MODEL_NAME, "nonexistent") is None
    with pytest.raises(TrackingError, match="no-such-model"):
        tracking.resolve_model("models:/no-such-model/1")
    assert tracking.resolve_model(f"runs:/{info['run_id']}/model").run_id == info["run_id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_embedded_store(store):
    from pacsai.commands.ui import server_command

    port = _free_port()
    cmd = server_command(port=port)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"
    assert cmd[cmd.index("--default-artifact-root") + 1] == (store / "mlruns" / "artifacts").as_uri()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsai", "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                    status = answer.status
            except OSError:
                assert proc.poll() is None, "pacsai ui exited early"
                time.sleep(1)
        assert status == 200
    finally:
        os.killpg(proc.pid, 15)  # the server's own process group (uvicorn worker included)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------- validation


def _model_version(name: str = "gate-model") -> tuple[str, str, str]:
    """A registered model version (source: a run's artifact folder) and a validation run, on the real store."""
    c = tracking.client()
    with tracking.start_run("training", experiment="gate") as training:
        tracking._mlflow().log_dict({"weights": "none"}, "model/info.json")
    c.create_registered_model(name)
    mv = c.create_model_version(
        name, source=f"runs:/{training.run_id}/model", run_id=training.run_id,
        description="# Model card\nResearch use only.",
    )
    with tracking.start_run("validation", experiment="gate") as validation:
        pass
    return name, str(mv.version), validation.run_id


def test_validation_is_written_onto_the_model_version(store):
    name, version, run_id = _model_version()
    failing = [
        {"structure": "Heart", "metric": "dice", "limit": "≥ 0.94", "value": 0.951, "passed": True, "reason": ""},
        {"structure": "Heart", "metric": "abs_delta_dmean", "limit": "≤ 1 Gy", "value": 1.4, "passed": False,
         "reason": "abs_delta_dmean_Heart = 1.4 > 1"},
        {"structure": "GTV", "metric": "", "limit": "", "value": float("nan"), "passed": False,
         "reason": "no threshold for GTV: the gate must cover every output"},
    ]
    tracking.record_validation(
        name, version, run_id=run_id, passed=False, rows=failing, failures=[r["reason"] for r in failing[1:]],
        notebook_artifact="notebook/validation.ipynb", n_cases=2,
    )
    c = tracking.client()
    mv = c.get_model_version(name, version)
    assert mv.tags["pacsai.validation.status"] == "fail"
    assert mv.tags["pacsai.validation.run_id"] == run_id
    assert mv.tags["pacsai.validation.dice_Heart"] == "0.951"
    assert mv.tags["pacsai.validation.limit.dice_Heart"] == "≥ 0.94"
    assert mv.tags["pacsai.validation.abs_delta_dmean_Heart"] == "1.4"
    assert mv.tags["pacsai.validation.notebook"] == f"runs:/{run_id}/notebook/validation.ipynb"
    text = mv.description
    assert text.startswith("# Model card\nResearch use only.")  # the model card stays first
    assert "## Validation: FAIL" in text and "on 2 held-out patients" in text
    assert "| Heart | dice | ≥ 0.94 | 0.951 | pass |" in text
    assert "| Heart | abs_delta_dmean | ≤ 1 Gy | 1.4 | **FAIL** |" in text
    assert "| GTV | — | none | not evaluable | **FAIL** |" in text
    assert "- no threshold for GTV: the gate must cover every output" in text
    experiment = c.get_run(run_id).info.experiment_id
    assert f"(#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning)" in text
    assert (
        f"(#/experiments/{experiment}/runs/{run_id}/artifacts/notebook/validation.ipynb?workflowType=machine_learning)"
        in text
    )
    run = c.get_run(run_id)
    assert run.data.tags["pacsai.validated_model"] == f"models:/{name}/{version}"
    assert run.data.tags["pacsai.validation.status"] == "fail"

    # validated again, passing with other limits: the section is replaced, no tag of the first outlives it
    passing = [{"structure": "Heart", "metric": "dice", "limit": "≥ 0.9", "value": 0.951, "passed": True, "reason": ""}]
    tracking.record_validation(name, version, run_id=run_id, passed=True, rows=passing, notebook_artifact="nb.ipynb")
    mv = c.get_model_version(name, version)
    status = tracking.validation_status(name, version)
    assert status["status"] == "pass" and status["limit.dice_Heart"] == "≥ 0.9"
    assert "abs_delta_dmean_Heart" not in status and "limit.abs_delta_dmean_Heart" not in status
    assert mv.description.startswith("# Model card")
    assert mv.description.count("## Validation") == 1 and "## Validation: PASS" in mv.description
    assert "Every structure the model outputs met its limits." in mv.description


def test_run_links_for_server_and_embedded_store():
    assert (
        tracking.run_link("abc", "3", uri="sqlite:////x/mlflow.db")
        == "#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert (
        tracking.run_link("abc", "3", uri="http://mlflow:5000/", path="notebook/v.ipynb")
        == "http://mlflow:5000/#/experiments/3/runs/abc/artifacts/notebook/v.ipynb?workflowType=machine_learning"
    )


def test_run_names_by_kind_experiment_and_time():
    now = dt.datetime(2026, 12, 1, 14, 3, 59)
    name = tracking.default_run_name("training", experiment="demo-thorax", now=now)
    assert name == "train demo-thorax 2026-12-01 14:03"
    tags = {"pacsai.model_name": "pacsai-thorax", "pacsai.model_version": "3"}
    assert tracking.default_run_name("validation", experiment="x", tags=tags) == "validate pacsai-thorax v3"
    assert tracking.default_run_name("report", experiment="r", tags={"pacsai.patient": "p-0123"}) == "report p-0123"
    assert tracking.default_run_name("report", experiment="pacsai-reports", now=now) == (
        "report pacsai-reports 2026-12-01 14:03"
    )


def test_run_source_names_the_verb_or_notebook_never_the_launcher():
    launcher = ["/x/.venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "/tmp/k.json"]
    assert tracking.run_source(launcher, {"JPY_SESSION_NAME": "/home/u/notebooks/02_train.ipynb"}) == (
        "02_train.ipynb", "NOTEBOOK"
    )
    assert tracking.run_source(launcher, {}) == ("notebook (Jupyter kernel)", "NOTEBOOK")
    assert tracking.run_source(launcher, {"PACSAI_RUN_SOURCE": "03_evaluate.ipynb"}) == (
        "03_evaluate.ipynb", "NOTEBOOK"
    )
    # the verb only: the rest of a command line may name the patient or hold a password
    assert tracking.run_source([".venv/bin/pacsai", "report", "PAT-123", "--pacs", "http://u:pw@h"], {}) == (
        "pacsai report", "LOCAL"
    )
    assert tracking.run_source(["/x/pacsai/__main__.py", "-vv", "train", "exp.yaml"], {}) == ("pacsai train", "LOCAL")
    assert tracking.run_source(["/x/pytest/__main__.py", "tests/test_x.py"], {}) == ("python -m pytest", "LOCAL")


def test_start_run_hashes_uids_and_dates_in_params_and_tags(store):
    with tracking.start_run(
        "report", experiment="r", params={"study_uid": "1.2.826.0.1.3680043.8.498.1", "smoke": True},
        tags={"pacsai.patient": "p-01", "note": "prior of 20240716"},
    ) as ctx:
        got = ctx.scrub({"1.2.826.0.1.3680043.8.498.7": ["2024-07-16", "20241108", "version 0.1.0", 0.95]})
    run = tracking.client().get_run(ctx.run_id)
    key = tracking.pseudonym_key()
    assert run.data.params["study_uid"] == privacy.hash_uid("1.2.826.0.1.3680043.8.498.1", key)
    assert run.data.tags["note"] == "prior of day 0" and run.info.run_name == "report p-01"
    with tracking.start_run("validation", experiment="r", source="03_evaluate.ipynb") as named:
        pass
    tags = tracking.client().get_run(named.run_id).data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("03_evaluate.ipynb", "NOTEBOOK")
    assert got == {privacy.hash_uid("1.2.826.0.1.3680043.8.498.7", key): ["day 0", "day 115", "version 0.1.0", 0.95]}
    experiment = tracking.client().get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.CLASSIC_ML_KIND
