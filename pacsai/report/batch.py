"""Reports for a cohort: a local process pool by default, Dask distributed on a cluster; failures don't stop others.

Each report is written into a hidden staging folder and renamed into place only once it is complete, so a folder
``out_root/<PatientID>`` is always a finished report: a patient whose report failed (a PACS that went away
mid-cohort, a notebook error) leaves its partial files under ``out_root/.failed/<PatientID>`` for inspection,
and is listed in ``cohort_summary.csv`` with the reason. :func:`failed_patients` reads that list back so that
only those patients are run again (``pacsai report --rerun-failed reports/cohort_summary.csv``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from pacsai.errors import ReportError
from pacsai.report.params import ReportParameters

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs

log = logging.getLogger(__name__)

SUMMARY_FILE = "cohort_summary.csv"
FAILED_DIR = ".failed"
COLUMNS = ("patient_id", "ok", "qa_status", "seconds", "out_dir", "error")


@dataclass(frozen=True)
class CohortItem:
    patient_id: str
    ok: bool
    seconds: float
    out_dir: str
    error: str = ""
    #: The report's QA gate (PASS / REVIEW / FAIL); empty where no report was made. ``ok`` says the report was
    #: written, not that its contents can be trusted.
    qa_status: str = ""


def _one(params: ReportParameters, out_root: str, push: bool, track: bool, push_anyway: bool = False) -> CohortItem:
    from pacsai.report.run import default_out_dir, run_report

    start = time.perf_counter()
    final = default_out_dir(params.patient_id, Path(out_root))
    # Hidden and unique per process and thread (a threaded Dask worker runs several reports in one process): a
    # half-written report never sits where a finished one is expected.
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = run_report(params, out_dir=staging, push=push, track=track, push_anyway=push_anyway)
        qa_status = str((json.loads(result.metrics.read_text()).get("qa") or {}).get("status", ""))
        _move_into_place(staging, final)
        shutil.rmtree(final.parent / FAILED_DIR / final.name, ignore_errors=True)  # an earlier failure, now fixed
        return CohortItem(params.patient_id, True, time.perf_counter() - start, str(final), qa_status=qa_status)
    except Exception as err:  # one patient's failure is reported, never fatal for the cohort
        kept = _set_aside(staging, final)
        where = f" (partial outputs in {kept})" if kept else ""
        return CohortItem(params.patient_id, False, time.perf_counter() - start, "",
                          f"{type(err).__name__}: {err}{where}")


def _move_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging``; an earlier report of the patient goes only once the new one is there."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{threading.get_ident()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _set_aside(staging: Path, final: Path) -> Path | None:
    """Move a failed report's files to ``out_root/.failed/<name>`` (replacing an older one); ``None`` if none."""
    if not staging.exists():
        return None
    target = final.parent / FAILED_DIR / final.name
    try:
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
        return target
    except OSError as err:
        log.warning("cannot keep the partial outputs of %s (%s); deleting them", final.name, err)
        shutil.rmtree(staging, ignore_errors=True)
        return None


