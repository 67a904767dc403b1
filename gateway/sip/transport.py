"""Thin asyncio edge for the SIP user agent: UDP and TCP on one port.

All protocol decisions live in :class:`~gateway.sip.useragent.UserAgent`;
this module only moves bytes and time.  After anything reaches the user agent
(a datagram, a framed TCP message, a timer, or an application call followed
by :meth:`SipEndpoint.flush`), the endpoint sends the queued transmits,
delivers the queued events, and re-arms one ``loop.call_at`` for the user
agent's next deadline.  The user agent's clock is ``loop.time()``, which is
monotonic.

Robustness: an exception while handling one message or event is logged and
never stops the listener; a TCP peer whose stream cannot be framed gets a 400
when its headers allow it and is disconnected; at most ``max_connections``
TCP connections are open, and one without traffic for ``tcp_idle_timeout``
is closed, so idle peers cannot take every slot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

from gateway.sip.events import Event, MalformedMessage, Peer, Transmit
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.useragent import UserAgent

__all__ = ["SipEndpoint"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.endpoint._incoming(data, Peer("udp", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the transactions' timers cope.
        logger.debug("SIP UDP error: %s", exc)


class _TcpConnection(asyncio.Protocol):
    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint
        self.framer = StreamFramer(endpoint.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.peer = Peer("tcp", "", 0)
        self.closing = False
        self._pongs = 0
        self.last_activity = 0.0  # loop time of the last byte in or out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.last_activity = self.endpoint.now()
        peername = transport.get_extra_info("peername") or ("", 0)
        self.id = self.endpoint._register(self)
        self.peer = Peer("tcp", peername[0], peername[1], self.id)
        if len(self.endpoint._connections) > self.endpoint.max_connections:
            logger.warning("SIP TCP: too many connections, refusing %s:%s", *peername[:2])
            self.close()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.endpoint.now()
        error: FramingError | None = None
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            messages, error = exc.messages, exc
        if self.framer.pings > self._pongs:  # RFC 5626 4.4.1: CRLF pong per CRLFCRLF ping
            self.write(b"\r\n" * (self.framer.pings - self._pongs))
            self._pongs = self.framer.pings
        for message in messages:
            self.endpoint._incoming(message, self.peer)
        if error is not None:
            logger.info("SIP TCP %s:%s: %s; closing", self.peer.host, self.peer.port, error.reason)
            self.endpoint._stream_error(error, self.peer)
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.last_activity = self.endpoint.now()
            self.transport.write(data)

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()  # flushes what was written first

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.endpoint._unregister(self)


class SipEndpoint:
    """UDP and TCP listeners feeding one :class:`UserAgent`.

    ``on_event`` receives every user-agent event; it may call the user
    agent's methods and then :meth:`flush` (re-entrant calls are fine).
    """

    def __init__(self, ua: UserAgent, on_event: Callable[[Event], None]) -> None:
        self.ua = ua
        self.on_event = on_event
        self.messages_in = 0
        self.messages_out = 0
        self.malformed = 0
        self.idle_closed = 0  # TCP connections closed for idleness
        self.max_connections = 1024
        self.max_message_bytes = 65536
        # TCP connections with no byte in or out for this long are closed (0: never). Peers
        # reconnect as RFC 3261 18 expects, and the user agent sends in-dialog requests of a
        # closed connection's dialogs to the remote target; trunks that keep the connection
        # with CRLF or OPTIONS keep-alives are never idle that long.
        self.tcp_idle_timeout = 0.0
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _TcpConnection] = {}
        self._ids = itertools.count(1)
        self._connecting: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    # -- life cycle ---------------------------------------------------------

    async def start(self, host: str = "0.0.0.0", port: int = 5060, *, udp: bool = True, tcp: bool = True) -> None:
        """Bind UDP and/or TCP on ``host:port`` (port 0: any free port, the
        same one for both)."""
        if not (udp or tcp):
            raise ValueError("SipEndpoint.start needs udp or tcp")
        self._loop = asyncio.get_running_loop()
        attempts = 20 if port == 0 and udp and tcp else 1
        for attempt in range(attempts):
            try:
                bound = port
                if udp:
                    transport, _ = await self._loop.create_datagram_endpoint(
                        lambda: _UdpProtocol(self), local_addr=(host, port)
                    )
                    self._udp = transport
                    bound = transport.get_extra_info("sockname")[1]
                if tcp:
                    self._server = await self._loop.create_server(
                        lambda: _TcpConnection(self), host, bound, reuse_address=True
                    )
                    self._schedule_idle_sweep()
                return
            except OSError:
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
                if attempt == attempts - 1:
                    raise

    @property
    def udp_port(self) -> int:
        return self._udp.get_extra_info("sockname")[1] if self._udp is not None else 0

    @property
    def tcp_port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _schedule_idle_sweep(self) -> None:
        if self.tcp_idle_timeout > 0 and self._loop is not None and not self._closed:
            interval = min(30.0, max(0.05, self.tcp_idle_timeout / 4))
            self._idle_sweep = self._loop.call_later(interval, self._close_idle)

    def _close_idle(self) -> None:
        """Close TCP connections idle for ``tcp_idle_timeout``: an idle connection per
        peer otherwise stays open forever and, multiplied, takes every slot."""
        deadline = self.now() - self.tcp_idle_timeout
        for conn in list(self._connections.values()):
            if not conn.closing and conn.last_activity < deadline:
                logger.info("SIP TCP %s:%s: idle for %.0f s, closing", conn.peer.host, conn.peer.port,
                            self.tcp_idle_timeout)
                self.idle_closed += 1
                conn.close()
        self._schedule_idle_sweep()

    async def close(self) -> None:
        self._closed = True
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
            self._idle_sweep = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._udp is not None:
            self._udp.close()
        for conn in list(self._connections.values()):
            conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the user agent's edge ----------------------------------------------

    def flush(self) -> None:
        """Send queued transmits, deliver queued events, re-arm the timer."""
        if self._closed or self._loop is None:
            return
        for transmit in self.ua.take_transmits():
            try:
                self._transmit(transmit)
            except Exception:
                logger.exception("SIP: failed to send to %s", transmit.peer)
        for event in self.ua.take_events():
            if isinstance(event, MalformedMessage):
                self.malformed += 1
            try:
                self.on_event(event)
            except Exception:
                logger.exception("SIP: event handler failed on %s", type(event).__name__)
        self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        at = self.ua.next_timer()
        if at == self._timer_at and (at is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, at
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._timer, self._timer_at = None, None
        try:
            self.ua.handle_timers(self._loop.time())
        except Exception:
            logger.exception("SIP: timer handling failed")
        self.flush()

    def _incoming(self, data: bytes, peer: Peer) -> None:
        if self._closed or self._loop is None:
            return
        if data.strip(b"\r\n"):
            self.messages_in += 1
        try:
            self.ua.receive(data, peer, self._loop.time())
        except Exception:
            logger.exception("SIP: receive failed")
        self.flush()

    def _stream_error(self, error: FramingError, peer: Peer) -> None:
        self.ua.stream_error(error.head, error.reason, peer)
        self.flush()

    # -- sending --------------------------------------------------------------

    def _transmit(self, transmit: Transmit) -> None:
        peer, data = transmit.peer, transmit.data
        self.messages_out += 1
        if peer.transport == "udp":
            if self._udp is None:
                logger.warning("SIP: UDP disabled, dropping message to %s:%s", peer.host, peer.port)
            elif _is_ip(peer.host):
                self._udp.sendto(data, (peer.host, peer.port))
            else:
                self._spawn(self._resolve_and_send(data, peer))
            return
        conn = self._connections.get(peer.connection) if peer.connection is not None else None
        if conn is not None and not conn.closing:
            conn.write(data)
            return
        # The connection is gone (or the target differs): reuse one to the
        # same address, or open a new one (RFC 3261 18.2.2, 18.1.1).
        for other in self._connections.values():
            if not other.closing and (other.peer.host, other.peer.port) == (peer.host, peer.port):
                other.write(data)
                return
        key = (peer.host, peer.port)
        if key in self._connecting:
            self._connecting[key].append(data)
            return
        self._connecting[key] = [data]
        self._spawn(self._connect(key))

    async def _resolve_and_send(self, data: bytes, peer: Peer) -> None:
        assert self._loop is not None
        try:
            infos = await self._loop.getaddrinfo(peer.host, peer.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            logger.warning("SIP: cannot resolve %s: %s", peer.host, exc)
            return
        if self._udp is not None and infos:
            self._udp.sendto(data, infos[0][4][:2])

    async def _connect(self, key: tuple[str, int]) -> None:
        assert self._loop is not None
        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(lambda: _TcpConnection(self), key[0], key[1]), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError) as exc:
            dropped = self._connecting.pop(key, [])
            logger.warning("SIP TCP: cannot connect to %s:%s (%s); %d message(s) dropped", *key, exc, len(dropped))
            return
        for data in self._connecting.pop(key, []):
            conn.write(data)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connection bookkeeping ----------------------------------------------

    def _register(self, conn: _TcpConnection) -> int:
        conn_id = next(self._ids)
        self._connections[conn_id] = conn
        return conn_id

    def _unregister(self, conn: _TcpConnection) -> None:
        if self._connections.pop(conn.id, None) is None:
            return
        if self._closed:
            return
        try:
            self.ua.connection_lost(conn.id)
        except Exception:
            logger.exception("SIP: connection_lost failed")
        self.flush()
