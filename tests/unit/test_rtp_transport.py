import asyncio
import socket
import struct
from pathlib import Path

import pytest

from gateway.rtp.packet import build_rtp
from gateway.rtp.receiver import AudioChunk, RtpReceiver
from gateway.rtp.transport import (
    MAX_DATAGRAM,
    RECEIVE_BUFFER,
    NoFreePortError,
    RtpPortAllocator,
    open_rtp_socket,
)

HOST = "127.0.0.1"


def free_even_port_range(pairs: int) -> int:
    """An even port whose next 2 * pairs ports are free right now (chosen by the kernel's ephemeral pick)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            base = probe.getsockname()[1] & ~1
        if base + 2 * pairs > 65535:
            continue
        held = []
        try:
            for port in range(base, base + 2 * pairs):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind((HOST, port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return base
    pytest.skip("no free UDP port range on 127.0.0.1")


class Collector:
    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def __call__(self, data: bytes, addr: tuple[str, int]) -> None:
        self.datagrams.put_nowait((data, addr))


def test_allocator_in_order_hands_out_even_ports_and_reuses_released_ones_late():
    allocator = RtpPortAllocator(10001, 10008, random=False)
    assert allocator.capacity == 3  # pairs 10002/3, 10004/5, 10006/7
    ports = [allocator.allocate() for _ in range(3)]
    assert ports == [10002, 10004, 10006]
    with pytest.raises(NoFreePortError, match="all 3 RTP ports"):
        allocator.allocate()
    allocator.release(10004)
    allocator.release(10004)  # double release is harmless
    allocator.release(12345)  # unknown port too
    assert allocator.allocate() == 10004
    assert allocator.available == 0


def test_allocator_draws_ports_at_random_and_quarantines_released_ones():
    allocator = RtpPortAllocator(20000, 21000)  # 500 pairs
    first = [allocator.allocate() for _ in range(20)]
    assert all(port % 2 == 0 and 20000 <= port < 21000 for port in first)
    assert len(set(first)) == 20
    assert first != sorted(first)  # 20 in ascending order by chance: 1 in 20!
    other = RtpPortAllocator(20000, 21000)
    assert [other.allocate() for _ in range(20)] != first
    # a released port waits in quarantine (half the range) before it can come back
    released = first[0]
    allocator.release(released)
    again = [allocator.allocate() for _ in range(480)]
    assert released not in again
    assert allocator.available == 1 and allocator.allocate() == released  # last one left
    with pytest.raises(NoFreePortError):
        allocator.allocate()
    for port in first[1:] + again + [released]:
        allocator.release(port)
    assert allocator.available == allocator.capacity == 500


def test_allocator_rejects_empty_ranges():
    with pytest.raises(ValueError, match="no even/odd port pair"):
        RtpPortAllocator(10000, 10000)
    with pytest.raises(ValueError):
        RtpPortAllocator(20000, 10000)


async def test_datagrams_reach_the_handler_over_real_udp():
    base = free_even_port_range(2)
    allocator = RtpPortAllocator(base, base + 3, random=False)
    collector = Collector()
    rtp = await open_rtp_socket(HOST, allocator, collector)
    try:
        assert rtp.port == base and rtp.rtcp_port == base + 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind((HOST, 0))
            packet = build_rtp(0, 1, 160, 42, b"\xff" * 160)
            peer.sendto(packet, (HOST, rtp.port))
            data, addr = await asyncio.wait_for(collector.datagrams.get(), 5)
            assert data == packet
            assert addr == peer.getsockname()
            big = build_rtp(0, 2, 320, 42, bytes(MAX_DATAGRAM - 12))  # jumbo-frame sized: not truncated
            peer.sendto(big, (HOST, rtp.port))
            assert (await asyncio.wait_for(collector.datagrams.get(), 5))[0] == big
            # RTCP on the odd port is read and discarded.
            peer.sendto(struct.pack("!BBHI", 0x80, 201, 1, 42), (HOST, rtp.rtcp_port))
            for _ in range(500):
                if rtp.rtcp_received:
                    break
                await asyncio.sleep(0.01)
            assert rtp.rtcp_received == 1
            assert collector.datagrams.empty()
            # Symmetric RTP: we can send from the RTP port.
            rtp.sendto(b"hello", peer.getsockname())
            peer.settimeout(5)
            assert peer.recvfrom(100) == (b"hello", (HOST, rtp.port))
    finally:
        rtp.close()
    assert rtp.closed
    assert allocator.available == 2
    rtp.close()  # idempotent


async def test_ports_held_by_other_processes_are_skipped():
    base = free_even_port_range(3)
    allocator = RtpPortAllocator(base, base + 5)
    squatters = []
    for port in (base + 1, base + 2):  # someone else holds the RTCP port of one pair, the RTP port of another
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind((HOST, port))
        squatters.append(squatter)
    try:
        for _ in range(5):  # whatever the random draw, the one free pair is found
            rtp = await open_rtp_socket(HOST, allocator, lambda data, addr: None)
            try:
                assert rtp.port == base + 4
                assert allocator.available == 2  # the skipped pairs went back
            finally:
                rtp.close()
            await asyncio.sleep(0.01)  # the transport closes its socket on the next loop turn
    finally:
        for squatter in squatters:
            squatter.close()


async def test_exhausted_range_raises():
    base = free_even_port_range(1)
    allocator = RtpPortAllocator(base, base + 1)
    first = await open_rtp_socket(HOST, allocator, lambda data, addr: None)
    try:
        with pytest.raises(NoFreePortError):
            await open_rtp_socket(HOST, allocator, lambda data, addr: None)
    finally:
        first.close()


async def test_receive_buffer_is_enlarged():
    rmem_max = Path("/proc/sys/net/core/rmem_max")
    if not rmem_max.exists():
        pytest.skip("not Linux")
    base = free_even_port_range(1)
    rtp = await open_rtp_socket(HOST, RtpPortAllocator(base, base + 1), lambda data, addr: None)
    try:
        # Linux doubles the requested value (bookkeeping overhead) and caps it at rmem_max.
        assert rtp.receive_buffer == 2 * min(RECEIVE_BUFFER, int(rmem_max.read_text()))
    finally:
        rtp.close()


async def test_handler_exception_does_not_stop_the_socket():
    base = free_even_port_range(1)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    def handler(data: bytes, addr: tuple[str, int]) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        received.put_nowait(data)

    rtp = await open_rtp_socket(HOST, RtpPortAllocator(base, base + 1), handler)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.sendto(b"boom", (HOST, rtp.port))
            peer.sendto(b"fine", (HOST, rtp.port))
            assert await asyncio.wait_for(received.get(), 5) == b"fine"
    finally:
        rtp.close()


async def test_socket_feeds_a_receiver_end_to_end():
    base = free_even_port_range(1)
    loop = asyncio.get_running_loop()
    receiver = RtpReceiver(expected_host=HOST, expected_port=None, codecs={0: "PCMU"}, dtmf_payload_type=None)
    chunks: list[AudioChunk] = []
    done = asyncio.Event()

    def on_datagram(data: bytes, addr: tuple[str, int]) -> None:
        chunks.extend(receiver.receive(data, addr, loop.time()))
        if len(chunks) == 20:
            done.set()

    rtp = await open_rtp_socket(HOST, RtpPortAllocator(base, base + 1), on_datagram)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind((HOST, 0))
            for i in range(20):
                peer.sendto(build_rtp(0, 500 + i, 160 * i, 77, bytes([0xFF - i]) * 160), (HOST, rtp.port))
            await asyncio.wait_for(done.wait(), 5)
            assert receiver.latched == peer.getsockname()
    finally:
        rtp.close()
    assert [c.start_sample for c in chunks] == [160 * i for i in range(20)]
    assert receiver.stats.packets == 20 and receiver.stats.lost_packets == 0


# every async test here runs on both loops: `earshot run` uses uvloop where installed
pytest_plugins = ["tests.loops"]  # its pytest_asyncio_loop_factories hook gives both_loops users both
pytestmark = pytest.mark.usefixtures("both_loops")
