"""The dashboard's HTML pages, its login/logout, and the SSE streams its JavaScript follows.

Pages render on the server (they work before any script runs); the small
vanilla script in static/earshot.js then keeps the board and a live call view
current over server-sent events. Every POST checks the CSRF token of the
visitor's session and, when the browser sends one, the Origin.
"""

from __future__ import annotations

from datetime import date, datetime, time as dtime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..events import SOURCE_KINDS
from ..output.recording import resolve
from ..store.queries import get_call, list_calls
from ..store.search import search_terms, search_turns
from ..store.users import UserError, authenticate, normalize_username
from .auth import CSRF_FIELD, CSRF_HEADER, Principal, csrf_ok, same_origin
from .live import valid_call_id
from .stream import board_events, call_events

if TYPE_CHECKING:
    from .app import Dashboard

PAGE_SIZE = 50
MAX_FORM_FIELD = 4096
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def safe_next(value: str | None) -> str:
    """A local path to go back to after login; anything else (other sites, //host, schemes) becomes /."""
    if not value or not isinstance(value, str) or len(value) > 2000:
        return "/"
    if not value.startswith("/") or value.startswith("//") or value.startswith("/\\") \
            or any(c in value for c in "\r\n\t\\") or value.startswith("/login"):
        return "/"
    return value


