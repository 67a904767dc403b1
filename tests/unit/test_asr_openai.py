"""OpenAITranscriber against a real OpenAI-compatible server that nobody on this project wrote.

The server is faster-whisper-server 0.0.3 from ``.venv-peers`` (see tests/peers.py),
serving the packaged Whisper tiny.en on CPU, offline, on 127.0.0.1. The speech is
Asterisk's recorded telephone prompts (8 kHz), upsampled the way the media plane does.

What each test can observe on that server, and how:

- that the server was hit: ``transcriber.stats.requests`` and the server's own
  access log (``POST /v1/audio/transcriptions`` lines);
- that ``prompt`` and ``context_text`` arrive: a lower-case, unpunctuated prompt
  makes Whisper write lower case without punctuation (greedy decoding, so the
  same request gives the same text and ``avg_logprob`` every time);
- that ``language`` arrives: tiny.en is English-only, so the text cannot show
  it, but faster-whisper logs "the language parameter is set to 'es'; using 'en'
  instead" to the server's stderr;
- that verbose_json was used: ``avg_logprob`` comes only from its segments.

The close and deadline tests hold the contract the other transcribers (pool,
embedded scheduler) keep; each failed on the first version of OpenAITranscriber.
"""

from __future__ import annotations

import asyncio
import os
import time
import wave

import numpy as np
import pytest

from gateway.asr.interface import (
    AsrTimeout,
    Superseded,
    TranscriberClosed,
    TranscriptionError,
    TranscriptionRequest,
    TranscriptionResult,
)
from gateway.asr.remote.openai import OpenAITranscriber
from gateway.asr.wer import word_error_rate
from gateway.media.resample import upsample_8k_to_16k
from tests import peers
from tests.unit.test_asr_whisper import PROMPTS, SOUNDS

pytestmark = pytest.mark.skipif(not SOUNDS.is_dir(), reason="asterisk-core-sounds-en not installed")
LOWER_CASE_PROMPT = "welcome to the main menu. for sales press one"  # no capitals, no commas


