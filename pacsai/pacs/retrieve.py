"""Series retrieval into the instance cache: streamed, resumable, served from the cache the second time.

DICOMweb (see docs/dicom_notes.md): one ``GET .../studies/{s}/series/{r}`` asking for
``multipart/related; type="application/dicom"; transfer-syntax=*`` with ``Accept-Encoding: identity``; the body
is streamed straight into cache files (no Dataset is built: the SOPInstanceUID is scanned from tag (0002,0003)
in each part's first bytes), each written in the cache's tmp folder and renamed into place. The instance list
comes from a (cheap) QIDO search first: it tells what "complete" means, and where the cache already holds part
of the series only the missing instances are fetched, one GET each. A complete series gets a manifest, so the
next call answers from disk without asking the server.

Faults: the session retries 429/5xx and failures before an answer's headers (urllib3); a body that breaks off
midway (cut, reset, stalled) is retried here and resumes with only the instances that have not arrived. When
the link keeps failing, the error names the series, the study and how many instances arrived; what arrived is
cached whole (never a partial file), and calling again fetches only the rest.

Embedded store: files are hard-linked (or copied) from the store's own folder.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import requests
import urllib3
from tqdm.auto import tqdm

from pacsai.errors import (
    CacheError,
    PacsaiWarning,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsTimeoutError,
    RetrieveError,
)
from pacsai.pacs.cache import InstanceCache, SeriesManifest
from pacsai.pacs.client import _is_timeout, _reason, dicom_json_value

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs.client import Pacs

logger = logging.getLogger(__name__)

ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20  # 1 MiB reads: large enough that Python overhead per read is negligible
HEAD = 16 << 10  # bytes of a part scanned for (0002,0003); file meta is far shorter
SMALL = 4096  # read size while looking for part headers
QUEUE_CHUNKS = 64  # at most this many chunks (~64 MiB) wait for the writer thread
# Whole-series streams use a writer thread only where cores are to spare: on the 2-core development host, next
# to a local Orthanc, the thread hand-offs cost more CPU than the overlap saves (137 vs 76 ms per 52 MB).
WRITER_THREAD_MIN_CPUS = 4
# Where the cache already holds part of a series, only the missing instances are fetched (never what is cached
# again), one GET each; per-instance GETs run at ~0.1 of a streamed series one at a time (docs/dicom_notes.md), so
# several run at once.
INSTANCE_FETCHERS = 4

_STREAM_ERRORS = (
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class _PartError(PacsError):
    """A multipart answer that does not parse."""


def scan_sop_instance_uid(head: bytes | bytearray | memoryview) -> str | None:
    """The MediaStorageSOPInstanceUID (0002,0003) from the first bytes of a Part-10 file, or ``None``.

    File meta is always Explicit VR Little Endian, so the element is ``02 00 03 00 'UI' <len16> <uid>``.
    """
    head = bytes(head[:HEAD])
    if head[128:132] != b"DICM":
        return None
    at = head.find(b"\x02\x00\x03\x00UI", 132)
    if at < 0:
        return None
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    raw = head[at + 8 : at + 8 + length]
    if len(raw) != length:
        return None
    uid = raw.rstrip(b"\x00 ").decode("ascii", errors="replace")
    return uid or None


def _uid_from_file(path: Path) -> str:
    # A part without file meta (not Part-10): read the dataset header to find its SOPInstanceUID.
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    except Exception as err:
        raise _PartError(
            f"a part of the answer is not a DICOM instance with a SOPInstanceUID ({err})"
        ) from err


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";,]+)"?', content_type, flags=re.IGNORECASE)
    return match.group(1).strip().encode("latin-1") if match else None


class _Writer:
    """Writes parts into the cache. Threaded, disk writes overlap with reading the socket (both release the
    GIL); inline, everything happens in the caller's thread. Commands: ("open", uid | None),
    ("data", bytes), ("close",), ("abort",)."""

    def __init__(
        self, cache: InstanceCache, on_instance: Callable[[str, Path, int], None], *, threaded: bool
    ) -> None:
        self.cache = cache
        self.on_instance = on_instance
        self.error: BaseException | None = None
        self._handle: IO[bytes] | None = None
        self._temp: Path | None = None
        self._uid: str | None = None
        self._size = 0
        self._queue: queue.Queue[tuple[Any, ...] | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=QUEUE_CHUNKS)
            self._thread = threading.Thread(target=self._run, name="pacsai-cache-writer", daemon=True)
            self._thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        if self.error is not None:
            raise self.error
        if self._queue is None:
            self._do(item)
            if self.error is not None:
                raise self.error
        else:
            self._queue.put(item)

    def finish(self) -> None:
        """Wait for every queued write; re-raise the writer's error, if any."""
        self._stop()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Drop the part being written (committed instances stay) and stop."""
        if self._queue is None:
            self._do(("abort",))
        else:
            self._queue.put(("abort",))
        self._stop()

    def _stop(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if self.error is None:  # after an error, drain so that the reader never blocks on a full queue
                self._do(item)

    def _do(self, item: tuple[Any, ...]) -> None:
        try:
            kind = item[0]
            if kind == "data":
                assert self._handle is not None
                self._handle.write(item[1])
                self._size += len(item[1])
            elif kind == "open":
                self._handle, self._temp = self.cache.open_temp()
                self._uid, self._size = item[1], 0
            elif kind == "close":
                assert self._handle is not None and self._temp is not None
                self._handle.close()
                self._handle = None
                uid = self._uid if self._uid is not None else _uid_from_file(self._temp)
                path = self.cache.commit(self._temp, uid)
                self._temp = None
                self.on_instance(uid, path, self._size)
            elif kind == "abort":
                raise _Aborted()
        except BaseException as err:  # noqa: BLE001 (handed to the reading thread, which re-raises it)
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            if self._temp is not None:
                self.cache.discard(self._temp)
                self._temp = None
            self.error = err


class _Aborted(Exception):
    pass


def stream_parts(
    response: requests.Response,
    cache: InstanceCache,
    *,
    on_instance: Callable[[str, Path, int], None],
    threaded: bool = False,
) -> None:
    """Write every part of a ``multipart/related`` DICOM answer into ``cache`` as it arrives.

    Parameters
    ----------
    response
        A streamed (``stream=True``) response.
    cache
        Where the instances go.
    on_instance
        Called with ``(sop_uid, path, size)`` after each instance is committed (from the writer thread when ``threaded``).
    threaded
        Write files on a second thread, overlapping disk and network. Off by default: measured on a 2-core
        host next to a local Orthanc, the hand-offs cost more CPU (137 vs 76 ms for 52 MB) than they save.

    Raises
    ------
    PacsError
        The answer is not multipart DICOM, or ends inside a part.
    requests / urllib3 errors
        The connection dropped; instances committed so far stay in the cache.
    """
    content_type = response.headers.get("Content-Type", "")
    raw = response.raw

    def read(n: int) -> bytes:
        return raw.read(n, decode_content=True)

    single = content_type.lower().startswith("application/dicom")
    boundary = None if single else _boundary(content_type)
    if not single and (boundary is None or "multipart" not in content_type.lower()):
        raise PacsError(f"expected a multipart/related DICOM answer, got Content-Type {content_type!r}")
    writer = _Writer(cache, on_instance, threaded=threaded)
    try:
        if single:
            _copy_until(bytearray(), read, None, writer)
        else:
            assert boundary is not None
            _parse_multipart(read, b"\r\n--" + boundary, writer)
    except BaseException:
        writer.abort()
        raise
    writer.finish()


def _parse_multipart(read: Callable[[int], bytes], delim: bytes, writer: _Writer) -> None:
    # Prepending CRLF lets the first boundary (at the very start of the body) match the same delimiter.
    buf = bytearray(b"\r\n")
    while True:
        # Headers are read in small pieces so that part bodies arrive as whole chunks, never copied.
        while True:
            at = buf.find(delim)
            if at >= 0:
                after = at + len(delim)
                if buf[after : after + 2] == b"--":
                    return
                end = buf.find(b"\r\n\r\n", after)
                if end >= 0:
                    break
            chunk = read(SMALL)
            if not chunk:
                if buf.strip(b"\r\n"):
                    raise _PartError("the multipart answer ended without its closing boundary")
                return  # an empty body: no instances
            buf += chunk
        headers = bytes(buf[after:end]).decode("latin-1")
        del buf[: end + 4]
        match = re.search(r"content-length:\s*(\d+)", headers, flags=re.IGNORECASE)
        if match is None:
            buf = _copy_until(buf, read, delim, writer)
            continue
        length = int(match.group(1))
        have = bytes(buf[:length])
        del buf[: len(have)]
        remaining = length - len(have)
        first = read(min(CHUNK, remaining)) if remaining else b""
        writer.put(("open", scan_sop_instance_uid(have + first[:HEAD])))
        writer.put(("data", have))
        writer.put(("data", first))
        remaining -= len(first)
        while remaining > 0:
            chunk = read(min(CHUNK, remaining))
            if not chunk:
                raise _PartError(f"the answer ended inside a part ({length - remaining} of {length} bytes)")
            writer.put(("data", chunk))
            remaining -= len(chunk)
        writer.put(("close",))


def _find_delimiter(buf: bytearray, delim: bytes) -> int:
    """Index of a real delimiter in ``buf`` (followed by ``--``, CRLF or padding: RFC 2046), else -1."""
    at = buf.find(delim)
    while at >= 0:
        after = buf[at + len(delim) : at + len(delim) + 2]
        if len(after) < 2:
            return -1  # undecidable yet: the caller keeps these bytes and reads more
        if after in (b"--", b"\r\n") or after[:1] in (b" ", b"\t"):
            return at
        at = buf.find(delim, at + 1)
    return -1


def _copy_until(
    buf: bytearray, read: Callable[[int], bytes], delim: bytes | None, writer: _Writer
) -> bytearray:
    """A part without Content-Length: copy up to ``delim`` (or to the end); return what follows."""
    while len(buf) < HEAD:
        chunk = read(CHUNK)
        if not chunk:
            break
        buf += chunk
    writer.put(("open", scan_sop_instance_uid(buf)))
    keep = len(delim) + 2 if delim is not None else 0
    while True:
        at = _find_delimiter(buf, delim) if delim is not None else -1
        if at >= 0:
            writer.put(("data", bytes(buf[:at])))
            del buf[:at]
            break
        cut = max(0, len(buf) - keep)
        writer.put(("data", bytes(buf[:cut])))
        del buf[:cut]
        chunk = read(CHUNK)
        if not chunk:
            if delim is not None:
                raise _PartError("the multipart answer ended inside a part")
            writer.put(("data", bytes(buf)))
            buf.clear()
            break
        buf += chunk
    writer.put(("close",))
    return buf


def _get_stream(pacs: Pacs, url: str) -> requests.Response:
    assert pacs.session is not None
    response = pacs.session.get(
        url, headers={"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"}, stream=True
    )
    response.raise_for_status()
    return response


def list_instances(pacs: Pacs, study_uid: str, series_uid: str) -> list[str]:
    """SOPInstanceUIDs of a series on the PACS, by InstanceNumber (QIDO; cheap)."""
    if pacs.is_embedded:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            items = pacs.client.search_for_instances(
                search_filters={"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
            )
    else:
        assert pacs.session is not None
        url = f"{pacs.url}/studies/{study_uid}/series/{series_uid}/instances?includefield=00200013"
        with pacs.errors(f"list the instances of series {series_uid}"):
            answer = pacs.session.get(url, headers={"Accept": "application/dicom+json"})
            answer.raise_for_status()
        items = answer.json() if answer.content and answer.status_code != 204 else []
    keyed = []
    for item in items:
        sop = dicom_json_value(item, "00080018")
        number = dicom_json_value(item, "00200013")
        try:
            number = int(number) if number is not None else None
        except (TypeError, ValueError):
            number = None
        if sop:
            keyed.append((number if number is not None else 1 << 62, str(sop)))
    return [sop for _, sop in sorted(keyed)]


def series_size(pacs: Pacs, study_uid: str, series_uid: str) -> int:
    """NumberOfSeriesRelatedInstances of a series on a DICOMweb PACS (0 when the series is not there).

    A series-level QIDO costs a few ms on Orthanc; listing the instances costs as much as the transfer.
    """
    assert pacs.session is not None
    url = f"{pacs.url}/studies/{study_uid}/series?SeriesInstanceUID={series_uid}&includefield=00201209"
    with pacs.errors(f"look up series {series_uid}"):
        answer = pacs.session.get(url, headers={"Accept": "application/dicom+json"})
        if answer.status_code == 404:
            return 0
        answer.raise_for_status()
    items = answer.json() if answer.content and answer.status_code != 204 else []
    for item in items:
        if dicom_json_value(item, "0020000E") == series_uid:
            count = dicom_json_value(item, "00201209")
            try:
                return int(count) if count is not None else -1
            except (TypeError, ValueError):
                return -1  # present, size unknown: completeness is then checked against the instance list
    return 0


def retrieve_series(
    pacs: Pacs, study_uid: str, series_uid: str, *, progress: bool = True, refresh: bool = False
) -> list[Path]:
    """Part-10 files of one series in the local cache (fetched only where missing).

    Parameters
    ----------
    pacs
        The connection.
    study_uid, series_uid
        The series.
    progress
        Show a progress bar while fetching (it counts the instances this call fetches).
    refresh
        Ask the PACS for the instance list even where the cache holds the complete series (the series may
        have grown); only new instances are fetched.

    Returns
    -------
    list[pathlib.Path]
        One file per instance, ``<SOPInstanceUID>.dcm``, in the order the PACS listed or sent them (sort by
        geometry when reading a volume). Files are shared by everyone using this cache: read, never modify.

    Raises
    ------
    PacsNotFoundError
        The series has no instances on the PACS.
    PacsConnectionError, PacsTimeoutError
        The PACS cannot be reached, or the link kept dropping or stalling beyond the retries; the message
        names the series and study and how many instances arrived (those stay cached: calling again fetches
        only the rest).
    RetrieveError
        Some instances did not arrive for another reason (HTTP errors beyond the retries, answers that do not
        parse, instances gone from the PACS); same message and caching as above.
    PacsAuthError, PacsError
        As for every PACS call.

    Notes
    -----
    Failures before an answer's body (refused connection, 429/5xx, no answer at all) are retried by the
    session (:class:`pacsai.pacs.client.HttpOptions`). A body that breaks off midway (connection cut or
    reset, server stalls) is retried here, with the session's retries and backoff, resuming with only the
    instances that have not arrived; an attempt that brings new instances starts the count afresh, so a
    flaky link finishes while a dead one fails after ``retries`` attempts (timeouts: ``timeout_retries``).
    """
    cache = pacs.cache
    manifest = None if refresh else cache.read_manifest(series_uid)
    cached = manifest is not None and manifest.study_uid == study_uid
    if manifest is not None and cached:
        paths, broken = cache.check(manifest)
        if not broken:
            logger.debug("series %s served from the cache (%d instances)", series_uid, len(paths))
            return paths
        warnings.warn(
            f"{len(broken)} cached instance(s) of series {series_uid} are missing or have the wrong size in "
            f"{cache.root}; fetching them again from {pacs.url}",
            PacsaiWarning,
            stacklevel=3,
        )
        expected: list[str] | None = list(manifest.instances)
        missing: list[str] | None = list(broken)
    else:
        expected = missing = None
    received: dict[str, int] = {}
    total = 0
    try:
        if not cached and (pacs.is_embedded or refresh or cache.is_partial(series_uid)):
            expected = list_instances(pacs, study_uid, series_uid)
            missing = [uid for uid in expected if not cache.has(uid)]
        # else: unknown yet: stream the whole series, then check it is complete
        if expected is not None and not expected:
            raise _not_found(pacs, study_uid, series_uid)
        cache.drop_manifest(series_uid)
        if missing is not None:
            total = len(missing)
        elif not pacs.is_embedded:
            total = series_size(pacs, study_uid, series_uid)
        if missing is None and total == 0:
            raise _not_found(pacs, study_uid, series_uid)
        wanted = set(missing) if missing is not None else None
        with tqdm(
            total=max(total, 0) or None,
            unit="inst",
            desc=f"series …{series_uid[-8:]}",
            disable=not progress,
            leave=False,
        ) as bar:

            def done(uid: str, path: Path, size: int) -> None:
                # Count each wanted instance once: a retried or whole-series answer may bring one again.
                if uid not in received and (wanted is None or uid in wanted):
                    bar.update(1)
                received[uid] = size

            if pacs.is_embedded:
                _copy_from_store(pacs, study_uid, series_uid, missing or [], done)
            else:
                expected = _fetch_http(pacs, study_uid, series_uid, expected, missing, total, done)
    except PacsError as err:
        if received:
            cache.mark_partial(series_uid)
        restated = _incomplete(err, pacs, study_uid, series_uid, expected, total, received)
        if restated is err:
            raise
        raise restated from err
    except BaseException:
        if received:
            cache.mark_partial(series_uid)
        raise
    assert expected is not None
    absent = [uid for uid in expected if uid not in received and not cache.has(uid)]
    if absent:
        cache.mark_partial(series_uid)
        raise RetrieveError(
            f"{len(absent)} of {len(expected)} instances of series {series_uid} (study {study_uid}) did not "
            f"arrive from {pacs.url} (first: {absent[0]}); the {len(expected) - len(absent)} that did are "
            "cached; call again to resume"
        )
    seen = set(expected)
    order = expected + [uid for uid in received if uid not in seen]
    final = {uid: received[uid] if uid in received else cache.path_for(uid).stat().st_size for uid in order}
    cache.write_manifest(SeriesManifest(study_uid=study_uid, series_uid=series_uid, instances=final))
    cache.clear_partial(series_uid)
    logger.info(
        "series %s: %d instance(s) fetched from %s, %d already cached",
        series_uid,
        len(received),
        pacs.url,
        len(order) - len(received),
    )
    return [cache.path_for(uid) for uid in order]


def _not_found(pacs: Pacs, study_uid: str, series_uid: str) -> PacsNotFoundError:
    return PacsNotFoundError(
        f"series {series_uid} of study {study_uid} has no instances on {pacs.url}; "
        "check the UIDs with `pacsai pacs search --level series`"
    )


def _incomplete(
    err: PacsError,
    pacs: Pacs,
    study_uid: str,
    series_uid: str,
    expected: list[str] | None,
    total: int,
    received: dict[str, int],
) -> PacsError:
    """``err`` restated for the series: which one, how many instances arrived, how to resume.

    Connection problems stay :class:`PacsConnectionError` / :class:`PacsTimeoutError` (a caller may treat an
    unreachable PACS differently from a bad series); anything else becomes :class:`RetrieveError`.
    """
    if isinstance(err, (PacsAuthError, PacsNotFoundError)):
        return err  # about credentials or UIDs, not about this transfer: already says what to fix
    if expected is not None:
        arrived, of = sum(1 for uid in expected if uid in received or pacs.cache.has(uid)), len(expected)
    else:
        arrived, of = len(received), total
    count = f"{arrived} of {of} instances" if of > 0 else f"{arrived} instances"
    text = (
        f"{err}; series {series_uid} of study {study_uid}: {count} arrived"
        + (" and are cached; calling again fetches only the rest" if arrived else "")
    )
    if isinstance(err, PacsTimeoutError) or (isinstance(err, _BrokenBody) and err.timeout):
        return PacsTimeoutError(text)
    if isinstance(err, PacsConnectionError):
        return PacsConnectionError(text)
    return RetrieveError(text)


class _BrokenBody(PacsConnectionError):
    """An answer's body broke off (connection cut, reset, stalled, or a truncated multipart body): urllib3
    retries only up to the headers, so these are retried by :func:`_fetch_http`."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class _Attempts:
    """Retries of broken bodies: ``retries`` in a row without a new instance (``timeout_retries`` when the
    last failure was a stall), with exponential backoff; any progress starts the count afresh.

    The policy is the session's (its adapter's urllib3 ``Retry``), so ``HttpOptions`` configures both
    layers. A request is retried by one layer only (urllib3 up to the headers, this class after), so the
    worst case for a stalling server stays about ``(1 + timeout_retries) x timeout`` per stretch without
    progress instead of multiplying the two retry counts.
    """

    def __init__(self, pacs: Pacs) -> None:
        assert pacs.session is not None
        retry = pacs.session.get_adapter(pacs.url).max_retries
        self.retries = int(retry.total or 0) if not isinstance(retry.total, bool) else 0
        self.timeout_retries = int(getattr(retry, "timeout_retries", 1))
        self.backoff = float(retry.backoff_factor)
        self.backoff_max = float(retry.backoff_max)
        self.streak = 0
        self.count = 0  # retries made, for the log

    def failed(self, err: _BrokenBody) -> None:
        """Wait before the next attempt; re-raise ``err`` when the retries are spent."""
        self.streak += 1
        limit = min(self.retries, self.timeout_retries) if err.timeout else self.retries
        if self.streak > limit:
            raise err
        self.count += 1
        wait = min(self.backoff * 2 ** (self.streak - 1), self.backoff_max)
        logger.info("%s; retry %d of %d in %.2f s", err, self.streak, limit, wait)
        time.sleep(wait)

    def progressed(self) -> None:
        self.streak = 0


