"""Semantic end-of-turn detection with the Smart Turn v3.2 model.

A fixed silence threshold cannot tell "my account number is ..." (a
speaker looking for digits) from "thank you." (a finished turn), so it has to
wait long enough for the slowest thinker. Smart Turn v3.2 (Daily, BSD-2) is a
small Whisper-encoder classifier trained to answer exactly that question from
the audio alone, prosody included: given the last 8 s of a turn it returns the
probability that the speaker has finished. The turn policy asks it once, when
a pause begins, instead of waiting out the whole threshold.

What the model expects (taken from pipecat's ``LocalSmartTurnAnalyzerV3``,
which is the reference inference code for this model file):

* 16 kHz mono float audio. Telephone legs must be upsampled first
  (:func:`gateway.media.resample.upsample_8k_to_16k`); 8 kHz samples passed as
  if they were 16 kHz are not detected here and give wrong answers, because
  the spectrogram then shows speech an octave too low and twice as slow.
* Exactly 8 s: the *last* 8 s of the audio, zero-padded at the *front* when
  the turn is shorter, so the end of speech always sits at the same place in
  the window.
* Whisper log-mel features of that window, [80, 800], after zero-mean,
  unit-variance normalisation of the padded 8 s waveform (the
  ``do_normalize=True`` of transformers' WhisperFeatureExtractor).
* ONNX input ``input_features`` [batch, 80, 800] float32; output [batch, 1],
  already a sigmoid probability (despite the output's name ``logits``).
  pipecat treats > 0.5 as complete.
* pipecat feeds it the turn from 0.5 s before speech started up to now,
  including the trailing silence seen so far; the model was tuned for pauses
  of about 200 ms (pipecat's recommended VAD stop time), and its answer
  for an unfinished sentence drifts towards "complete" as the trailing
  silence grows, so ask early in the pause.

Only the ONNX file of the ``pipecat-ai`` wheel is used, installed with
``--no-deps`` (deploy/setup.sh); Earshot never imports pipecat. The features
come from faster-whisper's numpy ``FeatureExtractor``, which matches
pipecat's own implementation to within float32 rounding
(tests/unit/test_endofturn.py checks this).

:class:`SmartTurn` wraps one onnxruntime session; :class:`EndOfTurnRunner`
gathers the questions of all call legs that pause at about the same moment
into one batched ``session.run`` in a worker thread, as
:class:`gateway.media.vad.BatchedVadRunner` does for the VAD.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import logging
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .onnx import cpu_session

if TYPE_CHECKING:
    from faster_whisper.feature_extractor import FeatureExtractor

__all__ = [
    "N_FRAMES",
    "N_MELS",
    "SAMPLE_RATE",
    "WINDOW_S",
    "WINDOW_SAMPLES",
    "EndOfTurnRunner",
    "SmartTurn",
    "TurnModel",
    "default_model_path",
    "log_mel_features",
    "measure",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW_S = 8.0
WINDOW_SAMPLES = int(SAMPLE_RATE * WINDOW_S)  # 128000
N_MELS = 80
HOP_LENGTH = 160
N_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 800
INPUT_NAME = "input_features"

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
_DISTRIBUTION = "pipecat-ai"
_PACKAGE = "pipecat"
_MODEL_RELATIVE = PurePosixPath("audio", "turn", "smart_turn", "data", MODEL_FILE)
_SETUP_HINT = (
    "install the model file with `pip install --no-deps pipecat-ai==1.14.0` "
    "(deploy/setup.sh does this; --no-deps keeps pipecat's dependencies out)"
)
_NORM_EPS = np.float32(1e-7)  # transformers' WhisperFeatureExtractor variance epsilon
_INT16_SCALE = np.float32(1.0 / 32768.0)


def default_model_path() -> Path:
    """Locate ``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``.

    ``find_spec`` on the top-level ``pipecat`` package only finds it on disk
    (pipecat's ``__init__`` is never run, so none of its dependencies need to
    be installed); the distribution's file list is the fallback for layouts
    where the package directory is not where the spec points.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(loc, _MODEL_RELATIVE) for loc in spec.submodule_search_locations)
    try:
        files = importlib.metadata.distribution(_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates.extend(Path(str(f.locate())) for f in files if f.name == MODEL_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not candidates:
        raise FileNotFoundError(f"Smart Turn model {MODEL_FILE} not found: pipecat-ai is not installed; {_SETUP_HINT}")
    raise FileNotFoundError(f"Smart Turn model file missing: {candidates[0]}; {_SETUP_HINT}")


_extractor: FeatureExtractor | None = None


def _feature_extractor() -> FeatureExtractor:
    """faster-whisper's extractor, built on first use: importing faster_whisper
    loads ctranslate2, which the gateway should not pay for at import time."""
    global _extractor
    if _extractor is None:
        from faster_whisper.feature_extractor import FeatureExtractor

        _extractor = FeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=8)
    return _extractor


def _tail(audio16k: np.ndarray) -> np.ndarray:
    """The last 8 s (or less) of ``audio16k`` as float32 (a view if it already is)."""
    if not isinstance(audio16k, np.ndarray) or audio16k.ndim != 1:
        shape = getattr(audio16k, "shape", type(audio16k).__name__)
        raise ValueError(f"end-of-turn audio must be a 1-D array of 16 kHz samples, got {shape}")
    tail = audio16k[-WINDOW_SAMPLES:]
    if tail.dtype == np.int16:
        tail = tail.astype(np.float32) * _INT16_SCALE
    elif tail.dtype.kind == "f":
        tail = tail.astype(np.float32, copy=False)
    else:
        raise ValueError(f"end-of-turn audio must be float (or int16) samples, got {tail.dtype}")
    return tail


def _window(audio16k: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio16k`` as float32, zero-padded at the front."""
    tail = _tail(audio16k)
    if len(tail) == WINDOW_SAMPLES:
        return tail
    out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    if len(tail):
        out[-len(tail) :] = tail
    return out


def log_mel_features(audio16k: np.ndarray) -> np.ndarray:
    """Smart Turn's input for one clip: [80, 800] float32 Whisper log-mel.

    ``audio16k`` is mono 16 kHz, float in [-1, 1] (int16 is scaled by
    1/32768; the normalisation makes the level irrelevant anyway). Only the
    last 8 s count; a shorter clip is zero-padded in front. The padded window
    is normalised to zero mean and unit variance *before* the spectrogram, as
    the model was trained; an all-zero (or empty) clip gives a constant
    spectrogram, not NaN.
    """
    x = _window(audio16k)
    x = (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
    # padding=0: the window is already exactly 8 s (faster-whisper's default
    # appends 160 zeros for its own 30 s windows). The centred STFT gives
    # 801 frames; the extractor drops the last, leaving 800.
    features = _feature_extractor()(x, padding=0)
    return np.asarray(features, dtype=np.float32)


class TurnModel(Protocol):
    """What :class:`EndOfTurnRunner` needs: a batched end-of-turn classifier
    (:class:`SmartTurn`, or a stub in tests)."""

    def predict(self, audios: list[np.ndarray]) -> np.ndarray:
        """P(turn complete) for each 16 kHz clip, in order."""
        ...


class SmartTurn:
    """Smart Turn v3.2 in one onnxruntime CPU session.

    One intra-op thread by default: the gateway runs many things on few
    cores, and batching across legs (:class:`EndOfTurnRunner`) uses a core
    better than splitting one clip over several. ``predict`` is thread-safe
    (onnxruntime sessions are), but is meant to be called from one worker.
    """

    def __init__(self, model_path: str | Path | None = None, *, threads: int = 1) -> None:
        path = default_model_path() if model_path is None else Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Smart Turn model file missing: {path}; {_SETUP_HINT}")
        self._session = cpu_session(path, threads=threads)  # graph optimisation: onnxruntime's default, all
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if (
            len(inputs) != 1
            or inputs[0].name != INPUT_NAME
            or list(inputs[0].shape[1:]) != [N_MELS, N_FRAMES]
            or len(outputs) != 1
            or list(outputs[0].shape[1:]) != [1]
        ):
            found = [(i.name, i.shape) for i in inputs], [(o.name, o.shape) for o in outputs]
            raise ValueError(f"{path} is not a Smart Turn v3 model (inputs, outputs: {found})")
        self.model_path = path
        self.threads = threads
        # Pay the first-call costs (faster_whisper's import, onnxruntime's first
        # allocations) here, at startup, not in the first caller's pause.
        self.predict([np.zeros(0, dtype=np.float32)])

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        """The model input for ``audios``: [len(audios), 80, 800] float32."""
        batch = np.empty((len(audios), N_MELS, N_FRAMES), dtype=np.float32)
        for row, audio in zip(batch, audios):
            row[:] = log_mel_features(audio)
        return batch

    def predict(self, audios: list[np.ndarray]) -> np.ndarray:
        """P(turn complete) for each 16 kHz clip, from one ``session.run``.

        Each clip is judged on its own last 8 s; the result does not depend
        on which other clips share the batch. An empty list returns an empty
        array without running the model.
        """
        if not audios:
            return np.empty(0, dtype=np.float32)
        return self.predict_features(self.features(audios))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """P(turn complete) for precomputed [batch, 80, 800] features."""
        (probabilities,) = self._session.run(None, {INPUT_NAME: features})
        return np.asarray(probabilities, dtype=np.float32).reshape(len(features))


class EndOfTurnRunner:
    """Answers "has this speaker finished?" for many legs, batched, off the loop.

    Each :meth:`probability` call queues one clip and awaits its answer.
    A batch is started once the asks of the current loop iteration (and of
    the next ``gather_s``, 2 ms by default) are in; asks that arrive while
    the model runs form the next batch, so under load the batches grow
    instead of the queue. At most ``max_batch`` clips go into one
    ``session.run``. The model runs in one worker thread (onnxruntime
    releases the GIL), so the event loop keeps receiving packets.

    The clip is copied (its last 8 s only) when it is queued, so the caller
    may keep appending to its buffer. It must be 16 kHz: nothing here can
    tell 8 kHz audio from 16 kHz audio, and the model answers wrongly for it.

    A failing model call raises in every caller of that batch; a bad clip
    (not a 1-D float or int16 array) raises ``ValueError`` in its own caller
    only, before it is queued. A caller that is cancelled before its batch
    starts (speech resumed, say) is left out of the batch.
    """

    def __init__(self, model: TurnModel, *, max_batch: int = 32, gather_s: float = 0.002) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if gather_s < 0:
            raise ValueError(f"gather_s must be >= 0, got {gather_s}")
        self._model = model
        self._max_batch = max_batch
        self._gather_s = gather_s
        self._queue: list[tuple[np.ndarray, asyncio.Future[float]]] = []
        self._running: list[asyncio.Future[float]] = []
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="earshot-endofturn"
        )
        self.batches = 0
        self.last_batch_size = 0
        self.last_batch_seconds = 0.0

    @property
    def closed(self) -> bool:
        return self._executor is None

    async def probability(self, audio16k: np.ndarray) -> float:
        """P(turn complete) for the last 8 s of ``audio16k`` (16 kHz mono)."""
        if self._executor is None:
            raise RuntimeError("EndOfTurnRunner is closed")
        clip = _tail(audio16k)
        if np.may_share_memory(clip, audio16k):
            clip = clip.copy()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        self._queue.append((clip, future))
        if self._task is None:
            self._task = loop.create_task(self._drain(), name="earshot-endofturn")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)  # the rest of this loop iteration's asks join
            if self._gather_s:
                await asyncio.sleep(self._gather_s)
            while self._queue and self._executor is not None:
                batch = [(clip, f) for clip, f in self._queue[: self._max_batch] if not f.done()]
                del self._queue[: self._max_batch]
                if not batch:
                    continue
                self._running = [f for _, f in batch]
                started = time.perf_counter()
                try:
                    probs = await loop.run_in_executor(self._executor, self._model.predict, [c for c, _ in batch])
                    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
                    if len(probs) != len(batch):
                        raise RuntimeError(f"end-of-turn model returned {len(probs)} results for {len(batch)} clips")
                except Exception as exc:  # noqa: BLE001  # any failure goes to the batch's callers
                    self._running = []
                    log.debug("end-of-turn batch of %d failed: %s", len(batch), exc)
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                # (Cancelled mid-batch, _running stays set for the finally below to fail.)
                self._running = []
                self.batches += 1
                self.last_batch_size = len(batch)
                self.last_batch_seconds = time.perf_counter() - started
                for (_, f), p in zip(batch, probs.tolist()):
                    if not f.done():
                        f.set_result(p)
        finally:
            self._task = None
            # Closed (or cancelled) with asks still queued: fail them rather than hang.
            self._fail_pending(RuntimeError("EndOfTurnRunner is closed"))

    def _fail_pending(self, exc: Exception) -> None:
        pending = [f for _, f in self._queue] + self._running
        self._queue = []
        for f in pending:
            if not f.done():
                f.set_exception(exc)

    def close(self) -> None:
        """Stop the worker thread; queued and running asks raise
        ``RuntimeError``, later ones too. Call it on the loop thread; it waits
        for a batch already in the model to finish."""
        executor, self._executor = self._executor, None
        self._fail_pending(RuntimeError("EndOfTurnRunner is closed"))
        if self._task is not None:
            self._task.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def measure(batch_sizes: tuple[int, ...] = (1, 8, 32), repeats: int = 5, threads: int = 1) -> dict[int, tuple[float, float]]:
    """CPU cost of :meth:`SmartTurn.predict` per batch size, in milliseconds
    (best of ``repeats``): ``{batch: (features_ms, predict_ms)}``, where
    predict includes the features. Uses noise-like 8 s clips, since the cost
    does not depend on the signal."""
    model = SmartTurn(threads=threads)
    rng = np.random.default_rng(0)
    results: dict[int, tuple[float, float]] = {}
    for batch in batch_sizes:
        clips = [(rng.standard_normal(WINDOW_SAMPLES) * 0.1).astype(np.float32) for _ in range(batch)]
        model.predict(clips)  # warm-up: first runs allocate
        feats, total = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            features = model.features(clips)
            t1 = time.perf_counter()
            model.predict_features(features)
            t2 = time.perf_counter()
            feats.append(t1 - t0)
            total.append(t2 - t0)
        results[batch] = (min(feats) * 1e3, min(total) * 1e3)
    return results


if __name__ == "__main__":
    import os

    for n, (feat_ms, total_ms) in measure().items():
        print(f"batch {n:3d}: {total_ms:8.1f} ms per predict ({feat_ms:6.1f} ms features), {total_ms / n:6.1f} ms per clip")
    print(f"(1 onnxruntime thread, {os.cpu_count()} CPUs visible)")
