"""The watch loop: notice changes, wait until a study is stable, check the rules, run reports, remember outcomes.

One thread, one loop (:meth:`Watcher.run`): every ``poll_seconds`` the source is asked for changes (recorded in the
state file before its cursor moves on); a study quiet for ``stable_seconds`` is fingerprinted (instance count and
a hash of its SOP Instance UIDs, pacsai's own outputs left out): the same fingerprint as when it was last reported
means nothing to do, a study no trigger matches is ``ignored`` with the reason, any other starts a report as a
child process (:mod:`pacsai.watch.job`), at most ``workers`` at a time. A failed report is retried with backoff and
given up after ``max_attempts``, its reason kept. Every ``health_seconds`` a health line goes to the log.

Logs and ``--status`` name studies by key only (``s-`` + keyed hash of the StudyInstanceUID) and patients by
pseudonym (:func:`pacsai.tracking.pseudonymize`).

Stopping: the first SIGTERM / Ctrl-C lets the running reports finish (up to ``grace_seconds``) and starts no new
one; a second one, or the end of the grace time, abandons them (SIGTERM to each report's process group: its
staging folder is removed, the study goes back to ``waiting`` and is reported at the next start). Outputs already
pushed by an abandoned or killed report carry the same deterministic UIDs the re-run produces, so the PACS never
holds two copies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsai.errors import PacsError
from pacsai.pacs import Pacs
from pacsai.watch.rules import WatchRules, match
from pacsai.watch.sources import Source, fingerprint
from pacsai.watch.state import StudyRow, WatchState, redact

log = logging.getLogger("pacsai.watch")

STAGING_DIR = ".watch-staging"


class _Child:
    """A forked report process: the part of ``subprocess.Popen`` the loop uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"report process {self.pid}", float(timeout or 0))
            time.sleep(0.1)
        return int(self.returncode or 0)


