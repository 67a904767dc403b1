"""The leg pipeline with its real stages: real recordings, Silero VAD, the turn detector
and the packaged tiny.en model, fed at real time so that speculation and partials happen
as they do on a call (no SIP or RTP here: those have their own tests)."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from gateway.asr.wer import word_error_rate
from gateway.events import CallInfo, Event, EventFactory
from gateway.media.turn import TurnConfig
from gateway.media.vad import BatchedVadRunner, SileroVad
from gateway.pipeline import LegPipeline
from tests.fixtures_data import get_entry, read_pcm16

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def transcriber():
    from gateway.asr.whisper import WhisperTranscriber

    t = WhisperTranscriber("tiny.en")
    yield t
    asyncio.run(t.close())


class Recording:
    """Passes requests to the real transcriber and keeps each (kind, prompt) it was sent."""

    name = "recording"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str | None]] = []
        self.full: list = []

    async def transcribe(self, request):
        self.requests.append((request.kind, request.prompt))
        result = await self.inner.transcribe(request)
        self.full.append((request, result.text.strip()))
        return result

    async def close(self) -> None:
        pass


async def run_leg(transcriber, name: str, *, speed: float = 1.0, config: TurnConfig | None = None,
                  partials: bool = True, context: bool = True, context_audio_s: float = 0.0) -> list[Event]:
    pcm, _rate = read_pcm16(name)
    published: list[Event] = []
    events = EventFactory(CallInfo("call-1", "sip-1", "sip:a@x", "sip:b@y", time.time()))
    pipeline = LegPipeline(key="call-1/caller", leg="caller", events=events, publish=published.append,
                           transcriber=transcriber, turn_config=config or TurnConfig(), language=None,
                           partials=partials, context=context, context_audio_s=context_audio_s)
    runner = BatchedVadRunner(SileroVad())
    runner.register(pipeline)
    task = asyncio.create_task(runner.run())
    try:
        frame = 320  # 20 ms of 16-bit PCM, as RTP delivers it
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), frame)):
            pipeline.feed_audio(pcm[offset:offset + frame], time.monotonic())
            delay = start + (i + 1) * 0.02 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        pipeline.finish_input(time.monotonic())
        await runner.drain()
        runner.unregister(pipeline)
        await pipeline.close()
    finally:
        task.cancel()
        runner.close()
    return published


async def test_turns_of_a_real_recording_are_transcribed_in_order(transcriber):
    entry = get_entry("caller_02_conference.wav")
    published = await run_leg(transcriber, entry.file)
    finals = [e for e in published if e.type == "turn.final"]
    assert [f.data["turn"] for f in finals] == list(range(1, len(entry.turns) + 1))
    for final, turn in zip(finals, entry.turns):
        assert word_error_rate(turn.text, final.data["text"]) <= 0.2, (turn.text, final.data["text"])
        # the turn's audio covers the reference speech (with padding)
        assert final.data["start_ms"] <= turn.start_ms + 100
        assert final.data["end_ms"] >= turn.end_ms - 100
        assert final.data["reason"] == "silence"
    # the final transcription started in the silence, before the threshold confirmed it
    assert any(f.data["asr"]["speculative"] for f in finals)
    partials = [e for e in published if e.type == "turn.partial"]
    assert partials, "a 2-4 s turn spoken at real time gets at least one partial"
    for p in partials:
        later_final = next(f for f in finals if f.data["turn"] == p.data["turn"])
        assert published.index(p) < published.index(later_final)


async def test_each_turn_is_decoded_with_the_legs_earlier_text(transcriber):
    """Finals and partials of turn n carry the finals of turns < n as their prompt, in order,
    even though each final starts speculatively before the previous one may be done."""
    entry = get_entry("caller_05_mixed.wav")
    recording = Recording(transcriber)
    published = await run_leg(recording, entry.file, speed=2.0)
    finals = [e.data["text"] for e in published if e.type == "turn.final"]
    assert len(finals) == len(entry.turns) >= 4
    final_prompts = [p for kind, p in recording.requests if kind == "final"]
    # speculative finals cancelled by resumed speech may add requests; the last one of each turn counts
    assert final_prompts[0] is None
    for n in range(1, len(finals)):
        expected = " ".join(finals[max(0, n - 4):n])
        assert expected in final_prompts, (n, expected, final_prompts)
    partial_prompts = [p for kind, p in recording.requests if kind == "partial"]
    assert partial_prompts and all(p is None or p in {" ".join(finals[max(0, n - 4):n]) for n in range(1, len(finals))}
                                   for p in partial_prompts)

    plain = Recording(transcriber)
    await run_leg(plain, entry.file, speed=2.0, partials=False, context=False)
    assert plain.requests and all(p is None for _, p in plain.requests)


async def test_finals_hear_the_previous_turns_audio_with_its_transcript(transcriber):
    """With context_audio_s, a final carries the audio of the latest turns that fit (each
    followed by 0.3 s of silence) and their finals' text; older finals go in the prompt;
    partials carry text only. The published text is the new turn's alone."""
    entry = get_entry("caller_02_conference.wav")
    recording = Recording(transcriber)
    published = await run_leg(recording, entry.file, speed=2.0, context_audio_s=6.0)
    finals = [e.data["text"] for e in published if e.type == "turn.final"]
    assert len(finals) == len(entry.turns)
    for turn, text in zip(entry.turns, finals):
        assert word_error_rate(turn.text, text) <= 0.2, (turn.text, text)
    audio_of = {text: r.audio for r, text in recording.full if r.kind == "final"}  # a final's audio by its text
    gap = np.zeros(4800, np.float32)
    with_context = [r for r, _ in recording.full if r.kind == "final" and r.context_audio is not None]
    assert len(with_context) >= len(finals) - 1
    for request in with_context:
        heard = [t for t in finals if t in request.context_text]
        assert heard and request.context_text == " ".join(heard)
        assert np.array_equal(request.context_audio, np.concatenate([x for t in heard for x in (audio_of[t], gap)]))
        assert request.context_audio.size / 16000 <= 6.0
        # the prompt holds only finals older than those heard
        if request.prompt:
            assert request.prompt.endswith(finals[finals.index(heard[0]) - 1])
    assert all(r.context_audio is None for r, _ in recording.full if r.kind == "partial")