def _stream(
    pacs: Pacs,
    url: str,
    what: str,
    record: Callable[[str, Path, int], None],
    *,
    threaded: bool = False,
) -> None:
    """GET ``url`` and write its parts into the cache.

    Failures up to the headers come back as :class:`PacsError` subclasses (after the session's retries);
    a body that breaks off raises :class:`_BrokenBody` (committed instances stay; the part in flight is
    dropped).
    """
    with pacs.errors(what):
        response = _get_stream(pacs, url)
    with response:
        try:
            stream_parts(response, pacs.cache, on_instance=record, threaded=threaded)
        except _PartError as err:
            # Orthanc sends multipart answers without a length: a cut connection looks like a normal end,
            # and only the truncated multipart structure tells.
            raise _BrokenBody(
                f"the answer from {pacs.url} broke off while trying to {what}: {err}", timeout=False
            ) from err
        except _STREAM_ERRORS as err:
            if _is_timeout(err):
                raise _BrokenBody(
                    f"{pacs.url} stopped sending in the middle of an answer while trying to {what}; "
                    "raise PACSAI_PACS_TIMEOUT or check the server's load",
                    timeout=True,
                ) from err
            raise _BrokenBody(
                f"the connection to {pacs.url} dropped in the middle of an answer while trying to {what} "
                f"({_reason(err)}); retries exhausted, try again later",
                timeout=False,
            ) from err


