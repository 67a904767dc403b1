"""Cross-call batching and the overload window in WhisperTranscriber, on tiny.en and real prompts."""

import asyncio
import os
from dataclasses import replace

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tiny.en must never touch the network

from gateway.asr.interface import Superseded, TranscriptionRequest
from gateway.asr.wer import word_error_rate
from gateway.asr.whisper import WhisperTranscriber
from tests.unit.test_asr_whisper import PROMPTS, SOUNDS, final, partial, prompt

pytestmark = pytest.mark.skipif(not SOUNDS.is_dir(), reason="asterisk-core-sounds-en not installed")

NAMES = ["agent-pass", "pbx-invalid", "privacy-unident", "conf-muted", "vm-goodbye", "auth-thankyou"]


def make(**kw: object) -> WhisperTranscriber:
    return WhisperTranscriber("tiny.en", compute_type="int8", cpu_threads=2, local_files_only=True, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def transcriber():
    t = make(max_batch=8, overload_backlog=0)
    yield t
    asyncio.run(t.close())


@pytest.mark.parametrize("kind", ["final", "partial"])  # 30 s window / short windows under "auto"
def test_batched_decode_gives_the_unbatched_results(transcriber: WhisperTranscriber, kind: str) -> None:
    """One batch holding speech of several lengths (so several short windows), a request with a
    prompt (a different prompt length: its own group) and noise (stopped by the energy gate)
    gives, slot by slot, what each request gives alone."""
    engine = transcriber.engine
    requests = [TranscriptionRequest(prompt(n), kind) for n in NAMES]  # type: ignore[arg-type]
    requests.insert(2, TranscriptionRequest(prompt("vm-goodbye"), kind, prompt="Please enter your password."))  # type: ignore[arg-type]
    requests.insert(4, TranscriptionRequest(np.zeros(32000, np.float32), kind))  # type: ignore[arg-type]
    batched = engine.transcribe_batch(requests)
    alone = [engine.transcribe_batch([r])[0] for r in requests]
    for b, a in zip(batched, alone):
        assert not isinstance(b, BaseException) and not isinstance(a, BaseException)
        assert (b.text, b.silence) == (a.text, a.silence)
        assert b.avg_logprob == pytest.approx(a.avg_logprob, abs=1e-4)
        assert b.no_speech_prob == pytest.approx(a.no_speech_prob, abs=1e-4)
    assert batched[4].silence
    texts = [r.text for i, r in enumerate(batched) if i not in (2, 4)]
    for name, text in zip(NAMES, texts):
        assert word_error_rate(PROMPTS[name], text) <= 0.25, (name, text)


CONTEXTS = [  # two legs' earlier text, both longer than the 32 tokens of context kept
    "After the tone, say your name and then press the pound key. Please enter your new password followed "
    "by the pound key. Please re-enter your password followed by the pound key. Your passwords have been changed.",
    "Please enter the conference pin number. That pin is invalid for this conference. You are currently the "
    "only participant in the conference. The conference is now being recorded. The leader has left the conference.",
]


def test_prompts_of_different_calls_share_a_batch(transcriber: WhisperTranscriber) -> None:
    """Only the last 32 tokens of a prompt are used, so prompts of different texts have one
    length and decode in one call, each slot as it decodes alone."""
    engine = transcriber.engine
    assert engine.context_tokens == 32
    assert all(len(engine.previous_tokens(c, 32)) == 32 for c in CONTEXTS)
    requests = [TranscriptionRequest(prompt(n), "final", prompt=c) for n, c in zip(["vm-goodbye", "conf-muted"], CONTEXTS)]
    assert transcriber.engine.batch_key(requests[0], False) == transcriber.engine.batch_key(requests[1], False)
    batched = engine.transcribe_batch(requests)
    alone = [engine.transcribe_batch([r])[0] for r in requests]
    for b, a, name in zip(batched, alone, ["vm-goodbye", "conf-muted"]):
        assert not isinstance(b, BaseException) and not isinstance(a, BaseException)
        assert b.text == a.text and b.avg_logprob == pytest.approx(a.avg_logprob, abs=1e-4)
        assert word_error_rate(PROMPTS[name], b.text) <= 0.25, (name, b.text)
    # the prompt reaches the decoder: the same audio scores differently without it
    bare = engine.transcribe_batch([TranscriptionRequest(prompt("vm-goodbye"), "final")])[0]
    assert not isinstance(bare, BaseException)
    assert bare.avg_logprob != pytest.approx(batched[0].avg_logprob, abs=1e-4)


def test_context_audio_is_heard_but_not_transcribed_again(transcriber: WhisperTranscriber) -> None:
    """A final with the previous turn's audio and transcript as context returns the new turn's
    words only; a partial (short window) ignores the context audio; batching keeps that."""
    engine = transcriber.engine
    gap = np.zeros(4800, np.float32)
    context = np.concatenate((prompt("conf-muted"), gap))
    with_context = TranscriptionRequest(prompt("vm-goodbye"), "final", context_audio=context,
                                        context_text=PROMPTS["conf-muted"])
    other = TranscriptionRequest(prompt("agent-pass"), "final", context_audio=np.concatenate((prompt("pbx-invalid"), gap)),
                                 context_text=PROMPTS["pbx-invalid"])
    batched = engine.transcribe_batch([with_context, other])
    alone = [engine.transcribe_batch([r])[0] for r in (with_context, other)]
    for b, a, name in zip(batched, alone, ["vm-goodbye", "agent-pass"]):
        assert not isinstance(b, BaseException) and not isinstance(a, BaseException)
        assert b.text == a.text, (b.text, a.text)
        assert word_error_rate(PROMPTS[name], b.text) <= 0.25, (name, b.text)
    assert "muted" not in batched[0].text.lower()
    bare = engine.transcribe_batch([TranscriptionRequest(prompt("vm-goodbye"), "final")])[0]
    assert not isinstance(bare, BaseException)
    assert bare.avg_logprob != pytest.approx(batched[0].avg_logprob, abs=1e-4)  # the context was heard
    partial_with, partial_without = engine.transcribe_batch(
        [replace(with_context, kind="partial"), TranscriptionRequest(prompt("vm-goodbye"), "partial")])
    assert not isinstance(partial_with, BaseException) and not isinstance(partial_without, BaseException)
    assert (partial_with.text, partial_with.avg_logprob) == (partial_without.text, partial_without.avg_logprob)


def test_a_final_with_context_audio_gets_a_window_that_fits_it(transcriber: WhisperTranscriber) -> None:
    """Context (3.8 s) + turn (1.5 s) + 5 s margin -> the 15 s floor; the batch key agrees
    with the window actually decoded, and the same turn heard alone keeps 30 s."""
    engine = transcriber.engine
    context = np.concatenate((prompt("conf-muted"), np.zeros(4800, np.float32)))
    request = TranscriptionRequest(prompt("vm-goodbye"), "final", context_audio=context,
                                   context_text=PROMPTS["conf-muted"])
    assert request.seconds + context.size / 16000 + 5 <= 15
    window = engine._first_window(request, [request.audio], "en", "final")
    assert window.frames == engine.first_frames(request, "final") == 1500
    assert window.audio.size == context.size + request.audio.size
    alone = TranscriptionRequest(prompt("vm-goodbye"), "final")
    assert engine.first_frames(alone, "final") == engine._first_window(alone, [alone.audio], "en", "final").frames == 3000
    assert transcriber.engine.batch_key(request, False)[1] == 1500


def test_cpu_decoder_runs_on_its_own_one_thread_instance() -> None:
    """Same weights, so the same text; the split is skipped when it would gain nothing."""
    split, shared = make(), make(decoder_threads=0)
    try:
        assert split.engine.generator is not split.engine.model.model
        assert shared.engine.generator is shared.engine.model.model
        audio = prompt("privacy-unident")
        a = split.engine.transcribe_batch([TranscriptionRequest(audio, "final")])[0]
        b = shared.engine.transcribe_batch([TranscriptionRequest(audio, "final")])[0]
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
        assert a.text == b.text and word_error_rate(PROMPTS["privacy-unident"], a.text) <= 0.25, (a.text, b.text)
    finally:
        asyncio.run(split.close())
        asyncio.run(shared.close())
    with pytest.raises(ValueError, match="decoder_threads"):
        make(decoder_threads=-1)
    one = make(decoder_threads=2)  # as many as the encoder's (make: cpu_threads=2)
    try:
        assert one.engine.generator is one.engine.model.model
    finally:
        asyncio.run(one.close())


def test_context_audio_needs_its_transcript() -> None:
    with pytest.raises(ValueError, match="context_text"):
        TranscriptionRequest(np.zeros(1600, np.float32), "final", context_audio=np.zeros(1600, np.float32))
    with pytest.raises(ValueError, match="context_audio must be 1-D float32"):
        TranscriptionRequest(np.zeros(1600, np.float32), "final", context_audio=np.zeros(1600, np.int16),
                             context_text="hello")


def test_beam_search_is_for_finals_only() -> None:
    greedy, beam = make(beam_size=1), make(beam_size=5)
    try:
        audio = prompt("privacy-unident")
        greedy_partial, greedy_final = greedy.engine.transcribe_batch(
            [TranscriptionRequest(audio, "partial"), TranscriptionRequest(audio, "final")])
        beam_partial, beam_final = beam.engine.transcribe_batch(
            [TranscriptionRequest(audio, "partial"), TranscriptionRequest(audio, "final")])
        for r in (greedy_partial, greedy_final, beam_partial, beam_final):
            assert not isinstance(r, BaseException)
            assert word_error_rate(PROMPTS["privacy-unident"], r.text) <= 0.25, r.text
        assert (beam_partial.text, beam_partial.avg_logprob) == (greedy_partial.text, greedy_partial.avg_logprob)
        assert beam_final.avg_logprob != pytest.approx(greedy_final.avg_logprob, abs=1e-6)  # another search ran
    finally:
        asyncio.run(beam.close())
        asyncio.run(greedy.close())


def test_context_tokens_zero_ignores_the_prompt() -> None:
    t = make(context_tokens=0)
    try:
        assert t.engine.previous_tokens(CONTEXTS[0], t.engine.context_tokens) == []
        with_prompt, without = t.engine.transcribe_batch(
            [TranscriptionRequest(prompt("vm-goodbye"), "final", prompt=CONTEXTS[0]),
             TranscriptionRequest(prompt("vm-goodbye"), "final")])
        assert not isinstance(with_prompt, BaseException) and not isinstance(without, BaseException)
        assert with_prompt.text == without.text
        assert with_prompt.avg_logprob == pytest.approx(without.avg_logprob, abs=1e-4)
    finally:
        asyncio.run(t.close())


async def test_queued_finals_share_calls_in_fifo_order() -> None:
    t = make(max_batch=4, overload_backlog=0)
    try:
        done: list[str] = []
        futures = {}
        with t.scheduler.paused():  # hold the threads off until the whole queue is in place
            for label, request in [
                ("partial A1", partial(prompt("agent-pass"), key="a")),
                ("final 1", final(prompt("conf-muted"), key="b")),
                ("partial A2", partial(prompt("pbx-invalid"), key="a")),  # supersedes A1
                ("final 2", final(prompt("vm-goodbye"), key="c")),
                ("final 3", final(prompt("privacy-unident"), key="d")),
                ("partial E", partial(prompt("vm-goodbye"), key="e")),  # 10 s window, like A2
                ("final 4", final(prompt("auth-thankyou"), key="a")),  # final after A2: A2 superseded
                ("final 5", final(prompt("agent-pass"), key="f")),
            ]:
                futures[label] = t.submit(request)
                futures[label].add_done_callback(lambda _, label=label: done.append(label))
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()), return_exceptions=True)
        outcome = dict(zip(futures, results))
        assert done == ["partial A1", "partial A2", "final 1", "final 2", "final 3", "final 4", "final 5", "partial E"]
        assert isinstance(outcome["partial A1"], Superseded) and isinstance(outcome["partial A2"], Superseded)
        # Finals 1-4 in one call, final 5 in the next, partial E alone.
        assert (t.batches, t.batched, t.overloaded) == (3, 4, 0)
        for label, name in [("final 1", "conf-muted"), ("final 2", "vm-goodbye"), ("final 3", "privacy-unident"),
                            ("final 4", "auth-thankyou"), ("final 5", "agent-pass"), ("partial E", "vm-goodbye")]:
            assert word_error_rate(PROMPTS[name], outcome[label].text) <= 0.25, (label, outcome[label])
    finally:
        await t.close()


