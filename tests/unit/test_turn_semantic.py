"""The semantic turn policy: the turn detector asks an end-of-turn model at each pause.

Detector tests feed synthetic probabilities chunk by chunk (fake time: one chunk is 32 ms)
and answer the questions with chosen probabilities. Leg tests run the LegPipeline with the
stub transcriber and a stub model; the last one runs real Silero VAD over fixture recordings
and shows that semantic finals are decided earlier than silence ones when the model says
"complete" at true turn ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np
import pytest

from gateway.app import EndOfTurnModel, turn_config
from gateway.asr.stub import StubTranscriber
from gateway.config import ConfigError, Settings, load_settings
from gateway.events import CallInfo, Event, EventFactory, Source
from gateway.media.resample import upsample_8k_to_16k
from gateway.media.turn import (
    QUERY_WINDOW_S,
    EndOfTurnQuery,
    TurnConfig,
    TurnDetector,
    TurnDiscarded,
    TurnEnding,
    TurnFinal,
    TurnResumed,
    TurnStarted,
)
from gateway.media.vad import BatchedVadRunner, SileroVad
from gateway.pipeline import CHUNK, LegPipeline, SpeechStarted, SpeechStopped
from gateway.session import LegSpec, SessionHost
from tests.fixtures_data import get_entry, load_manifest, read_pcm16
from tests.unit.test_turn import SILENCE, SPEECH, Feeder, assert_audio, positions

# the gateway's defaults: the speculative final after 100 ms (4 chunks), the question after
# 150 ms (5 chunks), the end at the latest after 1500 ms (47 chunks); the model alone decides
# here (semantic_text off); WITH_TEXT also reads the speculative final's text (the default)
SEMANTIC = TurnConfig(policy="semantic", pad_after_ms=100, speculative_ms=100, semantic_min_silence_ms=150,
                      semantic_max_silence_ms=1500, semantic_threshold=0.5, partial_interval_ms=0,
                      semantic_text=False)
WITH_TEXT = dataclasses.replace(SEMANTIC, semantic_text=True)
ASK_AT = 5  # silent chunks until the question
MAX_AT = 47  # silent chunks until the silence bound


def speak(f: Feeder, chunks: int = 20) -> None:
    f.run(SILENCE, 5)
    f.run(SPEECH, chunks)


def only(f: Feeder, kind: type):
    (item,) = [e for _, e in f.of(kind)]
    return item


# -- the detector ------------------------------------------------------------------------

def test_complete_ends_the_turn_at_the_first_pause_with_the_speculations_bounds():
    f = Feeder(SEMANTIC)
    speak(f)
    voiced_end = f.pos
    events = f.run(SILENCE, ASK_AT - 1)
    assert [type(e) for e in events] == [TurnEnding]  # the speculative final starts at 100 ms
    (query,) = f.run(SILENCE, 1)
    assert isinstance(query, EndOfTurnQuery) and f.det.pending_query == query.query
    # the model hears the turn up to now, the pause included
    assert (query.start_sample, query.end_sample) == (only(f, TurnStarted).start_sample, f.pos)
    assert np.array_equal(query.audio, positions(query.start_sample, query.end_sample))
    (final,) = f.det.answer(query.query, 0.9)
    ending = only(f, TurnEnding)
    assert isinstance(final, TurnFinal) and final.reason == "semantic"
    assert (final.start_sample, final.end_sample) == (ending.start_sample, ending.end_sample)
    assert final.end_sample == voiced_end + 800  # pad_after_ms of the pause
    assert_audio(final)
    assert not f.det.in_turn and f.det.pending_query is None
    # the next turn is a new one, with its own pre-roll after this turn's end
    f.run(SILENCE, 3)
    (started,) = [e for e in f.feed(SPEECH) if isinstance(e, TurnStarted)]
    assert started.turn == 1 and started.start_sample >= final.end_sample


def test_incomplete_waits_for_the_longer_silence_and_reuses_the_speculation():
    f = Feeder(SEMANTIC)
    speak(f)
    f.run(SILENCE, ASK_AT)
    query = only(f, EndOfTurnQuery)
    assert f.det.answer(query.query, 0.2) == []
    assert f.det.in_turn and f.det.pending_query is None
    assert not f.of(TurnFinal)
    f.run(SILENCE, MAX_AT - ASK_AT - 1)
    assert not f.of(TurnFinal)  # 1472 ms of silence: not yet
    (final,) = f.run(SILENCE, 1)
    ending = only(f, TurnEnding)
    assert isinstance(final, TurnFinal) and final.reason == "silence"
    assert (final.start_sample, final.end_sample) == (ending.start_sample, ending.end_sample)
    assert len(f.of(EndOfTurnQuery)) == 1  # one question per pause


def test_the_threshold_is_inclusive():
    for probability, ends in ((0.5, True), (0.4999, False)):
        f = Feeder(SEMANTIC)
        speak(f)
        f.run(SILENCE, ASK_AT)
        assert bool(f.det.answer(only(f, EndOfTurnQuery).query, probability)) is ends


def test_speech_resuming_during_the_check_makes_the_answer_stale_and_the_next_pause_asks_again():
    f = Feeder(SEMANTIC)
    speak(f)
    f.run(SILENCE, ASK_AT)
    first = only(f, EndOfTurnQuery)
    assert f.feed(SPEECH) == [TurnResumed(0)]  # "my account number is ... seven"
    assert f.det.pending_query is None
    assert f.det.answer(first.query, 1.0) == []  # the model said complete, too late: ignored
    assert f.det.in_turn
    f.run(SPEECH, 10)
    f.run(SILENCE, ASK_AT)
    second = [e for _, e in f.of(EndOfTurnQuery)][-1]
    assert second.query > first.query and second.turn == 0
    assert f.det.answer(first.query, 1.0) == []  # still stale
    (final,) = f.det.answer(second.query, 1.0)
    ending = [e for _, e in f.of(TurnEnding)][-1]
    assert final.reason == "semantic" and final.turn == 0
    assert (final.start_sample, final.end_sample) == (ending.start_sample, ending.end_sample)
    assert final.end_sample == 41 * CHUNK + 800  # the whole turn, both parts (5 + 20 + 5 + 11 chunks)
    assert_audio(final)


def test_a_model_slower_than_the_pause_is_ignored():
    f = Feeder(SEMANTIC)
    speak(f)
    f.run(SILENCE, MAX_AT)
    query = only(f, EndOfTurnQuery)
    assert only(f, TurnFinal).reason == "silence"
    assert f.det.answer(query.query, 1.0) == []  # after the turn ended on silence: nothing
    # ... nor once the next turn is open
    speak(f)
    assert f.det.in_turn
    assert f.det.answer(query.query, 1.0) == []
    assert f.det.in_turn


def test_no_answer_at_all_ends_the_turn_at_the_silence_bound():
    """A failing model answers nothing: the turn is not lost, it ends at max silence."""
    f = Feeder(SEMANTIC)
    speak(f)
    f.run(SILENCE, MAX_AT)
    final = only(f, TurnFinal)
    assert final.reason == "silence" and f.of(TurnFinal)[0][0] == 25 + MAX_AT - 1


def test_a_burst_too_short_to_ask_about_is_discarded_after_the_silence_rule():
    f = Feeder(SEMANTIC)
    f.run(SILENCE, 5)
    f.run(SPEECH, 5)  # 160 ms < min_speech_ms
    f.run(SILENCE, 15)
    assert not f.of(EndOfTurnQuery) and not f.of(TurnEnding) and f.det.in_turn
    f.run(SILENCE, 1)  # 512 ms >= silence_ms
    assert [type(e) for _, e in f.events] == [TurnStarted, TurnDiscarded]


def test_max_length_during_a_pause_and_flush_clear_the_question():
    cfg = TurnConfig(policy="semantic", max_turn_s=3.0, pad_after_ms=100, speculative_ms=100, partial_interval_ms=0)
    f = Feeder(cfg)
    f.run(SPEECH, 85)  # 2720 ms
    f.run(SILENCE, 9)  # the turn reaches 3 s in the pause
    query = only(f, EndOfTurnQuery)
    assert only(f, TurnFinal).reason == "max_length"
    assert f.det.answer(query.query, 1.0) == []
    f = Feeder(SEMANTIC)
    speak(f)
    f.run(SILENCE, ASK_AT)
    query = only(f, EndOfTurnQuery)
    (final,) = f.flush()
    assert final.reason == "flush" and f.det.answer(query.query, 1.0) == []


def test_the_question_carries_at_most_the_models_window():
    f = Feeder(TurnConfig(policy="semantic", max_turn_s=20.0, partial_interval_ms=0))
    f.run(SPEECH, 375)  # 12 s
    f.run(SILENCE, 5)
    query = only(f, EndOfTurnQuery)
    assert query.end_sample == f.pos
    assert query.end_sample - query.start_sample == QUERY_WINDOW_S * 8000 == query.audio.size
    assert np.array_equal(query.audio, positions(query.start_sample, query.end_sample))


def test_the_silence_policy_asks_nothing():
    f = Feeder(TurnConfig(partial_interval_ms=0))
    speak(f)
    f.run(SILENCE, 20)
    assert not f.of(EndOfTurnQuery) and only(f, TurnFinal).reason == "silence"
    assert f.det.pending_query is None and f.det.answer(0, 1.0) == []


def test_semantic_config_is_validated():
    with pytest.raises(ValueError, match="pad_after_ms <= semantic_min_silence_ms"):
        TurnConfig(policy="semantic", pad_after_ms=150, speculative_ms=200, semantic_min_silence_ms=100)
    with pytest.raises(ValueError, match="semantic_min_silence_ms < semantic_max_silence_ms"):
        TurnConfig(policy="semantic", semantic_min_silence_ms=500, semantic_max_silence_ms=500)
    with pytest.raises(ValueError, match="policy"):
        TurnConfig(policy="llm")  # type: ignore[arg-type]
    for threshold in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="semantic_threshold"):
            TurnConfig(semantic_threshold=threshold)
    # the silence policy does not care how its semantic fields would fit
    TurnConfig(pad_after_ms=200, speculative_ms=300, semantic_min_silence_ms=100)
    det = TurnDetector(SEMANTIC)
    with pytest.raises(ValueError, match="probability"):
        det.answer(0, float("nan"))


def test_settings_build_the_semantic_config():
    s = load_settings(environ={"EARSHOT_TURN_DETECTION": "semantic", "EARSHOT_SEMANTIC_MIN_SILENCE_MS": "200",
                               "EARSHOT_SEMANTIC_MAX_SILENCE_MS": "1800", "EARSHOT_SEMANTIC_THRESHOLD": "0.6"})
    cfg = turn_config(s)
    assert (cfg.policy, cfg.semantic_min_silence_ms, cfg.semantic_max_silence_ms, cfg.semantic_threshold) == (
        "semantic", 200, 1800, 0.6)
    assert turn_config(Settings()).policy == "silence"  # the default, until the bench picks one
    with pytest.raises(ConfigError, match="^turn_detection: must be silence or semantic"):
        load_settings(environ={"EARSHOT_TURN_DETECTION": "smart"})
    with pytest.raises(ConfigError, match="^semantic_min_silence_ms: need semantic_min_silence_ms <"):
        load_settings(environ={"EARSHOT_SEMANTIC_MIN_SILENCE_MS": "1500"})
    with pytest.raises(ConfigError, match="^semantic_min_silence_ms: need pad_after_ms <="):
        load_settings(environ={"EARSHOT_TURN_DETECTION": "semantic", "EARSHOT_PAD_AFTER_MS": "200",
                               "EARSHOT_SPECULATIVE_MS": "200"})
    load_settings(environ={"EARSHOT_PAD_AFTER_MS": "200", "EARSHOT_SPECULATIVE_MS": "200"})  # silence: fine


# -- the leg ------------------------------------------------------------------------------

class StubModel:
    """An end-of-turn model answering ``probability`` (or raising it), keeping what it heard."""

    def __init__(self, probability: float | Exception = 1.0) -> None:
        self.probability = probability
        self.heard: list[np.ndarray] = []
        self.release: asyncio.Event | None = None  # set: answer only once released

    async def __call__(self, audio16k: np.ndarray) -> float:
        self.heard.append(audio16k)
        if self.release is not None:
            await self.release.wait()
        if isinstance(self.probability, Exception):
            raise self.probability
        return self.probability


class Leg:
    """A LegPipeline fed synthetic probabilities straight into on_vad (no VAD), chunk by chunk."""

    def __init__(self, model: StubModel | None, *, wideband: bool = False, config: TurnConfig = SEMANTIC) -> None:
        self.published: list[Event] = []
        self.observed: list = []
        events = EventFactory(CallInfo("call-1", "", "", "", time.time()))
        self.pipeline = LegPipeline(key="call-1/caller", leg="caller", events=events, publish=self.published.append,
                                    transcriber=StubTranscriber(), turn_config=config, language=None,
                                    partials=False, wideband=wideband, observer=self.observed.append,
                                    end_of_turn=model)
        self.pos = 0
        self.rng = np.random.default_rng(3)

    async def run(self, probability: float, chunks: int) -> None:
        for _ in range(chunks):
            if self.pipeline.wideband:
                pcm = (self.rng.standard_normal(2 * CHUNK) * 3000).astype(np.int16)
                self.pipeline.feed_wideband(pcm, time.monotonic())
            else:
                self.pipeline.feed_audio(positions(self.pos, self.pos + CHUNK).tobytes(), time.monotonic())
            chunk = self.pipeline.next_chunk()
            assert chunk is not None
            self.pipeline.on_vad(chunk, probability)
            self.pos += CHUNK
            for _ in range(3):  # let the model's answer (and the stub ASR) come back
                await asyncio.sleep(0)

    def finals(self) -> list[Event]:
        return [e for e in self.published if e.type == "turn.final"]


async def test_a_complete_answer_publishes_the_speculative_final_at_the_first_pause():
    model = StubModel(0.9)
    leg = Leg(model)
    await leg.run(SILENCE, 5)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT + 2)
    (final,) = leg.finals()
    assert final.data["reason"] == "semantic" and final.data["asr"]["speculative"] is True
    assert final.data["end_ms"] == 25 * 32 + 100
    # a telephone leg's question is upsampled: the model hears 16 kHz, from the turn's start
    # (sample 0: less than the 300 ms pre-roll came before the speech) to the pause's 5th chunk
    (heard,) = model.heard
    assert heard.dtype == np.float32 and heard.size == 2 * (25 + ASK_AT) * CHUNK
    # resampled as a whole would give the same (only the pause since the speculative final is new)
    assert np.allclose(heard, upsample_8k_to_16k(positions(0, (25 + ASK_AT) * CHUNK)), atol=1e-6)
    await leg.pipeline.close()


async def test_a_wideband_leg_asks_with_its_16_khz_audio():
    model = StubModel(0.9)
    leg = Leg(model, wideband=True)
    await leg.run(SILENCE, 5)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT + 1)
    (heard,) = model.heard
    history = leg.pipeline._history  # the turn starts at sample 0 (all of the 160 ms before it is pre-roll)
    expected = history.slice(0, 2 * (25 + ASK_AT) * CHUNK).astype(np.float32) / 32768
    assert heard.size == expected.size and np.abs(heard).max() > 0
    assert np.array_equal(heard, expected)
    assert [f.data["reason"] for f in leg.finals()] == ["semantic"]
    await leg.pipeline.close()


async def test_an_incomplete_answer_and_resumed_speech_keep_the_turn_open():
    model = StubModel(0.1)
    leg = Leg(model)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT + 5)  # asked: incomplete
    assert not leg.finals() and len(model.heard) == 1
    await leg.run(SPEECH, 10)  # the speaker goes on
    model.probability = 0.9
    await leg.run(SILENCE, ASK_AT + 2)  # asked again: complete
    (final,) = leg.finals()
    assert len(model.heard) == 2
    assert final.data["reason"] == "semantic" and (final.data["start_ms"], final.data["end_ms"]) == (0, 40 * 32 + 100)
    await leg.pipeline.close()


async def test_a_failing_model_falls_back_to_the_silence_bound_and_logs_once(caplog):
    model = StubModel(RuntimeError("onnx went away"))
    leg = Leg(model)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        for turn in range(2):
            await leg.run(SPEECH, 20)
            await leg.run(SILENCE, MAX_AT - 1)
            assert len(leg.finals()) == turn  # not ended at the question: waiting for the silence bound
            await leg.run(SILENCE, 1)
            assert len(leg.finals()) == turn + 1
    assert [f.data["reason"] for f in leg.finals()] == ["silence", "silence"]
    assert len(model.heard) == 2  # asked at both pauses
    logged = [r for r in caplog.records if r.name == "gateway.pipeline"]
    assert len(logged) == 1 and "end-of-turn model failed" in logged[0].getMessage()
    await leg.pipeline.close()


async def test_a_slow_model_answer_after_the_turn_ended_changes_nothing():
    model = StubModel(1.0)
    model.release = asyncio.Event()
    leg = Leg(model)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, MAX_AT)
    assert [f.data["reason"] for f in leg.finals()] == ["silence"]
    await leg.run(SPEECH, 10)  # the next turn is open when the answer comes
    model.release.set()
    await leg.run(SPEECH, 1)
    await asyncio.sleep(0.01)
    assert len(leg.finals()) == 1 and leg.pipeline._detector.in_turn
    await leg.pipeline.close()
    assert [f.data["reason"] for f in leg.finals()] == ["silence", "flush"]


async def test_without_a_model_semantic_turns_end_at_the_silence_bound():
    leg = Leg(None)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, MAX_AT)
    assert [f.data["reason"] for f in leg.finals()] == ["silence"]
    await leg.pipeline.close()


async def test_closing_the_leg_cancels_a_pending_question():
    model = StubModel(1.0)
    model.release = asyncio.Event()
    leg = Leg(model)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT)
    await leg.pipeline.close()
    await asyncio.sleep(0)
    assert [f.data["reason"] for f in leg.finals()] == ["flush"]
    assert not leg.pipeline._queries and len(model.heard) == 1


# -- the gateway's model holder ------------------------------------------------------------

class FakeRunner:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def probability(self, audio16k: np.ndarray) -> float:
        return 0.75


async def test_the_model_is_loaded_once_on_first_use_and_closed():
    loads: list[FakeRunner] = []

    def load() -> FakeRunner:
        loads.append(FakeRunner())
        return loads[-1]

    model = EndOfTurnModel(load)
    assert model.runner is None and not loads
    assert await asyncio.gather(model(np.zeros(16000, np.float32)), model(np.zeros(10, np.float32))) == [0.75, 0.75]
    assert len(loads) == 1 and model.runner is loads[0]
    model.close()
    assert loads[0].closed and model.runner is None
    with pytest.raises(RuntimeError, match="closed"):
        await model(np.zeros(10, np.float32))


async def test_a_model_that_cannot_load_is_not_retried():
    calls = []

    def load():
        calls.append(1)
        raise FileNotFoundError("smart-turn-v3.2-cpu.onnx not found")

    model = EndOfTurnModel(load)
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            await model(np.zeros(10, np.float32))
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError):
        await model.start()


# -- real VAD on recordings ----------------------------------------------------------------

async def decided_after_speech(name: str, config: TurnConfig, model=None,
                               published: list[Event] | None = None) -> list[tuple[int, int, int]]:
    """(turn, end_ms, ms of audio the VAD had heard past end_ms when the turn's end was
    decided) of each turn of a fixture, fed chunk by chunk and waiting for the VAD each time,
    so that the delay is counted in audio, not in this machine's speed."""
    runner = BatchedVadRunner(SileroVad(), tick=0.001)
    task = asyncio.create_task(runner.run())
    decided: list[tuple[int, int, int]] = []  # (turn, end_ms, ms heard past end_ms when decided)
    legs: list[LegPipeline] = []

    def observe(o) -> None:
        if isinstance(o, SpeechStopped):
            heard_ms = legs[0]._processed * CHUNK // 8
            decided.append((o.turn, o.audio_end_ms, heard_ms - o.audio_end_ms))

    host = SessionHost(Settings(), vad_runner=runner, transcriber=StubTranscriber(),
                       publish=(published if published is not None else []).append,
                       capacity=lambda: 1, turn_config=config, end_of_turn=model)
    try:
        session = host.open(Source("rest"), [LegSpec("caller")], observer=observe)
        leg = session.legs["caller"]
        legs.append(leg)
        if model is not None:
            model.observe(leg)
        pcm, _ = read_pcm16(name)
        for i in range(0, len(pcm), 2 * CHUNK):
            session.feed("caller", pcm[i:i + 2 * CHUNK], time.monotonic())
            while leg.has_backlog:
                await asyncio.sleep(0.0005)
            for _ in range(3):
                await asyncio.sleep(0)
        await session.end("completed")
    finally:
        task.cancel()
        runner.close()
    return decided


