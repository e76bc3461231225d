"""Per-patient planning report end to end (synthetic and real CT), cohort scaling, and a report's peak memory.

Usage: ``python benchmarks/report.py [--repeats 2] [--cohort-patients 4] [--model-store mlruns/mlflow.db]
[--no-model]``; ``make bench`` runs it with ``--cohort-patients 2`` (the short form, see run_all.py).

Seeds ``--cohort-patients`` synthetic patients (``pacsai.synthetic``, 96×256×256 CT with structures, dose and a
prior study) and, where ``PACSAI_TEST_DATA`` holds it, the real thoracic planning CT of set 9 (TCIA
NSCLC-Radiomics, 134×512×512, CT only; read where it lies, stored only in the temporary store) into a temporary
embedded store, then runs each measured step in its own child process (this script with ``--child``), which
times itself after its imports, so interpreter start-up is left out of every figure:

* ``report``: ``run_report`` (papermill template with the ``pacsai`` kernel, ``structures_from="pacs"``, HTML
  and, where Chromium exists, PDF; no push, no MLflow run), the cache already warm;
* ``empty``: the same ``render.execute`` on a notebook with one empty cell and the same kernel: the floor
  every report pays to start a kernel (the baseline of every report line);
* ``summary``: ``build_summary`` alone, the numbers without papermill (in the JSON);
* ``cohort``: ``run_cohort`` over all synthetic patients with ``workers=1``, ``2`` and ``4`` (the pool is capped
  at the cores), and on a local Dask cluster of 2 single-threaded worker processes (started before the clock);
* ``model``: ``run_report`` with ``structures_from="model"`` (inference in the report process before the kernel,
  :mod:`pacsai.report.handoff`; HTML and PDF), once on the first synthetic patient and once on the real CT, with
  the demo's model ``models:/pacsai-thorax@champion`` from the MLflow store ``pacsai demo`` made
  (``--model-store``, default ``mlruns/mlflow.db`` of the repository). Without that store or model, or without
  the real CT, the line says ``skipped`` and why.

While a child runs, its process tree (papermill, the kernel, Chromium) is polled with psutil
(``common.TreePeak``). The report's peak memory is the peak of its tree without Chromium (papermill and the
kernel, where the data lives) minus the empty notebook's tree peak (the harness and an idle kernel, measured the
same way), over the bytes of the CT volume ``read_series`` returns. Chromium's processes, which only print the
HTML to PDF and share most of their pages, go into the JSON and the line's details.

Prints ``report_end_to_end``, ``report_model_end_to_end`` and ``report_model_real_ct`` as ``R x
papermill_empty_notebook`` (R = report time / empty-notebook time; seconds in the details),
``cohort_2_workers``, ``cohort_4_workers`` and ``cohort_dask_2_workers`` as ``R x 1_worker`` (speed-ups) and
``report_peak_memory: R x volume_bytes``, and writes ``benchmarks/results/report.json``. Patients appear only
as pseudonyms (``patient-1``...); the real CT only as "set 9".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, Figure, TreePeak, emit, load_average, mib, note, test_data_root, write_result

SHAPE = (96, 256, 256)
SPACING = (1.8, 1.8, 3.0)
FIRST_SEED = 101
COHORT_PATIENTS = 4  # the issue: 1, 2 and 4 workers on 4 patients
CHILD_TIMEOUT_S = 240
REAL_CT = "tcia_nsclc_lung1_001/ct"  # under PACSAI_TEST_DATA: TCIA LUNG1-001, 134×512×512 (SOURCES.md §9)
REAL_CT_TIMEOUT_S = 400
MODEL_NAME, MODEL_ALIAS = "pacsai-thorax", "champion"  # what `pacsai demo` registers (pacsai/templates/demo.yaml)
DEMO_STORE = REPO / "mlruns" / "mlflow.db"


# ------------------------------------------------------------------------------------------- child side
def _child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run one measured step (in a fresh process) and return what it timed."""
    from pacsai.report import render
    from pacsai.report.params import validate_parameters

    url = os.environ["PACSAI_PACS_URL"]
    if kind == "empty":
        import nbformat

        out = Path(args[0])
        out.mkdir(parents=True, exist_ok=True)
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
        notebook.metadata["kernelspec"] = {"name": render.KERNEL, "display_name": render.KERNEL,
                                           "language": "python"}
        template = out / "empty.ipynb"
        nbformat.write(notebook, template)
        start = time.perf_counter()
        render.execute(template, out / "empty.out.ipynb", {}, cwd=out)
        return {"seconds": time.perf_counter() - start}
    if kind == "summary":
        from pacsai.pacs import connect
        from pacsai.report.summary import build_summary

        pacs = connect(url)
        params = validate_parameters(patient_id=args[0], pacs_url=url)
        start = time.perf_counter()
        summary = build_summary(params, pacs=pacs)
        return {"seconds": time.perf_counter() - start, "structures": len(summary.structures)}
    if kind == "report":
        from pacsai.report.run import run_report

        params = validate_parameters(patient_id=args[0], pacs_url=url, structures_from="pacs")
        start = time.perf_counter()
        result = run_report(params, out_dir=Path(args[1]), push=False, track=False)
        return {"seconds": time.perf_counter() - start, "pdf": result.pdf is not None}
    if kind == "model":
        from pacsai.report.run import run_report

        store, model_uri = args[2], args[3]
        params = validate_parameters(patient_id=args[0], pacs_url=url, structures_from="model", model_uri=model_uri)
        start = time.perf_counter()
        result = run_report(params, out_dir=Path(args[1]), push=False, track=False, mlflow_uri=store)
        metrics = json.loads(result.metrics.read_text())
        return {"seconds": time.perf_counter() - start, "pdf": result.pdf is not None,
                "model": (metrics.get("provenance") or {}).get("model") or {}}
    if kind == "cohort":
        from pacsai.report.batch import run_cohort

        how, out = args[0], Path(args[1])
        patients = [validate_parameters(patient_id=p, pacs_url=url) for p in args[2:]]
        if how.startswith("dask"):
            return _dask_cohort(int(how.removeprefix("dask")), patients, out)
        start = time.perf_counter()
        table = run_cohort(patients, out_root=out, workers=int(how), track=False)
        return {"seconds": time.perf_counter() - start, "ok": int(table.ok.sum()), "patients": len(table)}
    raise SystemExit(f"unknown child step {kind!r}")


