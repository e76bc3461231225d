"""Orthanc with its index and storage in PostgreSQL (Debian ``orthanc-postgresql``) as a PACS for pacsai.

A cohort of 20 synthetic patients is stored over STOW-RS, searched (QIDO-RS), pulled (WADO-RS) and reported
(``pacsai report --cohort``) against it; the DICOM is then found in PostgreSQL's tables, not on disk. The generic
PACS tests run against this back end too with ``PACSAI_PACS_BACKENDS=orthanc-postgres`` (tests/orthanc_fixture.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pacsai.pacs import OrthancServer, connect
from tests.postgres_fixture import PostgresServer

N = 20
SHAPE = (16, 64, 64)  # the smallest grid the generator accepts: the point is 20 patients' objects, not voxels
SPACING = (6.0, 6.0, 8.0)
SEED = 400


@pytest.mark.slow  # 20 papermill reports: ~5 min on 2 loaded cores; store + search + pull take ~45 s
def test_a_cohort_of_20_patients_is_stored_searched_pulled_and_reported(
    clean_orthanc_postgres: OrthancServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    from pacsai.synthetic import seed_pacs

    server = clean_orthanc_postgres
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "cache", retries=1)
    seconds = {}
    t = time.perf_counter()
    results = seed_pacs(pacs, patients=N, seed=SEED, with_prior=True, progress=False, shape=SHAPE, spacing=SPACING)
    seconds["store"] = time.perf_counter() - t
    assert all(r.summary.ok for r in results)
    n_objects = sum(r.objects for r in results)

    t = time.perf_counter()
    studies = pacs.search_studies(PatientID="SYN-004*")
    seconds["search"] = time.perf_counter() - t
    assert sorted(set(studies["PatientID"])) == [f"SYN-{SEED + k:05d}" for k in range(N)]
    assert len(studies) == 2 * N  # planning + prior study each

    t = time.perf_counter()
    pulled = 0
    for study_uid in studies["StudyInstanceUID"]:
        series = pacs.search_series(StudyInstanceUID=study_uid)
        for series_uid in series["SeriesInstanceUID"]:
            pulled += len(pacs.retrieve_series(study_uid, series_uid, progress=False))
    seconds["pull"] = time.perf_counter() - t
    assert pulled == n_objects

    # index and storage are PostgreSQL's: the DICOM is in its tables, Orthanc's folder holds no file of it
    assert postgres.query("orthanc", "SELECT count(*) FROM resources WHERE resourcetype = 3")[0][0] == n_objects
    assert postgres.query("orthanc", "SELECT count(*) FROM storagearea")[0][0] >= n_objects
    assert not [p for p in (server.workdir / "storage").rglob("*") if p.is_file()]

    t = time.perf_counter()
    cred = server.url.replace("http://", f"http://{server.user}:{server.password}@")
    env = {**os.environ, "PACSAI_CACHE_DIR": str(tmp_path / "cache-report")}
    proc = subprocess.run([sys.executable, "-m", "pacsai", "report", "--cohort", "-f", "PatientID=SYN-004*",
                           "--pacs", cred, "--out", str(tmp_path / "reports"), "--no-track", "--workers", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    seconds["report"] = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "reports" / "cohort_summary.csv")
    assert len(summary) == N and summary["ok"].all()
    for patient in summary["patient_id"]:
        assert (tmp_path / "reports" / str(patient) / "metrics.json").is_file()
    assert server.password not in proc.stdout + proc.stderr
    print(f"Orthanc on PostgreSQL, {N} patients / {n_objects} objects, seconds: "
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


@pytest.mark.parametrize("backend", ["orthanc-postgres"])
def test_the_pacs_fixture_offers_the_postgres_back_end(backend: str, request: pytest.FixtureRequest) -> None:
    """What ``PACSAI_PACS_BACKENDS=orthanc-postgres`` gives every PACS test: an empty Orthanc on PostgreSQL."""
    server: OrthancServer = request.getfixturevalue("clean_orthanc_postgres")
    with connect(server.url, user=server.user, password=server.password) as pacs:
        assert pacs.ping() is not None
        assert pacs.search_studies().empty
