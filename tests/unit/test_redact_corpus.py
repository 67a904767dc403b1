"""Recall and false positives of PCI redaction over tests/redaction_corpus.yaml (docs/redaction.md).

Every card reading (the corpus's test numbers read in every common way, and its hand-written
calls) must come out with no digit and no digit word left: recall 100 %. The near misses are
counted and the false-positive rate printed (``pytest -s`` shows it; bench/RESULTS.md records it).
Each reading is fed to one leg's Redactor turn by turn, 2 s apart, as the pipeline would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.output.redact import Redactor, redact

CORPUS = yaml.safe_load((Path(__file__).resolve().parents[1] / "redaction_corpus.yaml").read_text())

WORD = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven",
        "8": "eight", "9": "nine"}
# an independent list: any of these left in a card reading's output is a leak
DIGIT_WORDS = re.compile(r"\b(zero|oh|o|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
                         r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|"
                         r"fifty|sixty|seventy|eighty|ninety|double|triple)\b", re.I)


def groups(number: str) -> list[str]:
    if len(number) == 15:
        cuts = [4, 10]  # Amex: 4-6-5
    elif len(number) == 14:
        cuts = [4, 10]  # Diners: 4-6-4
    else:
        cuts = list(range(4, len(number), 4))
    return [number[a:b] for a, b in zip([0] + cuts, cuts + [len(number)])]


def words(group: str, zero: str = "zero") -> str:
    return " ".join(zero if d == "0" else WORD[d] for d in group)


def repeats(group: str) -> str:
    """'4111' -> 'four triple one'; '5500' -> 'double five double oh'."""
    out, i = [], 0
    while i < len(group):
        j = i
        while j < len(group) and group[j] == group[i] and j - i < 3:
            j += 1
        word = "oh" if group[i] == "0" else WORD[group[i]]
        out.append({1: word, 2: f"double {word}", 3: f"triple {word}"}[j - i])
        i = j
    return " ".join(out)


def readings(number: str) -> list[tuple[str, list[str]]]:
    """(style, turns) for every common way of reading ``number``."""
    g = groups(number)
    half = len(g) // 2
    ways: list[tuple[str, list[str]]] = [
        ("digit groups", [" ".join(g)]),
        ("dashes", ["-".join(g) + "."]),
        ("one string", [number]),
        ("words", [words(number)]),
        ("word groups", [", ".join(words(x) for x in g) + "."]),
        ("oh for zero", [", ".join(words(x, "oh") for x in g)]),
        ("fillers", [" um ".join(words(x) for x in g[:2]) + ", uh, " + " and ".join(words(x) for x in g[2:])]),
        ("double and triple", [", ".join(repeats(x) for x in g)]),
        ("mixed", [" ".join(g[:half]) + " " + ", ".join(words(x) for x in g[half:])]),
        ("comma digits", [", ".join(number) + "."]),
        ("card words", [f"my card number is {' '.join(g)}, thank you"]),
        ("two finals", [f"the number is {' '.join(g[:half])}", " ".join(g[half:]) + "."]),
        ("two finals in words", [", ".join(words(x) for x in g[:half]) + ",", ", ".join(words(x) for x in g[half:])]),
        ("three finals", [" ".join(g[:1]), " ".join(g[1:2]), " ".join(g[2:])]),
        ("a final per group", [words(x) + "." for x in g]),
    ]
    return ways


def run_leg(turns: list[str], gap_s: float = 2.0) -> list[tuple[str, int]]:
    """One leg's finals through a Redactor, as the pipeline feeds it: (published text, redactions)."""
    r: Redactor[int] = Redactor()
    out = []
    for i, text in enumerate(turns):
        now = i * gap_s
        out += [(x.text, x.count) for x in r.due(now)]
        out += [(x.text, x.count) for x in r.final(text, now, i)]
    out += [(x.text, x.count) for x in r.flush(len(turns) * gap_s)]
    assert len(out) == len(turns)
    return out


def leaks(texts: list[str]) -> list[str]:
    joined = " ".join(texts)
    return re.findall(r"\d+", joined) + DIGIT_WORDS.findall(joined)


def card_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for network, numbers in CORPUS["numbers"].items():
        for number in numbers:
            for style, turns in readings(str(number)):
                cases.append((f"{network} {number} {style}", turns))
    cases += [(f"hand-written {i + 1}", turns) for i, turns in enumerate(CORPUS["cards"])]
    return cases


def test_recall_on_card_numbers_is_complete():
    cases = card_cases()
    missed = []
    for name, turns in cases:
        published = run_leg(turns)
        left = leaks([text for text, _ in published])
        if left or not any(count for _, count in published):
            missed.append((name, [text for text, _ in published], left))
    print(f"\nPCI redaction recall: {len(cases) - len(missed)} of {len(cases)} card readings redacted")
    assert not missed, "\n".join(f"{name}: {texts} left {left}" for name, texts, left in missed[:20])


@pytest.mark.parametrize("case", CORPUS["sensitive"], ids=lambda c: c["text"][:40])
def test_cvv_expiry_and_ssn(case):
    assert redact(case["text"]).text == case["redacted"]


def test_false_positive_rate_on_near_misses():
    flagged = []
    for turns in CORPUS["near_misses"]:
        published = run_leg(turns)
        if any(count for _, count in published):
            flagged.append((turns, [text for text, _ in published]))
        else:
            assert [text for text, _ in published] == turns  # untouched
    total = len(CORPUS["near_misses"])
    print(f"\nPCI redaction false positives: {len(flagged)} of {total} near misses "
          f"({100 * len(flagged) / total:.1f} %)")
    for turns, texts in flagged:
        print(f"  {turns} -> {texts}")
    assert len(flagged) < total  # the corpus must be able to tell: not everything is flagged
