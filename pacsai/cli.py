"""The ``pacsai`` command: one verb per job; exit code 0 only on success; one-line errors, no tracebacks.

Each verb lives next to the code it drives, in a module with ``register(subparsers)``; that function adds its
parser and sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). Modules are
imported only when their verb is asked for in ``--help`` listings or runs, so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pacsai import __version__
from pacsai.errors import PacsaiError

# verb -> module whose register(subparsers) adds it
VERBS: dict[str, str] = {
    "pacs": "pacsai.pacs.cli",
    "seed": "pacsai.synthetic_cli",
    "train": "pacsai.learning.cli",
    "validate": "pacsai.learning.cli_validate",
    "report": "pacsai.report.cli",
    "watch": "pacsai.watch.cli",
    "ui": "pacsai.tracking_cli",
    "export": "pacsai.export.cli",
    "demo": "pacsai.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsai",
        description="Imaging AI for oncology: PACS → model → planning report. Research use only.",
    )
    parser.add_argument("--version", action="version", version=f"pacsai {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module in VERBS.items():
        if only is not None and verb != only:
            sub.add_parser(verb, help=f"(see: pacsai {verb} --help)")
            continue
        # A verb whose module fails to import is a broken install: fail loudly (main names the module and the
        # missing package) instead of dropping the verb from the listing.
        importlib.import_module(module).register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if level <= logging.DEBUG:  # third-party DEBUG lines carry PatientIDs in query strings (pacsai.privacy)
        from pacsai.config import load_settings
        from pacsai.privacy import protect_handlers

        protect_handlers(logging.getLogger().handlers, log_phi=load_settings().log_phi)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(only=verb if verb in VERBS else None)
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        print(f"pacsai: error: a command could not be loaded: {err} (missing {missing!r}); reinstall with "
              "`make setup` (or `pip install -e '.[learning,viewer]'`)", file=sys.stderr)
        return 3
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _configure_logging(args.verbose)  # reads the settings at -vv: a bad one is a user error too
        return int(args.func(args) or 0)
    except PacsaiError as err:
        print(f"pacsai {args.verb}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pacsai {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a user error: keep the traceback available on request
        if os.environ.get("PACSAI_DEBUG"):
            raise
        print(
            f"pacsai {args.verb}: internal error: {type(err).__name__}: {err} "
            "(set PACSAI_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
