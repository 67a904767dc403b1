"""SipEndpoint over real UDP and TCP sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from gateway.sip.events import CallEnded, Event, IncomingCall, MalformedMessage
from gateway.sip.framing import StreamFramer
from gateway.sip.message import NameAddress, SipRequest, SipResponse, Via, parse_message
from gateway.sip.transport import SipEndpoint
from gateway.sip.useragent import UserAgent
from tests.waiting import wait_for

ANSWER = b"v=0\r\no=earshot 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
OFFER = b"v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n"
WAIT = 5.0  # generous upper bound for anything to arrive on loopback


def request(method: str, transport: str, port: int, *, branch: str, call_id: str = "t-1", cseq: int = 1,
            to_tag: str = "", body: bytes = b"", contact_port: int | None = None) -> bytes:
    to = "<sip:earshot@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    contact = f"Contact: <sip:pbx@127.0.0.1:{contact_port or port};transport={transport.lower()}>\r\n"
    return (
        f"{method} sip:earshot@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:pbx@127.0.0.1>;tag=p1\r\n"
        f"To: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{contact}"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class App:
    """A minimal application: answers every call, records events."""

    def __init__(self, ua: UserAgent) -> None:
        self.ua = ua
        self.endpoint: SipEndpoint | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.answer = True
        self.explode = False

    def on_event(self, event: Event) -> None:
        self.events.put_nowait(event)
        if self.explode:
            raise RuntimeError("application bug")
        if isinstance(event, IncomingCall) and self.answer:
            assert self.endpoint is not None
            self.ua.answer(event.dialog_id, ANSWER, asyncio.get_running_loop().time())
            self.endpoint.flush()

    async def next(self, kind: type) -> Event:
        while True:
            event = await asyncio.wait_for(self.events.get(), WAIT)
            if isinstance(event, kind):
                return event


@pytest.fixture
async def server() -> AsyncIterator[tuple[SipEndpoint, App]]:
    ua = UserAgent(local_host="127.0.0.1", local_port=0, t1=0.02, t2=0.08)
    app = App(ua)
    endpoint = SipEndpoint(ua, app.on_event)
    app.endpoint = endpoint
    await endpoint.start("127.0.0.1", 0)
    ua.local_port = endpoint.udp_port
    yield endpoint, app
    await endpoint.close()


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.queue.put_nowait(data)

    async def recv(self) -> SipRequest | SipResponse:
        return parse_message(await asyncio.wait_for(self.queue.get(), WAIT))


async def udp_client(port: int) -> tuple[asyncio.DatagramTransport, UdpClient, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(UdpClient, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", port))
    return transport, proto, transport.get_extra_info("sockname")[1]


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = StreamFramer()
        self.pending: list[bytes] = []
        self.port = writer.get_extra_info("sockname")[1]

    async def recv(self) -> SipRequest | SipResponse:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "connection closed"
            self.pending += self.framer.feed(data)
        return parse_message(self.pending.pop(0))


async def tcp_client(port: int) -> TcpClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return TcpClient(reader, writer)


async def test_options_over_udp_and_tcp(server: tuple[SipEndpoint, App]) -> None:
    # this module runs on both loops (see below): the [uvloop] run must really be on uvloop
    expected = "uvloop" if "[uvloop]" in os.environ["PYTEST_CURRENT_TEST"] else "asyncio"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == expected
    endpoint, _ = server
    assert endpoint.udp_port == endpoint.tcp_port > 0
    transport, udp, udp_port = await udp_client(endpoint.udp_port)
    transport.sendto(request("OPTIONS", "UDP", udp_port, branch="z9hG4bKu1"))
    resp = await udp.recv()
    assert isinstance(resp, SipResponse) and resp.status == 200 and "INVITE" in resp.headers.get_all("allow")
    assert Via.parse(resp.headers.get("via") or "").params["rport"] == str(udp_port)
    transport.close()

    tcp = await tcp_client(endpoint.tcp_port)
    tcp.writer.write(request("OPTIONS", "TCP", tcp.port, branch="z9hG4bKt1"))
    resp = await tcp.recv()
    assert isinstance(resp, SipResponse) and resp.status == 200
    tcp.writer.close()
    assert endpoint.messages_in == 2 and endpoint.messages_out == 2 and endpoint.malformed == 0


async def test_tcp_call_bye_goes_back_on_the_same_connection(server: tuple[SipEndpoint, App]) -> None:
    endpoint, app = server
    tcp = await tcp_client(endpoint.tcp_port)
    tcp.writer.write(request("INVITE", "TCP", tcp.port, branch="z9hG4bKi1", body=OFFER, contact_port=1))
    trying, ok = await tcp.recv(), await tcp.recv()
    assert (trying.status, ok.status) == (100, 200)  # type: ignore[union-attr]
    assert ok.headers.get("contact", "").endswith(";transport=tcp>")
    tag = NameAddress.parse(ok.headers.get("to") or "").tag or ""
    tcp.writer.write(request("ACK", "TCP", tcp.port, branch="z9hG4bKa1", to_tag=tag))
    call = await app.next(IncomingCall)
    endpoint.ua.hangup(call.dialog_id, asyncio.get_running_loop().time())  # type: ignore[attr-defined]
    endpoint.flush()
    # The Contact says port 1 (nothing listens there): the BYE must still
    # come back on this connection, since it is up.
    bye = await tcp.recv()
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    ok_bye = (
        f"SIP/2.0 200 OK\r\nVia: {bye.headers.get('via')}\r\nFrom: {bye.headers.get('from')}\r\n"
        f"To: {bye.headers.get('to')}\r\nCall-ID: {bye.headers.get('call-id')}\r\nCSeq: {bye.headers.get('cseq')}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    tcp.writer.write(ok_bye)
    ended = await app.next(CallEnded)
    assert ended == CallEnded(call.dialog_id, "local-bye")  # type: ignore[attr-defined]
    tcp.writer.close()


async def test_udp_call_without_ack_times_out_with_bye(server: tuple[SipEndpoint, App]) -> None:
    endpoint, app = server
    transport, udp, port = await udp_client(endpoint.udp_port)
    transport.sendto(request("INVITE", "UDP", port, branch="z9hG4bKi2", call_id="t-2", body=OFFER))
    seen: list[int | str] = []
    while "BYE" not in seen:
        msg = await udp.recv()
        seen.append(msg.method if isinstance(msg, SipRequest) else msg.status)
    # 100, then the 200 and its retransmissions (real timers, T1 = 20 ms), then our BYE.
    assert seen[0] == 100 and seen.count(200) >= 3 and seen[-1] == "BYE"
    ended = await app.next(CallEnded)
    assert ended.reason == "ack-timeout"  # type: ignore[attr-defined]
    transport.close()


async def test_tcp_framing_error_gets_400_then_close(server: tuple[SipEndpoint, App]) -> None:
    endpoint, app = server
    tcp = await tcp_client(endpoint.tcp_port)
    bad = request("OPTIONS", "TCP", tcp.port, branch="z9hG4bKbad").replace(b"Content-Length: 0\r\n", b"")
    tcp.writer.write(bad)
    resp = await tcp.recv()
    assert isinstance(resp, SipResponse)
    assert (resp.status, resp.reason) == (400, "Bad Request - Missing Content-Length")
    assert await asyncio.wait_for(tcp.reader.read(), WAIT) == b""  # closed by the server
    tcp.writer.close()
    event = await app.next(MalformedMessage)
    assert event.reason == "Bad Request - Missing Content-Length"  # type: ignore[attr-defined]
    assert endpoint.malformed == 1
    # Garbage that cannot be answered: just closed.
    tcp = await tcp_client(endpoint.tcp_port)
    tcp.writer.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    assert await asyncio.wait_for(tcp.reader.read(), WAIT) == b""
    tcp.writer.close()
    # The server is still fine.
    tcp = await tcp_client(endpoint.tcp_port)
    tcp.writer.write(b"\r\n\r\n" + request("OPTIONS", "TCP", tcp.port, branch="z9hG4bKok"))
    assert await asyncio.wait_for(tcp.reader.readexactly(2), WAIT) == b"\r\n"  # RFC 5626 pong
    assert (await tcp.recv()).status == 200  # type: ignore[union-attr]
    tcp.writer.close()


async def test_failing_event_handler_does_not_stall_the_server(server: tuple[SipEndpoint, App]) -> None:
    endpoint, app = server
    app.explode = True
    transport, udp, port = await udp_client(endpoint.udp_port)
    transport.sendto(b"garbage that is not SIP")  # MalformedMessage -> handler raises
    await app.next(MalformedMessage)
    transport.sendto(request("OPTIONS", "UDP", port, branch="z9hG4bKafter"))
    assert (await udp.recv()).status == 200  # type: ignore[union-attr]
    transport.close()


# every async test here runs on both loops: `earshot run` uses uvloop where installed
pytest_plugins = ["tests.loops"]  # its pytest_asyncio_loop_factories hook gives both_loops users both
pytestmark = pytest.mark.usefixtures("both_loops")


class FakeClock:
    """Stands in for ``SipEndpoint.now``, the clock of the TCP idle bookkeeping (last activity and
    the sweep's deadline); it moves only when told.  The user agent's timers keep ``loop.time()``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start

    def __call__(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


async def test_idle_tcp_connections_are_closed_and_dialogs_reach_the_peer_anew(server: tuple[SipEndpoint, App]) -> None:
    """An idle connection is closed after tcp_idle_timeout; one kept alive by CRLF pings is
    not; a call whose connection was closed still gets its BYE, on a new connection to the
    remote target (the Contact), as RFC 3261 18.2.2 asks.

    Idleness is judged on a fake clock, so which connections a sweep closes does not
    depend on how fast this machine is; the sweep itself is the endpoint's own, re-armed
    every 0.1 s of real time, and the test waits for one to have run after each step."""
    endpoint, app = server
    loop = asyncio.get_running_loop()
    clock = FakeClock()
    endpoint.now = clock  # type: ignore[method-assign]
    sweeps = 0
    real_sweep = endpoint._close_idle

    def counted_sweep() -> None:
        nonlocal sweeps
        real_sweep()
        sweeps += 1

    endpoint._close_idle = counted_sweep  # type: ignore[method-assign]
    endpoint.tcp_idle_timeout = 0.4
    endpoint._schedule_idle_sweep()

    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def pbx_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        while data := await reader.read(65536):
            for message in framer.feed(data):
                received.put_nowait(message)

    pbx = await asyncio.start_server(pbx_listener, "127.0.0.1", 0)
    pbx_port = pbx.sockets[0].getsockname()[1]

    call_conn = await tcp_client(endpoint.tcp_port)
    call_conn.writer.write(request("INVITE", "TCP", call_conn.port, branch="z9hG4bKi9", call_id="t-9", body=OFFER,
                                   contact_port=pbx_port))
    trying, ok = await call_conn.recv(), await call_conn.recv()
    assert (trying.status, ok.status) == (100, 200)  # type: ignore[union-attr]
    tag = NameAddress.parse(ok.headers.get("to") or "").tag or ""
    call_conn.writer.write(request("ACK", "TCP", call_conn.port, branch="z9hG4bKa9", call_id="t-9", to_tag=tag))
    call = await app.next(IncomingCall)
    idle = await tcp_client(endpoint.tcp_port)
    alive = await tcp_client(endpoint.tcp_port)
    await wait_for(lambda: len(endpoint._connections) == 3, WAIT, "the server to accept all three connections")

    async def step(seconds: float) -> None:
        """Let `seconds` pass on the clock, ping on `alive`, then wait for a sweep to run."""
        clock.advance(seconds)
        alive.writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(alive.reader.readexactly(2), WAIT) == b"\r\n"  # pong: activity noted
        seen = sweeps
        await wait_for(lambda: sweeps > seen, WAIT, "an idle sweep")

    # Three idle timeouts, in steps shorter than one: `alive` is never idle for a whole
    # timeout, the other two are from the second step (0.6 s) on.
    await step(0.3)
    assert endpoint.idle_closed == 0
    await step(0.3)
    assert endpoint.idle_closed == 2
    await step(0.3)
    await step(0.3)
    assert endpoint.idle_closed == 2
    assert await asyncio.wait_for(idle.reader.read(), WAIT) == b""
    assert await asyncio.wait_for(call_conn.reader.read(), WAIT) == b""
    await wait_for(lambda: len(endpoint._connections) == 1, WAIT, "the closed connections to be forgotten")
    assert not alive.reader.at_eof()

    endpoint.ua.hangup(call.dialog_id, loop.time())  # type: ignore[attr-defined]
    endpoint.flush()
    bye = parse_message(await asyncio.wait_for(received.get(), WAIT))
    assert isinstance(bye, SipRequest) and bye.method == "BYE" and bye.headers.get("call-id") == "t-9"
    for client in (idle, alive, call_conn):
        client.writer.close()
    pbx.close()
    await pbx.wait_closed()
