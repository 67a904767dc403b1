"""Wideband legs: audio that arrives at 16 kHz or more (Realtime PCM, WebRTC Opus, uploads).

Such a leg keeps its 16 kHz audio for Whisper, untouched by the telephone
path, while turn detection runs on an 8 kHz copy: Silero VAD and the turn
detector work on the telephone timeline, and a turn's bounds in 8 kHz samples
are exactly half its bounds in the 16 kHz history. Narrowing the audio the
recognizer hears to the telephone band would cost accuracy that offline
transcription of the same file does not lose.

* :class:`Decimator`: 16 kHz -> 8 kHz, streaming, for the VAD only.
* :class:`SampleHistory`: the leg's 16 kHz audio by absolute sample index.
* :class:`StreamResampler`: any rate -> 16 kHz mono int16, streaming (libswresample via PyAV,
  which faster-whisper already depends on).
"""

from __future__ import annotations

import numpy as np

from .resample import design_lowpass

__all__ = ["Decimator", "SampleHistory", "StreamResampler", "WIDEBAND_RATE"]

WIDEBAND_RATE = 16_000

# Anti-alias filter for 16 -> 8 kHz: the same Kaiser sinc as the interpolator (cutoff 3.8 kHz).
_TAPS = design_lowpass().astype(np.float32)


class Decimator:
    """16 kHz int16 -> 8 kHz int16, fed pieces of any length; output sample n is input 2n, filtered.

    Keeps the filter's history and the phase between calls, so cutting the
    input into pieces does not change the output.
    """

    def __init__(self) -> None:
        self._history = np.zeros(len(_TAPS) - 1, dtype=np.float32)
        self._phase = 0  # index, in the next piece, of the next input sample that yields an output

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("Decimator input must be 1-D int16")
        if pcm.size == 0:
            return np.zeros(0, dtype=np.int16)
        x = np.concatenate((self._history, pcm.astype(np.float32)))
        # y[i]: the filter window ending at input sample i of this piece, so the 8 kHz copy lags
        # the 16 kHz audio by the filter's group delay (63 samples, 4 ms): far inside a turn's padding
        y = np.convolve(x, _TAPS, mode="valid")  # symmetric taps: convolution = correlation
        out = y[self._phase::2]
        self._phase = (self._phase - pcm.size) % 2
        self._history = x[-(len(_TAPS) - 1):]
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


class SampleHistory:
    """A leg's 16 kHz samples by absolute index, keeping at least the last ``keep`` of them."""

    def __init__(self, keep: int) -> None:
        if keep <= 0:
            raise ValueError("keep must be positive")
        self._keep = keep
        self._buf = np.zeros(0, dtype=np.int16)
        self._start = 0  # absolute index of self._buf[0]

    @property
    def end(self) -> int:
        """Absolute index just after the last sample appended."""
        return self._start + self._buf.size

    def append(self, pcm: np.ndarray) -> None:
        self._buf = np.concatenate((self._buf, pcm.astype(np.int16, copy=False)))
        excess = self._buf.size - self._keep
        if excess > self._keep:  # trim in large steps: amortised O(1) per sample
            self._buf = self._buf[excess:].copy()
            self._start += excess

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end); what was trimmed or not yet appended reads as silence."""
        out = np.zeros(max(0, end - start), dtype=np.int16)
        lo, hi = max(start, self._start), min(end, self.end)
        if hi > lo:
            out[lo - start:hi - start] = self._buf[lo - self._start:hi - self._start]
        return out


class StreamResampler:
    """Interleaved int16 PCM at ``rate`` Hz with ``channels`` -> 16 kHz mono int16, streaming."""

    def __init__(self, rate: int, channels: int = 1) -> None:
        if rate < 8000 or rate > 192_000:
            raise ValueError(f"unsupported sample rate {rate}")
        if channels not in (1, 2):
            raise ValueError(f"unsupported channel count {channels}")
        self.rate = rate
        self.channels = channels
        self._resampler = None
        if rate != WIDEBAND_RATE or channels != 1:
            import av  # deferred: only legs that need it

            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=WIDEBAND_RATE)
        self._pts = 0

    def feed(self, pcm: bytes | np.ndarray) -> np.ndarray:
        samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
        if self._resampler is None:
            return samples.astype(np.int16, copy=True)
        frames = samples.size // self.channels
        if frames == 0:
            return np.zeros(0, dtype=np.int16)
        return self._resample(samples[: frames * self.channels].reshape(1, -1), frames)

    def feed_frame(self, frame: object) -> np.ndarray:
        """An ``av.AudioFrame`` (as aiortc delivers decoded Opus) -> 16 kHz mono int16."""
        if self._resampler is None:
            import av

            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=WIDEBAND_RATE)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)] or
                              [np.zeros(0, np.int16)]).astype(np.int16, copy=False)

    def _resample(self, interleaved: np.ndarray, frames: int) -> np.ndarray:
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(interleaved, dtype=np.int16), format="s16",
                                           layout="mono" if self.channels == 1 else "stereo")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += frames
        assert self._resampler is not None
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)
