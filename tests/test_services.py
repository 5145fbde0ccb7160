"""Embedded services start, answer, and leave nothing behind — also when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.services import EmbeddedServices, _alive, reap_stale, tcp_open
from tests.conftest import small_settings

pytestmark = pytest.mark.integration


def test_stack_starts_and_stops_cleanly(tmp_path):
    settings = small_settings(tmp_path / "encore")
    with EmbeddedServices(settings) as svc:
        pids = [p.proc.pid for p in svc.started]
        host, port = svc.kafka_bootstrap.split(":")
        assert tcp_open(host, int(port))
        assert (settings.run_dir / "endpoints.json").is_file()
    assert not any(_alive(p) for p in pids)
    assert not list(settings.run_dir.glob("*.pid"))
    assert not (settings.run_dir / "endpoints.json").exists()


def services_up(data) -> tuple[subprocess.Popen, list[int]]:  # noqa: ANN001 - a Path
    """`encore services up` on ``data`` in a child process, once its endpoints are published.

    Its output goes to ``<data>/services-up.log``, not a pipe: a pipe nobody drains until the end would stall a
    chatty child on a full buffer, and the test would blame the shutdown."""
    env = {**os.environ, "ENCORE_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "services-up.log", "ab") as out:
        # SIGINT back to its default in the child: a test run started in the background of a non-interactive
        # shell (nohup ... &) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "-m", "cli", "services", "up"], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    endpoints = data / "run" / "endpoints.json"
    deadline = time.monotonic() + 120
    while not endpoints.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not endpoints.exists():  # stop everything before failing: a failed test must not leave servers running
        proc.kill()  # SIGKILL runs no cleanup, so the servers it had started live on: reap them by their pid files
        proc.wait()
        reap_stale(small_settings(data))
        pytest.fail(f"services up published no endpoints within 120 s:\n{(data / 'services-up.log').read_text()}")
    pids = [json.loads(p.read_text())["pid"] for p in (data / "run").glob("*.pid")]
    assert len(pids) == 2
    return proc, pids


def test_ctrl_c_leaves_no_process_behind_and_a_rerun_works(tmp_path):
    data = tmp_path / "encore"
    for _ in range(2):  # the second start proves the first one left nothing in its way
        proc, pids = services_up(data)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # `services up` dumps every thread's stack on SIGUSR1
            time.sleep(2)
            proc.kill()
            proc.wait()
            pytest.fail("services up did not stop within 60 s of Ctrl-C; still alive: "
                        f"{[p for p in pids if _alive(p)]}\n{(data / 'services-up.log').read_text()}")
        assert code == 0, (data / "services-up.log").read_text()
        assert not any(_alive(p) for p in pids)
        assert not list((data / "run").glob("*.pid"))


def test_services_left_by_a_killed_process_are_reaped(tmp_path):
    data = tmp_path / "encore"
    proc, pids = services_up(data)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    assert all(_alive(p) for p in pids)
    reaped = reap_stale(small_settings(data))
    assert len(reaped) == 2
    assert not any(_alive(p) for p in pids)
