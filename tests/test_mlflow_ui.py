"""``pacsai ui`` as a user meets it: a real MLflow server on a free loopback port, pages checked in headless Chromium.

The experiment opens on its training runs (the classic machine-learning view, not MLflow 3's GenAI overview); the
champion's version page explains why it is champion (validation table, links, model card); a taken port is an
error naming it; SIGTERM stops the server's whole process group. Screenshots go to ``$PACSAI_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pacsai import tracking
from pacsai.cohort import Cohort, CohortQuery
from tests import headless

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "PACSAI_MLFLOW_URI", "PACSAI_PSEUDONYM_KEY", "PACSAI_LOG_PHI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@contextlib.contextmanager
def _ui(folder: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``pacsai ui`` on a free port in ``folder``, serving; stopped (its group too) at the end."""
    port = _free_port()
    log = folder / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pacsai", "ui", "--port", str(port)], cwd=folder,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"pacsai ui exited early: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "pacsai ui did not serve within 120 s"
            time.sleep(0.5)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc, Linux)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = {int(c) for c in (task / "children").read_text().split()}
                todo.extend(kids - found)
                found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_busy_port_fails_naming_the_port(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pacsai", "ui", "--port", str(port)], capture_output=True,
                             text=True, timeout=120, check=False)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr
    assert "MLflow UI on" not in out.stdout  # no URL printed for a server that never ran
    assert time.monotonic() - started < 60


def test_sigterm_stops_the_whole_process_group(store):
    with _ui(store) as (proc, _, _):
        children = _descendants(proc.pid)
        assert len(children) >= 3, children  # mlflow server, uvicorn, job runner and its consumers
        proc.send_signal(signal.SIGTERM)  # to pacsai ui only, as systemd or a terminal would
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "processes of the MLflow server outlived pacsai ui"


def _cohort() -> Cohort:
    table = pd.DataFrame({
        "patient_id": ["SYN-1", "SYN-2"], "patient_name": ["A^B", "C^D"],
        "study_instance_uid": ["1.2.826.0.1.1", "1.2.826.0.1.2"],
        "series_instance_uid": ["1.2.826.0.1.1.1", "1.2.826.0.1.2.1"],
        "rtstruct_series_uid": ["1.2.826.0.1.1.2", "1.2.826.0.1.2.2"],
        "rtstruct_sop_instance_uid": ["1.2.826.0.1.1.2.1", "1.2.826.0.1.2.2.1"],
        "roi_names": [("BODY", "Heart"), ("BODY", "Heart")],
    })
    return Cohort(query=CohortQuery(structures=("BODY", "Heart")), table=table)


def _champion() -> tuple[str, str, str]:
    """A training run with its cohort and curves, a registered version with model card, validated and champion."""
    from pacsai.learning.card import model_card

    mlflow = tracking._mlflow()
    with tracking.start_run("training", experiment="demo-thorax", cohort=_cohort(), params={"lr": 0.001}) as train:
        for epoch, dice in enumerate(np.linspace(0.5, 0.93, 6)):
            mlflow.log_metric("val_dice_Heart", float(dice), step=epoch)
        mlflow.log_dict({"weights": "see model/"}, "model/info.json")
    c = tracking.client()
    c.create_registered_model("pacsai-thorax")
    mv = c.create_model_version("pacsai-thorax", source=f"runs:/{train.run_id}/model", run_id=train.run_id)
    card = model_card(name="pacsai-thorax", version=str(mv.version), run_id=train.run_id, experiment={},
                      cohort={"train": 4, "val": 1, "test": 2, "sources": ["synthetic"], "series": 7}, domain={},
                      metrics={"Heart": {"dice": 0.93, "hd95": 3.1}}, postprocess={}, train_seconds=60.0,
                      best_epoch=5)
    tracking.set_model_card("pacsai-thorax", mv.version, card)
    tags = {"pacsai.model_name": "pacsai-thorax", "pacsai.model_version": str(mv.version)}
    with tracking.start_run("validation", experiment="demo-thorax", tags=tags) as validation:
        mlflow.log_metric("dice_Heart", 0.951)
    rows = [{"structure": "Heart", "metric": "dice", "limit": "≥ 0.9", "value": 0.951, "passed": True, "reason": ""},
            {"structure": "BODY", "metric": "dice", "limit": "≥ 0.95", "value": 0.982, "passed": True, "reason": ""}]
    tracking.record_validation("pacsai-thorax", mv.version, run_id=validation.run_id, passed=True, rows=rows,
                               notebook_artifact="notebook/03_evaluate.ipynb", n_cases=2)
    tracking.set_alias("pacsai-thorax", mv.version)
    return train.experiment_id, str(mv.version), validation.run_id


def test_experiment_opens_on_training_runs_and_the_champion_explains_itself(store):
    experiment_id, version, validation_run = _champion()
    shots = headless.shots_dir(store / "shots")
    with _ui(store) as (_, port, log):
        base = f"http://127.0.0.1:{port}"
        printed = log.read_text()
        experiment_url = f"{base}/{tracking.experiment_page(experiment_id)}"
        assert f"experiment demo-thorax: {experiment_url}" in printed
        version_url = f"{base}/{tracking.model_version_page('pacsai-thorax', version)}"
        assert f"model pacsai-thorax (champion v{version}): {version_url}" in printed

        dom = headless.dump_dom(experiment_url)
        names = re.findall(r"(train demo-thorax \d{4}-\d\d-\d\d \d\d:\d\d|validate pacsai-thorax v\d+)", dom)
        assert {"validate pacsai-thorax v1"} < set(names), names  # both runs listed, by name
        assert "Detect Issues" not in dom and "Tool calls" not in dom  # not the GenAI overview
        page = headless.screenshot(experiment_url, shots / "mlflow_experiment.png")
        assert _inked(page) > 0.2

        dom = headless.dump_dom(version_url)
        assert "Validation: PASS" in dom and "Model card" in dom and "champion" in dom
        assert f"runs/{validation_run}" in dom and "03_evaluate.ipynb" in dom
        page = headless.screenshot(version_url, shots / "mlflow_champion_version.png", size=(1400, 1600))
        assert _inked(page) > 0.2

        # the validation run says which version it judged, with a link to it
        run_url = f"{base}/{tracking.run_link(validation_run, experiment_id, uri='sqlite:///x')}"
        dom = headless.dump_dom(run_url)
        assert "Validation of" in dom and f"#/models/pacsai-thorax/versions/{version}" in dom
        assert "Evaluation runs" not in dom  # the run in the machine-learning layout, not GenAI's
        headless.screenshot(run_url, shots / "mlflow_validation_run.png", size=(1400, 1100))
    run = tracking.client().get_run(validation_run)
    assert f"#/models/pacsai-thorax/versions/{version}" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["pacsai.validated_model"] == f"models:/pacsai-thorax/{version}"


def _inked(png: Path) -> float:
    """Share of pixels that are not the page background (white): a blank page scores ~0."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.int16)
    return float((pixels < 250).mean())
