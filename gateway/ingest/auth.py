"""Who may use the streaming and REST APIs, and how many sessions each may hold.

Every API takes the dashboard's API tokens (``earshot users token``) as
``Authorization: Bearer <token>``; the browser's "Try it" page may use its login
session instead. :class:`SessionLimits` counts open sessions per token (the
gateway's ``max_calls`` bounds them all, SIP calls included).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from ..config import Settings

#: the principal of every request when ``api_auth`` is off (tests, a trusted laptop)
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    """An authenticated API user: who, and under which credential (for the per-token limit)."""

    username: str
    credential: str  # "token:<digest prefix>", "session:<user id>" or ANONYMOUS


class LimitExceeded(Exception):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} session limit reached ({limit})")
        self.scope = scope  # "token" or "gateway"
        self.limit = limit


class ApiAuth:
    """Checks bearer tokens (and dashboard sessions) against the user store."""

    def __init__(self, settings: "Settings", dashboard: object | None = None) -> None:
        self.settings = settings
        self.required = settings.api_auth
        self._dashboard = dashboard
        self._sessionmaker = None

    def _verify(self, token: str) -> Caller | None:
        from ..store.users import token_digest, verify_token

        if self._sessionmaker is None:
            from ..store.db import make_engine, make_sessionmaker

            self._sessionmaker = make_sessionmaker(make_engine(self.settings.database_url))
        with self._sessionmaker() as db:
            user = verify_token(db, token)
            if user is None:
                return None
            caller = Caller(user.username, "token:" + token_digest(token)[:16])
            db.commit()  # last_used_at
            return caller

    async def bearer(self, authorization: str | None) -> Caller | None:
        """The caller of an ``Authorization`` header; None when missing or not a valid token."""
        if not self.required:
            return Caller(ANONYMOUS, ANONYMOUS)
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return await self.token(token.strip())

    async def token(self, token: str) -> Caller | None:
        if not self.required:
            return Caller(ANONYMOUS, ANONYMOUS)
        try:
            return await run_in_threadpool(self._verify, token)
        except Exception:  # the store is unreachable: nobody is let in, nothing crashes
            return None

    async def connection(self, conn: "HTTPConnection") -> Caller | None:
        """Bearer token, else (for the browser pages) the dashboard login session."""
        caller = await self.bearer(conn.headers.get("authorization"))
        if caller is not None or self._dashboard is None:
            return caller
        principal = await self._dashboard.session_principal(conn)  # type: ignore[attr-defined]
        if principal is None:
            return None
        return Caller(principal.username, f"session:{principal.user_id}")


class SessionLimits:
    """Open API sessions per credential, at most ``per_token`` each."""

    def __init__(self, per_token: int) -> None:
        self.per_token = per_token
        self._open: dict[str, int] = {}

    def open_count(self, caller: Caller) -> int:
        return self._open.get(caller.credential, 0)

    @contextlib.contextmanager
    def hold(self, caller: Caller) -> Iterator[None]:
        """One session slot for ``caller`` while the block runs; LimitExceeded when none is left."""
        count = self._open.get(caller.credential, 0)
        if count >= self.per_token:
            raise LimitExceeded("token", self.per_token)
        self._open[caller.credential] = count + 1
        try:
            yield
        finally:
            left = self._open[caller.credential] - 1
            if left:
                self._open[caller.credential] = left
            else:
                del self._open[caller.credential]
