"""End to end: a real SIP call reads a card number aloud, and no sink of Earshot keeps it.

A PJSIP (pjsua2) caller plays Debian's Asterisk digit prompts joined with sox: the Discover
test number 6011 0009 9013 9424 read in four groups, 1.5 s apart, so each group is a turn of
its own (the cross-turn hold of docs/redaction.md is what redacts it), then keys 1234# on the
keypad. `earshot run` transcribes it with tiny.en (the default model). The test then reads every
key the gateway wrote to the real Redis (the events stream and the call's own stream), every
row of every table of its SQLite store, and the gateway's whole log, and finds the number in
none of them, in digits or in words; it finds ``[REDACTED:card]``, ``redactions`` >= 1, and the
DTMF keys published as ``*``. The call is recorded (docs/recordings.md): the recording holds the
caller's audio where the events place it, and every span of the four groups of digits, and every
redacted turn, is silence in it, while the prompt said before the number ("Please hold while we
try to connect you.") is there as sent. (No prompt follows the number: with one after it, tiny.en
began that turn with the number's last digit, "4 Thank you for your patience", heard through the
previous turns' context audio.)

The Visa test number 4111 1111 1111 1111 is not used: tiny.en hears "one one one one" read by
this voice as a repetition loop ("one. one. one. one. one. ..."), while it transcribes each
group of the Discover number as read (checked with faster-whisper before choosing it).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.e2e.harness import REDIS_URL, place_calls, running_gateway


pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DIGITS_DIR = Path("/usr/share/asterisk/sounds/en/digits")
SOUNDS_DIR = DIGITS_DIR.parent
BEFORE = "pls-hold-while-try"  # speech before the number, no digits in it
CARD = "6011000990139424"
GROUPS = ["6011", "0009", "9013", "9424"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_WORD = re.compile(r"\b(zero|oh|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
                        r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|"
                        r"fifty|sixty|seventy|eighty|ninety|hundred|thousand|double|triple)\b", re.I)
SEP = r"[\s,.;:\-/]*"


def leak_patterns() -> list[re.Pattern[str]]:
    """Any two consecutive groups of the number (8 of its digits) in digits or in words, however separated."""
    out = []
    for a, b in zip(GROUPS, GROUPS[1:]):
        digits = a + b
        out.append(re.compile(SEP.join(digits)))
        out.append(re.compile(SEP.join(rf"(?:{WORDS[int(d)]}{'|oh' if d == '0' else ''})" for d in digits), re.I))
    out.append(re.compile(SEP.join(CARD)))
    return out


def card_wav(directory: Path) -> tuple[Path, list[tuple[int, int]]]:
    """1 s of silence, a prompt, the four groups (digits trimmed of their own silence, 50 ms apart)
    1.5 s apart; and where the prompt and the groups are in it ([start, end) samples at 8 kHz)."""
    sox = shutil.which("sox")
    if sox is None or not (DIGITS_DIR / "0.wav").exists() or not (SOUNDS_DIR / f"{BEFORE}.wav").exists():
        pytest.skip("needs sox and Debian's asterisk-core-sounds-en-wav")

    def run(*args: str) -> None:
        subprocess.run([sox, *args], check=True, capture_output=True)

    fmt = ["-r", "8000", "-c", "1", "-b", "16"]
    gap, pause = directory / "gap.wav", directory / "pause.wav"
    run("-n", *fmt, str(gap), "trim", "0", "0.05")
    run("-n", *fmt, str(pause), "trim", "0", "1.5")
    for d in set(CARD):
        run(str(DIGITS_DIR / f"{d}.wav"), *fmt, str(directory / f"d{d}.wav"),
            "silence", "1", "0.01", "-45d", "reverse", "silence", "1", "0.01", "-45d", "reverse")
    for name in (BEFORE,):
        run(str(SOUNDS_DIR / f"{name}.wav"), *fmt, str(directory / f"{name}.wav"),
            "silence", "1", "0.01", "-45d", "reverse", "silence", "1", "0.01", "-45d", "reverse")

    def samples(path: str) -> int:
        with wave.open(path, "rb") as w:
            return w.getnframes()

    spans: list[tuple[int, int]] = []
    parts, at = [str(pause)], samples(str(pause))

    def spoken(files: list[str]) -> None:
        nonlocal at
        start = at
        for f in files:
            parts.append(f)
            at += samples(f)
        spans.append((start, at))
        parts.append(str(pause))
        at += samples(str(pause))

    spoken([str(directory / f"{BEFORE}.wav")])
    for group in GROUPS:
        spoken([f for d in group for f in (str(directory / f"d{d}.wav"), str(gap))][:-1])
    out = directory / "card.wav"
    run(*parts, *fmt, str(out))
    return out, spans


def redis_dump(prefix: str) -> tuple[list[dict], str]:
    """Every event in every stream under the prefix, and the raw text of every key's value."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    events, raw = [], []
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            kind = client.type(key)
            if kind == "stream":
                for _id, fields in client.xrange(key):
                    raw.append(json.dumps(fields))
                    if "data" in fields:
                        events.append(json.loads(fields["data"]))
            elif kind == "string":
                raw.append(str(client.get(key)))
            elif kind == "hash":
                raw.append(json.dumps(client.hgetall(key)))
            elif kind == "list":
                raw.append(json.dumps(client.lrange(key, 0, -1)))
            elif kind in ("set", "zset"):
                raw.append(json.dumps(sorted(client.smembers(key)) if kind == "set"
                                      else client.zrange(key, 0, -1)))
    finally:
        client.close()
    return events, "\n".join(raw)


