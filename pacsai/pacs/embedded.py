"""The embedded store: a folder of DICOM files with a SQLite index (dicomweb-client's ``DICOMfileClient``).

Built by :func:`pacsai.pacs.connect` for ``file://FOLDER`` URLs and plain folder paths. Only storing creates
the folder; every other verb on a folder that does not exist is an error naming it (a typo must not answer
"no studies match"). The index lacks StudyDescription / SeriesDescription, which :mod:`pacsai.pacs.storeindex`
keeps beside it. Retrieval copies files from the store's folder into the instance cache.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai.errors import CacheError, PacsError, PacsNotFoundError, RetrieveError, StoreError
from pacsai.pacs.address import store_url
from pacsai.pacs.base import Pacs
from pacsai.pacs.cache import InstanceCache
from pacsai.pacs.dicomjson import dicom_json_text, order_instances
from pacsai.pacs.retrieve import OnInstance
from pacsai.pacs.storeindex import (
    INDEX_FILE,
    TAGS,
    ensure_descriptions,
    lookup_descriptions,
    record_descriptions,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from dicomweb_client.api import DICOMfileClient

    from pacsai.pacs.query import Filter, Level
    from pacsai.pacs.store import BatchOutcome, Prepared, StoreItems, StoreSummary

logger = logging.getLogger(__name__)

# Which UID keys each level's description (see pacsai.pacs.storeindex).
_LEVEL_DESCRIPTION = {"studies": ("0020000D", "StudyDescription"), "series": ("0020000E", "SeriesDescription")}


class EmbeddedPacs(Pacs):
    """The embedded store in ``folder`` (see :class:`pacsai.pacs.Pacs` for the verbs).

    Attributes
    ----------
    url
        ``file://FOLDER`` (absolute).
    path
        The store's folder.
    cache
        The local instance cache.
    """

    def __init__(self, folder: Path, *, cache: InstanceCache, given_as: str | None = None) -> None:
        self.path = folder
        self.url = store_url(folder)
        self.cache = cache
        self._given_as = given_as or self.url
        self._client: DICOMfileClient | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPacs({self.url!r}, cache={str(self.cache.root)!r})"

    @property
    def exists(self) -> bool:
        """Whether the store's folder exists (only storing creates it)."""
        return self.path.is_dir()

    @property
    def client(self) -> DICOMfileClient:
        """dicomweb-client's ``DICOMfileClient`` on the folder (which must exist).

        Raises
        ------
        PacsNotFoundError
            The folder does not exist.
        """
        if not self.exists:
            raise PacsNotFoundError(
                f"no embedded store at {self.path} (from {self._given_as!r}); check --pacs / PACSAI_PACS_URL, "
                f"or create it by storing data: `pacsai pacs push --pacs {self.url} FILES` or `pacsai seed`"
            )
        if self._client is None:
            try:
                with _index_lock(self.path):
                    self._client = _open_index(self.url, self.path)
                ensure_descriptions(self.path)
            except Exception as err:  # sqlite3 / OS errors from the index
                raise PacsError(f"cannot open the embedded store {self.path}: {err}") from err
        else:
            # The index may be written by other processes (a report subprocess, a seeding CLI). A connection kept
            # open across their writes was seen to read a "malformed" image (mmap + WAL), so every operation
            # starts from a fresh connection; opening one costs ~0.1 ms.
            _reset_sqlite(self._client)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            _reset_sqlite(self._client)

    # -- verbs -----------------------------------------------------------------------------------------------
    def ping(self) -> float:
        start = time.perf_counter()
        self.client.search_for_studies(limit=1)
        return time.perf_counter() - start

    def search(
        self, level: Level, filters: Mapping[str, object] | None = None, *, limit: int | None = None
    ) -> pd.DataFrame:
        from pacsai.pacs.query import run_search

        return run_search(level, filters or {}, self._search_index, source=f"the embedded store {self.url}",
                          limit=limit)

    def retrieve_series(
        self, study_uid: str, series_uid: str, *, progress: bool = True, refresh: bool = False
    ) -> list[Path]:
        from pacsai.pacs.retrieve import retrieve_series

        return retrieve_series(StoreSource(self), study_uid, series_uid, progress=progress, refresh=refresh)

    def store(self, items: StoreItems, *, progress: bool = True) -> StoreSummary:
        from pacsai.pacs.store import store_items

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the embedded store {self.path}: {err}; pick a writable folder for --pacs"
            ) from err
        # No verification afterwards: the store has no filters, its answer is the truth.
        return store_items(
            items, label=f"the embedded store {self.url}", held=self._held, send=self._send, verify=False,
            progress=progress,
        )

    # -- the index -------------------------------------------------------------------------------------------
    def _search_index(self, level: str, flts: Sequence[Filter]) -> list[dict[str, Any]]:
        from pacsai.pacs.query import index_filters

        # dicomweb-client's index filters only a few attributes, skips date ranges with a mere log message and
        # matches LIKE case-insensitively: it gets exact UID / ID filters only, the rest is done by the caller.
        server = index_filters(level, flts)
        client = self.client
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if level == "studies":
                items = list(client.search_for_studies(search_filters=server or None))
            elif level == "series":
                items = list(client.search_for_series(search_filters=server or None))
            else:
                items = list(client.search_for_instances(search_filters=server or None))
        if level in _LEVEL_DESCRIPTION:
            uid_tag, keyword = _LEVEL_DESCRIPTION[level]
            found = lookup_descriptions(self.path, (u for i in items if (u := dicom_json_text(i, uid_tag))))
            for item in items:
                text = found.get(dicom_json_text(item, uid_tag) or "")
                if text is not None and not dicom_json_text(item, TAGS[keyword]):
                    item[TAGS[keyword]] = {"vr": "LO", "Value": [text]}
        return items

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs of a series in the store, by InstanceNumber."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            items = self.client.search_for_instances(
                search_filters={"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
            )
        return order_instances(items)

    def _held(self, study_uids: set[str]) -> set[str]:
        present: set[str] = set()
        for study_uid in sorted(study_uids):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                items = self.client.search_for_instances(search_filters={"StudyInstanceUID": study_uid})
            present.update(uid for uid in (dicom_json_text(i, "00080018") for i in items) if uid)
        return present

    def _send(self, batch: list[Prepared]) -> BatchOutcome:
        import pydicom

        from pacsai.pacs.store import quiet_pydicom, stow_outcome

        datasets = [
            item.dataset if item.dataset is not None else pydicom.dcmread(io.BytesIO(item.data)) for item in batch
        ]
        try:
            with warnings.catch_warnings(), quiet_pydicom("is deprecated"):
                # dicomweb-client 0.61 calls dcmwrite(write_like_original=...), which pydicom 3 logs as deprecated.
                warnings.simplefilter("ignore", DeprecationWarning)
                response = self.client.store_instances(datasets)
        except Exception as err:
            raise StoreError(f"the embedded store {self.url} failed to store {len(batch)} instance(s): {err}") from err
        ok, bad = stow_outcome(batch, response.to_json_dict(), source=f"the embedded store {self.url}")
        stored = set(ok)
        record_descriptions(self.path, (ds for ds in datasets if str(ds.SOPInstanceUID) in stored))
        return ok, bad

    # -- files -----------------------------------------------------------------------------------------------
    def copy_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Put one instance of the store into the cache; its path there."""
        # DICOMfileClient keeps what it stores at this path (dicomweb_client/file.py, insert_instances).
        source = self.path / "studies" / study_uid / "series" / series_uid / "instances" / sop_uid
        if source.is_file():
            return self.cache.put_file(sop_uid, source)
        return self._write_dataset(study_uid, series_uid, sop_uid)

    def _write_dataset(self, study_uid: str, series_uid: str, uid: str) -> Path:
        # Files indexed from elsewhere (a folder given to DICOMfileClient): ask the client, write Part-10 bytes.
        import pydicom

        try:
            ds = self.client.retrieve_instance(study_uid, series_uid, uid)
        except Exception as err:
            raise RetrieveError(f"the embedded store {self.url} cannot read instance {uid}: {err}") from err
        buffer = io.BytesIO()
        try:
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        except Exception as err:
            raise CacheError(f"cannot write instance {uid} from {self.url} into the cache: {err}") from err
        return self.cache.put_bytes(uid, buffer.getbuffer())


class StoreSource:
    """The :class:`pacsai.pacs.retrieve.SeriesSource` of the embedded store: files copied from its folder."""

    lists_cheaply = True  # an index query

    def __init__(self, store: EmbeddedPacs) -> None:
        self.store = store
        self.url = store.url
        self.cache = store.cache

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        return self.store.list_instances(study_uid, series_uid)

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        return len(self.list_instances(study_uid, series_uid))

    def fetch(
        self,
        study_uid: str,
        series_uid: str,
        expected: list[str] | None,
        missing: list[str] | None,
        total: int,
        done: OnInstance,
    ) -> list[str]:
        if expected is None:
            expected = self.list_instances(study_uid, series_uid)
        for uid in expected if missing is None else missing:
            path = self.store.copy_instance(study_uid, series_uid, uid)
            done(uid, path, path.stat().st_size)
        return expected


INDEX_LOCK = ".pacsai-index.lock"


@contextmanager
def _index_lock(folder: Path) -> Iterator[None]:
    """Processes opening the store's index take turns (a watch and a push may create a fresh store together).

    ``flock``, not ``fcntl``/``lockf`` record locks: dicomweb-client's folder scan opens and closes every file in
    the folder, this one included, and closing any descriptor of a file drops the process's record locks on it.
    """
    import fcntl

    with open(folder / INDEX_LOCK, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_index(url: str, folder: Path) -> DICOMfileClient:
    """dicomweb-client's client on ``folder``, without its folder scan unless the index must be rebuilt.

    Without an index file, ``DICOMfileClient`` scans every file of the folder, reading the index's own SQLite files
    (``-wal``, ``-shm``) as it goes; closing them drops this process's SQLite locks, so another process holding the
    index open takes itself for the only one and resets the shared-memory file under this one (SIGBUS, seen when a
    watch and a push created a store together). An empty index file makes it create its tables instead; the scan
    runs only for a folder that holds files but no index (files copied in by hand), under the lock, when no other
    pacsai process can have the index open.
    """
    from dicomweb_client.api import DICOMfileClient

    index = folder / INDEX_FILE
    rebuild = False
    if not index.exists():
        rebuild = any(p.is_file() and not p.name.startswith(".") for p in folder.rglob("*"))
        index.touch()
    return DICOMfileClient(url=url, update_db=rebuild)


def _reset_sqlite(client: object) -> None:
    manager = getattr(client, "_db_manager", client)  # dicomweb-client ≥ 0.60 keeps the handles there
    conn = getattr(manager, "_db_connection_handle", None)
    if conn is None:
        return
    cursor = getattr(manager, "_db_cursor_handle", None)
    try:
        if cursor is not None:
            cursor.close()
        conn.commit()
        conn.close()
    finally:
        # dicomweb-client's private handles (found with getattr above; not part of its types)
        manager._db_cursor_handle = None  # type: ignore[attr-defined]
        manager._db_connection_handle = None  # type: ignore[attr-defined]


__all__ = ["EmbeddedPacs", "StoreSource"]
