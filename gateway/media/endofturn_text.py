"""Does a transcript read as unfinished? The words' half of semantic end-of-turn.

Smart Turn (gateway/media/endofturn.py) hears the sound of a turn only. On the
bench's calls with mid-sentence pauses it calls about half of those pauses
"complete" (bench/RESULTS.md, ``turn_latency``), often where the words so far
plainly go on: "Please enter your ...", "You have two ...", "There are
currently ...". The speculative final's transcript is ready at about the time
the model answers (it starts at the same pause, and the final cannot be
published before it anyway), so the turn policy also reads it: a "complete"
from the model ends the turn only if the text does not read as unfinished
(gateway/media/turn.py, ``semantic_text``).

The rules look at the end of the last sentence only and say *unfinished*
when it ends

* in a trailing mark: "...", "…", a comma, a dash, a colon or semicolon
  (Whisper writes "..." for speech that trails off);
* in a word that cannot end an English sentence, or very rarely does:
  articles and determiners ("the", "your"), the prepositions that are not
  also particles ("of", "to", "at", "with" ...; not "in", "on", "up", which
  end "logged in"), conjunctions ("and", "because", "if"), auxiliaries and
  the copula ("is", "have", "will"), subject pronouns ("I", "we"; not "you"
  or "it", which end "thank you", "do it"), fillers ("um", "uh"), and the
  IVR verbs that need an object ("press", "enter", "dial");
* in a number not after "press", "dial" or "option": a number still being
  read ("my account number is seven three ..."), a count before its noun
  ("you have two ... messages"); "press 1." is a whole instruction;
* in an "-ly" adverb right after an auxiliary ("there are currently ...",
  "was successfully ...");
* or when the whole transcript is one clause opening with "to" and no comma
  ("to leave a message ..."): a purpose clause waiting for its main clause.

What the rules cannot see: a prefix that is itself a whole sentence ("Please
enter a new extension. ... followed by pound") reads as finished, and it is.
Those pauses are left to the model and to ``semantic_max_silence_ms``.

A transcript without any punctuation (another ASR backend, a stub) is judged
by its last word only; an empty one is not judged (None).
"""

from __future__ import annotations

import re

__all__ = ["unfinished"]

_TRAILING = ("...", "…", ",", "-", "–", "—", ":", ";")
_CANNOT_END = frozenset("""
a an the this these those my your our their his her its some any every each
of to for at by with from into onto about than as via
and or but nor because so if when while although though unless whether
is are was were be been being am has have had do does did will would can could should shall may might must
i we they he she
um uh er erm hmm mm
press enter dial
""".split())
_AUXILIARY = frozenset("is are was were be been am has have had will would can could should".split())
_NUMBER_WORDS = frozenset("""
zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
""".split())
_NUMBER_COMPLETES = frozenset(("press", "dial", "option"))
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_WORD = re.compile(r"[a-z0-9']+")


def unfinished(text: str) -> str | None:
    """Why ``text`` reads as a sentence that goes on (a short reason), or None.

    None also for an empty transcript: no words, no evidence either way.
    """
    text = text.strip()
    if not text:
        return None
    if text.endswith(_TRAILING):
        return "trailing mark"
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    last = sentences[-1]
    words = _WORD.findall(last.lower())
    if not words:
        return None
    word = words[-1].strip("'")
    before = words[-2] if len(words) > 1 else ""
    if word in _CANNOT_END:
        return f"ends in {word!r}"
    if (word.isdigit() or word in _NUMBER_WORDS) and before not in _NUMBER_COMPLETES:
        return "ends in a number"
    if word.endswith("ly") and before in _AUXILIARY:
        return f"ends in {before!r} + adverb"
    if len(sentences) == 1 and words[0] == "to" and "," not in last:
        return "a 'to' clause alone"
    return None
