"""Batched Silero voice activity detection for every active call stream.

Silero VAD is a small recurrent network: each 32 ms chunk at 8 kHz costs a
fixed ONNX Runtime call overhead plus a little arithmetic. Calling it once per
stream would spend most of the CPU on that overhead, so :class:`SileroVad`
keeps each stream's recurrent state and audio context in shared arrays and
runs *all* streams that have a chunk ready in one ``session.run`` (the batch
dimension of the model). :class:`BatchedVadRunner` owns the 32 ms tick that
gathers those chunks, runs the model in one worker thread (ONNX Runtime
releases the GIL, so the event loop keeps receiving packets meanwhile) and
hands the probabilities back on the loop thread.

Only the ONNX file of the ``silero-vad`` wheel is used: its Python package
imports torch, which Earshot never loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from .onnx import cpu_session

__all__ = ["BatchedVadRunner", "SileroVad", "VadStream", "default_model_path"]

log = logging.getLogger(__name__)

_MODEL_RELATIVE = pathlib.PurePosixPath("data", "silero_vad.onnx")
_INT16_SCALE = np.float32(1.0 / 32768.0)


def default_model_path() -> pathlib.Path:
    """Locate ``silero_vad/data/silero_vad.onnx`` in the installed wheel.

    ``importlib.resources.files("silero_vad")`` would import the package,
    whose ``__init__`` imports torch; ``find_spec`` on the top-level package
    only locates it on disk, so the model is found without torch.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"silero_vad/{_MODEL_RELATIVE} not found: the silero-vad package is not "
            "installed (install it with `pip install --no-deps silero-vad`)"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location, _MODEL_RELATIVE)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Silero VAD model file missing: {pathlib.Path(spec.submodule_search_locations[0], _MODEL_RELATIVE)}"
    )