def _dask_cohort(workers: int, patients: list[Any], out: Path) -> dict[str, Any]:
    """``run_cohort`` on a local Dask cluster of ``workers`` single-threaded worker processes.

    The cluster starts before the clock does (a cohort on Dask pays that once per cluster, not per cohort).
    """
    from dask.distributed import LocalCluster

    from pacsai.report.batch import run_cohort

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        start = time.perf_counter()
        table = run_cohort(patients, out_root=out, dask_address=cluster.scheduler_address, track=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "ok": int(table.ok.sum()), "patients": len(table)}


# ------------------------------------------------------------------------------------------- parent side
class Runner:
    """Starts child steps with one environment (the store, the cache, MLflow off in a temp folder)."""

    def __init__(self, work: Path, url: str) -> None:
        self.work = work
        self.env = {
            **os.environ,
            "PACSAI_PACS_URL": url,
            "PACSAI_CACHE_DIR": str(work / "cache"),
            "PACSAI_MLFLOW_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1",
            "TQDM_DISABLE": "1",
        }
        self.count = 0

    def __call__(self, kind: str, *args: str, timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
        self.count += 1
        log = self.work / f"child-{self.count}-{kind}.log"
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, __file__, "--child", kind, *args], cwd=self.work,
                                    env=self.env, stdout=subprocess.PIPE, stderr=err, text=True)
            with TreePeak(proc.pid, without=("chrom",)) as peak:
                try:
                    out, _ = proc.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise RuntimeError(f"step {kind} ran over {timeout_s:.0f} s; see {log}") from None
        if proc.returncode != 0:
            tail = log.read_text()[-1500:]
            raise RuntimeError(f"step {kind} failed (exit {proc.returncode}): {tail}")
        found = json.loads(out.strip().splitlines()[-1])
        found.update(peak_tree_bytes=peak.bytes, peak_tree_bytes_without_chromium=peak.bytes_without,
                     peak_by_process=dict(sorted(peak.by_name.items(), key=lambda kv: -kv[1])[:6]),
                     samples=peak.samples)
        return found


