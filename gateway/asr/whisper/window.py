"""The encoder window: how much (padded) audio Whisper's encoder sees for a request.

Whisper's encoder is trained on 30 s windows and faster-whisper pads every
input to 30 s (``chunk_length`` does not change that: segments are padded to
3000 mel frames regardless). A 2 s turn then costs the same encoder time as a
30 s one. CTranslate2 accepts shorter mel inputs, so the engine computes the
features itself and pads them only to the audio length plus a margin, rounded
up to a bucket (docs/asr.md has the measured effect on WER and latency).
Without the margin the decoder loops on the last words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..interface import SAMPLE_RATE

__all__ = ["WindowPolicy", "split_audio"]

MAX_WINDOW_S = 30.0  # Whisper's positional embeddings cover 1500 positions = 30 s
FRAMES_PER_S = 100  # mel hop of 10 ms
FULL_FRAMES = int(MAX_WINDOW_S * FRAMES_PER_S)
MAX_TOKENS = 448  # Whisper's decoder context
MAX_CONTEXT = MAX_TOKENS // 2 - 1  # previous-text tokens Whisper's prompt can hold (get_prompt keeps these)
CONTEXT_MARGIN_S = 3.0  # context audio + turn must leave this much of the 30 s window free
CONTEXT_WINDOW_MIN_S = 15.0  # a final heard after context audio: window >= this (docs/asr.md)


@dataclass(frozen=True)
class WindowPolicy:
    """How many seconds of (padded) audio the encoder sees.

    Bucketed (``fixed`` None): chunk length plus ``margin``, rounded up to a
    multiple of ``bucket``, at most 30 s. The margin matters: with less than
    a few seconds of padding after the speech the decoder tends to repeat the
    utterance instead of ending it. Buckets keep the set of input shapes
    small (on GPU each new shape may allocate).
    ``fixed``: always that many seconds (30 = faster-whisper's behaviour).
    ``finals_full``: finals use the 30 s window (after context audio, one
    fitted to it: see :meth:`frames`), partials the bucketed one: the
    measured accuracy cost of short windows is paid only by partials, which
    are superseded anyway and run far more often (docs/asr.md).
    """

    fixed: float | None = None
    margin: float = 5.0
    bucket: float = 5.0
    finals_full: bool = False

    @classmethod
    def parse(cls, window: str | float) -> WindowPolicy:
        """"auto" (short partials; 30 s finals, fitted after context audio), "short" (bucketed for all) or seconds (1-30)."""
        if window == "auto":
            return cls(finals_full=True)
        if window == "short":
            return cls()
        seconds = window
        if isinstance(window, str):
            try:
                seconds = float(window)
            except ValueError:
                seconds = None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 1.0 <= seconds <= MAX_WINDOW_S:
            raise ValueError(f"window must be 'auto', 'short' or seconds between 1 and 30, got {window!r}")
        return cls(fixed=float(seconds))

    @property
    def max_chunk_seconds(self) -> float:
        """Longer audio is cut into chunks of at most this length, one window each."""
        return self.fixed if self.fixed is not None else MAX_WINDOW_S - self.margin

    def frames(self, seconds: float, kind: str = "partial", with_context: bool = False) -> int:
        """Mel frames to pad a chunk of ``seconds`` to (always even: the encoder strides by 2).

        ``with_context``: ``seconds`` includes context audio heard before the turn.
        Such a final gets a bucketed window of at least 15 s instead of the full
        30 s: the window already holds earlier speech and its forced transcript,
        and on the fixtures that cost no word while cutting the encoder's time by
        about 40 %; a final heard alone keeps the 30 s window, which short
        utterances need (WER 0.042 against 0.053 at 20 s on 348 prompts).
        """
        if self.fixed is not None:
            window = self.fixed
        elif self.finals_full and kind == "final" and with_context:
            window = max(CONTEXT_WINDOW_MIN_S, math.ceil((seconds + self.margin) / self.bucket) * self.bucket)
        elif self.finals_full and kind == "final":
            window = MAX_WINDOW_S
        else:
            window = math.ceil((seconds + self.margin) / self.bucket) * self.bucket
        frames = round(min(window, MAX_WINDOW_S) * FRAMES_PER_S)
        return frames + frames % 2



def split_audio(audio: np.ndarray, max_seconds: float) -> list[np.ndarray]:
    """Cut audio longer than one window at its quietest 20 ms in the last 40% of each window."""
    limit = int(max_seconds * SAMPLE_RATE)
    if audio.size <= limit:
        return [audio]
    frame = SAMPLE_RATE // 50
    chunks = []
    start = 0
    while audio.size - start > limit:
        lo = start + int(limit * 0.6)
        region = audio[lo : start + limit]
        n = region.size // frame
        energy = (region[: n * frame].reshape(n, frame) ** 2).sum(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        chunks.append(audio[start:cut])
        start = cut
    chunks.append(audio[start:])
    return chunks
