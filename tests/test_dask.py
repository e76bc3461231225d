"""Dask on loopback: training-data preprocessing on a real LocalCluster (two worker processes) gives the serial
path's cache, ``pacsai train --dask`` trains from it, and the README's ``--dask`` cohort command runs on a real
``dask scheduler`` with two ``dask worker`` processes."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_cohort import N_PATIENTS, seeded_store, store_url

pytest.importorskip("distributed", reason="Dask is not installed: `pip install -e .[dask]` (make setup installs it)")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
BIN = Path(sys.executable).parent


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _instances(cache: Path) -> set[str]:
    return {p.name for p in (cache / "instances").rglob("*.dcm")}


@pytest.mark.slow
def test_preprocessing_on_a_local_cluster_equals_the_serial_cache(tmp_path_factory, tmp_path, monkeypatch):
    from distributed import LocalCluster

    from pacsai.cohort import CohortQuery, select_cohort
    from pacsai.learning.dataset import load_cases
    from pacsai.learning.preprocess_dask import preprocess_cohort
    from pacsai.learning.train import load_experiment, preprocess_spec
    from pacsai.pacs import connect

    root = seeded_store(tmp_path_factory)
    cfg = load_experiment(DEMO, smoke=True)
    spec = preprocess_spec(cfg)
    pacs = connect(store_url(root), cache_dir=tmp_path / "serial-instances")
    cohort = select_cohort(pacs, CohortQuery.from_config(cfg["cohort"], structures=cfg["structures"]))
    assert len(cohort) == N_PATIENTS
    serial = tmp_path / "serial"
    load_cases(pacs, cohort, spec, cache_dir=serial, progress=False)

    # the workers inherit this environment: their instance cache is their own, not this process's
    worker_cache = tmp_path / "worker-cache"
    monkeypatch.setenv("PACSAI_CACHE_DIR", str(worker_cache))
    on_dask = tmp_path / "dask"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        workers = set(cluster.scheduler_info["workers"])
        started = time.perf_counter()
        done = preprocess_cohort(
            pacs.url, cohort, spec, cache_dir=on_dask, address=cluster.scheduler_address, progress=False
        )
        seconds = time.perf_counter() - started
        again = preprocess_cohort(
            pacs.url, cohort, spec, cache_dir=on_dask, address=cluster.scheduler_address, progress=False
        )
    print(f"dask preprocessing of {N_PATIENTS} series on 2 workers: {seconds:.1f} s ({done.workers})")
    assert (done.cases, done.cached, done.computed) == (N_PATIENTS, 0, N_PATIENTS)
    assert set(done.workers) <= workers and sum(done.workers.values()) == N_PATIENTS
    assert (again.cached, again.computed) == (N_PATIENTS, 0)  # nothing cached is sent again
    # the worker processes pulled the series (CT and RTSTRUCT) into their own cache, as the serial path did
    assert _instances(worker_cache) == _instances(tmp_path / "serial-instances")

    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in on_dask.iterdir()) and len(names) == N_PATIENTS  # no temp file left
    for name in names:
        a, b = _npz(serial / name), _npz(on_dask / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (name, key)


@pytest.mark.slow
def test_train_cli_with_dask_trains_from_the_cluster_made_cache(tmp_path_factory, tmp_path, monkeypatch):
    from distributed import LocalCluster

    root = seeded_store(tmp_path_factory)
    trainer_cache, worker_cache = tmp_path / "trainer-cache", tmp_path / "worker-cache"
    monkeypatch.setenv("PACSAI_CACHE_DIR", str(worker_cache))  # the worker processes take this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        proc = subprocess.run(
            [sys.executable, "-m", "pacsai", "train", str(DEMO), "--smoke", "--pacs", store_url(root),
             "--no-progress", "--dask", cluster.scheduler_address],
            cwd=tmp_path, env={**os.environ, "PACSAI_CACHE_DIR": str(trainer_cache)}, capture_output=True,
            text=True, timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # smoke split of 3 patients: one to train, one to validate (the held-out one is not preprocessed)
    assert re.search(r"preprocessed on tcp://127\.0\.0\.1:\d+: 2 series on [12] workers, 0 already cached",
                     proc.stdout), proc.stdout
    assert "models:/pacsai-thorax/1" in proc.stdout
    # training read the cases the cluster made: this process pulled no CT image, the workers did
    assert len(list((trainer_cache / "preprocessed").glob("*.npz"))) == 2
    assert len(_instances(worker_cache) - _rtstruct_instances(worker_cache)) == 2 * 16  # two CTs of 16 slices
    assert _instances(trainer_cache) == _rtstruct_instances(trainer_cache)  # cohort selection reads RTSTRUCTs


def _rtstruct_instances(cache: Path) -> set[str]:
    import pydicom

    out = set()
    for p in (cache / "instances").rglob("*.dcm"):
        if str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"]).Modality) == "RTSTRUCT":
            out.add(p.name)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _readme_dask_command() -> list[str]:
    """The README's cohort-on-Dask command line (section "Teams and scale")."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Teams and scale", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"`(pacsai report --cohort [^`]*--dask [^`]*)`", section)
    assert match, "README 'Teams and scale' no longer shows a `pacsai report --cohort ... --dask ...` command"
    return shlex.split(match.group(1))


def _wait_for_workers(address: str, n: int, timeout: float = 60.0) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.mark.slow
def test_readme_dask_cohort_command_on_a_real_scheduler_and_two_workers(tmp_path_factory, tmp_path):
    """`dask scheduler` + 2 × `dask worker --nthreads 1` on loopback; the README's command, address replaced."""
    command = _readme_dask_command()
    root = seeded_store(tmp_path_factory)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    command[command.index("--dask") + 1] = address
    assert command[0] == "pacsai"
    worker_cache = tmp_path / "worker-cache"
    env = {**os.environ, "PACSAI_PACS_URL": store_url(root), "PACSAI_CACHE_DIR": str(worker_cache),
           "OMP_NUM_THREADS": "1"}
    dask = str(BIN / "dask")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(logs / "scheduler.log", "w"))]
    try:
        for i in range(2):
            procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(logs / f"worker{i}.log", "w")))
        _wait_for_workers(address, 2)
        # No MLflow store exists yet: the two workers' first reports create it at the same moment, which
        # pacsai.tracking does under a lock (before, one of them failed in MLflow's schema set-up).
        assert not (tmp_path / "mlruns").exists()
        started = time.perf_counter()
        proc = subprocess.run([str(BIN / "pacsai"), *command[1:]], cwd=tmp_path,
                              env={**env, "PACSAI_CACHE_DIR": str(tmp_path / "client-cache")},
                              capture_output=True, text=True, timeout=400)
        seconds = time.perf_counter() - started
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"README --dask cohort of {N_PATIENTS} patients on 2 workers: {seconds:.1f} s")
    worker_logs = "".join((logs / f"worker{i}.log").read_text()[-1500:] for i in range(2))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + worker_logs
    import pandas as pd

    table = pd.read_csv(tmp_path / "reports" / "cohort_summary.csv", dtype={"patient_id": str})
    assert sorted(table.patient_id) == [f"SYN-{i:05d}" for i in range(N_PATIENTS)]
    assert table.ok.all(), table.error.tolist()
    for pid in table.patient_id:
        assert (tmp_path / "reports" / pid / "report.html").is_file()
        assert (tmp_path / "reports" / pid / "metrics.json").is_file()
    # the reports were made by the workers: they pulled the CTs, the client only searched
    assert _instances(worker_cache)
    assert not (tmp_path / "client-cache" / "instances").exists() or not _instances(tmp_path / "client-cache")
