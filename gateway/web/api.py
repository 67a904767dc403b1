"""The JSON API behind the pages: calls, one call, search, live calls.

Authenticated by an API token (``Authorization: Bearer <token>``, from
``earshot users token``) or by the dashboard's own session cookie (its
JavaScript). Errors are JSON ``{"detail": "..."}``; a 422 also lists
``errors`` with the ``field`` at fault. Every list is paged with limit/offset
and reports its total.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
parameter annotations, some of which are local to :func:`api_router`.
"""

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..events import SOURCE_KINDS
from ..store.models import Call, Dtmf, Turn
from ..store.queries import get_call, list_calls
from ..store.search import search_turns
from ..store.users import list_users
from .auth import Principal
from .live import LiveCall

if TYPE_CHECKING:
    from .app import Dashboard

MAX_PAGE = 200
MAX_OFFSET = 1_000_000_000
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refuse it with a 422, not a 500


class ErrorOut(BaseModel):
    detail: str = Field(description="what is wrong, in words")


class FieldError(BaseModel):
    field: str
    # "in" is a Python keyword: aliased
    location: str = Field(alias="in")
    message: str


class ValidationErrorOut(BaseModel):
    detail: str = Field(description="the first problem, naming its field")
    errors: list[FieldError]


class CallSummary(BaseModel):
    call_id: str
    source_kind: Literal[SOURCE_KINDS] = Field(  # type: ignore[valid-type]
        description="where the session's audio came from (docs/events.md, `source`)")
    sip_call_id: str = Field(description="the SIP Call-ID; empty for sessions from other sources")
    from_uri: str = Field(description="SIP URI of the From header; empty for sessions from other sources")
    to_uri: str = Field(description="SIP URI of the To header; empty for sessions from other sources")
    from_user: str
    to_user: str
    tags: list[str]
    dialplan_rule: str | None
    status: Literal["live", "ended"]
    started_at: datetime
    ended_at: datetime | None
    duration_ms: int | None
    end_reason: str | None
    turn_count: int
    dtmf_count: int
    codec: str | None


class CallList(BaseModel):
    items: list[CallSummary]
    total: int
    limit: int
    offset: int
    has_more: bool


class TurnOut(BaseModel):
    leg: str
    turn: int
    start_ms: int
    end_ms: int
    final: bool
    text: str = Field(description="the final text, or the latest partial while the turn is live")
    reason: str | None
    language: str | None
    avg_logprob: float | None
    no_speech_prob: float | None
    compression_ratio: float | None
    error: str | None


class DtmfOut(BaseModel):
    leg: str
    digit: str
    offset_ms: int
    duration_ms: int


class CallDetailOut(CallSummary):
    source_ids: dict[str, str] = Field(description="the source's own ids (a Twilio callSid, a file name...)")
    legs: list[str]
    language: str | None
    transport: str | None
    rtp: dict[str, Any] | None
    turns: list[TurnOut]
    dtmf: list[DtmfOut]


class SearchHit(BaseModel):
    call: CallSummary
    leg: str
    turn: int
    start_ms: int
    end_ms: int
    text: str


class SearchResults(BaseModel):
    query: str
    items: list[SearchHit]
    total: int
    limit: int
    offset: int
    has_more: bool


class LiveCallOut(BaseModel):
    call_id: str
    source_kind: Literal[SOURCE_KINDS]  # type: ignore[valid-type]
    source_ids: dict[str, str]
    from_uri: str
    to_uri: str
    tags: list[str]
    started_at: str = Field(description="answer time, ISO 8601 UTC")
    latest_text: str
    latest_partial: bool = Field(description="latest_text is an interim partial")
    turns: int


class LiveOut(BaseModel):
    redis: Literal["ok", "unreachable"]
    calls: list[LiveCallOut]


class UserOut(BaseModel):
    username: str
    role: str
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


class MeOut(BaseModel):
    username: str
    role: str
    via: Literal["session", "token"]