def sql_dump(path: Path) -> tuple[list[str], str]:
    """The store's turn texts, and every value of every row of every table."""
    db = sqlite3.connect(path)
    try:
        texts = [t for row in db.execute("SELECT text, partial_text FROM turns") for t in row if t]
        raw = []
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            raw += [" ".join(map(str, row)) for row in db.execute(f'SELECT * FROM "{table}"')]
    finally:
        db.close()
    return texts, "\n".join(raw)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0


def align(recorded: np.ndarray, sent: np.ndarray, span: tuple[int, int], max_lag: int) -> tuple[int, float]:
    """Where the sent ``span`` sits in the recording (its lag in samples) and how well it matches there."""
    ref = sent[span[0]:span[1]]
    ref = ref - ref.mean()
    best = (0, -1.0)
    for lag in range(0, max_lag, 1):
        seg = recorded[span[0] + lag:span[1] + lag]
        if seg.size < ref.size:
            break
        seg = seg - seg.mean()
        score = float(seg @ ref / (np.sqrt((seg @ seg) * (ref @ ref)) or 1.0))
        if score > best[1]:
            best = (lag, score)
    return best


def test_a_card_number_read_over_four_turns_reaches_no_sink(tmp_path):
    wav, spans = card_wav(tmp_path)
    store = tmp_path / "earshot.db"
    recordings = tmp_path / "recordings"
    with running_gateway({"EARSHOT_DATABASE_URL": f"sqlite:///{store}", "EARSHOT_LOG_LEVEL": "debug",
                          "EARSHOT_RECORDINGS_DIR": str(recordings), "EARSHOT_RECORD": "true"}) as gw:
        results = place_calls(f"127.0.0.1:{gw.sip_port}", [wav], 1, hold=4.0, dtmf="1234#")
        assert results[0]["confirmed"], results
        deadline = time.monotonic() + 60
        while True:
            events, raw_redis = redis_dump(gw.prefix)
            ended = [e for e in events if e["type"] == "call.ended"]
            texts, raw_sql = sql_dump(store) if store.exists() else ([], "")
            finals = [e for e in events if e["type"] == "turn.final" and e.get("text")]
            stored = "call.ended" in raw_sql or (ended and len(texts) >= len({e["turn"] for e in finals}) > 0)
            if (ended and stored) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        log = "".join(gw.output)
    assert ended, [e["type"] for e in events]
    # the events stream and the call's stream hold the same events: each once here
    mine = list({e["event_id"]: e for e in events if e["call_id"] == ended[0]["call_id"]}.values())
    mine.sort(key=lambda e: e["event_id"])
    finals = [e for e in mine if e["type"] == "turn.final"]
    said = " ".join(e.get("text", "") for e in finals)
    print("\nfinals:", [(e["turn"], e.get("text"), e.get("redactions")) for e in finals])
    print("partials:", [(e["turn"], e.get("text")) for e in mine if e["type"] == "turn.partial"])
    assert "[REDACTED:card]" in said, said
    assert sum(e.get("redactions", 0) for e in finals) >= 1
    # the call holds nothing but the card's digits: no transcript text may keep a digit or a digit word
    published = [e["text"] for e in mine if e["type"] in ("turn.partial", "turn.final") and e.get("text")]
    for text in published + texts:
        assert not re.search(r"\d", text) and not DIGIT_WORD.search(text), text
    assert texts, "the store has no turns"
    # and no sink holds 8 digits of the number in a row, in any form
    for where, blob in (("redis", raw_redis), ("sql", raw_sql), ("log", log)):
        for pattern in leak_patterns():
            found = pattern.search(blob)
            assert found is None, f"{where} holds {found.group()!r}"
    # keys pressed while card details are being given: published as *, with the count
    dtmf = [e for e in mine if e["type"] == "dtmf"]
    assert [e["digit"] for e in dtmf] == ["*", "*", "*", "*", "#"], dtmf
    assert [e.get("redactions") for e in dtmf] == [1, 1, 1, 1, None]
    # the recording: the caller's audio on the call's timeline, card digits muted (docs/recordings.md)
    end = ended[0]
    assert end.get("recording") and "recording_error" not in end, end
    path = recordings / end["recording"]
    assert path.stat().st_size == end["recording_bytes"]
    recorded, sent = read_wav(path), read_wav(wav)
    assert abs(end["recording_duration_ms"] - recorded.size / 8) <= 1
    lag, score = align(recorded, sent, spans[0], 8000 * 3)  # the first prompt: the caller's first packet is late
    print(f"recording: {recorded.size / 8000:.2f} s, lag {lag / 8:.0f} ms, prompt correlation {score:.3f}")
    assert score > 0.9, (lag, score)
    levels = [rms(recorded[a + lag:b + lag]) for a, b in spans]
    print("rms of the prompt and the groups:", [round(x, 1) for x in levels],
          "sent:", [round(rms(sent[a:b]), 1) for a, b in spans])
    assert levels[0] > 300
    assert levels[1:] == [0.0] * len(GROUPS), levels  # every group of the number is silence
    for e in finals:
        a, b = e["start_ms"] * 8, e["end_ms"] * 8
        if e.get("redactions"):
            assert rms(recorded[a:b]) == 0.0, e
        elif e.get("text"):
            assert rms(recorded[a:b]) > 300, e
    # the store has what call.ended said
    db = sqlite3.connect(store)
    try:
        row = db.execute("SELECT recording, recording_bytes FROM calls WHERE call_id = ?", (end["call_id"],)).fetchone()
    finally:
        db.close()
    assert row == (end["recording"], end["recording_bytes"])
