"""The server listens before the service is built: ``encore serve`` runs ``Booting`` under uvicorn.

Building the service imports Feast (and, through it, much of the scientific stack): seconds on an idle
2-core box, tens of seconds on a loaded one. A replica that is silent meanwhile gets restarted by its
liveness probe, however healthy it is. So the ASGI app uvicorn runs is this small one, which imports
nothing heavy: it answers at once, builds the real app (``serving.app.create_app``) in a thread, runs that
app's lifespan, and from then on hands every request to it.

While it builds: ``/healthz`` 200 (the process is alive), ``/readyz`` 503 ("starting"), anything else 503
with ``Retry-After``. If the build fails, ``/healthz`` answers 500 with the reason, so that the liveness
probe restarts the replica, and the reason is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("encore.serving")


async def _answer(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class Booting:
    """An ASGI app that answers while ``build()`` (run in a thread) makes the real one, then delegates to it.

    ``build``: returns the real app (a Starlette/FastAPI app, whose lifespan is run here)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._app: ASGIApp | None = None
        self._lifespan: AbstractAsyncContextManager | None = None
        self._failed: str | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            await self._while_booting(scope, send)
        # websockets: none are served; the connection is refused by not accepting it

    async def _while_booting(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "")
        if self._failed is not None:
            status = 500 if path == "/healthz" else 503
            await _answer(send, status, {"status": "failed", "detail": f"start-up failed: {self._failed}"})
        elif path == "/healthz":
            await _answer(send, 200, {"status": "ok"})
        else:
            await _answer(send, 503, {"detail": "starting: building the service"}, [(b"retry-after", b"1")])

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # start-up completes at once: uvicorn listens while the service is built
                self._task = asyncio.create_task(self._boot())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _boot(self) -> None:
        try:
            app = await asyncio.to_thread(self._build)
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
        except Exception as exc:  # noqa: BLE001 - reported by /healthz (500) and the log, so the replica restarts
            self._failed = f"{type(exc).__name__}: {exc}"
            log.exception("the recommendation service could not start")
            return
        self._lifespan, self._app = lifespan, app
        log.info("recommendation service built and started")

    async def _shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a build still running in its thread finishes alone; its app is never started
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
