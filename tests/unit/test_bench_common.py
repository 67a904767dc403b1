"""The benchmark helpers: the paced RTP sender over a real socket, RESULTS.md sections,
the /proc readers and the turn-latency matching."""

from __future__ import annotations

import datetime as dt
import os
import socket
import struct
import time

import pytest

from bench import common
from bench.common import Arrival, CallPlan, RtpSender, SentStream
from bench.turn_latency import measure_call
from tests.fixtures_data import get_entry, read_g711


def test_sender_paces_valid_rtp_then_silence():
    payload, codec = read_g711("prompt_agent-loginok.wav")
    payload = payload[:5 * 160 + 80]  # 5.5 packets: the last one is padded with silence
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        sender = RtpSender()
        try:
            stream = SentStream("t", rx.getsockname(), payload, codec, max_tail_s=0.1)
            sender.start(stream)
            packets = [rx.recvfrom(2048) for _ in range(11)]  # 6 payload + 5 tail packets
        finally:
            sender.close()
    for i, (data, source) in enumerate(packets):
        assert source == ("127.0.0.1", sender.port)
        first, second, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
        assert first == 0x80 and second & 0x7F == 0 and ssrc == stream.ssrc
        assert (second & 0x80 != 0) == (i == 0)  # marker on the first packet only
        assert seq == (stream.seq0 + i) & 0xFFFF
        assert ts == (stream.ts0 + 160 * i) & 0xFFFFFFFF
        assert len(data) == 12 + 160
    body = b"".join(p[0][12:] for p in packets[:6])
    assert body[:len(payload)] == payload
    assert set(body[len(payload):]) == {0xFF}  # mu-law silence after the fixture
    assert all(set(p[0][12:]) == {0xFF} for p in packets[6:])
    assert len(stream.sent_wall) == 6  # send times of payload packets only
    gaps = [b - a for a, b in zip(stream.sent_wall, stream.sent_wall[1:])]
    assert sum(gaps) > 0.05  # paced over ~100 ms, not sent in one burst
    assert stream.sent_at_ms(0) == stream.sent_wall[0] and stream.sent_at_ms(45) == stream.sent_wall[2]


def test_sender_stops_a_stream():
    payload, codec = read_g711("prompt_agent-loginok.wav")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        sender = RtpSender()
        try:
            stream = SentStream("t", rx.getsockname(), payload, codec)
            sender.start(stream)
            time.sleep(0.1)
            sender.stop(stream)
            time.sleep(0.1)
            sent = stream.packets_sent
            time.sleep(0.1)
            assert stream.packets_sent == sent < len(payload) // 160
        finally:
            sender.close()


def test_write_section_replaces_only_its_own_block(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    common.write_section("a", "first A")
    common.write_section("b", "only B")
    common.write_section("a", "second A")
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Earshot benchmark results")
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.index("BEGIN a") < text.index("BEGIN b")


def test_percentile():
    assert common.percentile([3, 1, 2], 50) == 2
    assert common.percentile([0, 10], 95) == pytest.approx(9.5)
    assert common.percentile([], 50) != common.percentile([], 50)  # NaN


def test_proc_readers():
    before = common.process_cpu_seconds(os.getpid())
    busy_before = common.machine_busy_seconds()
    start = time.process_time()
    while time.process_time() - start < 0.15:
        pass
    assert common.process_cpu_seconds(os.getpid()) - before >= 0.1
    assert common.machine_busy_seconds() - busy_before >= 0.1  # this process's work counts machine-wide
    udp = common.udp_counters()
    assert {"InDatagrams", "InErrors", "RcvbufErrors"} <= set(udp)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _final(turn: int, start_ms: int, end_ms: int, id_ms: int, reason: str = "silence") -> Arrival:
    """A turn.final built 5 ms before Redis accepted it."""
    event = {"type": "turn.final", "turn": turn, "start_ms": start_ms, "end_ms": end_ms, "reason": reason,
             "text": "x", "latency_ms": 1.0, "asr": {"processing_ms": 2.0, "speculative": True},
             "time": _iso(id_ms / 1000 - 0.005)}
    return Arrival(f"{id_ms}-0", id_ms, id_ms / 1000 + 0.002, event)


def test_turn_latency_matches_finals_to_manifest_turns():
    entry = get_entry("caller_02_conference.wav")  # turns (500, 2690), (3690, 5990), (7490, 10460), (11460, 13590), ...
    payload, codec = read_g711(entry.file)
    stream = SentStream("t", ("127.0.0.1", 9), payload, codec)
    t0 = 1_000_000.0
    stream.sent_wall = [t0 + 0.02 * i for i in range(stream.payload_packets)]
    answered = "1970-01-12T13:46:39.900Z"  # t0 - 100 ms: call offsets are 100 ms later than fixture offsets
    started = Arrival("0-0", 0, 0.0, {"type": "call.started", "time": answered, "call_id": "c1"})
    plan = CallPlan(entry, "x", stream=stream, events=[
        started,
        _final(1, 100 + 200, 100 + 2840, int((t0 + 3.4) * 1000)),
        _final(2, 100 + 3390, 100 + 10600, int((t0 + 11.0) * 1000)),  # covers manifest turns 2 and 3
        _final(3, 100 + 11400, 100 + 13700, int((t0 + 14.2) * 1000), "semantic"),
    ])
    # the model's answer that ended turn 3, and a "not yet" inside it (a short dip)
    asks = {"c1": [{"wall": t0 + 12.9, "turn": 3, "p": 0.2, "ends": False},
                   {"wall": t0 + 13.9, "turn": 3, "p": 0.9, "ends": True}]}
    call = measure_call(plan, asks, pad_after_ms=100)
    rows = call["finals"]
    assert call["cuts"] == []
    assert [(e["final"], e["outcome"]) for e in call["ends"]] == [(0, "final"), (1, "merged"), (1, "final"),
                                                                 (2, "final"), (None, "lost")]
    assert [r["speech_end_ms"] for r in rows] == [2690, 10460, 13590]
    # last voiced sample 2689 ms is in packet 134, sent at t0 + 2.68 s
    assert rows[0]["latency_ms"] == pytest.approx(3400 - 2680, abs=1)
    assert rows[1]["latency_ms"] == pytest.approx(11000 - 10440, abs=1)
    assert rows[0]["xread_latency_ms"] == pytest.approx(rows[0]["latency_ms"] + 2, abs=1)
    assert rows[0]["publish_ms"] == pytest.approx(5, abs=1)
    assert rows[0]["vad_end_lag_ms"] == pytest.approx(2840 - 100 - 2690)
    assert "decision_ms" not in rows[0]
    # turn 3's end of speech (13589 ms) went at t0 + 13.58 s; the answer came 320 ms later
    assert rows[2]["decision_ms"] == pytest.approx(320, abs=1)
    assert rows[2]["decision_to_built_ms"] == pytest.approx(14195 - 13900, abs=1)
    assert [a["where"] for a in call["asks"]] == ["other", "end"]
    assert call["hypothesis"] == "x x x"
