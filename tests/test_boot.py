"""``serving.boot``: the server answers /healthz while the service is still being built, then hands over."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI
from starlette.testclient import TestClient

from serving.boot import Booting


def _service(started: list[str]) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        started.append("up")
        yield
        started.append("down")

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "built": True}

    @app.post("/v1/recommendations")
    def recommend() -> dict:
        return {"items": [1]}

    return app


def _until(check, seconds: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_answers_while_the_service_builds_then_delegates_and_runs_its_lifespan():
    release, started = threading.Event(), []

    def build() -> FastAPI:
        release.wait(10)  # the imports of the real service
        return _service(started)

    with TestClient(Booting(build)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "starting" in ready.json()["detail"]
        early = client.post("/v1/recommendations", json={"user_id": 1})
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        release.set()
        _until(lambda: client.get("/healthz").json().get("built") is True)
        assert client.post("/v1/recommendations", json={"user_id": 1}).json() == {"items": [1]}
        assert started == ["up"]
    assert started == ["up", "down"]  # the service's own shutdown ran with the server's


def test_a_failed_build_fails_the_liveness_probe_with_the_reason():
    def build() -> FastAPI:
        raise RuntimeError("feature registry unreadable")

    with TestClient(Booting(build)) as client:
        _until(lambda: client.get("/healthz").status_code == 500)
        assert "feature registry unreadable" in client.get("/healthz").json()["detail"]
        assert client.post("/v1/recommendations", json={"user_id": 1}).status_code == 503
