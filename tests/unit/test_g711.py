import math
import struct
import wave
from pathlib import Path

import pytest

from gateway.media import g711

PROMPT = Path("/usr/share/asterisk/sounds/en/agent-pass.wav")  # real 8 kHz telephone prompt


def ulaw_reference(byte: int) -> int:
    """G.711 mu-law expansion written from the ITU-T formula, independent of audioop."""
    u = ~byte & 0xFF
    magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    return -magnitude if u & 0x80 else magnitude


def alaw_reference(byte: int) -> int:
    a = byte ^ 0x55
    mantissa, exponent = a & 0x0F, (a >> 4) & 7
    magnitude = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if a & 0x80 else -magnitude


def samples(pcm: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(pcm) // 2}h", pcm))


def read_prompt() -> bytes:
    with wave.open(str(PROMPT)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return w.readframes(w.getnframes())


@pytest.mark.parametrize(("codec", "reference"), [("PCMU", ulaw_reference), ("PCMA", alaw_reference)])
def test_decode_matches_the_itu_tables_for_every_byte(codec, reference):
    assert samples(g711.decode(bytes(range(256)), codec)) == [reference(b) for b in range(256)]


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_real_speech_roundtrip_keeps_g711_quality(codec):
    pcm = read_prompt()
    decoded = g711.decode(g711.encode(pcm, codec), codec)
    assert len(decoded) == len(pcm)
    original, restored = samples(pcm), samples(decoded)
    signal = sum(x * x for x in original)
    noise = sum((x - y) ** 2 for x, y in zip(original, restored))
    snr_db = 10 * math.log10(signal / noise)
    assert snr_db > 30  # G.711 gives ~38 dB on speech; a wrong table or byte order gives < 0


def test_silence():
    assert g711.silence(3) == b"\x00" * 6
    assert g711.silence(0) == b""
    assert g711.decode(g711.silence(160, "PCMU"), "PCMU") == bytes(320)  # mu-law silence decodes to 0
    assert max(abs(s) for s in samples(g711.decode(g711.silence(160, "PCMA"), "pcma"))) <= 8
    with pytest.raises(ValueError, match="samples must be >= 0"):
        g711.silence(-1)


def test_decoder_function_matches_decode():
    payload = bytes(range(0, 256, 3))
    assert g711.decoder("pcmu")(payload) == g711.decode(payload, "PCMU")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unsupported codec 'G729'"):
        g711.decode(b"\x00", "G729")
    with pytest.raises(ValueError, match="even length"):
        g711.encode(b"\x00\x00\x00", "PCMU")