def speech(name: str) -> np.ndarray:
    with wave.open(str(SOUNDS / f"{name}.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return upsample_8k_to_16k(np.frombuffer(w.readframes(w.getnframes()), np.int16))


def final(audio: np.ndarray, **kw: object) -> TranscriptionRequest:
    return TranscriptionRequest(audio=audio, kind="final", **kw)  # type: ignore[arg-type]


def partial(audio: np.ndarray, **kw: object) -> TranscriptionRequest:
    return TranscriptionRequest(audio=audio, kind="partial", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server():
    ok, reason = peers.available()
    if not ok:
        if os.environ.get("CI"):  # deploy/setup.sh installs it: missing in CI is a failure, not a skip
            pytest.fail(reason)
        pytest.skip(reason)
    with peers.OpenAIPeerServer() as running:
        yield running


@pytest.fixture
async def transcriber(server: peers.OpenAIPeerServer):
    t = OpenAITranscriber(server.base_url, model=server.model, default_timeout_s=60.0)
    await t.start()
    yield t
    await t.close()


async def test_final_is_transcribed_by_the_server(server: peers.OpenAIPeerServer,
                                                  transcriber: OpenAITranscriber) -> None:
    served = server.requests_served()
    for name in ("agent-pass", "pbx-invalid"):
        audio = speech(name)
        result = await transcriber.transcribe(final(audio, key="leg-1"))
        assert isinstance(result, TranscriptionResult)
        assert word_error_rate(PROMPTS[name], result.text) <= 0.25, result.text
        assert not result.silence
        assert result.model == f"openai:{server.model}" == "openai:whisper-1"
        assert result.language == "en"
        assert result.avg_logprob < 0.0  # from verbose_json's segments: verbose_json was accepted
        assert 0.0 <= result.no_speech_prob < 0.6
        assert result.audio_seconds == pytest.approx(audio.size / 16_000)
        assert result.processing_seconds > 0.0
    assert transcriber.stats.requests["final"] == 2
    assert transcriber.stats.errors == 0 and transcriber.stats.gated == 0
    assert server.requests_served() == served + 2  # the server's own access log


async def test_silence_is_gated_without_a_request(server: peers.OpenAIPeerServer,
                                                  transcriber: OpenAITranscriber) -> None:
    served = server.requests_served()
    result = await transcriber.transcribe(final(np.zeros(3 * 16_000, np.float32), key="leg-1"))
    assert result.silence and result.text == ""
    assert result.model == "openai:whisper-1"
    assert transcriber.stats.gated == 1
    assert sum(transcriber.stats.requests.values()) == 0
    assert server.requests_served() == served


async def test_prompt_reaches_the_server(transcriber: OpenAITranscriber) -> None:
    audio = speech("agent-pass")
    plain = await transcriber.transcribe(final(audio))
    assert plain.text != plain.text.lower() and "," in plain.text  # "Please enter your password, followed ..."
    prompted = await transcriber.transcribe(final(audio, prompt=LOWER_CASE_PROMPT))
    assert prompted.text == prompted.text.lower() and "," not in prompted.text, prompted.text
    assert word_error_rate(PROMPTS["agent-pass"], prompted.text) <= 0.25
    assert prompted.avg_logprob != plain.avg_logprob


async def test_context_text_reaches_the_server(transcriber: OpenAITranscriber) -> None:
    audio = speech("agent-pass")
    result = await transcriber.transcribe(final(audio, context_text=LOWER_CASE_PROMPT))
    assert result.text == result.text.lower() and "," not in result.text, result.text
    assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25


async def test_prompt_and_context_text_go_together_prompt_first(transcriber: OpenAITranscriber) -> None:
    audio = speech("agent-pass")
    first, second = LOWER_CASE_PROMPT.split(". ")
    joined = await transcriber.transcribe(final(audio, prompt=LOWER_CASE_PROMPT))
    split = await transcriber.transcribe(final(audio, prompt=first + ".", context_text=second))
    assert (split.text, split.avg_logprob) == (joined.text, joined.avg_logprob)


async def test_context_audio_is_not_sent(transcriber: OpenAITranscriber) -> None:
    """The API has no field for it: the result covers the turn's audio alone."""
    result = await transcriber.transcribe(final(speech("agent-pass"), context_audio=speech("pbx-invalid"),
                                                context_text="i am sorry that's not a valid extension"))
    assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25, result.text


async def test_language_reaches_the_server(server: peers.OpenAIPeerServer, transcriber: OpenAITranscriber) -> None:
    marker = "language parameter is set to 'es'"
    before = server.log().count(marker)
    result = await transcriber.transcribe(final(speech("agent-pass"), language="es"))
    assert server.log().count(marker) == before + 1, server.log()[-1500:]
    assert result.language == "en"  # tiny.en answers in English whatever it is asked
    assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25


async def test_deadline_nearly_passed_gives_asr_timeout(server: peers.OpenAIPeerServer) -> None:
    t = OpenAITranscriber(server.base_url, model=server.model, concurrency=1, default_timeout_s=60.0)
    await t.start()
    try:
        audio = speech("agent-pass")
        started = time.monotonic()
        with pytest.raises(AsrTimeout) as caught:
            await t.transcribe(final(audio, key="leg-1", deadline=time.time() + 0.05))
        assert time.monotonic() - started < 1.0
        assert caught.value.code == "asr-timeout"
        with pytest.raises(AsrTimeout):
            await t.transcribe(final(audio, key="leg-1", deadline=time.time() - 1.0))
        assert t.stats.timeouts["final"] == 2
        # The abandoned requests gave their slot back: the only slot serves the next final.
        result = await t.transcribe(final(audio, key="leg-1"))
        assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25
    finally:
        await t.close()


async def test_server_not_running_gives_asr_failed_quickly() -> None:
    t = OpenAITranscriber(f"http://127.0.0.1:{peers.free_port()}/v1", default_timeout_s=30.0)
    await t.start()
    try:
        started = time.monotonic()
        with pytest.raises(TranscriptionError) as caught:
            await t.transcribe(final(speech("agent-pass")))
        assert time.monotonic() - started < 2.0
        assert caught.value.code == "asr-failed"
        assert not isinstance(caught.value, AsrTimeout)
        assert t.stats.errors == 1
    finally:
        await t.close()


async def test_waiting_partial_superseded_by_a_newer_request_for_its_key(server: peers.OpenAIPeerServer) -> None:
    t = OpenAITranscriber(server.base_url, model=server.model, concurrency=1, default_timeout_s=60.0)
    await t.start()
    try:
        busy = asyncio.ensure_future(t.transcribe(final(speech("pbx-invalid"), key="leg-a")))  # holds the slot
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(t.transcribe(partial(speech("agent-pass"), key="leg-b")))
        await asyncio.sleep(0.1)
        newer = asyncio.ensure_future(t.transcribe(final(speech("agent-pass"), key="leg-b")))
        with pytest.raises(Superseded):
            await waiting
        assert t.stats.superseded == 1
        assert word_error_rate(PROMPTS["pbx-invalid"], (await busy).text) <= 0.25
        assert word_error_rate(PROMPTS["agent-pass"], (await newer).text) <= 0.25
        assert t.stats.requests == {"final": 2}  # the superseded partial never reached the server
    finally:
        await t.close()


async def test_partial_in_flight_superseded_by_a_newer_partial(transcriber: OpenAITranscriber) -> None:
    older = asyncio.ensure_future(transcriber.transcribe(partial(speech("pbx-invalid"), key="leg-1")))
    await asyncio.sleep(0.2)  # sent: the server takes about a second
    assert transcriber.stats.requests["partial"] == 1 and not older.done()
    newer = await transcriber.transcribe(partial(speech("agent-pass"), key="leg-1"))
    with pytest.raises(Superseded):
        await older
    assert word_error_rate(PROMPTS["agent-pass"], newer.text) <= 0.25
    assert transcriber.stats.superseded == 1


async def test_finals_are_served_before_waiting_partials(server: peers.OpenAIPeerServer) -> None:
    t = OpenAITranscriber(server.base_url, model=server.model, concurrency=1, default_timeout_s=60.0)
    await t.start()
    done: list[str] = []

    async def run(name: str, request: TranscriptionRequest) -> None:
        await t.transcribe(request)
        done.append(name)

    try:
        busy = asyncio.ensure_future(run("busy", final(speech("agent-pass"), key="leg-a")))
        await asyncio.sleep(0.1)
        late_partial = asyncio.ensure_future(run("partial", partial(speech("agent-pass"), key="leg-b")))
        await asyncio.sleep(0.05)
        later_final = asyncio.ensure_future(run("final", final(speech("agent-pass"), key="leg-c")))
        await asyncio.gather(busy, late_partial, later_final)
        assert done == ["busy", "final", "partial"]
    finally:
        await t.close()


async def test_closed_transcriber_refuses_requests(server: peers.OpenAIPeerServer) -> None:
    t = OpenAITranscriber(server.base_url, model=server.model)
    await t.start()
    await t.close()
    with pytest.raises(TranscriberClosed):
        await t.transcribe(final(speech("agent-pass")))


async def test_close_lets_a_final_in_flight_finish(server: peers.OpenAIPeerServer) -> None:
    """close() lets a final still in flight finish, as the pool and the embedded scheduler do
    (closing the HTTP client under it gave HttpAsrError "ReadError": error asr-failed at every
    gateway shutdown)."""
    t = OpenAITranscriber(server.base_url, model=server.model, default_timeout_s=60.0)
    await t.start()
    pending = asyncio.ensure_future(t.transcribe(final(speech("agent-pass"), key="leg-1")))
    await asyncio.sleep(0.2)  # the POST is out; the server takes about a second
    assert t.stats.requests["final"] == 1 and not pending.done()
    await t.close()
    result = await pending
    assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25


async def test_close_drops_a_waiting_partial_with_transcriber_closed(server: peers.OpenAIPeerServer) -> None:
    """A partial dropped by close() raises TranscriberClosed (not Superseded: no newer request
    came), as the pool and the scheduler do."""
    t = OpenAITranscriber(server.base_url, model=server.model, default_timeout_s=60.0)
    await t.start()
    pending = asyncio.ensure_future(t.transcribe(partial(speech("agent-pass"), key="leg-1")))
    await asyncio.sleep(0.2)
    await t.close()
    with pytest.raises(TranscriberClosed):
        await pending


async def test_a_deadline_later_than_the_default_timeout_is_honoured(server: peers.OpenAIPeerServer) -> None:
    """The HTTP timeout is the request's own deadline, not default_timeout_s: a final with a
    deadline 60 s away on 11 s of speech gets its result although default_timeout_s is 0.2 s."""
    t = OpenAITranscriber(server.base_url, model=server.model, default_timeout_s=0.2)
    await t.start()
    try:
        names = ["agent-pass", "pbx-invalid", "privacy-unident"]  # no repeats: the guard cuts repetition
        audio = np.concatenate([speech(name) for name in names])
        result = await t.transcribe(final(audio, key="leg-1", deadline=time.time() + 60.0))
        assert word_error_rate(" ".join(PROMPTS[name] for name in names), result.text) <= 0.25
    finally:
        await t.close()
