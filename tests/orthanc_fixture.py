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
``orthanc_postgres`` (session)
    A second real Orthanc whose index *and* storage are in PostgreSQL (Debian ``orthanc-postgresql`` plugins,
    database ``orthanc`` on the ``postgres`` fixture of ``tests/postgres_fixture.py``); its work folder holds no
    DICOM. Skips (or fails under ``PACSAI_REQUIRE_POSTGRES=1``) where the plugins or PostgreSQL are absent.
``clean_orthanc_postgres`` (function)
    ``orthanc_postgres``, emptied before the test.

Back ends of ``pacs``: ``PACSAI_PACS_BACKENDS`` (comma-separated, default ``orthanc,embedded``) picks them;
``orthanc-postgres`` is the third. With it alone, ``orthanc`` itself is the PostgreSQL-backed server. CI runs the
PACS tests once more with ``PACSAI_PACS_BACKENDS=orthanc-postgres``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pacsai.errors import PacsError
from pacsai.pacs import OrthancServer, Pacs, connect
from pacsai.pacs.orthanc import DICOMWEB_PLUGIN, free_port, orthanc_available, start_orthanc

if TYPE_CHECKING:  # pragma: no cover - imported for real by pytest_plugins (so that its asserts are rewritten)
    from tests.postgres_fixture import PostgresServer

pytest_plugins = ["tests.postgres_fixture"]  # the `postgres` fixture (Orthanc on PostgreSQL, MLflow server)

KNOWN_BACKENDS = ("orthanc", "embedded", "orthanc-postgres")
BACKENDS = tuple(b.strip() for b in os.environ.get("PACSAI_PACS_BACKENDS", "orthanc,embedded").split(",") if b.strip())
if not BACKENDS or set(BACKENDS) - set(KNOWN_BACKENDS):
    raise ValueError(f"PACSAI_PACS_BACKENDS={os.environ.get('PACSAI_PACS_BACKENDS')!r}: choose from {KNOWN_BACKENDS}")
PG_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
PG_STORAGE_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so")


def _unavailable(reason: str) -> None:
    if os.environ.get("PACSAI_REQUIRE_ORTHANC") == "1":
        pytest.fail(f"PACSAI_REQUIRE_ORTHANC=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[OrthancServer]:
    """A real Orthanc with DICOMweb for the whole session (see module docstring).

    With ``PACSAI_PACS_BACKENDS=orthanc-postgres`` (no plain ``orthanc``) it is the PostgreSQL-backed one, so the
    tests that use ``orthanc`` directly (to clear it, to reach its REST API) run against that back end too.
    """
    if "orthanc-postgres" in BACKENDS and "orthanc" not in BACKENDS:
        yield request.getfixturevalue("orthanc_postgres")
        return
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
    if request.param in ("orthanc", "orthanc-postgres"):
        fixture = "clean_orthanc" if request.param == "orthanc" else "clean_orthanc_postgres"
        server: OrthancServer = request.getfixturevalue(fixture)
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


def orthanc_postgres_config(postgres: PostgresServer, database: str) -> dict[str, object]:
    """Orthanc configuration keys that put the index and the storage in PostgreSQL (what docs/team.md shows)."""
    return {
        "Plugins": [str(DICOMWEB_PLUGIN), str(PG_INDEX_PLUGIN), str(PG_STORAGE_PLUGIN)],
        "PostgreSQL": {
            "EnableIndex": True,
            "EnableStorage": True,
            "Host": postgres.host,
            "Port": postgres.port,
            "Database": database,
            "Username": postgres.user,
            "Password": postgres.password,
            "EnableSsl": False,
            "Lock": False,  # several test servers may share the cluster (each its own database)
        },
    }


@pytest.fixture(scope="session")
def orthanc_postgres(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[OrthancServer]:
    """A real Orthanc with index and storage in PostgreSQL (see module docstring)."""
    reason = orthanc_available()
    if reason:
        _unavailable(reason)
    missing = [str(p) for p in (PG_INDEX_PLUGIN, PG_STORAGE_PLUGIN) if not p.is_file()]
    if missing:
        msg = (f"Orthanc PostgreSQL plugins not found ({', '.join(missing)}); "
               "install the Debian package orthanc-postgresql")
        if os.environ.get("PACSAI_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PACSAI_REQUIRE_POSTGRES=1 but {msg}")
        pytest.skip(msg)
    postgres.create_database("orthanc")
    config = orthanc_postgres_config(postgres, "orthanc")
    try:
        server = start_orthanc(tmp_path_factory.mktemp("orthanc-pg"), user="pacsai", password="orthanc-test-pw",
                               extra_config=config, startup_timeout=60.0)
    except PacsError:  # the free port may have been taken between choosing and binding it
        server = start_orthanc(tmp_path_factory.mktemp("orthanc-pg"), user="pacsai", password="orthanc-test-pw",
                               extra_config=config, startup_timeout=60.0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_orthanc_postgres(orthanc_postgres: OrthancServer) -> OrthancServer:
    """``orthanc_postgres`` with nothing stored in it."""
    orthanc_postgres.clear()
    return orthanc_postgres
