import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rtp.jitter import Frame, JitterBuffer
from gateway.rtp.packet import RtpPacket


def pkt(seq: int, ts: int, payload: bytes | None = None, pt: int = 0) -> RtpPacket:
    if payload is None:
        payload = struct.pack("!I", seq) * 40  # 160 bytes tagged with the sequence number
    return RtpPacket(pt, seq & 0xFFFF, ts & 0xFFFFFFFF, 0x1234, False, payload)


def assert_contiguous(frames: list[Frame]) -> None:
    for before, after in zip(frames, frames[1:]):
        assert after.timestamp == before.timestamp + before.samples, (before, after)


def test_in_order_packets_are_released_immediately():
    jb = JitterBuffer()
    frames = []
    for i in range(5):
        out = jb.push(pkt(100 + i, 1000 + 160 * i), now=0.02 * i)
        assert len(out) == 1
        frames += out
    assert [f.timestamp for f in frames] == [1000 + 160 * i for i in range(5)]
    assert all(f.samples == 160 and f.payload is not None for f in frames)
    assert jb.stats.received == 5 and jb.stats.lost == 0


def test_reordered_packet_is_held_then_released_in_order():
    jb = JitterBuffer()
    assert len(jb.push(pkt(0, 0), 0.0)) == 1
    assert jb.push(pkt(2, 320), 0.02) == []
    out = jb.push(pkt(1, 160), 0.03)
    assert [f.payload for f in out] == [pkt(1, 160).payload, pkt(2, 320).payload]
    assert [f.timestamp for f in out] == [160, 320]
    assert jb.stats.reordered == 1 and jb.stats.lost == 0


def test_missing_packet_is_declared_lost_after_max_delay():
    jb = JitterBuffer(max_delay=0.06)
    jb.push(pkt(0, 0), 0.0)
    assert jb.push(pkt(2, 320), 0.04) == []
    assert jb.poll(0.099) == []  # 59 ms after the packet behind the gap arrived
    out = jb.poll(0.10)
    assert out == [Frame(160, 160, None, 0), Frame(320, 160, pkt(2, 320).payload, 0)]
    assert jb.stats.lost == 1
    # The lost packet finally arrives: too late, dropped.
    assert jb.push(pkt(1, 160), 0.11) == []
    assert jb.stats.late == 1


def test_loss_of_several_packets_fills_exact_samples_from_timestamps():
    jb = JitterBuffer()
    jb.push(pkt(0, 0, bytes(240)), 0.0)  # 30 ms packets
    jb.push(pkt(4, 960, bytes(240)), 0.1)
    out = jb.poll(0.2)
    assert out[0] == Frame(240, 720, None, 0)
    assert jb.stats.lost == 3


def test_push_also_expires_gaps_without_poll():
    jb = JitterBuffer(max_delay=0.06)
    jb.push(pkt(0, 0), 0.0)
    jb.push(pkt(2, 320), 0.02)
    out = jb.push(pkt(3, 480), 0.09)
    assert [f.timestamp for f in out] == [160, 320, 480]
    assert out[0].payload is None


def test_duplicates_are_counted_and_dropped():
    jb = JitterBuffer()
    jb.push(pkt(0, 0), 0.0)
    assert jb.push(pkt(0, 0), 0.01) == []  # duplicate of a released packet
    jb.push(pkt(2, 320), 0.02)
    assert jb.push(pkt(2, 320), 0.02) == []  # duplicate of a held packet
    assert jb.stats.duplicate == 2
    assert jb.stats.late == 0


def test_old_packets_are_told_apart_duplicate_or_late():
    jb = JitterBuffer()
    for seq in (0, 1, 2, 4, 5):
        jb.push(pkt(seq, 160 * seq), 0.0)
    jb.poll(1.0)  # slot 3 declared lost
    jb.push(pkt(1, 160), 1.0)  # played four slots ago: a duplicate
    jb.push(pkt(3, 480), 1.0)  # its slot was filled with silence: late
    jb.push(pkt(5, 800), 1.0)
    assert (jb.stats.duplicate, jb.stats.late, jb.stats.lost) == (2, 1, 1)


def test_sequence_wraparound_with_reordering():
    jb = JitterBuffer()
    frames = jb.push(pkt(65534, 0), 0.0)
    frames += jb.push(pkt(0, 320), 0.02)  # 65535 is still on its way
    frames += jb.push(pkt(65535, 160), 0.03)
    frames += jb.push(pkt(1, 480), 0.04)
    assert [f.timestamp for f in frames] == [0, 160, 320, 480]
    assert [f.payload for f in frames] == [pkt(s, 0).payload for s in (65534, 65535, 0, 1)]
    assert jb.stats.lost == 0 and jb.stats.late == 0


