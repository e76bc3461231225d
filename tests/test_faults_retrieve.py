"""Retrieval fault tolerance (issue 8): a real misbehaving HTTP proxy (tests/faultproxy.py) between pacsai and
a real Orthanc, on loopback, serving a real 40-slice MR series (12 MB).

503/429 answers and dropped connections are retried with backoff; bodies cut or reset midway resume with only
the missing instances; a link that keeps failing ends in one clear error naming the series, the study and how
many instances arrived, with nothing partial in the cache or the output folder; a server that stops answering
ends in PacsTimeoutError within a bounded time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from pacsai.errors import PacsConnectionError, PacsTimeoutError, RetrieveError
from pacsai.pacs import DicomWebPacs, OrthancServer, Pacs, connect
from pacsai.pacs.transport import HttpOptions, build_session
from pacsai.pacs.wado import INSTANCE_FETCHERS
from tests.faultproxy import FaultProxy

MR = "tcia_sts001_mr_t2_rtstruct/mr_t2"
SERIES_GET = r"/series/[\d.]+$"  # WADO-RS of a whole series
INSTANCE_GET = r"/instances/[\d.]+$"  # WADO-RS of one instance
LISTING = r"/instances\?"  # QIDO of a series' instances


@dataclass(frozen=True)
class Series:
    study: str
    uid: str
    files: dict[str, bytes]  # SOPInstanceUID -> the original file's bytes

    def part(self, n: float) -> int:
        """Body bytes up to ``n`` parts into the multipart answer (parts are 297 kB ± 4 bytes, framing adds
        ~150 bytes each, so a fraction of .5 lands well inside a part)."""
        mean = sum(len(b) for b in self.files.values()) / len(self.files)
        return int(n * mean)


@pytest.fixture(scope="module")
def mr_files(test_data: Path) -> dict[str, bytes]:
    return {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path.read_bytes()
        for path in sorted((test_data / MR).glob("*.dcm"))
    }


@pytest.fixture
def series(orthanc: OrthancServer, test_data: Path, mr_files: dict[str, bytes], tmp_path: Path) -> Series:
    """The MR series on the session's Orthanc (stored once; other test modules may clear Orthanc)."""
    direct = connect(orthanc.url, user=orthanc.user, password=orthanc.password, cache_dir=tmp_path / "direct")
    with direct:
        found = direct.search_series(Modality="MR")
        if found.empty or int(found.NumberOfSeriesRelatedInstances.iloc[0]) != len(mr_files):
            orthanc.clear()
            assert direct.store(test_data / MR, progress=False).ok
            found = direct.search_series(Modality="MR")
        row = found.iloc[0]
    return Series(str(row.StudyInstanceUID), str(row.SeriesInstanceUID), mr_files)


@pytest.fixture
def fault_proxy(orthanc: OrthancServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's Orthanc, with an empty fault plan."""
    with FaultProxy(orthanc.url) as proxy:
        yield proxy


def through(
    proxy: FaultProxy,
    orthanc: OrthancServer,
    cache: Path,
    *,
    retries: int = 3,
    timeout: float = 10.0,
    backoff: float = 0.01,
    retry_after_max: float = 60.0,
) -> Pacs:
    """A connection to Orthanc through ``proxy``, with a small backoff so that retries cost milliseconds."""
    pacs = connect(proxy.url, user=orthanc.user, password=orthanc.password, cache_dir=cache)
    assert isinstance(pacs, DicomWebPacs)
    pacs.session.close()
    options = HttpOptions(
        timeout=timeout,
        connect_timeout=min(timeout, 5.0),
        retries=retries,
        backoff=backoff,
        retry_after_max=retry_after_max,
    )
    pacs.session = build_session(
        user=orthanc.user, password=orthanc.password, token=None, verify=True, ca_bundle=None, options=options
    )
    return pacs


def instance_gets(proxy: FaultProxy) -> list[str]:
    """SOPInstanceUIDs of the per-instance GETs the proxy saw, in order."""
    return [e.path.rsplit("/", 1)[1] for e in proxy.requests if re.search(INSTANCE_GET, e.path)]


def assert_cache_sound(pacs: Pacs, series: Series) -> list[Path]:
    """Nothing half-written: no temporary left, every cached file parses and equals its original byte for
    byte, and a manifest (if any) matches the files' sizes. Returns the cached files."""
    tmp = pacs.cache.tmp_dir
    assert not tmp.exists() or list(tmp.iterdir()) == []
    files = sorted((pacs.cache.root / "instances").rglob("*"))
    files = [f for f in files if f.is_file()]
    for path in files:
        assert path.suffix == ".dcm" and path.stem in series.files, path
        assert str(pydicom.dcmread(path).SOPInstanceUID) == path.stem
        assert path.read_bytes() == series.files[path.stem]
    manifest = pacs.cache.read_manifest(series.uid)
    if manifest is not None:
        assert {uid: pacs.cache.path_for(uid).stat().st_size for uid in manifest.instances} == dict(
            manifest.instances
        )
    return files


def assert_complete(paths: list[Path], series: Series) -> None:
    assert sorted(p.stem for p in paths) == sorted(series.files)
    assert all(p.read_bytes() == series.files[p.stem] for p in paths)


# -- retried answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "times"),
    [(503, None, 2), (429, "1", 1), (503, "0", 3)],
    ids=["503x2", "429-retry-after-1", "503x3-retry-after-0"],
)
def test_busy_answers_are_retried(fault_proxy, orthanc, series, tmp_path, status, retry_after, times):
    rule = fault_proxy.respond(status, retry_after=retry_after, times=times, path=SERIES_GET)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", backoff=0.05)
    start = time.perf_counter()
    paths = pacs.retrieve_series(series.study, series.uid, progress=False)
    elapsed = time.perf_counter() - start
    assert_complete(paths, series)
    assert rule.hits == times
    answers = [e.status for e in fault_proxy.requests if re.search(SERIES_GET, e.path)]
    assert answers == [status] * times + [200]
    assert instance_gets(fault_proxy) == []  # one whole-series transfer, nothing fetched twice
    if retry_after == "1":
        assert elapsed >= 1.0  # the server's Retry-After was obeyed
    else:
        # urllib3's backoff: none before the first retry, then 0.05 * 2**(n-1)
        assert elapsed >= sum(0.05 * 2 ** (n - 1) for n in range(2, times + 1))
    assert_cache_sound(pacs, series)


