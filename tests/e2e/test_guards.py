"""Guards for the stated targets, run in CI: a regression in accuracy or turn latency fails here.

The figures they hold (bench/RESULTS.md, docs/asr.md) come from benchmarks; these tests
only check that the code still lands near them, with margins for a shared machine:

- word errors of diagnostic D (the leg pipeline fed every speech fixture, deterministic:
  bench/diagnostic.py) with the embedded backend's defaults: measured 1.68-1.77 %
  (18-19 errors in 1071 words; 1.68 % on 2026-12-02), bound 2.0 % (21 errors): tight
  enough that losing the context audio (24 errors, bench/RESULTS.md "asr_openai") fails,
  with room for a CPU whose int8 kernels round a word differently;
- end of speech -> turn.final of one real call at the 500 ms silence threshold: measured
  medians 519-626 ms on the 2-core development machine (20-130 ms above the threshold),
  bound 1500 ms: the part Earshot adds may grow several-fold on a slow, shared machine,
  but a final that waits on something it should not (a second threshold, a queue
  behind partials, a slow path) fails here.
"""

from __future__ import annotations

import asyncio
import statistics

import pytest

from bench.diagnostic import finals_text, leg_pipeline_finals
from gateway.asr.factory import build_transcriber
from gateway.asr.wer import corpus_wer
from gateway.config import load_settings
from tests.e2e.harness import by_call, pcm_wav, place_calls, start_gateway, wait_for_calls_ended
from tests.fixtures_data import get_entry, load_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEECH_KINDS = ("prompt", "caller", "monologue", "conversation")
WER_BOUND = 0.020
LATENCY_MEDIAN_BOUND_MS = 1500


def test_leg_pipeline_word_error_rate_stays_near_the_measured_figure() -> None:
    entries = [e for e in load_manifest() if e.kind in SPEECH_KINDS]
    settings = load_settings(environ={"EARSHOT_ASR_LOCAL_FILES_ONLY": "true"})

    async def run() -> dict[str, str]:
        transcriber = build_transcriber(settings)
        try:
            finals = await leg_pipeline_finals(transcriber, entries, settings, concurrency=4)
        finally:
            await transcriber.close()
        assert not [e for events in finals.values() for e in events if e.data.get("error")]
        return {file: finals_text(events) for file, events in finals.items()}

    texts = asyncio.run(run())
    wer = corpus_wer((e.text, texts[e.file]) for e in entries)
    assert wer <= WER_BOUND, f"WER {wer:.4f} over {len(entries)} fixtures (bound {WER_BOUND})"


def test_one_call_turn_latency_stays_near_the_measured_figure(tmp_path) -> None:
    gw = start_gateway()
    try:
        entry = get_entry("caller_02_conference.wav")
        results = place_calls(f"127.0.0.1:{gw.sip_port}", [pcm_wav(entry.file, tmp_path)], 1, hold=1.0)
        assert results[0]["confirmed"], results
        events = wait_for_calls_ended(gw.events_stream, {results[0]["call_id"]}, timeout=90)
        finals = [e for e in by_call(events)[results[0]["call_id"]] if e["type"] == "turn.final"]
        latencies = [f["latency_ms"] for f in finals if f.get("reason") == "silence"]
        assert len(latencies) >= 3, finals
        median = statistics.median(latencies)
        assert median <= LATENCY_MEDIAN_BOUND_MS, f"median {median:.0f} ms of {sorted(latencies)}"
    finally:
        assert gw.stop() == 0, gw.log()
