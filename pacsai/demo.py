"""``pacsai demo``: the main job on a fresh clone — seed a PACS, train, validate, report one patient, push back.

Re-running reuses what is there: seeding is idempotent, a model that already holds the alias ``champion`` is
not trained again (``--retrain`` forces it), and re-pushing the same report adds nothing to the PACS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_EXPERIMENT = "experiments/demo.yaml"
# The report patient is seeded after training, from seeds the training cohort never saw, with a prior study.
REPORT_SEED = 900
SUMMARY_FILE = "reports/demo_summary.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="main job: seed the embedded PACS, train, validate, report one patient")
    p.add_argument("--experiment", type=Path, default=None, help=f"experiment YAML (default {DEMO_EXPERIMENT})")
    p.add_argument("--pacs", default=None, help="PACS to use (default: the embedded store ./pacs)")
    p.add_argument("--retrain", action="store_true", help="train even when a champion model exists")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests and CI)")
    p.add_argument("--started-at", type=float, default=None,
                   help="epoch seconds when `make demo` began, so the summary counts the set-up too")
    p.add_argument("--summary", type=Path, default=Path(SUMMARY_FILE),
                   help=f"where to write the run's figures as JSON (default {SUMMARY_FILE}); "
                   "`python scripts/readme_figures.py --demo FILE` puts them in the README")
    p.set_defaults(func=run)


def _step(text: str) -> float:
    print(f"==> {text}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    import yaml

    from pacsai import tracking
    from pacsai.errors import PacsaiError
    from pacsai.pacs import connect
    from pacsai.report.params import validate_parameters
    from pacsai.report.render import project_root
    from pacsai.report.run import run_report
    from pacsai.synthetic import seed_pacs

    start = time.perf_counter()
    held_out: dict[str, float] = {}
    experiment = args.experiment or project_root() / DEMO_EXPERIMENT
    cfg = yaml.safe_load(Path(experiment).read_text())
    syn = dict(cfg.get("synthetic") or {})
    shape = tuple(syn.get("shape", (40, 160, 160)))
    spacing = tuple(syn.get("spacing", (2.5, 2.5, 4.0)))
    n_patients = 3 if args.smoke else int(syn.get("patients", 12))
    pacs = connect(args.pacs)

    stages: dict[str, float] = {}
    t = _step(f"seeding {n_patients} synthetic patients into {pacs.url}")
    seed_pacs(pacs, patients=n_patients, seed=int(syn.get("seed", 0)), with_prior=bool(syn.get("with_prior")),
              shape=shape, spacing=spacing, progress=True)
    stages["seeding"] = time.perf_counter() - t
    print(f"    {stages['seeding']:.0f} s")

    model_name = cfg["model"]["name"]
    report_model = f"models:/{model_name}@champion"
    champion = tracking.get_alias(model_name)
    if champion is None or args.retrain or args.smoke:
        from pacsai.learning.train import train
        from pacsai.learning.validate import run_validation

        t = _step(f"training {experiment} (MLflow: {tracking.tracking_uri()})")
        result = train(experiment, pacs=pacs, smoke=args.smoke)
        stages["training"] = time.perf_counter() - t
        print(f"    {result.model_uri} (run {result.run_id}), best epoch {result.best_epoch}, "
              f"{result.seconds:.0f} s in the training loop, {stages['training']:.0f} s in all")
        t = _step(f"validating {result.model_uri} by papermill (thresholds: the experiment's validation block)")
        validation = run_validation(result.model_uri, smoke=args.smoke, pacs_url=str(pacs.url))
        stages["validation"] = time.perf_counter() - t
        held_out = {k: float(v) for k, v in validation.metrics.items() if k.startswith(("dice_", "hd95_"))}
        for metric in ("dice", "hd95"):
            values = ", ".join(f"{k.removeprefix(metric + '_')} {v:.3g}"
                               for k, v in sorted(validation.metrics.items()) if k.startswith(metric + "_"))
            print(f"    held-out {metric}: {values}")
        if not validation.passed:
            if not args.smoke:
                raise PacsaiError(f"the demo model failed validation ({'; '.join(validation.failures)}); "
                                  f"see {validation.notebook}")
            # a 2-epoch smoke model cannot pass the real gate; the smoke run still exercises the report with it
            print(f"    smoke model not promoted ({len(validation.failures)} gate failures, as expected)")
            report_model = result.model_uri
        else:
            print(f"    alias champion → {model_name} v{validation.version}")
        print(f"    {stages['validation']:.0f} s")
    else:
        print(f"==> reusing {model_name} v{champion} (alias champion); --retrain trains again")

    t = _step("seeding the report patient (with a prior study) and writing the planning report")
    seeded = seed_pacs(pacs, patients=1, seed=REPORT_SEED, with_prior=True, shape=shape, spacing=spacing,
                       progress=False)
    patient_id = seeded[0].patient_id
    params = validate_parameters(patient_id=patient_id, pacs_url=str(pacs.url), structures_from="model",
                                 model_uri=report_model, smoke=args.smoke)
    report = run_report(params, push=True)
    stages["report"] = time.perf_counter() - t
    print(f"    {stages['report']:.0f} s")
    print()
    print(f"Report:        {report.html}")
    print(f"               {report.pdf or '(no PDF: install chromium)'}")
    print(f"Metrics:       {report.metrics}")
    qa = json.loads(Path(report.metrics).read_text()).get("qa") or {}
    reasons = [r for r in qa.get("reasons", []) if r.get("level") != "note"]
    print(f"QA gate:       {qa.get('status', '?')}" + "".join(f"\n               - {r['message']}" for r in reasons))
    if report.pushed:
        print(f"Back in PACS:  {len(report.pushed['objects'])} objects in {pacs.url} "
              f"({len(report.pushed['stored'])} new)")
        if report.pushed.get("withheld"):
            print(f"               withheld: {', '.join(report.pushed['withheld'])} "
                  f"({report.pushed.get('withheld_reason', '')})")
    print(f"MLflow run:    {report.mlflow_run_id}  (store {tracking.tracking_uri()})")
    print("Open the MLflow UI:  .venv/bin/pacsai ui          → http://127.0.0.1:5000")
    print("Open JupyterLab:     .venv/bin/jupyter lab notebooks/01_explore_pacs.ipynb")
    print("Stages:        " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    total = time.perf_counter() - start
    print(f"Done in {total:.0f} s. Research use only.")
    if args.started_at is not None:
        stages = {"setup": max(0.0, time.time() - total - args.started_at), **stages}
    _write_summary(args.summary, stages=stages, held_out=held_out, qa=str(qa.get("status", "?")),
                   model=report_model, smoke=args.smoke, experiment=Path(experiment),
                   structures=list(cfg.get("structures") or []))
    return 0


def _write_summary(path: Path, *, stages: dict[str, float], held_out: dict[str, float], qa: str, model: str,
                   smoke: bool, experiment: Path, structures: list[str]) -> None:
    """The run's own figures (stages, held-out metrics, QA status), stamped with the commit and machine.

    The README's demo figures are generated from this file (scripts/readme_figures.py), never typed by hand.
    No patient identifier goes in: the figures are about the model and the machine.
    """
    import datetime as dt
    import math
    import os
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                timeout=10, cwd=Path(experiment).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "git": commit,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "smoke": smoke,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "total_s": round(sum(stages.values()), 1),
        "structures": structures,
        # NaN (a structure the model never found) is not JSON: it is written as null.
        "held_out": {k: round(v, 4) if math.isfinite(v) else None for k, v in sorted(held_out.items())},
        "qa_status": qa,
        "model": model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    print(f"Figures:       {path}")
