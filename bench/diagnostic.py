"""Diagnostic D: the gateway's leg pipeline fed whole fixture files, without RTP.

Silero VAD, the turn detector and the leg pipeline run exactly as on a call,
but each file is fed at once (no real-time pacing) and partials are off, so
the finals depend on nothing but the audio and the transcriber: the same
input always gives the same text. bench/accuracy.py reports it beside the
gateway's real calls, bench/asr_pool.py runs every ASR backend through it,
and tests/e2e/test_guards.py holds its word error rate to a bound in CI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable

from gateway.app import turn_config
from gateway.asr.interface import Transcriber
from gateway.config import Settings
from gateway.events import TURN_FINAL, CallInfo, Event, EventFactory
from gateway.media.vad import SileroVad
from gateway.pipeline import LegPipeline
from tests.fixtures_data import FixtureEntry, read_pcm16

__all__ = ["finals_text", "leg_pipeline", "leg_pipeline_finals"]


def leg_pipeline(transcriber: Transcriber, settings: Settings, key: str, publish: Callable[[Event], None],
                 partials: bool) -> LegPipeline:
    """One caller leg's pipeline as the gateway builds it from ``settings``, without SIP/RTP."""
    call = CallInfo(call_id=key, sip_call_id=key, from_uri="sip:bench@a", to_uri="sip:earshot@b",
                    started_at=time.time())
    return LegPipeline(key=f"{key}/caller", leg="caller", events=EventFactory(call), publish=publish,
                       transcriber=transcriber, turn_config=turn_config(settings), language=None,
                       resampler=settings.resampler, partials=partials,
                       context=settings.asr_context_tokens > 0 or settings.asr_context_audio_s > 0,
                       context_audio_s=settings.asr_context_audio_s, session=key,
                       final_timeout_s=settings.asr_final_timeout_s, partial_timeout_s=settings.asr_partial_timeout_s)


async def leg_pipeline_finals(transcriber: Transcriber, entries: Iterable[FixtureEntry], settings: Settings,
                              vad: SileroVad | None = None, concurrency: int = 1) -> dict[str, list[Event]]:
    """Each file's published turn.final events, ``concurrency`` files at a time.

    The turns of a file are all found at once, so a deadline counted from a
    turn's end means nothing here: finals get ten minutes.
    """
    settings = dataclasses.replace(settings, asr_final_timeout_s=600.0)
    vad = vad or SileroVad()
    gate = asyncio.Semaphore(concurrency)
    finals: dict[str, list[Event]] = {}

    async def one(entry: FixtureEntry) -> None:
        async with gate:
            published: list[Event] = []
            key = f"{entry.file}-{uuid.uuid4().hex[:6]}"
            pipeline = leg_pipeline(transcriber, settings, key, published.append, partials=False)
            pcm, _rate = read_pcm16(entry.file)
            vad.add_stream(key)
            try:
                pipeline.feed_audio(pcm, 0.0)
                pipeline.finish_input(0.0)
                while (chunk := pipeline.next_chunk()) is not None:
                    pipeline.on_vad(chunk, vad.infer({key: chunk})[key])
                await pipeline.close()
            finally:
                vad.remove_stream(key)
            finals[entry.file] = [e for e in published if e.type == TURN_FINAL]

    await asyncio.gather(*(one(entry) for entry in entries))
    return finals


def finals_text(events: list[Event]) -> str:
    return " ".join(e.data["text"] for e in events)