class SileroVad:
    """Silero VAD at 8 kHz over many independent streams, one ONNX call per batch.

    Per stream the model carries a recurrent state ([2, 128] floats) and the
    last 32 input samples (its context). Both live in pre-allocated arrays
    indexed by a slot per stream; :meth:`infer` gathers the rows of the
    streams in the batch, runs the model once and scatters the new rows back,
    so a stream's result does not depend on which other streams share the
    batch. Thread-safe: a lock serialises :meth:`infer` with stream changes.
    """

    SAMPLE_RATE = 8000
    CHUNK = 256
    CONTEXT = 32

    def __init__(self, model_path: str | Path | None = None, *, intra_op_threads: int = 1) -> None:
        path = default_model_path() if model_path is None else Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Silero VAD model file missing: {path}")
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self._session = cpu_session(path, threads=intra_op_threads)
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise ValueError(f"{path} is not a Silero VAD model (inputs {sorted(names)})")
        self.model_path = path
        self._sr = np.array(self.SAMPLE_RATE, dtype=np.int64)
        self._lock = threading.Lock()
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._capacity = 0
        self._state = np.zeros((2, 0, 128), dtype=np.float32)
        self._context = np.zeros((0, self.CONTEXT), dtype=np.float32)
        self._input = np.zeros((0, self.CONTEXT + self.CHUNK), dtype=np.float32)
        self._grow(16)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def _grow(self, capacity: int) -> None:
        """Enlarge the per-slot arrays; existing slots keep their rows."""
        old = self._capacity
        state = np.zeros((2, capacity, 128), dtype=np.float32)
        state[:, :old] = self._state
        context = np.zeros((capacity, self.CONTEXT), dtype=np.float32)
        context[:old] = self._context
        self._state, self._context = state, context
        self._input = np.empty((capacity, self.CONTEXT + self.CHUNK), dtype=np.float32)
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out low slots first
        self._capacity = capacity

    def add_stream(self, key: Hashable) -> None:
        """Start a stream with a fresh state (silence before its first chunk)."""
        with self._lock:
            if key in self._slots:
                raise ValueError(f"VAD stream {key!r} already added")
            if not self._free:
                self._grow(self._capacity * 2)
            slot = self._free.pop()
            self._state[:, slot] = 0.0
            self._context[slot] = 0.0
            self._slots[key] = slot

    def remove_stream(self, key: Hashable) -> None:
        with self._lock:
            try:
                slot = self._slots.pop(key)
            except KeyError:
                raise KeyError(f"unknown VAD stream {key!r}") from None
            self._free.append(slot)

    def reset(self, key: Hashable) -> None:
        """Forget a stream's history, e.g. after a long gap in its audio."""
        with self._lock:
            slot = self._slot(key)
            self._state[:, slot] = 0.0
            self._context[slot] = 0.0

    def _slot(self, key: Hashable) -> int:
        try:
            return self._slots[key]
        except KeyError:
            raise KeyError(f"unknown VAD stream {key!r}; call add_stream() first") from None

    def infer(self, chunks: Mapping[Hashable, np.ndarray]) -> dict[Hashable, float]:
        """Speech probability of the next chunk of each stream in ``chunks``.

        Each chunk is 256 samples, int16 (full scale 32768) or float32 in
        [-1, 1]. All streams go through one ``session.run``.
        """
        n = len(chunks)
        if n == 0:
            return {}
        keys = list(chunks)
        arrays = list(chunks.values())
        with self._lock:
            slots = self._slots
            try:
                idx = np.fromiter((slots[k] for k in keys), dtype=np.intp, count=n)
            except KeyError:
                missing = next(k for k in keys if k not in slots)
                raise KeyError(f"unknown VAD stream {missing!r}; call add_stream() first") from None
            x = self._input[:n]
            self._fill(x[:, self.CONTEXT :], keys, arrays)
            np.take(self._context, idx, axis=0, out=x[:, : self.CONTEXT])
            state = np.take(self._state, idx, axis=1)
            prob, new_state = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
            self._state[:, idx] = new_state
            self._context[idx] = x[:, -self.CONTEXT :]
        return dict(zip(keys, prob[:, 0].tolist()))

    def _fill(self, out: np.ndarray, keys: list[Hashable], arrays: list[np.ndarray]) -> None:
        """Write the chunks, as float32 in [-1, 1], into the model input rows."""
        try:
            stacked = np.stack(arrays)
        except (ValueError, TypeError):
            stacked = None
        if stacked is not None and stacked.shape == out.shape:
            if stacked.dtype == np.int16:
                np.multiply(stacked, _INT16_SCALE, out=out)
                return
            # A float32 stack may hide int16 rows promoted by mixed input.
            if stacked.dtype == np.float32 and all(a.dtype == np.float32 for a in arrays):
                out[:] = stacked
                return
        # Slow path: mixed dtypes, or a bad chunk to name in the error.
        for row, key, chunk in zip(out, keys, arrays):
            if not isinstance(chunk, np.ndarray) or chunk.shape != (self.CHUNK,):
                shape = getattr(chunk, "shape", type(chunk).__name__)
                raise ValueError(f"VAD chunk for stream {key!r} must have shape ({self.CHUNK},), got {shape}")
            if chunk.dtype == np.int16:
                np.multiply(chunk, _INT16_SCALE, out=row)
            elif chunk.dtype == np.float32:
                row[:] = chunk
            else:
                raise ValueError(f"VAD chunk for stream {key!r} must be int16 or float32, got {chunk.dtype}")


class VadStream(Protocol):
    """A call leg's audio as seen by :class:`BatchedVadRunner`."""

    key: Hashable

    def next_chunk(self) -> np.ndarray | None:
        """Pop the next 256-sample int16 chunk if one is ready."""
        ...

    def on_vad(self, chunk: np.ndarray, probability: float) -> None:
        """Receive the chunk's speech probability (called on the event loop thread)."""
        ...


