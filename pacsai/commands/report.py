"""``pacsai report``: one patient's planning report, or a cohort's."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.report.params import ReportParameters


def key_value(text: str) -> tuple[str, str]:
    """argparse type of a ``-f KEY=VALUE`` QIDO filter (also the export verb's)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="per-patient treatment-planning report (HTML/PDF/metrics.json, optionally back to the PACS)",
        description="Pull a patient's planning CT, structures, dose and prior study from the PACS, compute the "
        "planning metrics and write report.ipynb/.html/.pdf and metrics.json. Research use only.",
    )
    p.add_argument("patient_id", nargs="?", help="PatientID (omit with --cohort)")
    p.add_argument("--pacs", default=None, help="DICOMweb URL or file:// store (default: PACSAI_PACS_URL or ./pacs)")
    p.add_argument("--study", default="", help="StudyInstanceUID (default: the latest study with a CT)")
    p.add_argument("--structures-from", choices=("pacs", "model"), default="pacs")
    p.add_argument("--model", default="",
                   help="model URI, e.g. models:/pacsai-thorax@champion (the model the demo registers)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default reports/<PatientID>)")
    p.add_argument("--push", action=argparse.BooleanOptionalAction, default=False,
                   help="store SEG/RTSTRUCT/SR/PDF in the patient's study (on a QA FAIL only the PDF)")
    p.add_argument("--push-anyway", action="store_true",
                   help="with --push: store the model's contours and the SR even when the QA gate is FAIL "
                   "(the SR then says so)")
    p.add_argument("--ctv-margin", type=float, default=5.0, help="GTV→CTV margin, mm")
    p.add_argument("--ptv-margin", type=float, default=5.0, help="CTV→PTV margin, mm")
    p.add_argument("--constraints", default="thorax", help="constraint set (site name or YAML path)")
    p.add_argument("--prescription", type=float, default=60.0, help="prescription dose, Gy")
    p.add_argument("--fractions", type=int, default=30)
    p.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cohort", action="store_true", help="report every patient matching -f filters")
    p.add_argument("-f", "--filter", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="study-level QIDO filter for --cohort (e.g. PatientID='SYN*')")
    p.add_argument("--rerun-failed", type=Path, default=None, metavar="CSV",
                   help="re-run the patients that failed in this cohort_summary.csv (implies --cohort; the "
                   "summary is rewritten with the finished patients kept)")
    p.add_argument("--workers", type=int, default=1, help="parallel reports (process pool)")
    p.add_argument("--dask", default=None, metavar="ADDRESS", help="run the cohort on a Dask cluster")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsai.errors import ReportError
    from pacsai.report.params import validate_parameters

    def params_for(patient_id: str, study: str = "") -> ReportParameters:
        return validate_parameters(
            patient_id=patient_id, study_uid=study, pacs_url=args.pacs or "",
            structures_from=args.structures_from, model_uri=args.model,
            ctv_margin_mm=args.ctv_margin, ptv_margin_mm=args.ptv_margin,
            constraint_set=args.constraints, prescription_gy=args.prescription, fractions=args.fractions,
            smoke=args.smoke,
        )

    if args.cohort or args.rerun_failed:
        return _cohort(args, params_for)
    if not args.patient_id:
        raise ReportError("give a PATIENT_ID, or --cohort with -f filters")
    from pacsai.report.run import run_report

    if args.push_anyway and not args.push:
        raise ReportError("--push-anyway only makes sense with --push")
    result = run_report(params_for(args.patient_id, args.study), out_dir=args.out, push=args.push,
                        track=not args.no_track, push_anyway=args.push_anyway)
    metrics = json.loads(result.metrics.read_text())
    qa = metrics.get("qa") or {}
    print(f"QA:      {qa.get('status')}" + "".join(f"\n         {r['level'].upper()} {r['code']}: {r['message']}"
                                                  for r in qa.get("reasons", []) if r["level"] != "note"))
    print(f"report:  {result.html}")
    print(f"pdf:     {result.pdf or 'not written (no Chromium found)'}")
    print(f"metrics: {result.metrics}")
    if result.pushed:
        print(f"pushed:  {len(result.pushed['objects'])} objects ({len(result.pushed['stored'])} new, "
              f"{len(result.pushed['already_present'])} already present)")
        if result.pushed.get("withheld"):
            print(f"withheld: {', '.join(result.pushed['withheld'])} ({result.pushed['withheld_reason']})")
    if result.mlflow_run_id:
        print(f"mlflow:  run {result.mlflow_run_id}")
    print(f"time:    {result.seconds:.1f} s")
    return 0


def _cohort(args: argparse.Namespace, params_for: Callable[[str], ReportParameters]) -> int:
    """``--cohort`` (patients from -f filters) or ``--rerun-failed CSV`` (the failed patients of an earlier run)."""
    from pacsai.errors import ReportError
    from pacsai.report.batch import SUMMARY_FILE, cohort_patients, failed_patients, read_summary, run_cohort

    previous = None
    if args.rerun_failed:
        if args.filter:
            raise ReportError("give either -f filters or --rerun-failed, not both: the patients to re-run come "
                              f"from {args.rerun_failed}")
        previous = read_summary(args.rerun_failed)
        patients = failed_patients(previous)
        out_root = args.out or args.rerun_failed.parent
        if not patients:
            print(f"no failed patients in {args.rerun_failed}; nothing to re-run")
            return 0
    else:
        from pacsai.pacs import connect

        patients = cohort_patients(connect(args.pacs), dict(args.filter))
        out_root = args.out or Path("reports")
        if not patients:
            raise ReportError(f"no patients match {dict(args.filter)}; check the filters with `pacsai pacs search`")
    table = run_cohort(
        [params_for(p) for p in patients], out_root=out_root, workers=args.workers,
        dask_address=args.dask, push=args.push, track=not args.no_track, previous=previous,
        push_anyway=args.push_anyway,
    )
    print(table.to_string(index=False))
    failed = table[~table.ok]
    if not failed.empty:
        from pacsai.pacs.address import redact_url

        pacs = f" --pacs {redact_url(args.pacs)}" if args.pacs else ""  # never echo a password
        print(f"{len(failed)} of {len(table)} reports failed ({', '.join(failed.patient_id)}); once the cause is "
              f"fixed, re-run only those with `pacsai report --rerun-failed {out_root / SUMMARY_FILE}{pacs}`",
              file=sys.stderr)
        return 1
    return 0
