"""The embedded MLflow store survives the project folder being copied or moved (issue #14 item 7)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
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


def test_an_unmoved_store_is_left_alone(tmp_path: Path):
    _make_store(tmp_path)
    db = tmp_path / "mlruns" / "mlflow.db"
    before = _locations(db)
    stamp = os.stat(db).st_mtime_ns
    assert relocate(db) is None
    assert _locations(db) == before and os.stat(db).st_mtime_ns == stamp
