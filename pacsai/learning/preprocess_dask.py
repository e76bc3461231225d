"""Training-data preprocessing on a Dask cluster: PACS pull → volume → preprocessed cache, one task per series.

``pacsai train EXPERIMENT.yaml --dask tcp://scheduler:8786`` runs :func:`preprocess_experiment` before training:
every cohort row the training run will read (its training and validation patients) whose cache entry is missing
becomes one task. A worker connects to the PACS itself (its own ``PACSAI_*`` settings and credentials: none
travel over the cluster), retrieves the series into its own instance cache, preprocesses it with the same
function as the serial path (:func:`pacsai.learning.dataset.load_case`) into a temporary folder, and sends the
cache file's bytes back; this process writes them into its preprocessing cache atomically under the same name.
Training then finds every case cached. Workers therefore need no shared file system with the trainer, only the
PACS; what crosses the cluster is the series' UIDs (no patient ID or name) and the preprocessed arrays.

The cache entries are the serial path's: same names, same arrays (``tests/test_dask.py`` compares them).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai.cohort import UID_COLUMNS
from pacsai.learning.dataset import PreprocessSpec, cache_file, load_case

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.config import Settings
    from pacsai.pacs import Pacs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaskPreprocessResult:
    """What a cluster preprocessing pass did.

    Attributes
    ----------
    cases
        Cohort rows asked for.
    cached
        Of them, already in the cache (not sent to the cluster).
    computed
        Preprocessed by the cluster and written into the cache.
    workers
        Worker address → number of cases it preprocessed.
    seconds
        Wall time of the pass.
    """

    cases: int
    cached: int
    computed: int
    workers: Mapping[str, int]
    seconds: float


@dataclass(frozen=True)
class _Done:
    """A worker's answer: the cache file's name and bytes, and who made it."""

    name: str
    data: bytes
    worker: str
    pid: int


def _preprocess_on_worker(pacs_url: str, uids: dict[str, str | None], spec: dict[str, Any]) -> _Done:
    """Runs on a Dask worker: pull and preprocess one series with the worker's own settings."""
    from pacsai.config import load_settings
    from pacsai.pacs import connect

    row = types.SimpleNamespace(**uids)
    pp = PreprocessSpec.from_dict(spec)
    pacs = connect(pacs_url, settings=load_settings())
    try:
        from distributed import get_worker

        worker = str(get_worker().address)
    except (ImportError, ValueError):  # called outside a worker (not in pacsai's own paths)
        worker = "local"
    with tempfile.TemporaryDirectory(prefix="pacsai-preprocess-") as tmp:
        load_case(pacs, row, pp, cache_dir=tmp, patient="")
        path = cache_file(row, pp, tmp)
        return _Done(name=path.name, data=path.read_bytes(), worker=worker, pid=os.getpid())


def _uid(value: Any) -> str | None:
    """A UID cell as the serial path sees it (a missing RTSTRUCT stays ``None``: the cache key says 'none')."""
    return None if value is None or value != value else str(value)  # value != value: NaN


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def preprocess_cohort(
    pacs_url: str,
    cohort: Cohort,
    spec: PreprocessSpec,
    *,
    cache_dir: str | Path,
    address: str,
    patients: Iterable[str] | None = None,
    progress: bool = True,
) -> DaskPreprocessResult:
    """Preprocess the cohort's rows (all, or those of ``patients``) on the Dask cluster at ``address``.

    Parameters
    ----------
    pacs_url
        The PACS the workers pull from (without credentials: each worker reads its own, see
        :mod:`pacsai.pacs.credentials`).
    cohort, spec
        The rows and how to preprocess them (:func:`pacsai.learning.dataset.load_cases` reads the result).
    cache_dir
        The preprocessing cache of this process (``PACSAI_CACHE_DIR/preprocessed`` for training).
    address
        Scheduler address, e.g. ``tcp://scheduler:8786``.
    patients
        Only these patients' rows.
    progress
        Show a progress bar.

    Raises
    ------
    PacsaiError
        Whatever a worker raised for a case (a missing ROI, an irregular volume, an unreachable PACS): the
        pass stops, as the serial path would; the cases finished so far stay cached.
    """
    from distributed import Client, as_completed
    from tqdm.auto import tqdm

    started = time.perf_counter()
    table = cohort.table if patients is None else cohort.table[cohort.table["patient_id"].isin(set(patients))]
    wanted = [{c: _uid(getattr(row, c)) for c in UID_COLUMNS} for row in table.itertuples()]
    todo = [u for u in wanted if not cache_file(types.SimpleNamespace(**u), spec, cache_dir).is_file()]
    per_worker: dict[str, int] = {}
    if todo:
        with Client(address) as client:
            futures = [
                client.submit(_preprocess_on_worker, pacs_url, u, spec.to_dict(), pure=False) for u in todo
            ]
            bar = tqdm(total=len(futures), desc="preprocess (dask)", unit="series", disable=not progress)
            for fut in as_completed(futures):
                done: _Done = fut.result()
                _write_atomically(Path(cache_dir) / done.name, done.data)
                per_worker[done.worker] = per_worker.get(done.worker, 0) + 1
                bar.update()
            bar.close()
    seconds = time.perf_counter() - started
    logger.info(
        "dask preprocessing: %d series, %d cached, %d on %d workers in %.1f s",
        len(wanted), len(wanted) - len(todo), len(todo), len(per_worker), seconds,
    )
    return DaskPreprocessResult(len(wanted), len(wanted) - len(todo), len(todo), per_worker, seconds)


def preprocess_experiment(
    experiment: str | Path | Mapping[str, Any],
    *,
    address: str,
    pacs: Pacs | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    smoke: bool = False,
    settings: Settings | None = None,
    progress: bool = True,
) -> DaskPreprocessResult:
    """Preprocess on the cluster every case that ``pacsai train`` of this experiment will read.

    The same cohort, split and preprocessing as :func:`pacsai.learning.train.prepare_data`: the training and
    validation patients (the training ones when the split has no validation part), into
    ``PACSAI_CACHE_DIR/preprocessed``.
    """
    from pacsai.cohort import CohortQuery, select_cohort
    from pacsai.config import load_settings
    from pacsai.learning.train import cache_root, load_experiment, preprocess_spec
    from pacsai.pacs import connect

    settings = settings or load_settings()
    cfg = load_experiment(experiment, overrides=overrides, smoke=smoke)
    if pacs is None or isinstance(pacs, str):
        pacs = connect(pacs or (cfg.get("pacs") or {}).get("url"), settings=settings)
    query = CohortQuery.from_config(cfg.get("cohort") or {}, structures=cfg["structures"])
    cohort = select_cohort(pacs, query, progress=progress)
    split = cohort.split(seed=int(cfg["split"]["seed"]), fractions={k: cfg["split"][k] for k in ("val", "test")})
    patients = sorted(set(split["train"]) | set(split["val"] or split["train"]))
    return preprocess_cohort(
        pacs.url,
        cohort,
        preprocess_spec(cfg),
        cache_dir=cache_root(settings) / "preprocessed",
        address=address,
        patients=patients,
        progress=progress,
    )
