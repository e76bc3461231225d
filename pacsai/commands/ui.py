"""``pacsai ui [--port P]``: the MLflow UI on the embedded store (loopback only, one worker).

The server runs in a process group of its own (``mlflow server`` starts uvicorn and its workers, about nine
processes in all); ``pacsai ui`` stops that whole group when it ends, whether by Ctrl-C, SIGTERM, SIGHUP or the
server's own exit, so no worker outlives it. A port that is taken is an error named before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

from pacsai.errors import TrackingError

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.config import Settings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Seconds the server's process group gets to stop after SIGTERM before it is killed.
STOP_GRACE_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` verb."""
    p = subparsers.add_parser(
        "ui",
        help="MLflow UI on the embedded store",
        description="Serve the MLflow UI for mlruns/ of the working directory (or MLFLOW_TRACKING_URI) on "
        "127.0.0.1 with one worker. Experiments open in MLflow's machine-learning view. Stop it with Ctrl-C "
        "(or SIGTERM): the server and all its workers stop with it.",
    )
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.set_defaults(func=run)


def server_command(*, port: int, settings: Settings | None = None) -> list[str]:
    """The ``mlflow server`` command line for the store (loopback, one worker)."""
    from pacsai import tracking

    uri = tracking.tracking_uri(settings=settings)
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
        HOST,
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


def check_port_free(port: int, host: str = HOST) -> None:
    """Raise :class:`TrackingError` naming ``host:port`` when something already listens there."""
    if not 0 < port < 65536:
        raise TrackingError(f"port {port} is not a TCP port (1–65535); choose one with --port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise TrackingError(
                    f"port {port} on {host} is already in use (another `pacsai ui` or MLflow server?); "
                    f"stop that one or choose a free port with --port"
                ) from err
            raise TrackingError(f"cannot listen on {host}:{port}: {err}; choose another port with --port") from err


def stop_group(proc: subprocess.Popen[bytes], *, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the process group that ``proc`` leads: SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: leave the wait and stop the server."""


@contextlib.contextmanager
def _stopping_on_signals() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ui_links(base: str, *, settings: Settings | None = None) -> list[str]:
    """One line per experiment and registered model: its page in the classic machine-learning view.

    MLflow 3.17's UI picks the view from the page's ``workflowType`` parameter, else the browser's last choice
    (GenAI by default); the experiment tag that :func:`pacsai.tracking.open_in_classic_view` sets is what later
    versions read. These links open the runs and the model registry either way.
    """
    from pacsai import tracking

    c = tracking.client(settings=settings)
    lines = []
    for experiment in c.search_experiments():
        if experiment.name == "Default" and not c.search_runs([experiment.experiment_id], max_results=1):
            continue  # MLflow's empty default experiment
        lines.append(f"  experiment {experiment.name}: {base}/{tracking.experiment_page(experiment.experiment_id)}")
    for model in c.search_registered_models():
        aliases = dict(getattr(model, "aliases", {}) or {})
        champion = aliases.get(tracking.CHAMPION)
        page = tracking.model_version_page(model.name, champion) if champion else f"#/models/{model.name}"
        lines.append(f"  model {model.name}" + (f" (champion v{champion})" if champion else "") + f": {base}/{page}")
    return lines


def run(args: argparse.Namespace) -> int:
    from pacsai import tracking

    port = int(args.port)
    check_port_free(port)
    cmd = server_command(port=port)
    tagged = tracking.open_in_classic_view()
    if tagged:
        logger.info("experiments now open in the machine-learning view: %s", ", ".join(tagged))
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    with _stopping_on_signals():
        try:
            # a session of its own: the server's ~9 processes form one group that stop_group ends as a whole
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        except OSError as err:
            raise TrackingError(f"cannot start the MLflow server ({' '.join(cmd)}): {err}") from err
        print(f"MLflow UI on http://{HOST}:{port} (Ctrl-C stops it)", flush=True)
        for line in ui_links(f"http://{HOST}:{port}"):
            print(line, flush=True)
        try:
            code = proc.wait()
        except (KeyboardInterrupt, _Stop):
            stop_group(proc)
            return 0
        stop_group(proc)  # workers the server left behind
    if code != 0:
        raise TrackingError(f"the MLflow server on {HOST}:{port} stopped with exit code {code}; see its output above")
    return 0