def test_retry_after_is_capped(fault_proxy, orthanc, series, tmp_path):
    fault_proxy.respond(503, retry_after="3600", path=SERIES_GET)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retry_after_max=0.2)
    start = time.perf_counter()
    assert_complete(pacs.retrieve_series(series.study, series.uid, progress=False), series)
    assert 0.2 <= time.perf_counter() - start < 15  # waited the cap, not an hour


def test_connection_closed_before_the_answer_is_retried(fault_proxy, orthanc, series, tmp_path):
    rule = fault_proxy.cut(after_bytes=None, times=2, path=SERIES_GET)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache")
    assert_complete(pacs.retrieve_series(series.study, series.uid, progress=False), series)
    assert rule.hits == 2
    assert [e.fault for e in fault_proxy.requests if re.search(SERIES_GET, e.path)] == ["cut", "cut", None]


# -- bodies broken midway ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "framing"),
    [("cut", "mirror"), ("reset", "mirror"), ("cut", "length"), ("cut", "chunked")],
    ids=["fin-close-delimited", "rst-close-delimited", "fin-content-length", "fin-chunked"],
)
def test_body_cut_mid_part_resumes_with_the_missing_instances_only(
    fault_proxy, orthanc, series, tmp_path, caplog, how, framing
):
    fault_proxy.framing = framing  # "mirror": Orthanc's own close-delimited multipart answer
    fault_proxy.cut(after_bytes=series.part(25.5), reset=how == "reset", path=SERIES_GET)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache")
    caplog.set_level("INFO", logger="pacsai.pacs.retrieve")
    paths = pacs.retrieve_series(series.study, series.uid, progress=False)
    assert_complete(paths, series)
    assert_cache_sound(pacs, series)
    assert not pacs.cache.is_partial(series.uid)

    assert fault_proxy.count(path=SERIES_GET) == 1
    assert fault_proxy.count(path=LISTING) == 1
    again = instance_gets(fault_proxy)
    assert len(again) == len(set(again)) == 40 - 25  # exactly those that had not arrived whole, once each

    # Each instance counted once (the count that also drives the progress bar; the bar is checked in the CLI
    # test, where tqdm can be told to draw every update).
    assert f"series {series.uid}: 40 instance(s) fetched from {pacs.url}, 0 already cached" in caplog.messages


