"""Cohort reports on Dask workers whose working directory is not the client's: a relative ``--out`` and a relative
embedded store reach them as absolute paths, so the reports land where the user said (pacsai.report.batch)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_cohort import seeded_store

pytest.importorskip("distributed", reason="Dask is not installed: `pip install -e .[dask]` (make setup installs it)")


def test_relative_out_and_store_on_workers_in_another_folder(tmp_path_factory, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    from pacsai.report.batch import SUMMARY_FILE, run_cohort
    from pacsai.report.params import validate_parameters

    root = seeded_store(tmp_path_factory)
    # another depth too: the relative store path must not happen to name the store from the worker's folder
    here, elsewhere = tmp_path / "here", tmp_path / "node" / "worker"
    here.mkdir()
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("PACSAI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = os.path.relpath(root / "pacs", here)  # ../../…/pacs: a plain relative path, as `--pacs ./pacs`
    params = [validate_parameters(patient_id="SYN-00000", pacs_url=store)]
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.run(os.chdir, str(elsewhere))  # a worker started in its own folder, as `dask worker` on a node
        assert set(client.run(os.getcwd).values()) == {str(elsewhere)}
        table = run_cohort(params, out_root=Path("out"), dask_address=cluster.scheduler_address, track=False)

    assert table.ok.all(), table.error.tolist()
    report = here / "out" / "SYN-00000"
    assert table.out_dir.tolist() == [str(report)]
    assert (report / "report.html").is_file() and (report / "metrics.json").is_file()
    assert (here / "out" / SUMMARY_FILE).is_file()
    assert not (elsewhere / "out").exists() and list(elsewhere.iterdir()) == []