class Oracle:
    """Says "complete" only where a fixture's reference turn ends (the pause after its last word)."""

    def __init__(self, turn_ends_ms: list[int]) -> None:
        self.ends = turn_ends_ms
        self.starts: dict[int, int] = {}
        self.asked = 0

    def observe(self, leg: LegPipeline) -> None:
        inner = leg._observer

        def observer(o) -> None:
            if isinstance(o, SpeechStarted):
                self.starts[o.turn] = o.audio_start_ms
            inner(o)
        leg._observer = observer
        self.leg = leg

    async def __call__(self, audio16k: np.ndarray) -> float:
        self.asked += 1
        start = self.starts[max(self.starts)]  # the open turn; questions are about turns shorter than 8 s here
        now_ms = start + audio16k.size // 16
        return 1.0 if any(0 <= now_ms - end <= 700 for end in self.ends) else 0.0


@pytest.mark.parametrize("name", ["caller_03_greetings.wav", "caller_02_conference.wav"])
async def test_semantic_finals_are_decided_earlier_than_silence_ones(name):
    entry = get_entry(name)
    base = turn_config(Settings())
    published: list[Event] = []
    silence = await decided_after_speech(name, base, published=published)
    assert {e.data["reason"] for e in published if e.type == "turn.final"} == {"silence"}
    oracle = Oracle([t.end_ms for t in entry.turns])
    published.clear()
    semantic = await decided_after_speech(name, dataclasses.replace(base, policy="semantic", semantic_text=False), oracle, published)
    finals = [e for e in published if e.type == "turn.final"]
    assert [e.data["reason"] for e in finals] == ["semantic"] * len(entry.turns)
    assert all(e.data["asr"]["speculative"] for e in finals)  # started at the pause, before the answer
    assert len(silence) == len(entry.turns) == len(semantic)  # the same turns ...
    assert oracle.asked >= len(semantic)
    pad = base.pad_after_ms  # the turn's end_ms lies this far after the last voiced chunk
    for (_, end_a, late_a), (_, end_b, late_b) in zip(silence, semantic):
        assert end_a == end_b  # ... with the same bounds
        assert late_a + pad == 512  # silence_ms 500: the 16th silent chunk
        assert late_b + pad <= 192  # semantic_min_silence_ms 150: the 5th silent chunk, or the next


