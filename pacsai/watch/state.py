"""The watch's memory: one SQLite file with every study it noticed, what it did, and the change-feed cursors.

Per study: its key (``s-`` + keyed hash of the StudyInstanceUID, the only name logs and ``--status`` use), the
instance count and a hash of the SOP Instance UIDs at processing time (so a study is reported again only when it
changed), the status, attempts, the last error (identifiers replaced by keys), timestamps and the latency from the
last change noticed to the outputs stored. The StudyInstanceUID and PatientID themselves are kept in the file (the
report needs them after a restart) but never printed; the file is created mode 0600.

Statuses: ``waiting`` (noticed, not yet stable), ``running``, ``done``, ``retry`` (failed, waits for its backoff),
``gave_up`` (failed ``max_attempts`` times; the reason is kept), ``ignored`` (no trigger matched; the reason is
kept). A ``running`` row found at start belongs to a watch that was killed: it goes back to ``waiting``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacsai.errors import ConfigError

STATUSES = ("waiting", "running", "done", "retry", "gave_up", "ignored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    patient TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    seen_instances INTEGER NOT NULL DEFAULT 0,
    n_instances INTEGER,
    sop_hash TEXT,
    trigger TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_change REAL NOT NULL,
    next_attempt REAL NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    latency_s REAL,
    run_seconds REAL,
    qa_status TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_status ON studies (status, last_change);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StudyRow:
    """One study's row (see the module docstring for the fields)."""

    study_uid: str
    key: str
    patient_id: str
    patient: str
    status: str
    seen_instances: int
    n_instances: int | None
    sop_hash: str | None
    trigger: str
    reason: str
    attempts: int
    first_seen: float
    last_change: float
    next_attempt: float
    started: float | None
    finished: float | None
    latency_s: float | None
    run_seconds: float | None
    qa_status: str
    model: str
    outputs: str
    runs: int

    @property
    def output_list(self) -> list[str]:
        return list(json.loads(self.outputs or "[]"))