def test_timestamp_wraparound_is_unwrapped_monotonically():
    jb = JitterBuffer()
    start = 2**32 - 320
    frames = []
    for i in range(5):
        frames += jb.push(pkt(i, start + 160 * i), 0.02 * i)
    assert [f.timestamp for f in frames] == [start + 160 * i for i in range(5)]
    assert frames[-1].timestamp > 2**32


def test_dtx_timestamp_gap_without_sequence_gap_becomes_silence():
    jb = JitterBuffer()
    jb.push(pkt(0, 0), 0.0)
    out = jb.push(pkt(1, 160 + 8000), 1.02)  # one second of silence suppression
    assert out == [Frame(160, 8000, None, 0), Frame(8160, 160, pkt(1, 0).payload, 0)]
    assert jb.stats.lost == 0 and jb.stats.resyncs == 0


def test_timestamp_jump_beyond_cap_resyncs_without_fill():
    jb = JitterBuffer(max_gap=5.0)
    jb.push(pkt(0, 0), 0.0)
    out = jb.push(pkt(1, 160 + 5 * 8000 + 1), 0.04)
    assert out == [Frame(160, 160, pkt(1, 0).payload, 0)]
    assert jb.stats.resyncs == 1
    # The new timestamp base is kept for what follows.
    assert jb.push(pkt(2, 320 + 5 * 8000 + 1), 0.06)[0].timestamp == 320


def test_gap_exactly_at_cap_is_filled():
    jb = JitterBuffer(max_gap=5.0)
    jb.push(pkt(0, 0), 0.0)
    out = jb.push(pkt(1, 160 + 5 * 8000), 0.04)
    assert out[0] == Frame(160, 40000, None, 0)


def test_gap_slack_fills_only_the_time_that_passed():
    jb = JitterBuffer(max_gap=5.0, gap_slack=0.25)
    jb.push(pkt(0, 0), 0.0)
    # a second of DTX that really lasted a second: filled exactly
    out = jb.push(pkt(1, 160 + 8000), 1.02)
    assert out[0] == Frame(160, 8000, None, 0) and jb.stats.resyncs == 0
    # a 5 s timestamp jump 20 ms later: resync, nothing filled
    out = jb.push(pkt(2, 8320 + 40000), 1.04)
    assert out == [Frame(8320, 160, pkt(2, 0).payload, 0)] and jb.stats.resyncs == 1
    # a 4 s jump after 2 s of silence on the wire: the 2 s that passed are filled
    out = jb.push(pkt(3, 8320 + 40000 + 160 + 32000), 3.04)
    assert out[0] == Frame(8480, 2 * 8000 - 160, None, 0) and jb.stats.resyncs == 2
    assert_contiguous(out)


def test_gap_slack_keeps_jittered_loss_exact():
    jb = JitterBuffer(max_delay=0.06, gap_slack=0.31)
    frames = jb.push(pkt(0, 0), 0.05)  # the first packet delayed by 50 ms
    frames += jb.push(pkt(2, 320), 0.051)  # the next one lost, this one on time (right behind it)
    frames += jb.poll(0.2)
    assert [(f.timestamp, f.payload is None) for f in frames] == [(0, False), (160, True), (320, False)]
    assert jb.stats.resyncs == 0


def test_backwards_timestamp_continues_without_overlap():
    jb = JitterBuffer()
    jb.push(pkt(0, 100000), 0.0)
    out = jb.push(pkt(1, 50), 0.02)
    assert out == [Frame(100160, 160, pkt(1, 0).payload, 0)]
    assert jb.stats.resyncs == 1


def test_large_sequence_jump_resyncs_once_confirmed():
    jb = JitterBuffer()
    frames = jb.push(pkt(0, 0), 0.0) + jb.push(pkt(1, 160), 0.02)
    assert jb.push(pkt(40000, 320), 0.04) == []  # held on probation
    frames += jb.push(pkt(40001, 480), 0.06)
    frames += jb.push(pkt(40002, 640), 0.08)
    assert [f.timestamp for f in frames] == [0, 160, 320, 480, 640]
    assert all(f.payload is not None for f in frames)
    assert jb.stats.resyncs == 1 and jb.stats.lost == 0


def test_single_stray_sequence_number_is_dropped():
    jb = JitterBuffer()
    frames = jb.push(pkt(0, 0), 0.0) + jb.push(pkt(1, 160), 0.02)
    assert jb.push(pkt(30000, 999999), 0.03) == []
    frames += jb.push(pkt(2, 320), 0.04)
    assert [f.timestamp for f in frames] == [0, 160, 320]
    assert jb.stats.stray == 1 and jb.stats.resyncs == 0


def test_overflow_forces_release_of_held_packets():
    jb = JitterBuffer(max_packets=4, max_delay=10.0)
    jb.push(pkt(0, 0), 0.0)
    for seq in range(2, 6):
        assert jb.push(pkt(seq, 160 * seq), 0.0) == []
    out = jb.push(pkt(6, 960), 0.0)  # fifth held packet: overflow
    assert [f.timestamp for f in out] == [160, 320, 480, 640, 800, 960]
    assert out[0].payload is None
    assert jb.stats.lost == 1


