"""The WebSocket edge of Twilio Media Streams at ``/twilio/media``.

It moves messages between the socket and :class:`~.protocol.TwilioStream` and the
stream's actions into a :class:`~gateway.session.Session`; what a message means
is decided there, not here.

Twilio cannot send an ``Authorization`` header on a stream, so the socket is
accepted at once and nothing is transcribed until the ``start`` message has
authenticated it, by either

* an Earshot API token in a TwiML ``<Parameter name="token" value="...">``
  (it arrives in ``start.customParameters``; it is never published), or
* Twilio's ``X-Twilio-Signature`` on the upgrade request, checked with the
  account's auth token (setting ``twilio_auth_token``).

Refusals close the socket with the WebSocket close code a client can act on:
1008 (policy: no or bad credential), 1013 (try again later: a session limit),
1003 (a media format other than mu-law 8 kHz), 1001 (the gateway is draining).
Bad messages are logged and counted and the stream goes on: Twilio has no way to
receive an error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import TYPE_CHECKING

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from ...events import Source
from ...session import LegSpec, Session, SessionLimit
from ..auth import Caller, LimitExceeded
from . import signature
from .protocol import (Action, LegAudio, LegDtmf, MarkReceived, ProtocolError, StreamStarted, StreamStopped,
                       TwilioStream)

if TYPE_CHECKING:
    from ..routes import ApiContext

log = logging.getLogger("gateway.ingest.twilio")

PATH = "/twilio/media"
#: the ``<Parameter>`` names Earshot reads; the others are ignored (and never published)
TOKEN_PARAMETER = "token"
TAGS_PARAMETER = "tags"
LANGUAGE_PARAMETER = "language"
#: a socket that has not sent ``start`` by then is closed (Twilio sends it at once)
START_TIMEOUT_S = 10.0
#: errors of one code logged per stream; the rest are counted (and summed up at the end)
LOGGED_PER_CODE = 5
#: the credential all signature-authenticated streams share for the per-token limit
SIGNATURE_CREDENTIAL = "twilio-signature"

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013

_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_TAG = re.compile(r"^[\w.:@/-]{1,64}$")


def routes(api: "ApiContext") -> list[WebSocketRoute]:
    async def endpoint(websocket: WebSocket) -> None:
        await MediaStreamConnection(api, websocket).run()

    return [WebSocketRoute(PATH, endpoint, name="twilio-media")]


class _Closed(Exception):
    """The stream is over (the socket closed, or we closed it)."""


class MediaStreamConnection:
    def __init__(self, api: "ApiContext", websocket: WebSocket) -> None:
        self.api = api
        self.ws = websocket
        self.stream = TwilioStream()
        self.session: Session | None = None
        self.label = websocket.client.host if websocket.client else "?"
        self._logged: Counter[str] = Counter()
        self.signed: bool | None = None  # None: no X-Twilio-Signature header

    async def run(self) -> None:
        await self.ws.accept()
        self.signed = self._check_signature()
        try:
            started = await self._until_start()
            if started is None:
                return
            caller = await self._authenticate(started)
            if caller is None:
                return
            try:
                with self.api.limits.hold(caller):
                    await self._transcribe(started, caller)
            except LimitExceeded as exc:
                log.warning("twilio stream %s (%s): refused, %s", started.stream_sid, caller.username, exc)
                await self._close(CLOSE_TRY_LATER, f"{exc.scope} session limit reached")
        finally:
            self._summary()

    # -- before start
    def _check_signature(self) -> bool | None:
        header = self.ws.headers.get("x-twilio-signature")
        if header is None:
            return None
        token = self.api.settings.twilio_auth_token
        if not token:
            return False
        scope = self.ws.scope
        query = scope.get("query_string", b"").decode("latin-1")
        candidates = signature.candidate_urls(scope.get("scheme", "ws"), self.ws.headers, scope.get("path", PATH),
                                              query)
        return signature.valid(token, header, candidates)

    async def _until_start(self) -> StreamStarted | None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(self._receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("twilio stream from %s: no start message within %.0f s, closed", self.label,
                            START_TIMEOUT_S)
                await self._close(CLOSE_POLICY, "no start message")
                return None
            except _Closed:
                return None
            started: StreamStarted | None = None
            for action in self.stream.receive(message, time.monotonic()):
                if isinstance(action, StreamStarted):
                    started = action
                elif isinstance(action, ProtocolError):
                    self._error(action)
                    if action.fatal:
                        await self._close(CLOSE_UNSUPPORTED, action.code)
                        return None
            if started is not None:
                return started
            if self.stream.stopped:
                await self._close(CLOSE_NORMAL, "stopped")
                return None

    async def _authenticate(self, started: StreamStarted) -> Caller | None:
        auth = self.api.auth
        token = started.parameter(TOKEN_PARAMETER)
        caller: Caller | None
        if not auth.required:
            caller = await auth.token(token)
        elif token:
            caller = await auth.token(token)
            if caller is None:
                log.warning("twilio stream %s (call %s) from %s: refused, the token parameter is not a valid API "
                            "token", started.stream_sid, started.call_sid, self.label)
        elif self.signed:
            caller = Caller(f"twilio:{started.account_sid or '?'}", SIGNATURE_CREDENTIAL)
        else:
            caller = None
            why = ("X-Twilio-Signature does not match (check twilio_auth_token and the public URL)"
                   if self.signed is False else "no token parameter and no X-Twilio-Signature")
            log.warning("twilio stream %s (call %s) from %s: refused, %s", started.stream_sid, started.call_sid,
                        self.label, why)
        if caller is None:
            await self._close(CLOSE_POLICY, "unauthorized")
        return caller

    # -- the session
    async def _transcribe(self, started: StreamStarted, caller: Caller) -> None:
        ids = (("call_sid", started.call_sid), ("stream_sid", started.stream_sid),
               ("account_sid", started.account_sid))
        source = Source("twilio", tuple((name, value) for name, value in ids if value))
        try:
            session = self.api.host.open(source, [LegSpec(leg) for leg in started.legs],
                                         language=self._language(started), tags=self._tags(started))
        except SessionLimit as exc:
            log.warning("twilio stream %s: refused, gateway %s", started.stream_sid, exc.reason)
            await self._close(CLOSE_TRY_LATER, "gateway at capacity" if exc.reason == "capacity" else exc.reason)
            return
        except Exception:
            log.exception("twilio stream %s: could not open a session", started.stream_sid)
            await self._close(CLOSE_INTERNAL, "internal error")
            return
        self.session = session
        log.info("twilio stream %s (call %s, %s) from %s: session %s, legs %s", started.stream_sid,
                 started.call_sid, caller.username, self.label, session.id, ",".join(started.legs))
        reason = "client-closed"
        try:
            while True:
                if session.ended:  # the gateway ended it (drain)
                    reason = session.end_reason or "shutdown"
                    await self._close(CLOSE_GOING_AWAY, "gateway shutting down")
                    break
                try:
                    message = await self._receive()
                except _Closed:
                    self._apply(self.stream.close(), session)
                    break
                stopped = self._apply(self.stream.receive(message, time.monotonic()), session)
                if stopped is not None:
                    reason = stopped
                    await self._close(CLOSE_NORMAL, "stopped")
                    break
        finally:
            # finalise open speech on both legs and publish it, whoever ended the stream
            await asyncio.shield(session.end(reason))

    def _apply(self, actions: list[Action], session: Session) -> str | None:
        """Carry out the actions; the end reason once the stream is over."""
        now = time.monotonic()
        for action in actions:
            if isinstance(action, LegAudio):
                session.feed(action.leg, action.pcm, now)
            elif isinstance(action, LegDtmf):
                session.dtmf(action.leg, action.digit, 0, now)  # Twilio reports no duration
            elif isinstance(action, ProtocolError):
                self._error(action)
            elif isinstance(action, StreamStopped):
                return action.reason
            elif isinstance(action, MarkReceived):
                log.debug("twilio stream %s: mark %r", session.source.get("stream_sid"), action.name)
        return None

    @staticmethod
    def _language(started: StreamStarted) -> str | None:
        language = started.parameter(LANGUAGE_PARAMETER).strip().lower()
        return language if _LANGUAGE.match(language) else None

    @staticmethod
    def _tags(started: StreamStarted) -> tuple[str, ...]:
        raw = started.parameter(TAGS_PARAMETER)
        tags = [t.strip() for t in raw.split(",") if t.strip()]
        return tuple(dict.fromkeys(t for t in tags if _TAG.match(t)))[:16]

    # -- the socket
    async def _receive(self) -> str | bytes:
        if self.ws.client_state != WebSocketState.CONNECTED:
            raise _Closed
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed
        text = message.get("text")
        if text is not None:
            return text
        return message.get("bytes") or b""

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.client_state == WebSocketState.CONNECTED and self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await self.ws.close(code, reason)
            except Exception:  # the peer went away first
                pass

    def _error(self, error: ProtocolError) -> None:
        self._logged[error.code] += 1
        if self._logged[error.code] <= LOGGED_PER_CODE:
            sid = self.stream.started.stream_sid if self.stream.started else f"from {self.label}"
            log.warning("twilio stream %s: %s: %s", sid, error.code, error.message)

    def _summary(self) -> None:
        stats = self.stream.stats
        if self.stream.started is None and not stats.errors:
            return
        sid = self.stream.started.stream_sid if self.stream.started else f"from {self.label}"
        legs = ", ".join(f"{leg} {t.fed / 8000:.1f} s ({t.filled / 8000:.1f} s gap fill)"
                         for leg, t in self.stream.legs.items())
        errors = ", ".join(f"{code} x{n}" for code, n in sorted(stats.errors.items())) or "none"
        log.info("twilio stream %s closed: %d messages, %d media; %s; errors: %s", sid, stats.messages,
                 stats.media, legs or "no legs", errors)
