"""TurnDetector timing with synthetic probability sequences.

Chunk audio encodes its own sample positions (sample i holds i mod 32768),
so every emitted audio array can be checked against its claimed bounds.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.media.turn import (
    PartialDue,
    TurnConfig,
    TurnDetector,
    TurnDiscarded,
    TurnEnding,
    TurnFinal,
    TurnResumed,
    TurnStarted,
)

CHUNK = 256  # 32 ms at 8 kHz
SPEECH, SILENCE = 0.9, 0.05


def positions(start: int, end: int) -> np.ndarray:
    return (np.arange(start, end) % 32768).astype(np.int16)


class Feeder:
    """Feeds chunks with position-encoded audio and records (chunk index, event)."""

    def __init__(self, config: TurnConfig | None = None, start: int = 0) -> None:
        self.det = TurnDetector(config or TurnConfig(partial_interval_ms=0))
        self.pos = start
        self.index = 0
        self.events: list[tuple[int, object]] = []

    def feed(self, *probs: float) -> list[object]:
        out = []
        for p in probs:
            evs = self.det.feed(positions(self.pos, self.pos + CHUNK), p, start_sample=self.pos if self.index == 0 else None)
            self.events += [(self.index, e) for e in evs]
            out += evs
            self.pos += CHUNK
            self.index += 1
        return out

    def run(self, prob: float, n: int) -> list[object]:
        return self.feed(*([prob] * n))

    def flush(self) -> list[object]:
        evs = self.det.flush()
        self.events += [(self.index, e) for e in evs]
        return evs

    def of(self, kind: type) -> list[tuple[int, object]]:
        return [(i, e) for i, e in self.events if isinstance(e, kind)]


def assert_audio(event) -> None:
    assert event.audio.dtype == np.int16
    assert np.array_equal(event.audio, positions(event.start_sample, event.end_sample))


def test_start_final_positions_and_padding():
    f = Feeder()
    f.run(SILENCE, 20)
    assert f.feed(SPEECH) == [TurnStarted(0, 20 * CHUNK - 2400)]  # 300 ms pre-roll
    f.run(SPEECH, 19)
    f.run(SILENCE, 30)
    [(i, final)] = f.of(TurnFinal)
    last_voiced_end = 40 * CHUNK
    # 500 ms = 4000 samples of silence: the 16th silent chunk (512 ms) ends the turn.
    assert i == 40 + 15
    assert (final.turn, final.start_sample, final.end_sample, final.reason) == (0, 20 * CHUNK - 2400, last_voiced_end + 1200, "silence")
    assert_audio(final)
    assert not f.det.in_turn


def test_pre_roll_clamped_at_stream_start_and_start_sample_offset():
    f = Feeder(start=1_000_000)
    f.run(SILENCE, 3)
    f.run(SPEECH, 10)
    f.run(SILENCE, 20)
    [(_, started)] = f.of(TurnStarted)
    assert started.start_sample == 1_000_000  # only 768 samples of pre-roll existed
    [(_, final)] = f.of(TurnFinal)
    assert (final.start_sample, final.end_sample) == (1_000_000, 1_000_000 + 13 * CHUNK + 1200)
    assert_audio(final)


def test_silence_threshold_exact():
    cfg = TurnConfig(silence_ms=512, speculative_ms=200, partial_interval_ms=0)  # exactly 16 chunks
    f = Feeder(cfg)
    f.run(SPEECH, 10)
    f.run(SILENCE, 15)
    assert not f.of(TurnFinal) and f.det.in_turn
    f.run(SPEECH, 1)  # 480 ms of silence was not enough
    f.run(SILENCE, 15)
    assert not f.of(TurnFinal)
    events = f.run(SILENCE, 1)
    assert [type(e) for e in events] == [TurnFinal]
    assert events[0].end_sample == 26 * CHUNK + 1200


def test_min_speech_discard():
    f = Feeder()
    f.run(SILENCE, 5)
    f.run(SPEECH, 7)  # 224 ms < 250 ms
    f.run(SILENCE, 20)
    assert [type(e) for _, e in f.events] == [TurnStarted, TurnDiscarded]
    assert f.events[1][1] == TurnDiscarded(0)
    f.run(SPEECH, 8)  # 256 ms: kept, as the next turn number
    f.run(SILENCE, 20)
    assert [type(e) for _, e in f.events[2:]] == [TurnStarted, TurnEnding, TurnFinal]
    assert f.events[-1][1].turn == 1


def test_speculative_ending_then_resume_then_final_identical():
    f = Feeder()
    f.run(SPEECH, 20)
    assert f.run(SILENCE, 6) == []  # 192 ms < 200 ms speculative
    [ending] = f.run(SILENCE, 1)  # 224 ms
    assert isinstance(ending, TurnEnding)
    assert (ending.turn, ending.start_sample, ending.end_sample) == (0, 0, 20 * CHUNK + 1200)
    assert_audio(ending)
    assert f.run(SPEECH, 1) == [TurnResumed(0)]
    f.run(SPEECH, 9)
    f.run(SILENCE, 6)
    [ending2] = f.run(SILENCE, 1)
    assert isinstance(ending2, TurnEnding) and ending2.end_sample == 37 * CHUNK + 1200
    f.run(SILENCE, 8)
    assert not f.of(TurnFinal)
    [final] = f.run(SILENCE, 1)  # 16th silent chunk
    assert isinstance(final, TurnFinal) and final.reason == "silence"
    assert (final.turn, final.start_sample, final.end_sample) == (ending2.turn, ending2.start_sample, ending2.end_sample)
    assert np.array_equal(final.audio, ending2.audio)
    assert final.audio is not ending2.audio
    assert [type(e) for _, e in f.events] == [TurnStarted, TurnEnding, TurnResumed, TurnEnding, TurnFinal]


def test_hysteresis():
    # neg_threshold defaults to 0.35: 0.4 keeps speech going, but does not resume it.
    f = Feeder()
    f.run(SPEECH, 10)
    f.run(0.4, 10)
    f.run(SILENCE, 1)
    f.run(0.4, 14)  # silence started: 0.4 no longer counts as speech
    f.run(SILENCE, 1)
    [(i, final)] = f.of(TurnFinal)
    assert final.end_sample == 20 * CHUNK + 1200
    assert i == 20 + 15
    # A chunk in the band does not open a turn either.
    g = Feeder()
    g.run(0.45, 30)
    assert g.events == []


def test_max_length_split_at_lowest_probability_chunk():
    cfg = TurnConfig(max_turn_s=3.0, partial_interval_ms=0)  # 24000 samples
    probs = [SPEECH] * 94
    probs[10] = 0.36  # quieter, but more than 2 s before the split
    probs[70] = 0.40  # quietest within the last 2 s (chunks 32..93)
    f = Feeder(cfg)
    events = []
    for p in probs[:93]:
        events += f.feed(p)
    assert [type(e) for e in events] == [TurnStarted]
    events = f.feed(probs[93])  # its end (24064) reaches max_turn
    split = 70 * CHUNK + CHUNK // 2
    assert [type(e) for e in events] == [TurnFinal, TurnStarted]
    first, started = events
    assert (first.turn, first.start_sample, first.end_sample, first.reason) == (0, 0, split, "max_length")
    assert_audio(first)
    assert started == TurnStarted(1, split)
    f.run(SPEECH, 1)
    f.run(SILENCE, 20)
    [(_, second)] = [(i, e) for i, e in f.of(TurnFinal) if e.turn == 1]
    assert (second.start_sample, second.end_sample, second.reason) == (split, 95 * CHUNK + 1200, "silence")
    assert_audio(second)


def test_max_length_split_remainder_is_never_discarded():
    cfg = TurnConfig(max_turn_s=3.0, partial_interval_ms=0)
    f = Feeder(cfg)
    f.run(SPEECH, 93)
    [first, started] = f.feed(0.4)  # the quietest chunk is the last one: split in its middle
    split = 93 * CHUNK + CHUNK // 2
    assert (first.end_sample, started.start_sample) == (split, split)
    f.run(SILENCE, 20)  # only 16 ms of speech follow the split: still a real turn's tail
    [(_, tail)] = [(i, e) for i, e in f.of(TurnFinal) if e.turn == 1]
    assert (tail.start_sample, tail.end_sample) == (split, 94 * CHUNK + 1200)
    assert not f.of(TurnDiscarded)


def test_max_length_during_silence_finalises_with_pending_ending_audio():
    cfg = TurnConfig(max_turn_s=3.0, partial_interval_ms=0)
    f = Feeder(cfg)
    f.run(SPEECH, 86)
    f.run(SILENCE, 7)  # TurnEnding at the 7th silent chunk (ends at 23808)
    [(_, ending)] = f.of(TurnEnding)
    events = f.run(SILENCE, 1)  # ends at 24064 >= 24000 with 256 ms of silence
    assert [type(e) for e in events] == [TurnFinal]
    assert events[0].reason == "max_length"
    assert (events[0].start_sample, events[0].end_sample) == (ending.start_sample, ending.end_sample)
    assert np.array_equal(events[0].audio, ending.audio)


def test_partial_cadence():
    cfg = TurnConfig(partial_interval_ms=1000)
    f = Feeder(cfg)
    f.run(SILENCE, 10)
    f.run(SPEECH, 70)  # speech starts at 2560
    partials = f.of(PartialDue)
    # Due at 1 s and 2 s of speech, on the first chunk end at or after those.
    assert [i for i, _ in partials] == [10 + 31, 10 + 62]
    for i, p in partials:
        assert (p.turn, p.start_sample, p.end_sample) == (0, 2560 - 2400, (i + 1) * CHUNK)
        assert_audio(p)
    # No partials while silent; after the pause the cadence stays on the 1 s grid.
    f.run(SILENCE, 12)  # chunks 80..91: 384 ms, not the end of the turn
    f.run(SPEECH, 5)  # chunks 92..96 end before the next due point, 2560 + 24000
    assert len(f.of(PartialDue)) == 2
    f.run(SPEECH, 11)  # chunk 103 is the first to end at or after 26560
    assert [i for i, _ in f.of(PartialDue)][2:] == [103]


def test_partials_missed_in_a_pause_are_skipped():
    cfg = TurnConfig(partial_interval_ms=200)
    f = Feeder(cfg)
    f.run(SPEECH, 10)  # due at 200 ms, but held until min_speech_ms: chunk 7 ends at 256 ms
    f.run(SILENCE, 15)  # 320..800 ms: due points 400 and 600 pass silently
    f.run(SPEECH, 8)  # chunks 25..32
    assert [i for i, _ in f.of(PartialDue)] == [7, 25, 31]  # resume at 832 ms, then next due at 1000 ms


def test_partials_disabled():
    f = Feeder(TurnConfig(partial_interval_ms=0))
    f.run(SPEECH, 200)
    assert f.of(PartialDue) == []


def test_flush():
    f = Feeder()
    assert f.flush() == []
    f.run(SPEECH, 20)
    [final] = f.flush()
    assert isinstance(final, TurnFinal) and final.reason == "flush"
    assert (final.start_sample, final.end_sample) == (0, 20 * CHUNK)
    assert_audio(final)
    assert f.flush() == []

    # After a speculative ending, flush gives the same audio.
    g = Feeder()
    g.run(SPEECH, 20)
    g.run(SILENCE, 10)
    [(_, ending)] = g.of(TurnEnding)
    [final] = g.flush()
    assert final.reason == "flush" and (final.start_sample, final.end_sample) == (ending.start_sample, ending.end_sample)
    assert np.array_equal(final.audio, ending.audio)

    # Silence shorter than pad_after: the final stops at the last sample fed.
    h = Feeder()
    h.run(SPEECH, 20)
    h.run(SILENCE, 2)
    [final] = h.flush()
    assert final.end_sample == 22 * CHUNK

    k = Feeder()
    k.run(SPEECH, 3)
    assert k.flush() == [TurnDiscarded(0)]


def test_next_pre_roll_never_overlaps_previous_turn():
    cfg = TurnConfig(silence_ms=256, speculative_ms=160, pad_after_ms=150, pad_before_ms=1000, partial_interval_ms=0)
    f = Feeder(cfg)
    f.run(SPEECH, 10)
    f.run(SILENCE, 8)  # final at 256 ms of silence, ends at 2560 + 1200
    f.run(SPEECH, 10)
    f.run(SILENCE, 8)
    finals = [e for _, e in f.of(TurnFinal)]
    assert [e.turn for e in finals] == [0, 1]
    assert finals[1].start_sample == finals[0].end_sample == 10 * CHUNK + 1200
    assert_audio(finals[1])


def test_bounded_memory():
    f = Feeder(TurnConfig(max_turn_s=20.0, partial_interval_ms=0))
    tracemalloc.start()
    try:
        f.run(SILENCE, 100)
        baseline = tracemalloc.get_traced_memory()[0]
        f.run(SILENCE, 20_000)  # 10+ minutes of silence
        assert f.events == []
        assert f.det.buffered_samples <= 2400 + CHUNK
        grown_silent = tracemalloc.get_traced_memory()[0] - baseline
        for _ in range(20):  # 10+ minutes of speech: split every 20 s
            f.run(SPEECH, 1000)
            assert len(f.of(TurnFinal)) >= 1
            f.events.clear()  # drop the emitted audio: only the detector's own memory is measured
            assert f.det.buffered_samples <= 20 * 8000 + CHUNK
        grown_speech = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert grown_silent < 64 * 1024
    assert grown_speech < 2 * (2 * 20 * 8000 * 2)  # buffer at most ~2x a max turn of int16


def test_turn_numbers_count_up():
    f = Feeder()
    for _ in range(3):
        f.run(SPEECH, 10)
        f.run(SILENCE, 20)
    assert [e.turn for _, e in f.of(TurnStarted)] == [0, 1, 2]
    assert [e.turn for _, e in f.of(TurnFinal)] == [0, 1, 2]


def test_bad_input_is_rejected():
    det = TurnDetector()
    with pytest.raises(ValueError, match="int16"):
        det.feed(np.zeros(256, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match="int16"):
        det.feed([0] * 256, 0.5)
    with pytest.raises(ValueError, match="empty"):
        det.feed(np.zeros(0, dtype=np.int16), 0.5)
    for p in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match="probability"):
            det.feed(np.zeros(256, dtype=np.int16), p)
    det.feed(np.zeros(256, dtype=np.int16), 0.9)
    with pytest.raises(ValueError, match="start_sample"):
        det.feed(np.zeros(256, dtype=np.int16), 0.9, start_sample=1024)  # gap inside a turn
    assert det.position == 256  # rejected input changed nothing


def test_skip_ahead_between_turns():
    f = Feeder()
    f.run(SILENCE, 5)
    events = f.det.feed(positions(100_000, 100_256), SPEECH, start_sample=100_000)
    assert events == [TurnStarted(0, 100_000)]  # the old pre-roll is not adjacent any more
    with pytest.raises(ValueError):
        f.det.feed(positions(0, 256), SPEECH, start_sample=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"neg_threshold": 0.6},
        {"silence_ms": 0},
        {"speculative_ms": 100},  # < pad_after_ms
        {"speculative_ms": 500},  # not < silence_ms
        {"max_turn_s": 1.0},
        {"min_speech_ms": -1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        TurnConfig(**kwargs)


@settings(max_examples=150, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.7, 1.0]), st.integers(1, 40)),
        min_size=1,
        max_size=40,
    ),
    flush=st.booleans(),
)
def test_event_invariants(runs, flush):
    """Any probability sequence gives a well-formed event stream."""
    cfg = TurnConfig(max_turn_s=4.0, partial_interval_ms=700)
    f = Feeder(cfg)
    for prob, n in runs:
        f.run(prob, n)
    if flush:
        f.flush()
    open_turn = None
    ending = None
    last_end = 0
    expected_turn = 0
    for _, e in f.events:
        if isinstance(e, TurnStarted):
            assert open_turn is None and e.turn == expected_turn
            assert e.start_sample >= last_end
            open_turn, ending, expected_turn = e, None, expected_turn + 1
            continue
        assert open_turn is not None and e.turn == open_turn.turn
        if isinstance(e, (PartialDue, TurnEnding, TurnFinal)):
            assert_audio(e)
            assert e.start_sample == open_turn.start_sample
            assert 0 < e.end_sample - e.start_sample <= 4 * 8000
        if isinstance(e, TurnEnding):
            assert ending is None
            ending = e
        elif isinstance(e, TurnResumed):
            assert ending is not None
            ending = None
        elif isinstance(e, (TurnFinal, TurnDiscarded)):
            if isinstance(e, TurnDiscarded):
                assert ending is None
            else:
                if ending is not None:
                    assert (e.start_sample, e.end_sample) == (ending.start_sample, ending.end_sample)
                    assert np.array_equal(e.audio, ending.audio)
                last_end = e.end_sample
            open_turn = None
    if flush:
        assert open_turn is None


def test_max_length_split_in_fluent_speech_goes_to_the_quietest_chunk():
    """VAD saturates in fluent speech: equal probabilities, so the audio's energy decides."""
    det = TurnDetector(TurnConfig(max_turn_s=3.0, partial_interval_ms=0))
    loud = (np.sin(np.arange(CHUNK) / 3.0) * 8000).astype(np.int16)
    quiet = (loud // 40).astype(np.int16)  # a breath between words
    events = []
    for i in range(94):
        events += det.feed(quiet if i == 80 else loud, 0.97)
    finals = [e for e in events if isinstance(e, TurnFinal)]
    assert len(finals) == 1 and finals[0].reason == "max_length"
    assert finals[0].end_sample == 80 * CHUNK + CHUNK // 2
