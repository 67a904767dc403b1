"""The speech fixtures are what the manifest says they are.

Other tests trust these files for turn timing and reference text, so the
claims are checked against the audio itself: format, duration, where speech
is loud, that the gaps between turns are silent enough for a 500 ms silence
threshold to split there (and nowhere inside a turn), and that the "paused"
calls pause 400-900 ms inside sentences exactly where the manifest says, so a
bench can count the finals cut off there.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import wave
from collections import Counter
from io import BytesIO
from itertools import pairwise
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
PAUSE_MIN_MS = 300  # build.py lists every quiet run this long inside a turn
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")

ENTRIES = load_manifest()
SPEECH = [e for e in ENTRIES if e.turns]
LAID_OUT = [e for e in ENTRIES if e.kind in MULTI_TURN]
PAUSED = [e for e in ENTRIES if e.kind == "paused"]


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


def quiet_runs_ms(x: np.ndarray, threshold_dbfs: float, min_ms: int) -> list[tuple[int, int]]:
    """(start_ms, end_ms) within x of every run of quiet 10 ms frames lasting min_ms or more."""
    runs, start = [], None
    for i, quiet in enumerate([*(frame_dbfs(x) <= threshold_dbfs), False]):
        if quiet and start is None:
            start = i
        elif not quiet and start is not None:
            if (i - start) * 10 >= min_ms:
                runs.append((start * 10, i * 10))
            start = None
    return runs


def assert_quiet_outside_turns(entry: FixtureEntry, x: np.ndarray) -> None:
    """Before, between and after the turns: below the speech threshold, and mostly digital silence."""
    edges = [0] + [b for t in entry.turns for b in (t.start_ms, t.end_ms)] + [entry.duration_ms]
    for quiet_start, quiet_end in zip(edges[::2], edges[1::2]):
        # One frame of slack at each end for the 1/8 ms rounding of the times.
        quiet = x[ms(quiet_start) + FRAME:ms(quiet_end) - FRAME]
        where = (quiet_start, quiet_end)
        assert frame_dbfs(quiet).max() <= SPEECH_DBFS + 1, where
        assert dbfs(quiet) < -50, where
        # Mostly true silence (the rest is the prompts' own quiet edges).
        assert longest_quiet_run_ms(quiet, -60) >= (quiet_end - quiet_start) // 2, where


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
    assert kinds["paused"] >= 8  # mid-sentence pauses, for counting false cuts
    assert kinds["monologue"] == kinds["conversation"] == kinds["silence"] == kinds["noise"] == 1
    encodings = Counter(e.encoding for e in ENTRIES)
    assert 1 <= encodings["a-law"] <= 2 < encodings["mu-law"]
    assert {e.source for e in ENTRIES} >= {"asterisk-core-sounds-en", "synthetic", "flite:slt"}
    # three synthetic voices and a recorded human one
    # recorded human speech only: an end-of-turn model scores flite near chance
    assert {e.source for e in PAUSED} == {"asterisk-core-sounds-en"}


def test_whole_directory_stays_small() -> None:
    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    assert total < 8_200_000


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
        assert len(entry.prompts) == len(entry.turns)  # a turn of several prompts joins them with "+"
        for names, turn in zip(entry.prompts, entry.turns):
            # a joined turn pauses between two prompts (some join without one: "new" + "messages");
            # a sentence turn is one prompt with its pauses cut in
            assert names.count("+") >= len(turn.pauses) or "+" not in names if entry.kind == "paused" \
                else "+" not in names


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


@pytest.mark.parametrize("entry", SPEECH, ids=ids(SPEECH))
def test_listed_pauses_are_the_quiet_runs_inside_turns(entry: FixtureEntry) -> None:
    x = samples(entry)
    for turn in entry.turns:
        assert all(turn.start_ms < a < b < turn.end_ms for a, b in turn.pauses), turn.text
        assert turn.pauses == tuple(sorted(turn.pauses))
        if turn.pauses:
            assert max(b - a for a, b in turn.pauses) == turn.longest_pause_ms, turn.text
        else:
            assert turn.longest_pause_ms < PAUSE_MIN_MS, turn.text
        # Same frames as build.py (the file's grid is the clips' grid), but from the
        # decoded G.711: a few frames at a run's edge hover at the threshold (as above).
        found = [(turn.start_ms + a, turn.start_ms + b)
                 for a, b in quiet_runs_ms(x[ms(turn.start_ms):ms(turn.end_ms)], SPEECH_DBFS, PAUSE_MIN_MS - 40)]
        listed = list(turn.pauses)
        for a, b in found:
            if b - a >= PAUSE_MIN_MS + 40:
                assert any(abs(a - la) <= 40 and abs(b - lb) <= 40 for la, lb in listed), (turn.text, a, b)
        for la, lb in listed:
            assert any(abs(a - la) <= 40 and abs(b - lb) <= 40 for a, b in found), (turn.text, la, lb)


@pytest.mark.parametrize("entry", LAID_OUT, ids=ids(LAID_OUT))
def test_silence_around_and_between_turns(entry: FixtureEntry) -> None:
    x = samples(entry)
    turns = entry.turns
    assert abs(turns[0].start_ms - 500) <= 10
    assert abs(entry.duration_ms - turns[-1].end_ms - 1000) <= 10
    for prev, nxt in zip(turns, turns[1:]):
        assert 1000 <= nxt.start_ms - prev.end_ms <= 1500, nxt.text
    assert_quiet_outside_turns(entry, x)


# --- the paused calls ----------------------------------------------------------------


@pytest.mark.parametrize("entry", PAUSED, ids=ids(PAUSED))
def test_paused_calls_end_every_turn_with_a_long_silence(entry: FixtureEntry) -> None:
    """A turn's end is unmistakable: 1.5 s or more of silence after it, longer
    than any pause inside a turn, so an end a policy misses is a missed end."""
    x = samples(entry)
    turns = entry.turns
    assert abs(turns[0].start_ms - 500) <= 10
    assert entry.duration_ms - turns[-1].end_ms >= 1500
    for prev, nxt in pairwise(turns):
        assert 1500 <= nxt.start_ms - prev.end_ms <= 2500, nxt.text
    assert_quiet_outside_turns(entry, x)


@pytest.mark.parametrize("entry", PAUSED, ids=ids(PAUSED))
def test_paused_calls_pause_400_to_900_ms_inside_sentences(entry: FixtureEntry) -> None:
    x = samples(entry)
    paused = [t for t in entry.turns if t.pauses]
    ordinary = [t for t in entry.turns if not t.pauses]
    assert len(paused) >= 3 and ordinary, entry.file
    for turn in paused:
        for start, end in turn.pauses:
            assert 400 <= end - start <= 900, (turn.text, start, end)
            # Words on both sides: the sentence goes on after the pause.
            assert start - turn.start_ms >= 300 and turn.end_ms - end >= 300, (turn.text, start, end)
            # Silent throughout (inserted digital silence plus the recording's own
            # quiet frames), and speech right at both ends (one frame of slack, as above).
            assert frame_dbfs(x[ms(start) + FRAME:ms(end) - FRAME]).max() <= SPEECH_DBFS + 1, turn.text
            assert frame_dbfs(x[ms(start) - 2 * FRAME:ms(start)]).max() > SPEECH_DBFS - 3, turn.text
            assert frame_dbfs(x[ms(end):ms(end) + 2 * FRAME]).max() > SPEECH_DBFS - 3, turn.text
    for turn in ordinary:
        assert longest_quiet_run_ms(x[ms(turn.start_ms):ms(turn.end_ms)], SPEECH_DBFS) < PAUSE_MIN_MS, turn.text


def test_paused_calls_give_enough_pauses_to_count_false_cuts() -> None:
    # One false cut in 50 pauses is 2%: fine enough for a target of at most 5%.
    lengths = [end - start for e in PAUSED for t in e.turns for start, end in t.pauses]
    assert len(lengths) >= 45
    # most of them inside one recorded sentence, the rest between prompts made to be joined
    inside = [t for e in PAUSED for name, t in zip(e.prompts, e.turns) if t.pauses and "+" not in name]
    assert sum(len(t.pauses) for t in inside) >= 30
    assert sum(len(t.pauses) == 2 for t in inside) >= 4  # a sentence that pauses twice
    assert len({t.text for t in inside}) == len(inside)  # no sentence twice
    assert min(lengths) < 500 and max(lengths) > 800  # spread over the range, not one length


def test_multi_turn_files_have_the_intended_lengths() -> None:
    for entry in ENTRIES:
        if entry.kind in ("caller", "held_out"):
            assert 14_000 <= entry.duration_ms <= 30_000, entry.file
            assert 3 <= len(entry.turns) <= 5, entry.file
        if entry.kind == "prompt":
            assert 1_500 <= entry.duration_ms <= 10_000, entry.file
        if entry.kind == "conversation":
            assert len(entry.turns) >= 3 and entry.source != "flite:slt"
        if entry.kind == "paused":
            assert 20_000 <= entry.duration_ms <= 40_000, entry.file
            assert 4 <= len(entry.turns) <= 6, entry.file


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
SENTENCE_TURNS = [(e, name, t) for e in PAUSED for name, t in zip(e.prompts, e.turns) if t.pauses and "+" not in name]


def source_prompt(name: str) -> np.ndarray:
    with wave.open(str(ASTERISK_SOUNDS / f"{name}.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def speech_extent_ms(x: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(frame_dbfs(x) > SPEECH_DBFS)
    return int(loud[0]) * 10, (int(loud[-1]) + 1) * 10


@pytest.mark.skipif(not ASTERISK_SOUNDS.is_dir(), reason="asterisk-core-sounds-en-wav not installed")
@pytest.mark.parametrize("entry,name,turn", SENTENCE_TURNS,
                         ids=[f"{e.file}-{name}" for e, name, _ in SENTENCE_TURNS])
def test_sentence_pauses_are_cut_into_the_named_recording(entry: FixtureEntry, name: str, turn) -> None:
    """Each piece of the turn between its pauses is the named prompt's audio
    in order, nothing left out or trimmed: the pauses add silence and nothing
    else, so the words around them are the recorded sentence's own."""
    source = source_prompt(name)
    x = samples(entry)
    src_start, src_end = speech_extent_ms(source)
    edges = [turn.start_ms] + [m for p in turn.pauses for m in p] + [turn.end_ms]
    pieces = list(zip(edges[::2], edges[1::2]))
    offset = src_start - turn.start_ms  # source ms = file ms + offset, until the first pause
    for k, (a, b) in enumerate(pieces):
        if k:
            # a piece starts where speech resumes: find that point in the source (after the previous piece)
            prev_end = pieces[k - 1][1] + offset
            quiet_in_source = speech_extent_ms(source[ms(prev_end):])[0]
            offset = prev_end + quiet_in_source - a
        piece, original = x[ms(a):ms(b)], source[ms(a + offset):ms(b + offset)]
        assert len(piece) == len(original), (turn.text, k)
        assert dbfs(piece - original) - dbfs(original) < -30, (turn.text, k)  # G.711 keeps ~38 dB SNR
    assert turn.end_ms + offset == src_end, turn.text  # the sentence ends where the recording does


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
