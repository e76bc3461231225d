"""``pacsai ui [--port P]``: the MLflow UI on the embedded store (loopback only, one worker)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``ui`` verb."""
    p = subparsers.add_parser(
        "ui",
        help="MLflow UI on the embedded store",
        description="Serve the MLflow UI for mlruns/ of the working directory (or MLFLOW_TRACKING_URI) on "
        "127.0.0.1 with one worker. Stop it with Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.set_defaults(func=run)


def server_command(*, port: int, settings: object = None) -> list[str]:
    """The ``mlflow server`` command line for the store (loopback, one worker)."""
    from pacsai import tracking
    from pacsai.errors import TrackingError

    uri = tracking.tracking_uri(settings=settings)  # type: ignore[arg-type]
    if uri.startswith(("http://", "https://", "databricks")):
        raise TrackingError(f"the tracking URI is a server ({uri}); open its own UI instead of `pacsai ui`")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(int(port)),
        "--workers",
        "1",
    ]
    location = tracking.artifact_location(uri)
    if location is not None:
        tracking._prepare_store(uri)
        cmd += ["--default-artifact-root", location]
    return cmd


def run(args: argparse.Namespace) -> int:
    from pacsai.errors import TrackingError

    cmd = server_command(port=args.port)
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd, env=env)
    except OSError as err:
        raise TrackingError(f"cannot start the MLflow server ({' '.join(cmd)}): {err}") from err
    except KeyboardInterrupt:
        return 0
