"""② A cohort: a PACS query plus selection rules → (patient, study, image series, RTSTRUCT) rows.

A :class:`Cohort` is what a training or validation run reads. It is built once from the PACS
(:func:`select_cohort`; each image series gets the RTSTRUCT that :func:`pacsai.structure_sets.choose` picks, the
rule the report and notebook 01 use), has a stable :attr:`Cohort.content_hash` (sha256 over its sorted UIDs, so
the same data gives the same hash whatever the order of the query answers), is saved and restored as a parquet
manifest, and splits deterministically by patient (:func:`split_patients`: a hash of seed and patient ID orders
the patients, so adding a patient never moves the others between splits... except where the split sizes change).

What goes into MLflow is :meth:`Cohort.pseudonymised`: patients as pseudonyms, UIDs as keyed hashes
(:func:`pacsai.privacy.hash_uid`), the content hash of the real cohort kept. A run that needs the images again
(the validation notebook) re-finds them in the PACS by those hashes (:func:`resolve_cohort`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pacsai import privacy
from pacsai.errors import ConfigError, PacsaiError

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs
    from pacsai.structure_sets import StructureSet

logger = logging.getLogger(__name__)

COLUMNS = (
    "patient_id",
    "patient_name",
    "study_instance_uid",
    "series_instance_uid",
    "rtstruct_series_uid",
    "rtstruct_sop_instance_uid",
    "roi_names",
)
UID_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "rtstruct_series_uid",
    "rtstruct_sop_instance_uid",
)
SPLITS = ("train", "val", "test")
PARQUET_KEY = b"pacsai.cohort.query"


@dataclass(frozen=True)
class CohortQuery:
    """What to select from the PACS.

    Attributes
    ----------
    modality
        Modality of the image series (``CT``).
    structures
        ROI names every selected RTSTRUCT must contain (case-insensitive). Empty: any RTSTRUCT.
    require_rtstruct
        Keep only image series referenced by an RTSTRUCT of the same study.
    study_filters
        Extra QIDO filters at study level (e.g. ``{"StudyDescription": "Thorax*"}``).
    max_patients
        Keep at most this many patients (the first by patient ID); ``None`` keeps all.
    """

    modality: str = "CT"
    structures: tuple[str, ...] = ()
    require_rtstruct: bool = True
    study_filters: Mapping[str, str] = field(default_factory=dict)
    max_patients: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, structures: Sequence[str] = ()) -> CohortQuery:
        """Build from the experiment YAML's ``cohort:`` mapping (unknown keys are an error)."""
        known = {"modality", "structures", "require_rtstruct", "study_filters", "max_patients"}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown cohort keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(
            modality=str(cfg.get("modality", "CT")),
            structures=tuple(cfg.get("structures", structures) or ()),
            require_rtstruct=bool(cfg.get("require_rtstruct", True)),
            study_filters=dict(cfg.get("study_filters") or {}),
            max_patients=None if cfg.get("max_patients") is None else int(cfg["max_patients"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "structures": list(self.structures),
            "require_rtstruct": self.require_rtstruct,
            "study_filters": dict(self.study_filters),
            "max_patients": self.max_patients,
        }


@dataclass(frozen=True, eq=False)
class Cohort:
    """A selected cohort: the query and one row per image series (columns :data:`COLUMNS`).

    The table may hold identifiers (``patient_id``, ``patient_name``, the UIDs); what goes into MLflow is
    :meth:`pseudonymised`, or goes through :meth:`manifest` / :meth:`to_parquet` with a ``patient_label``.

    Attributes
    ----------
    pseudonymized
        ``patient_id`` are pseudonyms already (a cohort read back from MLflow) and are not relabelled again.
    uids_hashed
        The UID columns hold keyed hashes (:func:`pacsai.privacy.hash_uid`), not UIDs: the PACS cannot be asked
        for them; :func:`resolve_cohort` finds the series again.
    source_hash
        For a cohort with hashed UIDs: :attr:`content_hash` of the real cohort it stands for (empty: none known,
        e.g. after :meth:`subset`).
    withheld
        The real cohort's identifiers, kept in memory only so that :func:`pacsai.tracking.start_run` can check
        parameters and tags against them (:meth:`identifiers`); never written anywhere.
    """

    query: CohortQuery
    table: pd.DataFrame
    pseudonymized: bool = False
    uids_hashed: bool = False
    source_hash: str = ""
    withheld: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.table.columns]
        if missing:
            raise PacsaiError(f"cohort table lacks columns {missing}; build it with select_cohort")
        # a private sorted copy: the hash and the splits never depend on the order the PACS answered in
        table = self.table.loc[:, list(COLUMNS)].sort_values(
            ["patient_id", "study_instance_uid", "series_instance_uid"]
        )
        object.__setattr__(self, "table", table.reset_index(drop=True))

    def __len__(self) -> int:
        return len(self.table)

    @property
    def patients(self) -> list[str]:
        """Patient IDs, sorted."""
        return sorted(self.table["patient_id"].astype(str).unique())

    @property
    def content_hash(self) -> str:
        """sha256 (hex) over the sorted UID tuples of every row, and the structure list.

        A cohort with hashed UIDs answers the hash of the real cohort it stands for (:attr:`source_hash`), so a
        run's ``pacsai.cohort_hash`` and its logged manifest agree with the data trained on.
        """
        if self.source_hash:
            return self.source_hash
        h = hashlib.sha256()
        rows = sorted(tuple(str(r[c]) for c in UID_COLUMNS) for _, r in self.table.iterrows())
        for row in rows:
            h.update("\x1f".join(row).encode())
            h.update(b"\x1e")
        h.update("\x1f".join(self.query.structures).encode())
        return h.hexdigest()

    def identifiers(self) -> list[str]:
        """Every patient ID and name in the table (what must never reach MLflow without opt-in)."""
        if self.pseudonymized:
            return list(self.withheld)
        ids = {str(v) for v in self.table["patient_id"] if v}
        for name in self.table["patient_name"]:
            if name:
                ids.add(str(name))
                ids.add(str(name).replace("^", " ").strip())
        return sorted(ids)

    def labelled(self, patient_label: Callable[[str], str] | None = None) -> pd.DataFrame:
        """The table with ``patient_id`` replaced by ``patient_label(patient_id)`` and names removed."""
        table = self.table.copy()
        if patient_label is not None and not self.pseudonymized:
            table["patient_id"] = [patient_label(str(p)) for p in table["patient_id"]]
            table["patient_name"] = ""
        return table

    def manifest(self, *, patient_label: Callable[[str], str] | None = None) -> dict[str, Any]:
        """A JSON-able manifest: query, content hash and the UIDs of every row."""
        table = self.labelled(patient_label)
        rows = [
            {
                "patient": str(r.patient_id),
                "study_instance_uid": r.study_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "rtstruct_series_uid": r.rtstruct_series_uid,
                "rtstruct_sop_instance_uid": r.rtstruct_sop_instance_uid,
            }
            for r in table.itertuples()
        ]
        return {"query": self.query.to_dict(), "content_hash": self.content_hash, "rows": rows}

    def pseudonymised(self, key: str | bytes) -> Cohort:
        """The cohort as it goes into MLflow: patients as pseudonyms, no names, UIDs as keyed hashes.

        The same labels as everything else a run logs (:func:`pacsai.tracking.pseudonymize`,
        :func:`pacsai.privacy.hash_uid` under the store's key), so a series is ``u-...`` in the parquet, the
        manifest, ``split.json`` and the report alike. :attr:`content_hash` stays that of this cohort.

        Parameters
        ----------
        key
            The store's pseudonym key (:func:`pacsai.tracking.pseudonym_key`).
        """
        from pacsai.tracking import pseudonymize

        table = self.labelled(lambda patient_id: pseudonymize(patient_id, key))
        if not self.uids_hashed:
            for column in UID_COLUMNS:  # "" (no RTSTRUCT) stays empty: it names nothing
                table[column] = [privacy.hash_uid(str(u), key) if u else "" for u in table[column]]
        return Cohort(
            query=self.query,
            table=table,
            pseudonymized=True,
            uids_hashed=True,
            source_hash=self.content_hash,
            withheld=tuple(self.identifiers()),
        )

    def to_parquet(self, path: str | Path, *, patient_label: Callable[[str], str] | None = None) -> Path:
        """Write the table (pseudonymised with ``patient_label`` if given) with the query in the file metadata.

        A cohort with hashed UIDs records that, and the content hash of the cohort it stands for.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.labelled(patient_label)
        table["roi_names"] = [list(v) for v in table["roi_names"]]
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        pseudo = self.pseudonymized or patient_label is not None
        record = {**self.query.to_dict(), "pseudonymized": pseudo, "uids_hashed": self.uids_hashed,
                  "source_hash": self.source_hash}
        meta[PARQUET_KEY] = json.dumps(record).encode()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow.replace_schema_metadata(meta), path)
        return path

    @classmethod
    def from_parquet(cls, path: str | Path) -> Cohort:
        """Read a manifest written by :meth:`to_parquet`."""
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_table(path)
        except (OSError, ValueError) as err:
            raise PacsaiError(f"cannot read cohort manifest {path}: {err}") from err
        raw = (arrow.schema.metadata or {}).get(PARQUET_KEY)
        if raw is None:
            raise PacsaiError(f"{path} is not a pacsai cohort manifest (no {PARQUET_KEY.decode()} metadata)")
        q = json.loads(raw)
        query = CohortQuery(
            modality=q["modality"],
            structures=tuple(q["structures"]),
            require_rtstruct=q["require_rtstruct"],
            study_filters=q["study_filters"],
            max_patients=q["max_patients"],
        )
        table = arrow.to_pandas()
        table["roi_names"] = [tuple(str(x) for x in v) for v in table["roi_names"]]
        table["patient_name"] = table["patient_name"].fillna("").astype(str)
        for column in UID_COLUMNS:
            table[column] = table[column].fillna("").astype(str)
        return cls(
            query=query,
            table=table,
            pseudonymized=bool(q.get("pseudonymized", False)),
            uids_hashed=bool(q.get("uids_hashed", False)),
            source_hash=str(q.get("source_hash") or ""),
        )

    def subset(self, patients: Iterable[str]) -> Cohort:
        """The rows of the given patients (a subset of a cohort with hashed UIDs knows no real content hash)."""
        keep = set(patients)
        table = self.table[self.table["patient_id"].isin(keep)]
        return Cohort(
            query=self.query,
            table=table,
            pseudonymized=self.pseudonymized,
            uids_hashed=self.uids_hashed,
            source_hash=self.source_hash if len(table) == len(self.table) else "",
            withheld=self.withheld,
        )

    def split(self, *, seed: int = 0, fractions: Mapping[str, float] | None = None) -> dict[str, list[str]]:
        """Deterministic patient split; see :func:`split_patients`."""
        return split_patients(self.patients, seed=seed, fractions=fractions)


def split_patients(
    patients: Iterable[str], *, seed: int = 0, fractions: Mapping[str, float] | None = None
) -> dict[str, list[str]]:
    """Split patients into ``train`` / ``val`` / ``test`` by a hash of seed and patient ID.

    Patients are ordered by ``sha256(f"{seed}:{patient_id}")``; the first go to ``test``, the next to ``val``,
    the rest to ``train``. Sizes are ``round(n * fraction)`` but at least one patient each for ``val`` and
    ``test`` when there are at least three patients (two: ``train`` and ``test``; one: ``train``).

    Parameters
    ----------
    patients
        Patient IDs (or pseudonyms; the split depends only on these strings and the seed).
    seed
        Changes the assignment.
    fractions
        ``{"val": f, "test": f}`` (default 0.2 each); ``train`` takes the rest.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    fr = {"val": 0.2, "test": 0.2, **dict(fractions or {})}
    if fr["val"] < 0 or fr["test"] < 0 or fr["val"] + fr["test"] >= 1:
        raise ConfigError(f"split fractions val={fr['val']}, test={fr['test']} must be ≥ 0 and sum to < 1")
    ordered = sorted(
        set(map(str, patients)), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()
    )
    n = len(ordered)
    n_test = round(n * fr["test"])
    n_val = round(n * fr["val"])
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    elif n == 2:
        n_test, n_val = 1, 0
    else:
        n_test, n_val = 0, 0
    while n - n_test - n_val < 1 and n_val + n_test > 0:  # training keeps at least one patient
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return {
        "train": sorted(ordered[n_test + n_val :]),
        "val": sorted(ordered[n_test : n_test + n_val]),
        "test": sorted(ordered[:n_test]),
    }


# ---------------------------------------------------------------------------------------------------- selection


def _col(frame: pd.DataFrame, *names: str) -> pd.Series:
    for name in names:
        if name in frame.columns:
            return frame[name]
    raise PacsaiError(f"PACS search answer lacks any of the columns {names}; got {list(frame.columns)}")


@dataclass(frozen=True)
class _Study:
    """One study as selection sees it: its image series of the query's modality and the structure sets that hold
    every wanted ROI (headers only, no contour decoded)."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    image_series: tuple[str, ...]
    structure_sets: tuple[StructureSet, ...]


def _read_study(pacs: Pacs, study: pd.Series, query: CohortQuery, skipped: list[str]) -> _Study | None:
    """The study's image series and usable RTSTRUCT headers (retrieved into the instance cache; they are small);
    None when it has no image series of ``query.modality``. RTSTRUCTs lacking a wanted ROI go to ``skipped``."""
    from pacsai import structure_sets

    study_uid = str(study["StudyInstanceUID"])
    series = pacs.search_series(StudyInstanceUID=study_uid)
    if series.empty:
        return None
    modality = _col(series, "Modality").astype(str)
    images = tuple(str(uid) for uid in _col(series[modality == query.modality], "SeriesInstanceUID"))
    if not images:
        return None
    wanted = {s.lower() for s in query.structures}
    headers: list[StructureSet] = []
    for rt_series_uid in _col(series[modality == "RTSTRUCT"], "SeriesInstanceUID"):
        for path in pacs.retrieve_series(study_uid, str(rt_series_uid), progress=False):
            header = structure_sets.read_header(path)
            missing = wanted - {n.lower() for n in header.roi_names}
            if missing:
                skipped.append(f"RTSTRUCT {header.sop_instance_uid} lacks {sorted(missing)}")
                continue
            headers.append(header)
    return _Study(study_uid, _text(study.get("PatientID")), _text(study.get("PatientName")), images, tuple(headers))


def _structure_set_for(study: _Study, image_series_uid: str) -> StructureSet | None:
    """The RTSTRUCT of ``image_series_uid`` by :func:`pacsai.structure_sets.choose`, the rule of the report and
    notebook 01 (docs/structure_set_selection.md), or None.

    One more condition for a training label: a structure set that references no series is paired only in a
    study with one image series; with several, nothing says which image its contours were drawn on.
    """
    from pacsai import structure_sets

    chosen = structure_sets.choose(study.structure_sets, image_series_uid=image_series_uid)
    if chosen is not None and not chosen.referenced_series and len(study.image_series) > 1:
        return None
    return chosen


def _row(study: _Study, image_series_uid: str, chosen: StructureSet | None) -> dict[str, Any]:
    return {
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": image_series_uid,
        "rtstruct_series_uid": chosen.series_instance_uid if chosen is not None else "",
        "rtstruct_sop_instance_uid": chosen.sop_instance_uid if chosen is not None else "",
        "roi_names": chosen.roi_names if chosen is not None else (),
    }


def _search_studies(pacs: Pacs, query: CohortQuery) -> pd.DataFrame:
    studies = pacs.search_studies(**dict(query.study_filters))
    if studies.empty:
        raise PacsaiError(
            f"no study on {pacs.url} matches {dict(query.study_filters)}; seed or push data first"
        )
    _col(studies, "StudyInstanceUID")
    return studies.drop_duplicates("StudyInstanceUID")


def select_cohort(pacs: Pacs, query: CohortQuery, *, progress: bool = False) -> Cohort:
    """Run ``query`` against ``pacs`` → :class:`Cohort`.

    Each image series of ``query.modality`` is paired with the RTSTRUCT of its study that
    :func:`pacsai.structure_sets.choose` picks among those whose ROI names include every name in
    ``query.structures`` (case-insensitive): one that references the series (one that references none only in a
    study with a single image series), the latest by StructureSetDate/Time, then most ROIs, then the lowest SOP
    Instance UID; pacsai's own never. The report and notebook 01 pick by the same rule
    (docs/structure_set_selection.md).

    Raises
    ------
    PacsaiError
        Nothing matches the query (the message says what was found).
    """
    from tqdm.auto import tqdm

    studies = _search_studies(pacs, query)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for _, study_row in tqdm(list(studies.iterrows()), desc="cohort", unit="study", disable=not progress):
        study = _read_study(pacs, study_row, query, skipped)
        if study is None:
            continue
        for image_uid in study.image_series:
            chosen = _structure_set_for(study, image_uid)
            if chosen is None and query.require_rtstruct:
                continue
            rows.append(_row(study, image_uid, chosen))
    if not rows:
        detail = "; ".join(skipped[:3]) or f"no {query.modality} series with an RTSTRUCT"
        raise PacsaiError(f"no series on {pacs.url} matches the cohort query {query.to_dict()}: {detail}")
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if query.max_patients is not None:
        keep = sorted(table["patient_id"].unique())[: query.max_patients]
        table = table[table["patient_id"].isin(keep)]
    cohort = Cohort(query=query, table=table)
    logger.info(
        "cohort: %d series of %d patients (hash %s)",
        len(cohort),
        len(cohort.patients),
        cohort.content_hash[:12],
    )
    return cohort


def resolve_cohort(pacs: Pacs, logged: Cohort, *, key: str | bytes, progress: bool = False) -> Cohort:
    """The cohort behind ``logged`` (hashed UIDs, as MLflow keeps it) with its real UIDs, found again in ``pacs``.

    The studies matching the logged query are hashed under ``key`` and compared with the logged hashes; in each
    study found, the image series and the very RTSTRUCT instance that were logged (not the rule's choice today: a
    revision added since must not change the reference) are looked up the same way. Patients stay as logged
    (pseudonyms); the real IDs and names are kept only for :meth:`Cohort.identifiers`.

    Parameters
    ----------
    pacs
        The PACS the cohort was selected from.
    logged
        A cohort read back from a run (:meth:`Cohort.from_parquet`). One whose UIDs are not hashed (a run that
        logged identifiers, ``PACSAI_LOG_PHI=true``, or one from before UIDs were hashed) is returned as it is.
    key
        The pseudonym key of the MLflow store the cohort was logged to (:func:`pacsai.tracking.pseudonym_key`).

    Raises
    ------
    PacsaiError
        A logged series or its RTSTRUCT is not in ``pacs`` (or ``key`` is not the store's): the message counts
        them and says what to check.
    """
    if not logged.uids_hashed:
        return logged
    from tqdm.auto import tqdm

    def label(uid: str) -> str:
        return privacy.hash_uid(uid, key)

    studies = {label(str(r["StudyInstanceUID"])): r for _, r in _search_studies(pacs, logged.query).iterrows()}
    rows: list[dict[str, Any]] = []
    identifiers: set[str] = set()
    missing: list[str] = []
    groups = list(logged.table.groupby("study_instance_uid", sort=True))
    for study_hash, logged_rows in tqdm(groups, desc="cohort", unit="study", disable=not progress):
        study_row = studies.get(str(study_hash))
        study = None if study_row is None else _read_study(pacs, study_row, logged.query, [])
        for r in logged_rows.itertuples():
            row = None if study is None else _find_logged_row(study, r, label)
            if row is None:
                missing.append(f"series {r.series_instance_uid} of {r.patient_id}")
                continue
            identifiers |= {v for v in (row.pop("patient_id"), row.pop("patient_name")) if v}
            rows.append({**row, "patient_id": str(r.patient_id), "patient_name": ""})
    if missing:
        raise PacsaiError(
            f"{len(missing)} of {len(logged)} logged series are not in {pacs.url} ({'; '.join(missing[:3])}) or "
            "their RTSTRUCT is gone: use the PACS the cohort was selected from, and the pseudonym key of the MLflow "
            "store it was logged to (PACSAI_PSEUDONYM_KEY, or mlruns/.pseudonym_key beside the store)"
        )
    names = {n for name in identifiers for n in (name, name.replace("^", " ").strip())}
    return Cohort(query=logged.query, table=pd.DataFrame(rows, columns=list(COLUMNS)),
                  pseudonymized=logged.pseudonymized, withheld=tuple(sorted(names)))


def _find_logged_row(study: _Study, logged: Any, label: Callable[[str], str]) -> dict[str, Any] | None:
    """The row of ``study`` whose image series and RTSTRUCT hash to those of ``logged``, or None."""
    image = next((uid for uid in study.image_series if label(uid) == logged.series_instance_uid), None)
    if image is None:
        return None
    if not logged.rtstruct_sop_instance_uid:
        return _row(study, image, None)
    chosen = next(
        (h for h in study.structure_sets if label(h.sop_instance_uid) == logged.rtstruct_sop_instance_uid), None
    )
    return None if chosen is None else _row(study, image, chosen)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # None or NaN from pandas
        return ""
    return str(value)
