"""`pacsai watch` latency: last instance of a study stored in a real Orthanc → its report's outputs stored back.

Usage: ``python benchmarks/watch.py [--studies 2] [--workers 2] [--stable-seconds 5] [--model URI] [--quick]``

``make bench`` runs the short form (2 studies per phase; 1 with ``--quick``); the figures in docs/watch.md come
from ``--studies 5``.

Starts a local Orthanc (authentication on) and ``pacsai watch --workers 2`` on it (Orthanc changes feed), then
pushes synthetic patients (``pacsai.synthetic``, 96×256×256 planning CT with structures, plan dose and a prior
study; each prior study is ignored by the rules, as it has no RTDOSE):

* ``sequential``: N studies one after another, each pushed once the previous one's outputs are back;
* ``together``: N studies pushed back to back (within seconds), then all awaited.

A study's latency runs from the moment its last instance was stored (the STOW-RS request returned) to the
moment the watch recorded its report done, which is after the report process pushed SEG/SR/PDF and exited (so
slightly pessimistic). Every report's PDF is then checked to be in the PACS, once. The latency includes the
stability wait (``--stable-seconds``): the watch cannot tell a complete study from one still arriving before it.

Structures come from the PACS unless ``--model`` names a model (e.g. ``models:/pacsai-thorax@champion`` after
``make demo``), whose inference then runs in every report. Prints
``watch_latency_p95: R x 60s_target`` and ``watch_latency_p50: R x 30s_target`` (R = measured / target: below
1 meets the aim) and writes ``benchmarks/results/watch.json`` with every study's figures (pseudonyms only) and
the machine's load; with ``--model``, ``watch_model_latency_*`` and ``benchmarks/results/watch_model.json`` (the
issue's aim is for the demo model: ``--studies 5 --model models:/pacsai-thorax@champion``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Figure, emit, load_average, note, write_result

P95_TARGET_S, P50_TARGET_S = 60.0, 30.0
FIRST_SEED = 7100


def _percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1])


def _row(state: Path, study_uid: str) -> dict[str, Any] | None:
    if not state.is_file():
        return None
    with sqlite3.connect(state) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    return dict(row) if row else None


def _wait_done(state: Path, uid: str, watch: subprocess.Popen, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _row(state, uid)
        if row and row["status"] in ("done", "gave_up"):
            return row
        if watch.poll() is not None:
            raise RuntimeError(f"pacsai watch exited with {watch.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"no report within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", type=int, default=2, help="studies per phase (default 2; 5 for the full form)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stable-seconds", type=float, default=5.0)
    parser.add_argument("--model", default="", help="report with this model's structures (default: the PACS's)")
    parser.add_argument("--quick", action="store_true", help="1 study per phase (make bench on a loaded machine)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per study")
    args = parser.parse_args(argv)
    n = 1 if args.quick else args.studies

    from pacsai.pacs import connect
    from pacsai.pacs.orthanc import orthanc_available, start_orthanc
    from pacsai.synthetic import make_patient

    missing = orthanc_available()
    if missing:
        emit(Figure("watch_latency_p95", None, "", missing))
        return 0
    load_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="pacsai-bench-watch-"))
    server = start_orthanc(tmp / "orthanc", user="bench", password="bench-watch-pw")
    env = dict(os.environ, PACSAI_PACS_USER=server.user, PACSAI_PACS_PASSWORD=server.password,
               PACSAI_CACHE_DIR=str(tmp / "cache"))
    rules = {"report": {"track": False}}
    if args.model:
        rules["report"].update({"structures_from": "model", "model": args.model})
        env.setdefault("PACSAI_MLFLOW_URI", f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    (tmp / "rules.yaml").write_text(json.dumps(rules))
    state = tmp / "state.sqlite"
    log_path = tmp / "watch.log"
    watch_cmd = [sys.executable, "-m", "pacsai", "watch", "--pacs", server.url, "--rules", str(tmp / "rules.yaml"),
                 "--workers", str(args.workers), "--stable-seconds", str(args.stable_seconds), "--poll-seconds",
                 "1", "--state", str(state), "--out", str(tmp / "reports")]
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp / "push-cache")
    patients = [make_patient(FIRST_SEED + i) for i in range(2 * n)]
    note(f"{2 * n} synthetic patients, CT {patients[0].image.shape}; watch --workers {args.workers}, stable "
         f"{args.stable_seconds:.0f} s, structures from {'model ' + args.model if args.model else 'the PACS'}")
    results: dict[str, list[dict[str, Any]]] = {"sequential": [], "together": []}
    with open(log_path, "wb") as log:
        watch = subprocess.Popen(watch_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "watching" not in log_path.read_text(errors="replace"):
            if watch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pacsai watch did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)

        def push(p: Any) -> float:
            summary = pacs.store(list(p.datasets()), progress=False)
            if not summary.ok:
                raise RuntimeError(f"push failed: {summary}")
            return time.time()

        for i, p in enumerate(patients[:n]):
            stored = push(p)
            row = _wait_done(state, str(p.ct[0].StudyInstanceUID), watch, args.timeout_s)
            results["sequential"].append({"patient": f"patient-{i + 1}", "stored_at": stored, "row": row})
        stored_at = [(i, p, push(p)) for i, p in enumerate(patients[n:], start=n)]
        for i, p, stored in stored_at:
            row = _wait_done(state, str(p.ct[0].StudyInstanceUID), watch, args.timeout_s)
            results["together"].append({"patient": f"patient-{i + 1}", "stored_at": stored, "row": row})
        for phase in results.values():
            for r in phase:
                row = r["row"]
                r.update(latency_s=row["finished"] - r["stored_at"], report_s=row["run_seconds"],
                         qa=row["qa_status"], status=row["status"], runs=row["runs"], model=row["model"])
                del r["row"]
        for p in patients:
            series = pacs.search_series(StudyInstanceUID=str(p.ct[0].StudyInstanceUID))
            pdfs = [int(s.NumberOfSeriesRelatedInstances) for s in series.itertuples() if int(s.SeriesNumber) == 903]
            if pdfs != [1]:
                raise RuntimeError(f"expected one PDF in each study, found {pdfs}")
    finally:
        os.killpg(watch.pid, signal.SIGTERM)
        try:
            watch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(watch.pid, signal.SIGKILL)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = load_average()
    everything = [r["latency_s"] for phase in results.values() for r in phase]
    per_phase = {k: {"p50_s": _percentile([r["latency_s"] for r in v], 50),
                     "p95_s": _percentile([r["latency_s"] for r in v], 95)} for k, v in results.items()}
    p50, p95 = _percentile(everything, 50), _percentile(everything, 95)
    report_s = statistics.median(r["report_s"] for phase in results.values() for r in phase)
    load_text = f"1-min load {load_start[0] if load_start else '?'}→{load_end[0] if load_end else '?'}"
    detail = (f"{len(everything)} studies, {n} one after another (p50 {per_phase['sequential']['p50_s']:.1f} s, "
              f"p95 {per_phase['sequential']['p95_s']:.1f} s) and {n} together (p50 "
              f"{per_phase['together']['p50_s']:.1f} s, p95 {per_phase['together']['p95_s']:.1f} s); "
              f"--workers {args.workers}, stable {args.stable_seconds:.0f} s, report {report_s:.1f} s median, "
              f"structures from {'the model' if args.model else 'the PACS'}; {load_text}")
    name = "watch_model" if args.model else "watch"  # two result files: one run does not erase the other
    figures = [
        emit(Figure(f"{name}_latency_p95", p95 / P95_TARGET_S, "60s_target", f"p95 {p95:.1f} s; {detail}")),
        emit(Figure(f"{name}_latency_p50", p50 / P50_TARGET_S, "30s_target", f"p50 {p50:.1f} s")),
    ]
    path = write_result(name, figures, {
        "studies_per_phase": n, "workers": args.workers, "stable_seconds": args.stable_seconds,
        "model": args.model or None, "p50_s": p50, "p95_s": p95, "per_phase": per_phase,
        "load_average_end": load_end, "results": results,
        "method": "latency = watch state 'finished' (report pushed, process exited) - STOW of the last instance "
                  "returned; same clock",
    }, started_load=load_start)
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