def paused_fixture() -> str:
    """A recording whose speakers pause mid-sentence longer than silence_ms (recordings_fixtures)."""
    names = sorted(e.file for e in load_manifest()
                   if e.kind == "paused" and any(end - start >= 700 for t in e.turns for start, end in t.pauses))
    assert names, "no fixture with a mid-sentence pause of 700 ms or more"
    return names[0]


async def test_mid_sentence_pauses_that_the_model_calls_incomplete_do_not_cut_the_turn():
    name = paused_fixture()
    entry = get_entry(name)
    base = turn_config(Settings())
    published: list[Event] = []
    await decided_after_speech(name, base, published=published)
    cut = [e for e in published if e.type == "turn.final"]
    assert len(cut) > len(entry.turns)  # silence_ms cuts inside a sentence
    oracle = Oracle([t.end_ms for t in entry.turns])
    published.clear()
    semantic = await decided_after_speech(name, dataclasses.replace(base, policy="semantic", semantic_text=False), oracle, published)
    finals = [e for e in published if e.type == "turn.final"]
    assert oracle.asked > len(entry.turns)  # asked at the mid-sentence pauses too, told "not yet"
    assert len(finals) == len(entry.turns)
    for final, turn, (_, _, late) in zip(finals, entry.turns, semantic):
        assert final.data["reason"] == "semantic"
        assert final.data["start_ms"] <= turn.start_ms and final.data["end_ms"] >= turn.end_ms - 100
        assert late + base.pad_after_ms <= 192


