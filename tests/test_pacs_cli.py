"""``pacsai pacs ping|search|pull|push`` run as a user would: ``python -m pacsai`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pacsai.errors import PacsError
from pacsai.pacs.cli import parse_filters

CT3 = "dcmqi_ct_seg/ct_3slice"
CT_STUDY = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"
CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsai", "pacs", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    out["PACSAI_CACHE_DIR"] = str(tmp_path / "cache")
    out["PACSAI_PACS_RETRIES"] = "0"
    return out


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacsai pacs: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_push_search_pull_on_orthanc(clean_orthanc, env, tmp_path: Path, test_data: Path):
    env |= {
        "PACSAI_PACS_URL": clean_orthanc.url,
        "PACSAI_PACS_USER": clean_orthanc.user,
        "PACSAI_PACS_PASSWORD": clean_orthanc.password,
    }
    ping = run("ping", env=env, cwd=tmp_path)
    assert ping.returncode == 0 and ping.stdout.startswith(f"ok: {clean_orthanc.url} answered in ")

    bad = tmp_path / "bad.dcm"
    data = min((test_data / CT3).glob("*.dcm")).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    push = run("push", "--no-progress", str(test_data / CT3), str(bad), env=env, cwd=tmp_path)
    assert push.returncode == 1  # something failed
    assert push.stdout.splitlines()[0] == "stored 3, already present 0, skipped 0 (not DICOM), failed 1"
    assert f"failed: {bad}: the file ends at byte" in push.stdout

    search = run("search", "--json", "--level", "series", "-f", "PatientName=JAN*", env=env, cwd=tmp_path)
    assert search.returncode == 0, search.stderr
    rows = json.loads(search.stdout)  # nothing but the JSON array on stdout
    assert [(r["StudyInstanceUID"], r["SeriesInstanceUID"], r["Modality"]) for r in rows] == [
        (CT_STUDY, CT_SERIES, "CT")
    ]
    assert rows[0]["SeriesNumber"] == 2 and rows[0]["SeriesDescription"] is None

    out = tmp_path / "out"
    pull = run("pull", "--no-progress", "--study", CT_STUDY, "--out", str(out), env=env, cwd=tmp_path)
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.strip() == f"pulled 3 instance(s) in 1 series into {out}"
    pulled = sorted((out / CT_SERIES).iterdir())
    assert {p.stem for p in pulled} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (test_data / CT3).glob("*.dcm")
    }


def test_wrong_password_is_one_line(orthanc, env, tmp_path: Path):
    env |= {"PACSAI_PACS_USER": orthanc.user, "PACSAI_PACS_PASSWORD": "wrong-pw"}
    result = run("search", "--pacs", orthanc.url, env=env, cwd=tmp_path)
    assert_one_line_error(result, "HTTP 401", "PACSAI_PACS_PASSWORD", orthanc.url)
    assert "wrong-pw" not in result.stderr + result.stdout


def test_stopped_server_is_one_line(stopped_server_url, env, tmp_path: Path):
    result = run("ping", "--pacs", stopped_server_url, env=env, cwd=tmp_path)
    assert_one_line_error(result, "connection refused", stopped_server_url)


def test_embedded_store_is_the_default(env, tmp_path: Path, test_data: Path):
    push = run(
        "push",
        "--no-progress",
        str(test_data / CT3),
        str(test_data / "dcmqi_ct_seg/LICENSE"),
        env=env,
        cwd=tmp_path,
    )
    assert push.returncode == 0, push.stderr
    assert push.stdout.strip() == "stored 3, already present 0, skipped 1 (not DICOM), failed 0"
    assert (tmp_path / "pacs" / ".dicom-file-client.db").is_file()  # file://./pacs
    table = run(
        "search", "--level", "instances", "-f", "SeriesInstanceUID=" + CT_SERIES, env=env, cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["PatientID", "Modality", "InstanceNumber", "SOPInstanceUID"]
    assert sorted(line.split()[2] for line in lines[1:]) == ["1", "2", "3"]
    bad_filter = run("search", "-f", "NoSuchKeyword=1", env=env, cwd=tmp_path)
    assert_one_line_error(bad_filter, "'NoSuchKeyword' is not a DICOM keyword")


def test_parse_filters():
    assert parse_filters(["PatientID=STS*", "StudyDate=20240101-20241231", "X=a=b"]) == {
        "PatientID": "STS*",
        "StudyDate": "20240101-20241231",
        "X": "a=b",
    }
    with pytest.raises(PacsError, match="not KEY=VALUE"):
        parse_filters(["PatientID"])
