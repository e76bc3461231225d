"""Faults (issue 8): a PACS that refuses one instance of a STOW, and a PACS that goes away during a cohort batch.

Real parts only: dedicated Orthanc servers (DICOMweb plugin) started here, one with a Lua
``ReceivedInstanceFilter`` that refuses one SOP instance, one that is stopped after the first report of a cohort
and restarted on the same storage; the embedded store; ``python -m pacsai`` in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from pacsai.pacs import connect
from pacsai.pacs.orthanc import OrthancServer, orthanc_available, start_orthanc
from pacsai.pacs.store import prepare_dataset

SHAPE = (16, 64, 64)  # the smallest grid pacsai.synthetic accepts: a report takes a few seconds
SPACING = (6.0, 6.0, 8.0)
USER, PASSWORD = "faults", "faults-test-pw"

REFUSE_LUA = """
-- Refuse exactly one SOP instance, as a site policy on a real PACS would (returning false = filtered out).
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SOPInstanceUID ~= '{uid}'
end
"""


@pytest.fixture(autouse=True)
def _needs_orthanc() -> None:
    reason = orthanc_available()
    if reason:
        if os.environ.get("PACSAI_REQUIRE_ORTHANC") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacsai", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, check=False)


def _env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose PACS answers fast or not at all: few retries, short timeouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    env.update({
        "PACSAI_CACHE_DIR": str(tmp_path / "cache"),
        "PACSAI_PACS_USER": USER,
        "PACSAI_PACS_PASSWORD": PASSWORD,
        "PACSAI_PACS_RETRIES": "1",
        "PACSAI_PACS_CONNECT_TIMEOUT": "2",
        "PACSAI_PACS_TIMEOUT": "20",
    })
    return env


def _held(server: OrthancServer) -> set[str]:
    """SOPInstanceUIDs the server holds, read through Orthanc's own REST API (not the code under test)."""
    with requests.Session() as session:
        session.auth = server.auth
        ids = session.get(f"{server.rest_url}/instances", timeout=10).json()
        return {session.get(f"{server.rest_url}/instances/{i}", timeout=10).json()["MainDicomTags"]
                ["SOPInstanceUID"] for i in ids}


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """A patient's CT + RTSTRUCT as Part-10 files; returns (folder, SOPInstanceUIDs in file order)."""
    from pacsai.synthetic import make_patient

    patient = make_patient(3, shape=SHAPE, spacing=SPACING, with_prior=False, with_dose=False)
    folder = tmp_path_factory.mktemp("series")
    uids = []
    for i, ds in enumerate(patient.datasets()):
        prepared = prepare_dataset(ds, name=str(i))  # adds the file meta the generator leaves out
        (folder / f"{i:03d}.dcm").write_bytes(prepared.data)
        uids.append(prepared.sop_uid)
    return folder, uids


# --- 1. STOW: one instance refused ---------------------------------------------------------------------------