# -- the second signal: the speculative final's text ---------------------------------------

def paused_with_text(config: TurnConfig = WITH_TEXT) -> tuple[Feeder, EndOfTurnQuery, TurnEnding]:
    f = Feeder(config)
    speak(f)
    f.run(SILENCE, ASK_AT)
    return f, only(f, EndOfTurnQuery), only(f, TurnEnding)


def test_complete_waits_for_the_text_and_a_finished_text_ends_the_turn():
    f, query, ending = paused_with_text()
    assert f.det.answer(query.query, 0.9) == []  # the model says complete: the text is not in yet
    assert f.det.in_turn
    (final,) = f.det.transcript(ending.turn, ending.end_sample, "Please hold while we connect you.")
    assert isinstance(final, TurnFinal) and final.reason == "semantic"
    assert (final.start_sample, final.end_sample) == (ending.start_sample, ending.end_sample)
    assert not f.det.in_turn and f.det.pending_query is None


def test_a_text_that_came_first_lets_the_model_end_the_turn():
    f, query, ending = paused_with_text()
    assert f.det.transcript(ending.turn, ending.end_sample, "Thank you.") == []  # no answer yet
    (final,) = f.det.answer(query.query, 0.9)
    assert final.reason == "semantic" and final.end_sample == ending.end_sample


