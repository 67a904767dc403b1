"""G.711 (PCMU / PCMA) to and from 16-bit linear PCM.

``audioop`` does this in C at a few ns per sample, far cheaper than any
numpy table lookup for 160-byte packets. It ships with Python 3.11/3.12
(deprecated) and as the ``audioop-lts`` package on 3.13+.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["CODECS", "decode", "decoder", "encode", "silence"]

_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {"PCMU": audioop.ulaw2lin, "PCMA": audioop.alaw2lin}
_ENCODERS: dict[str, Callable[[bytes, int], bytes]] = {"PCMU": audioop.lin2ulaw, "PCMA": audioop.lin2alaw}
#: Encoded byte of digital silence (both decode to 0 or +-8, inaudible).
_SILENCE_BYTE = {"PCMU": 0xFF, "PCMA": 0xD5}
CODECS = tuple(_DECODERS)


def _check(codec: str) -> str:
    name = codec.upper()
    if name not in _DECODERS:
        raise ValueError(f"unsupported codec {codec!r}: expected one of {', '.join(CODECS)}")
    return name


def decoder(codec: str) -> Callable[[bytes], bytes]:
    """A one-argument decoder for ``codec``, resolved once (hot-path callers keep it)."""
    convert = _DECODERS[_check(codec)]
    return lambda payload: convert(payload, 2)


def decode(payload: bytes, codec: str) -> bytes:
    """G.711 bytes -> 16-bit signed PCM, one sample per byte.

    audioop writes native byte order: little-endian on every platform Earshot
    runs on (x86-64, arm64).
    """
    return _DECODERS[_check(codec)](payload, 2)


def encode(pcm: bytes, codec: str) -> bytes:
    """16-bit signed native-endian PCM -> G.711 bytes."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even length, got {len(pcm)} bytes")
    return _ENCODERS[_check(codec)](pcm, 2)


def silence(samples: int, codec: str | None = None) -> bytes:
    """``samples`` of silence: 16-bit PCM zeros, or encoded G.711 when ``codec`` is given."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if codec is None:
        return bytes(2 * samples)
    return bytes((_SILENCE_BYTE[_check(codec)],)) * samples
