"""The benchmark-only transcribers: ``stub`` answers words at once, ``none`` answers silence."""

from __future__ import annotations

import asyncio

import numpy as np

from gateway.app import turn_config
from gateway.asr.factory import build_transcriber
from gateway.asr.interface import TranscriptionRequest
from gateway.asr.media_only import MediaOnlyTranscriber
from gateway.asr.stub import StubTranscriber
from gateway.config import load_settings
from gateway.events import CallInfo, EventFactory
from gateway.pipeline import LegPipeline


def request(seconds: float, kind: str = "final") -> TranscriptionRequest:
    return TranscriptionRequest(audio=np.zeros(int(16000 * seconds), np.float32), kind=kind)  # type: ignore[arg-type]


def test_settings_pick_the_benchmark_transcribers() -> None:
    assert isinstance(build_transcriber(load_settings(environ={"EARSHOT_ASR_MODEL": "stub"})), StubTranscriber)
    assert type(build_transcriber(load_settings(environ={"EARSHOT_ASR_MODEL": "none"}))) is MediaOnlyTranscriber


def test_stub_text_grows_with_the_audio() -> None:
    stub = StubTranscriber()
    short = asyncio.run(stub.transcribe(request(0.4)))
    long = asyncio.run(stub.transcribe(request(8.0)))
    assert not short.silence and len(short.text.split()) == 1
    assert len(long.text.split()) == 20
    assert stub.requests == 2 and abs(stub.audio_seconds - 8.4) < 1e-6


def test_stub_finals_are_published_by_the_leg_pipeline() -> None:
    """Unlike ``none``, the stub makes the pipeline publish: the cost of events is measured."""
    settings = load_settings(environ={"EARSHOT_ASR_MODEL": "stub", "EARSHOT_ASR_PARTIALS": "false"})
    published: list = []
    call = CallInfo(call_id="c", sip_call_id="c", from_uri="sip:a@x", to_uri="sip:b@y", started_at=0.0)
    pipeline = LegPipeline(key="c/caller", leg="caller", events=EventFactory(call), publish=published.append,
                           transcriber=StubTranscriber(), turn_config=turn_config(settings), language=None,
                           resampler=settings.resampler, partials=False, context=False, context_audio_s=0.0,
                           session="c", final_timeout_s=5.0, partial_timeout_s=2.0)

    async def run() -> None:
        # 1 s of loud noise then 1 s of silence, as the VAD would judge it
        rng = np.random.default_rng(1)
        speech = (rng.standard_normal(8000) * 8000).astype(np.int16)
        pipeline.feed_audio(speech.tobytes() + bytes(16000), 0.0)
        pipeline.finish_input(0.0)
        n = 0
        while (chunk := pipeline.next_chunk()) is not None:
            pipeline.on_vad(chunk, 0.95 if n < 31 else 0.01)
            n += 1
        await pipeline.close()

    asyncio.run(run())
    finals = [e for e in published if e.type == "turn.final"]
    assert len(finals) == 1 and finals[0].data["text"].startswith("please hold")
