"""A real Orthanc for tests, and PACS fixtures over both back ends.

Fixtures (loaded by ``tests/conftest.py`` through ``pytest_plugins``):

``orthanc`` (session)
    A running Orthanc 1.10 + DICOMweb plugin (:class:`pacsai.pacs.OrthancServer`: ``url`` = the DICOMweb root,
    ``rest_url``, ``user``, ``password``, ``auth``, ``clear()``) on a free loopback port, authentication on,
    DICOM port off, storage in a temporary folder; stopped at the end of the session. Skips with the reason
    where the binary or plugin is absent; *fails* instead when ``PACSAI_REQUIRE_ORTHANC=1`` (CI).
``clean_orthanc`` (function)
    ``orthanc``, emptied before the test (every patient deleted through the REST API).
``pacs`` (function, parametrized ``"orthanc"`` / ``"embedded"``)
    A connected, empty :class:`pacsai.pacs.Pacs` on each back end (embedded: a fresh ``file://`` store in
    ``tmp_path``), with its own empty cache. Every test that uses it runs on both.
``stopped_server_url`` (session)
    The DICOMweb URL of an Orthanc that was started and then stopped (nothing listens on its port).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pacsai.errors import PacsError
from pacsai.pacs import OrthancServer, Pacs, connect
from pacsai.pacs.orthanc import free_port, orthanc_available, start_orthanc

BACKENDS = ("orthanc", "embedded")


def _unavailable(reason: str) -> None:
    if os.environ.get("PACSAI_REQUIRE_ORTHANC") == "1":
        pytest.fail(f"PACSAI_REQUIRE_ORTHANC=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc with DICOMweb for the whole session (see module docstring)."""
    reason = orthanc_available()
    if reason:
        _unavailable(reason)
    try:
        server = start_orthanc(tmp_path_factory.mktemp("orthanc"), user="pacsai", password="orthanc-test-pw")
    except PacsError:
        # The free port may have been taken between choosing and binding it: one more try, on another port.
        server = start_orthanc(tmp_path_factory.mktemp("orthanc"), user="pacsai", password="orthanc-test-pw")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_orthanc(orthanc: OrthancServer) -> OrthancServer:
    """``orthanc`` with nothing stored in it."""
    orthanc.clear()
    return orthanc


@pytest.fixture(params=BACKENDS)
def pacs(request: pytest.FixtureRequest, tmp_path) -> Iterator[Pacs]:
    """An empty PACS on each back end, connected, with its own cache (see module docstring)."""
    cache = tmp_path / "cache"
    if request.param == "orthanc":
        server: OrthancServer = request.getfixturevalue("clean_orthanc")
        conn = connect(server.url, user=server.user, password=server.password, cache_dir=cache, retries=1)
    else:
        conn = connect(f"file://{tmp_path / 'embedded'}", cache_dir=cache)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def stopped_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DICOMweb URL of an Orthanc that has been started and stopped: connections to it are refused."""
    reason = orthanc_available()
    if reason:
        # Without Orthanc a free port that nothing listens on is just as refused.
        return f"http://127.0.0.1:{free_port()}/dicom-web"
    server = start_orthanc(tmp_path_factory.mktemp("stopped"))
    server.stop()
    return server.url
