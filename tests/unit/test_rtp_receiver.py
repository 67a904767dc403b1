import struct
import warnings
import wave
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rtp.dtmf import DtmfEvent
from gateway.rtp.packet import build_rtp
from gateway.rtp.receiver import AudioChunk, RtpReceiver

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PROMPT = Path("/usr/share/asterisk/sounds/en/agent-pass.wav")  # real 8 kHz telephone prompt
PEER = ("192.0.2.10", 40000)


def make_receiver(**overrides) -> RtpReceiver:
    options = dict(expected_host=PEER[0], expected_port=PEER[1], codecs={0: "PCMU", 8: "PCMA"}, dtmf_payload_type=101)
    options.update(overrides)
    return RtpReceiver(**options)


def audio(chunks: list) -> list[AudioChunk]:
    return [c for c in chunks if isinstance(c, AudioChunk)]


def assert_timeline(chunks: list[AudioChunk], start: int = 0) -> int:
    """Chunks must tile the timeline without gaps or overlaps; returns its end."""
    position = start
    for chunk in chunks:
        assert chunk.start_sample == position, chunk
        assert len(chunk.pcm) % 2 == 0
        position += len(chunk.pcm) // 2
    return position


def packets_for(encoded: bytes, *, pt: int = 0, seq: int = 1000, ts: int = 50000, ssrc: int = 7, ptime: int = 160) -> list[bytes]:
    return [
        build_rtp(pt, seq + i, ts + i * ptime, ssrc, encoded[off : off + ptime])
        for i, off in enumerate(range(0, len(encoded), ptime))
    ]


def read_prompt() -> bytes:
    with wave.open(str(PROMPT)) as w:
        return w.readframes(w.getnframes())


@pytest.mark.parametrize(("codec", "pt", "encode"), [("PCMU", 0, audioop.lin2ulaw), ("PCMA", 8, audioop.lin2alaw)])
def test_real_speech_is_decoded_exactly_despite_reordering(codec, pt, encode):
    pcm = read_prompt()
    encoded = encode(pcm, 2)
    packets = packets_for(encoded, pt=pt)
    # Swap every 7th packet with its successor: the jitter buffer must restore the order.
    for i in range(0, len(packets) - 1, 7):
        packets[i], packets[i + 1] = packets[i + 1], packets[i]
    receiver = make_receiver()
    chunks = []
    for i, data in enumerate(packets):
        chunks += receiver.receive(data, PEER, 0.02 * i)
        chunks += receiver.poll(0.02 * i)
    chunks += receiver.flush()
    chunks = audio(chunks)
    assert_timeline(chunks)
    # Swapped pairs: the first packet of the stream arrives second and is late; everything else is exact.
    expected = audioop.ulaw2lin(encoded, 2) if codec == "PCMU" else audioop.alaw2lin(encoded, 2)
    decoded = b"".join(c.pcm for c in chunks)
    assert decoded == expected[320:]
    assert sum(c.lost_samples for c in chunks) == 0
    assert receiver.stats.reordered == len(range(7, len(packets) - 1, 7))


def test_loss_becomes_exact_silence():
    encoded = audioop.lin2ulaw(read_prompt()[: 2 * 1600], 2)
    packets = packets_for(encoded)  # 10 packets
    receiver = make_receiver()
    chunks = []
    for i, data in enumerate(packets):
        if i in (3, 6, 7):
            continue
        chunks += receiver.receive(data, PEER, 0.02 * i)
    chunks += receiver.poll(1.0)
    chunks = audio(chunks)
    assert assert_timeline(chunks) == 1600
    lost = [c for c in chunks if c.lost_samples]
    assert [(c.start_sample, c.lost_samples) for c in lost] == [(480, 160), (960, 320)]
    assert all(c.pcm == bytes(2 * c.lost_samples) for c in lost)
    assert receiver.stats.lost_packets == 3
    # Received audio is in its right place.
    decoded = audioop.ulaw2lin(encoded, 2)
    for c in chunks:
        if not c.lost_samples:
            assert c.pcm == decoded[2 * c.start_sample : 2 * c.start_sample + len(c.pcm)]