def run_cohort(
    patients: Sequence[ReportParameters],
    *,
    out_root: Path = Path("reports"),
    workers: int = 1,
    dask_address: str | None = None,
    push: bool = False,
    track: bool = True,
    previous: pd.DataFrame | None = None,
    on_result: Callable[[CohortItem], None] | None = None,
    push_anyway: bool = False,
) -> pd.DataFrame:
    """Run one report per patient; returns (and writes ``out_root/cohort_summary.csv``) one row per patient.

    Parameters
    ----------
    patients
        Validated parameters, one per patient.
    out_root
        Reports go to ``out_root/<PatientID>/`` (only once complete); failed ones to ``out_root/.failed/``.
        A relative folder is taken from this process's working directory: the workers (Dask workers run in
        folders of their own) are given it as an absolute path, as they are an embedded store's folder.
    workers, dask_address
        Local process pool size, or a Dask scheduler to run on instead.
    push, track, push_anyway
        As for :func:`pacsai.report.run.run_report`.
    previous
        An earlier summary (see :func:`read_summary`): its rows for patients not run now are kept, so that a
        re-run of the failed patients yields the summary of the whole cohort.
    on_result
        Called in this process with each patient's result as it comes in (progress display, monitoring).
    """
    # paths as this process means them: a Dask worker's working directory is its own
    out_root = Path(out_root).expanduser().resolve()
    patients = [_absolute_store(p) for p in patients]
    out_root.mkdir(parents=True, exist_ok=True)
    items: list[CohortItem] = []

    def collect(item: CohortItem) -> None:
        items.append(item)
        if not item.ok:
            # No PatientID or error text here (it may name the patient): logs stay free of identifiers;
            # cohort_summary.csv, the user's own output, says who failed and why.
            log.warning("a cohort report failed; see %s", out_root / SUMMARY_FILE)
        if on_result is not None:
            on_result(item)

    if dask_address:
        from dask.distributed import Client

        with Client(dask_address) as client:
            futures = [client.submit(_one, p, str(out_root), push, track, push_anyway, pure=False) for p in patients]
            for fut in tqdm(futures, desc="reports", unit="patient"):
                collect(fut.result())
    elif workers <= 1:
        for p in tqdm(patients, desc="reports", unit="patient"):
            collect(_one(p, str(out_root), push, track, push_anyway))
    else:
        # Each report runs a kernel and numpy; more workers than cores only thrash.
        workers = min(workers, len(patients), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_one, p, str(out_root), push, track, push_anyway) for p in patients]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="reports", unit="patient"):
                collect(fut.result())
    table = pd.DataFrame([i.__dict__ for i in items], columns=list(COLUMNS))
    if previous is not None and not previous.empty:
        previous = previous.copy()
        if "qa_status" not in previous:  # a summary written before reports had a QA gate
            previous["qa_status"] = ""
        kept = previous[~previous.patient_id.isin(table.patient_id)]
        table = pd.concat([kept.loc[:, list(COLUMNS)], table], ignore_index=True)
    table = table.sort_values("patient_id", kind="stable").reset_index(drop=True)
    tmp = out_root / f".{SUMMARY_FILE}.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_root / SUMMARY_FILE)
    return table


def _absolute_store(params: ReportParameters) -> ReportParameters:
    """``params`` with an embedded store given by a relative path (``./pacs``) named by its absolute URL."""
    from pacsai.pacs.address import embedded_path, is_folder, store_url

    if not params.pacs_url or not is_folder(params.pacs_url):
        return params
    return params.model_copy(update={"pacs_url": store_url(embedded_path(params.pacs_url))})


def read_summary(path: Path) -> pd.DataFrame:
    """Read a ``cohort_summary.csv`` written by :func:`run_cohort`."""
    try:
        table = pd.read_csv(path, dtype={"patient_id": str, "out_dir": str, "error": str, "qa_status": str},
                            keep_default_na=False)
    except FileNotFoundError as err:
        raise ReportError(f"no cohort summary at {path}; give the {SUMMARY_FILE} a cohort run wrote") from err
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ReportError(f"cannot read the cohort summary {path}: {err}") from err
    if "qa_status" not in table.columns:  # written before reports had a QA gate
        table["qa_status"] = ""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"{path} is not a cohort summary (no column {', '.join(missing)}); give the "
                          f"{SUMMARY_FILE} a cohort run wrote")
    ok = table.ok.astype(str).str.strip().str.lower()
    if not ok.isin(("true", "false")).all():
        raise ReportError(f"{path}: column 'ok' must hold True/False; was the file edited?")
    table["ok"] = ok == "true"
    table["seconds"] = pd.to_numeric(table.seconds, errors="coerce")
    return table


def failed_patients(summary: pd.DataFrame) -> list[str]:
    """PatientIDs whose report failed in ``summary`` (see :func:`read_summary`)."""
    return sorted(summary.loc[~summary.ok, "patient_id"].astype(str))


def cohort_patients(pacs: Pacs, filters: dict[str, str]) -> list[str]:
    """PatientIDs of the studies matching ``filters`` (QIDO study-level keywords, wildcards allowed)."""
    studies = pacs.search_studies(**filters)
    if studies.empty or "PatientID" not in studies:
        return []
    return sorted(set(studies.PatientID.dropna().astype(str)))
