"""Keep the embedded MLflow store (``mlruns/``) usable after the project folder is copied or moved.

MLflow records absolute ``file://`` artifact locations in its SQLite database (experiments, runs, logged models,
model versions). A project copied to another folder would then read and write the *old* folder's artifacts, or
fail where it no longer exists. :func:`relocate` rewrites those locations when the store has moved: the folder the
store was last used in is kept in ``mlruns/.pacsai-location``; a store without that file (made before it existed)
is recognised by its artifact URIs, which all point into ``<old store>/artifacts``. A database copied *without* its
artifacts (the old folder still holds artifacts the new one lacks) is left pointing at the old folder: that is
where its artifacts are.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

LOCATION_FILE = ".pacsai-location"
# Every column where MLflow 3 stores an artifact location (checked against a store written by pacsai).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)
_ARTIFACTS = re.compile(r"^(?:file://)?(/.*?)/artifacts(?:/|$)")


def relocate(db: Path) -> str | None:
    """Rewrite the absolute artifact locations in ``db`` when its folder moved; return the old folder, or None.

    Parameters
    ----------
    db
        The embedded store's SQLite file (``<store>/mlflow.db``). A missing file is left alone (MLflow creates it).
    """
    if not db.is_file():
        return None
    folder = db.parent.resolve()
    marker = folder / LOCATION_FILE
    # closing(): the connection's own context manager only commits or rolls back
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        old = marker.read_text().strip() if marker.is_file() else _recorded_folder(conn)
        moved = old is not None and old != str(folder)
        if moved and old is not None and not _artifacts_came_along(conn, old, folder):
            log.info("MLflow store %s refers to artifacts in %s that were not copied with it; left pointing there",
                     folder, old)
            return None
        if moved and old is not None:
            for table, column in _present(conn):
                for before, after in ((f"file://{old}/", f"file://{folder}/"), (f"{old}/", f"{folder}/")):
                    conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (after, len(before) + 1, len(before), before),
                    )
    if moved:
        log.warning("MLflow store %s was moved from %s: its artifact locations now point here", folder, old)
    if not marker.is_file() or marker.read_text().strip() != str(folder):
        marker.write_text(str(folder) + "\n")
    return old if moved else None


def _present(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """The (table, column) pairs of :data:`COLUMNS` this database has (older MLflow schemas lack some)."""
    found = []
    for table, column in COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in columns:
            found.append((table, column))
    return found


def _artifacts_came_along(conn: sqlite3.Connection, old: str, folder: Path) -> bool:
    """Whether every artifact path of the database that exists under ``old`` exists under ``folder`` too.

    True when the store was moved (``old`` is gone) or copied whole; False when only the database was copied.
    """
    prefix = f"{old}/"
    for table, column in _present(conn):
        for (value,) in conn.execute(f"SELECT {column} FROM {table} WHERE {column} LIKE ? LIMIT 200",
                                     (f"%{prefix}%",)):
            path = str(value).removeprefix("file://")
            if path.startswith(prefix) and Path(path).exists() and not (folder / path[len(prefix):]).exists():
                return False
    return True


def _recorded_folder(conn: sqlite3.Connection) -> str | None:
    """The store folder the artifact URIs point into (``<folder>/artifacts/...``), or None if there are none."""
    for table, column in _present(conn):
        for (value,) in conn.execute(f"SELECT {column} FROM {table} WHERE {column} LIKE '%/artifacts%' LIMIT 20"):
            match = _ARTIFACTS.match(str(value))
            if match:
                return match.group(1)
    return None