def call_summary(call: Call) -> CallSummary:
    return CallSummary(
        call_id=call.call_id, source_kind=source_kind(call), sip_call_id=call.sip_call_id or "",
        from_uri=call.from_uri or "",
        to_uri=call.to_uri or "", from_user=call.from_user or "", to_user=call.to_user or "",
        tags=list(call.tags or []), dialplan_rule=call.dialplan_rule,
        status="ended" if call.status == "ended" else "live", started_at=call.started_at, ended_at=call.ended_at,
        duration_ms=call.duration_ms, end_reason=call.end_reason, turn_count=call.turn_count or 0,
        dtmf_count=call.dtmf_count or 0, codec=call.codec)


def source_kind(call: Call) -> str:
    return call.source_kind if call.source_kind in SOURCE_KINDS else "sip"


def turn_out(turn: Turn) -> TurnOut:
    return TurnOut(leg=turn.leg, turn=turn.turn, start_ms=turn.start_ms, end_ms=turn.end_ms, final=turn.final,
                   text=turn.display_text, reason=turn.reason, language=turn.language,
                   avg_logprob=turn.avg_logprob, no_speech_prob=turn.no_speech_prob,
                   compression_ratio=turn.compression_ratio, error=turn.error)


def dtmf_out(d: Dtmf) -> DtmfOut:
    return DtmfOut(leg=d.leg, digit=d.digit, offset_ms=d.offset_ms, duration_ms=d.duration_ms)


def live_out(call: LiveCall) -> LiveCallOut:
    data = call.to_json()
    return LiveCallOut(call_id=call.call_id, source_kind=call.source_kind, source_ids=call.source_ids,
                       from_uri=call.from_uri, to_uri=call.to_uri, tags=call.tags,
                       started_at=data["started_at"], latest_text=call.latest_text,
                       latest_partial=call.latest_partial, turns=call.turns)


def utc_or_422(value: datetime | None, name: str) -> datetime | None:
    """A datetime in UTC (naive ones are taken as UTC); out-of-range offsets are the caller's error."""
    from .app import ApiError

    if value is None:
        return None
    try:
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ApiError(422, f"{name}: date out of range") from None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no, or an invalid, API token or session"},
    422: {"model": ValidationErrorOut, "description": "a parameter is invalid; `errors[].field` names it"},
    503: {"model": ErrorOut, "description": "the transcript database is unavailable"},
}


