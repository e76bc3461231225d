"""``pacsai pacs ping|search|pull|push``: talk to a PACS from the command line.

Exit code 0 only on full success; 141 when standard output was closed early (``| head``). Errors are one line
on stderr (:mod:`pacsai.cli` does both, for every verb). The password is read only from the environment, ``.env``
(``PACSAI_PACS_PASSWORD``) or a netrc file, never from the command line, where other users could see it in the
process list.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai.errors import PacsError

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs.base import Pacs

LEVEL_COLUMNS = {
    "studies": [
        "PatientID",
        "PatientName",
        "StudyDate",
        "ModalitiesInStudy",
        "StudyDescription",
        "StudyInstanceUID",
    ],
    "series": [
        "PatientID",
        "StudyDate",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesInstanceUID",
    ],
    "instances": ["PatientID", "Modality", "InstanceNumber", "SOPInstanceUID"],
}


def register(subparsers: Any) -> None:
    """Add the ``pacs`` verb and its sub-verbs to the ``pacsai`` parser."""
    parser = subparsers.add_parser(
        "pacs",
        help="talk to a PACS: ping, search, pull, push",
        description="Talk to a DICOMweb PACS (--pacs URL) or the embedded store (a folder; default "
        "file://./pacs). The password comes only from PACSAI_PACS_PASSWORD (environment or .env) or a netrc "
        "file (PACSAI_PACS_NETRC, default ~/.netrc). Research use only.",
    )
    sub = parser.add_subparsers(dest="pacs_verb", metavar="SUBVERB", required=True)

    def verb(name: str, summary: str, description: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(
            name, help=summary, description=f"{description} {_PACS_NOTE}",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument(
            "--pacs", metavar="URL", default=None,
            help="DICOMweb base URL (http(s)://host/.../dicom-web), file://FOLDER or a folder path such as ./pacs; "
            "None means PACSAI_PACS_URL, else file://./pacs",
        )
        p.add_argument("--user", help="user for HTTP basic authentication; None means PACSAI_PACS_USER")
        p.add_argument(
            "--ca-bundle", metavar="FILE",
            help="CA bundle for the server's TLS certificate; None means PACSAI_PACS_CA_BUNDLE, else the system's",
        )
        p.add_argument(
            "--insecure", action="store_true", help="do not verify TLS certificates (testing only)"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    verb(
        "ping", "check that the PACS answers and accepts the credentials",
        "Ask the PACS for one study and print the round-trip time; exit 0 when it answers and accepts the "
        "credentials. An embedded store that does not exist is an error.",
        _ping,
    )
    search = verb(
        "search", "search studies, series or instances",
        "Search the PACS and print a table (or --json). Filters are DICOM keywords with PS3.4 matching: "
        "wildcards * and ? on text, ranges A-B on dates and times, UID lists separated by backslashes. "
        "Every filter is applied again on the client, whatever the server did.",
        _search,
    )
    search.add_argument(
        "--level", choices=["studies", "series", "instances"], default="studies",
        help="what to search: studies, their series, or single instances",
    )
    search.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="filter by DICOM keyword, e.g. -f PatientID='STS*' -f StudyDate=20240101-20241231 (repeatable)",
    )
    search.add_argument(
        "--json", action="store_true", help="print a JSON array of objects keyed by DICOM keyword"
    )
    pull = verb(
        "pull", "retrieve a study or series into a folder",
        "Retrieve a study (every series) or one series into the local cache, then copy the files to "
        "OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm. What the cache holds is not fetched again.",
        _pull,
    )
    pull.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID (required)")
    pull.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID; None means every series of the study"
    )
    pull.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder; files go to DIR/<series>/ (required)"
    )
    push = verb(
        "push", "store files and folders (recursively) on the PACS",
        "Store DICOM files and folders (walked recursively). Instances the PACS already holds are not sent "
        "again; files that are not DICOM are skipped and named; broken DICOM fails with the reason. Exit 1 "
        "when anything failed. Pushing to an embedded store that does not exist creates it.",
        _push,
    )
    push.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")


_PACS_NOTE = (
    "Exit codes: 0 success; 1 an error (one line on stderr) or, for push, some inputs failed; 2 a usage error; "
    "141 the output was closed early (e.g. piped into head)."
)


def _connect(args: argparse.Namespace) -> Pacs:
    from pacsai.pacs import connect

    if not getattr(args, "verbose", 0):
        # urllib3 logs every retry at WARNING; the user gets one line saying what failed (pacsai -v shows them).
        logging.getLogger("urllib3").setLevel(logging.ERROR)

    return connect(
        args.pacs,
        user=args.user,
        ca_bundle=args.ca_bundle,
        verify=False if args.insecure else None,
    )


def _ping(args: argparse.Namespace) -> int:
    with _connect(args) as pacs:
        seconds = pacs.ping()
        print(f"ok: {pacs.url} answered in {seconds * 1000:.0f} ms")
    return 0


def parse_filters(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` → ``{KEY: VALUE}``; a malformed item raises :class:`PacsError`."""
    filters: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PacsError(f"filter {item!r} is not KEY=VALUE; e.g. -f PatientID='STS*'")
        filters[key.strip()] = value
    return filters


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    try:
        import pandas as pd

        if value is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


def _search(args: argparse.Namespace) -> int:
    filters = parse_filters(args.filter)
    with _connect(args) as pacs:
        frame = pacs.search(args.level, filters)
    if args.json:
        rows = [{k: _jsonable(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if frame.empty:
        print(f"no {args.level} match", file=sys.stderr)
        return 0
    columns = [c for c in LEVEL_COLUMNS[args.level] if c in frame.columns]
    with _pandas_display():
        print(frame[columns].to_string(index=False))
    return 0


class _pandas_display:
    def __enter__(self) -> None:
        import pandas as pd

        self._ctx = pd.option_context(
            "display.width", shutil.get_terminal_size((160, 20)).columns, "display.max_colwidth", 70
        )
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _pull(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    with _connect(args) as pacs:
        if args.series:
            series = {args.series: pacs.retrieve_series(args.study, args.series, progress=progress)}
        else:
            series = pacs.retrieve_study(args.study, progress=progress)
    total = 0
    for series_uid, paths in series.items():
        folder = args.out / series_uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PacsError(f"cannot create {folder}: {err}; pick a writable --out folder") from err
        for path in paths:
            _copy_out(path, folder / path.name)
            total += 1
    print(f"pulled {total} instance(s) in {len(series)} series into {args.out}")
    return 0


def _copy_out(source: Path, target: Path) -> None:
    """Copy a cached file to the output folder: whole or not at all (a hidden temporary, then a rename)."""
    tmp = target.with_name(f".{target.name}.part")
    try:
        # A copy, not a link: editing the output must never change the shared cache.
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise PacsError(
                f"cannot write {target}: {err}; pick a writable --out folder with free space"
            ) from err
        raise


def _push(args: argparse.Namespace) -> int:
    with _connect(args) as pacs:
        summary = pacs.store(args.paths, progress=not args.no_progress)
    print(summary)
    return 0 if summary.ok else 1
