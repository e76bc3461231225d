"""``pacsai demo``: the main job on a fresh clone — seed a PACS, train, validate, report one patient, push back.

The work is :func:`pacsai.demo.run_demo`; this verb parses its options and prints the steps and the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pacsai.demo import SUMMARY_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` verb (imports nothing heavy: ``pacsai --help`` stays fast)."""
    p = subparsers.add_parser("demo", help="main job: seed the embedded PACS, train, validate, report one patient")
    p.add_argument("--experiment", type=Path, default=None,
                   help="experiment YAML (default: the demo experiment shipped with pacsai, experiments/demo.yaml "
                   "in the source tree)")
    p.add_argument("--pacs", default=None, help="PACS to use (default: the embedded store ./pacs)")
    p.add_argument("--retrain", action="store_true", help="train even when a champion model exists")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests and CI)")
    p.add_argument("--started-at", type=float, default=None,
                   help="epoch seconds when `make demo` began, so the summary counts the set-up too")
    p.add_argument("--summary", type=Path, default=Path(SUMMARY_FILE),
                   help=f"where to write the run's figures as JSON (default {SUMMARY_FILE}); "
                   "`python scripts/readme_figures.py --demo FILE` puts them in the README")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsai import tracking
    from pacsai.demo import run_demo

    result = run_demo(experiment=args.experiment, pacs_url=args.pacs, retrain=args.retrain, smoke=args.smoke,
                      started_at=args.started_at, summary=args.summary,
                      echo=lambda line: print(line, flush=True))
    report = result.report
    print()
    print(f"Report:        {report.html}")
    print(f"               {report.pdf or '(no PDF: install chromium)'}")
    print(f"Metrics:       {report.metrics}")
    reasons = [r for r in result.qa.get("reasons", []) if r.get("level") != "note"]
    print(f"QA gate:       {result.qa.get('status', '?')}"
          + "".join(f"\n               - {r['message']}" for r in reasons))
    if report.pushed:
        print(f"Back in PACS:  {len(report.pushed['objects'])} objects in {result.pacs_url} "
              f"({len(report.pushed['stored'])} new)")
        if report.pushed.get("withheld"):
            print(f"               withheld: {', '.join(report.pushed['withheld'])} "
                  f"({report.pushed.get('withheld_reason', '')})")
    print(f"MLflow run:    {report.mlflow_run_id}  (store {tracking.tracking_uri()})")
    print("Open the MLflow UI:  .venv/bin/pacsai ui          → http://127.0.0.1:5000")
    print("Open JupyterLab:     .venv/bin/jupyter lab notebooks/01_explore_pacs.ipynb")
    print("Stages:        " + ", ".join(f"{k} {v:.0f} s" for k, v in result.stages.items()))
    print(f"Done in {result.seconds:.0f} s. Research use only.")
    if result.summary is not None:
        print(f"Figures:       {result.summary}")
    return 0
