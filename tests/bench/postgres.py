"""A throwaway PostgreSQL server for the tests of the benchmark's shared storage.

Debian's package provides the server: when ``initdb``/``pg_ctl`` are missing (a fresh machine) it is installed with
``apt-get`` (root), and a failed install is an error, never a skip. The server runs as an unprivileged user
(PostgreSQL refuses root: ``runuser -u postgres --`` when we are root), from a fresh data directory in a temporary
folder, on a free port of 127.0.0.1 only (no unix socket), with trust authentication and no fsync (the data is
thrown away). :meth:`PostgresServer.stop` stops it and removes the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"  # the unprivileged user Debian's package creates (created here when missing)
INSTALL_LOCK = Path(tempfile.gettempdir()) / "stochopt-postgres-install.lock"  # pytest-xdist workers install once
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
APT_GET = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends"]
DRIVER_HINT = 'the PostgreSQL driver is missing: pip install "stochopt[postgres]" (psycopg 3)'


class PostgresError(RuntimeError):
    """The server could not be installed or started; the message says which command failed and its output."""


def find_bindir() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: on PATH, or Debian's ``/usr/lib/postgresql/VERSION/bin`` (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        real = Path(on_path).resolve().parent  # a link on PATH: the folder of the real binaries
        return real if (real / "initdb").exists() else Path(on_path).parent
    debian = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    found = [Path(p).parent for p in debian if Path(p).with_name("initdb").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def _run(cmd: list[str], what: str, timeout: float, env: dict[str, str] | None = None, **kwargs) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                              **kwargs)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PostgresError(f"{what} failed: {' '.join(cmd)}: {err}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise PostgresError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{output}")
    return done.stdout


def install() -> Path:
    """Install Debian's PostgreSQL server unless it is there; return its binaries' folder.

    ``postgresql-common`` first, told not to create and start the usual ``main`` cluster on port 5432 (as the
    official Docker image does), then ``postgresql``. Only root can; anyone else gets an error saying what to do."""
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test worker may be installing it right now
        bindir = find_bindir()
        if bindir is not None:
            return bindir
        if os.geteuid() != 0:
            raise PostgresError("PostgreSQL's server (initdb, pg_ctl) is not installed and only root can install it: "
                                "apt-get install postgresql, or run the tests as root")  # fmt: skip
        if shutil.which("apt-get") is None:
            raise PostgresError("PostgreSQL's server (initdb, pg_ctl) is not installed and there is no apt-get")
        _run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", "update"], "apt-get update", 600, APT_ENV)
        _run([*APT_GET, "install", "postgresql-common"], "installing postgresql-common", 600, APT_ENV)
        conf = Path("/etc/postgresql-common/createcluster.conf")
        if conf.exists() and not re.search(r"^\s*create_main_cluster\s*=\s*false", conf.read_text(), re.M):
            with open(conf, "a") as f:
                f.write("\n# the tests of stochopt start their own servers\ncreate_main_cluster = false\n")
        _run([*APT_GET, "install", "postgresql"], "installing postgresql", 900, APT_ENV)
        bindir = find_bindir()
        if bindir is None:
            raise PostgresError("apt-get installed postgresql but no initdb/pg_ctl is in /usr/lib/postgresql/*/bin")
        return bindir


def _ensure_user() -> None:
    try:
        _run(["id", "-u", SERVER_USER], "id", 10)
    except PostgresError:
        _run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
              SERVER_USER], f"creating the user {SERVER_USER}", 30)  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running server; ``url(name)`` is the SQLAlchemy URL of a database on it (see :meth:`create_database`)."""

    def __init__(self, bindir: Path, root: Path, port: int, as_root: bool) -> None:
        self.bindir, self.root, self.port, self.as_root = bindir, root, port, as_root
        self.data, self.log = root / "data", root / "server.log"
        self.timings: dict[str, float] = {}

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", SERVER_USER, "--", *cmd] if self.as_root else cmd

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        try:
            import psycopg
        except ImportError:
            raise PostgresError(DRIVER_HINT) from None
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database, autocommit=True,
                               connect_timeout=10)  # fmt: skip

    def create_database(self, name: str) -> str:
        """A new empty database (dropped first if a previous test left it); its URL."""
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        begin = time.perf_counter()
        _run(self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "--locale=C",
                       "--encoding=UTF8"), "initdb", 120, cwd=self.root)  # fmt: skip
        self.timings["initdb"] = time.perf_counter() - begin
        begin = time.perf_counter()
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50")  # fmt: skip
        try:
            _run(self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                           "start"), "pg_ctl start", 90, cwd=self.root)  # fmt: skip
        except PostgresError as err:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise PostgresError(f"{err}\nserver log:\n{log}") from None
        self.timings["start"] = time.perf_counter() - begin

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def shutdown(self) -> None:
        """Stop the server, immediately (nothing in it is kept)."""
        if self.running():
            _run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"), "pg_ctl stop",
                 60, cwd=self.root)  # fmt: skip

    def stop(self) -> None:
        """Stop the server and remove its folder; safe to call twice."""
        try:
            self.shutdown()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """Install PostgreSQL if needed, then start a fresh server on a free loopback port; the caller stops it."""
    begin = time.perf_counter()
    bindir = find_bindir() or install()
    installed = time.perf_counter() - begin
    as_root = os.geteuid() == 0
    if as_root:
        _ensure_user()
    root = Path(tempfile.mkdtemp(prefix="stochopt-pg-"))
    try:
        if as_root:
            shutil.chown(root, SERVER_USER, SERVER_USER)
        os.chmod(root, 0o700)
        for attempt in range(3):  # the free port may be taken between finding it and the server binding it
            server = PostgresServer(bindir, root, free_port(), as_root)
            try:
                server.start()
            except PostgresError:
                with contextlib.suppress(PostgresError):
                    server.shutdown()
                shutil.rmtree(server.data, ignore_errors=True)
                if attempt == 2:
                    raise
                continue
            server.timings = {"install": installed, **server.timings}
            return server
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
