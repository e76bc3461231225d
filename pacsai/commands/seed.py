"""``pacsai seed``: synthetic patients into a PACS (the embedded store by default).

    pacsai seed --patients 5 [--seed 100] [--pacs URL] [--no-prior] [--shape Z Y X] [--spacing X Y Z]

Patient ``k`` uses seed ``S + k`` (PatientID ``SYN-{S+k:05d}``). Seeding twice stores nothing new.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pacsai.errors import PacsError

logger = logging.getLogger(__name__)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, not {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {value}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``seed`` verb to the ``pacsai`` command (imports nothing heavy: ``pacsai --help`` stays fast)."""
    parser = subparsers.add_parser(
        "seed",
        help="store synthetic oncology patients (CT, RTSTRUCT, RTPLAN, RTDOSE, prior study) in a PACS",
        description=(
            "Generate synthetic thoracic oncology patients, deterministically from --seed, and store them in a "
            "PACS: planning CT, RT Structure Set (ground truth), RT Plan and RT Dose (60 Gy / 30 fx), and a "
            "prior CT + RTSTRUCT ~3 months earlier. Patient k gets seed S+k and PatientID SYN-<S+k>. Seeding "
            "the same seeds again stores nothing new. Research use only: these are not patients."
        ),
    )
    parser.add_argument("--patients", type=_positive, required=True, help="how many patients (≥ 1)")
    parser.add_argument("--seed", type=_non_negative, default=0, help="seed of the first patient (default 0)")
    parser.add_argument(
        "--pacs",
        metavar="URL",
        default=None,
        help="DICOMweb URL or file://FOLDER (default: PACSAI_PACS_URL, else the embedded store)",
    )
    parser.add_argument(
        "--prior",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the prior study (default: yes)",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="CT voxels (default: the generator's, pacsai.synthetic.DEFAULT_SHAPE)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="CT voxel size in mm (default: the generator's, pacsai.synthetic.DEFAULT_SPACING)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Seed the PACS and print one line per patient; exit 1 if anything failed to store."""
    from pacsai.pacs import connect
    from pacsai.synthetic import DEFAULT_SHAPE, DEFAULT_SPACING, seed_pacs
    from pacsai.synthetic.phantom import check_grid

    shape = tuple(args.shape or DEFAULT_SHAPE)
    spacing = tuple(args.spacing or DEFAULT_SPACING)
    try:
        check_grid(shape, spacing)
    except ValueError as err:  # a usage error, like argparse's own (exit code 2)
        print(f"pacsai seed: error: --shape/--spacing: {err}", file=sys.stderr)
        return 2

    with connect(args.pacs) as pacs:
        results = seed_pacs(
            pacs,
            patients=args.patients,
            seed=args.seed,
            with_prior=args.prior,
            progress=not args.no_progress,
            shape=shape,
            spacing=spacing,
        )
        failed = 0
        for result in results:
            s = result.summary
            failed += len(s.failed)
            print(
                f"{result.patient_id} (seed {result.seed}): {result.objects} objects → stored {len(s.stored)}, "
                f"already present {len(s.already_present)}, failed {len(s.failed)}"
            )
            for name, reason in s.failed:
                print(f"  failed: {name}: {reason}")
        print(f"{len(results)} synthetic patient(s) in {pacs.url}")
    if failed:
        raise PacsError(f"{failed} object(s) could not be stored in {pacs.url}; see the lines above")
    return 0
