"""The gateway's HTTP server: /healthz, Prometheus /metrics, and the dashboard at /.

Runs uvicorn inside the gateway's own event loop (no second process), so health
reflects the very loop that carries the calls. The dashboard and its JSON API
(:mod:`gateway.web`) are mounted at the root when given; /healthz and /metrics
stay outside it (no login, no session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from .metrics import Metrics

log = logging.getLogger(__name__)

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


def build_app(metrics: Metrics, health: Callable[[], Awaitable[dict[str, Any]]],
              web: ASGIApp | None = None, api: list[BaseRoute] | None = None) -> Starlette:
    """/healthz and /metrics, the ``api`` routes (/v1/..., /twilio/...), and ``web``
    (``Dashboard.asgi``) for every other path."""
    async def healthz(request: Request) -> JSONResponse:
        state = await health()
        return JSONResponse(state, status_code=200 if state.get("status") == "ok" else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [Route("/healthz", healthz), Route("/metrics", metrics_endpoint)]
    routes.extend(api or [])
    if web is not None:
        routes.append(Mount("/", app=web))
    return Starlette(routes=routes)


class HttpServer:
    def __init__(self, app: Starlette, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False)
        self._server = uvicorn.Server(config)
        # The gateway owns SIGTERM/SIGINT (drain). uvicorn would otherwise take them over
        # while serving and re-raise them when it stops, which ends a drain early.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="earshot-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return 0

    async def close(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
