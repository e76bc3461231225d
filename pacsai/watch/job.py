"""One study's report, run by the watch in its own process (forked from the watch, which has already imported
the report code: that saves seconds of start-up per report; ``python -m pacsai.watch.job SPEC.json RESULT.json``
runs one by hand).

A process per report, not a thread: a report that crashes or hangs cannot take the watch down, and stopping the
watch can stop a report (and its kernel and Chromium, which share its process group) at once. The report goes
through :func:`pacsai.report.run.run_report`, the code path of ``pacsai report``, so the QA gate decides what is
pushed. It is written into a hidden staging folder and renamed into place only when complete; a report that
fails or is abandoned (SIGTERM) leaves nothing behind on disk. On Linux the job dies with the watch (a watch killed
with SIGKILL leaves no orphan report pushing behind the back of the one started next).

The model alias (``models:/name@champion``) is resolved here, at the start of each report: promoting a model
takes effect for the next study without restarting the watch, and the result records the version used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

EXIT_ABANDONED = 130


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the watch that started it dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return


def _abandon(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def prewarm(*, model: bool) -> None:
    """Import, in the watch, what every report imports, and fill the read-only tables they read once per process.

    Each report is forked from the watch, so whatever is loaded here is loaded for all of them: about 3 s of CPU
    per report with a model (MONAI alone ~5 s more), which is what bounds a burst of studies on a small machine.
    Only imports and static tables of the DICOM standard: no model is loaded, no MLflow store, PACS or file is
    opened and no thread is started (none of those may cross ``fork()``; each report resolves ``@champion`` itself,
    so a new champion still takes effect without a restart).
    """
    from pacsai import notebooks

    notebooks.import_jsonschema_without_iri_grammar()  # before anything imports jsonschema (see there)
    import nbconvert.exporters.html  # noqa: F401  (the report's HTML export)
    import papermill  # noqa: F401

    import pacsai.report.handoff  # noqa: F401
    import pacsai.report.inputs  # noqa: F401
    import pacsai.report.outputs  # noqa: F401  (SEG, RTSTRUCT, SR, PDF: highdicom and its code dictionaries)
    import pacsai.report.params  # noqa: F401
    import pacsai.report.pdf  # noqa: F401
    import pacsai.report.run  # noqa: F401
    import pacsai.report.sr  # noqa: F401

    _read_dicom_standard_tables()
    if model:
        # torch, MONAI and the inference code; mlflow's SQL stores (each report opens its own store)
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        import pacsai.learning.infer  # noqa: F401


def _read_dicom_standard_tables() -> None:
    """highdicom's tables of the standard's IODs and modules: ~1 s of JSON parsing, cached per process.

    They are read on a report's first SEG/SR; read here, every forked report has them. A highdicom without these
    (private) readers just reads them in each report, as before.
    """
    try:
        from highdicom import _standard_utils as tables
    except ImportError:  # pragma: no cover - a highdicom that moved them
        return
    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        reader = getattr(tables, name, None)
        if callable(reader):
            reader()


def _set_threads(threads: int | None) -> None:
    """The report's compute threads (torch's intra-op pool), as the watch shared the CPUs out."""
    if not threads or "pacsai.learning.infer" not in sys.modules:  # no model in this watch's reports
        return
    from pacsai.learning.infer import set_threads

    set_threads(int(threads))


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one report as ``spec`` says; returns the result record (no identifiers besides what ``spec`` holds)."""
    from pacsai.report.params import ReportParameters
    from pacsai.report.run import run_report

    _set_threads(spec.get("threads"))
    params = dict(spec["params"])
    model: dict[str, Any] = {}
    if params.get("structures_from") == "model" and params.get("model_uri"):
        from pacsai import tracking

        ref = tracking.resolve_model(params["model_uri"])
        if ref.name:  # a registered model: report on the exact version the alias points at right now
            params["model_uri"] = ref.uri
            model = {"requested": spec["params"]["model_uri"], "name": ref.name, "version": ref.version,
                     "run_id": ref.run_id}
        else:
            model = {"requested": params["model_uri"], "name": "", "version": "", "run_id": ref.run_id}
    final = Path(spec["out_dir"])
    staging = Path(spec["staging_dir"])
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = run_report(ReportParameters(**params), out_dir=staging, push=bool(spec["push"]),
                            track=bool(spec["track"]), pdf=bool(spec["pdf"]),
                            push_anyway=bool(spec["push_anyway"]))
        metrics = json.loads(result.metrics.read_text())
        # Into place only when complete; an earlier report of the same study goes once the new one is there.
        final.parent.mkdir(parents=True, exist_ok=True)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    provenance = (metrics.get("provenance") or {}).get("model") or {}
    if provenance:
        model.update({k: provenance.get(k) for k in ("name", "version", "run_id") if provenance.get(k)})
    pushed = result.pushed or {}
    return {
        "ok": True,
        "qa_status": str((metrics.get("qa") or {}).get("status", "")),
        "model": model,
        "objects": list(pushed.get("objects", [])),
        "stored": len(pushed.get("stored", [])),
        "already_present": len(pushed.get("already_present", [])),
        "withheld": list(pushed.get("withheld", [])),
        "seconds": time.perf_counter() - start,
        "pushed_at": time.time(),
    }


def execute(spec_path: Path, result_path: Path) -> int:
    """Run the job of ``spec_path``, write its record to ``result_path`` (atomically); returns the exit code."""
    spec = json.loads(spec_path.read_text())
    if os.getppid() != int(spec.get("watch_pid", os.getppid())):
        return EXIT_ABANDONED  # the watch died before the death signal was armed
    try:
        record = run_job(spec)
        code = 0
    except KeyboardInterrupt:
        record = {"ok": False, "abandoned": True, "error": "abandoned (the watch is stopping)"}
        code = EXIT_ABANDONED
    except Exception as err:  # any failure is recorded for the watch's retry logic; the watch redacts it
        record = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        code = 1
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, result_path)
    return code


def prepare_child() -> None:
    """In a freshly forked job process: own session, dies with the watch, SIGTERM abandons the report."""
    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGTERM, _abandon)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """``python -m pacsai.watch.job SPEC.json RESULT.json``: one job by hand (the watch forks instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m pacsai.watch.job SPEC.json RESULT.json", file=sys.stderr)
        return 2
    _die_with_parent()
    signal.signal(signal.SIGTERM, _abandon)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return execute(Path(argv[0]), Path(argv[1]))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
