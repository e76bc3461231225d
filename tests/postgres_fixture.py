"""A real PostgreSQL for tests (Debian's ``postgresql``): initdb in a temporary folder, a free loopback port.

Fixture (loaded through ``tests/orthanc_fixture.py``'s ``pytest_plugins``):

``postgres`` (session)
    A running :class:`PostgresServer` (``url(db)``, ``create_database(name)``, ``query(db, sql)``), password
    authentication (scram-sha-256) over TCP on 127.0.0.1 only, data in a fresh temporary folder, stopped and
    removed at the end of the session. PostgreSQL refuses to run as root: as root, the server runs as the
    ``postgres`` system user the Debian package creates (else ``nobody``). Skips with the reason where PostgreSQL
    or psycopg2 is absent; *fails* instead when ``PACSAI_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "pacsai"
PASSWORD = "pg-test-pw-7d41"  # a test-only password on a loopback server that lives for one session


def _unavailable(reason: str) -> None:
    if os.environ.get("PACSAI_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PACSAI_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def postgres_bin() -> Path | None:
    """The folder with initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def postgres_available() -> str | None:
    """``None`` when PostgreSQL's server programs and psycopg2 are installed, else why not (one line)."""
    if postgres_bin() is None:
        return "PostgreSQL not found (no initdb/pg_ctl); install the Debian package postgresql"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed; pip install psycopg2-binary"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """Who the server runs as: ourselves, or (as root, which postgres refuses) ``postgres``/``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster on ``127.0.0.1:port`` with superuser ``user``/``password``."""

    host: str
    port: int
    user: str
    password: str
    workdir: Path
    bin_dir: Path
    owner: pwd.struct_passwd | None

    def url(self, database: str, *, scheme: str = "postgresql") -> str:
        """``postgresql://user:password@127.0.0.1:port/database`` (SQLAlchemy/MLflow form)."""
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def _connect(self, database: str) -> Any:
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=5)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (once; an existing one is kept) and return its URL."""
        conn = self._connect("postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def query(self, database: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one SQL statement against ``database``."""
        conn = self._connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def dump_text(self, database: str) -> str:
        """Every table's every row of ``database`` as text (what a leak search reads)."""
        tables = self.query(database, "SELECT schemaname, tablename FROM pg_tables "
                                      "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
        parts = []
        for schema, table in tables:
            rows = self.query(database, f'SELECT t::text FROM "{schema}"."{table}" AS t')
            parts += [f"{schema}.{table}: {r[0]}" for r in rows]
        return "\n".join(parts)

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self.owner.pw_uid if self.owner else None
        group = self.owner.pw_gid if self.owner else None
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], user=user, group=group,
                              extra_groups=[] if self.owner else None, capture_output=True, text=True,
                              check=check, timeout=120, cwd=self.workdir)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        self._pg("pg_ctl", "-D", str(self.workdir / "data"), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres(*, port: int | None = None) -> PostgresServer:
    """initdb a cluster in a new temporary folder and start it on 127.0.0.1 (TCP only, password auth)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL not found; install the Debian package postgresql")
    owner = _run_as()
    # Not under pytest's tmp folder: that one is 0700 root's, and the server may run as another user.
    workdir = Path(tempfile.mkdtemp(prefix="pacsai-pg-"))
    (workdir / "run").mkdir()
    (workdir / "pwfile").write_text(PASSWORD + "\n")
    if owner is not None:
        for path in (workdir, workdir / "run", workdir / "pwfile"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(host="127.0.0.1", port=port or _free_port(), user=SUPERUSER, password=PASSWORD,
                            workdir=workdir, bin_dir=bin_dir, owner=owner)
    server._pg("initdb", "-D", str(workdir / "data"), "-U", SUPERUSER, "--auth=scram-sha-256",
               f"--pwfile={workdir / 'pwfile'}", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
    options = (f"-h 127.0.0.1 -p {server.port} -k {workdir / 'run'} -c fsync=off -c full_page_writes=off "
               "-c synchronous_commit=off -c max_connections=200")  # a throw-away test cluster: speed over safety
    started = server._pg("pg_ctl", "-D", str(workdir / "data"), "-l", str(workdir / "server.log"), "-o", options,
                         "-w", "-t", "60", "start", check=False)
    if started.returncode != 0:
        log = (workdir / "server.log").read_text()[-2000:] if (workdir / "server.log").is_file() else ""
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start on port {server.port}: {started.stderr.strip()} {log}")
    deadline = time.monotonic() + 30
    while True:  # pg_ctl -w waits for the socket; a first real connection proves the password works too
        try:
            server.query("postgres", "SELECT 1")
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the whole session (see module docstring)."""
    reason = postgres_available()
    if reason:
        _unavailable(reason)
    try:
        server = start_postgres()
    except RuntimeError:  # the free port may have been taken between choosing and binding it: once more
        server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
