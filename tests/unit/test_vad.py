"""Silero VAD on real telephone prompts, batching, and the asyncio runner."""

from __future__ import annotations

import asyncio
import threading
import wave
from collections import deque
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from gateway.media.vad import BatchedVadRunner, SileroVad, default_model_path

SOUNDS = Path("/usr/share/asterisk/sounds/en")
PROMPTS = ["agent-pass", "vm-intro", "all-circuits-busy-now", "auth-thankyou", "agent-loginok", "basic-pbx-ivr-main"]
CHUNK = SileroVad.CHUNK


def load(name: str) -> np.ndarray:
    with wave.open(str(SOUNDS / f"{name}.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def chunks_of(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[i : i + CHUNK] for i in range(0, len(audio) - CHUNK + 1, CHUNK)]


class Reference:
    """One stream through the model exactly as silero's OnnxWrapper does it,
    written independently of SileroVad's gather/scatter."""

    def __init__(self) -> None:
        self.session = onnxruntime.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, 32), dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        x = np.concatenate([self.context, (chunk.astype(np.float32) / 32768.0)[None, :]], axis=1)
        out, self.state = self.session.run(None, {"input": x, "state": self.state, "sr": np.array(8000, dtype=np.int64)})
        self.context = x[:, -32:]
        return float(out[0, 0])


def reference_probs(chunks: list[np.ndarray]) -> list[float]:
    ref = Reference()
    return [ref(c) for c in chunks]


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def run_alone(vad: SileroVad, key, chunks: list[np.ndarray]) -> np.ndarray:
    vad.add_stream(key)
    try:
        return np.array([vad.infer({key: c})[key] for c in chunks])
    finally:
        vad.remove_stream(key)


def test_default_model_path_is_the_wheels_onnx_file():
    path = default_model_path()
    assert path.name == "silero_vad.onnx" and path.parent.name == "data" and path.is_file()


def test_missing_or_invalid_model_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        SileroVad(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"):
        SileroVad(junk)


@pytest.mark.parametrize("name", PROMPTS)
def test_real_speech_is_detected(vad, name):
    audio = load(name)
    chunks = chunks_of(audio)
    probs = run_alone(vad, ("speech", name), chunks)
    # "Spoken" chunks, labelled independently by level: louder than -35 dBFS.
    rms = np.array([np.sqrt(np.mean(c.astype(np.float64) ** 2)) for c in chunks])
    spoken = 20 * np.log10(rms / 32768 + 1e-12) > -35
    assert spoken.sum() >= 10
    assert np.mean(probs[spoken] > 0.5) >= 0.9


def test_silence_and_low_noise_are_not_speech(vad):
    silence = np.zeros(8000 * 3, dtype=np.int16)
    assert run_alone(vad, "zeros", chunks_of(silence)).max() < 0.5
    noise = (np.random.default_rng(7).standard_normal(8000 * 3) * 100).astype(np.int16)  # about -50 dBFS
    assert run_alone(vad, "noise", chunks_of(noise)).max() < 0.5
    # After speech, digital silence falls back below the threshold.
    after = run_alone(vad, "after", chunks_of(np.concatenate([load("agent-pass"), silence])))
    assert after[-16:].max() < 0.5


def test_matches_reference_protocol(vad):
    chunks = chunks_of(load("agent-pass"))
    ours = run_alone(vad, "ref", chunks)
    assert np.max(np.abs(ours - np.array(reference_probs(chunks)))) < 1e-5


def test_batch_equals_streams_alone_with_add_and_remove_midway(vad):
    audio = {name: chunks_of(load(name))[:40] for name in PROMPTS}
    cursor = {name: 0 for name in PROMPTS[:4]}  # streams present from the start
    for name in cursor:
        vad.add_stream(name)
    got: dict[str, list[float]] = {name: [] for name in PROMPTS}
    for t in range(40):
        if t == 10:  # one stream leaves, another joins (possibly reusing its slot)
            vad.remove_stream(PROMPTS[1])
            del cursor[PROMPTS[1]]
            vad.add_stream(PROMPTS[5])
            cursor[PROMPTS[5]] = 0
        batch = {}
        for i, (name, k) in enumerate(cursor.items()):
            if (t + i) % 4 != 0 and k < len(audio[name]):  # not every stream has a chunk every tick
                batch[name] = audio[name][k]
                cursor[name] = k + 1
        for key, p in vad.infer(batch).items():
            got[key].append(p)
    for name in cursor:
        vad.remove_stream(name)
    assert len(vad) == 0

    for name, probs in got.items():
        if name == PROMPTS[4]:
            assert probs == []
            continue
        assert len(probs) >= 6, name
        np.testing.assert_allclose(probs, reference_probs(audio[name][: len(probs)]), atol=1e-4, err_msg=name)


def test_batch_of_many_streams_and_slot_growth():
    vad = SileroVad()
    audio = chunks_of(load("vm-intro"))
    offsets = list(range(0, 100, 3))  # 34 streams: more than the initial 16 slots
    for k in offsets:
        vad.add_stream(k)
    got = {k: [] for k in offsets}
    for t in range(20):
        for k, p in vad.infer({k: audio[k + t] for k in offsets}).items():
            got[k].append(p)
    for k in (0, 51, 99):
        np.testing.assert_allclose(got[k], reference_probs(audio[k : k + 20]), atol=1e-4)


def test_float32_input_and_reset(vad):
    chunks = chunks_of(load("agent-pass"))[:20]
    as_int = run_alone(vad, "i", chunks)
    as_float = run_alone(vad, "f", [c.astype(np.float32) / 32768 for c in chunks])
    np.testing.assert_allclose(as_int, as_float, atol=1e-6)
    vad.add_stream("r")
    first = [vad.infer({"r": c})["r"] for c in chunks[:5]]
    vad.reset("r")
    again = [vad.infer({"r": c})["r"] for c in chunks[:5]]
    vad.remove_stream("r")
    np.testing.assert_allclose(first, again, atol=1e-6)
    # A stream re-added under a removed key starts fresh too.
    np.testing.assert_allclose(run_alone(vad, "i", chunks[:5]), first, atol=1e-6)


def test_bad_input_errors(vad):
    vad.add_stream("ok")
    try:
        good = np.zeros(CHUNK, dtype=np.int16)
        with pytest.raises(KeyError, match="ghost"):
            vad.infer({"ok": good, "ghost": good})
        with pytest.raises(ValueError, match="already"):
            vad.add_stream("ok")
        with pytest.raises(KeyError, match="ghost"):
            vad.remove_stream("ghost")
        with pytest.raises(KeyError, match="ghost"):
            vad.reset("ghost")
        with pytest.raises(ValueError, match=r"'ok'.*shape"):
            vad.infer({"ok": np.zeros(160, dtype=np.int16)})
        with pytest.raises(ValueError, match=r"'ok'.*float64"):
            vad.infer({"ok": np.zeros(CHUNK)})
        assert vad.infer({}) == {}
        assert 0.0 <= vad.infer({"ok": good})["ok"] <= 1.0  # still usable
    finally:
        vad.remove_stream("ok")


class Leg:
    """A VadStream over a real recording, with chunks made ready on demand."""

    def __init__(self, key, audio: np.ndarray) -> None:
        self.key = key
        self.all = chunks_of(audio)
        self.ready: deque[np.ndarray] = deque()
        self.results: list[tuple[np.ndarray, float]] = []
        self.threads: set[int] = set()

    def make_ready(self, n: int | None = None) -> None:
        start = len(self.results) + len(self.ready)
        self.ready.extend(self.all[start : None if n is None else start + n])

    def next_chunk(self) -> np.ndarray | None:
        return self.ready.popleft() if self.ready else None

    def on_vad(self, chunk: np.ndarray, probability: float) -> None:
        self.threads.add(threading.get_ident())
        self.results.append((chunk, probability))


async def test_runner_processes_real_streams(vad):
    runner = BatchedVadRunner(vad, tick=0.005, max_rounds=4)
    legs = [Leg(f"leg-{name}", load(name)) for name in PROMPTS[:3]]
    ticks: list[tuple[float, int]] = []
    runner.on_tick = lambda seconds, size: ticks.append((seconds, size))
    for leg in legs:
        runner.register(leg)
        leg.make_ready()  # a whole backlog at once: max_rounds bounds each tick
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(60):
            while any(len(leg.results) < len(leg.all) for leg in legs):
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        runner.close()
    assert ticks[0][1] == 3 * 4
    assert all(size <= 3 * 4 for _, size in ticks)
    assert runner.last_batch_size == ticks[-1][1] and runner.last_tick_seconds > 0
    for leg in legs:
        assert leg.threads == {threading.get_ident()}  # on_vad runs on the loop thread
        assert all(a is b for (a, _), b in zip(leg.results, leg.all))  # in order, nothing lost
        np.testing.assert_allclose([p for _, p in leg.results], reference_probs(leg.all), atol=1e-4)
        runner.unregister(leg)
    await runner.drain()  # applies the removals
    assert len(vad) == 0 and len(runner) == 0


async def test_runner_drain_register_unregister_and_faulty_streams(vad):
    runner = BatchedVadRunner(vad)
    a, b = Leg("a", load("vm-intro")), Leg("b", load("agent-pass"))

    class Broken(Leg):
        def next_chunk(self):
            raise RuntimeError("boom")

    class Malformed(Leg):
        def next_chunk(self):
            return np.zeros(100, dtype=np.int16)

    broken, malformed = Broken("broken", load("vm-intro")), Malformed("bad", load("vm-intro"))
    for leg in (a, b, broken, malformed):
        runner.register(leg)
    with pytest.raises(ValueError, match="already registered"):
        runner.register(Leg("a", load("vm-intro")))
    try:
        a.make_ready(20)
        b.make_ready(5)
        await runner.drain()
        assert (len(a.results), len(b.results)) == (20, 5)
        assert len(vad) == 4
        runner.unregister(b)
        with pytest.raises(KeyError):
            runner.unregister(b)
        b.make_ready(5)  # unregistered: never asked again
        a.make_ready(10)
        await runner.drain()
        assert (len(a.results), len(b.results)) == (30, 5)
        assert "b" not in vad and len(vad) == 3
        # Re-registered under the same key, the stream starts with a fresh model state.
        c = Leg("b", load("agent-pass"))
        runner.register(c)
        c.make_ready(5)
        await runner.drain()
        np.testing.assert_allclose([p for _, p in c.results], [p for _, p in b.results], atol=1e-4)
        np.testing.assert_allclose([p for _, p in a.results], reference_probs(a.all[:30]), atol=1e-4)
        # A stream unregistered after its chunk was gathered gets no callback.
        victim = Leg("victim", load("agent-pass"))

        class Killer(Leg):
            def on_vad(self, chunk, probability):
                super().on_vad(chunk, probability)
                runner.unregister(victim)

        killer = Killer("killer", load("agent-pass"))
        runner.register(killer)
        runner.register(victim)
        killer.make_ready(1)
        victim.make_ready(3)
        await runner.drain()
        assert (len(killer.results), len(victim.results)) == (1, 0)
        assert "victim" not in vad
        for leg in (a, c, broken, malformed, killer):
            runner.unregister(leg)
        await runner.drain()
        assert len(vad) == 0
    finally:
        runner.close()
