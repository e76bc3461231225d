"""A local Orthanc for tests, benchmarks and laptops: start it on a free loopback port, stop it cleanly.

Orthanc 1.10 has no bind-address setting (it listens on every interface), so the launcher keeps
``RemoteAccessAllowed`` off (non-local clients are refused), turns authentication on and the DICOM port off.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from pacsai.errors import PacsConnectionError, PacsError

logger = logging.getLogger(__name__)

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass(frozen=True)
class OrthancServer:
    """A running local Orthanc.

    Attributes
    ----------
    url
        DICOMweb base URL (``http://127.0.0.1:PORT/dicom-web``), what :func:`pacsai.pacs.connect` takes.
    rest_url
        Orthanc's own REST API root (``http://127.0.0.1:PORT``).
    user, password
        The one registered user (HTTP basic authentication is on).
    workdir
        Folder holding the configuration, the storage and the log.
    """

    url: str
    rest_url: str
    user: str
    password: str
    workdir: Path
    process: subprocess.Popen = field(repr=False, compare=False)

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for ``requests``."""
        return (self.user, self.password)

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance) through the REST API."""
        with requests.Session() as session:
            session.auth = self.auth
            ids = session.get(f"{self.rest_url}/patients", timeout=30).json()
            for pid in ids:
                session.delete(f"{self.rest_url}/patients/{pid}", timeout=60).raise_for_status()

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "Orthanc (pid %d) ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout
            )
            self.process.kill()
            self.process.wait(timeout=timeout)


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_available(*, binary: Path = ORTHANC_BINARY, plugin: Path = DICOMWEB_PLUGIN) -> str | None:
    """``None`` when Orthanc and its DICOMweb plugin are installed, else the reason why not (one line)."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"Orthanc binary not found at {binary}; install the Debian packages orthanc orthanc-dicomweb"
    if not plugin.is_file():
        return f"Orthanc DICOMweb plugin not found at {plugin}; install the Debian package orthanc-dicomweb"
    return None


def _config(workdir: Path, *, port: int, user: str, password: str, plugin: Path) -> dict[str, object]:
    return {
        "Name": "pacsai-local",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "StorageCompression": False,
        "HttpPort": port,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "DicomPort": 0,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        # A test server must not keep state between runs or spend time on jobs it will never resume.
        "SaveJobs": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "HttpThreadsCount": 8,
    }


def start_orthanc(
    workdir: str | Path,
    *,
    user: str = "pacsai",
    password: str = "pacsai-test",
    port: int | None = None,
    binary: Path = ORTHANC_BINARY,
    plugin: Path = DICOMWEB_PLUGIN,
    startup_timeout: float = 30.0,
    lua_scripts: Sequence[str | Path] = (),
    extra_config: Mapping[str, object] | None = None,
) -> OrthancServer:
    """Start Orthanc with the DICOMweb plugin on a loopback port, storage in ``workdir``; wait until it answers.

    Parameters
    ----------
    workdir
        Folder for the configuration, storage and log (created). Use a temporary folder.
    user, password
        The registered user (authentication is on).
    port
        HTTP port; default a free one.
    binary, plugin
        Paths of the Orthanc executable and of ``libOrthancDicomWeb.so``.
    startup_timeout
        Seconds to wait for the server to answer.
    lua_scripts
        Lua files Orthanc loads at start-up (``LuaScripts``), e.g. a ``ReceivedInstanceFilter`` that refuses
        instances, to make a real server reject part of a STOW request.
    extra_config
        Configuration keys merged over the defaults (top level, so a key replaces the default's value).

    Returns
    -------
    OrthancServer
        Call :meth:`OrthancServer.stop` when done, or use :func:`local_orthanc`.

    Raises
    ------
    PacsError
        Orthanc is not installed, or exited during start-up (the message quotes its log).
    PacsConnectionError
        It did not answer within ``startup_timeout``.
    """
    missing = orthanc_available(binary=binary, plugin=plugin)
    if missing:
        raise PacsError(missing)
    workdir = Path(workdir)
    (workdir / "storage").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = workdir / "orthanc.json"
    config = _config(workdir, port=port, user=user, password=password, plugin=plugin)
    if lua_scripts:
        # Absolute paths: Orthanc resolves relative ones against its working directory, not the caller's.
        config["LuaScripts"] = [str(Path(p).resolve()) for p in lua_scripts]
    config.update(extra_config or {})
    config_path.write_text(json.dumps(config))
    log_path = workdir / "orthanc.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(binary), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    rest_url = f"http://127.0.0.1:{port}"
    server = OrthancServer(
        url=f"{rest_url}/dicom-web",
        rest_url=rest_url,
        user=user,
        password=password,
        workdir=workdir,
        process=process,
    )
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise PacsError(
                f"Orthanc exited with code {process.returncode} during start-up; log {log_path}:\n{tail}"
            )
        try:
            answer = requests.get(f"{rest_url}/system", auth=(user, password), timeout=2)
            if answer.ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise PacsConnectionError(
                f"Orthanc did not answer on {rest_url} within {startup_timeout:.0f} s; see {log_path}"
            )
        time.sleep(0.1)
    logger.info("Orthanc %s started (pid %d), storage in %s", rest_url, process.pid, workdir)
    return server


@contextmanager
def local_orthanc(workdir: str | Path, *, keep: bool = True, **options: Any) -> Iterator[OrthancServer]:
    """Context manager around :func:`start_orthanc`; stops the server on exit.

    Parameters
    ----------
    workdir
        As for :func:`start_orthanc`.
    keep
        Keep ``workdir`` afterwards (``False`` removes it).
    options
        Passed to :func:`start_orthanc`.
    """
    server = start_orthanc(workdir, **options)
    try:
        yield server
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