async def test_an_incompatible_request_at_the_head_ends_the_batch() -> None:
    """Only the head of the queue joins a batch: a final with a prompt (other prompt length)
    between two plain finals gives three calls, in submission order."""
    t = make(max_batch=4, overload_backlog=0)
    try:
        done: list[str] = []
        with t.scheduler.paused():
            futures = [
                t.submit(final(prompt("conf-muted"))),
                t.submit(final(prompt("vm-goodbye"), prompt="Please enter your password.")),
                t.submit(final(prompt("agent-pass"))),
            ]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda _, i=i: done.append(str(i)))
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        assert done == ["0", "1", "2"] and (t.batches, t.batched) == (3, 0)
        assert word_error_rate(PROMPTS["vm-goodbye"], results[1].text) == 0.0
        # A lone request on an idle queue is a batch of one: nothing waits for company.
        await t.transcribe(final(prompt("conf-muted")))
        assert (t.batches, t.batched) == (4, 0)
    finally:
        await t.close()


async def test_overload_backlog_switches_finals_to_the_short_window() -> None:
    """With overload_backlog=2 and 4 queued finals, the first two (taken while 4 and 3 were
    waiting) run with the short window and the last two with 30 s. The same audio gives
    measurably different scores in the two windows, which is what tells them apart."""
    audio = prompt("privacy-unident")
    t = make(max_batch=1, overload_backlog=2)
    try:
        short, full = (t.engine.transcribe_batch([final(audio)], overloaded=o)[0] for o in (True, False))
        assert not isinstance(short, BaseException) and not isinstance(full, BaseException)
        assert short.avg_logprob != pytest.approx(full.avg_logprob, abs=1e-4)
        with t.scheduler.paused():
            futures = [t.submit(final(audio, key=f"call{i}/in")) for i in range(4)]
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        assert t.overloaded == 2
        for r, expected in zip(results, [short, short, full, full]):
            assert r.avg_logprob == pytest.approx(expected.avg_logprob, abs=1e-4)
            assert r.text == expected.text
    finally:
        await t.close()
    off = make(max_batch=1, overload_backlog=0)
    try:
        with off.scheduler.paused():
            futures = [off.submit(final(audio)) for _ in range(3)]
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        assert off.overloaded == 0
        assert all(r.avg_logprob == pytest.approx(full.avg_logprob, abs=1e-4) for r in results)
    finally:
        await off.close()


def test_bad_batching_settings_fail_clearly() -> None:
    for bad in (-1, 224, True, 1.5):
        with pytest.raises(ValueError, match="context_tokens must be an integer from 0 to 223"):
            make(context_tokens=bad)
    with pytest.raises(ValueError, match="max_batch must be an integer of at least 1"):
        make(max_batch=0)
    with pytest.raises(ValueError, match="overload_backlog must be an integer of at least 0"):
        make(overload_backlog=-1)
    with pytest.raises(ValueError, match="max_batch"):
        make(max_batch=2.5)