def test_a_text_that_reads_unfinished_keeps_the_turn_open_to_the_silence_bound():
    for text_first in (False, True):
        f, query, ending = paused_with_text()
        calls = [lambda: f.det.answer(query.query, 0.99),
                 lambda: f.det.transcript(ending.turn, ending.end_sample, "My account number is...")]
        for call in (reversed(calls) if text_first else calls):
            assert call() == []
        assert f.det.text_unfinished == "trailing mark"
        f.run(SILENCE, MAX_AT - ASK_AT - 1)
        assert not f.of(TurnFinal)
        (final,) = f.run(SILENCE, 1)
        assert final.reason == "silence" and final.end_sample == ending.end_sample


def test_a_finished_text_does_not_end_the_turn_without_the_models_complete():
    f, query, ending = paused_with_text()
    assert f.det.transcript(ending.turn, ending.end_sample, "Thank you.") == []
    assert f.det.answer(query.query, 0.2) == []
    assert f.det.in_turn
    f.run(SILENCE, MAX_AT - ASK_AT)
    assert only(f, TurnFinal).reason == "silence"


def test_speech_resuming_before_the_text_makes_both_stale():
    f, query, ending = paused_with_text()
    assert f.det.answer(query.query, 0.9) == []
    assert f.feed(SPEECH) == [TurnResumed(0)]
    # the transcript of the cancelled speculation arrives late: ignored, nothing ends
    assert f.det.transcript(ending.turn, ending.end_sample, "Thank you.") == []
    assert f.det.in_turn and f.det.text_unfinished is None
    f.run(SPEECH, 10)
    f.run(SILENCE, ASK_AT)
    second_query = [e for _, e in f.of(EndOfTurnQuery)][-1]
    second_ending = [e for _, e in f.of(TurnEnding)][-1]
    assert second_ending.end_sample > ending.end_sample
    # the next pause needs its own complete and its own text: the first pause's do not carry over
    assert f.det.transcript(ending.turn, ending.end_sample, "Thank you.") == []
    assert f.det.transcript(second_ending.turn, second_ending.end_sample, "Thank you.") == []
    (final,) = f.det.answer(second_query.query, 0.9)
    assert final.reason == "semantic" and final.end_sample == second_ending.end_sample


