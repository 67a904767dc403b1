"""The dashboard: one FastAPI app holding the pages, the JSON API and the live streams.

FastAPI so that the JSON API documents itself at /openapi.json (the pages are
left out of that document). The gateway mounts :attr:`Dashboard.app` at the
root of its HTTP server next to /healthz and /metrics (see
:func:`gateway.http.build_app`), and calls :meth:`Dashboard.start` and
:meth:`Dashboard.close` around it (uvicorn runs with lifespan off). SQL work
runs in the thread pool, never on the event loop that carries the calls.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..store.db import make_engine, make_sessionmaker
from ..store.models import User
from ..store.page import QueryError
from ..store.users import revoke_session, session_revoked, verify_token
from .auth import SESSION_COOKIE, Principal, SessionCodec, SessionData, load_secret, secret_file_for
from .format import FILTERS
from .assist import AssistFeed
from .live import LiveHub
from .throttle import LoginGuard

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from ..config import Settings

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class ApiError(Exception):
    """An error answered as JSON ``{"detail": ...}`` with its status (and headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class SecurityHeaders:
    """Pure ASGI middleware (streams pass straight through): CSP, no framing, no caching of private pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"same-origin"), (b"content-security-policy", CSP.encode())]
                if not static and b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def wants_json(request: Request) -> bool:
    path = request.url.path
    if path.startswith("/api/") or path == "/api" or path.endswith("/stream"):
        return True
    return "text/html" not in request.headers.get("accept", "")


class Dashboard:
    """Pages, API and live hub of one gateway process."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        hub: LiveHub | None = None,
        throttle: LoginGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        keepalive_s: float = 15.0,
    ) -> None:
        self.settings = settings
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        self.db = make_sessionmaker(self.engine)
        secret = load_secret(settings.web_secret_key,
                             secret_file_for(settings.database_url, settings.web_secret_file))
        self.codec = SessionCodec(secret, settings.web_session_ttl_s, wall=wall)
        self._owns_hub = hub is None
        self.hub = hub if hub is not None else LiveHub(
            settings.redis_url, events_stream=settings.events_stream, call_stream=settings.call_stream,
            rebuild_window_s=settings.web_live_window_s, queue_size=settings.web_sse_queue, wall=wall)
        self.throttle = throttle if throttle is not None else LoginGuard()
        self.clock = clock
        self.wall = wall
        self.keepalive_s = keepalive_s
        # agent-assist suggestions beside the live call view (gateway/web/assist.py)
        self.assist = AssistFeed(settings.redis_url, f"{settings.stream_prefix}:assist") \
            if settings.web_assist else None
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        self.templates.env.filters.update(FILTERS)
        self.templates.env.globals["version"] = __version__
        self.app = self._build()
        self.asgi: ASGIApp = SecurityHeaders(self.app)  # what the HTTP server mounts

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Dashboard:
        return cls(settings, **kwargs)

    async def start(self) -> None:
        if self._owns_hub:
            await self.hub.start()

    async def close(self) -> None:
        if self._owns_hub:
            await self.hub.close()
        if self.assist is not None:
            await self.assist.close()
        if self._owns_engine:
            self.engine.dispose()

    # -- database and identity
    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.db() as session:
            yield session

    def read_session(self, request: Request) -> SessionData | None:
        return self.codec.loads(request.cookies.get(SESSION_COOKIE))

    def _session_principal(self, data: SessionData) -> Principal | None:
        with self.session() as db:
            user = db.get(User, data.user_id)
            if user is None or user.disabled or user.username != data.username \
                    or self.codec.fingerprint(user.password_hash) != data.pw:
                return None  # deleted, disabled, or the password changed since the login
            if session_revoked(db, data.sid):
                return None  # logged out (in any process, before a restart too)
            return Principal(user.id, user.username, user.role, "session")

    async def session_principal(self, request: Request) -> Principal | None:
        data = self.read_session(request)
        if data is None or not data.logged_in:
            return None
        return await run_in_threadpool(self._session_principal, data)

    def _token_principal(self, token: str, record_use: bool = True) -> Principal | None:
        with self.session() as db:
            user = verify_token(db, token, record_use=record_use)
            if user is None:
                return None
            principal = Principal(user.id, user.username, user.role, "token")
            if record_use:
                db.commit()  # last_used_at
            return principal

    async def token_principal(self, token: str, *, record_use: bool = True) -> Principal | None:
        return await run_in_threadpool(self._token_principal, token, record_use)

    def _revoke_stored(self, data: SessionData) -> None:
        with self.session() as db:
            revoke_session(db, data.sid, datetime.fromtimestamp(data.expires, timezone.utc),
                           datetime.fromtimestamp(self.wall(), timezone.utc))
            db.commit()

    async def revoke(self, data: SessionData) -> None:
        """End a session: at once in this process, and in the store for every process and
        after a restart (a logged-in one; an anonymous session only guards a login form)."""
        self.codec.revoke(data)
        if data.logged_in:
            await run_in_threadpool(self._revoke_stored, data)

    async def gateways(self) -> list[dict[str, Any]]:
        """The gateway instances for the board (gateway/instances.py); [] with a hub that has none."""
        read = getattr(self.hub, "gateways", None)
        if read is None:
            return []
        s = self.settings
        return list(await read(s.stream_prefix, heartbeat_s=s.asr_pool_heartbeat_s,
                               lost_after_s=s.gateway_lost_after_s))

    def stream_alive(self, request: Request) -> Callable[[], Awaitable[bool]]:
        """For a live stream: does the credential that opened it still hold? A session that
        logged out, a changed password, a disabled user or a revoked token ends the stream
        (checked every ``web_stream_recheck_s``; gateway/web/stream.py)."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()

            async def token_alive() -> bool:
                return await self.token_principal(token, record_use=False) is not None
            return token_alive
        cookie = request.cookies.get(SESSION_COOKIE)

        async def session_alive() -> bool:
            data = self.codec.loads(cookie)  # expiry and this process's revocations
            return data is not None and data.logged_in \
                and await run_in_threadpool(self._session_principal, data) is not None
        return session_alive

    def set_session_cookie(self, response: Response, data: SessionData) -> None:
        response.set_cookie(SESSION_COOKIE, self.codec.dumps(data), max_age=self.codec.max_age(data), path="/",
                            httponly=True, samesite="lax", secure=self.settings.web_cookie_secure)

    def clear_session_cookie(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                               secure=self.settings.web_cookie_secure)

    def render(self, request: Request, name: str, context: dict[str, Any], status_code: int = 200,
               session: SessionData | None = None) -> HTMLResponse:
        """A page; ``session`` (new or rotated) is set as the cookie when given."""
        data = session or self.read_session(request)
        context = {"user": None, "csrf": data.csrf if data else "", **context}
        response = self.templates.TemplateResponse(request, name, context, status_code=status_code)
        if session is not None:
            self.set_session_cookie(response, session)
        return response

    # -- assembly
    def _build(self) -> FastAPI:
        from .api import api_router
        from .pages import LoginRequired, page_router

        app = FastAPI(title="Earshot", version=__version__, docs_url=None, redoc_url=None,
                      openapi_url="/openapi.json",
                      description="Transcripts of the calls Earshot handled, and the calls up now. "
                                  "Authenticate with `Authorization: Bearer <token>` (`earshot users token`).")
        app.state.dashboard = self
        app.include_router(api_router(self))
        app.include_router(page_router(self))
        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

        @app.exception_handler(LoginRequired)
        async def login_required(request: Request, exc: LoginRequired) -> Response:
            target = "/login" if exc.next_path in ("", "/") else "/login?" + urlencode({"next": exc.next_path})
            return RedirectResponse(target, status_code=303)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError) -> Response:
            if wants_json(request):
                return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)
            return self.render(request, "error.html", {"status": exc.status, "message": exc.detail},
                               status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> Response:
            errors = []
            for error in exc.errors():
                loc = [str(p) for p in error.get("loc", ())]
                where, field = (loc[0], ".".join(loc[1:])) if len(loc) > 1 else ("request", ".".join(loc))
                errors.append({"field": field, "in": where, "message": str(error.get("msg", "invalid"))})
            first = errors[0] if errors else {"field": "", "message": "invalid request"}
            detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
            if wants_json(request):
                return JSONResponse({"detail": detail, "errors": errors}, status_code=422)
            return self.render(request, "error.html", {"status": 422, "message": detail}, status_code=422)

        @app.exception_handler(QueryError)
        async def bad_query(request: Request, exc: QueryError) -> Response:
            field = str(exc).split(" ", 1)[0]
            if wants_json(request):
                return JSONResponse({"detail": str(exc), "errors": [{"field": field, "in": "query",
                                                                      "message": str(exc)}]}, status_code=422)
            return self.render(request, "error.html", {"status": 422, "message": str(exc)}, status_code=422)

        @app.exception_handler(SQLAlchemyError)
        async def database_down(request: Request, exc: SQLAlchemyError) -> Response:
            log.warning("dashboard: database error: %s", str(exc).splitlines()[0] if str(exc) else exc)
            message = "the transcript database is unavailable (is it up and migrated? `earshot db upgrade`)"
            if wants_json(request):
                return JSONResponse({"detail": message}, status_code=503, headers={"Retry-After": "5"})
            return self.render(request, "error.html", {"status": 503, "message": message}, status_code=503)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            message = exc.detail if isinstance(exc.detail, str) else "error"
            if exc.status_code == 404:
                message = f"nothing at {request.url.path}"
            elif exc.status_code == 405:
                message = f"{request.method} is not allowed on {request.url.path}"
            if wants_json(request):
                return JSONResponse({"detail": message}, status_code=exc.status_code, headers=exc.headers)
            return self.render(request, "error.html", {"status": exc.status_code, "message": message},
                               status_code=exc.status_code)

        return app
