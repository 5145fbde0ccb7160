"""Start the recommendation service as a real HTTP server in its own process (``encore serve``), tracked
like the embedded services, and wait until it answers ``/readyz``. Used by the end-to-end road, the serving
benchmark and the tests."""

from __future__ import annotations

import logging
import sys

import httpx

from infra.services import ManagedProcess, free_port, spawn_service, wait_until
from infra.settings import EncoreSettings, child_env

log = logging.getLogger("encore.serving")


def start_server(settings: EncoreSettings, kafka: str, mlflow_uri: str, *, experiment: str = "default") -> ManagedProcess:
    """``encore serve`` as a real HTTP server in its own process, tracked like the other services;
    ``experiment`` is its ``--experiment`` (``default`` seeds the settings' two-arm test, ``store`` serves the
    experiment store as it is)."""
    port = settings.serve.port or free_port()
    # The server runs with exactly this run's settings (tests and callers may have built them in code).
    env = child_env(settings.model_copy(update={"kafka_bootstrap": kafka, "mlflow_tracking_uri": mlflow_uri}),
                    settings.run_dir / "serve-settings.yaml")
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--experiment", experiment]
    server = spawn_service("serve", cmd, settings, endpoint=f"http://127.0.0.1:{port}", env=env)
    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/readyz", timeout=1).status_code == 200, timeout_s=120,
                   what="recommendation service", proc=server.proc)
    except Exception:
        server.stop()
        raise
    log.info("recommendation service on %s", server.endpoint)
    return server
