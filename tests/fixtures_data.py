"""Access to the speech fixtures in recordings_fixtures/ (see its README).

Test-side helpers rather than a gateway module: the fixtures are test data and
the gateway must not depend on them. The WAV files are G.711 (format tags 6
and 7), which the stdlib ``wave`` module refuses, so the RIFF chunks are
parsed here.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib until 3.12; the audioop-lts backport from 3.13

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "recordings_fixtures"
MANIFEST = FIXTURES_DIR / "manifest.json"

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_ALAW = 6
WAVE_FORMAT_MULAW = 7

Encoding = Literal["mu-law", "a-law"]
Codec = Literal["PCMU", "PCMA"]
_CODECS: dict[int, Codec] = {WAVE_FORMAT_MULAW: "PCMU", WAVE_FORMAT_ALAW: "PCMA"}


class FixtureError(ValueError):
    """A fixture file is missing, malformed or not the G.711 WAV it should be."""


@dataclass(frozen=True)
class Turn:
    """One stretch of speech: [start_ms, end_ms) covers its 10 ms frames above
    -40 dBFS; longest_pause_ms is the longest quieter run inside it.

    pauses: every quieter run of 300 ms or more inside the turn, as
    (start_ms, end_ms), in order. A final that ends in one of them cut the
    speaker off mid-turn (a false cut); the "paused" fixtures put 400-900 ms
    pauses inside sentences for exactly that count. Empty for most turns.
    """

    text: str
    start_ms: int
    end_ms: int
    longest_pause_ms: int
    pauses: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class FixtureEntry:
    file: str
    encoding: Encoding
    duration_ms: int
    source: str  # "asterisk-core-sounds-en" | "flite:<voice>" | "synthetic"
    license: str
    kind: str  # "prompt" | "caller" | "held_out" | "monologue" | "conversation" | "paused" | "silence" | "noise"
    text: str  # whole reference transcript; "" for silence and noise
    turns: tuple[Turn, ...]
    prompts: tuple[str, ...] = ()  # Asterisk prompt names used, in order

    @property
    def path(self) -> Path:
        return fixture_path(self.file)


@dataclass(frozen=True)
class WavInfo:
    format_tag: int
    channels: int
    sample_rate: int
    bits_per_sample: int
    data: bytes


@lru_cache(maxsize=1)
def load_manifest() -> list[FixtureEntry]:
    raw = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return [
        FixtureEntry(
            file=e["file"],
            encoding=e["encoding"],
            duration_ms=e["duration_ms"],
            source=e["source"],
            license=e["license"],
            kind=e["kind"],
            text=e["text"],
            turns=tuple(_turn(t) for t in e["turns"]),
            prompts=tuple(e.get("prompts", ())),
        )
        for e in raw
    ]


def _turn(raw: dict) -> Turn:
    pauses = tuple((int(start), int(end)) for start, end in raw.get("pauses", ()))
    return Turn(text=raw["text"], start_ms=raw["start_ms"], end_ms=raw["end_ms"],
                longest_pause_ms=raw["longest_pause_ms"], pauses=pauses)


def get_entry(name: str) -> FixtureEntry:
    for entry in load_manifest():
        if entry.file == name:
            return entry
    raise FixtureError(f"{name!r} is not in {MANIFEST}")


def fixture_path(name: str) -> Path:
    """Path of a fixture file by its manifest name (e.g. "caller_02_conference.wav")."""
    path = FIXTURES_DIR / name
    if path.parent != FIXTURES_DIR or not path.is_file():
        raise FixtureError(f"no fixture file {name!r} in {FIXTURES_DIR}")
    return path


def parse_wav(blob: bytes) -> WavInfo:
    """Parse a RIFF/WAVE file (any format tag) into its fmt fields and data chunk."""
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise FixtureError("not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    data: bytes | None = None
    pos = 12
    while pos + 8 <= len(blob):
        chunk_id, size = blob[pos:pos + 4], struct.unpack_from("<I", blob, pos + 4)[0]
        body = blob[pos + 8:pos + 8 + size]
        if len(body) < size:
            raise FixtureError(f"chunk {chunk_id!r} truncated: {len(body)} of {size} bytes")
        if chunk_id == b"fmt ":
            if size < 16:
                raise FixtureError(f"fmt chunk too short ({size} bytes)")
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", body)
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            data = body
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise FixtureError("no fmt chunk")
    if data is None:
        raise FixtureError("no data chunk")
    return WavInfo(*fmt, data=data)


def _read_g711_wav(name: str) -> WavInfo:
    info = parse_wav(fixture_path(name).read_bytes())
    if info.format_tag not in _CODECS:
        raise FixtureError(f"{name}: format tag {info.format_tag} is not G.711 (6 or 7)")
    if (info.channels, info.bits_per_sample) != (1, 8):
        raise FixtureError(f"{name}: expected mono 8-bit G.711, got {info.channels} ch "
                           f"{info.bits_per_sample} bit")
    return info


def read_g711(name: str) -> tuple[bytes, Codec]:
    """The G.711 payload bytes (one byte per 8 kHz sample), ready to packetize
    as RTP, and its codec name ("PCMU" or "PCMA")."""
    info = _read_g711_wav(name)
    return info.data, _CODECS[info.format_tag]


def read_pcm16(name: str) -> tuple[bytes, int]:
    """The fixture decoded to 16-bit little-endian mono PCM, and its sample rate."""
    info = _read_g711_wav(name)
    if info.format_tag == WAVE_FORMAT_MULAW:
        pcm = audioop.ulaw2lin(info.data, 2)
    else:
        pcm = audioop.alaw2lin(info.data, 2)
    return pcm, info.sample_rate
