"""WER normalizer and Levenshtein: the yardstick every ASR accuracy number relies on."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.asr.wer import corpus_wer, normalize, word_edits, word_error_rate


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Press 1 to mute, 2 to lock.", ["press", "one", "to", "mute", "two", "to", "lock"]),
        ("Twenty-one", ["twenty", "one"]),
        ("21", ["twenty", "one"]),
        ("99 bottles", ["ninety", "nine", "bottles"]),
        ("0", ["zero"]),
        ("the 1st and 22nd", ["the", "first", "and", "twenty", "second"]),
        ("Waldo's premier; don't!", ["waldos", "premier", "dont"]),
        ("press # or *", ["press", "pound", "or", "star"]),
        ("OK, okay", ["okay", "okay"]),
        ("100%", ["one", "hundred", "percent"]),
        ("1,250", ["one", "thousand", "two", "hundred", "fifty"]),
        ("call 5551234", ["call", "five", "five", "five", "one", "two", "three", "four"]),
        ("ext. 007", ["ext", "zero", "zero", "seven"]),
        ("  ...  ", []),
    ],
)
def test_normalize(text: str, words: list[str]) -> None:
    assert normalize(text) == words


def test_digits_and_number_words_compare_equal() -> None:
    assert word_error_rate("Press one to mute, twenty-one to exit.", "press 1 to mute 21 to exit") == 0.0


def test_wer_counts_substitutions_insertions_deletions() -> None:
    # ref 4 words: one substitution (mute -> mutes) -> 1/4
    assert word_error_rate("press one to mute", "Press 1 to mutes") == 0.25
    # one deletion + one insertion
    assert word_edits(["a", "b", "c"], ["a", "c", "d"]) == 2
    assert word_error_rate("a b", "a b c d") == 1.0


def test_empty_reference() -> None:
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("", "Thank you.") == 1.0


def test_corpus_wer_weighs_by_reference_length() -> None:
    pairs = [("one", "two"), ("a b c d e f g h i", "a b c d e f g h i")]
    assert corpus_wer(pairs) == pytest.approx(1 / 10)


def test_normalize_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="expects str"):
        normalize(b"bytes")  # type: ignore[arg-type]


words = st.lists(st.sampled_from(["a", "b", "c", "one", "two"]), max_size=8)


# no wall-clock deadline (Hypothesis' default is 200 ms per example): the property has
# nothing to do with speed, and on a loaded machine (the suite runs on a shared 2-core one)
# a descheduled example would fail, or be reported as Flaky, for that alone
@settings(deadline=None)
@given(words, words)
def test_edit_distance_is_a_metric(x: list[str], y: list[str]) -> None:
    assert word_edits(x, y) == word_edits(y, x)
    assert (word_edits(x, y) == 0) == (x == y)
    assert abs(len(x) - len(y)) <= word_edits(x, y) <= max(len(x), len(y))