def test_a_failed_transcription_leaves_the_model_to_decide():
    f, query, ending = paused_with_text()
    assert f.det.answer(query.query, 0.9) == []
    (final,) = f.det.transcript(ending.turn, ending.end_sample, None)
    assert final.reason == "semantic"


def test_only_the_first_text_of_an_ending_counts_and_late_texts_change_nothing():
    f, query, ending = paused_with_text()
    assert f.det.transcript(ending.turn, ending.end_sample, "You have two...") == []
    assert f.det.transcript(ending.turn, ending.end_sample, "You have two messages.") == []  # a second: ignored
    assert f.det.answer(query.query, 0.95) == []
    f.run(SILENCE, MAX_AT - ASK_AT)
    final = only(f, TurnFinal)
    assert final.reason == "silence"
    # after the turn ended (the ASR slower than the longest pause): nothing
    assert f.det.transcript(ending.turn, ending.end_sample, "Thank you.") == []
    assert f.det.transcript(ending.turn + 1, ending.end_sample, "Thank you.") == []


def test_without_semantic_text_the_model_alone_decides_and_texts_are_ignored():
    f, query, ending = paused_with_text(SEMANTIC)
    assert f.det.transcript(ending.turn, ending.end_sample, "My account number is...") == []
    (final,) = f.det.answer(query.query, 0.9)
    assert final.reason == "semantic"
    g = Feeder(TurnConfig(partial_interval_ms=0))  # the silence policy ignores texts too
    speak(g)
    g.run(SILENCE, 8)  # speculative_ms 200: the 7th silent chunk
    (silence_ending,) = [e for _, e in g.of(TurnEnding)]
    assert g.det.transcript(silence_ending.turn, silence_ending.end_sample, "Thank you.") == []
    assert g.det.in_turn


