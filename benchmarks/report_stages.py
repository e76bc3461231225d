"""Where one report's wall time goes: kernel start, every notebook cell, HTML, PDF, DICOM outputs, MLflow.

Usage: ``python benchmarks/report_stages.py [--repeats 1] [--push] [--track] [--importtime] [--baseline-ref REF]
[--model-store DB]``

Seeds one synthetic patient (``pacsai.synthetic``, 96×256×256 CT with structures, dose and a prior study, the
patient of ``benchmarks/report.py``) into a temporary embedded store, warms the cache, and runs ``run_report``
(``structures_from="pacs"``, HTML + PDF) in a child process that times itself after its imports. The child
wraps the report's steps and stamps each with the wall clock:

* ``before_kernel``: connecting, the patient check, the parameters (``run_report`` up to papermill); with
  ``--model-store`` (structures from the demo's model ``models:/pacsai-thorax@champion`` in that MLflow store),
  ``model_load`` (torch, MONAI, the checkpoint), ``model_inference`` (every ``segment`` call, test-time
  augmentation included) and ``gather_rest`` (reading the studies, the hand-off file) instead;
* ``papermill_setup``: papermill reading and parameterising the template, up to the kernel's ``Popen``;
* ``kernel_process_start`` (the ``Popen``) and ``kernel_ready`` (ipykernel's own start until the first cell);
* ``cell: <name>``: each code cell, from papermill's ``metadata.papermill`` times (named by its tag or its
  first comment/code line); ``between_cells``: papermill's work between them (saving the notebook after each);
* ``kernel_shutdown``: after the last cell until papermill returns (shutdown and the last save);
* ``html`` (nbconvert), ``pdf`` (headless Chromium), with ``--push`` ``dicom_outputs_build`` and
  ``dicom_outputs_store`` (SEG, SR, Encapsulated PDF, RTSTRUCT for model contours), with ``--track``
  ``mlflow_track``;
* ``unaccounted``: the wall time the rows above do not cover (their sum plus it is the wall time).

``--importtime`` runs the kernel with ``PYTHONPROFILEIMPORTTIME=1`` (an extra run, not the timed one) and lists the
top-level imports that cost most inside the kernel (``top_imports_s``, cumulative, inflated by the profiling).
``--baseline-ref`` runs the same child with the ``pacsai`` package of an earlier commit (same run, same store,
interleaved), and records its stages next to these.

With ``--model-store`` the table goes to ``benchmarks/results/report_stages_model.json`` (no figure line: the
model's end-to-end figure is ``benchmarks/report.py``'s). Otherwise prints ``report_stages: R x <baseline>`` when a
baseline ran (R = baseline wall / this tree's wall), and
otherwise ``report_stages: R x papermill_empty_notebook`` (the report's wall over an empty notebook's, the floor
of a kernel), the top stages as ``# `` lines, and writes ``benchmarks/results/report_stages.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, Figure, emit, load_average, note, write_result

SHAPE = (96, 256, 256)
SPACING = (1.8, 1.8, 3.0)
SEED = 101
CHILD_TIMEOUT_S = 240
MODEL_URI = "models:/pacsai-thorax@champion"  # what `pacsai demo` registers (pacsai/templates/demo.yaml)


# ------------------------------------------------------------------------------------------- child side
class Stamps:
    """Wall-clock stamps (seconds since the epoch) of named events, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.events.append((name, time.time()))

    def wrap(self, module: Any, attr: str, name: str) -> None:
        """Replace ``module.attr`` by a wrapper that marks ``name:start`` and ``name:end`` around each call."""
        original: Callable[..., Any] = getattr(module, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{name}:start")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(f"{name}:end")

        setattr(module, attr, wrapper)


def _instrument(stamps: Stamps) -> None:
    from pacsai import notebooks
    from pacsai.report import inputs, outputs, render, run

    stamps.wrap(render, "execute", "execute")
    stamps.wrap(render, "to_html", "html")
    stamps.wrap(render, "to_pdf", "pdf")
    stamps.wrap(outputs, "build_outputs", "dicom_outputs_build")
    stamps.wrap(outputs, "push_outputs", "dicom_outputs_store")
    stamps.wrap(run, "_track", "mlflow_track")
    stamps.wrap(run, "_gather_for_kernel", "gather")
    stamps.wrap(inputs, "_load_model", "model_load")
    stamps.wrap(inputs, "_segment_into", "model_inference")
    make_class = notebooks._manager_class

    def manager_class(*args: Any, **kwargs: Any) -> type[Any]:
        base = make_class(*args, **kwargs)

        class Stamped(base):  # type: ignore[misc, valid-type]
            async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
                stamps.mark("kernel_process:start")
                await super().start_kernel(**kw)
                stamps.mark("kernel_process:end")

        return Stamped

    notebooks._manager_class = manager_class


def _cell_name(cell: Any) -> str:
    tags = [t for t in cell.metadata.get("tags", []) if t]
    if tags:
        return tags[0]
    lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
    comment = next((line.lstrip("# ") for line in lines if line.startswith("#")), None)
    return (comment or (lines[0] if lines else "(empty)"))[:60]


def _cells(notebook: Path) -> list[dict[str, Any]]:
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cells = []
    for cell in nb.cells:
        meta = cell.metadata.get("papermill") or {}
        if cell.cell_type != "code" or not meta.get("start_time") or not meta.get("end_time"):
            continue
        cells.append({"name": _cell_name(cell), "start": dt.datetime.fromisoformat(meta["start_time"]).timestamp(),
                      "end": dt.datetime.fromisoformat(meta["end_time"]).timestamp()})
    return cells


def _child(patient_id: str, out: Path, push: bool, track: bool, model_store: str | None) -> dict[str, Any]:
    from pacsai.report.params import validate_parameters
    from pacsai.report.run import run_report

    stamps = Stamps()
    _instrument(stamps)
    model = {"structures_from": "model", "model_uri": MODEL_URI} if model_store else {"structures_from": "pacs"}
    params = validate_parameters(patient_id=patient_id, pacs_url=os.environ["PACSAI_PACS_URL"], **model)
    stamps.mark("report:start")
    start = time.perf_counter()
    run_report(params, out_dir=out, push=push, track=track, mlflow_uri=model_store)
    seconds = time.perf_counter() - start
    stamps.mark("report:end")
    return {"seconds": seconds, "events": stamps.events, "cells": _cells(out / "report.ipynb")}


def _spent(events: list[tuple[str, float]], name: str) -> float:
    """Seconds inside every ``name:start`` … ``name:end`` pair (a stage called more than once is summed)."""
    starts = [t for event, t in events if event == f"{name}:start"]
    ends = [t for event, t in events if event == f"{name}:end"]
    return sum(end - start for start, end in zip(starts, ends, strict=True))


def stage_table(events: list[tuple[str, float]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages of one report from its stamps and its cells' times; the last row is what none covers."""
    at = dict(events)  # the last stamp of each event
    before = at["execute:start"] - at["report:start"]
    rows: list[tuple[str, float]] = []
    if "gather:start" in at:
        model = [(name, _spent(events, name)) for name in ("model_load", "model_inference")]
        rows += [*model, ("gather_rest", _spent(events, "gather") - sum(s for _, s in model))]
        before -= _spent(events, "gather")
    rows += [
        ("before_kernel", before),
        ("papermill_setup", at["kernel_process:start"] - at["execute:start"]),
        ("kernel_process_start", at["kernel_process:end"] - at["kernel_process:start"]),
    ]
    if cells:
        rows.append(("kernel_ready", cells[0]["start"] - at["kernel_process:end"]))
        rows += [(f"cell: {c['name']}", c["end"] - c["start"]) for c in cells]
        rows.append(("between_cells", sum(b["start"] - a["end"] for a, b in zip(cells, cells[1:], strict=False))))
        rows.append(("kernel_shutdown", at["execute:end"] - cells[-1]["end"]))
    for name in ("html", "pdf", "dicom_outputs_build", "dicom_outputs_store", "mlflow_track"):
        if f"{name}:start" in at:
            rows.append((name, at[f"{name}:end"] - at[f"{name}:start"]))
    wall = at["report:end"] - at["report:start"]
    rows.append(("unaccounted", wall - sum(seconds for _, seconds in rows)))
    return [{"stage": name, "seconds": round(seconds, 4)} for name, seconds in rows]


def _importtime_child(patient_id: str, out: Path) -> dict[str, Any]:
    """Run the report once with the kernel importing under ``-X importtime``; the costliest top-level imports."""
    from pacsai.report import run
    from pacsai.report.params import validate_parameters

    base = run.report_environment

    def environment(*args: Any, **kwargs: Any) -> dict[str, str]:
        return {**base(*args, **kwargs), "PYTHONPROFILEIMPORTTIME": "1"}

    run.report_environment = environment
    params = validate_parameters(patient_id=patient_id, pacs_url=os.environ["PACSAI_PACS_URL"],
                                 structures_from="pacs")
    run.run_report(params, out_dir=out, push=False, track=False, pdf=False)
    cumulative: dict[str, int] = {}
    for line in (out / "report.log").read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line[len("import time:"):].split("|")
        # Top-level imports of the kernel process (one leading space: not nested in another import), its
        # start-up's (ipykernel) and its cells' alike, each with what it pulled in.
        if cum.strip().isdigit() and name.startswith(" ") and not name.startswith("  "):
            cumulative[name.strip()] = cumulative.get(name.strip(), 0) + int(cum)
    ranked = sorted(cumulative.items(), key=lambda kv: -kv[1])[:15]
    return {"top_imports_s": {name: us / 1e6 for name, us in ranked}}


# ------------------------------------------------------------------------------------------- parent side
def seed(work: Path) -> tuple[str, str]:
    """Store the synthetic patient and warm the cache; return the store URL and the patient's ID."""
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    url = f"file://{work / 'pacs'}"
    pacs = connect(url, cache_dir=work / "cache")
    patient = make_patient(SEED, shape=SHAPE, spacing=SPACING)
    summary = pacs.store(list(patient.datasets()), progress=False)
    if not summary.ok:
        raise RuntimeError(f"seeding the embedded store in {work} failed: {summary}")
    for study_uid in set(pacs.search_studies(PatientID=patient.patient_id).StudyInstanceUID):
        pacs.retrieve_study(str(study_uid), progress=False)
    return url, patient.patient_id


def _archive(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "pacsai"], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(work: Path, url: str, args: list[str], *, pythonpath: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "PACSAI_PACS_URL": url, "PACSAI_CACHE_DIR": str(work / "cache"),
           "PACSAI_MLFLOW_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}", "MLFLOW_ENABLE_TELEMETRY": "false",
           "DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"}
    cwd = work
    if pythonpath is not None:
        # The kernel imports pacsai too: PYTHONPATH reaches it through the environment it inherits.
        env["PYTHONPATH"] = str(pythonpath)
        cwd = pythonpath
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"report child failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def _empty_child(work: Path) -> dict[str, Any]:
    """An empty notebook through the same runner and kernel: the floor every report pays to start a kernel."""
    import nbformat

    from pacsai import notebooks

    work.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
    notebook.metadata["kernelspec"] = {"name": notebooks.KERNEL, "display_name": notebooks.KERNEL,
                                       "language": "python"}
    template = work / "empty.ipynb"
    nbformat.write(notebook, template)
    start = time.perf_counter()
    notebooks.execute(template, work / "empty.out.ipynb", {}, cwd=work)
    return {"seconds": time.perf_counter() - start}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the smallest wall time, with its table (every stage of one and the same run)."""
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "stages": stage_table(best["events"], best["cells"]),
            "all_seconds": [r["seconds"] for r in runs]}


def _print_top(title: str, table: list[dict[str, Any]], wall: float, top: int = 8) -> None:
    note(f"{title}: {wall:.2f} s")
    for row in sorted(table, key=lambda r: -abs(r["seconds"]))[:top]:
        note(f"  {row['stage']:<40} {row['seconds']:7.3f} s  {100 * row['seconds'] / wall:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, patient, out = argv[1], argv[2], Path(argv[3])
        if kind == "importtime":
            found = _importtime_child(patient, out)
        elif kind == "empty":
            found = _empty_child(out)
        else:
            found = _child(patient, out, push="push" in kind, track="track" in kind,
                           model_store=argv[4] if len(argv) > 4 else None)
        print("\n" + json.dumps(found), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--push", action="store_true", help="also build and store the DICOM outputs")
    parser.add_argument("--track", action="store_true", help="also log the MLflow run")
    parser.add_argument("--importtime", action="store_true", help="also list the kernel's costliest imports")
    parser.add_argument("--baseline-ref", help="also run the report with the pacsai package of this git ref")
    parser.add_argument("--model-store", type=Path,
                        help=f"structures from {MODEL_URI} in this MLflow sqlite store (e.g. mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    load = load_average()
    kind = ("model" if args.model_store else "report") + ("+push" if args.push else "") + \
        ("+track" if args.track else "")
    store = [f"sqlite:///{args.model_store.resolve()}"] if args.model_store else []

    work = Path(tempfile.mkdtemp(prefix="pacsai-bench-stages-"))
    try:
        url, patient = seed(work)
        baseline_tree = _archive(args.baseline_ref, work / "baseline") if args.baseline_ref else None
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        empties: list[float] = []
        for k in range(max(1, args.repeats)):  # interleaved: drifting load hits both alike
            if baseline_tree is not None:
                theirs.append(run_child(work, url, [kind, patient, str(work / f"base-{k}"), *store],
                                        pythonpath=baseline_tree))
            ours.append(run_child(work, url, [kind, patient, str(work / f"report-{k}"), *store]))
            empties.append(run_child(work, url, ["empty", patient, str(work / f"empty-{k}")])["seconds"])
        imports = run_child(work, url, ["importtime", patient, str(work / "importtime")]) if args.importtime else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = _best(ours)
    _print_top("this tree", result["stages"], result["seconds"])
    data: dict[str, Any] = {"ct_shape": list(SHAPE), "kind": kind, "repeats": args.repeats,
                            "empty_notebook_seconds": min(empties), "report": result, **imports}
    if imports:
        note("costliest imports in the kernel (cumulative, under -X importtime): " + ", ".join(
            f"{name} {s:.2f} s" for name, s in list(imports["top_imports_s"].items())[:8]))
    if baseline_tree is not None:
        before = _best(theirs)
        _print_top(f"pacsai at {args.baseline_ref}", before["stages"], before["seconds"])
        data["baseline"] = {"ref": args.baseline_ref, **before}
        by_stage = {row["stage"]: row["seconds"] for row in before["stages"]}
        for row in result["stages"]:
            row["baseline_seconds"] = by_stage.get(row["stage"])
        token = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.baseline_ref)
        figure = Figure("report_stages", before["seconds"] / result["seconds"], f"pacsai_{token}",
                        f"one report ({kind}, HTML + PDF): {result['seconds']:.1f} s vs {before['seconds']:.1f} s")
    else:
        figure = Figure("report_stages", result["seconds"] / min(empties), "papermill_empty_notebook",
                        f"one report ({kind}, HTML + PDF): {result['seconds']:.1f} s vs {min(empties):.1f} s; "
                        + ", ".join(f"{r['stage']} {r['seconds']:.1f} s"
                                    for r in sorted(result["stages"], key=lambda r: -r["seconds"])[:3]))
    if args.model_store:
        # The stage table only: the model's figure is benchmarks/report.py's report_model_end_to_end (one row in
        # the README), and `make bench` does not run this variant, so it must not leave a row to go stale.
        note(f"{figure.detail}; model {MODEL_URI} from {args.model_store}")
        data["model"] = {"uri": MODEL_URI, "store": str(args.model_store)}
        path = write_result("report_stages_model", [], data, started_load=load)
    else:
        path = write_result("report_stages", [emit(figure)], data, started_load=load)
    note(f"wrote {path}; load average {load} at start, {load_average()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
