"""Word error rate with a normalizer suited to telephone speech.

Whisper writes "press 1", references say "press one"; Whisper writes
"Okay," where a reference says "OK". Without normalizing both sides the same
way, WER measures punctuation and spelling conventions instead of
recognition, so every comparison in Earshot (benchmarks, accuracy tests) goes
through :func:`normalize` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["corpus_wer", "normalize", "word_edits", "word_error_rate"]

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth",
    "eight": "eighth", "nine": "ninth", "twelve": "twelfth",
}
# Spellings that mean the same word; mapped to one canonical form.
_SAME_WORD = {"ok": "okay", "fourty": "forty", "umute": "unmute"}
# Telephone keypad symbols are read aloud as words.
_SYMBOLS = {"#": " pound ", "*": " star ", "%": " percent ", "&": " and ", "+": " plus ", "@": " at "}


def _spell(n: int) -> str:
    """Spell a non-negative integer below one million in words."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + _spell(rest))
    thousands, rest = divmod(n, 1000)
    return _spell(thousands) + " thousand" + ("" if rest == 0 else " " + _spell(rest))


def _spell_ordinal(match: re.Match[str]) -> str:
    words = _spell(int(match.group(1))).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " " + " ".join(words) + " "


def _spell_number(match: re.Match[str]) -> str:
    digits = match.group(0).replace(",", "")
    # Long digit strings (phone numbers, PINs) are read digit by digit.
    if len(digits) > 6 or (len(digits) > 1 and digits.startswith("0")):
        return " " + " ".join(_ONES[int(d)] for d in digits) + " "
    return " " + _spell(int(digits)) + " "


def normalize(text: str) -> list[str]:
    """Lowercase, spell out numbers, drop punctuation; return the words.

    Digits become words ("21" -> "twenty one", "1st" -> "first") and hyphenated
    number words are split ("twenty-one" -> "twenty one") so that both
    spellings compare equal. Apostrophes are removed inside words
    ("don't" -> "dont") rather than splitting them.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize() expects str, got {type(text).__name__}")
    text = text.lower()
    for symbol, word in _SYMBOLS.items():
        text = text.replace(symbol, word)
    text = re.sub(r"\b(\d{1,6})(?:st|nd|rd|th)\b", _spell_ordinal, text)
    text = re.sub(r"\d+\.\d+", lambda m: m.group(0).replace(".", " point "), text)
    text = re.sub(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+", _spell_number, text)
    text = re.sub(r"['’]", "", text)
    text = re.sub(r"[^a-z]+", " ", text)
    return [_SAME_WORD.get(word, word) for word in text.split()]


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref_word != hyp_word),  # substitution or match
                )
            )
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits needed to turn the normalized hypothesis into the reference, per reference word.

    An empty reference gives 0.0 for an empty hypothesis and 1.0 otherwise
    (anything said over silence is entirely wrong) instead of dividing by zero.
    """
    return corpus_wer([(reference, hypothesis)])


def corpus_wer(pairs: Iterable[tuple[str, str]]) -> float:
    """WER over many (reference, hypothesis) pairs: total edits / total reference words.

    Long utterances weigh more than short ones, the usual way to report a
    test set's WER (a mean of per-utterance WERs overweights one-word prompts).
    """
    edits = 0
    words = 0
    inserted = False
    for reference, hypothesis in pairs:
        ref_words, hyp_words = normalize(reference), normalize(hypothesis)
        edits += word_edits(ref_words, hyp_words)
        words += len(ref_words)
        inserted = inserted or bool(hyp_words)
    if words == 0:
        return 1.0 if inserted else 0.0
    return edits / words