class BatchedVadRunner:
    """Owns the 32 ms tick: gathers one chunk from every registered stream
    that has one, runs :meth:`SileroVad.infer` in a single worker thread
    (onnxruntime releases the GIL, so the event loop keeps receiving
    packets), then calls ``on_vad`` on the loop thread. Streams with a
    backlog get further rounds in the same tick (bounded by ``max_rounds``).

    Streams may register and unregister at any time; the model's per-stream
    slots are only changed between rounds, never while the worker runs, so
    the event loop never waits on the model. A stream that raises or returns
    a malformed chunk is logged and skipped without affecting the others.
    """

    DRAIN_MAX_ROUNDS = 1000  # 32 s of backlog per stream; a bound against a stream that never empties

    def __init__(self, vad: SileroVad, *, tick: float = 0.032, max_rounds: int = 8) -> None:
        if tick <= 0:
            raise ValueError(f"tick must be > 0, got {tick}")
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self._vad = vad
        self._tick = tick
        self._max_rounds = max_rounds
        self._streams: dict[Hashable, VadStream] = {}
        self._pending: list[tuple[bool, Hashable]] = []  # (add?, key), applied between rounds
        self._busy = asyncio.Lock()  # created unbound; binds to the loop on first use
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.last_tick_seconds: float = 0.0
        self.last_batch_size: int = 0
        self.on_tick: Callable[[float, int], None] | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def register(self, stream: VadStream) -> None:
        key = stream.key
        if key in self._streams:
            raise ValueError(f"VAD stream {key!r} already registered")
        self._streams[key] = stream
        self._pending.append((True, key))

    def unregister(self, stream: VadStream) -> None:
        key = stream.key
        if self._streams.get(key) is not stream:
            raise KeyError(f"VAD stream {key!r} is not registered")
        del self._streams[key]
        self._pending.append((False, key))

    def close(self) -> None:
        """Stop the worker thread (after any running inference finishes)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run(self) -> None:
        """Tick every ``tick`` seconds until cancelled. A late tick is not
        caught up with a burst: the schedule restarts from now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self._tick
            await self._process(self._max_rounds)
            now = loop.time()
            if now > deadline:
                deadline = now
            await asyncio.sleep(deadline - now)

    async def drain(self) -> None:
        """Process every ready chunk of every stream now (used at call end)."""
        await self._process(self.DRAIN_MAX_ROUNDS)

    def _apply_pending(self) -> None:
        vad = self._vad
        pending, self._pending = self._pending, []
        for add, key in pending:
            try:
                if add:
                    vad.add_stream(key)
                else:
                    vad.remove_stream(key)
            except (KeyError, ValueError):
                log.exception("VAD stream %r could not be %s", key, "added" if add else "removed")

    async def _process(self, max_rounds: int) -> None:
        async with self._busy:
            started = time.perf_counter()
            total = 0
            loop = asyncio.get_running_loop()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="earshot-vad")
            candidates = list(self._streams.values())
            for _ in range(max_rounds):
                self._apply_pending()
                streams, chunks = self._gather(candidates)
                if not chunks:
                    break
                try:
                    probs = await loop.run_in_executor(self._executor, self._vad.infer, chunks)
                except Exception:
                    log.exception("VAD inference failed for a batch of %d streams", len(chunks))
                    break
                current = self._streams
                for stream in streams:
                    key = stream.key
                    if current.get(key) is not stream:
                        continue  # unregistered while the model ran
                    try:
                        stream.on_vad(chunks[key], probs[key])
                    except Exception:
                        log.exception("VAD stream %r failed in on_vad", key)
                total += len(streams)
                candidates = streams  # only streams that had a chunk can have a backlog
            self._apply_pending()
            if total:
                self.last_tick_seconds = time.perf_counter() - started
                self.last_batch_size = total
                if self.on_tick is not None:
                    self.on_tick(self.last_tick_seconds, total)

    def _gather(self, candidates: list[VadStream]) -> tuple[list[VadStream], dict[Hashable, np.ndarray]]:
        streams: list[VadStream] = []
        chunks: dict[Hashable, np.ndarray] = {}
        current = self._streams
        chunk_shape = (SileroVad.CHUNK,)
        for stream in candidates:
            key = stream.key
            if current.get(key) is not stream:
                continue
            try:
                chunk = stream.next_chunk()
            except Exception:
                log.exception("VAD stream %r failed in next_chunk", key)
                continue
            if chunk is None:
                continue
            if (
                not isinstance(chunk, np.ndarray)
                or chunk.shape != chunk_shape
                or (chunk.dtype != np.int16 and chunk.dtype != np.float32)
            ):
                log.warning(
                    "VAD stream %r gave a malformed chunk (shape %s, dtype %s); dropped",
                    key, getattr(chunk, "shape", None), getattr(chunk, "dtype", None),
                )
                continue
            chunks[key] = chunk
            streams.append(stream)
        return streams, chunks
