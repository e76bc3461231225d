"""Per-patient planning report end to end, cohort reports on 2 workers, and a report's peak memory; same command.

Usage: ``python benchmarks/report.py [--repeats 2]``

Seeds two synthetic patients (``pacsai.synthetic``, 96×256×256 CT with structures, dose and a prior study) into
a temporary embedded store, then runs each measured step in its own child process (this script with
``--child``), which times itself after its imports, so interpreter start-up is left out of every figure:

* ``report``: ``run_report`` (papermill template with the ``pacsai`` kernel, ``structures_from="pacs"``, HTML
  and, where Chromium exists, PDF; no push, no MLflow run), the cache already warm;
* ``empty``: the same ``render.execute`` on a notebook with one empty cell and the same kernel: the floor
  every report pays to start a kernel (the line's baseline);
* ``summary``: ``build_summary`` alone, the numbers without papermill (in the JSON);
* ``cohort``: ``run_cohort`` over both patients with ``workers=1`` and ``workers=2``;
* ``model``: ``run_report`` with ``structures_from="model"`` (inference in the report process before the kernel,
  :mod:`pacsai.report.handoff`; HTML and PDF), once, with the demo's model ``models:/pacsai-thorax@champion``
  from the MLflow store ``pacsai demo`` made (``--model-store``, default ``mlruns/mlflow.db`` of the repository).
  Without that store or model the line says ``skipped`` and why (run ``pacsai demo`` first).

While a child runs, its process tree (papermill, the kernel, Chromium) is polled with psutil
(``common.TreePeak``). The report's peak memory is the peak of its tree without Chromium (papermill and the
kernel, where the data lives) minus the empty notebook's tree peak (the harness and an idle kernel, measured the
same way), over the bytes of the CT volume ``read_series`` returns. Chromium's processes, which only print the
HTML to PDF and share most of their pages, go into the JSON and the line's details.

Prints ``report_end_to_end: R x papermill_empty_notebook`` (R = report time / empty-notebook time),
``report_model_end_to_end: R x papermill_empty_notebook`` (the same for the model's structures),
``cohort_2_workers: R x 1_worker`` (a speed-up) and ``report_peak_memory: R x volume_bytes``, and writes
``benchmarks/results/report.json``. Patients appear only as pseudonyms (``patient-1``...).
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

from common import REPO, Figure, TreePeak, emit, load_average, mib, note, write_result

SHAPE = (96, 256, 256)
SPACING = (1.8, 1.8, 3.0)
SEEDS = (101, 102)
CHILD_TIMEOUT_S = 240
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

        workers, out = int(args[0]), Path(args[1])
        patients = [validate_parameters(patient_id=p, pacs_url=url) for p in args[2:]]
        start = time.perf_counter()
        table = run_cohort(patients, out_root=out, workers=workers, track=False)
        return {"seconds": time.perf_counter() - start, "ok": int(table.ok.sum()), "patients": len(table)}
    raise SystemExit(f"unknown child step {kind!r}")


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

    def __call__(self, kind: str, *args: str) -> dict[str, Any]:
        self.count += 1
        log = self.work / f"child-{self.count}-{kind}.log"
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, __file__, "--child", kind, *args], cwd=self.work,
                                    env=self.env, stdout=subprocess.PIPE, stderr=err, text=True)
            with TreePeak(proc.pid, without=("chrom",)) as peak:
                try:
                    out, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise RuntimeError(f"step {kind} ran over {CHILD_TIMEOUT_S} s; see {log}") from None
        if proc.returncode != 0:
            tail = log.read_text()[-1500:]
            raise RuntimeError(f"step {kind} failed (exit {proc.returncode}): {tail}")
        found = json.loads(out.strip().splitlines()[-1])
        found.update(peak_tree_bytes=peak.bytes, peak_tree_bytes_without_chromium=peak.bytes_without,
                     peak_by_process=dict(sorted(peak.by_name.items(), key=lambda kv: -kv[1])[:6]),
                     samples=peak.samples)
        return found


def seed(work: Path) -> tuple[str, list[str], int]:
    """Store the synthetic patients; return the store URL, their IDs and the CT volume's bytes."""
    from pacsai.imaging import read_series
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    url = f"file://{work / 'pacs'}"
    pacs = connect(url, cache_dir=work / "cache")
    ids, volume_bytes = [], 0
    for seed_ in SEEDS:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print("\n" + json.dumps(_child(argv[1], argv[2:])), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-store", type=Path, default=DEMO_STORE,
                        help="MLflow sqlite store with the demo's model (default: the repository's mlruns/mlflow.db)")
    parser.add_argument("--no-model", action="store_true", help="leave out the report with the model's structures")
    args = parser.parse_args(argv)
    store, model_version = (None, "--no-model") if args.no_model else demo_model(args.model_store)
    model_uri = f"models:/{MODEL_NAME}@{MODEL_ALIAS}"
    load = load_average()

    work = Path(tempfile.mkdtemp(prefix="pacsai-bench-report-"))
    try:
        url, ids, volume_bytes = seed(work)
        pseudonym = {pid: f"patient-{k + 1}" for k, pid in enumerate(ids)}
        run = Runner(work, url)
        empties, reports, summaries = [], [], []
        for k in range(max(1, args.repeats)):  # interleaved, so drifting load hits every step alike
            empties.append(run("empty", str(work / f"empty-{k}")))
            reports.append(run("report", ids[0], str(work / f"report-{k}")))
            summaries.append(run("summary", ids[0]))
        one = run("cohort", "1", str(work / "cohort-1"), *ids)
        two = run("cohort", "2", str(work / "cohort-2"), *ids)
        model = run("model", ids[0], str(work / "model"), store, model_uri) if store else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in (one, two):
        if result["ok"] != len(ids):
            raise SystemExit(f"cohort run failed for {len(ids) - result['ok']} of {len(ids)} patients")

    t_empty = min(r["seconds"] for r in empties)
    t_report = min(r["seconds"] for r in reports)
    t_summary = min(r["seconds"] for r in summaries)
    peak_report = max(r["peak_tree_bytes_without_chromium"] for r in reports)
    peak_report_all = max(r["peak_tree_bytes"] for r in reports)
    peak_empty = max(r["peak_tree_bytes"] for r in empties)
    net = peak_report - peak_empty
    pdf = all(r["pdf"] for r in reports)
    ct = "x".join(map(str, SHAPE))
    figures = [
        emit(Figure(
            "report_end_to_end", t_report / t_empty, "papermill_empty_notebook",
            f"{t_report:.1f} s vs {t_empty:.1f} s; {t_report / t_summary:.1f} x build_summary alone "
            f"({t_summary:.1f} s); synthetic {ct} CT, structures from the PACS, "
            f"HTML{' + PDF' if pdf else ''}, warm cache",
        )),
        emit(Figure(
            "cohort_2_workers", one["seconds"] / two["seconds"], "1_worker",
            f"{len(ids)} patients: {two['seconds']:.1f} s vs {one['seconds']:.1f} s on {os.cpu_count()} cores",
        )),
        emit(Figure(
            "report_peak_memory", net / volume_bytes, "volume_bytes",
            f"{mib(net):.0f} MiB above an empty notebook's tree ({mib(peak_empty):.0f} MiB) for a "
            f"{mib(volume_bytes):.0f} MiB CT volume: papermill + kernel, whole {mib(peak_report):.0f} MiB "
            f"({peak_report / volume_bytes:.0f} x); Chromium's PDF processes add "
            f"{mib(peak_report_all - peak_report):.0f} MiB RSS, mostly shared pages",
        )),
    ]
    if model is not None:
        card = model["model"]
        figures.insert(1, emit(Figure(
            "report_model_end_to_end", model["seconds"] / t_empty, "papermill_empty_notebook",
            f"{model['seconds']:.1f} s vs {t_empty:.1f} s; structures from the model {model_uri} (version "
            f"{card.get('version', model_version)}, run {card.get('run_id', '?')}) on the synthetic {ct} CT, "
            f"HTML{' + PDF' if model['pdf'] else ''}, warm cache, inference before the kernel",
        )))
    else:
        figures.insert(1, emit(Figure("report_model_end_to_end", None, "papermill_empty_notebook",
                                      model_version)))
    path = write_result(
        "report",
        figures,
        {
            "patients": [pseudonym[p] for p in ids],
            "ct_shape": list(SHAPE),
            "ct_spacing_mm": list(SPACING),
            "volume_bytes": volume_bytes,
            "repeats": args.repeats,
            "seconds": {"report": t_report, "papermill_empty_notebook": t_empty, "build_summary": t_summary,
                        "cohort_1_worker": one["seconds"], "cohort_2_workers": two["seconds"],
                        "report_structures_from_model": model["seconds"] if model else None},
            "model": {"uri": model_uri, "store": str(args.model_store), "version": model_version,
                      "card": model["model"] if model else None},
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
            "runs": {"empty": empties, "report": reports, "summary": summaries, "cohort_1": one, "cohort_2": two,
                     "model": model},
        },
        started_load=load,
    )
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