def _fork_job(spec_path: Path, result_path: Path, log_path: Path, *, close: tuple[int, ...] = ()) -> _Child:
    """Fork a report process (module docstring of :mod:`pacsai.watch.job`); its output goes to ``log_path``.

    ``close``: the watch's descriptors the report must not keep open (the state file's lock: a report outliving a
    killed watch for a moment must not keep the next watch from starting).
    """
    from pacsai.watch import job

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Child(pid)
    code = 1
    try:  # the child: never returns into the watch's loop
        for fd in close:
            os.close(fd)
        job.prepare_child()
        fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        logging.getLogger("pacsai.watch").handlers.clear()
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr, force=True)
        code = job.execute(spec_path, result_path)
    except BaseException:  # noqa: BLE001 (the child must end here, whatever happened)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _threads_per_report(running: int) -> int:
    """Inference threads for a report started with ``running`` reports (itself included) under way.

    The CPUs shared out: a report alone gets them all (its latency); reports side by side get a share each, since
    more compute threads than cores only adds switching and spin-waiting to the same work.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, running))


@dataclass
class _Running:
    study_uid: str
    key: str
    process: _Child
    result_path: Path
    started: float
    fingerprint: tuple[int, str]
    #: when the change that made the study ready was seen (the latency runs from there)
    change_at: float = 0.0
    abandoned: bool = False


@dataclass
class Watcher:
    """A running watch, built by `pacsai watch` (:mod:`pacsai.commands.watch`) or directly; :meth:`run` runs it."""

    pacs: Pacs
    rules: WatchRules
    state: WatchState
    source: Source
    pseudonym_key: str
    out_root: Path = Path("reports")
    workers: int = 1
    health_seconds: float = 60.0
    grace_seconds: float = 120.0
    once: bool = False
    model_override: str | None = None
    _running: dict[str, _Running] = field(default_factory=dict)
    #: studies that matched a trigger and wait for a worker: uid → (last_change, patient_id, trigger, fp, attempts)
    _matched: dict[str, tuple[float, str, str, tuple[int, str], int]] = field(default_factory=dict)
    _stop_requests: int = 0
    _stop_since: float | None = None
    _pacs_ok: bool = True
    _last_poll_ok: float = 0.0
    _polled_once: bool = False

    # -- naming without identifiers ---------------------------------------------------------------------------
    def key(self, study_uid: str) -> str:
        from pacsai.tracking import pseudonymize

        return "s-" + pseudonymize(study_uid, self.pseudonym_key)[2:]

    def patient(self, patient_id: str) -> str:
        from pacsai.tracking import pseudonymize

        return pseudonymize(patient_id, self.pseudonym_key) if patient_id else ""

    # -- signals -----------------------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            self._stop_since = time.monotonic()
            log.warning("stopping: %d report(s) running finish first (up to %.0f s; stop again to abandon them)",
                        len(self._running), self.grace_seconds)
        else:
            log.warning("stopping now: abandoning %d running report(s)", len(self._running))

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until stopped (or, with ``once``, until everything noticed now is handled); returns 0."""
        # Everything a report imports and reads once per process, done here once: every forked report starts
        # with it (seconds of CPU per report, which is what bounds a burst of studies on a small machine).
        from pacsai.watch import job

        job.prewarm(model=self.rules.report.structures_from == "model")
        recovered = self.state.recover()
        if recovered:
            log.warning("%d report(s) interrupted by an earlier stop or crash will run again", recovered)
        shutil.rmtree(self.out_root / STAGING_DIR, ignore_errors=True)  # partial reports of a killed watch
        # The first poll (on a fresh state: the baseline of studies already there) runs before "watching" is
        # announced, so that a study stored after the announcement is always a new one, never part of the baseline.
        self._poll()
        log.warning("watching %s: mode %s; %d worker(s), stable after %.0f s",
                    self.pacs.url, self.source.describe(), self.workers, self.rules.stable_seconds)
        next_health = time.monotonic()
        next_poll = next_health + self.rules.poll_seconds
        while True:
            now = time.monotonic()
            if self._stop_requests:
                if self._drain():
                    break
            elif now >= next_poll:
                self._poll()
                next_poll = now + self.rules.poll_seconds
            self._reap()
            if not self._stop_requests:
                self._schedule()
            if now >= next_health:
                self._health()
                next_health = now + self.health_seconds
            if self.once and self._polled_once and not self._running and not self._waiting():
                break
            time.sleep(0.2)
        self._health()
        log.warning("watch stopped")
        return 0

    def _waiting(self) -> bool:
        """Whether --once still has something to do now (a retry waits for the next run)."""
        return bool(self.state.rows("waiting"))

    def _poll(self) -> None:
        try:
            changes = self.source.poll()
        except PacsError as err:
            if self._pacs_ok:
                log.warning("the PACS is unreachable (%s); retrying every %.0f s", type(err).__name__,
                            self.rules.poll_seconds)
            self._pacs_ok = False
            return
        if not self._pacs_ok:
            log.warning("the PACS answers again; catching up from the persisted cursor")
        self._pacs_ok = True
        now = time.time()
        self._last_poll_ok = now
        baseline = bool(getattr(self.source, "baseline_only", False))
        for change in changes:
            key = self.key(change.study_uid)
            if baseline:
                self.state.baseline(change.study_uid, key=key, patient_id=change.patient_id,
                                    patient=self.patient(change.patient_id), instances=change.instances or 0,
                                    now=now)
                continue
            self.state.noticed(change.study_uid, key=key, patient_id=change.patient_id,
                               patient=self.patient(change.patient_id), instances=change.instances, now=now)
            log.info("%s changed", key)
        self.source.commit()  # only now: a crash before this re-reads the same changes, which is harmless
        self._polled_once = True

    def _schedule(self) -> None:
        if not self._pacs_ok:
            return
        # Every study that is ready is looked at now, even with all workers busy: one that no trigger matches is
        # marked ignored at once; one that matches keeps its place (oldest change first) until a worker is free.
        ready = self.state.ready(now=time.time(), stable_seconds=self.rules.stable_seconds, limit=200)
        for row in ready:
            if row.study_uid in self._running:
                continue
            try:
                self._consider(row)
            except PacsError as err:
                log.warning("%s: cannot look at the study now (%s); trying again", row.key, type(err).__name__)
                self._pacs_ok = False
                return

    def _consider(self, row: StudyRow) -> None:
        pending = self._matched.get(row.study_uid)
        if pending is not None and pending[0] == row.last_change:
            if len(self._running) < self.workers:  # matched earlier, nothing changed since: start it now
                del self._matched[row.study_uid]
                self._start(row, *pending[1:])
            return
        fp = fingerprint(self.pacs, row.study_uid, row.patient_id)
        if fp is None:
            self.state.update(row.study_uid, status="ignored", reason="the study is no longer in the PACS")
            log.info("%s: gone from the PACS", row.key)
            return
        if (fp.instances, fp.sop_hash) == (row.n_instances, row.sop_hash) and row.runs > 0:
            # Unchanged since its last report (e.g. the change was pacsai's own outputs arriving).
            self.state.update(row.study_uid, status="done")
            return
        if (fp.instances, fp.sop_hash) != (row.n_instances, row.sop_hash):
            attempts = 0  # a changed study starts its attempts afresh
        else:
            attempts = row.attempts
        trigger, why = match(self.rules, fp.facts)
        if trigger is None:
            self.state.update(row.study_uid, status="ignored", reason=f"no trigger matched: {why}",
                              n_instances=fp.instances, sop_hash=fp.sop_hash, attempts=0)
            log.info("%s ignored: %s", row.key, why)
            return
        if len(self._running) < self.workers:
            self._start(row, fp.patient_id, trigger, (fp.instances, fp.sop_hash), attempts)
        else:
            self._matched[row.study_uid] = (row.last_change, fp.patient_id, trigger, (fp.instances, fp.sop_hash),
                                            attempts)

    def _start(self, row: StudyRow, patient_id: str, trigger: str, fp: tuple[int, str], attempts: int) -> None:
        from pacsai.report.run import default_out_dir

        settings = self.rules.report
        params = settings.parameters(patient_id=patient_id, study_uid=row.study_uid, pacs_url=self.pacs.url,
                                     model_uri=self.model_override)
        work = self.out_root / STAGING_DIR
        work.mkdir(parents=True, exist_ok=True)
        spec_path = work / f"{row.key}.job.json"
        result_path = work / f"{row.key}.result.json"
        result_path.unlink(missing_ok=True)
        out_dir = default_out_dir(patient_id, self.out_root.resolve()) / row.study_uid
        spec = {
            "params": params.model_dump(mode="json"),
            "out_dir": str(out_dir),
            "staging_dir": str((work / f"{row.key}.partial").resolve()),
            "push": self.rules.push,
            "push_anyway": self.rules.push_anyway,
            "track": settings.track,
            "pdf": settings.pdf,
            "watch_pid": os.getpid(),
            "threads": _threads_per_report(len(self._running) + 1),
        }
        fd = os.open(str(spec_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it names the patient
        with os.fdopen(fd, "w") as fh:
            json.dump(spec, fh)
        # SQLite forbids carrying an open connection across fork(): the child inherits the parent's view of the
        # embedded index's locks and shared-memory file and, closing it, can truncate that file under every other
        # process mapping it (seen as a SIGBUS in a process storing into the same store). The watch's PACS
        # connections are closed first (they reopen on the next poll); the child opens its own.
        self.pacs.close()
        process = _fork_job(spec_path, result_path, work / f"{row.key}.log", close=self.state.lock_fds)
        now = time.time()
        self.state.update(row.study_uid, status="running", started=now, attempts=attempts + 1, trigger=trigger,
                          n_instances=fp[0], sop_hash=fp[1], patient_id=patient_id)
        self._running[row.study_uid] = _Running(row.study_uid, row.key, process, result_path, now, fp,
                                               change_at=row.last_change)
        log.warning("%s: report started (trigger %s, attempt %d, %d running)", row.key, trigger, attempts + 1,
                    len(self._running))

    def _reap(self) -> None:
        for uid, job in list(self._running.items()):
            code = job.process.poll()
            if code is None:
                continue
            del self._running[uid]
            self._finished(job, code)

    def _finished(self, job: _Running, code: int) -> None:
        row = self.state.get(job.study_uid)
        assert row is not None
        try:
            record = json.loads(job.result_path.read_text())
        except (OSError, ValueError):
            record = {"ok": False, "error": f"the report process exited with code {code} without a result; see "
                      f"{job.result_path.with_name(f'{job.key}.log')}"}
        now = time.time()
        if record.get("ok"):
            model = record.get("model") or {}
            label = f"{model.get('name')} v{model.get('version')}" if model.get("name") else ""
            # A change seen while it ran (its own outputs arriving, or more images) is looked at again: the
            # fingerprint decides whether that means another report.
            status = "waiting" if row.last_change > job.started else "done"
            latency = max(0.0, float(record.get("pushed_at", now)) - job.change_at)
            self.state.update(job.study_uid, status=status, finished=now, latency_s=latency,
                              run_seconds=now - job.started, qa_status=record.get("qa_status", ""), model=label,
                              outputs=json.dumps(record.get("objects", [])), reason="", runs=row.runs + 1,
                              next_attempt=0)
            shown = f"{latency:.1f} s after the study's last change was seen"
            log.warning("%s: report done in %.1f s, QA %s, %d object(s) stored, %d already there%s (%s)",
                        job.key, now - job.started, record.get("qa_status"), record.get("stored", 0),
                        record.get("already_present", 0), f", model {label}" if label else "", shown)
            # The spec names the patient; the job's log is only worth keeping when the report failed.
            for path in (job.result_path, job.result_path.with_name(f"{job.key}.job.json"),
                         job.result_path.with_name(f"{job.key}.log")):
                path.unlink(missing_ok=True)
            return
        error = redact(str(record.get("error", "")), {row.patient_id: row.patient, job.study_uid: job.key})
        if record.get("abandoned") or job.abandoned:
            self.state.update(job.study_uid, status="waiting", attempts=max(0, row.attempts - 1),
                              reason="abandoned at stop; runs again at the next start")
            log.warning("%s: report abandoned; it runs again at the next start", job.key)
            return
        if row.attempts >= self.rules.retry.max_attempts:
            self.state.update(job.study_uid, status="gave_up", finished=now, reason=error)
            log.error("%s: report failed %d time(s); given up: %s", job.key, row.attempts, error)
        else:
            delay = self.rules.retry.delay(row.attempts)
            self.state.update(job.study_uid, status="retry", next_attempt=now + delay, reason=error)
            log.warning("%s: report failed (attempt %d of %d), retry in %.0f s: %s", job.key, row.attempts,
                        self.rules.retry.max_attempts, delay, error)

    def _drain(self) -> bool:
        """While stopping: True once no report runs any more."""
        self._reap()
        if not self._running:
            return True
        overdue = self._stop_since is not None and time.monotonic() - self._stop_since > self.grace_seconds
        if self._stop_requests > 1 or overdue:
            for job in self._running.values():
                if not job.abandoned:
                    job.abandoned = True
                    try:
                        os.killpg(job.process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for job in list(self._running.values()):
                try:
                    job.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(job.process.pid, signal.SIGKILL)
                    job.process.wait()
            self._reap()
            shutil.rmtree(self.out_root / STAGING_DIR, ignore_errors=True)
        return not self._running

    def _health(self) -> None:
        counts = self.state.counts()
        ago = f"{time.time() - self._last_poll_ok:.0f} s ago" if self._last_poll_ok else "never"
        log.warning(
            "health: mode %s, PACS %s (last good poll %s); running %d/%d, waiting %d, retry %d, done %d, "
            "ignored %d, gave up %d", self.source.mode, "ok" if self._pacs_ok else "UNREACHABLE", ago,
            len(self._running), self.workers, counts["waiting"], counts["retry"], counts["done"],
            counts["ignored"], counts["gave_up"],
        )
