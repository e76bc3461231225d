"""``pacsai train EXPERIMENT.yaml [--set key=value ...] [--smoke] [--pacs URL] [--resume CHECKPOINT] [--dask ADDRESS]``.

Under ``torchrun`` every process runs this verb (:mod:`pacsai.learning.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    p = subparsers.add_parser(
        "train",
        help="train a segmentation model on a PACS cohort, tracked in MLflow",
        description="Train the experiment's model on its cohort; every run is tracked in MLflow and the best "
        "model is registered under model.name. Research use only.",
    )
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/demo.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted key, YAML value (e.g. --set train.epochs=5); repeatable",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes from the experiment's smoke: block (seconds)"
    )
    p.add_argument(
        "--pacs", default=None, metavar="URL", help="PACS URL (default PACSAI_PACS_URL or file://./pacs)"
    )
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a last.pt checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="pull and preprocess the training data on a Dask cluster first (e.g. tcp://scheduler:8786)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pacsai.config import load_settings
    from pacsai.learning import distributed
    from pacsai.learning.train import parse_set, train

    started = time.perf_counter()
    settings = load_settings(args.experiment)
    overrides = parse_set(args.overrides)
    here = distributed.setup()
    try:
        if args.dask and here.local_main:  # the other ranks wait for the cache in train()
            from pacsai.learning.preprocess_dask import preprocess_experiment

            done = preprocess_experiment(
                args.experiment,
                address=args.dask,
                pacs=args.pacs,
                overrides=overrides,
                smoke=args.smoke,
                settings=settings,
                progress=not args.no_progress,
            )
            print(
                f"preprocessed on {args.dask}: {done.computed} series on {len(done.workers)} workers, "
                f"{done.cached} already cached ({done.seconds:.0f} s)"
            )
        result = train(
            args.experiment,
            pacs=args.pacs,
            overrides=overrides,
            smoke=args.smoke,
            resume=args.resume,
            settings=settings,
            progress=not args.no_progress,
        )
    finally:
        distributed.shutdown()
    if not here.main:
        return 0
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.best_val_dice.items())
    wall = time.perf_counter() - started
    print(
        f"run {result.run_id}: {result.model_uri} (best epoch {result.best_epoch}; training loop "
        f"{result.seconds:.0f} s, wall time {wall:.0f} s with data and registration)"
    )
    print(f"validation Dice: {dice}")
    return 0
