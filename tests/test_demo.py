"""`pacsai demo --smoke`: the main job end to end (seed → train → validate → report → push), tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_smoke_runs_end_to_end(tmp_path: Path):
    env = {**os.environ, "PACSAI_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "pacsai", "demo", "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Report:" in out and "MLflow run:" in out and "Back in PACS:" in out
    report = Path(next(line.split()[-1] for line in out.splitlines() if line.startswith("Report:")))
    assert report.is_file() and report.parent.parent == (tmp_path / "reports").resolve()
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["provenance"]["model"]["name"] == "pacsai-thorax"
    assert metrics["response"]["category"] in ("CR", "PR", "SD", "PD")
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert (tmp_path / "pacs").is_dir()
