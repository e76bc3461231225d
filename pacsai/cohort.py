"""② A cohort: a PACS query plus selection rules → (patient, study, image series, RTSTRUCT) rows.

A :class:`Cohort` is what a training or validation run reads. It is built once from the PACS
(:func:`select_cohort`), has a stable :attr:`Cohort.content_hash` (sha256 over its sorted UIDs, so the same
data gives the same hash whatever the order of the query answers), is saved and restored as a parquet manifest,
and splits deterministically by patient (:func:`split_patients`: a hash of seed and patient ID orders the
patients, so adding a patient never moves the others between splits... except where the split sizes change).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pacsai.errors import ConfigError, PacsaiError, PacsaiWarning, StructureError

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs

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

    The table may hold identifiers (``patient_id``, ``patient_name``); everything that leaves the machine
    goes through :meth:`manifest` / :meth:`to_parquet` with a ``patient_label`` that pseudonymises them.
    ``pseudonymized`` marks a cohort read back from such a manifest: its ``patient_id`` are pseudonyms already
    and are not relabelled again.
    """

    query: CohortQuery
    table: pd.DataFrame
    pseudonymized: bool = False

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
        """sha256 (hex) over the sorted UID tuples of every row, and the structure list."""
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
            return []
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

    def to_parquet(self, path: str | Path, *, patient_label: Callable[[str], str] | None = None) -> Path:
        """Write the table (pseudonymised with ``patient_label`` if given) with the query in the file metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.labelled(patient_label)
        table["roi_names"] = [list(v) for v in table["roi_names"]]
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        pseudo = self.pseudonymized or patient_label is not None
        meta[PARQUET_KEY] = json.dumps({**self.query.to_dict(), "pseudonymized": pseudo}).encode()
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
        return cls(query=query, table=table, pseudonymized=bool(q.get("pseudonymized", False)))

    def subset(self, patients: Iterable[str]) -> Cohort:
        """The rows of the given patients."""
        keep = set(patients)
        return Cohort(
            query=self.query,
            table=self.table[self.table["patient_id"].isin(keep)],
            pseudonymized=self.pseudonymized,
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


def read_rtstruct_header(path: str | Path) -> tuple[tuple[str, ...], set[str]]:
    """ROI names of an RTSTRUCT and the image series UIDs it references (no contour data decoded)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:
        raise StructureError(f"cannot read RTSTRUCT {path}: {err}") from err
    names = tuple(str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", []))
    series: set[str] = set()
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref.get("RTReferencedStudySequence", []):
            for s in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in s:
                    series.add(str(s.SeriesInstanceUID))
    return names, series


def select_cohort(pacs: Pacs, query: CohortQuery, *, progress: bool = False) -> Cohort:
    """Run ``query`` against ``pacs`` → :class:`Cohort`.

    Image series of ``query.modality`` are paired with an RTSTRUCT of the same study that references them
    (or, where the RTSTRUCT names no series, the study's only image series) and whose ROI names include every
    name in ``query.structures`` (case-insensitive). Several candidate RTSTRUCTs: the one with the most ROIs,
    then the lowest SOP instance UID, with a :class:`PacsaiWarning`. RTSTRUCT headers are retrieved into the
    instance cache (they are small).

    Raises
    ------
    PacsaiError
        Nothing matches the query (the message says what was found).
    """
    from tqdm.auto import tqdm

    studies = pacs.search_studies(**dict(query.study_filters))
    if studies.empty:
        raise PacsaiError(
            f"no study on {pacs.url} matches {dict(query.study_filters)}; seed or push data first"
        )
    study_uids = list(_col(studies, "StudyInstanceUID"))
    wanted = {s.lower() for s in query.structures}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for study_uid in tqdm(study_uids, desc="cohort", unit="study", disable=not progress):
        series = pacs.search_series(StudyInstanceUID=study_uid)
        if series.empty:
            continue
        modality = _col(series, "Modality").astype(str)
        images = series[modality == query.modality]
        rts = series[modality == "RTSTRUCT"]
        if images.empty:
            continue
        study_row = studies[_col(studies, "StudyInstanceUID") == study_uid].iloc[0]
        patient_id = _text(study_row.get("PatientID"))
        patient_name = _text(study_row.get("PatientName"))
        candidates: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {}
        for rt_series_uid in _col(rts, "SeriesInstanceUID"):
            for path in pacs.retrieve_series(study_uid, rt_series_uid, progress=False):
                names, refs = read_rtstruct_header(path)
                if wanted and not wanted <= {n.lower() for n in names}:
                    skipped.append(
                        f"RTSTRUCT {Path(path).stem} lacks {sorted(wanted - {n.lower() for n in names})}"
                    )
                    continue
                image_uids = set(_col(images, "SeriesInstanceUID"))
                targets = refs & image_uids or (image_uids if len(images) == 1 and not refs else set())
                sop_uid = _sop_uid(path)
                for target in targets:
                    candidates.setdefault(target, []).append((rt_series_uid, sop_uid, names))
        for img_uid in _col(images, "SeriesInstanceUID"):
            found = candidates.get(img_uid, [])
            if not found:
                if query.require_rtstruct:
                    continue
                found = [("", "", ())]
            found.sort(key=lambda c: (-len(c[2]), c[1]))
            if len(found) > 1:
                warnings.warn(
                    f"image series {img_uid} has {len(found)} matching RTSTRUCTs; using {found[0][1]} "
                    "(most ROIs, then lowest SOP instance UID)",
                    PacsaiWarning,
                    stacklevel=2,
                )
            rt_series, rt_sop, names = found[0]
            rows.append(
                {
                    "patient_id": patient_id,
                    "patient_name": patient_name,
                    "study_instance_uid": str(study_uid),
                    "series_instance_uid": str(img_uid),
                    "rtstruct_series_uid": rt_series,
                    "rtstruct_sop_instance_uid": rt_sop,
                    "roi_names": tuple(names),
                }
            )
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


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # None or NaN from pandas
        return ""
    return str(value)


def _sop_uid(path: str | Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)
