"""bench/realtime_latency.py's pure parts: resampling, chunking, the two protocols' completed
transcripts, and how they are matched to the fixture manifest's turns."""

from __future__ import annotations

import numpy as np

from bench.realtime_latency import (
    ItemTracker,
    SegmentTracker,
    Unit,
    hypothesis_text,
    match_turns,
    resample,
    split_chunks,
)
from tests.fixtures_data import Turn, read_pcm16

TURNS = (Turn("one two", 500, 2500, 0), Turn("three four", 4000, 6000, 0), Turn("five", 7500, 8500, 0))


def sent_at(audio_ms: float) -> float:
    """A stream whose chunk holding audio_ms left at 1000 s + audio_ms (20 ms chunks)."""
    return 1000.0 + (audio_ms // 20) * 0.02


def test_resample_keeps_duration_and_level():
    pcm, rate = read_pcm16("prompt_agent-loginok.wav")
    source = np.frombuffer(pcm, dtype="<i2")
    for target in (16_000, 24_000):
        out = resample(pcm, rate, target)
        assert out.dtype == np.int16
        assert abs(len(out) - len(source) * target // rate) <= target // 100  # within 10 ms
        rms_in = np.sqrt(np.mean(source.astype(np.float64) ** 2))
        rms_out = np.sqrt(np.mean(out.astype(np.float64) ** 2))
        assert 0.8 < rms_out / rms_in < 1.2


def test_split_chunks_pads_the_last_with_silence():
    pieces = split_chunks(np.arange(1, 11, dtype=np.int16), 4)
    assert [p.tolist() for p in pieces] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]


def test_segment_tracker_reports_each_completed_segment_once():
    tracker = SegmentTracker()
    first = {"segments": [{"start": "0.100", "end": "2.400", "text": " One two.", "completed": True},
                          {"start": "2.400", "end": "5.000", "text": " three", "completed": False}]}
    again = {"segments": [{"start": "0.100", "end": "2.400", "text": " One two.", "completed": True},
                          {"start": "3.900", "end": "6.100", "text": " Three four.", "completed": True}]}
    a = tracker.feed(first, 10.0)
    b = tracker.feed(again, 11.0)
    assert a == [Unit(100.0, 2400.0, 10.0, " One two.")]
    assert b == [Unit(3900.0, 6100.0, 11.0, " Three four.")]
    assert tracker.feed({"uid": "x", "message": "SERVER_READY"}, 12.0) == []


def test_item_tracker_places_completed_items_by_their_offsets():
    tracker = ItemTracker()
    events = [{"type": "session.created"},
              {"type": "input_audio_buffer.speech_started", "item_id": "i1", "audio_start_ms": 200},
              {"type": "input_audio_buffer.speech_stopped", "item_id": "i1", "audio_end_ms": 2600},
              {"type": "input_audio_buffer.committed", "item_id": "i1"},
              {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1",
               "transcript": "One two."},
              {"type": "error", "error": {"code": "x"}}]
    units = [u for e in events for u in tracker.feed(e, 5.0)]
    assert units == [Unit(200.0, 2600.0, 5.0, "One two.")]
    assert tracker.counts["input_audio_buffer.speech_started"] == 1 and len(tracker.errors) == 1


def test_match_turns_times_lost_partial_split_and_joined_turns():
    units = [
        Unit(300, 2600, 1003.1, "One two."),  # turn 0 in one piece
        Unit(3900, 5000, 1006.5, "Three"),  # turn 1 in two segments: the later one completes it
        Unit(5000, 6100, 1006.9, "four."),
        Unit(8700, 9000, 1009.8, "Five."),  # overlaps nothing; the nearest turn ended 200 ms before
        Unit(10_000, 10_300, 1010.5, "Thank you."),  # 1.5 s after the last turn: matches no turn
    ]
    rows, unmatched = match_turns(TURNS, units, sent_at)
    assert [r["received"] for r in rows] == [True, True, True]
    assert not any(r["partial"] or r["joined"] for r in rows)
    assert rows[0]["latency_ms"] == (1003.1 - sent_at(2499)) * 1000
    assert rows[1]["units"] == 2 and rows[1]["latency_ms"] == (1006.9 - sent_at(5999)) * 1000
    assert rows[2]["latency_ms"] == (1009.8 - sent_at(8499)) * 1000
    assert unmatched == [units[4]]

    lost, _ = match_turns(TURNS, units[:3], sent_at)
    assert not lost[2]["received"] and "latency_ms" not in lost[2]

    cut = [Unit(3900, 4600, 1005.0, "Three")]  # turn 1's end never completed
    rows, _ = match_turns(TURNS, cut, sent_at)
    assert rows[1]["received"] and rows[1]["partial"] and "latency_ms" not in rows[1]

    joined = [Unit(500, 6000, 1007.0, "One two three four.")]  # one transcript for turns 0 and 1
    rows, _ = match_turns(TURNS, joined, sent_at)
    assert rows[0]["joined"] and "latency_ms" not in rows[0]
    assert not rows[1]["joined"] and rows[1]["turns_covered"] == 2
    assert rows[1]["latency_ms"] == (1007.0 - sent_at(5999)) * 1000

    far = [Unit(12_000, 13_000, 1014.0, "Bye.")]
    rows, unmatched = match_turns(TURNS, far, sent_at)
    assert not any(r["received"] for r in rows) and unmatched == far


def test_hypothesis_joins_in_timeline_order():
    units = [Unit(4000, 6000, 2.0, " three four "), Unit(500, 2500, 3.0, "One two"), Unit(None, None, 1.0, "five")]
    assert hypothesis_text(units) == "One two three four five"
