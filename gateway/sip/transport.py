"""Thin asyncio edge for the SIP user agent: UDP and TCP on one port, TLS on another.

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
TCP connections are open, at most ``max_connections_per_ip`` of them from one
IP address (so one peer cannot take every slot), and one without traffic for
``tcp_idle_timeout`` is closed, so idle peers cannot hold slots either.

TLS (RFC 3261 26.2) reuses the TCP connection and its framing: an accepted
connection is counted against both caps *before* its handshake (our own
accept loop, then ``connect_accepted_socket``), so a flood of unfinished
handshakes is bounded like any other connection, and a handshake gets
``TLS_HANDSHAKE_TIMEOUT``.  Messages from a TLS connection carry
``Peer.transport == "tls"``; responses go back on it.  A trunk that must
present a client certificate (``client_cert_required(host)``) is
disconnected right after the handshake when it presented none (an invalid
one already fails the handshake).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from gateway.sip.events import Event, MalformedMessage, Peer, Transmit
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.useragent import UserAgent

__all__ = ["SipEndpoint"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 10.0
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections


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
    """One TCP or TLS connection (for TLS, made once the handshake is done).
    ``accepted``: a connection to our TCP port, admitted by the caps here
    (TLS connections are admitted before their handshake, in the accept loop)."""

    def __init__(self, endpoint: SipEndpoint, kind: str = "tcp", *, accepted: bool = False) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.accepted = accepted
        self.framer = StreamFramer(endpoint.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.ip = ""  # the peer's address, as counted against max_connections_per_ip
        self.peer = Peer(kind, "", 0)
        self.closing = False
        self.client_cert = False  # TLS: the peer presented a certificate our CA file verified
        self._pongs = 0
        self.last_activity = 0.0  # loop time of the last message or ping in, or write out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.last_activity = self.endpoint.now()
        peername = transport.get_extra_info("peername") or ("", 0)
        if self.accepted and not self.endpoint._admit(peername[0], peername[1]):
            self.closing = True
            transport.abort()
            return
        self.id = self.endpoint._register(self)
        self.peer = Peer(self.kind, peername[0], peername[1], self.id)
        if self.kind == "tls":
            ssl_object = transport.get_extra_info("ssl_object")
            # getpeercert() is non-empty only for a certificate the context verified
            self.client_cert = bool(ssl_object is not None and ssl_object.getpeercert())
            required = self.endpoint.client_cert_required
            if not self.client_cert and required is not None and required(self.peer.host):
                logger.warning("SIP TLS %s:%s: no client certificate, which its trunk requires; closing",
                               self.peer.host, self.peer.port)
                self.endpoint.tls_handshake_failures += 1
                self.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:  # refused or being closed: what it still sends is not read
            return
        error: FramingError | None = None
        activity = self.framer.activity
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            messages, error = exc.messages, exc
        if self.framer.activity != activity:  # a message or a ping, not just any byte, keeps it open
            self.last_activity = self.endpoint.now()
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
        if self.id:
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
        self.refused_connections = 0  # over max_connections or max_connections_per_ip
        self.tls_handshake_failures = 0  # failed handshakes and trunks without a required client certificate
        self.max_connections = 1024
        self.max_connections_per_ip = 32
        # TLS: host -> does its trunk require a client certificate? (None: no trunk does)
        self.client_cert_required: Callable[[str], bool] | None = None
        # our TLS connections (e.g. a BYE after the caller's connection dropped) verify the peer with this
        self.tls_client_context: ssl.SSLContext | None = None
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
        self._tls_socket: socket.socket | None = None
        self._tls_accept: asyncio.Task[None] | None = None
        self._handshaking: dict[str, int] = {}  # TLS connections admitted, handshake not done, per IP
        self._connections: dict[int, _TcpConnection] = {}
        self._per_ip: dict[str, int] = {}
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0
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
                        lambda: _TcpConnection(self, accepted=True), host, bound, reuse_address=True
                    )
                    self._schedule_idle_sweep()
                return
            except OSError:
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
                if attempt == attempts - 1:
                    raise

    async def start_tls(self, context: ssl.SSLContext, host: str = "0.0.0.0", port: int = 5061) -> None:
        """Listen for SIP over TLS on ``host:port`` (port 0: any free port).

        Our own accept loop rather than ``create_server(ssl=)``: the caps are
        checked on the peer's address before a handshake is spent on it, and
        a connection in its handshake holds its slot like any other."""
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        sock.setblocking(False)
        self._tls_socket = sock
        self._tls_accept = self._loop.create_task(self._accept_tls(sock, context))
        if self._idle_sweep is None:
            self._schedule_idle_sweep()

    @property
    def tls_port(self) -> int:
        return int(self._tls_socket.getsockname()[1]) if self._tls_socket is not None else 0

    async def _accept_tls(self, listener: socket.socket, context: ssl.SSLContext) -> None:
        assert self._loop is not None
        while not self._closed:
            try:
                sock, addr = await self._loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                logger.warning("SIP TLS: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if not self._admit(addr[0], addr[1]):
                sock.close()
                continue
            self._handshaking[addr[0]] = self._handshaking.get(addr[0], 0) + 1
            self._spawn(self._handshake(sock, addr, context))

    async def _handshake(self, sock: socket.socket, addr: tuple[Any, ...], context: ssl.SSLContext) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: _TcpConnection(self, "tls"), sock, ssl=context,
                                                     ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            logger.info("SIP TLS %s:%s: handshake failed: %s", addr[0], addr[1], exc)
            self.tls_handshake_failures += 1
            sock.close()
        finally:
            left = self._handshaking.get(addr[0], 0) - 1
            if left > 0:
                self._handshaking[addr[0]] = left
            else:
                self._handshaking.pop(addr[0], None)

    @property
    def open_connections(self) -> int:
        """TCP and TLS connections, those in their TLS handshake included."""
        return len(self._connections) + sum(self._handshaking.values())

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
        if self._tls_accept is not None:
            self._tls_accept.cancel()
            await asyncio.gather(self._tls_accept, return_exceptions=True)
        if self._tls_socket is not None:
            self._tls_socket.close()
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
            if not other.closing and (other.peer.transport, other.peer.host, other.peer.port) == (
                    peer.transport, peer.host, peer.port):
                other.write(data)
                return
        key = (peer.transport, peer.host, peer.port)
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

    async def _connect(self, key: tuple[str, str, int]) -> None:
        assert self._loop is not None
        kind, host, port = key
        tls: dict[str, Any] = {}
        if kind == "tls":
            if self.tls_client_context is None:
                dropped = self._connecting.pop(key, [])
                logger.warning("SIP TLS: no TLS configured, cannot connect to %s:%s; %d message(s) dropped",
                               host, port, len(dropped))
                return
            tls = {"ssl": self.tls_client_context, "server_hostname": host,
                   "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(lambda: _TcpConnection(self, kind), host, port, **tls), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            dropped = self._connecting.pop(key, [])
            logger.warning("SIP %s: cannot connect to %s:%s (%s); %d message(s) dropped", kind.upper(), host, port,
                           exc, len(dropped))
            return
        for data in self._connecting.pop(key, []):
            conn.write(data)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connection bookkeeping ----------------------------------------------

    def _admit(self, host: str, port: int) -> bool:
        """May an accepted connection from ``host`` stay?  Both caps are checked
        before anything else (TLS handshake included) is spent on it."""
        if self.open_connections >= self.max_connections:
            why = "too many connections"
        elif self._per_ip.get(host, 0) + self._handshaking.get(host, 0) >= self.max_connections_per_ip:
            why = f"{self.max_connections_per_ip} connections from this address already"
        else:
            return True
        self.refused_connections += 1
        now = self.now()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:  # a flood must not flood the log too
            more = f" ({self._refusals_unlogged} more refused since the last report)" if self._refusals_unlogged else ""
            logger.warning("SIP TCP/TLS: %s, refusing %s:%s%s (sip_tcp_max_per_ip)", why, host, port, more)
            self._refusal_logged_at, self._refusals_unlogged = now, 0
        else:
            self._refusals_unlogged += 1
        return False

    def _register(self, conn: _TcpConnection) -> int:
        conn_id = next(self._ids)
        self._connections[conn_id] = conn
        peername = conn.transport.get_extra_info("peername") if conn.transport is not None else None
        host = str(peername[0]) if peername else ""
        conn.ip = host
        self._per_ip[host] = self._per_ip.get(host, 0) + 1
        return conn_id

    def _unregister(self, conn: _TcpConnection) -> None:
        if self._connections.pop(conn.id, None) is None:
            return
        left = self._per_ip.get(conn.ip, 0) - 1
        if left > 0:
            self._per_ip[conn.ip] = left
        else:
            self._per_ip.pop(conn.ip, None)
        if self._closed:
            return
        try:
            self.ua.connection_lost(conn.id)
        except Exception:
            logger.exception("SIP: connection_lost failed")
        self.flush()
