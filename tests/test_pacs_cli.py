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
from pacsai.commands.pacs import parse_filters

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
    license_file = test_data / "dcmqi_ct_seg/LICENSE"
    # Refused by name (README: "files that are not valid DICOM are refused by name").
    assert push.stdout.strip().splitlines() == [
        "stored 3, already present 0, skipped 1 (not DICOM), failed 0",
        f"  skipped (not DICOM): {license_file}",
    ]
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


def _seeded_store(folder: Path) -> Path:
    """An embedded store with one small CT instance carrying study and series descriptions."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pacsai.pacs import connect

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "CLI-1", "CLI^ONE", "CT"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", "AXIAL 1MM"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    summary = connect(str(folder), cache_dir=folder.parent / "seed-cache").store([ds], progress=False)
    assert summary.ok and len(summary.stored) == 1, summary
    return folder


def test_search_into_a_closed_pipe_is_quiet(env, tmp_path: Path):
    # `pacsai pacs search | head -1`: the reader goes away; exit 141 (128 + SIGPIPE) like a Unix tool, no
    # "internal error: BrokenPipeError". The read end is closed before the search writes, so it always breaks.
    store = _seeded_store(tmp_path / "store")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pacsai", "pacs", "search", "--pacs", str(store)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_search_piped_into_head_in_a_shell(env, tmp_path: Path):
    store = _seeded_store(tmp_path / "store")
    shell = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m pacsai pacs search --pacs {store} | head -1; "
         "echo \"status ${PIPESTATUS[0]}\""],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )
    assert shell.stdout.splitlines()[0].split()[:2] == ["PatientID", "PatientName"]
    assert shell.stdout.splitlines()[-1] in ("status 0", "status 141")  # 0 when it all fit before head left
    assert "internal error" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_a_store_that_does_not_exist_is_an_error_naming_it(env, tmp_path: Path):
    typo = tmp_path / "typo"
    for verb in (["search"], ["ping"], ["pull", "--study", "1.2.3", "--out", str(tmp_path / "out")]):
        result = run(*verb, "--pacs", f"file://{typo}", env=env, cwd=tmp_path)
        assert_one_line_error(result, f"no embedded store at {typo}", "pacsai pacs push")
    assert not typo.exists()  # nothing created by reading
    push = run("push", "--no-progress", "--pacs", f"file://{typo}", str(tmp_path), env=env, cwd=tmp_path)
    assert push.returncode == 0, push.stderr  # storing creates it (nothing to store here)
    assert typo.is_dir()


def test_plain_folder_path_and_descriptions(env, tmp_path: Path):
    _seeded_store(tmp_path / "pacs-here")
    result = run("search", "--json", "--level", "series", "--pacs", "./pacs-here", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["PatientID"], r["SeriesDescription"]) for r in rows] == [("CLI-1", "AXIAL 1MM")]
    studies = json.loads(run("search", "--json", "--pacs", "pacs-here", env=env, cwd=tmp_path).stdout)
    assert [s["StudyDescription"] for s in studies] == ["CT CHEST"]


def test_every_verb_and_option_is_described():
    import argparse

    from pacsai.commands.pacs import register

    top = argparse.ArgumentParser(prog="pacsai")
    register(top.add_subparsers(dest="verb"))
    pacs = top._subparsers._group_actions[0].choices["pacs"]  # type: ignore[union-attr]
    verbs = pacs._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(verbs) == {"ping", "search", "pull", "push"}
    for name, parser in verbs.items():
        assert parser.description and len(parser.description) > 40, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = verbs["search"].format_help()
    assert "--level {studies,series,instances}" in text
    assert "(default: studies)" in " ".join(text.split())
    assert "(default: None)" in " ".join(text.split())  # --pacs: the help says what None means


def test_search_help_from_the_command_line(env, tmp_path: Path):
    result = run("search", "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Search the PACS and print a table" in text and "(default: studies)" in text
