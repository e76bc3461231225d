"""How the watch notices new and changed studies: Orthanc's changes feed, QIDO polling, the embedded store's index.

:func:`probe` picks the best mode the PACS offers:

``orthanc-changes``
    Orthanc's REST ``/changes`` feed (``NewInstance``, ``NewSeries``, ``NewStudy``), read
    from a cursor persisted in the state file, so a restart (of the watch or of Orthanc, whose sequence numbers
    survive in its index) resumes where it stopped: nothing missed, nothing seen twice. Low latency: a change is
    seen within one poll interval, and stability is the watch's own ``stable_seconds``, not Orthanc's
    ``StableAge`` (60 s by default).
``qido-poll``
    Any DICOMweb PACS: a QIDO study search every ``poll_seconds``; a study whose NumberOfStudyRelatedInstances
    differs from the count kept in the state file has changed.
``embedded-index``
    The embedded ``file://`` store: the same search, run only when its SQLite index file changed.

A study is reported once no change was seen for ``stable_seconds`` (the service's rule, the same in every mode),
so a study still arriving is not reported half.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from pacsai.errors import PacsError
from pacsai.pacs import Pacs
from pacsai.pacs.dicomweb import DicomWebPacs
from pacsai.pacs.embedded import EmbeddedPacs
from pacsai.watch.rules import StudyFacts, is_pacsai_output
from pacsai.watch.state import WatchState

log = logging.getLogger(__name__)

ORTHANC_CURSOR = "orthanc_changes_cursor"
QIDO_INITIALISED = "qido_initialised"
#: Orthanc change types that mean "this study got new content". Not StableStudy/StableSeries: they only say that
#: Orthanc's StableAge (60 s by default) passed, and the watch keeps its own, shorter, stability rule.
STUDY_CHANGES = frozenset({"NewInstance", "NewSeries", "NewStudy"})


@dataclass(frozen=True)
class Change:
    """A study the PACS says is new or changed; ``instances`` when the source knows the count (QIDO)."""

    study_uid: str
    patient_id: str
    instances: int | None = None


class Source(Protocol):
    mode: str

    def poll(self) -> list[Change]:
        """Studies changed since the last poll (raises :class:`PacsError` when the PACS is unreachable)."""

    def commit(self) -> None:
        """The changes of the last poll are recorded: move the persisted cursor past them."""

    def describe(self) -> str:
        """One line, no identifiers: mode and cursor."""


# ---------------------------------------------------------------------------------------------------- Orthanc


def orthanc_rest_root(pacs: Pacs) -> str | None:
    """Orthanc's REST root when ``pacs`` is an Orthanc DICOMweb endpoint (``.../dicom-web``), else ``None``."""
    if not isinstance(pacs, DicomWebPacs):
        return None
    url = pacs.url.rstrip("/")
    root = url.rsplit("/", 1)[0] if "/" in url.split("://", 1)[-1] else url
    try:
        with pacs.errors("probe Orthanc's REST API"):
            answer = pacs.session.get(f"{root}/system", headers={"Accept": "application/json"})
    except PacsError as err:
        log.debug("no Orthanc REST API at %s: %s", root, err)
        return None
    if not answer.ok:
        return None
    try:
        info = answer.json()
    except ValueError:
        return None
    if not isinstance(info, dict) or "ApiVersion" not in info:
        return None
    try:
        with pacs.errors("probe Orthanc's changes feed"):
            feed = pacs.session.get(f"{root}/changes", params={"last": ""})
    except PacsError:
        return None
    return root if feed.ok else None


