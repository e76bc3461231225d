"""`make bench`: every benchmark against its baseline in the same run, within a time budget; then the README table.

Usage: ``python benchmarks/run_all.py [--budget-s 300] [--only NAME ...] [--quick] [--full] [--no-readme]``

Each benchmark runs as its own process (its figures print as ``NAME: R x BASELINE`` lines, the rest as
``# ...``) and writes ``benchmarks/results/<name>.json``. The budget is enforced: a benchmark gets at most
the time left, and one that runs over is stopped (its process group only) and counted as failed. On a machine
already loaded past its core count the benchmarks run with fewer repeats (``--quick`` forces that), because
the budget matters more than the last digit of a figure measured under someone else's load. Afterwards the
README's table between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is regenerated from every result
file. ``make bench`` runs the short form (the report benchmark's steps once, its cohort rows on 2 patients
without the Dask cluster's run, the watch with 1 study per phase, no per-stage report table);
``--full`` runs the issue's full measurements (cohorts of 4 patients), which need more than the 5-minute budget
on 2 cores.
``benchmarks/scale.py`` (the scale curve up to 400×512×512) is not part of it: it takes longer than the budget
alone; run it by itself. Prints the total time; exits 1 if a benchmark failed or the budget ran out.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, README, RESULTS_DIR, load_average, machine, machine_line, note, update_readme

# (name, script, extra arguments when quick): cheapest first, so a tight budget loses the least.
BENCHMARKS: list[tuple[str, str, list[str]]] = [
    ("read_series", "read_series.py", ["--repeats", "2"]),
    ("retrieve", "retrieve.py", ["--repeats", "2"]),
    ("rtstruct", "rtstruct.py", ["--repeats", "1"]),
    ("dvh", "dvh.py", ["--repeats", "1"]),
    ("report_stages", "report_stages.py", ["--repeats", "1"]),
    ("watch", "watch.py", []),
    # the longest last: stopped at the budget it loses only its own rows
    ("report", "report.py", ["--repeats", "1"]),
]
# Arguments for the short form `make bench` runs; --full leaves them out (the full measurement, over the
# 5-minute budget on 2 cores): the report benchmark once per step and its cohort rows on 2 patients instead of 4.
SHORT: dict[str, list[str]] = {"report": ["--cohort-patients", "2", "--repeats", "1", "--no-dask"],
                               "watch": ["--quick"]}
#: only with --full: the per-stage table of one report (its own command, benchmarks/report_stages.py; the report
#: benchmark's report_end_to_end row is the same report's wall time)
FULL_ONLY = {"report_stages"}


def run_one(script: Path, args: list[str], timeout_s: float) -> tuple[int | None, float]:
    """Run a benchmark script; its output streams through. Returns (exit code or None if stopped, seconds)."""
    start = time.perf_counter()
    # Its own session, so that stopping it stops Orthanc, kernels and Chromium it started, and nothing else.
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=HERE.parent, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        code = None
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="total wall-clock budget (default 300)")
    parser.add_argument("--only", nargs="+", choices=[b[0] for b in BENCHMARKS], help="run only these")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, whatever the load")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--full", action="store_true",
                        help="the full measurements (cohorts on 4 patients); give a larger --budget-s")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    load = load_average()
    cores = os.cpu_count() or 1
    quick = args.quick or bool(load and load[0] > cores)
    note(f"machine: {machine_line(machine())}")
    if quick:
        note(f"fewer repeats: {'--quick' if args.quick else f'1-min load {load[0]} > {cores} cores'}")
    failed: list[str] = []
    for name, script, quick_args in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        if name in FULL_ONLY and not (args.full or args.only):
            note(f"{name}: left out of the short form (run_all.py --full, or --only {name})")
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if left < 5:
            print(f"{name}: skipped (no time left in the {args.budget_s:.0f} s budget)", flush=True)
            failed.append(name)
            continue
        note(f"{name} ({left:.0f} s of the budget left)")
        extra = (quick_args if quick else []) + ([] if args.full else SHORT.get(name, []))
        code, seconds = run_one(HERE / script, extra, left)
        if code is None:
            print(f"{name}: skipped (stopped after {seconds:.0f} s: over the {args.budget_s:.0f} s budget)",
                  flush=True)
            failed.append(name)
        elif code != 0:
            note(f"{name} failed (exit {code}) after {seconds:.0f} s")
            failed.append(name)
        else:
            note(f"{name}: {seconds:.0f} s")
    if not args.no_readme:
        changed = update_readme(README, RESULTS_DIR)
        note(f"README table {'regenerated' if changed else 'unchanged'} from {RESULTS_DIR}/*.json")
    total = time.perf_counter() - start
    note(f"total: {total:.0f} s (budget {args.budget_s:.0f} s); load average {load} at start, "
         f"{load_average()} at end")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
