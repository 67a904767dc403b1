"""The silence guard: no transcript at all is better than a transcript of nothing.

Whisper transcribes silence and hum as "Thank you." or "you", and a short
window occasionally makes its decoder repeat a phrase instead of ending. An
energy gate runs before the model (:func:`speech_band_level_db` against
``GuardThresholds.gate_db``), Whisper's own confidence signals after it
(:func:`is_silence`), and a decoder loop is cut after its first occurrence
(:func:`collapse_repeats`). The guard runs wherever the engine runs (in the
gateway or on a pool worker), so results mean the same whichever produced them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..interface import SAMPLE_RATE
from ..wer import normalize

__all__ = ["GuardThresholds", "collapse_repeats", "compression_ratio", "first_repeat", "is_silence",
           "speech_band_level_db"]

@dataclass(frozen=True)
class GuardThresholds:
    """When a transcript counts as "no speech". Values measured in docs/asr.md.

    ``gate_db``: loudest frames' level in the 300-3400 Hz telephone band below
    which the model is not even run. ``no_speech_prob``/``logprob``: Whisper's
    own rule (no-speech token likely AND text unlikely). ``compression_ratio``:
    above it the text is a repetition loop. Texts in ``hallucinations`` (what
    Whisper says over silence) need ``hallucination_logprob`` and a no-speech
    probability under ``hallucination_no_speech`` to be believed.
    """

    gate_db: float = -50.0
    no_speech_prob: float = 0.6
    logprob: float = -1.0
    compression_ratio: float = 2.4
    hallucination_logprob: float = -0.5
    hallucination_no_speech: float = 0.3
    hallucinations: frozenset[str] = frozenset(
        {
            "you",
            "thank you",
            "thanks",
            "thank you very much",
            "thanks for watching",
            "thank you for watching",
            "thank you so much for watching",
            "please subscribe",
            "bye",
            "so",
            "okay",
            "oh",
            "um",
            "uh",
            "hmm",
            "the end",
        }
    )


def speech_band_level_db(audio: np.ndarray, percentile: float = 95.0) -> float:
    """Level (dBFS) of the louder 20 ms frames in the 300-3400 Hz telephone band.

    Band-limiting ignores mains hum and DC; a high percentile rather than the
    maximum ignores a single click. A full-scale sine gives about -3 dBFS.
    """
    frame = SAMPLE_RATE // 50
    n = audio.size // frame
    if n == 0:
        return -math.inf
    frames = audio[: n * frame].reshape(n, frame).astype(np.float64)
    spectrum = np.fft.rfft(frames * np.hanning(frame), axis=1)
    freqs = np.fft.rfftfreq(frame, 1.0 / SAMPLE_RATE)
    band = (freqs >= 300.0) & (freqs <= 3400.0)
    # Parseval with the Hann window's power gain (0.375): mean-square of the band component.
    power = 2.0 * (np.abs(spectrum[:, band]) ** 2).sum(axis=1) / (frame * frame * 0.375)
    level = float(np.percentile(power, percentile))
    return 10.0 * math.log10(level) if level > 1e-20 else -math.inf



def compression_ratio(text: str) -> float:
    """gzip ratio of the text: high values flag repetition loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def is_silence(text: str, avg_logprob: float, no_speech_prob: float, ratio: float, guard: GuardThresholds) -> bool:
    """Whether a decoded window counts as "no speech" (see :class:`GuardThresholds`)."""
    words = normalize(text)
    if not words:
        return True
    if no_speech_prob > guard.no_speech_prob and avg_logprob < guard.logprob:
        return True
    if ratio > guard.compression_ratio:
        return True
    if " ".join(words) in guard.hallucinations:
        return avg_logprob < guard.hallucination_logprob or no_speech_prob > guard.hallucination_no_speech
    return False


def first_repeat(words: list[str]) -> tuple[int, int] | None:
    """(start, length) of the earliest phrase repeated back to back, or None.

    A single word counts when it occurs 4 times in a row ("five five five"
    is a phone number), a longer phrase when twice: the typical short-window
    failure is "Call forwarding. Call forwarding." A false alarm only costs
    one extra decode with the full window.
    """
    n = len(words)
    for start in range(n):
        for length in range(1, (n - start) // 2 + 1):
            times = 4 if length == 1 else 2
            if start + length * times > n:
                continue
            phrase = words[start : start + length]
            if all(words[start + k * length : start + (k + 1) * length] == phrase for k in range(1, times)):
                return start, length
    return None


def collapse_repeats(text: str) -> str:
    """Cut a decoder loop after the first occurrence of the repeated phrase.

    "Press 9 for more entries. Press 9 for more entries. Press" -> "Press 9 for
    more entries." Whisper itself would resample at a higher temperature;
    one truncation is cheaper and keeps the words that were heard.
    """
    raw = text.split()
    found = first_repeat([" ".join(normalize(word)) for word in raw])
    if found is None:
        return text
    start, length = found
    return " ".join(raw[: start + length])
