"""The ``pacsai`` command: one verb per job; exit code 0 only on success; one-line errors, no tracebacks.

Each verb is a module of :mod:`pacsai.commands` named after it, with ``register(subparsers)``; that function adds
its parser and sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). The verbs are
found by listing that package, so a new module is a new verb. A verb module is imported only when its verb is
asked for or ``pacsai --help`` lists them all, so the CLI starts fast; one that fails to import fails loudly.

Exit codes: 0 success; 1 an error (one line on stderr); 2 a usage error; 3 an internal error or a broken install;
130 interrupted; 141 standard output was closed early (``pacsai ... | head -1``), quietly, as a Unix tool killed by
SIGPIPE reports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from pacsai import __version__, commands
from pacsai.errors import PacsaiError

#: 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away.
EXIT_CLOSED_PIPE = 141


def _verbs() -> dict[str, str]:
    """verb -> module whose ``register(subparsers)`` adds it: every module of :mod:`pacsai.commands`."""
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {name: f"{commands.__name__}.{name}" for name in names}


VERBS: dict[str, str] = _verbs()


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
    """Run ``pacsai ARGV``; the exit code (see the module docstring)."""
    try:
        try:
            code = _run(argv)
        finally:  # --help ends in SystemExit: its text too must reach the pipe now, not at interpreter exit
            sys.stdout.flush()  # a closed pipe shows here
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_CLOSED_PIPE
    return code


def _silence_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered can never be written, and Python's own flush at
    exit must not raise (and print) the same BrokenPipeError again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test's capture): nothing will flush it at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
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
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main() ends quietly with 141, not an internal error
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