def test_link_that_keeps_cutting_fails_clearly_then_resumes(fault_proxy, orthanc, series, tmp_path):
    fault_proxy.cut(after_bytes=series.part(25.5), path=SERIES_GET, times=None)
    fault_proxy.cut(after_bytes=1000, path=INSTANCE_GET, times=None)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retries=2)
    with pytest.raises(PacsConnectionError) as info:
        pacs.retrieve_series(series.study, series.uid, progress=False)
    message = str(info.value)
    assert not isinstance(info.value, PacsTimeoutError)
    assert f"series {series.uid} of study {series.study}: 25 of 40 instances arrived" in message
    assert "calling again fetches only the rest" in message and fault_proxy.url in message
    # Each fetcher tried its first missing instance 1 + 2 times (retries=2), then the retrieval gave up.
    tried = instance_gets(fault_proxy)
    assert 1 <= len(set(tried)) <= INSTANCE_FETCHERS
    assert all(tried.count(uid) == 3 for uid in set(tried))
    assert len(assert_cache_sound(pacs, series)) == 25
    assert pacs.cache.is_partial(series.uid) and pacs.cache.read_manifest(series.uid) is None

    fault_proxy.clear()
    fault_proxy.reset_log()
    paths = pacs.retrieve_series(series.study, series.uid, progress=False)
    assert_complete(paths, series)
    assert fault_proxy.count(path=SERIES_GET) == 0  # no whole-series transfer: only the 15 missing
    assert len(instance_gets(fault_proxy)) == len(set(instance_gets(fault_proxy))) == 15
    assert_cache_sound(pacs, series)


def test_resume_after_a_few_instances_never_fetches_the_cached_ones_again(fault_proxy, orthanc, series, tmp_path):
    # Most of the series is missing here (30 of 40): still, only those 30 are asked for, never the whole series.
    fault_proxy.cut(after_bytes=series.part(10.5), path=SERIES_GET, times=None)
    fault_proxy.cut(after_bytes=1000, path=INSTANCE_GET, times=None)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retries=1)
    with pytest.raises(PacsConnectionError, match="10 of 40 instances arrived"):
        pacs.retrieve_series(series.study, series.uid, progress=False)
    fault_proxy.clear()
    fault_proxy.reset_log()
    paths = pacs.retrieve_series(series.study, series.uid, progress=False)
    assert_complete(paths, series)
    assert fault_proxy.count(path=SERIES_GET) == 0
    again = instance_gets(fault_proxy)
    assert len(again) == len(set(again)) == 30
    assert_cache_sound(pacs, series)


def test_flaky_link_finishes_when_each_failure_is_followed_by_progress(
    fault_proxy, orthanc, series, tmp_path, monkeypatch
):
    # One fetcher, so that the order of the per-instance requests (and so which ones fail) is known.
    monkeypatch.setattr("pacsai.pacs.wado.INSTANCE_FETCHERS", 1)
    fault_proxy.cut(after_bytes=series.part(10.5), path=SERIES_GET)
    # The 1st and the 4th per-instance answers are reset (the 2nd rule lets 2 requests pass, then fires):
    # two failures, but never two in a row, so retries=1 is enough because progress starts the count afresh.
    first = fault_proxy.cut(after_bytes=5000, reset=True, path=INSTANCE_GET)
    fourth = fault_proxy.cut(after_bytes=5000, reset=True, path=INSTANCE_GET, skip=2)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retries=1)
    paths = pacs.retrieve_series(series.study, series.uid, progress=False)
    assert_complete(paths, series)
    assert first.hits == fourth.hits == 1
    tried = instance_gets(fault_proxy)
    assert len(tried) == 32 and len(set(tried)) == 30  # 30 missing, 2 of them asked twice
    assert tried[0] == tried[1] and tried[3] == tried[4]
    assert_cache_sound(pacs, series)


def test_refuse_everything(fault_proxy, orthanc, series, tmp_path):
    fault_proxy.respond(503, times=None)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retries=2)
    where = re.escape(f"series {series.uid} of study {series.study}: 0 instances arrived")
    with pytest.raises(RetrieveError, match=f"answered HTTP 503 .*{where}"):
        pacs.retrieve_series(series.study, series.uid, progress=False)
    assert len(fault_proxy.requests) == 3  # the first request, retried twice, and nothing after it
    assert assert_cache_sound(pacs, series) == []


# -- a server that stops answering -------------------------------------------------------------------------


def test_server_that_never_answers_times_out_quickly(fault_proxy, orthanc, series, tmp_path):
    fault_proxy.hang(times=None)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", retries=4, timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(PacsTimeoutError) as info:
        pacs.retrieve_series(series.study, series.uid, progress=False)
    elapsed = time.perf_counter() - start
    # A read timeout is retried once, whatever `retries` says: 2 x 0.5 s, not 5 x 0.5 s.
    assert len(fault_proxy.requests) == 2
    assert 1.0 <= elapsed < 8  # ~2 timeouts; the bound only catches retries x timeout
    message = str(info.value)
    assert fault_proxy.url in message and "PACSAI_PACS_TIMEOUT" in message and series.uid in message


