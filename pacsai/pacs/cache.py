"""On-disk instance cache: Part-10 files keyed by SOPInstanceUID, atomic writes, per-series manifests.

Layout under the cache root (``Settings.cache_dir``, env ``PACSAI_CACHE_DIR``)::

    instances/<h>/<SOPInstanceUID>.dcm   h = first hex digit of sha1(UID): UIDs share long prefixes, so
                                         their own first characters would put everything in one folder;
                                         16 folders keep a cold retrieval's mkdir calls few
    series/<SeriesInstanceUID>.json      manifest of a *complete* series: study UID, {SOP UID: size}
    series/<SeriesInstanceUID>.partial   marker: a retrieval of this series broke off (resume instance-wise)
    tmp/                                 files being written; renamed into place with os.replace

No partial file is ever visible under ``instances/``: every file is written in ``tmp/`` (same file system)
and renamed. Nothing is fsynced: a crash can lose the last files, never corrupt a visible one beyond what
the integrity check (size against the manifest) catches and re-fetches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pacsai.errors import CacheError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_UID = re.compile(r"[0-9A-Za-z._-]{1,128}")


@dataclass(frozen=True)
class SeriesManifest:
    """What a complete cached series holds.

    Attributes
    ----------
    study_uid, series_uid
        The series' identity.
    instances
        SOPInstanceUID → file size in bytes, in the order received.
    """

    study_uid: str
    series_uid: str
    instances: Mapping[str, int]


class InstanceCache:
    """The instance cache rooted at ``root`` (created on first write).

    Parameters
    ----------
    root
        Cache folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        # Hot-path state (one retrieval writes thousands of files): string paths, not pathlib, and a counter
        # for temporary names instead of tempfile's random ones.
        self._root = str(self.root)
        self._serial = itertools.count()

    def __repr__(self) -> str:
        return f"InstanceCache({self._root!r})"

    # -- paths ---------------------------------------------------------------------------------------------
    def _instance_file(self, sop_uid: str) -> str:
        _check_uid(sop_uid)
        shard = hashlib.sha1(sop_uid.encode("ascii")).hexdigest()[0]
        return f"{self._root}/instances/{shard}/{sop_uid}.dcm"

    def path_for(self, sop_uid: str) -> Path:
        """Where the instance ``sop_uid`` lives (whether or not it is there)."""
        return Path(self._instance_file(sop_uid))

    def manifest_path(self, series_uid: str) -> Path:
        """Where the manifest of series ``series_uid`` lives."""
        _check_uid(series_uid)
        return self.root / "series" / f"{series_uid}.json"

    @property
    def tmp_dir(self) -> Path:
        """Folder for files being written (same file system as the cache, so ``os.replace`` is atomic)."""
        return self.root / "tmp"

    @staticmethod
    def _ensure_dir(folder: Path | str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"cannot create cache folder {folder}: {err}; set PACSAI_CACHE_DIR to a writable folder"
            ) from err

    # -- instances -------------------------------------------------------------------------------------------
    def has(self, sop_uid: str) -> bool:
        """Whether a file for ``sop_uid`` is in the cache."""
        return os.path.isfile(self._instance_file(sop_uid))

    def open_temp(self) -> tuple[IO[bytes], Path]:
        """Open a new temporary file in the cache for writing; returns ``(file, path)``.

        Commit it with :meth:`commit` or drop it with :meth:`discard`.
        """
        # pid + thread + counter is unique among live writers; O_EXCL makes a clash an error, never a mix-up.
        name = f"{self._root}/tmp/{os.getpid()}-{threading.get_ident()}-{next(self._serial)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                fd = os.open(name, flags, 0o644)
            except FileNotFoundError:
                self._ensure_dir(self.tmp_dir)  # first write into this cache (or it was deleted meanwhile)
                fd = os.open(name, flags, 0o644)
            except FileExistsError:
                os.unlink(name)  # left by a crashed process that had the same pid
                fd = os.open(name, flags, 0o644)
        except OSError as err:
            raise CacheError(f"cannot write in cache {self.tmp_dir}: {err}; set PACSAI_CACHE_DIR") from err
        return os.fdopen(fd, "wb", buffering=0), Path(name)

    def commit(self, temp: Path | str, sop_uid: str) -> Path:
        """Atomically move a finished temporary file into place as instance ``sop_uid``; returns its path."""
        final = self._instance_file(sop_uid)
        try:
            os.replace(temp, final)
        except FileNotFoundError:
            # The shard folder does not exist yet (checking first would cost a syscall per file).
            self._ensure_dir(os.path.dirname(final))
            os.replace(temp, final)
        return Path(final)

    @staticmethod
    def discard(temp: Path) -> None:
        """Remove a temporary file that will not be committed."""
        try:
            temp.unlink()
        except FileNotFoundError:
            pass

    def put_bytes(self, sop_uid: str, data: bytes | memoryview) -> Path:
        """Write ``data`` as instance ``sop_uid`` (atomically); returns its path."""
        handle, temp = self.open_temp()
        try:
            with handle:
                handle.write(data)
        except BaseException:
            self.discard(temp)
            raise
        return self.commit(temp, sop_uid)

    def put_file(self, sop_uid: str, source: Path) -> Path:
        """Copy ``source`` into the cache as ``sop_uid`` (atomically); returns its path.

        A copy, not a hard link: a writer that rewrites the source in place would otherwise change the
        cached file behind the manifest's back.
        """
        handle, temp = self.open_temp()
        try:
            with handle, open(source, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)
        except BaseException:
            self.discard(temp)
            raise
        return self.commit(temp, sop_uid)

    # -- manifests -------------------------------------------------------------------------------------------
    def write_manifest(self, manifest: SeriesManifest) -> Path:
        """Record a complete series (atomically)."""
        path = self.manifest_path(manifest.series_uid)
        self._ensure_dir(path.parent)
        doc = {
            "version": MANIFEST_VERSION,
            "study_uid": manifest.study_uid,
            "series_uid": manifest.series_uid,
            "instances": dict(manifest.instances),
        }
        handle, temp = self.open_temp()
        with handle:
            handle.write(json.dumps(doc).encode())
        os.replace(temp, path)
        return path

    def read_manifest(self, series_uid: str) -> SeriesManifest | None:
        """The manifest of ``series_uid``, or ``None`` when there is none (or it is unreadable: then re-fetch)."""
        path = self.manifest_path(series_uid)
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != MANIFEST_VERSION or doc["series_uid"] != series_uid:
                raise ValueError("unexpected manifest version or series")
            return SeriesManifest(
                study_uid=str(doc["study_uid"]),
                series_uid=series_uid,
                instances={str(k): int(v) for k, v in doc["instances"].items()},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning(
                "ignoring unreadable cache manifest %s (%s); the series will be re-fetched", path, err
            )
            return None

    def drop_manifest(self, series_uid: str) -> None:
        """Forget that a series is complete (its instance files stay)."""
        try:
            self.manifest_path(series_uid).unlink()
        except FileNotFoundError:
            pass

    def partial_path(self, series_uid: str) -> Path:
        """Where the record of an interrupted retrieval of ``series_uid`` lives."""
        _check_uid(series_uid)
        return self.root / "series" / f"{series_uid}.partial"

    def mark_partial(self, series_uid: str) -> None:
        """Record that a retrieval of ``series_uid`` broke off: the next one lists the instances and fetches
        only those missing, instead of the whole series."""
        path = self.partial_path(series_uid)
        self._ensure_dir(path.parent)
        path.touch()

    def is_partial(self, series_uid: str) -> bool:
        """Whether a retrieval of ``series_uid`` broke off since its last complete retrieval."""
        return self.partial_path(series_uid).exists()

    def clear_partial(self, series_uid: str) -> None:
        """Forget an interrupted retrieval (the series is now complete)."""
        try:
            self.partial_path(series_uid).unlink()
        except FileNotFoundError:
            pass

    def check(self, manifest: SeriesManifest) -> tuple[list[Path], list[str]]:
        """Integrity check of a cached series.

        Returns
        -------
        paths, broken
            Paths of all instances in manifest order, and the SOPInstanceUIDs whose file is missing or whose
            size differs from the manifest (they must be fetched again).
        """
        paths: list[Path] = []
        broken: list[str] = []
        for sop_uid, size in manifest.instances.items():
            path = self.path_for(sop_uid)
            paths.append(path)
            try:
                if path.stat().st_size != size:
                    broken.append(sop_uid)
            except FileNotFoundError:
                broken.append(sop_uid)
        return paths, broken


def _check_uid(uid: str) -> None:
    # The UID becomes a file name: refuse anything that could escape the cache folder. Letters are tolerated
    # (some archives hold non-conformant UIDs); separators, "..", and names starting with "." are not.
    if not _UID.fullmatch(uid) or uid.startswith("."):
        raise CacheError(f"{uid!r} is not a usable DICOM UID (digits and dots expected); the PACS sent it")