def seed(work: Path, patients: int) -> tuple[str, list[str], int]:
    """Store ``patients`` synthetic patients; return the store URL, their IDs and one CT volume's bytes."""
    from pacsai.imaging import read_series
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    url = f"file://{work / 'pacs'}"
    pacs = connect(url, cache_dir=work / "cache")
    ids, volume_bytes = [], 0
    for seed_ in range(FIRST_SEED, FIRST_SEED + patients):
        patient = make_patient(seed_, shape=SHAPE, spacing=SPACING)
        summary = pacs.store(list(patient.datasets()), progress=False)
        if not summary.ok:
            raise RuntimeError(f"seeding the embedded store in {work} failed: {summary}")
        ids.append(patient.patient_id)
        volume_bytes = volume_bytes or int(read_series(list(patient.ct)).nbytes)
        # A warm cache for every step alike (cold retrieval is the retrieve benchmark's business).
        for study_uid in set(pacs.search_studies(PatientID=patient.patient_id).StudyInstanceUID):
            pacs.retrieve_study(str(study_uid), progress=False)
    return url, ids, volume_bytes


def seed_real_ct(url: str, work: Path) -> tuple[str | None, str, dict[str, Any]]:
    """Store the real planning CT LUNG1-001 (CT only, no structures: the model makes them) in the store at ``url``.

    Returns ``(PatientID, "", facts)`` or ``(None, why not, {})`` where the test data is absent. The files are
    read where they lie (``PACSAI_TEST_DATA``) and stored in the temporary store; nothing is copied elsewhere.
    """
    import pydicom

    from pacsai.imaging import read_series
    from pacsai.pacs import connect

    root = test_data_root()
    folder = root / REAL_CT if root else None
    if folder is None or not folder.is_dir():
        return None, f"no real CT {REAL_CT} under PACSAI_TEST_DATA (see its SOURCES.md §9)", {}
    datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    pacs = connect(url, cache_dir=work / "cache")
    summary = pacs.store(datasets, progress=False)
    if not summary.ok:
        raise RuntimeError(f"seeding {folder} into the embedded store in {work} failed: {summary}")
    volume = read_series(datasets)
    patient_id = str(datasets[0].PatientID)
    for study_uid in set(pacs.search_studies(PatientID=patient_id).StudyInstanceUID):
        pacs.retrieve_study(str(study_uid), progress=False)
    return patient_id, "", {"shape": list(volume.shape), "volume_bytes": int(volume.nbytes),
                            "source": "PACSAI_TEST_DATA set 9 (SOURCES.md §9)"}


def demo_model(db: Path) -> tuple[str | None, str]:
    """``(MLflow URI, model version)`` of the demo's champion in ``db``, or ``(None, why not)``.

    Read from the store's tables with sqlite3, so that this process does not import mlflow.
    """
    if not db.is_file():
        return None, f"no MLflow store {db}; run `pacsai demo` first"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        try:
            row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                              (MODEL_NAME, MODEL_ALIAS)).fetchone()
        except sqlite3.Error as err:
            return None, f"{db} is not an MLflow store ({err})"
    if row is None:
        return None, f"no models:/{MODEL_NAME}@{MODEL_ALIAS} in {db}; run `pacsai demo` first"
    return f"sqlite:///{db.resolve()}", str(row[0])


def cohort_configs(patients: int, *, dask: bool = True) -> tuple[str, ...]:
    """The cohort runs: 1, 2, 4 workers and Dask with 2 workers.

    In the short form (fewer than 4 patients) the 4-worker run is left out where ``run_cohort`` would cap its pool
    to the 2-worker run's size (patients, cores): the same call again would measure nothing new.
    """
    cores = os.cpu_count() or 1
    same_pool = min(4, patients, cores) == min(2, patients, cores)
    configs = ("1", "2", "dask2") if patients < COHORT_PATIENTS and same_pool else ("1", "2", "4", "dask2")
    return configs if dask else tuple(c for c in configs if c != "dask2")


