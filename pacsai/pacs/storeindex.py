"""pacsai's additions to the embedded store's SQLite index: the descriptions dicomweb-client does not keep.

dicomweb-client's ``DICOMfileClient`` indexes a fixed set of attributes (its INSERTs have a fixed number of
values, so its tables cannot gain columns) and StudyDescription / SeriesDescription are not among them: the
store answered them as None although the files carry them. They live here, in a table of the same index file
(``.dicom-file-client.db``), written when instances are stored. An index from before this table (or one that
dicomweb-client rebuilt) is filled once from the files it lists, one file per series: the version in
``pacsai_meta`` says whether that was done.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_FILE = ".dicom-file-client.db"
VERSION = "1"
#: keyword → (level key, DICOM JSON tag of the description).
DESCRIPTIONS = {"StudyDescription": "StudyInstanceUID", "SeriesDescription": "SeriesInstanceUID"}
TAGS = {"StudyDescription": "00081030", "SeriesDescription": "0008103E"}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pacsai_meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS pacsai_descriptions (uid TEXT PRIMARY KEY, keyword TEXT NOT NULL, value TEXT)",
)


@contextmanager
def _open(folder: Path) -> Iterator[sqlite3.Connection]:
    # A connection per call: other processes (a report, a seeding CLI) write the same index.
    with closing(sqlite3.connect(str(folder / INDEX_FILE), timeout=30)) as conn, conn:
        for statement in _SCHEMA:
            conn.execute(statement)
        yield conn


def ensure_descriptions(folder: Path) -> None:
    """Fill the descriptions of an index written before pacsai kept them (once; later calls cost one query)."""
    with _open(folder) as conn:
        row = conn.execute("SELECT value FROM pacsai_meta WHERE key = 'descriptions'").fetchone()
        if row is not None and row[0] == VERSION:
            return
        files = conn.execute(
            "SELECT SeriesInstanceUID, MIN(_file_path) FROM instances GROUP BY SeriesInstanceUID"
        ).fetchall()
        rows = list(_rows_from_files(folder / str(path) for _, path in files if path))
        conn.executemany("INSERT OR REPLACE INTO pacsai_descriptions VALUES (?, ?, ?)", rows)
        conn.execute("INSERT OR REPLACE INTO pacsai_meta VALUES ('descriptions', ?)", (VERSION,))
    if files:
        logger.info("indexed the descriptions of %d series in the embedded store %s", len(files), folder)


def _rows_from_files(paths: Iterable[Path]) -> Iterator[tuple[str, str, str]]:
    import pydicom

    for path in paths:
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, force=True, specific_tags=[*DESCRIPTIONS, *DESCRIPTIONS.values()]
            )
        except Exception as err:  # an unreadable file loses its description, not the store
            logger.warning("cannot read the descriptions of %s: %s", path, err)
            continue
        yield from description_rows([ds])


def description_rows(datasets: Iterable[object]) -> Iterator[tuple[str, str, str]]:
    """``(uid, keyword, description)`` for the study and series descriptions the datasets carry."""
    for ds in datasets:
        for keyword, uid_keyword in DESCRIPTIONS.items():
            value = getattr(ds, keyword, None)
            uid = getattr(ds, uid_keyword, None)
            if value and uid:
                yield str(uid), keyword, str(value)


def record_descriptions(folder: Path, datasets: Iterable[object]) -> None:
    """Record the descriptions of newly stored instances."""
    rows = list(description_rows(datasets))
    if rows:
        with _open(folder) as conn:
            conn.executemany("INSERT OR REPLACE INTO pacsai_descriptions VALUES (?, ?, ?)", rows)


def lookup_descriptions(folder: Path, uids: Iterable[str]) -> dict[str, str]:
    """``{uid: description}`` for the study or series UIDs that have one."""
    wanted = sorted(set(uids))
    found: dict[str, str] = {}
    with _open(folder) as conn:
        for start in range(0, len(wanted), 500):  # SQLite caps the number of parameters
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT uid, value FROM pacsai_descriptions WHERE uid IN ({marks})"
            found.update({str(uid): str(value) for uid, value in conn.execute(query, chunk)})
    return found


__all__ = ["INDEX_FILE", "TAGS", "ensure_descriptions", "lookup_descriptions", "record_descriptions"]