def _fetch_http(
    pacs: Pacs,
    study_uid: str,
    series_uid: str,
    expected: list[str] | None,
    missing: list[str] | None,
    total: int,
    done: Callable[[str, Path, int], None],
) -> list[str]:
    """Fetch a series (whole, or only ``missing``), retrying broken bodies; returns the full instance list."""
    got: list[str] = []

    def record(uid: str, path: Path, size: int) -> None:
        got.append(uid)
        done(uid, path, size)

    attempts = _Attempts(pacs)
    base = f"{pacs.url}/studies/{study_uid}/series/{series_uid}"
    # A whole-series stream only where nothing of the series is cached: a resume never brings back what is here.
    whole = missing is None or expected is None or len(missing) >= len(expected)
    if whole:
        threaded = (os.cpu_count() or 1) >= WRITER_THREAD_MIN_CPUS
        broke = False
        while True:
            before = len(got)
            try:
                _stream(pacs, base, f"retrieve series {series_uid}", record, threaded=threaded)
                break
            except _BrokenBody as err:
                if len(got) == before:
                    attempts.failed(err)  # nothing new: the same request again, after a pause
                    continue
                # What arrived stays; the rest is fetched instance by instance below (a whole series again
                # would bring back what is already here).
                logger.info("%s after %d new instance(s); resuming with the rest", err, len(got) - before)
                attempts.progressed()
                broke = True
                break
        if expected is None:
            if not broke and total >= 0 and len(set(got)) >= total:
                return got  # the common case: complete, and no instance list needed
            expected = list_instances(pacs, study_uid, series_uid)
        arrived = set(got)
        missing = [uid for uid in expected if uid not in arrived and not pacs.cache.has(uid)]
    assert missing is not None
    _fetch_instances(pacs, base, series_uid, missing, record, attempts)
    if attempts.count:
        logger.info("series %s: complete after %d retried answer(s)", series_uid, attempts.count)
    return expected