def cohort_figures(runs: dict[str, dict[str, Any]], patients: int) -> list[Figure]:
    """``cohort_2_workers``, ``cohort_4_workers`` and ``cohort_dask_2_workers``, each a speed-up over 1 worker."""
    cores = os.cpu_count() or 1
    one = runs["1"]["seconds"]
    figures = []
    for key, name, what in (("2", "cohort_2_workers", "2 worker processes"),
                            ("4", "cohort_4_workers", "4 worker processes asked"),
                            ("dask2", "cohort_dask_2_workers", "a local Dask cluster, 2 single-threaded workers")):
        if key not in runs:
            why = ("the Dask cluster's run is left out" if key == "dask2" else
                   f"run_cohort caps 4 workers at {min(4, patients, cores)}, the cohort_2_workers run")
            figures.append(emit(Figure(
                name, None, "1_worker",
                f"short form ({patients} patients, {cores} cores): {why}; the full form runs it: "
                f"benchmarks/run_all.py --full or benchmarks/report.py --cohort-patients {COHORT_PATIENTS}")))
            continue
        t = runs[key]["seconds"]
        capped = f" (run_cohort caps the pool at {min(4, patients, cores)}: patients, cores)" if key == "4" else ""
        figures.append(emit(Figure(name, one / t, "1_worker",
                                   f"{patients} patients on {what}{capped}: {t:.1f} s vs {one:.1f} s on "
                                   f"{cores} cores")))
    return figures


def model_figure(name: str, run: dict[str, Any] | None, t_empty: float, model_uri: str, version: str,
                 what: str, extra: str = "") -> Figure:
    """A report with the model's structures, as a multiple of the empty notebook; ``skipped`` where not run."""
    if run is None:
        return emit(Figure(name, None, "papermill_empty_notebook", version))
    card = run["model"]
    return emit(Figure(
        name, run["seconds"] / t_empty, "papermill_empty_notebook",
        f"{run['seconds']:.1f} s vs {t_empty:.1f} s; structures from the model {model_uri} (version "
        f"{card.get('version', version)}, run {card.get('run_id', '?')}) on {what}, "
        f"HTML{' + PDF' if run['pdf'] else ''}, warm cache, inference before the kernel{extra}",
    ))


