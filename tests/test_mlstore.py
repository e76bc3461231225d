"""The embedded MLflow store survives the project folder being copied or moved (issue #14 item 7)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsai import tracking
from pacsai.mlstore import LOCATION_FILE, relocate


def _make_store(root: Path) -> tuple[str, str]:
    """A real store: one experiment with pacsai's artifact root, one run with an artifact; (run_id, uri)."""
    import mlflow

    uri = tracking.tracking_uri(root=root)
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("moving", artifact_location=tracking.artifact_location(uri) + "/moving")
    run = client.create_run(exp)
    note = root / "note.txt"
    note.write_text("written before the move\n")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return run.info.run_id, uri


def _locations(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [v for (v,) in conn.execute("SELECT artifact_uri FROM runs")] + [
            v for (v,) in conn.execute("SELECT artifact_location FROM experiments WHERE name = 'moving'")]


@pytest.mark.parametrize("with_marker", [True, False], ids=["marker", "store-made-before-the-marker"])
def test_a_moved_store_reads_and_writes_its_own_artifacts(tmp_path: Path, with_marker: bool):
    old = tmp_path / "project"
    run_id, _ = _make_store(old)
    db = old / "mlruns" / "mlflow.db"
    if with_marker:
        assert relocate(db) is None  # first use: nothing moved, the marker is written
        assert (old / "mlruns" / LOCATION_FILE).read_text().strip() == str((old / "mlruns").resolve())
    new = tmp_path / "moved"
    shutil.copytree(old, new)
    shutil.rmtree(old)  # the old folder is gone: anything still pointing there would fail

    # The moved project is used by a new process (MLflow caches a run's artifact location per process).
    script = f"""
import sys
import time
from pathlib import Path
import mlflow
from pacsai import tracking
from pacsai.mlstore import relocate
new, run_id = Path({str(new)!r}), {run_id!r}
print("OLD", relocate(new / "mlruns" / "mlflow.db"))
client = mlflow.MlflowClient(tracking.tracking_uri(root=new))
got = Path(client.download_artifacts(run_id, "note.txt", dst_path={str(tmp_path / "dl")!r}))
print("READ", got.read_text().strip())
(new / "after.txt").write_text("after")
client.log_artifact(run_id, str(new / "after.txt"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"OLD {(old / 'mlruns').resolve()}" in out.stdout
    assert "READ written before the move" in out.stdout
    assert all(str((new / "mlruns").resolve()) in loc for loc in _locations(new / "mlruns" / "mlflow.db"))
    # Writing went into the new folder, never the old one.
    assert list((new / "mlruns" / "artifacts").rglob("after.txt")) and not old.exists()
    assert relocate(new / "mlruns" / "mlflow.db") is None  # idempotent


def test_a_database_copied_without_its_artifacts_keeps_pointing_at_them(tmp_path: Path):
    """Only mlflow.db copied (e.g. a private copy of a registry for a test): its artifacts stay in the old folder,
    so the locations are not rewritten to a folder that lacks them."""
    _make_store(tmp_path / "project")
    copy = tmp_path / "registry-copy"
    copy.mkdir()
    shutil.copy(tmp_path / "project" / "mlruns" / "mlflow.db", copy / "mlflow.db")
    before = _locations(copy / "mlflow.db")
    assert relocate(copy / "mlflow.db") is None
    assert _locations(copy / "mlflow.db") == before
    assert all(str((tmp_path / "project" / "mlruns").resolve()) in location for location in before)


def test_an_unmoved_store_is_left_alone(tmp_path: Path):
    _make_store(tmp_path)
    db = tmp_path / "mlruns" / "mlflow.db"
    before = _locations(db)
    stamp = os.stat(db).st_mtime_ns
    assert relocate(db) is None
    assert _locations(db) == before and os.stat(db).st_mtime_ns == stamp


# --- pacsai.tracking prepares the embedded store: relocated when moved, created under a lock ----------------------


def _clean_env() -> dict[str, str]:
    """This environment without a configured store: the project's own mlruns/ of the working folder is used."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PACSAI_") and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _run_in(folder: Path, script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], cwd=folder, env=_clean_env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: a changed or new file shows."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_project_logs_into_its_own_folder(tmp_path: Path):
    """Copy a project with a tracked run and a registered model version; continuing that run, starting a new one
    and reading the model from the copy writes nothing in the original folder (pacsai.tracking relocates)."""
    old, new = tmp_path / "project", tmp_path / "copy"
    old.mkdir()
    first = _run_in(old, """
import mlflow
from pacsai import tracking
with tracking.start_run("training", experiment="moving", run_name="trained") as ctx:
    mlflow.log_text("weights\\n", "model/weights.txt")
c = tracking.client()
c.create_registered_model("moving-model")
run = c.get_run(ctx.run_id)
mv = c.create_model_version("moving-model", source=run.info.artifact_uri + "/model", run_id=ctx.run_id)
print("RUN", ctx.run_id, mv.version)
""")
    run_id, version = first.split("RUN ")[1].split()
    shutil.copytree(old, new)
    before = _tree(old)

    second = _run_in(new, f"""
from pathlib import Path
import mlflow
from pacsai import tracking
with tracking.start_run("training", experiment="moving", run_id={run_id!r}):
    mlflow.log_text("continued\\n", "continued.txt")
with tracking.start_run("validation", experiment="moving") as ctx:
    mlflow.log_text("new run\\n", "validation.txt")
c = tracking.client()
print("SOURCE", c.get_model_version_download_uri("moving-model", {version!r}))
got = c.download_artifacts({run_id!r}, "model/weights.txt", dst_path=str(Path("dl").resolve()))
print("READ", Path(got).read_text().strip())
""")
    assert _tree(old) == before, "the copy wrote into the original project"
    store = (new / "mlruns").resolve()
    assert f"SOURCE file://{store}/artifacts/" in second, second
    assert "READ weights" in second
    assert len(list((store / "artifacts").rglob("continued.txt"))) == 1
    assert len(list((store / "artifacts").rglob("validation.txt"))) == 1
    assert not list((old / "mlruns").rglob("continued.txt"))
    assert all(str(store) in location for location in _locations(store / "mlflow.db")), _locations(store / "mlflow.db")


RACER = """
import sys, time
from pathlib import Path
import mlflow  # imported before the start signal: the processes then reach the store together
from pacsai import tracking
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.002)
experiment = tracking.ensure_experiment("race")
print("EXPERIMENT", experiment, len(tracking.client().search_experiments()))
"""


def test_processes_creating_a_fresh_store_at_once_all_succeed(tmp_path: Path):
    """Before: two processes (e.g. Dask workers) creating the embedded store at the same moment raced in MLflow's
    schema set-up ("duplicate column name", "table alembic_version already exists") and one failed; 3 of 3 trials
    with 3 processes failed so. Now the store is created under a file lock beside it."""
    project = tmp_path / "project"
    project.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"ready{i}"), str(go)], cwd=project,
                              env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer did not start"
            time.sleep(0.02)
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = {out.split()[1] for out, _ in results}
    assert len(ids) == 1, results  # one experiment "race", found or created by each
    assert (project / "mlruns" / tracking.LOCK_FILE).is_file()
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as conn:
        assert conn.execute("SELECT count(*) FROM experiments WHERE name = 'race'").fetchone() == (1,)
