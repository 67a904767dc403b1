"""8 kHz telephone PCM -> 16 kHz float32 for Whisper.

Resampling runs once per turn on the whole buffer, so a proper low-pass
filter is affordable and vectorized numpy is enough. Three methods, chosen
by name so the integrator can compare their WER end to end:

* ``"polyphase"``: 2x zero-stuffing with a Kaiser-windowed sinc low-pass
  (flat to 3.5 kHz, -6 dB at 3.8 kHz, >= 80 dB down from 4.15 kHz), computed as two
  half-length polyphase branches. Linear phase, delay compensated, so output
  sample 2n lines up with input sample n.
* ``"ratecv"``: :func:`audioop.ratecv`, i.e. linear interpolation: cheapest,
  but images above 4 kHz leak through.
* ``"soxr"``: the soxr library's HQ resampler, only when ``soxr`` imports
  (optional, not a dependency).

All methods return exactly ``2 * len(input)`` samples scaled by 1/32768
(the low-pass may overshoot a little past +-1 on clipped input; Whisper
does not mind).
``python -m gateway.media.resample`` prints each method's cost.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["RESAMPLERS", "design_lowpass", "measure", "upsample_8k_to_16k"]

_SCALE = np.float32(1.0 / 32768.0)


def design_lowpass(cutoff: float = 3800.0, rate: float = 16000.0, taps: int = 127, attenuation: float = 80.0) -> np.ndarray:
    """Kaiser-windowed sinc low-pass (odd length, linear phase, unity DC gain).

    127 taps at 16 kHz give a ~640 Hz transition band at 80 dB, so with a
    3.8 kHz cutoff the 4-8 kHz images of the zero-stuffed signal are
    suppressed while the 300-3400 Hz telephone band passes flat (< 0.01 dB).
    """
    if taps % 2 == 0:
        raise ValueError("taps must be odd for a whole-sample group delay")
    beta = 0.1102 * (attenuation - 8.7) if attenuation > 50 else 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    n = np.arange(taps) - (taps - 1) / 2
    h = (2 * cutoff / rate) * np.sinc(2 * cutoff / rate * n) * np.kaiser(taps, beta)
    return h / h.sum()


_FILTER = design_lowpass()
# Polyphase branches of the interpolation filter (gain 2 restores the level
# lost to zero-stuffing). Even outputs use the even taps, odd outputs the odd.
_EVEN = (2.0 * _FILTER[0::2]).astype(np.float32)
_ODD = (2.0 * _FILTER[1::2]).astype(np.float32)
_DELAY = (len(_FILTER) - 1) // 2  # group delay in 16 kHz samples


def _as_int16(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise TypeError(f"PCM array must be int16, got {pcm.dtype}")
        if pcm.ndim != 1:
            raise ValueError(f"PCM array must be 1-D (mono), got shape {pcm.shape}")
        return pcm
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        if len(pcm) % 2:
            raise ValueError(f"16-bit PCM must have an even length, got {len(pcm)} bytes")
        return np.frombuffer(pcm, dtype="<i2")
    raise TypeError(f"expected int16 ndarray or bytes, got {type(pcm).__name__}")


def _polyphase(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    x = _as_int16(pcm).astype(np.float32) * _SCALE
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    # Full convolution of the zero-stuffed signal, interleaved from the two
    # branches: full[2k] = (x * even)[k], full[2k + 1] = (x * odd)[k].
    even = np.convolve(x, _EVEN)
    odd = np.convolve(x, _ODD)
    full = np.zeros(2 * len(even), dtype=np.float32)
    full[0::2] = even
    full[1 : 2 * len(odd) : 2] = odd
    return full[_DELAY : _DELAY + 2 * n].copy()


def _ratecv(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    x = _as_int16(pcm)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    converted, _ = audioop.ratecv(x.astype("<i2").tobytes(), 2, 1, 8000, 16000, None)
    y = np.frombuffer(converted, dtype="<i2")
    if len(y) != 2 * n:  # ratecv's length can differ by a sample at the end
        y = np.pad(y[: 2 * n], (0, max(0, 2 * n - len(y))), mode="edge")
    return y.astype(np.float32) * _SCALE


RESAMPLERS: dict[str, Callable[[np.ndarray | bytes], np.ndarray]] = {
    "polyphase": _polyphase,
    "ratecv": _ratecv,
}

try:  # optional: only if the deployment happens to have it
    import soxr as _soxr
except ImportError:  # pragma: no cover - depends on the environment
    _soxr = None
else:  # pragma: no cover

    def _soxr_resample(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
        x = _as_int16(pcm).astype(np.float32) * _SCALE
        n = len(x)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        y = np.asarray(_soxr.resample(x, 8000, 16000, quality="HQ"), dtype=np.float32)
        if len(y) != 2 * n:
            y = np.pad(y[: 2 * n], (0, max(0, 2 * n - len(y))))
        return y

    RESAMPLERS["soxr"] = _soxr_resample


def upsample_8k_to_16k(pcm: np.ndarray | bytes, method: str = "polyphase") -> np.ndarray:
    """8 kHz mono int16 PCM (array or little-endian bytes) -> 16 kHz float32 (sample / 32768)."""
    try:
        resample = RESAMPLERS[method]
    except KeyError:
        raise ValueError(f"unknown resampling method {method!r}: available {', '.join(RESAMPLERS)}") from None
    return resample(pcm)


def measure(seconds: float = 30.0, repeats: int = 5) -> dict[str, float]:
    """CPU cost of each method in milliseconds per second of 8 kHz audio (best of ``repeats``).

    Uses noise-like test audio of ``seconds`` (a typical long turn), since
    the cost does not depend on the signal.
    """
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(int(seconds * 8000)) * 3000).astype(np.int16)
    costs = {}
    for name, resample in RESAMPLERS.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            resample(pcm)
            best = min(best, time.process_time() - start)
        costs[name] = best * 1000.0 / seconds
    return costs


if __name__ == "__main__":
    for name, cost in measure().items():
        print(f"{name:10s} {cost:7.3f} ms CPU per second of audio")
