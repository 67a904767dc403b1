"""Thin asyncio edge for RTP: port allocation and UDP sockets.

Each call gets an even RTP port and the odd port above it for RTCP (RFC 3550
section 11). RTCP is read and discarded: the gateway only listens, and an
unread socket would fill its buffer for the life of the call.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import socket
from collections import deque
from collections.abc import Callable

__all__ = ["NoFreePortError", "RtpPortAllocator", "RtpSocket", "open_rtp_socket"]

logger = logging.getLogger(__name__)

#: Requested kernel receive buffer per RTP socket: ~6 s of one G.711 call, so
#: a burst while the event loop is busy (a Whisper hand-off, GC) is absorbed.
#: Linux caps it at net.core.rmem_max; see RtpSocket.receive_buffer.
RECEIVE_BUFFER = 1 << 20

#: Largest datagram read. asyncio's selector transport reads up to 256 KiB per
#: datagram by default: a buffer that size is mmap'ed and freed for every
#: packet, which measured 24 us/packet against 9 us with this value (500
#: sockets, 23k packets/s on 127.0.0.1). 9216 still fits jumbo frames.
MAX_DATAGRAM = 9216

OnDatagram = Callable[[bytes, tuple[str, int]], None]

_rng = _random.SystemRandom()


class NoFreePortError(RuntimeError):
    """Every RTP port in the configured range is allocated or taken by another process."""


class RtpPortAllocator:
    """Hands out even RTP ports from ``start..end`` (inclusive), RTCP being port + 1.

    The port is drawn at random from the free ones (``random=True``, the
    default), so a stranger cannot predict a new call's port and aim RTP at it
    before the caller's first packet (RFC 3550 and RFC 7201 advise against
    predictable ports). A released port first waits in a quarantine of up to
    half the range, oldest out first, so it is reused as late as possible and
    stray packets of an ended call rarely reach a new one. Allocation and
    release are O(1) (a swap-remove on a list). ``random=False`` hands out
    ports in order (tests, debugging).
    """

    def __init__(self, start: int = 10000, end: int = 20000, *, random: bool = True) -> None:
        first = start + (start & 1)
        if not 0 < start <= end <= 65535 or first + 1 > end:
            raise ValueError(f"RTP port range {start}-{end} holds no even/odd port pair")
        self.start = start
        self.end = end
        ports = list(range(first, end, 2))
        self._random = _rng if random else None
        if not random:
            ports.reverse()  # pop() from the end hands out the lowest first
        self._free: list[int] = ports
        self._quarantine: deque[int] = deque()
        self._quarantine_size = len(ports) // 2
        self._in_use: set[int] = set()

    @property
    def capacity(self) -> int:
        return len(self._free) + len(self._quarantine) + len(self._in_use)

    @property
    def available(self) -> int:
        return len(self._free) + len(self._quarantine)

    def allocate(self) -> int:
        free = self._free
        if free:
            if self._random is not None:
                index = self._random.randrange(len(free))
                free[index], free[-1] = free[-1], free[index]
            port = free.pop()
        elif self._quarantine:
            port = self._quarantine.popleft()
        else:
            raise NoFreePortError(f"all {self.capacity} RTP ports in {self.start}-{self.end} are allocated")
        self._in_use.add(port)
        return port

    def release(self, port: int) -> None:
        """Return a port; releasing a port that is not allocated is a no-op."""
        if port in self._in_use:
            self._in_use.remove(port)
            self._quarantine.append(port)
            while len(self._quarantine) > self._quarantine_size:
                self._free.append(self._quarantine.popleft())


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: OnDatagram) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._on_datagram(data, addr)
        except Exception:  # a handler bug must not kill the socket for the rest of the call
            logger.exception("RTP datagram handler failed for a packet from %s", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends, reported on the next recv: harmless.
        logger.debug("RTP socket error: %s", exc)


class _DiscardProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1

    def error_received(self, exc: Exception) -> None:
        logger.debug("RTCP socket error: %s", exc)


class RtpSocket:
    """A bound RTP/RTCP port pair. ``close()`` releases the port to its allocator."""

    def __init__(
        self,
        host: str,
        port: int,
        rtp: asyncio.DatagramTransport,
        rtcp: asyncio.DatagramTransport,
        rtcp_protocol: _DiscardProtocol,
        allocator: RtpPortAllocator,
    ) -> None:
        self.host = host
        self.port = port
        self.rtcp_port = port + 1
        self._rtp = rtp
        self._rtcp = rtcp
        self._rtcp_protocol = rtcp_protocol
        self._allocator = allocator
        self._closed = False

    @property
    def rtcp_received(self) -> int:
        """RTCP datagrams read (and discarded) on the RTCP port."""
        return self._rtcp_protocol.received

    @property
    def receive_buffer(self) -> int:
        """SO_RCVBUF the kernel granted (Linux reports twice the usable size)."""
        sock = self._rtp.get_extra_info("socket")
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if sock is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        """Send from the RTP port (symmetric RTP: the peer sees the port it sends to)."""
        if not self._closed:
            self._rtp.sendto(data, address)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rtp.close()
        self._rtcp.close()
        self._allocator.release(self.port)


def _bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:  # keep the default buffer rather than fail the call
            logger.warning("could not set SO_RCVBUF=%d on RTP socket", RECEIVE_BUFFER)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_rtp_socket(host: str, port_allocator: RtpPortAllocator, on_datagram: OnDatagram) -> RtpSocket:
    """Bind a free RTP/RTCP port pair on ``host`` and deliver RTP datagrams to ``on_datagram``.

    Ports another process holds are skipped (held aside until this call ends,
    then released, so every free port is tried once). Raises
    :class:`NoFreePortError` when none is left.
    """
    skipped: list[int] = []
    try:
        return await _open_rtp_socket(host, port_allocator, on_datagram, skipped)
    finally:
        for port in skipped:
            port_allocator.release(port)


async def _open_rtp_socket(host: str, port_allocator: RtpPortAllocator, on_datagram: OnDatagram,
                           skipped: list[int]) -> RtpSocket:
    loop = asyncio.get_running_loop()
    for _ in range(max(port_allocator.available, 1)):  # none free: allocate() says so
        port = port_allocator.allocate()
        try:
            rtp_sock = _bind_udp(host, port)
        except OSError as exc:
            logger.debug("RTP port %d unavailable: %s", port, exc)
            skipped.append(port)
            continue
        try:
            rtcp_sock = _bind_udp(host, port + 1)
        except OSError as exc:
            logger.debug("RTCP port %d unavailable: %s", port + 1, exc)
            rtp_sock.close()
            skipped.append(port)
            continue
        try:
            rtp, _ = await loop.create_datagram_endpoint(lambda: _RtpProtocol(on_datagram), sock=rtp_sock)
        except BaseException:
            rtp_sock.close()
            rtcp_sock.close()
            port_allocator.release(port)
            raise
        if hasattr(rtp, "max_size"):  # selector transports (not uvloop, which sizes its own)
            rtp.max_size = MAX_DATAGRAM
        try:
            rtcp_protocol = _DiscardProtocol()
            rtcp, _ = await loop.create_datagram_endpoint(lambda: rtcp_protocol, sock=rtcp_sock)
            if hasattr(rtcp, "max_size"):
                rtcp.max_size = MAX_DATAGRAM
        except BaseException:
            rtp.close()
            rtcp_sock.close()
            port_allocator.release(port)
            raise
        return RtpSocket(host, port, rtp, rtcp, rtcp_protocol, port_allocator)
    raise NoFreePortError(f"no bindable RTP port pair on {host} in {port_allocator.start}-{port_allocator.end}")