class TextTranscriber(StubTranscriber):
    """The stub transcriber, answering a chosen text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def result(self, request):
        return dataclasses.replace(super().result(request), text=self.text)


class SlowTextTranscriber(TextTranscriber):
    """... that answers only once ``gate`` is set."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.gate = asyncio.Event()

    async def transcribe(self, request):
        await self.gate.wait()
        return await super().transcribe(request)


async def test_a_complete_answer_waits_for_a_slower_transcript(caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline")
    leg = Leg(StubModel(0.9), config=WITH_TEXT)
    leg.pipeline._transcriber = slow = SlowTextTranscriber("That's all, thanks.")
    await leg.run(SILENCE, 5)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT + 2)
    assert "turn 0: P(complete) 0.900\n" in caplog.text and leg.finals() == []  # complete, no text yet
    slow.gate.set()
    await leg.run(SILENCE, 1)
    (final,) = leg.finals()
    assert final.data["reason"] == "semantic" and final.data["asr"]["speculative"] is True
    assert "turn 0: text ends it" in caplog.text
    await leg.pipeline.close()


@pytest.mark.parametrize("text, reason", [("Thank you for calling.", "semantic"),
                                          ("My account number is", "silence")])
async def test_the_leg_hands_the_speculative_text_to_the_detector(text, reason, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.pipeline")
    model = StubModel(0.9)
    model.release = asyncio.Event()  # the model answers only after the (stub, instant) ASR
    leg = Leg(model, config=WITH_TEXT)
    leg.pipeline._transcriber = TextTranscriber(text)
    await leg.run(SILENCE, 5)
    await leg.run(SPEECH, 20)
    await leg.run(SILENCE, ASK_AT + 2)
    assert leg.finals() == []
    model.release.set()
    await leg.run(SILENCE, 1)
    if reason == "semantic":
        (final,) = leg.finals()
        assert final.data["reason"] == "semantic" and final.data["asr"]["speculative"] is True
        assert final.data["text"] == text
        assert "turn 0: P(complete) 0.900, ends it" in caplog.text
    else:
        assert leg.finals() == []  # the model said complete, the words say otherwise
        assert "reads unfinished (ends in 'is'), keeps it open" in caplog.text
        await leg.run(SILENCE, MAX_AT - ASK_AT - 3)
        (final,) = leg.finals()
        assert final.data["reason"] == "silence" and final.data["asr"]["speculative"] is True
    await leg.pipeline.close()
