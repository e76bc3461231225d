"""``pacsai validate MODEL_URI [--smoke] [--threshold STRUCT=VALUE ...]``: papermill validation, then promotion.

Without ``--threshold`` the promotion gate is the ``validation.thresholds`` block of the experiment stored with
the model (or of ``--experiment`` for models that store none); it must cover every structure the model outputs.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` verb."""
    p = subparsers.add_parser(
        "validate",
        help="validate a registered model (papermill); on pass, set the alias champion",
        description="Run the validation notebook (pacsai/templates/03_evaluate.ipynb; notebooks/03_evaluate.ipynb in "
        "the source tree) on the model's held-out patients (with the plan dose where there is one), log a "
        "validation run in MLflow, write the gate's numbers onto the model version, and set "
        "the alias 'champion' only if every structure the model outputs meets its limits (exit 1 otherwise). "
        "Limits: the experiment's validation.thresholds block, or --threshold: STRUCT=DICE (Dice ≥), "
        "hd95_STRUCT=MM, msd_STRUCT=MM, apl_STRUCT=MM (≤), surface_dice_STRUCT=F (≥), delta_dmean_STRUCT=GY, "
        "delta_d0_03cc_STRUCT=GY, delta_v20_STRUCT=PCT (|model − reference| ≤, worst held-out patient).",
    )
    p.add_argument("model_uri", help="models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest")
    p.add_argument(
        "--threshold",
        dest="thresholds",
        action="append",
        default=None,
        metavar="STRUCT=VALUE",
        help="limit, e.g. --threshold Heart=0.94 --threshold hd95_Heart=6; repeatable; replaces the stored "
        "thresholds, so list every output structure",
    )
    p.add_argument(
        "--experiment",
        default=None,
        metavar="YAML",
        help="take the thresholds from this experiment's validation block when the model stores none",
    )
    p.add_argument("--smoke", action="store_true", help="evaluate one held-out case only (tests, CI)")
    p.add_argument(
        "--pacs", default=None, metavar="URL", help="PACS holding the cohort (default PACSAI_PACS_URL)"
    )
    p.add_argument(
        "--tolerance", type=float, default=2.0, metavar="MM", help="surface Dice and added path tolerance (mm)"
    )
    p.add_argument("--output", default=None, metavar="DIR", help="keep the executed notebook in DIR")
    p.add_argument("--no-promote", action="store_true", help="report only; never set the alias")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsai.learning.validate import run_validation

    result = run_validation(
        args.model_uri,
        thresholds=args.thresholds,
        experiment=args.experiment,
        smoke=args.smoke,
        pacs_url=args.pacs,
        tolerance_mm=args.tolerance,
        output_dir=args.output,
        promote=not args.no_promote,
    )
    dice = ", ".join(
        f"{k[5:]} {v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("dice_") and k != "dice_mean"
    )
    print(f"validation run {result.run_id} of {result.model_uri}: Dice {dice}")
    print(f"thresholds from {result.thresholds_source}; gate written onto {result.name} version {result.version}")
    if not result.passed:
        for line in result.failures:
            print(f"  FAIL {line}")
        print(f"not promoted: {len(result.failures)} check(s) of the gate failed")
        return 1
    print(
        f"passed; alias champion -> {result.name} version {result.version}" if result.alias_set else "passed"
    )
    return 0
