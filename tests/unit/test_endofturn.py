"""Smart Turn v3.2: model file, features, predictions on real speech, batched runner."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.media import endofturn
from gateway.media.endofturn import (
    N_FRAMES,
    N_MELS,
    SAMPLE_RATE,
    WINDOW_S,
    WINDOW_SAMPLES,
    EndOfTurnRunner,
    SmartTurn,
    default_model_path,
    log_mel_features,
)
from gateway.media.resample import upsample_8k_to_16k
from tests.fixtures_data import read_pcm16

ROOT = Path(__file__).resolve().parents[2]
TAIL_MS = 200  # trailing silence when the model is asked: a pause has just begun


@pytest.fixture(scope="module")
def model() -> SmartTurn:
    return SmartTurn()


def noise(seconds: float, seed: int = 0, level: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SAMPLE_RATE)) * level).astype(np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * SAMPLE_RATE // 1000, dtype=np.float32)


# ---------------------------------------------------------------------------
# Independent feature computations to check log_mel_features against


def reference_features(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel of the last 8 s, written from the Whisper/transformers
    recipe in float64 without faster-whisper: front zero-padding, waveform
    normalisation, centred reflect-padded STFT (periodic Hann 400, hop 160),
    Slaney mel filterbank (80 bands, 0-8 kHz, area-normalised), log10 with a
    1e-10 floor, last frame dropped, dynamic range 8, (x + 4) / 4."""
    x = np.asarray(audio, dtype=np.float64)[-WINDOW_SAMPLES:]
    x = np.concatenate([np.zeros(WINDOW_SAMPLES - len(x)), x])
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    n_fft, hop = 400, 160
    padded = np.pad(x, n_fft // 2, mode="reflect")
    n = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[i * hop : i * hop + n_fft] for i in range(n)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # [frames, 201]

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, f * 3 / 200, 15 + np.log(np.maximum(f, 1e-9) / 1000) * 27 / np.log(6.4))

    def mel_to_hz(m):
        return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), N_MELS + 2))
    bins = np.linspace(0, 8000, n_fft // 2 + 1)
    fb = np.zeros((N_MELS, len(bins)))
    for m in range(N_MELS):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (bins - lo) / (mid - lo)
        falling = (hi - bins) / (hi - mid)
        fb[m] = np.maximum(0, np.minimum(rising, falling)) * 2 / (hi - lo)
    log_spec = np.log10(np.maximum(fb @ power.T, 1e-10))[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pipecat_features():
    """pipecat's own feature function, loaded from the installed wheel's file
    (it imports only numpy; the pipecat package itself is never imported)."""
    path = default_model_path().parents[1] / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("_pipecat_whisper_features_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_whisper_log_mel_features


def pipecat_window(audio: np.ndarray) -> np.ndarray:
    """pipecat's truncate_audio_to_last_n_seconds, restated: keep the end, pad the front."""
    if len(audio) >= WINDOW_SAMPLES:
        return audio[-WINDOW_SAMPLES:]
    return np.pad(audio, (WINDOW_SAMPLES - len(audio), 0))


# ---------------------------------------------------------------------------
# Model file


def test_default_model_path_finds_the_wheel_file_without_importing_pipecat():
    path = default_model_path()
    assert path.name == "smart-turn-v3.2-cpu.onnx" and path.is_file()
    assert path.parent.parts[-5:] == ("pipecat", "audio", "turn", "smart_turn", "data")
    assert 8_000_000 < path.stat().st_size < 9_500_000
    code = (
        "import sys; from gateway.media.endofturn import default_model_path; default_model_path(); "
        "import gateway.media.endofturn as e; e.SmartTurn(); "
        "bad = sorted(m for m in sys.modules if m == 'pipecat' or m.startswith('pipecat.')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_missing_package_names_the_setup_step(monkeypatch):
    monkeypatch.setattr(endofturn.importlib.util, "find_spec", lambda name: None)

    def no_distribution(name):
        raise endofturn.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(endofturn.importlib.metadata, "distribution", no_distribution)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pipecat-ai.*deploy/setup\.sh"):
        default_model_path()
    with pytest.raises(FileNotFoundError, match="pipecat-ai"):
        SmartTurn()


def test_missing_or_wrong_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        SmartTurn(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"):
        SmartTurn(junk)
    from gateway.media.vad import default_model_path as silero_path

    with pytest.raises(ValueError, match="not a Smart Turn v3 model"):
        SmartTurn(silero_path())
    with pytest.raises(ValueError, match="threads"):
        SmartTurn(threads=0)


def test_model_has_the_expected_input_and_output(model):
    (inp,) = model._session.get_inputs()
    (out,) = model._session.get_outputs()
    assert inp.name == "input_features" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [80, 800] and not isinstance(inp.shape[0], int)  # dynamic batch
    assert out.type == "tensor(float)" and out.shape[1:] == [1]
    assert model.threads == 1


def test_output_is_a_probability(model):
    clips = [silence(3000), noise(3), noise(10, seed=1, level=0.5), np.zeros(0, np.float32)]
    p = model.predict(clips)
    assert p.shape == (4,) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.isfinite(p))
    assert model.predict([]).shape == (0,)


# ---------------------------------------------------------------------------
# Features


def test_constants():
    assert (SAMPLE_RATE, WINDOW_S, WINDOW_SAMPLES, N_MELS, N_FRAMES) == (16000, 8.0, 128000, 80, 800)


@pytest.mark.parametrize("seconds", [0.0, 0.01, 2.5, 8.0, 12.3])
def test_feature_shape(seconds):
    f = log_mel_features(noise(seconds))
    assert f.shape == (80, 800) and f.dtype == np.float32 and np.all(np.isfinite(f))


def test_short_clip_is_padded_in_front():
    clip = noise(3.0)
    f = log_mel_features(clip)
    padded = np.concatenate([np.zeros(WINDOW_SAMPLES - len(clip), np.float32), clip])
    np.testing.assert_array_equal(f, log_mel_features(padded))
    # The padding (first 5 s = 500 frames, less the STFT's 2-frame overlap) is one
    # constant column; the noise at the end is not.
    assert np.ptp(f[:, :495], axis=1).max() < 1e-6
    assert np.ptp(f[:, 505:], axis=1).min() > 0.1
    back = np.concatenate([clip, np.zeros(WINDOW_SAMPLES - len(clip), np.float32)])
    assert np.abs(f - log_mel_features(back)).max() > 0.5


def test_long_clip_keeps_the_last_8_seconds():
    clip = np.concatenate([noise(4.0, seed=1, level=0.5), noise(8.0, seed=2)])
    f = log_mel_features(clip)
    np.testing.assert_array_equal(f, log_mel_features(clip[-WINDOW_SAMPLES:]))
    assert np.abs(f - log_mel_features(clip[:WINDOW_SAMPLES])).max() > 0.5


def test_int16_input_is_scaled():
    clip = noise(2.0, level=0.2)
    pcm = np.round(clip * 32768).astype(np.int16)
    np.testing.assert_allclose(log_mel_features(pcm), log_mel_features(pcm.astype(np.float32) / 32768), atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((2, 100), np.float32), np.zeros(100, np.int32), [0.0] * 100])
def test_bad_audio_is_rejected(bad):
    with pytest.raises(ValueError, match="end-of-turn audio"):
        log_mel_features(bad)


def speech_clips() -> dict[str, np.ndarray]:
    prompt = upsample_8k_to_16k(read_pcm16("prompt_check-number-dial-again.wav")[0])
    monologue = upsample_8k_to_16k(read_pcm16("flite_slt_monologue.wav")[0])
    return {
        "short prompt": prompt,  # 2.2 s: padded in front
        "exactly 8 s": monologue[:WINDOW_SAMPLES],
        "long monologue": monologue,  # 28.7 s: truncated to its last 8 s
        "noise": noise(5.0, seed=3),
    }


@pytest.mark.parametrize("name", list(speech_clips()))
def test_features_equal_independent_computations(model, name):
    clip = speech_clips()[name]
    ours = log_mel_features(clip)
    reference = reference_features(clip)
    assert np.abs(ours - reference).max() < 1e-4, np.abs(ours - reference).max()
    theirs = pipecat_features()(pipecat_window(clip), do_normalize=True)
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()
    # ... and the model cannot tell the difference.
    p_ours = model.predict_features(ours[None])[0]
    p_theirs = model.predict_features(theirs[None].astype(np.float32))[0]
    assert abs(p_ours - p_theirs) < 1e-3


# ---------------------------------------------------------------------------
# Real speech: a finished sentence vs the same sentence cut mid-way


def frame_db(audio: np.ndarray) -> np.ndarray:
    """Level of each 10 ms frame in dBFS."""
    n = len(audio) // 160
    frames = audio[: n * 160].astype(np.float64).reshape(n, 160)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


# Single-sentence Asterisk prompts (Allison Smith, a human speaker), G.711 8 kHz.
PROMPTS = [
    "prompt_all-circuits-busy-now.wav",  # All circuits are busy now.
    "prompt_check-number-dial-again.wav",  # Please check the number and dial again.
    "prompt_feature-not-avail-line.wav",  # That feature is not available on this line.
    "prompt_tt-weasels.wav",  # Weasels have eaten our phone system
]


@pytest.mark.parametrize("name", PROMPTS)
def test_finished_prompt_scores_high_and_cut_prompt_low(model, name):
    audio = upsample_8k_to_16k(read_pcm16(name)[0])
    db = frame_db(audio)
    loud = np.nonzero(db > -40)[0]
    start, end = int(loud[0]), int(loud[-1]) + 1
    # Cut at the quietest frame of the middle third of the speech: between two
    # words, well before the sentence ends.
    lo, hi = start + (end - start) // 3, start + 2 * (end - start) // 3
    cut = lo + int(np.argmin(db[lo:hi]))
    full = np.concatenate([audio[: end * 160], silence(TAIL_MS)])
    half = np.concatenate([audio[: cut * 160], silence(TAIL_MS)])
    p_full, p_half = model.predict([full, half]).tolist()
    print(f"{name}: finished {p_full:.3f}, cut at {cut * 10} of {end * 10} ms {p_half:.3f}")
    assert p_full > 0.8
    assert p_half < 0.3


def flite_with_segments(text: str, tmp_path: Path) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """flite slt (16 kHz) audio of ``text`` and its phone segments (name, end time in s)."""
    out = tmp_path / "flite.wav"
    run = subprocess.run(["flite", "-voice", "slt", "-psdur", "-t", text, "-o", str(out)],
                         capture_output=True, text=True, check=True, timeout=60)
    segments = [(m[1], float(m[2])) for m in re.finditer(r"(\S+):([0-9.]+)", run.stdout)]
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return audio, segments


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")
def test_account_number_sentence_cut_after_is(model, tmp_path):
    audio, segments = flite_with_segments("My account number is seven three nine.", tmp_path)
    phones = [p for p, _ in segments]
    # my=m ay, account=ax k aw n t, number=n ah m b er, is=ih z: the first z ends "is".
    assert phones[:14] == ["pau", "m", "ay", "ax", "k", "aw", "n", "t", "n", "ah", "m", "b", "er", "ih"]
    is_end = segments[phones.index("z")][1]
    speech_end = segments[-2][1]  # the last segment is the closing pause
    full = np.concatenate([audio[: int(speech_end * SAMPLE_RATE)], silence(TAIL_MS)])
    cut = np.concatenate([audio[: int(is_end * SAMPLE_RATE)], silence(TAIL_MS)])
    p_full, p_cut = model.predict([full, cut]).tolist()
    print(f"flite slt: 'my account number is seven three nine.' {p_full:.3f}, cut after 'is' {p_cut:.3f}")
    assert p_full > 0.7
    assert p_cut < p_full - 0.4


def test_batch_equals_one_by_one(model):
    clips = [upsample_8k_to_16k(read_pcm16(name)[0]) for name in PROMPTS]
    clips += [c[: len(c) // 2] for c in clips] + [silence(500), noise(9.0)]
    alone = np.array([model.predict([c])[0] for c in clips])
    together = model.predict(clips)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(model.predict(clips[::-1])[::-1], alone, atol=1e-6)


# ---------------------------------------------------------------------------
# EndOfTurnRunner


class FakeModel:
    """Answers len(clip) / 1e6 so each caller can check it got its own answer."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.fail: Exception | None = None

    def predict(self, audios: list[np.ndarray]) -> np.ndarray:
        self.calls.append(len(audios))
        self.threads.add(threading.get_ident())
        if self.fail is not None:
            raise self.fail
        return np.array([len(a) / 1e6 for a in audios], dtype=np.float32)


def clip_of(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float32)


async def test_concurrent_asks_share_one_call():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake)
    try:
        got = await asyncio.gather(*(runner.probability(clip_of(1000 * (i + 1))) for i in range(10)))
        assert got == pytest.approx([0.001 * (i + 1) for i in range(10)])
        assert fake.calls == [10] and runner.batches == 1 and runner.last_batch_size == 10
        assert threading.get_ident() not in fake.threads
    finally:
        runner.close()


async def test_asks_within_the_gather_window_join_the_batch():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake, gather_s=0.05)
    try:
        first = asyncio.ensure_future(runner.probability(clip_of(10)))
        await asyncio.sleep(0.01)  # another leg pauses 10 ms later
        second = asyncio.ensure_future(runner.probability(clip_of(20)))
        assert await first == pytest.approx(1e-5) and await second == pytest.approx(2e-5)
        assert fake.calls == [2]
    finally:
        runner.close()


async def test_batches_are_bounded_and_later_asks_form_the_next_batch():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake, max_batch=4, gather_s=0)
    try:
        got = await asyncio.gather(*(runner.probability(clip_of(i + 1)) for i in range(10)))
        assert got == pytest.approx([(i + 1) / 1e6 for i in range(10)])
        assert fake.calls == [4, 4, 2]
        # Asks one after another are answered one by one.
        for i in range(3):
            await runner.probability(clip_of(1))
        assert fake.calls == [4, 4, 2, 1, 1, 1]
    finally:
        runner.close()


async def test_asks_during_a_running_batch_wait_for_the_next():
    release = threading.Event()
    calls: list[int] = []

    class Slow:
        def predict(self, audios):
            calls.append(len(audios))
            release.wait(5)
            return np.ones(len(audios), np.float32)

    runner = EndOfTurnRunner(Slow(), gather_s=0)
    try:
        first = asyncio.ensure_future(runner.probability(clip_of(1)))
        while not calls:
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(runner.probability(clip_of(1))) for _ in range(5)]
        await asyncio.sleep(0.01)
        release.set()
        assert await first == 1.0 and await asyncio.gather(*later) == [1.0] * 5
        assert calls == [1, 5]
    finally:
        runner.close()


async def test_the_event_loop_keeps_running_while_the_model_runs():
    """The model blocks until the loop has ticked: if it ran on the loop thread
    the ticks could not happen and the wait would time out."""
    release = threading.Event()
    waited: list[bool] = []

    class Blocking:
        def predict(self, audios):
            waited.append(release.wait(5))
            return np.full(len(audios), 0.9, np.float32)

    runner = EndOfTurnRunner(Blocking())
    try:
        ask = asyncio.ensure_future(runner.probability(clip_of(100)))
        ticks = 0
        while ticks < 5:
            await asyncio.sleep(0.005)
            ticks += 1
        release.set()
        assert await ask == pytest.approx(0.9)
        assert waited == [True]
    finally:
        runner.close()


async def test_model_errors_reach_every_caller_of_the_batch():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake)
    try:
        fake.fail = RuntimeError("onnx exploded")
        results = await asyncio.gather(*(runner.probability(clip_of(5)) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "onnx exploded" in str(r) for r in results)
        fake.fail = None
        assert await runner.probability(clip_of(5)) == pytest.approx(5e-6)  # the runner survives
    finally:
        runner.close()


async def test_wrong_number_of_results_is_an_error():
    class Short:
        def predict(self, audios):
            return np.zeros(len(audios) - 1, np.float32)

    runner = EndOfTurnRunner(Short())
    try:
        results = await asyncio.gather(runner.probability(clip_of(1)), runner.probability(clip_of(1)),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "1 results for 2 clips" in str(r) for r in results)
    finally:
        runner.close()


async def test_a_bad_clip_fails_only_its_caller():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake)
    try:
        results = await asyncio.gather(runner.probability(clip_of(7)), runner.probability(np.zeros((2, 7))),
                                       runner.probability(clip_of(9)), return_exceptions=True)
        assert results[0] == pytest.approx(7e-6) and results[2] == pytest.approx(9e-6)
        assert isinstance(results[1], ValueError)
        assert fake.calls == [2]
    finally:
        runner.close()


async def test_a_cancelled_ask_is_left_out():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake, gather_s=0.02)
    try:
        gone = asyncio.ensure_future(runner.probability(clip_of(1)))
        kept = asyncio.ensure_future(runner.probability(clip_of(2)))
        await asyncio.sleep(0)
        gone.cancel()  # speech resumed before the model was asked
        assert await kept == pytest.approx(2e-6)
        assert gone.cancelled() and fake.calls == [1]
    finally:
        runner.close()


async def test_the_clip_is_copied_when_queued():
    seen: list[np.ndarray] = []

    class Recording:
        def predict(self, audios):
            seen.extend(a.copy() for a in audios)
            return np.zeros(len(audios), np.float32)

    runner = EndOfTurnRunner(Recording(), gather_s=0.01)
    try:
        buffer = np.ones(WINDOW_SAMPLES + 500, np.float32)
        ask = asyncio.ensure_future(runner.probability(buffer))
        await asyncio.sleep(0)
        buffer[:] = 2.0  # the leg's buffer moves on while the ask waits
        await ask
        (clip,) = seen
        assert clip.shape == (WINDOW_SAMPLES,) and np.all(clip == 1.0)  # the last 8 s, as they were
    finally:
        runner.close()


async def test_close_stops_the_thread_and_fails_asks():
    fake = FakeModel()
    runner = EndOfTurnRunner(fake, gather_s=0.05)
    await runner.probability(clip_of(1))
    workers = [t for t in threading.enumerate() if t.name.startswith("earshot-endofturn")]
    assert workers
    pending = asyncio.ensure_future(runner.probability(clip_of(1)))
    await asyncio.sleep(0)
    runner.close()
    assert runner.closed
    with pytest.raises(RuntimeError, match="closed"):
        await pending
    with pytest.raises(RuntimeError, match="closed"):
        await runner.probability(clip_of(1))
    assert not any(t.is_alive() for t in workers)
    assert fake.calls == [1]
    runner.close()  # idempotent


async def test_runner_with_the_real_model_batches_into_one_onnx_call(model):
    runs: list[int] = []

    class CountingSession:
        def __init__(self, session):
            self._session = session

        def run(self, outputs, feeds):
            runs.append(len(feeds["input_features"]))
            return self._session.run(outputs, feeds)

    counted = SmartTurn()
    counted._session = CountingSession(counted._session)
    clips = [upsample_8k_to_16k(read_pcm16(name)[0]) for name in PROMPTS]
    clips += [c[: len(c) // 2] for c in clips]
    expected = [model.predict([c])[0] for c in clips]
    runner = EndOfTurnRunner(counted)
    try:
        got = await asyncio.gather(*(runner.probability(c) for c in clips))
    finally:
        runner.close()
    assert runs == [len(clips)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


async def test_cancelling_the_runner_task_fails_the_running_batch():
    """Loop shutdown cancels every task: the callers of the batch in the model
    must get an error rather than wait forever."""
    release = threading.Event()
    started = threading.Event()

    class Slow:
        def predict(self, audios):
            started.set()
            release.wait(5)
            return np.ones(len(audios), np.float32)

    runner = EndOfTurnRunner(Slow(), gather_s=0)
    try:
        ask = asyncio.ensure_future(runner.probability(clip_of(1)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        runner._task.cancel()
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(ask, 2)
    finally:
        release.set()
        runner.close()
