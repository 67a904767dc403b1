import struct

import pytest

from gateway.rtp.dtmf import DtmfDecoder, DtmfEvent
from gateway.rtp.packet import RtpPacket

_seq = 0


def event_packet(code: int, timestamp: int, duration: int, *, end: bool = False, volume: int = 10) -> RtpPacket:
    global _seq
    _seq += 1
    payload = struct.pack("!BBH", code, (0x80 if end else 0) | volume, duration)
    return RtpPacket(101, _seq & 0xFFFF, timestamp, 0x55, duration == 400, payload)


def key_press(code: int, timestamp: int, steps: int = 4, *, end_copies: int = 3, volume: int = 10) -> list[RtpPacket]:
    """What a phone sends (RFC 4733 2.5.1.3): updates every 50 ms, then three End packets."""
    packets = [event_packet(code, timestamp, 400 * (i + 1), volume=volume) for i in range(steps)]
    packets += [event_packet(code, timestamp, 400 * (steps + 1), end=True, volume=volume) for _ in range(end_copies)]
    return packets


def feed_all(decoder: DtmfDecoder, packets: list[RtpPacket]) -> list[tuple[int, DtmfEvent]]:
    """Feed packets; return (index of the packet that produced it, event)."""
    return [(i, e) for i, p in enumerate(packets) if (e := decoder.feed(p)) is not None]


def test_event_emitted_once_at_first_end_packet():
    packets = key_press(5, 16000)
    events = feed_all(DtmfDecoder(), packets)
    assert events == [(4, DtmfEvent("5", 250, 10, 16000))]  # 2000 samples at 8 kHz


def test_sequence_of_digits_with_retransmitted_ends():
    packets = key_press(1, 1000) + key_press(11, 5000) + key_press(10, 9000) + key_press(0, 13000)
    events = [e for _, e in feed_all(DtmfDecoder(), packets)]
    assert [e.digit for e in events] == ["1", "#", "*", "0"]
    assert [e.timestamp for e in events] == [1000, 5000, 9000, 13000]


def test_same_digit_twice_is_two_events():
    packets = key_press(7, 1000) + key_press(7, 3000)
    assert [e.digit for _, e in feed_all(DtmfDecoder(), packets)] == ["7", "7"]


def test_event_whose_end_is_lost_is_emitted_when_next_event_starts():
    packets = key_press(3, 1000, end_copies=0) + key_press(4, 3000)
    events = feed_all(DtmfDecoder(), packets)
    assert events[0] == (4, DtmfEvent("3", 200, 10, 1000))  # at the first packet of the next event
    assert events[1][1].digit == "4"


def test_event_without_end_is_emitted_on_flush():
    decoder = DtmfDecoder()
    assert feed_all(decoder, key_press(9, 1000, end_copies=0)) == []
    assert decoder.flush() == DtmfEvent("9", 200, 10, 1000)
    assert decoder.flush() is None


def test_only_end_packets_after_an_unended_event():
    # Heavy loss: event 2 is only seen through its End packets. Both events still come out once.
    decoder = DtmfDecoder()
    packets = key_press(2, 1000, end_copies=0) + [event_packet(8, 3000, 1600, end=True) for _ in range(3)]
    events = [e for _, e in feed_all(decoder, packets)]
    assert [e.digit for e in events] == ["2", "8"]
    assert decoder.flush() is None


def test_late_end_retransmission_of_a_finished_event_is_ignored():
    decoder = DtmfDecoder()
    packets = key_press(1, 1000) + key_press(2, 3000)
    late = event_packet(1, 1000, 2000, end=True)
    events = [e for _, e in feed_all(decoder, packets + [late])]
    assert [e.digit for e in events] == ["1", "2"]


def test_duration_is_the_longest_seen_and_volume_kept():
    decoder = DtmfDecoder(clock_rate=8000)
    packets = [event_packet(6, 500, 800, volume=7), event_packet(6, 500, 400, volume=7), event_packet(6, 500, 1200, end=True, volume=7)]
    assert [e for _, e in feed_all(decoder, packets)] == [DtmfEvent("6", 150, 7, 500)]


@pytest.mark.parametrize(
    ("code", "digit"),
    [(0, "0"), (9, "9"), (10, "*"), (11, "#"), (12, "A"), (13, "B"), (14, "C"), (15, "D"), (16, "flash")],
)
def test_event_codes(code, digit):
    decoder = DtmfDecoder()
    assert decoder.feed(event_packet(code, 100, 800, end=True)).digit == digit


def test_other_events_and_short_payloads_are_ignored():
    decoder = DtmfDecoder()
    assert decoder.feed(event_packet(17, 100, 800, end=True)) is None  # not a DTMF event
    assert decoder.feed(RtpPacket(101, 1, 200, 5, False, b"\x01\x8a")) is None
    assert decoder.ignored == 2
    assert decoder.flush() is None


def test_reset_forgets_emitted_timestamps():
    # After an SSRC change a new stream may reuse a timestamp by chance.
    decoder = DtmfDecoder()
    assert decoder.feed(event_packet(1, 100, 800, end=True)) is not None
    assert decoder.feed(event_packet(1, 100, 800, end=True)) is None
    decoder.reset()
    assert decoder.feed(event_packet(1, 100, 800, end=True)) is not None


def test_limiter_caps_the_rate_and_the_total():
    from gateway.rtp.dtmf import DtmfLimiter

    limiter = DtmfLimiter(per_second=20, per_call=50)
    burst = [limiter.allow(0.0) for _ in range(30)]
    assert burst.count(True) == 20 and limiter.dropped == 10  # a second's worth at once
    assert [limiter.allow(0.5) for _ in range(12)].count(True) == 10  # refilled at 20/s
    assert sum(limiter.allow(10.0 + i) for i in range(40)) == 20  # the per-call total: 50
    assert limiter.accepted == 50 and limiter.dropped == 2 + 10 + 20
    unbounded = DtmfLimiter(per_second=0, per_call=0)
    assert all(unbounded.allow(0.0) for _ in range(10_000))
    with pytest.raises(ValueError):
        DtmfLimiter(per_second=-1)