def parse_day(value: str | None, name: str, errors: list[str]) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        errors.append(f"{name}: not a date (YYYY-MM-DD): {value[:40]!r}")
        return None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def page_router(d: Dashboard) -> APIRouter:
    from .app import ApiError

    router = APIRouter(include_in_schema=False)

    async def page_user(request: Request) -> Principal:
        found = await d.session_principal(request)
        if found is None:
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(path)
        return found

    async def stream_user(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            found = await d.token_principal(header[7:].strip())
        else:
            found = await d.session_principal(request)
        if found is None:
            raise ApiError(401, "authentication required: log in, or send 'Authorization: Bearer <token>'")
        return found

    async def check_csrf(request: Request, form: Any) -> None:
        session = d.read_session(request)
        submitted = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not same_origin(request.headers.get("origin"), request.headers.get("host"), request.url.scheme):
            raise ApiError(403, "cross-site request refused (Origin does not match this site)")
        if not csrf_ok(session, submitted if isinstance(submitted, str) else None):
            raise ApiError(403, "the form has expired or did not come from this site (CSRF check failed): "
                                "reload the page and try again")

    async def read_form(request: Request) -> Any:
        try:
            return await request.form(max_files=0, max_fields=20, max_part_size=MAX_FORM_FIELD)
        except Exception:
            raise ApiError(400, "the form could not be read") from None

    # -- login / logout
    @router.get("/login")
    async def login_form(request: Request, next: str = "/") -> Response:
        if await d.session_principal(request) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        session = d.read_session(request)
        fresh = session is None
        if fresh:
            session = d.codec.anonymous()
        return d.render(request, "login.html", {"next": safe_next(next), "error": None, "username": "",
                                                "csrf": session.csrf}, session=session if fresh else None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        username = str(form.get("username") or "")[:256]
        password = str(form.get("password") or "")[:1024]
        next_path = safe_next(str(form.get("next") or "/"))
        try:
            account = normalize_username(username)
        except UserError:
            account = username.strip().lower()[:64]
        address = client_address(request)
        now = d.clock()
        session = d.read_session(request)

        def refuse(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
            response = d.render(request, "login.html", {"next": next_path, "error": message,
                                                        "username": username}, status_code=status)
            for name, value in (headers or {}).items():
                response.headers[name] = value
            return response

        wait = d.throttle.wait(address, account, now)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            return refuse(f"Too many failed logins. Try again in {seconds} s.", 429, {"Retry-After": str(seconds)})

        def check() -> Any:
            with d.session() as db:
                user = authenticate(db, username, password)
                db.commit()  # the failure count and last login of a known user
                return None if user is None else (user.id, user.username, user.password_hash)

        found = await run_in_threadpool(check)
        if found is None:
            d.throttle.failure(address, account, d.clock())
            # the same words whether the user exists or not: only the attempts made are told
            message = "Wrong username or password."
            if d.throttle.locked_out(address, account, d.clock()):
                message += " After repeated failures this address must wait a while before trying this account again."
            return refuse(message, 401)
        d.throttle.success(address, account)
        if session is not None:
            await d.revoke(session)
        user_id, name, password_hash = found
        response = RedirectResponse(next_path, status_code=303)
        d.set_session_cookie(response, d.codec.login(user_id, name, password_hash))
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        session = d.read_session(request)
        if session is not None:
            await d.revoke(session)
        response = RedirectResponse("/login", status_code=303)
        d.clear_session_cookie(response)
        return response

    # -- pages
    @router.get("/")
    async def board(request: Request) -> Response:
        user = await page_user(request)
        return d.render(request, "board.html", {"user": user, "calls": [c.to_json() for c in d.hub.active()],
                                                "gateways": await d.gateways(),
                                                "redis_ok": d.hub.redis_ok, "nav": "live"})

    @router.get("/calls")
    async def history(request: Request) -> Response:
        user = await page_user(request)
        args = request.query_params
        errors: list[str] = []
        day_from = parse_day(args.get("from"), "from", errors)
        day_to = parse_day(args.get("to"), "to", errors)
        party = (args.get("party") or "").strip()[:200]
        tag = (args.get("tag") or "").strip()[:200]
        q = (args.get("q") or "").strip()[:500]
        status = args.get("status") or ""
        if status not in ("", "live", "ended"):
            errors.append("status: must be live or ended")
            status = ""
        source = args.get("source") or ""
        if source and source not in SOURCE_KINDS:
            errors.append(f"source: must be one of {', '.join(SOURCE_KINDS)}")
            source = ""
        try:
            page_no = max(1, min(int(args.get("page") or 1), 100_000))
        except ValueError:
            page_no = 1
            errors.append("page: not a number")
        if any("\x00" in v for v in (party, tag, q)):
            errors.append("the filters must not contain NUL characters")
            party = tag = q = ""
        since = datetime.combine(day_from, dtime(), timezone.utc) if day_from else None
        until = None
        if day_to:
            try:
                until = datetime.combine(day_to + timedelta(days=1), dtime(), timezone.utc)
            except OverflowError:
                until = None

        def query() -> tuple[Any, dict[str, Any]]:
            with d.session() as db:
                page = list_calls(db, since=since, until=until, party=party or None, tag=tag or None,
                                  status=status or None, text=q or None, source=source or None, limit=PAGE_SIZE,
                                  offset=(page_no - 1) * PAGE_SIZE)
                hits: dict[str, Any] = {}
                if q and search_terms(q) and page.items:
                    ids = {c.call_id for c in page.items}
                    for turn in search_turns(db, q, limit=1000).items:
                        if turn.call_id in ids and turn.call_id not in hits:
                            hits[turn.call_id] = turn
                return page, hits

        page, hits = await run_in_threadpool(query)
        filters = {"from": args.get("from") or "", "to": args.get("to") or "", "party": party, "tag": tag,
                   "q": q, "status": status, "source": source}
        base = {k: v for k, v in filters.items() if v}
        prev_url = "/calls?" + urlencode({**base, "page": page_no - 1}) if page_no > 1 else None
        next_url = "/calls?" + urlencode({**base, "page": page_no + 1}) if page.has_more else None
        return d.render(request, "history.html", {
            "user": user, "nav": "history", "page": page, "hits": hits, "filters": filters, "errors": errors,
            "prev_url": prev_url, "next_url": next_url, "page_no": page_no, "source_kinds": SOURCE_KINDS})

    @router.get("/calls/{call_id}")
    async def call_page(request: Request, call_id: str) -> Response:
        user = await page_user(request)
        if not valid_call_id(call_id):
            raise ApiError(404, "no such call")

        def query() -> Any:
            with d.session() as db:
                return get_call(db, call_id)

        detail = await run_in_threadpool(query)
        live = d.hub.get(call_id)
        if detail is None and live is None:
            # not stored (yet) and not on the board: it may still be in Redis (persister lagging)
            try:
                replay = await d.hub.replay(call_id)
            except ConnectionError:
                replay = []
            if not replay:
                raise ApiError(404, f"no call {call_id!r}: not stored, and not in the live stream")
        is_live = live is not None or (detail is not None and detail.call.status == "live") or detail is None
        return d.render(request, "call.html", {
            "user": user, "nav": "live" if is_live else "history", "call_id": call_id, "detail": detail,
            "live": live.to_json() if live else None, "is_live": is_live, "assist": d.assist is not None})

    @router.get("/try")
    async def try_it(request: Request) -> Response:
        """Talk into the browser's microphone: WebRTC to ``POST /v1/whip``, transcript from the call stream."""
        user = await page_user(request)
        return d.render(request, "try.html", {"user": user, "nav": "try",
                                              "whip": d.settings.api_enabled})

    # -- live streams (server-sent events)
    @router.get("/live/stream")
    async def board_stream(request: Request) -> Response:
        await stream_user(request)
        sub = d.hub.subscribe_board()
        return StreamingResponse(board_events(d.hub, sub, d.keepalive_s, alive=d.stream_alive(request),
                                              recheck_s=d.settings.web_stream_recheck_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/calls/{call_id}/stream")
    async def call_stream(request: Request, call_id: str) -> Response:
        await stream_user(request)
        if not valid_call_id(call_id):
            raise ApiError(404, "no such call")
        last = request.headers.get("last-event-id", "")
        last_seen = int(last) if last.isascii() and last.isdigit() and len(last) <= 12 else 0
        sub = d.hub.subscribe(call_id)
        return StreamingResponse(call_events(d.hub, sub, call_id, last_seen, d.keepalive_s,
                                             alive=d.stream_alive(request),
                                             recheck_s=d.settings.web_stream_recheck_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/calls/{call_id}/assist/stream")
    async def assist_stream(request: Request, call_id: str) -> Response:
        """The call's agent-assist suggestions, then new ones (gateway/web/assist.py)."""
        await stream_user(request)
        if not valid_call_id(call_id) or d.assist is None:
            raise ApiError(404, "no such call")
        return StreamingResponse(d.assist.events(call_id, request.headers.get("last-event-id", ""), d.keepalive_s,
                                                 alive=d.stream_alive(request),
                                                 recheck_s=d.settings.web_stream_recheck_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/calls/{call_id}/recording")
    async def call_recording(request: Request, call_id: str) -> Response:
        """The call's WAV (docs/recordings.md), with Range support so the player can seek; only a
        path the store names inside ``recordings_dir`` is served."""
        await stream_user(request)
        if not valid_call_id(call_id) or not d.settings.recordings_dir:
            raise ApiError(404, "no such recording")

        def query() -> str | None:
            with d.session() as db:
                detail = get_call(db, call_id)
                return detail.call.recording if detail is not None else None

        relative = await run_in_threadpool(query)
        path = resolve(d.settings.recordings_dir, relative) if relative else None
        if path is None or not path.is_file():
            raise ApiError(404, f"no recording of call {call_id!r} (none made, or removed by retention)")
        return FileResponse(path, media_type="audio/wav", filename=path.name, content_disposition_type="inline",
                            headers={"Cache-Control": "private, no-store"})

    return router
