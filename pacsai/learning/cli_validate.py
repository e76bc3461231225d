"""``pacsai validate MODEL_URI [--smoke] [--threshold STRUCT=VALUE ...]``: papermill validation, then promotion."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``validate`` verb."""
    p = subparsers.add_parser(
        "validate",
        help="validate a registered model (papermill); on pass, set the alias champion",
        description="Run notebooks/03_evaluate.ipynb on the model's held-out patients, log a validation run in "
        "MLflow, and set the alias 'champion' only if every threshold passes (exit 1 otherwise). "
        "Thresholds: STRUCT=DICE (Dice ≥), hd95_STRUCT=MM or msd_STRUCT=MM (≤), surface_dice_STRUCT=F (≥).",
    )
    p.add_argument("model_uri", help="models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest")
    p.add_argument(
        "--threshold",
        dest="thresholds",
        action="append",
        default=[],
        metavar="STRUCT=VALUE",
        help="pass criterion, e.g. --threshold Heart=0.85 --threshold hd95_Heart=10; repeatable",
    )
    p.add_argument("--smoke", action="store_true", help="evaluate one held-out case only (tests, CI)")
    p.add_argument(
        "--pacs", default=None, metavar="URL", help="PACS holding the cohort (default PACSAI_PACS_URL)"
    )
    p.add_argument("--tolerance", type=float, default=2.0, metavar="MM", help="surface Dice tolerance (mm)")
    p.add_argument("--output", default=None, metavar="DIR", help="keep the executed notebook in DIR")
    p.add_argument("--no-promote", action="store_true", help="report only; never set the alias")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsai.learning.validate import run_validation

    result = run_validation(
        args.model_uri,
        thresholds=args.thresholds,
        smoke=args.smoke,
        pacs_url=args.pacs,
        tolerance_mm=args.tolerance,
        output_dir=args.output,
        promote=not args.no_promote,
    )
    dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("dice_"))
    print(f"validation run {result.run_id} of {result.model_uri}: {dice}")
    if not result.passed:
        for line in result.failures:
            print(f"  FAIL {line}")
        print(f"not promoted: {len(result.failures)} threshold(s) failed")
        return 1
    print(
        f"passed; alias champion -> {result.name} version {result.version}" if result.alias_set else "passed"
    )
    return 0