class WatchState:
    """The state database. Open it with :func:`open_state`; one watch process per file (see :meth:`lock`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self._lock_fd: int | None = None

    # -- housekeeping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock(self) -> None:
        """Take the file's watch lock: a second ``pacsai watch`` on the same state would report twice."""
        import fcntl

        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise ConfigError(
                f"another pacsai watch is running on the state file {self.path}; stop it, or give this one "
                "its own --state FILE"
            ) from err
        self._lock_fd = fd

    @property
    def lock_fds(self) -> tuple[int, ...]:
        """The descriptor holding the watch lock (none before :meth:`lock`)."""
        return () if self._lock_fd is None else (self._lock_fd,)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def get_meta(self, name: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, name: str, value: str) -> None:
        self._conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                           "value = excluded.value", (name, value))

    def bind_pacs(self, url: str) -> None:
        """Record which PACS this state belongs to; refuse a state file of another PACS."""
        known = self.get_meta("pacs_url")
        if known is None:
            self.set_meta("pacs_url", url)
        elif known != url:
            raise ConfigError(
                f"the state file {self.path} belongs to the PACS {known}, not {url}; give this PACS its own "
                "--state FILE"
            )

    def recover(self) -> int:
        """Rows left ``running`` by a watch that was stopped or killed go back to ``waiting``; returns how many."""
        cur = self._conn.execute("UPDATE studies SET status = 'waiting', next_attempt = 0 WHERE status = 'running'")
        return int(cur.rowcount)

    # -- studies ---------------------------------------------------------------------------------------------
    def get(self, study_uid: str) -> StudyRow | None:
        row = self._conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return None if row is None else StudyRow(**dict(row))

    def noticed(self, study_uid: str, *, key: str, patient_id: str, patient: str, instances: int | None,
                now: float) -> None:
        """A change of the study was seen at ``now``: it waits to be stable (unless it is running right now).

        ``instances`` is the count the source reported (``None`` when it does not say); a count equal to the one
        seen before is not a change (a QIDO poll sees every study every time).
        """
        with self.transaction() as conn:
            row = conn.execute("SELECT status, seen_instances FROM studies WHERE study_uid = ?",
                               (study_uid,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO studies (study_uid, key, patient_id, patient, status, seen_instances, first_seen, "
                    "last_change) VALUES (?, ?, ?, ?, 'waiting', ?, ?, ?)",
                    (study_uid, key, patient_id, patient, int(instances or 0), now, now),
                )
                return
            if instances is not None and int(row["seen_instances"]) == int(instances):
                return
            status = row["status"]
            # A study that changed deserves a fresh look, even one given up on or ignored (its fingerprint decides
            # whether anything is run again); a running one keeps running and is looked at again when it ends;
            # one waiting for a retry keeps its backoff.
            new_status = status if status in ("running", "retry") else "waiting"
            conn.execute(
                "UPDATE studies SET status = ?, last_change = ?, seen_instances = COALESCE(?, seen_instances), "
                "patient_id = CASE WHEN ? != '' THEN ? ELSE patient_id END, "
                "next_attempt = CASE WHEN ? = 'retry' THEN next_attempt ELSE 0 END WHERE study_uid = ?",
                (new_status, now, instances, patient_id, patient_id, status, study_uid),
            )

    def baseline(self, study_uid: str, *, key: str, patient_id: str, patient: str, instances: int,
                 now: float) -> None:
        """Record a study that was in the PACS before the first start (no backfill): seen, not to be reported."""
        self._conn.execute(
            "INSERT OR IGNORE INTO studies (study_uid, key, patient_id, patient, status, seen_instances, reason, "
            "first_seen, last_change) VALUES (?, ?, ?, ?, 'ignored', ?, 'in the PACS before the first start "
            "(rules: backfill: true reports those)', ?, ?)",
            (study_uid, key, patient_id, patient, instances, now, now),
        )

    def ready(self, *, now: float, stable_seconds: float, limit: int) -> list[StudyRow]:
        """Studies quiet for ``stable_seconds`` whose retry time has come, oldest change first."""
        rows = self._conn.execute(
            "SELECT * FROM studies WHERE ((status = 'waiting') OR (status = 'retry' AND next_attempt <= ?)) "
            "AND last_change <= ? ORDER BY last_change LIMIT ?",
            (now, now - stable_seconds, limit),
        ).fetchall()
        return [StudyRow(**dict(r)) for r in rows]

    def update(self, study_uid: str, **values: Any) -> None:
        if not values:
            return
        unknown = set(values) - set(StudyRow.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown state columns {sorted(unknown)}")
        cols = ", ".join(f"{k} = ?" for k in values)
        self._conn.execute(f"UPDATE studies SET {cols} WHERE study_uid = ?", (*values.values(), study_uid))

    def rows(self, *statuses: str, order: str = "last_change DESC", limit: int | None = None) -> list[StudyRow]:
        query = "SELECT * FROM studies"
        args: list[Any] = []
        if statuses:
            query += f" WHERE status IN ({', '.join('?' for _ in statuses)})"
            args.extend(statuses)
        if order not in ("last_change DESC", "finished DESC", "last_change"):
            raise ValueError(order)
        query += f" ORDER BY {order}"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [StudyRow(**dict(r)) for r in self._conn.execute(query, args).fetchall()]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for row in self._conn.execute("SELECT status, COUNT(*) AS n FROM studies GROUP BY status"):
            out[row["status"]] = int(row["n"])
        return out


def default_state_path(pacs_url: str) -> Path:
    """Beside the embedded store (``./pacs`` → ``./pacs.watch.sqlite``); for a DICOMweb PACS in the working
    directory, one file per server (``pacsai-watch-<hash>.sqlite``)."""
    from pacsai.pacs.address import embedded_path

    if pacs_url.startswith("file:"):
        store = embedded_path(pacs_url)
        return store.with_name(store.name + ".watch.sqlite")
    import hashlib

    return Path(f"pacsai-watch-{hashlib.sha256(pacs_url.encode()).hexdigest()[:8]}.sqlite")


def open_state(path: str | Path) -> WatchState:
    """Open (creating, mode 0600) the state database at ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600))
        return WatchState(path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"cannot open the watch state {path}: {err}; pass a writable --state FILE") from err


def redact(text: str, identifiers: Mapping[str, str]) -> str:
    """``text`` with each identifier replaced by its key (error messages can quote PatientIDs and UIDs)."""
    for value, key in sorted(identifiers.items(), key=lambda kv: -len(kv[0])):
        if value:
            text = text.replace(value, key)
    return text


def now() -> float:
    return time.time()