class OrthancChanges:
    """Orthanc's ``/changes`` feed from a persisted cursor (see the module docstring)."""

    mode = "orthanc-changes"

    def __init__(self, pacs: Pacs, state: WatchState, root: str, *, backfill: bool = False,
                 page: int = 500) -> None:
        self.pacs, self.state, self.root, self.page = pacs, state, root, page
        self._series_study: dict[str, str] = {}
        self._study_ids: dict[str, tuple[str, str]] = {}
        stored = state.get_meta(ORTHANC_CURSOR)
        if stored is None:
            self.cursor = 0 if backfill else self._last()
            state.set_meta(ORTHANC_CURSOR, str(self.cursor))
        else:
            self.cursor = int(stored)
        self._pending = self.cursor

    def _get(self, path: str, **params: Any) -> Any:
        assert isinstance(self.pacs, DicomWebPacs)  # probe() chose this source for a DICOMweb PACS only
        with self.pacs.errors(f"read Orthanc {path.split('/')[1]}"):
            answer = self.pacs.session.get(f"{self.root}{path}", params=params or None,
                                           headers={"Accept": "application/json"})
            if answer.status_code == 404:
                return None
            answer.raise_for_status()
        return answer.json()

    def _last(self) -> int:
        return int((self._get("/changes", last="") or {}).get("Last", 0))

    def _study_of(self, change: Mapping[str, Any]) -> str | None:
        kind, oid = change.get("ResourceType"), str(change.get("ID", ""))
        if kind == "Study":
            return oid
        if kind == "Instance":
            info = self._get(f"/instances/{oid}")
            if not info:
                return None  # deleted since
            series = str(info.get("ParentSeries", ""))
        elif kind == "Series":
            series = oid
        else:
            return None
        if series not in self._series_study:
            info = self._get(f"/series/{series}")
            if not info:
                return None
            self._series_study[series] = str(info.get("ParentStudy", ""))
        return self._series_study[series]

    def _uids(self, study_id: str) -> tuple[str, str] | None:
        if study_id not in self._study_ids:
            info = self._get(f"/studies/{study_id}")
            if not info:
                return None
            uid = str((info.get("MainDicomTags") or {}).get("StudyInstanceUID", ""))
            pid = str((info.get("PatientMainDicomTags") or {}).get("PatientID", ""))
            if not uid:
                return None
            self._study_ids[study_id] = (uid, pid)
        return self._study_ids[study_id]

    def poll(self) -> list[Change]:
        found: dict[str, Change] = {}
        cursor = self.cursor
        while True:
            page = self._get("/changes", since=cursor, limit=self.page) or {}
            changes = page.get("Changes") or []
            last = int(page.get("Last", cursor))
            if not changes and last < cursor:
                # Orthanc's index was recreated (sequence numbers start again): read it from the start.
                log.warning("Orthanc's change sequence went back (%d < cursor %d): its index was reset; "
                            "reading its changes from the start", last, cursor)
                cursor = 0
                continue
            for change in changes:
                if change.get("ChangeType") in STUDY_CHANGES:
                    study = self._study_of(change)
                    uids = self._uids(study) if study else None
                    if uids:
                        found[uids[0]] = Change(study_uid=uids[0], patient_id=uids[1])
                cursor = max(cursor, int(change.get("Seq", cursor)))
            if page.get("Done", True) or not changes:
                break
        self._pending = cursor
        return list(found.values())

    def commit(self) -> None:
        if self._pending != self.cursor:
            self.cursor = self._pending
            self.state.set_meta(ORTHANC_CURSOR, str(self.cursor))

    def describe(self) -> str:
        return f"{self.mode} (Orthanc REST {self.root}/changes, cursor {self.cursor})"


# ---------------------------------------------------------------------------------------------------- QIDO


class QidoPoll:
    """Study search every poll; the instance counts in the state file are the cursor (module docstring)."""

    mode = "qido-poll"

    def __init__(self, pacs: Pacs, state: WatchState, *, filters: Mapping[str, str] | None = None,
                 backfill: bool = False) -> None:
        self.pacs, self.state = pacs, state
        self.filters = dict(filters or {})
        self.backfill = backfill
        self._initialise = state.get_meta(QIDO_INITIALISED) is None and not backfill
        self.last_count = 0

    def _search(self) -> pd.DataFrame:
        return self.pacs.search_studies(**self.filters)

    def poll(self) -> list[Change]:
        frame = self._search()
        self.last_count = len(frame)
        out: list[Change] = []
        for row in frame.itertuples(index=False):
            count = getattr(row, "NumberOfStudyRelatedInstances", None)
            if count is None or pd.isna(count):
                raise PacsError(
                    f"{self.pacs.url} does not return NumberOfStudyRelatedInstances in study searches, which QIDO "
                    "polling needs to see a study change; use a PACS that does (Orthanc, dcm4chee, Google, AWS)"
                )
            out.append(Change(study_uid=str(row.StudyInstanceUID), patient_id=str(row.PatientID or ""),
                              instances=int(count)))
        return out

    @property
    def baseline_only(self) -> bool:
        """The first poll of a fresh state without backfill: record what is there, report none of it."""
        return self._initialise

    def commit(self) -> None:
        if self._initialise:
            self.state.set_meta(QIDO_INITIALISED, "1")
            self._initialise = False

    def describe(self) -> str:
        shown = f" filters {sorted(self.filters)}" if self.filters else ""
        return f"{self.mode} (QIDO study search every poll{shown})"