def api_router(dashboard: "Dashboard") -> APIRouter:
    from .app import ApiError

    bearer = HTTPBearer(auto_error=False, description="an API token from `earshot users token`")

    async def principal(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        header = request.headers.get("authorization")
        if header is not None:
            if credentials is None or not credentials.credentials.strip():
                raise ApiError(401, "the Authorization header must be 'Bearer <token>'",
                               {"WWW-Authenticate": "Bearer"})
            found = await dashboard.token_principal(credentials.credentials.strip())
            if found is None:
                raise ApiError(401, "invalid or revoked API token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return found
        found = await dashboard.session_principal(request)
        if found is None:
            raise ApiError(401, "authentication required: send 'Authorization: Bearer <token>' "
                                "(see `earshot users token`) or log in", {"WWW-Authenticate": "Bearer"})
        return found

    Auth = Annotated[Principal, Depends(principal)]
    Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")]
    Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]

    router = APIRouter(prefix="/api", tags=["api"], responses=ERRORS)

    @router.get("/calls", response_model=CallList, summary="Calls, newest first, filtered")
    async def calls(
        who: Auth,
        since: Annotated[datetime | None, Query(description="answered at or after (ISO 8601; UTC if no offset)")] = None,
        until: Annotated[datetime | None, Query(description="answered before (ISO 8601; UTC if no offset)")] = None,
        party: Annotated[str | None, Query(max_length=200, pattern=NO_NUL,
                                           description="substring of the From or To URI (a number, a name)")] = None,
        tag: Annotated[str | None, Query(max_length=200, pattern=NO_NUL, description="exact dialplan tag")] = None,
        status: Annotated[Literal["live", "ended"] | None, Query(description="live or ended")] = None,
        source: Annotated[Literal[SOURCE_KINDS] | None,  # type: ignore[valid-type]
                          Query(description="kind of source: " + ", ".join(SOURCE_KINDS))] = None,
        q: Annotated[str | None, Query(max_length=500, pattern=NO_NUL,
                                       description="words that must occur in one final turn")] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> CallList:
        since_utc, until_utc = utc_or_422(since, "since"), utc_or_422(until, "until")

        def query() -> CallList:
            with dashboard.session() as db:
                page = list_calls(db, since=since_utc, until=until_utc, party=party, tag=tag, status=status,
                                  text=q, source=source, limit=limit, offset=offset)
                return CallList(items=[call_summary(c) for c in page.items], total=page.total, limit=page.limit,
                                offset=page.offset, has_more=page.has_more)

        return await run_in_threadpool(query)

    @router.get("/calls/{call_id}", response_model=CallDetailOut, summary="One call with its turns and digits",
                responses={404: {"model": ErrorOut, "description": "no such call stored"}})
    async def call(who: Auth, call_id: Annotated[str, Path(max_length=64, pattern=NO_NUL)]) -> CallDetailOut:
        def query() -> CallDetailOut | None:
            with dashboard.session() as db:
                detail = get_call(db, call_id)
                if detail is None:
                    return None
                c = detail.call
                return CallDetailOut(**call_summary(c).model_dump(), source_ids=c.source_id_map, legs=detail.legs,
                                     language=c.language,
                                     transport=c.transport, rtp=c.rtp_stats,
                                     turns=[turn_out(t) for t in detail.turns], dtmf=[dtmf_out(d) for d in detail.dtmf])

        found = await run_in_threadpool(query)
        if found is None:
            raise ApiError(404, f"no call {call_id!r} is stored")
        return found

    @router.get("/search", response_model=SearchResults, summary="Final turns whose text has every word of q")
    async def search(
        who: Auth,
        q: Annotated[str, Query(min_length=1, max_length=500, pattern=NO_NUL, description="words to find")],
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> SearchResults:
        def query() -> SearchResults:
            with dashboard.session() as db:
                page = search_turns(db, q, limit=limit, offset=offset)
                items = [SearchHit(call=call_summary(t.call), leg=t.leg, turn=t.turn, start_ms=t.start_ms,
                                   end_ms=t.end_ms, text=t.text or "") for t in page.items]
                return SearchResults(query=q, items=items, total=page.total, limit=page.limit, offset=page.offset,
                                     has_more=page.has_more)

        return await run_in_threadpool(query)

    @router.get("/live", response_model=LiveOut, summary="Calls up now (from the live event stream)")
    async def live(who: Auth) -> LiveOut:
        return LiveOut(redis="ok" if dashboard.hub.redis_ok else "unreachable",
                       calls=[live_out(c) for c in dashboard.hub.active()])

    @router.get("/me", response_model=MeOut, summary="Who the credentials belong to")
    async def me(who: Auth) -> MeOut:
        return MeOut(username=who.username, role=who.role, via=who.via)  # type: ignore[arg-type]

    @router.get("/users", response_model=list[UserOut], summary="Dashboard users (admins only)",
                responses={403: {"model": ErrorOut, "description": "not an admin"}})
    async def users(who: Auth) -> list[UserOut]:
        if not who.is_admin:
            raise ApiError(403, f"user {who.username!r} is a {who.role}; listing users needs the admin role")

        def query() -> list[UserOut]:
            with dashboard.session() as db:
                return [UserOut(username=u.username, role=u.role, disabled=u.disabled, created_at=u.created_at,
                                last_login_at=u.last_login_at) for u in list_users(db)]

        return await run_in_threadpool(query)

    return router
