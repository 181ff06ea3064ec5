"""A throwaway PostgreSQL server for the tests that run on PostgreSQL as well as on SQLite.

- ``postgres_server`` (session): a cluster made by ``initdb`` in a temporary folder and run by ``postgres`` on a free
  loopback port (trust authentication, listening on 127.0.0.1 only, its socket in that folder, fsync off), with a
  template database already migrated to the schema head. Run as the ``postgres`` user when the tests run as root
  (PostgreSQL refuses root). Stopped at the end of the session; a watchdog process stops it and removes its folder
  if pytest dies without tearing down (killed, or ``os._exit`` on a timeout), so no server outlives the run. Skipped,
  saying why, where PostgreSQL's server binaries are not installed (Debian: ``apt-get install postgresql``).
- ``postgres_url`` and ``postgres_empty_url``: a fresh database for one test, copied from the migrated template or
  empty (for migration tests), dropped after it: ``postgresql+psycopg://postgres@127.0.0.1:<port>/<name>``.

Registered in ``tests/conftest.py`` through ``pytest_plugins``; ``database_url`` there chooses between SQLite and
these.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maas.testing.server import free_port

#: The server programs a cluster needs; found in Debian's versioned folder, else on PATH.
PROGRAMS = ("initdb", "postgres")
#: Not UTC, and not a whole number of hours from it: a stored time read back in the server's zone shows up as wrong.
SERVER_TIMEZONE = "Asia/Kolkata"
TEMPLATE = "maas_template"

# Waits for EOF on stdin (pytest exited, however it exited), then stops the server by its pid file and removes the
# folder. argv: the folder, the data directory.
_WATCHDOG = """
import os, shutil, signal, sys, time
sys.stdin.read()
folder, data = sys.argv[1], sys.argv[2]
try:
    pid = int(open(os.path.join(data, "postmaster.pid")).readline())
    os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        os.kill(pid, 0)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(folder, ignore_errors=True)
"""


def find_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs: Debian's newest ``/usr/lib/postgresql/*/bin``, else the folder of
    ``initdb`` on PATH (symlinks followed); None when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all(os.access(Path(folder) / p, os.X_OK) for p in PROGRAMS):
            return Path(folder)
    return None


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user; none when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip(
            "the tests run as root and there is no `postgres` user to run PostgreSQL as (it refuses root): "
            "install Debian's postgresql package, which makes one, or run the tests as another user"
        )
    env = {**os.environ, "HOME": user.pw_dir, "USER": "postgres", "LOGNAME": "postgres"}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


class PostgresServer:
    """A running throwaway cluster: its port, and fresh databases made and dropped through an admin connection."""

    def __init__(self, bindir: Path) -> None:
        import psycopg

        self.folder = Path(tempfile.mkdtemp(prefix="maas-pg-"))
        self.data = self.folder / "data"
        self.port = 0
        self._as = _run_as()
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        try:
            if self._as:
                os.chown(self.folder, self._as["user"], self._as["group"])
            self._initdb(bindir)
            self._start(bindir)
            self.admin = psycopg.connect(self._dsn("postgres"), autocommit=True)
            self.admin.execute(f"CREATE DATABASE {TEMPLATE}")
            self._migrate(self.url(TEMPLATE))
        except BaseException:
            self.stop()
            raise

    def _dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def _initdb(self, bindir: Path) -> None:
        cmd = [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        cmd += ["--locale=C", "--no-sync", "--no-instructions"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._as)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _start(self, bindir: Path) -> None:
        import psycopg

        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.folder),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "timezone": SERVER_TIMEZONE,
        }
        log = self.folder / "postgres.log"
        for _attempt in range(3):  # the free port may be taken by someone else before the server binds it
            self.port = free_port()
            cmd = [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
            cmd += [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, **self._as
                )
            if self._watchdog is None:
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-c", _WATCHDOG, str(self.folder), str(self.data)],
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 60
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    psycopg.connect(self._dsn("postgres")).close()
                    return
                except psycopg.OperationalError:
                    time.sleep(0.1)
            self._kill()
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"PostgreSQL did not start; its log ({log}) ends:\n{tail}")

    @staticmethod
    def _migrate(url: str) -> None:
        from maas.registry.sql.engine import Database

        Database(url).engine.dispose()

    def create_database(self, *, migrated: bool = True) -> str:
        """A new database (a copy of the migrated template, or empty); its URL."""
        name = f"t{next(self._names)}"
        template = TEMPLATE if migrated else "template0"
        self.admin.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self.admin.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: backends end, the postmaster exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(Exception):
            self.admin.close()
        self._kill()
        if self._watchdog is not None:
            with contextlib.suppress(Exception):
                self._watchdog.stdin.close()  # type: ignore[union-attr]
                self._watchdog.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's server programs (initdb, postgres) are not installed (Debian: apt-get install postgresql); "
            "the PostgreSQL variants are not run"
        )
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database at the schema head, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def postgres_empty_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database (no tables), dropped after the test."""
    url = postgres_server.create_database(migrated=False)
    yield url
    postgres_server.drop_database(url)
