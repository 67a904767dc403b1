"""Uploaded audio files (``POST /v1/audio/...``): what container it is, its samples, its pieces.

Three steps, each usable without HTTP:

* :func:`sniff` names the container from the file's first bytes. Only the
  containers the OpenAI API takes (and AIFF) are opened, and each with its
  own demuxer forced: ffmpeg's probing would also accept playlists and
  concatenation scripts (HLS, ``concat``) that make the demuxer open other
  files or URLs named inside the upload.
* :func:`decode` turns it into 16 kHz mono int16 (PyAV, which
  faster-whisper already depends on), with a bound on the duration so a tiny
  file of very compressed audio cannot expand into gigabytes of samples.
* :func:`cut` finds the pieces to transcribe: the Silero VAD and the turn
  detector of a live leg run over the whole file (8 kHz copy, as a wideband
  leg does), so a long file is cut at pauses, never inside a word, into
  pieces of at most ``max_turn_s`` that the recognizer decodes concurrently.

Each raises :class:`UploadError` with a reason meant for the client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..media.turn import TurnConfig, TurnDetector, TurnFinal
from ..media.wideband import WIDEBAND_RATE, Decimator

__all__ = ["FORMATS", "Piece", "UploadError", "cut", "decode", "sniff"]

#: what the error for an unknown file names (the OpenAI API's list, less mp4 video)
FORMATS = "wav, mp3, m4a, ogg, webm, flac"
CHUNK = 256  # 32 ms at 8 kHz: Silero's chunk


class UploadError(ValueError):
    """An upload that cannot be transcribed; ``reason`` says why, ``code`` is for the error's ``code``."""

    def __init__(self, reason: str, code: str = "invalid_audio") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def sniff(head: bytes) -> str | None:
    """The ffmpeg demuxer for a file starting with ``head`` (its first 16 bytes or more); None if unknown."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"  # Vorbis, Opus, FLAC in Ogg
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"  # WebM, MKA
    if len(head) >= 8 and head[4:8] == b"ftyp":
        return "mov"  # MP4, M4A (AAC, ALAC)
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mean ADTS (AAC), otherwise MP1/2/3
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    return None


def decode(file: BinaryIO, *, max_seconds: float) -> np.ndarray:
    """The audio of ``file`` (seekable, at its start) as 16 kHz mono int16 samples.

    Raises :class:`UploadError`: not a supported container, no audio stream, not
    decodable, no samples, or longer than ``max_seconds``.
    """
    import av  # deferred: only uploads need it

    head = file.read(16)
    file.seek(0)
    if not head:
        raise UploadError("the file is empty")
    fmt = sniff(head)
    if fmt is None:
        raise UploadError(f"not an audio file of a supported format ({FORMATS})")
    limit = int(max_seconds * WIDEBAND_RATE)
    pieces: list[np.ndarray] = []
    total = 0
    try:
        with av.open(file, mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise UploadError(f"the {_name(fmt)} file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=WIDEBAND_RATE)
            for frame in container.decode(stream):
                frame.pts = None  # resample by sample count: a file's odd timestamps must not add gaps
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    total += pieces[-1].size
                if total > limit:
                    raise UploadError(f"the audio is longer than {max_seconds / 3600:g} hours, the most one "
                                      "upload may hold", code="audio_too_long")
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except UploadError:
        raise
    except av.error.FFmpegError as exc:
        raise UploadError(f"the {_name(fmt)} file cannot be decoded: {_ffmpeg_reason(exc)}") from None
    except (ValueError, EOFError, OSError) as exc:  # PyAV's own checks, a truncated container
        raise UploadError(f"the {_name(fmt)} file cannot be decoded: {exc}") from None
    pcm = np.concatenate(pieces).astype(np.int16, copy=False) if pieces else np.zeros(0, np.int16)
    if pcm.size == 0:
        raise UploadError(f"the {_name(fmt)} file holds no audio samples")
    return pcm[:limit]


def _name(fmt: str) -> str:
    return {"mov": "MP4", "matroska": "WebM/Matroska", "wav": "WAV", "aac": "AAC"}.get(fmt, fmt.upper()
                                                                                      if len(fmt) <= 4 else fmt)


def _ffmpeg_reason(exc: Exception) -> str:
    message = getattr(exc, "strerror", None) or str(exc)
    return str(message).rstrip(".")


@dataclass(frozen=True)
class Piece:
    """One stretch of speech to transcribe: samples [start, end) of the 16 kHz audio."""

    index: int
    start: int
    end: int
    reason: str  # the turn detector's: "silence", "max_length" (cut at the quietest point), "flush" (end of file)

    @property
    def start_s(self) -> float:
        return self.start / WIDEBAND_RATE

    @property
    def end_s(self) -> float:
        return self.end / WIDEBAND_RATE


def cut(pcm: np.ndarray, speech_probability: Callable[[np.ndarray], float], config: TurnConfig) -> list[Piece]:
    """The speech pieces of 16 kHz ``pcm``, in order, as a live leg's turn detector cuts them.

    ``speech_probability`` is called with each 32 ms chunk (256 int16 samples at 8 kHz)
    in order: a VAD stream of its own (``SileroVad.infer`` for one stream key).
    CPU-bound: run it off the event loop.
    """
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError("cut() needs 1-D int16 audio at 16 kHz")
    narrow = Decimator().feed(pcm)
    if narrow.size % CHUNK:
        narrow = np.concatenate((narrow, np.zeros(CHUNK - narrow.size % CHUNK, np.int16)))
    # no interim transcripts of a file: no PartialDue events (and no copies of the turn's audio for them);
    # and cut on silence: a file has no turn latency to save, and no end-of-turn model is asked here
    detector = TurnDetector(dataclasses.replace(config, partial_interval_ms=0, policy="silence"), sample_rate=8000)
    pieces: list[Piece] = []

    def take(events: list) -> None:
        for event in events:
            if isinstance(event, TurnFinal):
                start, end = 2 * event.start_sample, min(2 * event.end_sample, pcm.size)
                if end > start:
                    pieces.append(Piece(len(pieces), start, end, event.reason))

    for offset in range(0, narrow.size, CHUNK):
        chunk = narrow[offset:offset + CHUNK]
        take(detector.feed(chunk, speech_probability(chunk)))
    take(detector.flush())
    return pieces