def real_memory(run: dict[str, Any] | None, peak_empty: int, facts: dict[str, Any]) -> str:
    """The real-CT report's tree peak (without Chromium) above the empty notebook's, for the figure's details."""
    if run is None:
        return ""
    net = run["peak_tree_bytes_without_chromium"] - peak_empty
    return (f"; peak {mib(net):.0f} MiB above an empty notebook's tree for its {mib(facts['volume_bytes']):.0f} MiB "
            f"volume ({net / facts['volume_bytes']:.1f} x)")


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear sequence of measured steps
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print("\n" + json.dumps(_child(argv[1], argv[2:])), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-store", type=Path, default=DEMO_STORE,
                        help="MLflow sqlite store with the demo's model (default: the repository's mlruns/mlflow.db)")
    parser.add_argument("--no-model", action="store_true", help="leave out the reports with the model's structures")
    parser.add_argument("--cohort-patients", type=int, default=COHORT_PATIENTS,
                        help=f"patients in each cohort run (default {COHORT_PATIENTS}; the issue's full form: 4)")
    parser.add_argument("--no-dask", action="store_true", help="leave out the cohort on a local Dask cluster")
    args = parser.parse_args(argv)
    store, model_version = (None, "--no-model") if args.no_model else demo_model(args.model_store)
    model_uri = f"models:/{MODEL_NAME}@{MODEL_ALIAS}"
    load = load_average()

    work = Path(tempfile.mkdtemp(prefix="pacsai-bench-report-"))
    try:
        url, ids, volume_bytes = seed(work, max(1, args.cohort_patients))
        real_id, real_why, real_facts = seed_real_ct(url, work) if store else (None, model_version, {})
        pseudonym = {pid: f"patient-{k + 1}" for k, pid in enumerate(ids)}
        run = Runner(work, url)
        empties, reports, summaries = [], [], []
        for k in range(max(1, args.repeats)):  # interleaved, so drifting load hits every step alike
            empties.append(run("empty", str(work / f"empty-{k}")))
            reports.append(run("report", ids[0], str(work / f"report-{k}")))
            summaries.append(run("summary", ids[0]))
        configs = cohort_configs(len(ids), dask=not args.no_dask)
        cohorts = {how: run("cohort", how, str(work / f"cohort-{how}"), *ids) for how in configs}
        model = run("model", ids[0], str(work / "model"), store, model_uri) if store else None
        real = (run("model", real_id, str(work / "model-real"), store, model_uri, timeout_s=REAL_CT_TIMEOUT_S)
                if store and real_id else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for how, result in cohorts.items():
        if result["ok"] != len(ids):
            raise SystemExit(f"cohort run {how} failed for {len(ids) - result['ok']} of {len(ids)} patients")

    t_empty = min(r["seconds"] for r in empties)
    t_report = min(r["seconds"] for r in reports)
    t_summary = min(r["seconds"] for r in summaries)
    peak_report = max(r["peak_tree_bytes_without_chromium"] for r in reports)
    peak_report_all = max(r["peak_tree_bytes"] for r in reports)
    peak_empty = max(r["peak_tree_bytes"] for r in empties)
    net = peak_report - peak_empty
    pdf = all(r["pdf"] for r in reports)
    ct = "x".join(map(str, SHAPE))
    real_ct = "x".join(map(str, real_facts.get("shape", ())))
    figures = [
        emit(Figure(
            "report_end_to_end", t_report / t_empty, "papermill_empty_notebook",
            f"{t_report:.1f} s vs {t_empty:.1f} s; {t_report / t_summary:.1f} x build_summary alone "
            f"({t_summary:.1f} s); synthetic {ct} CT, structures from the PACS, "
            f"HTML{' + PDF' if pdf else ''}, warm cache",
        )),
        model_figure("report_model_end_to_end", model, t_empty, model_uri, model_version, f"the synthetic {ct} CT"),
        model_figure("report_model_real_ct", real, t_empty, model_uri, real_why or model_version,
                     f"the real {real_ct} thoracic planning CT of PACSAI_TEST_DATA set 9 (NSCLC-Radiomics; no dose)",
                     real_memory(real, peak_empty, real_facts)),
        *cohort_figures(cohorts, len(ids)),
        emit(Figure(
            "report_peak_memory", net / volume_bytes, "volume_bytes",
            f"{mib(net):.0f} MiB above an empty notebook's tree ({mib(peak_empty):.0f} MiB) for a "
            f"{mib(volume_bytes):.0f} MiB CT volume: papermill + kernel, whole {mib(peak_report):.0f} MiB "
            f"({peak_report / volume_bytes:.0f} x); Chromium's PDF processes add "
            f"{mib(peak_report_all - peak_report):.0f} MiB RSS, mostly shared pages",
        )),
    ]
    path = write_result(
        "report",
        figures,
        {
            "patients": [pseudonym[p] for p in ids],
            "ct_shape": list(SHAPE),
            "ct_spacing_mm": list(SPACING),
            "volume_bytes": volume_bytes,
            "repeats": args.repeats,
            "cohort_patients": len(ids),
            "seconds": {"report": t_report, "papermill_empty_notebook": t_empty, "build_summary": t_summary,
                        **{f"cohort_{how}": r["seconds"] for how, r in cohorts.items()},
                        "report_structures_from_model": model["seconds"] if model else None,
                        "report_model_real_ct": real["seconds"] if real else None},
            "model": {"uri": model_uri, "store": str(args.model_store), "version": model_version,
                      "card": model["model"] if model else None},
            "real_ct": {**real_facts, "skipped": real_why or None,
                        "peak_tree_bytes_without_chromium": real["peak_tree_bytes_without_chromium"] if real else None,
                        "peak_tree_bytes": real["peak_tree_bytes"] if real else None},
            "report_vs_build_summary": t_report / t_summary,
            "pdf": pdf,
            "memory": {
                "report_tree_peak_bytes_without_chromium": peak_report,
                "report_tree_peak_bytes": peak_report_all,
                "empty_notebook_tree_peak_bytes": peak_empty,
                "build_summary_process_peak_bytes": max(r["peak_tree_bytes"] for r in summaries),
                "net_bytes": net,
                "report_peak_by_process": reports[-1]["peak_by_process"],
                "method": "psutil polling every 50 ms of the child and all its descendants, RSS summed",
            },
            "runs": {"empty": empties, "report": reports, "summary": summaries,
                     **{f"cohort_{how}": r for how, r in cohorts.items()}, "model": model, "model_real_ct": real},
        },
        started_load=load,
    )
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
