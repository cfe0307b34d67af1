"""A real PostgreSQL server for the tests that need one (``basin tune`` workers sharing a study).

``BASIN_TEST_POSTGRES_URL`` (a SQLAlchemy URL, e.g. ``postgresql+psycopg://basin@127.0.0.1:5432/
basin``; ``.ci/postgres.sh`` starts such a server and exports it) is used when set, and a test
fails -- never skips -- when it cannot be reached. Otherwise a throwaway server is started with
the distribution's ``initdb`` / ``pg_ctl`` in a temporary directory (as the ``postgres`` user
when we are root: the server refuses to run as root), listening on loopback only. Without
PostgreSQL binaries the tests are skipped, except under ``CI`` (set), where they fail.
Each test gets its own fresh database on the server (:func:`fresh_database`)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

ENV_URL = "BASIN_TEST_POSTGRES_URL"


def binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's versioned
    ``/usr/lib/postgresql/N/bin``, newest first), or None."""
    found = shutil.which("initdb")
    dirs = [Path(os.path.realpath(found)).parent] if found else []
    versioned = glob("/usr/lib/postgresql/*/bin")
    dirs += sorted((Path(d) for d in versioned), key=lambda d: int(d.parent.name), reverse=True)
    for d in dirs:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests must run in CI: {why}")
    pytest.skip(why)


def _connect(url: str, dbname: str | None = None):  # noqa: ANN202
    """A psycopg connection (autocommit) to the server of SQLAlchemy URL ``url``."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=dbname or u.database or "postgres",
        autocommit=True,
        connect_timeout=10,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Throwaway:
    """A PostgreSQL server of our own in a temporary directory, on 127.0.0.1 only (no Unix
    socket), trusting local connections of the superuser ``basin``; ``stop`` removes it."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="basin-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.user: dict = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._run("initdb", "-D", str(self.data), "-U", "basin", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nmax_connections = 200\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.url = f"postgresql+psycopg://basin@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.root)}
        p = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True,
                           env=env, cwd=self.root, timeout=120, **self.user)  # fmt: skip
        if p.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({p.returncode}): {p.stderr[-2000:]}\n{log}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def server() -> Iterator[str]:
    """Generator for a session fixture: the URL of a reachable server (see the module doc)."""
    url = os.environ.get(ENV_URL)
    if url:
        try:
            _connect(url).close()
        except Exception as exc:  # noqa: BLE001 -- set but unusable: a failure, not a skip
            pytest.fail(f"{ENV_URL}={url} is set but cannot be reached: {exc}")
        yield url
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'basin-optim[postgres]')")
    bindir = binaries()
    if bindir is None:
        _unavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) and {ENV_URL} not set")
    srv = Throwaway(bindir)
    try:
        yield srv.url
    finally:
        srv.stop()


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new empty database on the server of ``url`` (dropped afterwards): its URL."""
    from sqlalchemy.engine import make_url

    name = f"basin_test_{uuid.uuid4().hex[:12]}"
    with _connect(url) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        for _ in range(20):  # the workers' pools may still be closing
            try:
                with _connect(url) as con:
                    con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.25)