async def test_silence_and_noise_publish_nothing(transcriber):
    for name in ("silence_10s.wav", "noise_pink_hum_10s.wav"):
        assert await run_leg(transcriber, name, speed=4.0) == []


async def test_a_long_monologue_is_split_at_max_turn(transcriber):
    entry = get_entry("flite_slt_monologue.wav")
    config = TurnConfig(max_turn_s=10.0)
    published = await run_leg(transcriber, entry.file, speed=4.0, config=config, partials=False)
    finals = [e for e in published if e.type == "turn.final"]
    assert len(finals) >= 3
    assert all(f.data["end_ms"] - f.data["start_ms"] <= 10_000 for f in finals)
    assert [f.data["reason"] for f in finals[:2]] == ["max_length", "max_length"]
    text = " ".join(f.data["text"] for f in finals)
    assert word_error_rate(entry.text, text) <= 0.3, text


async def test_speech_cut_by_the_end_of_input_is_flushed(transcriber):
    entry = get_entry("prompt_tt-weasels.wav")
    pcm, _ = read_pcm16(entry.file)
    published: list[Event] = []
    events = EventFactory(CallInfo("call-2", "sip-2", "a", "b", time.time()))
    pipeline = LegPipeline(key="call-2/caller", leg="caller", events=events, publish=published.append,
                           transcriber=transcriber, turn_config=TurnConfig(), language=None, partials=False)
    vad = SileroVad()
    vad.add_stream(pipeline.key)
    # stop mid-way through the last word: no trailing silence reaches the detector
    cut = int(entry.turns[0].end_ms * 8) * 2 - 1600
    pipeline.feed_audio(pcm[:cut], time.monotonic())
    pipeline.finish_input(time.monotonic())
    while (chunk := pipeline.next_chunk()) is not None:
        prob = vad.infer({pipeline.key: chunk})[pipeline.key]
        pipeline.on_vad(chunk, prob)
    await pipeline.close()
    finals = [e for e in published if e.type == "turn.final"]
    assert len(finals) == 1 and finals[0].data["reason"] == "flush"
    assert "weasels" in finals[0].data["text"].lower()
    assert np.isfinite(finals[0].data["confidence"]["avg_logprob"])