def _fetch_instances(
    pacs: Pacs,
    base: str,
    series_uid: str,
    missing: list[str],
    record: Callable[[str, Path, int], None],
    attempts: _Attempts,
) -> None:
    """GET each of ``missing`` (``INSTANCE_FETCHERS`` at a time), retrying broken bodies.

    Every fetcher retries its own instance with its own count (``attempts`` only collects the total); the
    first one whose retries are spent stops the others after their current instance and its error is raised.
    """
    pending = list(reversed(missing))
    lock = threading.Lock()
    stop = threading.Event()

    def take() -> str | None:
        with lock:
            return pending.pop() if pending and not stop.is_set() else None

    def fetcher() -> None:
        mine = _Attempts(pacs)
        try:
            while (uid := take()) is not None:
                while True:
                    try:
                        what = f"retrieve instance {uid} of series {series_uid}"
                        _stream(pacs, f"{base}/instances/{uid}", what, record)
                    except PacsNotFoundError:
                        logger.warning("instance %s of series %s vanished from %s", uid, series_uid, pacs.url)
                    except _BrokenBody as err:
                        if not pacs.cache.has(uid):  # (it may have arrived whole before the cut: then move on)
                            mine.failed(err)
                            continue
                    mine.progressed()
                    break
        except BaseException:
            stop.set()
            raise
        finally:
            with lock:
                attempts.count += mine.count

    workers = min(INSTANCE_FETCHERS, len(missing))
    if workers <= 1:
        fetcher()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pacsai-fetch") as pool:
        futures = [pool.submit(fetcher) for _ in range(workers)]
        try:
            wait(futures)
        except BaseException:  # Ctrl-C: the fetchers finish the instance in hand, then stop
            stop.set()
            raise
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        # A connection problem over any other: the caller reports how many instances arrived.
        raise next((e for e in errors if isinstance(e, PacsError)), errors[0])