def test_comfort_noise_and_dtx_gap_become_silence_of_the_gap():
    receiver = make_receiver()
    chunks = receiver.receive(build_rtp(0, 1, 0, 9, b"\x10" * 160), PEER, 0.0)
    chunks += receiver.receive(build_rtp(13, 2, 160, 9, b"\x40"), PEER, 0.02)  # CN: noise level only
    chunks += receiver.receive(build_rtp(0, 3, 160 + 4000, 9, b"\x10" * 160), PEER, 0.52)
    chunks = audio(chunks)
    assert [(c.start_sample, len(c.pcm) // 2, c.lost_samples) for c in chunks] == [(0, 160, 0), (160, 4000, 4000), (4160, 160, 0)]
    assert receiver.stats.lost_packets == 0


def test_latches_to_first_packet_from_sdp_address_and_drops_others():
    receiver = make_receiver()
    assert receiver.receive(build_rtp(0, 1, 0, 9, b"\xff" * 160), ("198.51.100.7", 40000), 0.0) == []
    assert receiver.latched is None
    # NAT rewrote the port: the SDP IP is what matters.
    assert len(receiver.receive(build_rtp(0, 2, 160, 9, b"\xff" * 160), (PEER[0], 31000), 0.02)) == 1
    assert receiver.latched == (PEER[0], 31000)
    assert receiver.receive(build_rtp(0, 3, 320, 9, b"\xff" * 160), (PEER[0], 40000), 0.04) == []
    assert receiver.receive(build_rtp(0, 3, 320, 9, b"\xff" * 160), ("198.51.100.7", 31000), 0.04) == []
    assert receiver.stats.foreign_dropped == 3
    assert receiver.last_packet_at == 0.02


def test_unspecified_sdp_address_accepts_first_source():
    receiver = make_receiver(expected_host="0.0.0.0")
    receiver.receive(build_rtp(0, 1, 0, 9, b"\xff" * 160), ("203.0.113.5", 5004), 0.0)
    assert receiver.latched == ("203.0.113.5", 5004)


def test_ipv4_mapped_source_matches_ipv4_sdp_address():
    receiver = make_receiver()
    receiver.receive(build_rtp(0, 1, 0, 9, b"\xff" * 160), ("::ffff:" + PEER[0], 5004, 0, 0), 0.0)
    assert receiver.latched == ("::ffff:" + PEER[0], 5004)


def test_rtcp_malformed_and_unknown_payloads_are_counted_and_dropped():
    receiver = make_receiver()
    rtcp_rr = struct.pack("!BBHI", 0x80, 201, 1, 9)
    assert receiver.receive(rtcp_rr, PEER, 0.0) == []
    assert receiver.receive(b"\x80\x00\x00", PEER, 0.0) == []
    assert receiver.receive(build_rtp(18, 1, 0, 9, b"\x00" * 20), PEER, 0.0) == []  # G.729: not negotiated
    assert receiver.latched is None  # none of these latch
    stats = receiver.stats
    assert (stats.rtcp, stats.malformed, stats.unknown_payload, stats.packets) == (1, 1, 1, 3)


def test_ssrc_change_continues_timeline_with_pause_as_silence():
    receiver = make_receiver()
    chunks = []
    for i in range(10):  # stream A: 200 ms
        chunks += receiver.receive(build_rtp(0, 100 + i, 9000 + 160 * i, 0xA, b"\x20" * 160), PEER, 0.02 * i)
    # Stream B (e.g. after a transfer) starts 1 s after A's last packet with unrelated numbering.
    for i in range(5):
        chunks += receiver.receive(build_rtp(8, 7 + i, 4_000_000_000 + 160 * i, 0xB, b"\xd5" * 160), PEER, 1.18 + 0.02 * i)
    # A straggler from stream A must not flip the stream back.
    chunks += receiver.receive(build_rtp(0, 110, 9000 + 1600, 0xA, b"\x20" * 160), PEER, 1.3)
    chunks = audio(chunks)
    end = assert_timeline(chunks)
    pause = [c for c in chunks if c.lost_samples]
    # 1.0 s wall-clock gap minus B's first packet's own 160 samples.
    assert [(c.start_sample, c.lost_samples) for c in pause] == [(1600, 8000 - 160)]
    assert end == 1600 + 7840 + 5 * 160
    assert receiver.stats.ssrc_changes == 1
    assert receiver.stats.late == 1


def test_quick_ssrc_change_adds_no_silence():
    receiver = make_receiver()
    chunks = receiver.receive(build_rtp(0, 1, 0, 0xA, b"\xff" * 160), PEER, 0.0)
    chunks += receiver.receive(build_rtp(0, 60000, 123, 0xB, b"\xff" * 160), PEER, 0.02)
    chunks = audio(chunks)
    assert [(c.start_sample, c.lost_samples) for c in chunks] == [(0, 0), (160, 0)]


def test_dtmf_is_emitted_once_and_does_not_disturb_the_audio_timeline():
    receiver = make_receiver()
    out = []
    seq, ts, now = 1, 0, 0.0
    for _ in range(5):  # 100 ms of audio
        out += receiver.receive(build_rtp(0, seq, ts, 5, b"\xff" * 160), PEER, now)
        seq, ts, now = seq + 1, ts + 160, now + 0.02
    # Key press: audio suppressed, event packets every 50 ms (same timestamp), three End packets.
    event_ts = ts
    for duration, end in [(400, False), (800, False), (1200, True), (1200, True), (1200, True)]:
        payload = struct.pack("!BBH", 11, (0x80 if end else 0) | 10, duration)
        out += receiver.receive(build_rtp(101, seq, event_ts, 5, payload, marker=duration == 400), PEER, now)
        seq, now = seq + 1, now + 0.05
    ts = event_ts + 1200
    for _ in range(5):
        out += receiver.receive(build_rtp(0, seq, ts, 5, b"\xff" * 160), PEER, now)
        seq, ts, now = seq + 1, ts + 160, now + 0.02
    assert [e for e in out if isinstance(e, DtmfEvent)] == [DtmfEvent("#", 150, 10, event_ts)]
    chunks = audio(out)
    assert assert_timeline(chunks) == 800 + 1200 + 800
    assert [c.lost_samples for c in chunks if c.lost_samples] == [1200]
    assert receiver.stats.lost_packets == 0


def test_update_changes_codec_and_relatches_on_new_remote():
    receiver = make_receiver()
    receiver.receive(build_rtp(0, 1, 0, 5, b"\xff" * 160), PEER, 0.0)
    new_peer = ("192.0.2.99", 50000)
    receiver.update(expected_host=new_peer[0], expected_port=new_peer[1], codecs={8: "PCMA/8000"}, dtmf_payload_type=None)
    assert receiver.latched is None
    assert receiver.receive(build_rtp(8, 2, 160, 5, b"\xd5" * 160), PEER, 0.02) == []  # old remote
    chunks = receiver.receive(build_rtp(8, 2, 160, 5, audioop.lin2alaw(struct.pack("<160h", *range(160)), 2)), new_peer, 0.02)
    assert receiver.latched == new_peer
    assert chunks[0].pcm == audioop.alaw2lin(audioop.lin2alaw(struct.pack("<160h", *range(160)), 2), 2)
    assert receiver.receive(build_rtp(0, 3, 320, 5, b"\xff" * 160), new_peer, 0.04) == []  # PCMU no longer negotiated
    assert receiver.stats.unknown_payload == 1


def test_update_with_same_remote_keeps_latch():
    receiver = make_receiver()
    receiver.receive(build_rtp(0, 1, 0, 5, b"\xff" * 160), PEER, 0.0)
    receiver.update(expected_host=PEER[0], expected_port=PEER[1], codecs={8: "PCMA"}, dtmf_payload_type=101)
    assert receiver.latched == PEER


def test_unsupported_codec_in_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported codec 'G729' for payload type 18"):
        make_receiver(codecs={18: "G729"})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_fuzz_receiver_never_raises(datagrams):
    receiver = make_receiver(expected_host="0.0.0.0")
    valid = build_rtp(0, 1, 0, 5, b"\xff" * 160)
    for i, data in enumerate([valid] + [b"\x80" + d for d in datagrams] + datagrams):
        for item in receiver.receive(data, PEER, 0.01 * i):
            assert isinstance(item, (AudioChunk, DtmfEvent))
    receiver.poll(10.0)
    receiver.flush()


def test_latches_to_the_signalling_address_when_sdp_names_another():
    # a NAT'd peer: SDP says 192.0.2.2, RTP comes from the SIP peer's address
    rx = RtpReceiver(expected_host="192.0.2.2", expected_port=4000, codecs={0: "PCMU"}, dtmf_payload_type=None,
                     signalling_host="127.0.0.1")
    out = rx.receive(build_rtp(0, 1, 0, 7, b"\xff" * 160), ("127.0.0.1", 5004), 0.0)
    assert rx.latched == ("127.0.0.1", 5004) and out
    assert rx.receive(build_rtp(0, 2, 160, 7, b"\xff" * 160), ("198.51.100.9", 5004), 0.02) == []
    assert rx.stats.foreign_dropped == 1


def test_latch_any_takes_an_unexpected_source_after_the_grace_period():
    rx = RtpReceiver(expected_host="192.0.2.2", expected_port=4000, codecs={0: "PCMU"}, dtmf_payload_type=None,
                     signalling_host="192.0.2.3", latch_grace=1.0, latch="any")
    src = ("198.51.100.9", 6000)
    assert rx.receive(build_rtp(0, 1, 0, 7, b"\xff" * 160), src, 0.0) == []
    assert rx.receive(build_rtp(0, 25, 3840, 7, b"\xff" * 160), src, 0.5) == []
    assert rx.latched is None
    assert rx.receive(build_rtp(0, 51, 8000, 7, b"\xff" * 160), src, 1.0)
    assert rx.latched == src
    assert rx.stats.foreign_dropped == 2


def test_strict_latch_never_takes_a_foreign_source_while_the_legitimate_one_is_late():
    rx = RtpReceiver(expected_host="192.0.2.2", expected_port=4000, codecs={0: "PCMU"}, dtmf_payload_type=None,
                     signalling_host="192.0.2.3", latch_grace=1.0)  # strict is the default
    attacker = ("198.51.100.9", 6000)
    for i in range(200):  # four seconds of a foreign sender, the legitimate source silent
        assert rx.receive(build_rtp(0, i, 160 * i, 7, b"\xff" * 160), attacker, 0.02 * i) == []
    assert rx.latched is None and rx.stats.foreign_dropped == 200
    late = ("192.0.2.2", 4002)  # the SDP address, NAT-rewritten port
    assert audio(rx.receive(build_rtp(0, 9, 0, 8, b"\xff" * 160), late, 4.5))
    assert rx.latched == late
    assert rx.receive(build_rtp(0, 201, 160 * 201, 7, b"\xff" * 160), attacker, 4.52) == []


def test_strict_latch_with_unspecified_sdp_address_takes_only_the_signalling_host():
    rx = RtpReceiver(expected_host="0.0.0.0", expected_port=None, codecs={0: "PCMU"}, dtmf_payload_type=None,
                     signalling_host="192.0.2.3")
    assert rx.receive(build_rtp(0, 1, 0, 7, b"\xff" * 160), ("198.51.100.9", 6000), 0.0) == []
    assert rx.receive(build_rtp(0, 1, 0, 7, b"\xff" * 160), ("192.0.2.3", 6000), 0.02)
    assert rx.latched == ("192.0.2.3", 6000)
    loose = RtpReceiver(expected_host="0.0.0.0", expected_port=None, codecs={0: "PCMU"}, dtmf_payload_type=None,
                        signalling_host="192.0.2.3", latch="any")
    assert loose.receive(build_rtp(0, 1, 0, 7, b"\xff" * 160), ("198.51.100.9", 6000), 0.0)


def test_unknown_latch_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="latch must be one of strict, any"):
        make_receiver(latch="loose")


def test_timestamp_advancing_seconds_per_packet_is_bounded_by_wall_clock():
    """The issue's trigger: each packet's timestamp 5 s past the previous one, 50 packets/s.
    Unbounded, 1000 packets made 5015 s of audio in 20 s; bounded, the timeline follows time."""
    receiver = make_receiver()
    produced = 0
    for i in range(1000):
        for item in receiver.receive(build_rtp(0, i, (i * 5 * 8000) & 0xFFFFFFFF, 7, b"\xff" * 160), PEER, 0.02 * i):
            if isinstance(item, AudioChunk):
                produced += len(item.pcm) // 2
    elapsed = 0.02 * 999
    assert produced <= (elapsed * 1.01 + 1.0) * 8000
    assert produced == receiver.position
    assert receiver.stats.resyncs >= 990  # every jump re-anchored instead of filled


def test_sending_faster_than_real_time_is_dropped_beyond_the_lead():
    receiver = make_receiver()
    chunks = []
    for i in range(500):  # ten seconds of audio sent within one second
        chunks += receiver.receive(build_rtp(0, i, 160 * i, 7, b"\xff" * 160), PEER, 0.002 * i)
    end = assert_timeline(audio(chunks))
    assert end == round((0.002 * 499 * 1.01 + 1.0) * 8000)
    assert receiver.stats.overrun == 500 * 160 - end
    # once wall-clock time catches up, audio flows again, at real time
    more = receiver.receive(build_rtp(0, 500, 160 * 500, 7, b"\xff" * 160), PEER, 3.0)
    assert audio(more) and audio(more)[0].start_sample == end


def test_real_time_stream_with_dtx_and_loss_is_untouched_by_the_bounds():
    receiver = make_receiver()
    chunks = []
    ts, now = 0, 0.0
    for i in range(3000):  # one minute: 20 ms packets, a second of DTX every 5 s, every 10th packet lost
        if i % 250 == 249:
            ts += 8000
            now += 1.0
        if i % 10 != 5:
            chunks += receiver.receive(build_rtp(0, i, ts, 7, b"\xff" * 160), PEER, now)
        chunks += receiver.poll(now)
        ts += 160
        now += 0.02
    chunks += receiver.flush()
    assert assert_timeline(audio(chunks)) == ts  # the whole sender timeline, in place
    assert receiver.stats.overrun == 0 and receiver.stats.resyncs == 0
