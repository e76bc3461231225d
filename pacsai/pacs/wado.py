"""WADO-RS retrieval from a DICOMweb server into the instance cache: streamed, resumable, retried.

One ``GET .../studies/{s}/series/{r}`` asking for ``multipart/related; type="application/dicom";
transfer-syntax=*`` with ``Accept-Encoding: identity``; the body is streamed straight into cache files by
:mod:`pacsai.pacs.multipart`. Where the cache already holds part of a series, only the missing instances are
fetched, one GET each, :data:`INSTANCE_FETCHERS` at a time (docs/dicom_notes.md).

Faults: the session retries 429/5xx and failures before an answer's headers (urllib3); a body that breaks off
midway (cut, reset, stalled) is retried here with the session's policy and resumes with only the instances that
have not arrived.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from pacsai.errors import PacsError, PacsNotFoundError
from pacsai.pacs.cache import InstanceCache
from pacsai.pacs.dicomjson import as_int, dicom_json_value, order_instances
from pacsai.pacs.multipart import WRITER_THREAD_MIN_CPUS, PartError, stream_parts
from pacsai.pacs.retrieve import BrokenTransfer, OnInstance
from pacsai.pacs.transport import failure_reason, http_errors, is_timeout, retry_policy

logger = logging.getLogger(__name__)

ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = {"Accept": "application/dicom+json"}
# Per-instance GETs run at ~0.1 of a streamed series one at a time (docs/dicom_notes.md), so several run at once.
INSTANCE_FETCHERS = 4

_STREAM_ERRORS = (
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


@dataclass
class WadoSource:
    """The :class:`pacsai.pacs.retrieve.SeriesSource` of a DICOMweb server.

    Attributes
    ----------
    url
        DICOMweb base URL (no credentials).
    session
        The session (authentication, timeouts, retries) from :func:`pacsai.pacs.transport.build_session`.
    cache
        Where instances go.
    user
        The user name, for messages.
    """

    url: str
    session: requests.Session
    cache: InstanceCache
    user: str | None = None

    lists_cheaply = False  # listing costs as much as the transfer on Orthanc: stream first, list only if needed

    def errors(self, what: str) -> AbstractContextManager[None]:
        """Context translating ``requests`` failures into :class:`PacsError` subclasses naming this server."""
        return http_errors(self.url, what=what, user=self.user)

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs of a series on the server, by InstanceNumber (QIDO)."""
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}/instances?includefield=00200013"
        with self.errors(f"list the instances of series {series_uid}"):
            answer = self.session.get(url, headers=ACCEPT_JSON)
            answer.raise_for_status()
        items = answer.json() if answer.content and answer.status_code != 204 else []
        return order_instances(items)

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        """NumberOfSeriesRelatedInstances (0: absent; -1: present, not counted). A series-level QIDO costs a
        few ms on Orthanc; listing the instances costs as much as the transfer."""
        url = f"{self.url}/studies/{study_uid}/series?SeriesInstanceUID={series_uid}&includefield=00201209"
        with self.errors(f"look up series {series_uid}"):
            answer = self.session.get(url, headers=ACCEPT_JSON)
            if answer.status_code == 404:
                return 0
            answer.raise_for_status()
        items = answer.json() if answer.content and answer.status_code != 204 else []
        for item in items:
            if dicom_json_value(item, "0020000E") == series_uid:
                count = dicom_json_value(item, "00201209")
                number = as_int(count)
                # present, size unknown (-1): completeness is then checked against the instance list
                return number if number is not None else -1
        return 0

    def fetch(
        self,
        study_uid: str,
        series_uid: str,
        expected: list[str] | None,
        missing: list[str] | None,
        total: int,
        done: OnInstance,
    ) -> list[str]:
        """Fetch a series (whole, or only ``missing``), retrying broken bodies; returns the full instance list."""
        got: list[str] = []

        def record(uid: str, path: Path, size: int) -> None:
            got.append(uid)
            done(uid, path, size)

        attempts = _Attempts(self)
        base = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        # A whole-series stream only where nothing of the series is cached: a resume never brings back what is here.
        if missing is None or expected is None or len(missing) >= len(expected):
            broke = self._stream_whole(base, series_uid, record, attempts, got)
            if expected is None:
                if not broke and total >= 0 and len(set(got)) >= total:
                    return got  # the common case: complete, and no instance list needed
                expected = self.list_instances(study_uid, series_uid)
            arrived = set(got)
            missing = [uid for uid in expected if uid not in arrived and not self.cache.has(uid)]
        self._fetch_instances(base, series_uid, missing, record, attempts)
        if attempts.count:
            logger.info("series %s: complete after %d retried answer(s)", series_uid, attempts.count)
        return expected

    # -- transfers -----------------------------------------------------------------------------------------
    def _stream_whole(
        self, base: str, series_uid: str, record: OnInstance, attempts: _Attempts, got: list[str]
    ) -> bool:
        """Stream the whole series; ``True`` when it broke off after bringing something (resume instance-wise)."""
        threaded = (os.cpu_count() or 1) >= WRITER_THREAD_MIN_CPUS
        while True:
            before = len(got)
            try:
                self._stream(base, f"retrieve series {series_uid}", record, threaded=threaded)
                return False
            except BrokenTransfer as err:
                if len(got) == before:
                    attempts.failed(err)  # nothing new: the same request again, after a pause
                    continue
                # What arrived stays; the rest is fetched instance by instance (a whole series again would
                # bring back what is already here).
                logger.info("%s after %d new instance(s); resuming with the rest", err, len(got) - before)
                attempts.progressed()
                return True

    def _stream(self, url: str, what: str, record: OnInstance, *, threaded: bool = False) -> None:
        """GET ``url`` and write its parts into the cache.

        Failures up to the headers come back as :class:`PacsError` subclasses (after the session's retries);
        a body that breaks off raises :class:`BrokenTransfer` (committed instances stay; the part in flight is
        dropped).
        """
        with self.errors(what):
            response = self.session.get(
                url, headers={"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"}, stream=True
            )
            response.raise_for_status()
        with response:
            try:
                stream_parts(response, self.cache, on_instance=record, threaded=threaded)
            except PartError as err:
                # Orthanc sends multipart answers without a length: a cut connection looks like a normal end,
                # and only the truncated multipart structure tells.
                raise BrokenTransfer(
                    f"the answer from {self.url} broke off while trying to {what}: {err}", timeout=False
                ) from err
            except _STREAM_ERRORS as err:
                if is_timeout(err):
                    raise BrokenTransfer(
                        f"{self.url} stopped sending in the middle of an answer while trying to {what}; "
                        "raise PACSAI_PACS_TIMEOUT or check the server's load",
                        timeout=True,
                    ) from err
                raise BrokenTransfer(
                    f"the connection to {self.url} dropped in the middle of an answer while trying to {what} "
                    f"({failure_reason(err)}); retries exhausted, try again later",
                    timeout=False,
                ) from err

    def _fetch_instances(
        self, base: str, series_uid: str, missing: list[str], record: OnInstance, attempts: _Attempts
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

        def fetch_one(uid: str, mine: _Attempts) -> None:
            while True:
                try:
                    what = f"retrieve instance {uid} of series {series_uid}"
                    self._stream(f"{base}/instances/{uid}", what, record)
                except PacsNotFoundError:
                    logger.warning("instance %s of series %s vanished from %s", uid, series_uid, self.url)
                except BrokenTransfer as err:
                    if not self.cache.has(uid):  # (it may have arrived whole before the cut: then move on)
                        mine.failed(err)
                        continue
                mine.progressed()
                return

        def fetcher() -> None:
            mine = _Attempts(self)
            try:
                while (uid := take()) is not None:
                    fetch_one(uid, mine)
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
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            # A connection problem over any other: the caller reports how many instances arrived.
            raise next((e for e in errors if isinstance(e, PacsError)), errors[0])


class _Attempts:
    """Retries of broken bodies: ``retries`` in a row without a new instance (``timeout_retries`` when the
    last failure was a stall), with exponential backoff; any progress starts the count afresh.

    The policy is the session's (:func:`pacsai.pacs.transport.retry_policy`), so ``HttpOptions`` configures
    both layers. A request is retried by one layer only (urllib3 up to the headers, this class after), so the
    worst case for a stalling server stays about ``(1 + timeout_retries) x timeout`` per stretch without
    progress instead of multiplying the two retry counts.
    """

    def __init__(self, source: WadoSource) -> None:
        self.policy = retry_policy(source.session, source.url)
        self.streak = 0
        self.count = 0  # retries made, for the log

    def failed(self, err: BrokenTransfer) -> None:
        """Wait before the next attempt; re-raise ``err`` when the retries are spent."""
        self.streak += 1
        policy = self.policy
        limit = min(policy.retries, policy.timeout_retries) if err.timeout else policy.retries
        if self.streak > limit:
            raise err
        self.count += 1
        pause = min(policy.backoff * 2 ** (self.streak - 1), policy.backoff_max)
        logger.info("%s; retry %d of %d in %.2f s", err, self.streak, limit, pause)
        time.sleep(pause)

    def progressed(self) -> None:
        self.streak = 0


__all__ = ["ACCEPT_DICOM", "INSTANCE_FETCHERS", "WadoSource"]
