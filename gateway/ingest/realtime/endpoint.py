"""``/v1/realtime``: the Starlette WebSocket edge of :mod:`.protocol`.

A thin loop: authenticate (``Authorization: Bearer``, or the browser SDK's
``openai-insecure-api-key.<token>`` subprotocol), hold a per-token session slot,
then feed each client message to :class:`~.protocol.RealtimeConnection` and carry
out what it returns on the Earshot :class:`~gateway.session.Session`. Leg
observations come from the pipeline on the event loop's thread and go through
the same connection; one sender task writes server events in order.

When the client goes, mid-turn or not, the Earshot session is ended with reason
``client-closed``: the leg finalises the speech it holds and publishes its finals
to Redis before ``call.ended``, so nothing already said is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from ...events import CALL_ENDED, Event, Source
from ...session import LegSpec, Session, SessionLimit
from ..auth import LimitExceeded
from .protocol import (
    LEG,
    Clear,
    Commit,
    EndSession,
    EndTurn,
    FeedNarrow,
    FeedWideband,
    OpenSession,
    Output,
    RealtimeConnection,
    ServerEvent,
)

if TYPE_CHECKING:
    from ...pipeline import LegObservation
    from ..routes import ApiContext

log = logging.getLogger(__name__)

KEY_SUBPROTOCOL = "openai-insecure-api-key."  # how OpenAI's browser clients pass the key
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"

# WebSocket close codes
POLICY_VIOLATION = 1008  # no or bad token
TRY_AGAIN_LATER = 1013  # a session limit
SERVICE_RESTART = 1012  # the gateway is draining


def routes(api: "ApiContext") -> list[BaseRoute]:
    async def realtime(websocket: WebSocket) -> None:
        await serve(api, websocket)

    return [WebSocketRoute("/v1/realtime", realtime)]


def _token_header(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization")
    if header:
        return header
    for proto in websocket.scope.get("subprotocols") or ():
        if proto.startswith(KEY_SUBPROTOCOL) and len(proto) > len(KEY_SUBPROTOCOL):
            return "Bearer " + proto[len(KEY_SUBPROTOCOL):]
    return None


async def serve(api: "ApiContext", websocket: WebSocket) -> None:
    subprotocols = list(websocket.scope.get("subprotocols") or ())
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "").replace(" ", "") \
        or BETA_SUBPROTOCOL in subprotocols
    conn = RealtimeConnection(session_id="sess_" + secrets.token_hex(12), base_turn=api.host.turn_config,
                              query=dict(websocket.query_params), beta=beta, model_name=api.model_name)
    caller = await api.auth.bearer(_token_header(websocket))
    await websocket.accept(subprotocol="realtime" if "realtime" in subprotocols else None)
    if caller is None:
        await _refuse(websocket, conn.error_event(
            "invalid_api_key", "Missing or invalid API key: send an Earshot API token (earshot users token) "
            "as 'Authorization: Bearer <token>'", type="authentication_error"), POLICY_VIOLATION)
        return
    if api.host.draining:
        await _refuse(websocket, conn.error_event("server_shutting_down", "the gateway is shutting down",
                                                  type="server_error"), SERVICE_RESTART)
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(api.limits.hold(caller))
        except LimitExceeded as exc:
            await _refuse(websocket, conn.error_event(
                "session_limit_reached", f"{exc}: close a session and try again",
                type="rate_limit_error"), TRY_AGAIN_LATER)
            return
        log.info("realtime session %s opened by %s (%s dialect)", conn.session_id, caller.username, conn.flavor)
        await _Link(api, websocket, conn).run()
        log.info("realtime session %s closed", conn.session_id)


async def _refuse(websocket: WebSocket, event: ServerEvent, code: int) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_text(event.to_json())
        await websocket.close(code)


class _Close:
    def __init__(self, code: int) -> None:
        self.code = code


class _Link:
    """One connection's loop: client messages in, actions on the sessions, events out."""

    def __init__(self, api: "ApiContext", websocket: WebSocket, conn: RealtimeConnection) -> None:
        self.api = api
        self.ws = websocket
        self.conn = conn
        self.sessions: dict[int, Session] = {}
        self.ending: list[asyncio.Future[None]] = []
        self.ended_by_us: set[int] = set()
        self.queue: asyncio.Queue[ServerEvent | _Close] = asyncio.Queue()
        self.stop = False  # the server closes this connection

    async def run(self) -> None:
        self.send(self.conn.start())
        sender = asyncio.create_task(self._sender(), name=f"realtime-send-{self.conn.session_id}")
        try:
            while not self.stop:
                receiving = asyncio.ensure_future(self.ws.receive())
                done, _ = await asyncio.wait((receiving, sender), return_when=asyncio.FIRST_COMPLETED)
                if receiving not in done:  # the sender stopped: the socket is gone or closing
                    receiving.cancel()
                    break
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                self.execute(self.conn.receive(text if text is not None else message.get("bytes") or b"",
                                               time.monotonic()))
        except Exception:
            log.exception("realtime session %s failed", self.conn.session_id)
        finally:
            self.execute(self.conn.close(time.monotonic()))
            if self.ending:
                # finals of speech cut off by the disconnect reach Redis before call.ended
                await asyncio.gather(*self.ending, return_exceptions=True)
            self.queue.put_nowait(_Close(1000))
            try:
                await asyncio.wait_for(sender, 5)
            except (asyncio.TimeoutError, Exception):
                sender.cancel()

    # -- protocol outputs
    def send(self, events: list[ServerEvent]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    def execute(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, ServerEvent):
                self.queue.put_nowait(output)
            else:
                self._act(output)

    def _act(self, action: Any) -> None:
        if isinstance(action, OpenSession):
            self._open(action)
            return
        session = self.sessions.get(action.generation)
        if session is None:
            return
        if isinstance(action, FeedWideband):
            session.feed_wideband(LEG, action.samples, action.now)
        elif isinstance(action, FeedNarrow):
            session.feed(LEG, action.pcm, action.now)
        elif isinstance(action, Commit):
            self.execute(self.conn.committed(action.generation, session.commit(LEG, action.now)))
        elif isinstance(action, EndTurn):
            session.end_turn(LEG)
        elif isinstance(action, Clear):
            session.clear(LEG)
        elif isinstance(action, EndSession):
            self.ended_by_us.add(action.generation)
            self.ending.append(session.end(action.reason))

    def _open(self, action: OpenSession) -> None:
        generation = action.generation

        def observe(observation: "LegObservation") -> None:
            self.send(self.conn.observe(observation, generation))

        def listen(event: Event) -> None:
            if event.type == CALL_ENDED and generation not in self.ended_by_us:
                self._server_closed(generation)

        try:
            self.sessions[generation] = self.api.host.open(
                Source("realtime", (("session_id", self.conn.session_id),)),
                [LegSpec(LEG, wideband=action.wideband, manual_turns=action.manual_turns)],
                language=action.language, turn_config=action.turn_config, observer=observe, listeners=[listen])
        except SessionLimit as exc:
            message = ("the gateway is shutting down" if exc.reason == "draining"
                       else "the gateway is at its session limit (max_calls): try again later")
            self.send([self.conn.error_event("session_limit_reached" if exc.reason != "draining"
                                             else "server_shutting_down", message,
                                             type="rate_limit_error" if exc.reason != "draining" else "server_error")])
            self.queue.put_nowait(_Close(TRY_AGAIN_LATER if exc.reason != "draining" else SERVICE_RESTART))
            self.stop = True

    def _server_closed(self, generation: int) -> None:
        """The gateway ended the session (drain): tell the client and close."""
        self.ended_by_us.add(generation)
        self.send([self.conn.error_event("server_shutting_down",
                                         "the gateway is shutting down; the session has ended", type="server_error")])
        self.queue.put_nowait(_Close(SERVICE_RESTART))
        self.stop = True

    async def _sender(self) -> None:
        while True:
            item = await self.queue.get()
            if self.ws.application_state != WebSocketState.CONNECTED or \
                    self.ws.client_state != WebSocketState.CONNECTED:
                return
            try:
                if isinstance(item, _Close):
                    await self.ws.close(item.code)
                    return
                await self.ws.send_text(item.to_json())
            except Exception:  # the client is gone
                return
