"""Team set-up: an MLflow tracking server on PostgreSQL with artifacts served through it (``--serve-artifacts``).

The real servers, started here: PostgreSQL (``tests/postgres_fixture.py``) and ``mlflow server`` on a free
loopback port. Over HTTP only: train a smoke model (registered on the server), validate it by papermill (the
gate passes → alias ``champion``), load it through the alias, and log a planning report's run. Then the leak
search reads every row of every table in the server's PostgreSQL database and every artifact file for the
patients' IDs and names.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.postgres_fixture import PostgresServer
from tests.test_cohort import N_PATIENTS, seeded_store, store_url
from tests.test_learning_train import DEMO

MODEL = "pacsai-team-body"
KEY = "team-key-3c9e1b"  # PACSAI_PSEUDONYM_KEY: a team shares one key, so pseudonyms agree across machines


@dataclass(frozen=True)
class MlflowServer:
    url: str
    artifacts: Path
    database: str
    process: subprocess.Popen[bytes]


def mlflow_server_command(backend_uri: str, artifacts: Path, port: int) -> list[str]:
    """The command line docs/team.md gives (PostgreSQL backend, artifacts proxied by the server)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
            "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


@pytest.fixture(scope="module")
def mlflow_server(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    from pacsai.pacs.orthanc import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    postgres.create_database("mlflow_team")
    # the driver named: SQLAlchemy 2.1's plain "postgresql://" means psycopg 3, psycopg2-binary is what is installed
    backend = postgres.url("mlflow_team", scheme="postgresql+psycopg2")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(mlflow_server_command(backend, root / "artifacts", port), stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # the first start creates the schema (alembic migrations)
    try:
        while True:
            with contextlib.suppress(requests.RequestException):  # refused, or slow while it migrates
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield MlflowServer(url=url, artifacts=root / "artifacts", database="mlflow_team", process=proc)
    finally:
        for sig, wait in ((2, 10), (15, 5), (9, 5)):  # SIGINT: uvicorn's quick, clean shutdown
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        log.close()


@dataclass(frozen=True)
class Team:
    server: MlflowServer
    work: Path
    pacs_url: str
    version: str
    validate: tuple[int, str]
    report: subprocess.CompletedProcess[str]
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def team(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    from pacsai.cli import main
    from pacsai.config import load_settings
    from pacsai.learning.train import train

    root = seeded_store(tmp_path_factory)
    work = tmp_path_factory.mktemp("team-work")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("PACSAI_MLFLOW_URI", mlflow_server.url)
    mp.setenv("PACSAI_PSEUDONYM_KEY", KEY)
    seconds = {}
    t = time.perf_counter()
    result = train(DEMO, pacs=store_url(root), smoke=True, progress=False, settings=load_settings(), overrides={
        "structures": ["BODY"], "model.name": MODEL, "train.class_weights": {"background": 1, "BODY": 1},
        "postprocess": {"BODY": {"fill_holes": True, "largest_component": True}},
    })
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", f"models:/{MODEL}/{result.version}", "--threshold", "BODY=0.5", "--threshold",
                     "hd95_BODY=100", "--smoke", "--pacs", store_url(root)])
    seconds["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    env = {**os.environ, "PACSAI_MLFLOW_URI": mlflow_server.url, "PACSAI_PSEUDONYM_KEY": KEY}
    report = subprocess.run([sys.executable, "-m", "pacsai", "report", "SYN-00000", "--pacs", store_url(root),
                             "--out", str(work / "report")], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    seconds["report"] = time.perf_counter() - t
    try:
        yield Team(server=mlflow_server, work=work, pacs_url=store_url(root), version=str(result.version),
                   validate=(code, out.getvalue()), report=report, seconds=seconds)
    finally:
        mp.undo()


pytestmark = pytest.mark.slow  # one smoke training, a papermill validation and a report: ~2 min on 2 loaded cores


def test_train_validate_promote_and_load_through_the_alias_over_http(
    team: Team, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacsai import tracking
    from pacsai.learning.infer import load_model

    monkeypatch.setenv("PACSAI_MLFLOW_URI", team.server.url)
    code, out = team.validate
    assert code == 0, out
    assert f"passed; alias champion -> {MODEL} version {team.version}" in out
    assert tracking.tracking_uri() == team.server.url
    assert tracking.get_alias(MODEL) == team.version
    model = load_model(f"models:/{MODEL}@champion", device="cpu")  # registry + artifacts, both over HTTP
    assert model.version == team.version and model.spec.structures == ("BODY",)
    c = tracking.client()
    mv = c.get_model_version(MODEL, team.version)
    assert mv.tags["pacsai.validation.status"] == "pass"
    # the artifacts went through the server into its artifact destination, not into a local mlruns/
    assert any(team.server.artifacts.rglob("*.npz")) and any(team.server.artifacts.rglob("*.ipynb"))
    assert not (team.work / "mlruns" / "mlflow.db").exists()
    # the registry lives in PostgreSQL
    aliases = postgres.query(team.server.database, "SELECT name, alias, version FROM registered_model_aliases")
    assert (MODEL, "champion", int(team.version)) in aliases
    # the team's UI is the server's own: it answers, and pacsai's links point into it
    from pacsai.commands.ui import ui_links

    assert requests.get(team.server.url, timeout=30).status_code == 200
    links = ui_links(team.server.url)
    assert any(line.startswith(f"  model {MODEL} (champion v{team.version}): {team.server.url}/") for line in links)
    print(f"team MLflow timings (s): {team.seconds}")


def test_a_report_logs_its_run_on_the_server(team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacsai import tracking

    assert team.report.returncode == 0, team.report.stderr[-3000:]
    monkeypatch.setenv("PACSAI_MLFLOW_URI", team.server.url)
    c = tracking.client()
    exp = c.get_experiment_by_name("pacsai-reports")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.data.tags["pacsai.patient"] == tracking.pseudonymize("SYN-00000", KEY)
    logged = [a.path for a in c.list_artifacts(run.info.run_id, "report")]
    assert "report/metrics.json" in logged, logged  # through the server into its artifact destination
    assert list(team.server.artifacts.rglob("metrics.json"))


def test_no_patient_identifier_in_the_servers_database_or_artifacts(team: Team, postgres: PostgresServer) -> None:
    identifiers = []
    for k in range(N_PATIENTS):
        identifiers += [f"SYN-{k:05d}", f"SYNTHETIC^PATIENT{k}", f"SYNTHETIC PATIENT{k}"]
    text = postgres.dump_text(team.server.database)
    # the search is meaningful: runs, params, tags and the registry are in those tables
    assert "pacsai.patient" in text and MODEL in text and "dice_BODY" in text
    assert [i for i in identifiers if i in text] == []
    files = [p for p in team.server.artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "split.json" for p in files) and any(p.suffix == ".ipynb" for p in files)
    leaks = [(str(p), i) for p in files for i in identifiers if i.encode() in p.read_bytes()]
    assert leaks == []