def test_flush_releases_held_frames_and_restarts_sequence_at_timeline_end():
    jb = JitterBuffer()
    frames = jb.push(pkt(0, 0), 0.0) + jb.push(pkt(2, 320), 0.02)
    frames += jb.flush()
    assert [(f.timestamp, f.payload is None) for f in frames] == [(0, False), (160, True), (320, False)]
    # A new stream with unrelated sequence numbers and timestamps continues the timeline.
    out = jb.push(pkt(5000, 123456789), 1.0)
    assert out[0].timestamp == 480
    assert jb.end_timestamp == 640


def test_zero_sample_placeholders_hold_sequence_numbers():
    # DTMF packets share the sequence space: they must not look like loss.
    jb = JitterBuffer()
    frames = jb.push(pkt(0, 0), 0.0)
    frames += jb.push(pkt(1, 160, b"\x05\x0a\x00\xa0", pt=101), 0.02, samples=0)
    frames += jb.push(pkt(2, 320), 0.04)
    assert frames == [Frame(0, 160, pkt(0, 0).payload, 0), Frame(160, 160, None, 0), Frame(320, 160, pkt(2, 0).payload, 0)]
    assert jb.stats.lost == 0


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="clock_rate"):
        JitterBuffer(clock_rate=0)
    with pytest.raises(ValueError, match="max_packets"):
        JitterBuffer(max_packets=0)


@settings(max_examples=150, deadline=None)
@given(
    seq0=st.integers(0, 0xFFFF),
    ts0=st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0xFFFFFFFF - 5000, 0xFFFFFFFF)),
    plan=st.lists(
        st.tuples(
            st.floats(0.0, 0.05),  # network delay, below max_delay
            st.sampled_from([0, 0, 0, 0, 800, 8000]),  # extra timestamp gap (DTX) before this packet
            st.sampled_from(["ok"] * 8 + ["drop", "dup"]),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_random_jitter_loss_and_duplicates_keep_an_exact_timeline(seq0, ts0, plan):
    """Whatever the arrival order (jitter below max_delay), every received packet
    lands at its own timestamp and every gap is silence of the exact length."""
    expected_position = {}  # index -> samples after the first packet's timestamp
    arrivals = [(0.0, 0)]  # (arrival time, index); the first packet arrives first
    position = 0
    for i, (delay, extra, fate) in enumerate(plan, start=1):
        position += 160 + extra
        expected_position[i] = position
        if fate == "drop" and i < len(plan):  # a trailing drop is invisible to any receiver
            continue
        arrivals.append((0.02 * i + delay, i))
        if fate == "dup":
            arrivals.append((0.02 * i + delay + 0.001, i))
    expected_position[0] = 0
    arrivals.sort()

    jb = JitterBuffer(max_delay=0.06)
    frames: list[Frame] = []
    tick = 0.0
    for at, i in arrivals:
        while tick < at:
            frames += jb.poll(tick)
            tick += 0.01
        frames += jb.push(pkt(seq0 + i, ts0 + expected_position[i], struct.pack("!I", i) * 40), at)
    frames += jb.flush()

    assert_contiguous(frames)
    assert frames[0].timestamp == ts0
    received = {struct.unpack_from("!I", f.payload)[0]: f.timestamp - ts0 for f in frames if f.payload is not None}
    assert received == {i: expected_position[i] for _, i in arrivals}
    assert jb.stats.late == 0
    dropped = sum(1 for i, (_, _, fate) in enumerate(plan, start=1) if fate == "drop" and i < len(plan))
    assert jb.stats.lost == dropped
    assert jb.stats.duplicate == sum(1 for _, _, fate in plan if fate == "dup")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 80, 160, 240]), st.floats(0, 0.2)),
        max_size=80,
    ),
    st.integers(0, 3),
)
def test_arbitrary_sequence_and_timestamps_never_break_the_timeline(packets, neighbour_bias):
    """Garbage numbering (jumps, resets, repeats) is survived: output stays contiguous and bounded."""
    jb = JitterBuffer(max_packets=16)
    frames: list[Frame] = []
    now = 0.0
    last_seq = 0
    for seq, ts, samples, dt in packets:
        if neighbour_bias and seq % 4 < neighbour_bias:  # make in-window numbering common too
            seq = (last_seq + seq % 5) & 0xFFFF
        last_seq = seq
        now += dt
        frames += jb.push(pkt(seq, ts), now, samples=samples)
        frames += jb.poll(now)
        assert jb.held <= 16
    frames += jb.flush()
    assert_contiguous(frames)
    assert all(f.samples > 0 for f in frames)
    assert all(f.samples <= jb.max_gap for f in frames if f.payload is None)