def test_stall_mid_body_resumes_then_persistent_stall_times_out(fault_proxy, orthanc, series, tmp_path):
    fault_proxy.hang(after_bytes=series.part(25.5), path=SERIES_GET)
    pacs = through(fault_proxy, orthanc, tmp_path / "cache", timeout=0.5)
    start = time.perf_counter()
    assert_complete(pacs.retrieve_series(series.study, series.uid, progress=False), series)
    assert time.perf_counter() - start < 10
    assert len(instance_gets(fault_proxy)) == 15

    fault_proxy.reset_log()
    fault_proxy.hang(after_bytes=series.part(25.5), path=SERIES_GET, times=None)
    fault_proxy.hang(after_bytes=1000, path=INSTANCE_GET, times=None)
    other = through(fault_proxy, orthanc, tmp_path / "cache2", retries=4, timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(PacsTimeoutError) as info:
        other.retrieve_series(series.study, series.uid, progress=False)
    elapsed = time.perf_counter() - start
    # The series stream stalls (0.5 s), then each fetcher's first missing instance stalls twice (1 + 1 retry),
    # the fetchers side by side: about 1.5 s in all, whatever retries says.
    tried = instance_gets(fault_proxy)
    assert 1 <= len(set(tried)) <= INSTANCE_FETCHERS
    assert all(tried.count(uid) == 2 for uid in set(tried))
    assert 1.5 <= elapsed < 10
    message = str(info.value)
    assert "PACSAI_PACS_TIMEOUT" in message and fault_proxy.url in message
    assert f"series {series.uid} of study {series.study}: 25 of 40 instances arrived" in message
    assert len(assert_cache_sound(other, series)) == 25


# -- the command line --------------------------------------------------------------------------------------


def pull(
    proxy: FaultProxy,
    orthanc: OrthancServer,
    series: Series,
    out: Path,
    cache: Path,
    *,
    progress: bool = False,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    environ |= {
        "PACSAI_PACS_URL": proxy.url,
        "PACSAI_PACS_USER": orthanc.user,
        "PACSAI_PACS_PASSWORD": orthanc.password,
        "PACSAI_CACHE_DIR": str(cache),
        "PACSAI_PACS_RETRIES": "1",
        **env,
    }
    args = ["pull", "--study", series.study, "--series", series.uid, "--out", str(out)]
    if not progress:
        args.append("--no-progress")
    return subprocess.run(
        [sys.executable, "-m", "pacsai", "pacs", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=out.parent,
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacsai pacs: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_pull_under_persistent_faults(fault_proxy, orthanc, series, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    fault_proxy.cut(after_bytes=series.part(25.5), path=SERIES_GET, times=None)
    fault_proxy.cut(after_bytes=1000, reset=True, path=INSTANCE_GET, times=None)
    broken = pull(fault_proxy, orthanc, series, out, cache)
    assert_one_line_error(broken, f"series {series.uid} of study {series.study}: 25 of 40 instances arrived")
    assert not out.exists() or not any(out.rglob("*"))  # nothing partial in the output folder
    pacs = connect(fault_proxy.url, cache_dir=cache)
    assert len(assert_cache_sound(pacs, series)) == 25

    fault_proxy.clear()
    fault_proxy.hang(times=None)
    stalled = pull(fault_proxy, orthanc, series, out, cache, PACSAI_PACS_TIMEOUT="0.5")
    assert_one_line_error(stalled, fault_proxy.url, "did not answer in time", "PACSAI_PACS_TIMEOUT")
    assert not out.exists() or not any(out.rglob("*"))

    fault_proxy.clear()
    fault_proxy.reset_log()
    # tqdm takes TQDM_* defaults from the environment: draw every update, to check what the bar counts.
    done = pull(
        fault_proxy, orthanc, series, out, cache, progress=True, TQDM_MININTERVAL="0", TQDM_MINITERS="1"
    )
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr
    assert done.stdout.strip() == f"pulled 40 instance(s) in 1 series into {out}"
    drawn = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", done.stderr)]
    # The 15 missing instances, each counted once (fetchers run side by side, so a draw may cover two updates).
    assert drawn[0] == (0, 15) and drawn[-1] == (15, 15)
    assert all(a[0] <= b[0] for a, b in zip(drawn, drawn[1:])) and {t for _, t in drawn} == {15}
    assert len(instance_gets(fault_proxy)) == 15 and fault_proxy.count(path=SERIES_GET) == 0
    assert {p.name: p.read_bytes() for p in (out / series.uid).iterdir()} == {
        f"{uid}.dcm": data for uid, data in series.files.items()
    }
    assert len(assert_cache_sound(pacs, series)) == 40
    assert pacs.cache.read_manifest(series.uid) is not None
