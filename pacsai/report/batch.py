"""Reports for a cohort: a local process pool by default, Dask distributed on a cluster; failures don't stop others."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from pacsai.report.params import ReportParameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortItem:
    patient_id: str
    ok: bool
    seconds: float
    out_dir: str
    error: str = ""


def _one(params: ReportParameters, out_root: str, push: bool, track: bool) -> CohortItem:
    from pacsai.report.run import default_out_dir, run_report

    start = time.perf_counter()
    out = default_out_dir(params.patient_id, Path(out_root))
    try:
        run_report(params, out_dir=out, push=push, track=track)
        return CohortItem(params.patient_id, True, time.perf_counter() - start, str(out))
    except Exception as err:  # one patient's failure is reported, never fatal for the cohort
        return CohortItem(params.patient_id, False, time.perf_counter() - start, str(out),
                          f"{type(err).__name__}: {err}")


def run_cohort(
    patients: Sequence[ReportParameters],
    *,
    out_root: Path = Path("reports"),
    workers: int = 1,
    dask_address: str | None = None,
    push: bool = False,
    track: bool = True,
) -> pd.DataFrame:
    """Run one report per patient; returns (and writes ``out_root/cohort_summary.csv``) one row per patient."""
    out_root.mkdir(parents=True, exist_ok=True)
    items: list[CohortItem] = []
    if dask_address:
        from dask.distributed import Client

        with Client(dask_address) as client:
            futures = [client.submit(_one, p, str(out_root), push, track, pure=False) for p in patients]
            for fut in tqdm(futures, desc="reports", unit="patient"):
                items.append(fut.result())
    elif workers <= 1:
        for p in tqdm(patients, desc="reports", unit="patient"):
            items.append(_one(p, str(out_root), push, track))
    else:
        # Each report runs a kernel and numpy; more workers than cores only thrash.
        workers = min(workers, len(patients), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_one, p, str(out_root), push, track) for p in patients]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="reports", unit="patient"):
                items.append(fut.result())
    table = pd.DataFrame([i.__dict__ for i in items]).sort_values("patient_id", kind="stable")
    tmp = out_root / ".cohort_summary.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_root / "cohort_summary.csv")
    return table.reset_index(drop=True)


def cohort_patients(pacs: Any, filters: dict[str, str]) -> list[str]:
    """PatientIDs of the studies matching ``filters`` (QIDO study-level keywords, wildcards allowed)."""
    studies = pacs.search_studies(**filters)
    if studies.empty or "PatientID" not in studies:
        return []
    return sorted(set(studies.PatientID.dropna().astype(str)))
