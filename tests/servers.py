"""Real Redis and PostgreSQL servers on 127.0.0.1 for the production-profile tests.

Each test session starts its own servers from the Debian packages (``redis-server``, ``postgresql``) on
free ports in temporary folders, so tests never touch a developer's databases and leave nothing behind.
``.ci/run`` installs the packages and sets ``REQUIRE_PRODUCTION_SERVERS=1``: there, missing binaries are
an error, not a skip, so CI cannot pass without running these tests.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.services import free_port, tcp_open

PASSWORD = "encore-test-password"
DATABASES = ("mlflow", "dagster", "feast")


def _missing(what: str) -> None:
    message = f"{what} not installed (apt-get install redis-server postgresql; .ci/run does this)"
    if os.environ.get("REQUIRE_PRODUCTION_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _wait(host: str, port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and proc.returncode != 0:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if tcp_open(host, port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s}s: {log.read_text()[-2000:]}")


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen
    folder: Path

    @property
    def connection_string(self) -> str:
        """Feast's form: host:port[,password=...]."""
        return f"127.0.0.1:{self.port},password={PASSWORD}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_redis() -> Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server")
    folder = Path(tempfile.mkdtemp(prefix="encore-redis-"))
    port = free_port()
    log = folder / "redis.log"
    # No persistence: tests need none.
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", PASSWORD,
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait("127.0.0.1", port, proc, "redis-server", log)
    return Redis(port, proc, folder)


@dataclass
class Postgres:
    port: int
    bindir: Path
    folder: Path
    as_user: list[str]

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://encore:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        out = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "encore",
                              "-d", database, "-At", "-c", sql], check=True, capture_output=True, text=True,
                             env={**os.environ, "PGPASSWORD": PASSWORD})
        return out.stdout.strip()

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def start_postgres() -> Postgres:
    bindir = _postgres_bindir()
    if bindir is None:
        _missing("PostgreSQL")
    folder = Path(tempfile.mkdtemp(prefix="encore-pg-"))
    # PostgreSQL refuses to run as root; CI containers often are root, so run it as the package's user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD)
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")
    data = folder / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "encore", f"--pwfile={pwfile}",
                    "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"], check=True, capture_output=True)
    port = free_port()
    log = folder / "postgres.log"
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"],
                   check=True, capture_output=True)
    server = Postgres(port, bindir, folder, as_user)
    for name in DATABASES:
        server.psql("postgres", f"CREATE DATABASE {name}")
    return server