def _copy_from_store(
    pacs: Pacs,
    study_uid: str,
    series_uid: str,
    missing: Iterable[str],
    done: Callable[[str, Path, int], None],
) -> None:
    root = pacs.path
    assert root is not None
    for uid in missing:
        # dicomweb-client's DICOMfileClient keeps what it stores at this path (file.py, insert_instances).
        source = root / "studies" / study_uid / "series" / series_uid / "instances" / uid
        if source.is_file():
            path = pacs.cache.put_file(uid, source)
        else:
            path = _write_dataset(pacs, study_uid, series_uid, uid)
        done(uid, path, path.stat().st_size)


def _write_dataset(pacs: Pacs, study_uid: str, series_uid: str, uid: str) -> Path:
    # Files indexed from elsewhere (a folder given to DICOMfileClient): ask the client, write Part-10 bytes.
    import io

    import pydicom

    try:
        ds = pacs.client.retrieve_instance(study_uid, series_uid, uid)
    except Exception as err:
        raise RetrieveError(f"the embedded store {pacs.url} cannot read instance {uid}: {err}") from err
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as err:
        raise CacheError(f"cannot write instance {uid} from {pacs.url} into the cache: {err}") from err
    return pacs.cache.put_bytes(uid, buffer.getbuffer())


def retrieve_study(pacs: Pacs, study_uid: str, *, progress: bool = True) -> dict[str, list[Path]]:
    """Every series of a study in the local cache.

    Returns
    -------
    dict[str, list[pathlib.Path]]
        ``{SeriesInstanceUID: paths}`` (paths as for :func:`retrieve_series`).

    Raises
    ------
    PacsNotFoundError
        The study has no series on the PACS.
    """
    series = pacs.search_series(StudyInstanceUID=study_uid)
    if series.empty:
        raise PacsNotFoundError(
            f"study {study_uid} has no series on {pacs.url}; check the UID with `pacsai pacs search`"
        )
    result: dict[str, list[Path]] = {}
    for series_uid in series["SeriesInstanceUID"]:
        result[str(series_uid)] = retrieve_series(pacs, study_uid, str(series_uid), progress=progress)
    return result