def test_orthanc_refusing_one_instance_is_reported_and_a_repush_stores_only_it(series_folder, tmp_path):
    folder, uids = series_folder
    refused, refused_file = uids[5], folder / "005.dcm"
    lua = tmp_path / "refuse.lua"
    lua.write_text(REFUSE_LUA.format(uid=refused))
    work = tmp_path / "orthanc"
    server = start_orthanc(work, user=USER, password=PASSWORD, lua_scripts=[lua])
    env = _env(tmp_path)
    try:
        # What Orthanc's DICOMweb plugin (1.7) answers for a filtered-out instance: HTTP 200, the instance listed
        # as stored, nothing in FailedSOPSequence - though it keeps nothing. pacsai must not believe that.
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + refused_file.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        raw = requests.post(f"{server.url}/studies", data=body, auth=server.auth, timeout=30, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        assert raw.status_code == 200
        answer = raw.json()
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [refused]
        assert not answer.get("00081198", {}).get("Value")
        assert _held(server) == set()

        # The library: the others stored, the refused one failed with its SOPInstanceUID, its file and why.
        pacs = connect(server.url, user=USER, password=PASSWORD, cache_dir=tmp_path / "cache", retries=1)
        summary = pacs.store(folder, progress=False)
        assert sorted(summary.stored) == sorted(set(uids) - {refused})
        assert not summary.ok and len(summary.failed) == 1
        name, reason = summary.failed[0]
        assert name == str(refused_file)
        assert refused in reason and server.url in reason and "filter" in reason
        assert _held(server) == set(uids) - {refused}

        # The CLI, filter still on: the others are already there, the refused one is reported; exit 1.
        proc = _cli("pacs", "push", str(folder), "--pacs", server.url, "--no-progress", cwd=tmp_path, env=env)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stdout + proc.stderr
        assert f"stored 0, already present {len(uids) - 1}, skipped 0 (not DICOM), failed 1" in proc.stdout
        assert str(refused_file) in proc.stdout and refused in proc.stdout
    finally:
        server.stop()

    # The filter lifted (same storage, no Lua): a re-push sends and stores only the missing instance.
    server = start_orthanc(work, user=USER, password=PASSWORD)
    try:
        pacs = connect(server.url, user=USER, password=PASSWORD, cache_dir=tmp_path / "cache", retries=1)
        again = pacs.store(folder, progress=False)
        assert again.ok and again.stored == (refused,)
        assert sorted(again.already_present) == sorted(set(uids) - {refused})
        assert _held(server) == set(uids)
    finally:
        server.stop()


def test_embedded_store_refusing_one_instance_stores_the_others(series_folder, tmp_path):
    folder, uids = series_folder
    broken = tmp_path / "in"
    broken.mkdir()
    for path in sorted(folder.iterdir()):
        (broken / path.name).write_bytes(path.read_bytes())
    bad = broken / "007.dcm"
    ds = pydicom.dcmread(bad)
    del ds.SOPInstanceUID  # refused before sending: an instance without its identity cannot be stored
    ds.save_as(bad)
    url = f"file://{tmp_path / 'store'}"
    proc = _cli("pacs", "push", str(broken), "--pacs", url, "--no-progress", cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"stored {len(uids) - 1}, already present 0, skipped 0 (not DICOM), failed 1" in proc.stdout
    assert f"failed: {bad}: DICOM without SOPInstanceUID" in proc.stdout
    held = set(connect(url, cache_dir=tmp_path / "cache").search_instances()["SOPInstanceUID"])
    assert held == set(uids) - {uids[7]}


# --- 2. The PACS goes away during a cohort batch --------------------------------------------------------------


@pytest.fixture
def cohort_orthanc(tmp_path) -> Iterator[OrthancServer]:
    """A dedicated Orthanc holding SYN-00000 … SYN-00002 (tiny grids, no prior, with dose)."""
    from pacsai.synthetic import seed_pacs

    server = start_orthanc(tmp_path / "orthanc", user=USER, password=PASSWORD)
    try:
        pacs = connect(server.url, user=USER, password=PASSWORD, cache_dir=tmp_path / "seed-cache")
        seed_pacs(pacs, patients=3, seed=0, with_prior=False, progress=False, shape=SHAPE, spacing=SPACING)
        yield server
    finally:
        server.stop()


def _finished(folder: Path) -> dict[str, int]:
    """``{file name: mtime_ns}`` of a finished report folder (asserting it is one)."""
    names = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"report.ipynb", "report.html", "metrics.json"} <= set(names), names
    assert json.loads((folder / "metrics.json").read_text())["structures"]
    return names


def test_pacs_going_away_mid_cohort_fails_the_rest_cleanly_and_they_can_be_rerun(cohort_orthanc, tmp_path,
                                                                                  monkeypatch):
    from pacsai.report.batch import read_summary, run_cohort
    from pacsai.report.params import validate_parameters

    server = cohort_orthanc
    env = _env(tmp_path)
    for key, value in env.items():
        if key.startswith("PACSAI_"):
            monkeypatch.setenv(key, value)
    out = tmp_path / "reports"
    patients = ["SYN-00000", "SYN-00001", "SYN-00002"]
    seen: list[str] = []

    def pacs_goes_away(item) -> None:
        # Called as each report comes in; with one worker the next patient has not started yet.
        seen.append(item.patient_id)
        if len(seen) == 1:
            assert item.ok, item.error
            server.process.kill()  # it goes away as a crashed or unplugged server does: no goodbye
            server.process.wait(timeout=10)

    table = run_cohort([validate_parameters(patient_id=p, pacs_url=server.url) for p in patients],
                       out_root=out, workers=1, track=False, on_result=pacs_goes_away)
    assert seen == patients
    assert list(table.patient_id) == patients and list(table.ok) == [True, False, False]
    first = _finished(out / "SYN-00000")
    for row in table.iloc[1:].itertuples():
        # bounded by the short connect timeout and one retry, not a hang; the reason names the PACS and patient
        assert row.seconds < 15, row
        assert "PacsConnectionError" in row.error and server.url in row.error, row.error
        assert row.out_dir == ""
    # Nothing that could pass for a report of a failed patient; no staging folder left behind.
    assert sorted(p.name for p in out.iterdir()) == ["SYN-00000", "cohort_summary.csv"]
    summary = read_summary(out / "cohort_summary.csv")
    assert list(summary.ok) == [True, False, False] and summary.error[1] == table.error[1]

    # Still down: the CLI re-run fails the same two again, exits 1 with the hint, keeps the finished one.
    proc = _cli("report", "--rerun-failed", str(out / "cohort_summary.csv"), "--pacs", server.url, "--no-track",
                cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "2 of 3 reports failed (SYN-00001, SYN-00002)" in proc.stderr
    assert f"pacsai report --rerun-failed {out / 'cohort_summary.csv'} --pacs {server.url}" in proc.stderr
    assert list(read_summary(out / "cohort_summary.csv").ok) == [True, False, False]

    # The PACS is back (same storage, same port): only the failed ones run; the finished report is untouched.
    port = int(server.rest_url.rsplit(":", 1)[1])
    back = start_orthanc(server.workdir, user=USER, password=PASSWORD, port=port)
    try:
        proc = _cli("report", "--rerun-failed", str(out / "cohort_summary.csv"), "--pacs", back.url,
                    "--no-track", cwd=tmp_path, env=env)
    finally:
        back.stop()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    final = read_summary(out / "cohort_summary.csv")
    assert list(final.patient_id) == patients and final.ok.all()
    assert final.seconds[0] == pytest.approx(table.seconds[0])  # the finished row is carried over, not re-run
    assert _finished(out / "SYN-00000") == first
    for patient in patients[1:]:
        _finished(out / patient)
    assert sorted(p.name for p in out.iterdir()) == [*patients, "cohort_summary.csv"]


def test_rerun_failed_rejects_a_file_that_is_not_a_summary(tmp_path):
    bogus = tmp_path / "cohort_summary.csv"
    bogus.write_text("patient,status\nSYN-00000,done\n")
    env = _env(tmp_path)
    proc = _cli("report", "--rerun-failed", str(bogus), cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(bogus) in proc.stderr and "not a cohort summary" in proc.stderr
    proc = _cli("report", "--rerun-failed", str(tmp_path / "nope.csv"), cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nope.csv" in proc.stderr and "no cohort summary" in proc.stderr