class EmbeddedIndex(QidoPoll):
    """The embedded store: search only when its SQLite index changed (mtime and size of the file and its WAL)."""

    mode = "embedded-index"

    def __init__(self, pacs: Pacs, state: WatchState, *, backfill: bool = False) -> None:
        super().__init__(pacs, state, backfill=backfill)
        assert isinstance(pacs, EmbeddedPacs)  # probe() chose this source for the embedded store only
        self.index = Path(pacs.path) / ".dicom-file-client.db"
        self._signature: tuple[int, ...] | None = None

    def _current(self) -> tuple[int, ...]:
        sig: list[int] = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self.index}{suffix}")
                sig += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                sig += [0, 0]
        return tuple(sig)

    def poll(self) -> list[Change]:
        assert isinstance(self.pacs, EmbeddedPacs)
        if not self.pacs.exists:
            # A store not created yet holds no study: an empty poll (on a fresh state, an empty baseline), so that
            # the first study stored into it is a new one, not taken for one that was there before the start.
            if self._signature is None:
                log.warning("the embedded store %s does not exist yet; its first study will be reported",
                            self.pacs.path)
                self._signature = ()
            return []
        signature = self._current()
        if signature == self._signature:
            return []
        changes = super().poll()
        self._signature = signature
        return changes

    def describe(self) -> str:
        return f"{self.mode} (the store's index {self.index})"


def probe(pacs: Pacs, state: WatchState, *, backfill: bool = False,
          filters: Mapping[str, str] | None = None) -> Source:
    """The best noticing mode ``pacs`` offers (module docstring)."""
    if isinstance(pacs, EmbeddedPacs):
        return EmbeddedIndex(pacs, state, backfill=backfill)
    root = orthanc_rest_root(pacs)
    if root is not None and not filters:
        return OrthancChanges(pacs, state, root, backfill=backfill)
    return QidoPoll(pacs, state, filters=filters, backfill=backfill)


# ---------------------------------------------------------------------------------------------------- one study


@dataclass(frozen=True)
class Fingerprint:
    """A study's content at one moment (pacsai's own output series left out) and what the rules need."""

    instances: int
    sop_hash: str
    facts: StudyFacts
    patient_id: str


def fingerprint(pacs: Pacs, study_uid: str, patient_id: str = "") -> Fingerprint | None:
    """Count and hash a study's instances, and gather the facts the triggers test; ``None`` if it is gone."""
    series = pacs.search_series(StudyInstanceUID=study_uid)
    if series.empty:
        return None
    ours = {
        str(r.SeriesInstanceUID) for r in series.itertuples(index=False)
        if is_pacsai_output(getattr(r, "SeriesNumber", None), getattr(r, "SeriesDescription", None),
                            getattr(r, "Modality", None))
    }
    theirs = series[~series.SeriesInstanceUID.astype(str).isin(ours)]
    instances = pacs.search_instances(StudyInstanceUID=study_uid)
    if not instances.empty:
        instances = instances[~instances.SeriesInstanceUID.astype(str).isin(ours)]
    sops = sorted(str(u) for u in instances.SOPInstanceUID) if not instances.empty else []
    digest = hashlib.sha256("\n".join(sops).encode()).hexdigest()[:16]
    patient_id = patient_id or str(series.PatientID.iloc[0] or "")
    # One series search for the patient gives the other studies' dates and modalities (ModalitiesInStudy is not
    # returned by every back end).
    everything = pacs.search_series(PatientID=patient_id) if patient_id else series
    others: dict[str, tuple[str, set[str]]] = {}
    for r in everything.itertuples(index=False):
        uid = str(r.StudyInstanceUID)
        if uid == study_uid or is_pacsai_output(getattr(r, "SeriesNumber", None),
                                                getattr(r, "SeriesDescription", None), r.Modality):
            continue
        date, mods = others.setdefault(uid, (str(getattr(r, "StudyDate", "") or ""), set()))
        if r.Modality:
            mods.add(str(r.Modality).upper())
    this = pacs.search_studies(StudyInstanceUID=study_uid)
    facts = StudyFacts(
        modalities=frozenset(str(m).upper() for m in theirs.Modality if m),
        study_date=str(this.StudyDate.iloc[0] or "") if not this.empty else "",
        study_description=str(this.StudyDescription.iloc[0] or "") if not this.empty else "",
        others=tuple((date, frozenset(mods)) for date, mods in others.values()),
    )
    return Fingerprint(instances=len(sops), sop_hash=digest, facts=facts, patient_id=patient_id)

