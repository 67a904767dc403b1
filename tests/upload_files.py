"""A speech fixture in the containers clients upload: made with sox and PyAV's encoders, not stored.

``audio_files(name)`` gives the fixture (G.711 WAV, as stored) plus 16-bit
stereo WAV at 44.1 kHz, FLAC and Ogg Vorbis written by sox, and MP3, M4A
(AAC) and WebM (Opus) written by PyAV's libmp3lame, aac and libopus
encoders: every file a different path through ffmpeg's demuxers, decoders
and the resampler.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from tests.fixtures_data import fixture_path

__all__ = ["audio_files", "encode"]


def _sox(source: Path, suffix: str, *args: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"out.{suffix}"
        subprocess.run(["sox", str(source), *args, str(out)], check=True, capture_output=True)
        return out.read_bytes()


def encode(pcm16k: np.ndarray, container: str, codec: str, rate: int = 16000, layout: str = "mono") -> bytes:
    """16 kHz mono int16 -> a file of ``container`` with ``codec`` at ``rate`` (PyAV)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.format.name, layout=layout, rate=rate,
                                      frame_size=ctx.frame_size or None)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm16k.reshape(1, -1)), format="s16", layout="mono")
        frame.sample_rate = 16000
        for piece in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@lru_cache(maxsize=8)
def audio_files(name: str) -> dict[str, tuple[str, bytes]]:
    """Container -> (file name, bytes) of fixture ``name``."""
    from gateway.ingest.upload import decode

    source = fixture_path(name)
    stem = source.stem
    with open(source, "rb") as f:
        pcm = decode(f, max_seconds=600)
    return {
        "wav": (f"{stem}.wav", source.read_bytes()),
        "wav-44k-stereo": (f"{stem}.44k.wav", _sox(source, "wav", "-r", "44100", "-c", "2", "-b", "16")),
        "flac": (f"{stem}.flac", _sox(source, "flac", "-b", "16")),
        "ogg": (f"{stem}.ogg", _sox(source, "ogg", "-r", "16000")),
        "mp3": (f"{stem}.mp3", encode(pcm, "mp3", "libmp3lame")),
        "m4a": (f"{stem}.m4a", encode(pcm, "ipod", "aac")),
        "webm": (f"{stem}.webm", encode(pcm, "webm", "libopus", rate=48000)),
    }
