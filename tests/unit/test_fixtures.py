"""The speech fixtures are what the manifest says they are.

Other tests trust these files for turn timing and reference text, so the
claims are checked against the audio itself: format, duration, where speech
is loud, that the gaps between turns are silent enough for a 500 ms silence
threshold to split there (and nowhere inside a turn).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import wave
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_data import (
    FIXTURES_DIR,
    FixtureEntry,
    FixtureError,
    fixture_path,
    load_manifest,
    parse_wav,
    read_g711,
    read_pcm16,
)

RATE = 8000
FRAME = RATE // 100  # 10 ms
SPEECH_DBFS = -40.0  # the threshold build.py used for speech extents
MULTI_TURN = {"caller", "held_out", "conversation", "monologue"}
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")

ENTRIES = load_manifest()
SPEECH = [e for e in ENTRIES if e.turns]
LAID_OUT = [e for e in ENTRIES if e.kind in MULTI_TURN]


def ids(entries: list[FixtureEntry]) -> list[str]:
    return [e.file for e in entries]


def samples(entry: FixtureEntry) -> np.ndarray:
    pcm, rate = read_pcm16(entry.file)
    assert rate == RATE
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(x * x))) if len(x) else 0.0
    return 20 * np.log10(rms / 32768) if rms > 0 else -200.0


def frame_dbfs(x: np.ndarray) -> np.ndarray:
    """Level of consecutive 10 ms frames of x (a trailing partial frame is dropped)."""
    n = len(x) // FRAME
    frames = x[: n * FRAME].reshape(n, FRAME)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-9) / 32768)


def ms(t: int) -> int:
    return t * RATE // 1000


def longest_quiet_run_ms(x: np.ndarray, threshold_dbfs: float) -> int:
    longest = run = 0
    for quiet in frame_dbfs(x) <= threshold_dbfs:
        run = run + 1 if quiet else 0
        longest = max(longest, run)
    return longest * 10


# --- the manifest as a whole ---------------------------------------------------------


def test_manifest_lists_exactly_the_wav_files() -> None:
    names = [e.file for e in ENTRIES]
    assert len(names) == len(set(names))
    assert set(names) == {p.name for p in FIXTURES_DIR.glob("*.wav")}


def test_manifest_covers_the_required_cases() -> None:
    kinds = Counter(e.kind for e in ENTRIES)
    assert kinds["prompt"] >= 25
    assert kinds["caller"] >= 5
    assert kinds["held_out"] >= 5  # the accuracy split no setting was chosen on
    assert kinds["monologue"] == kinds["conversation"] == kinds["silence"] == kinds["noise"] == 1
    encodings = Counter(e.encoding for e in ENTRIES)
    assert 1 <= encodings["a-law"] <= 2 < encodings["mu-law"]
    assert {e.source for e in ENTRIES} >= {"asterisk-core-sounds-en", "synthetic", "flite:slt"}


def test_whole_directory_stays_small() -> None:
    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    assert total < 5_500_000


def test_readme_carries_the_attribution() -> None:
    readme = (FIXTURES_DIR / "README.md").read_text(encoding="utf-8")
    for needed in ("Allison Smith", "Digium", "CC-BY-SA-3.0", "creativecommons.org/licenses/by-sa/3.0"):
        assert needed in readme


# --- each file ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_file_has_stated_format_and_duration(entry: FixtureEntry) -> None:
    info = parse_wav(fixture_path(entry.file).read_bytes())
    assert info.format_tag == {"mu-law": 7, "a-law": 6}[entry.encoding]
    assert (info.channels, info.sample_rate, info.bits_per_sample) == (1, RATE, 8)
    assert abs(len(info.data) * 1000 / RATE - entry.duration_ms) <= 20

    payload, codec = read_g711(entry.file)
    assert codec == {"mu-law": "PCMU", "a-law": "PCMA"}[entry.encoding]
    assert payload == info.data
    pcm, rate = read_pcm16(entry.file)
    assert (rate, len(pcm)) == (RATE, 2 * len(payload))


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_text_and_turns_are_consistent(entry: FixtureEntry) -> None:
    if entry.kind in ("silence", "noise"):
        assert entry.text == "" and entry.turns == ()
        return
    assert entry.turns and all(t.text.strip() for t in entry.turns)
    assert entry.text == " ".join(t.text for t in entry.turns)
    bounds = [0] + [b for t in entry.turns for b in (t.start_ms, t.end_ms)] + [entry.duration_ms]
    assert bounds == sorted(bounds) and all(t.start_ms < t.end_ms for t in entry.turns)
    if entry.source == "asterisk-core-sounds-en":
        assert entry.license.startswith("CC-BY-SA-3.0")
        assert len(entry.prompts) == len(entry.turns)


@pytest.mark.parametrize("entry", SPEECH, ids=ids(SPEECH))
def test_turns_are_loud_where_the_manifest_says(entry: FixtureEntry) -> None:
    x = samples(entry)
    for turn in entry.turns:
        speech = x[ms(turn.start_ms):ms(turn.end_ms)]
        assert dbfs(speech) > -32, turn.text
        # The extent is tight: speech right at both edges (one frame of slack
        # for the 1/8 ms rounding of the times).
        assert frame_dbfs(speech[:2 * FRAME]).max() > SPEECH_DBFS - 3, turn.text
        assert frame_dbfs(speech[-2 * FRAME:]).max() > SPEECH_DBFS - 3, turn.text


@pytest.mark.parametrize("entry", SPEECH, ids=ids(SPEECH))
def test_pauses_inside_turns_are_as_stated(entry: FixtureEntry) -> None:
    x = samples(entry)
    for turn in entry.turns:
        pause = longest_quiet_run_ms(x[ms(turn.start_ms):ms(turn.end_ms)], SPEECH_DBFS)
        # build.py measures on the prompt's own 10 ms grid, this on the file's; where
        # the quiet run's edges hover at the threshold the grids disagree by a few frames
        assert abs(pause - turn.longest_pause_ms) <= 40, turn.text
        if entry.kind in MULTI_TURN:
            # A 500 ms silence threshold must not split a turn in two.
            assert pause < 500, turn.text


@pytest.mark.parametrize("entry", LAID_OUT, ids=ids(LAID_OUT))
def test_silence_around_and_between_turns(entry: FixtureEntry) -> None:
    x = samples(entry)
    turns = entry.turns
    assert abs(turns[0].start_ms - 500) <= 10
    assert abs(entry.duration_ms - turns[-1].end_ms - 1000) <= 10
    for prev, nxt in zip(turns, turns[1:]):
        assert 1000 <= nxt.start_ms - prev.end_ms <= 1500, nxt.text
    edges = [0] + [b for t in turns for b in (t.start_ms, t.end_ms)] + [entry.duration_ms]
    for quiet_start, quiet_end in zip(edges[::2], edges[1::2]):
        # One frame of slack at each end for the 1/8 ms rounding of the times.
        quiet = x[ms(quiet_start) + FRAME:ms(quiet_end) - FRAME]
        where = (quiet_start, quiet_end)
        assert frame_dbfs(quiet).max() <= SPEECH_DBFS + 1, where
        assert dbfs(quiet) < -50, where
        # Mostly true silence (the rest is the prompts' own quiet edges).
        assert longest_quiet_run_ms(quiet, -60) >= (quiet_end - quiet_start) // 2, where


def test_multi_turn_files_have_the_intended_lengths() -> None:
    for entry in ENTRIES:
        if entry.kind in ("caller", "held_out"):
            assert 14_000 <= entry.duration_ms <= 30_000, entry.file
            assert 3 <= len(entry.turns) <= 5, entry.file
        if entry.kind == "prompt":
            assert 1_500 <= entry.duration_ms <= 10_000, entry.file
        if entry.kind == "conversation":
            assert len(entry.turns) >= 3 and entry.source != "flite:slt"


def test_monologue_is_one_long_turn_without_real_pauses() -> None:
    (entry,) = [e for e in ENTRIES if e.kind == "monologue"]
    (turn,) = entry.turns
    assert turn.end_ms - turn.start_ms > 25_000  # well past a 20 s max-turn limit
    x = samples(entry)[ms(turn.start_ms):ms(turn.end_ms)]
    assert longest_quiet_run_ms(x, SPEECH_DBFS) < 300


def test_silence_file_is_digital_silence() -> None:
    (entry,) = [e for e in ENTRIES if e.kind == "silence"]
    x = samples(entry)
    assert len(x) == 10 * RATE and not x.any()


def test_noise_file_is_quiet_noise_with_mains_hum() -> None:
    (entry,) = [e for e in ENTRIES if e.kind == "noise"]
    x = samples(entry)
    assert len(x) == 10 * RATE
    assert -60 < dbfs(x) < -40
    assert frame_dbfs(x).max() < -35  # no burst anywhere
    spectrum = np.abs(np.fft.rfft(x))  # 0.1 Hz bins over 10 s
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    hum = spectrum[np.argmin(np.abs(freqs - 50))]
    assert hum > 20 * np.median(spectrum[(freqs > 20) & (freqs < 3400)])
    # Noise, not just the hum: audible (if quiet) across the voice band.
    voice_band = (freqs > 300) & (freqs < 3400)
    band_power = 2 * np.sum(spectrum[voice_band] ** 2) / len(x) ** 2  # Parseval
    assert -65 < 10 * np.log10(band_power / 32768**2) < -52


# --- against the sources -------------------------------------------------------------


PROMPTS = [e for e in ENTRIES if e.kind == "prompt"]


@pytest.mark.skipif(not ASTERISK_SOUNDS.is_dir(), reason="asterisk-core-sounds-en-wav not installed")
@pytest.mark.parametrize("entry", PROMPTS, ids=ids(PROMPTS))
def test_prompt_is_the_whole_untrimmed_source(entry: FixtureEntry) -> None:
    (name,) = entry.prompts
    with wave.open(str(ASTERISK_SOUNDS / f"{name}.wav")) as w:
        source = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    x = samples(entry)
    assert len(x) == len(source)
    # G.711 keeps ~38 dB SNR on speech; a different or shifted recording would not.
    error = dbfs(x - source) - dbfs(source)
    assert error < -30


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")
@pytest.mark.parametrize("encoding", ["mu-law", "a-law"])
def test_decoding_matches_sox(encoding: str) -> None:
    entry = next(e for e in ENTRIES if e.encoding == encoding and e.kind != "silence")
    raw = subprocess.run(
        ["sox", str(fixture_path(entry.file)), "-t", "raw", "-e", "signed-integer", "-b", "16", "-"],
        check=True, capture_output=True,
    ).stdout
    pcm, _ = read_pcm16(entry.file)
    assert pcm == raw


# --- the reader's errors -------------------------------------------------------------


def pcm_wav() -> bytes:
    buf = BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"\x01\x00" * 80)
    return buf.getvalue()


def test_parse_wav_reads_plain_pcm_too() -> None:
    info = parse_wav(pcm_wav())
    assert (info.format_tag, info.channels, info.sample_rate, info.bits_per_sample) == (1, 1, RATE, 16)
    assert info.data == b"\x01\x00" * 80


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00WAVX", "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00WAVE", "no fmt chunk"),
        (pcm_wav()[:-10], "truncated"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<I", 4) + b"\x07\x00\x01\x00", "fmt chunk too short"),
        (pcm_wav().replace(b"data", b"junk"), "no data chunk"),
    ],
)
def test_parse_wav_rejects_malformed_files(blob: bytes, message: str) -> None:
    with pytest.raises(FixtureError, match=message):
        parse_wav(blob)


@pytest.mark.parametrize("name", ["missing.wav", "../pyproject.toml", "manifest.json/.."])
def test_fixture_path_rejects_unknown_names(name: str) -> None:
    with pytest.raises(FixtureError):
        fixture_path(name)
