"""PCI redaction of transcript text, before any sink sees it (docs/redaction.md).

Sans-I/O: a :class:`Redactor` per leg is fed the leg's turn texts (partials and
finals) with the time, and answers what may be published: the text with card
numbers, CVVs, expiry dates and US SSNs replaced by ``[REDACTED:card]``,
``[REDACTED:cvv]``, ``[REDACTED:expiry]`` and ``[REDACTED:ssn]``, and how many
spans it replaced. The pipeline (gateway/pipeline.py) owns the clock and the
publishing; nothing here does I/O or knows about asyncio.

Why it holds finals back: a caller reads a card number in groups, and each
pause may end a turn, so "four one one one, one one one one" can be one final
and the rest of the number the next. Once a final is published it cannot be
taken back, so a final that ends with a digit run that might be the start of a
card number is held (``hold_s`` of silence; while the speaker is talking again,
until that turn's final, up to ``max_hold_s``; at most ``max_held`` finals) and read together with
the next final of the leg; both are then redacted as one text. A partial that
might be the start of a card number is not published at all (partials are
interim; the final follows). The digits of the last published final's trailing
run are kept too, so a number that completes after a release is still found
and the new part redacted.

The legs of one session share a :class:`CardContext`: an agent asking "can I
have your card number" on one leg makes the caller's digits on the other a card
context (a mis-heard number that fails the Luhn check is still redacted there,
and DTMF digits are masked).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

REDACT_MODES = ("pci", "off")

CARD, CVV, EXPIRY, SSN = "card", "cvv", "expiry", "ssn"
KINDS = (CARD, CVV, EXPIRY, SSN)

CONTEXT_S = 60.0  # a card word keeps the session's card context this long
EXPECT_S = 30.0  # "what is the security code?" makes the next 3-4 digits a CVV for this long
TAIL_S = 30.0  # the last published final's trailing digits join the next final for this long
MAX_TAIL = 18  # digits kept from that tail (a card number has at most 19)


def marker(kind: str) -> str:
    return f"[REDACTED:{kind}]"


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of a text that were replaced by ``marker(kind)``."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class Redacted:
    """A text as it may be published, how many spans were replaced, and where they were."""

    text: str
    count: int = 0
    spans: tuple[Span, ...] = ()


# -- words that carry digits

_DIGIT_WORDS = {"zero": "0", "oh": "0", "o": "0", "nought": "0", "nil": "0", "one": "1", "two": "2",
                "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_UNITS = {w: d for w, d in _DIGIT_WORDS.items() if d != "0"}
_TEENS = {"ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
          "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19"}
_TENS = {"twenty": "2", "thirty": "3", "forty": "4", "fourty": "4", "fifty": "5", "sixty": "6", "seventy": "7",
         "eighty": "8", "ninety": "9"}
_REPEAT = {"double": 2, "triple": 3}
# words said between digit groups that do not end a run of digits
_FILLERS = {"um", "umm", "uh", "uhh", "uhm", "er", "erm", "ah", "ahh", "hmm", "mm", "and", "dash", "slash"}
# punctuation that ends a run (an amount, a percentage), unlike - , . / which a recognizer puts between groups
_BREAKS = set("$€£¥%#@*=+<>()[]{}&")
_MONTHS = {m: i + 1 for i, m in enumerate(("january", "february", "march", "april", "may", "june", "july",
                                           "august", "september", "october", "november", "december"))}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})  # only read after an expiry word

# words that make a card context (single words, and pairs of words)
_CARD_WORDS = {"card", "cards", "credit", "debit", "visa", "mastercard", "amex", "discover", "diners", "jcb",
               "maestro", "unionpay", "cvv", "cvc", "cv2", "csc", "cvn", "expiry", "expiration", "expires", "expire",
               "exp", "pan"}
_CARD_PAIRS = {("master", "card"), ("american", "express"), ("long", "number"), ("security", "code")}
_CVV_WORDS = {"cvv", "cvc", "cv2", "csc", "cvn"}
_CVV_PAIRS = {("security", "code"), ("security", "number"), ("verification", "code"), ("verification", "number"),
              ("verification", "value"), ("digit", "code"), ("three", "digits"), ("3", "digits")}
_CVV_IN_CONTEXT = {"code", "security"}  # only while a card context is active
_EXPIRY_WORDS = {"expiry", "expiration", "expires", "expire", "expired", "exp"}
_EXPIRY_PAIRS = {("valid", "thru"), ("valid", "through"), ("valid", "until"), ("good", "thru"), ("good", "through")}
_SSN_WORDS = {"ssn"}
_SSN_PAIRS = {("social", "security"), ("social", "number")}

_TOKEN = re.compile(r"(?i:cv2)|[^\W\d_]+(?:'[^\W\d_]+)?|\d+|[^\w\s]")


@dataclass
class _Tok:
    start: int
    end: int
    kind: str  # "num", "sep", "fill", "word"
    text: str  # lowercased
    digits: str = ""


def _ascii_digits(word: str) -> str:
    """``word``'s digits as ASCII: a transcript may carry full-width, Arabic-Indic or
    superscript digits, which are still a card number to whoever reads them."""
    return "".join(str(unicodedata.digit(c)) for c in word)


def _tokens(text: str) -> list[_Tok]:
    raw = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
    out: list[_Tok] = []
    i = 0
    while i < len(raw):
        start, end, word = raw[i]
        low = word.lower()
        nxt = raw[i + 1][2].lower() if i + 1 < len(raw) else ""
        if word.isdigit():
            out.append(_Tok(start, end, "num", low, _ascii_digits(word)))
        elif low in _REPEAT and (nxt in _DIGIT_WORDS or (nxt.isdigit() and len(nxt) == 1)):
            digit = _DIGIT_WORDS.get(nxt) or _ascii_digits(nxt)
            out.append(_Tok(start, raw[i + 1][1], "num", low + " " + nxt, digit * _REPEAT[low]))
            i += 1
        elif low in _DIGIT_WORDS:
            out.append(_Tok(start, end, "num", low, _DIGIT_WORDS[low]))
        elif low in _TEENS:
            out.append(_Tok(start, end, "num", low, _TEENS[low]))
        elif low in _TENS:
            # "forty one", "forty-one": two digits; "forty" alone: 40
            j = i + 2 if nxt == "-" else i + 1
            unit = raw[j][2].lower() if j < len(raw) else ""
            if unit in _UNITS:
                out.append(_Tok(start, raw[j][1], "num", low, _TENS[low] + _UNITS[unit]))
                i = j
            else:
                out.append(_Tok(start, end, "num", low, _TENS[low] + "0"))
        elif low in _FILLERS:
            out.append(_Tok(start, end, "fill", low))
        elif not word[0].isalnum() and word not in _BREAKS:
            out.append(_Tok(start, end, "sep", low))
        else:
            out.append(_Tok(start, end, "word", low))
        i += 1
    return out


@dataclass
class _Run:
    """Digit-bearing tokens with only separators and fillers between them."""

    toks: list[int]  # indices into the token list
    digits: str
    bounds: list[int]  # digit offsets where a card number may start or end


def _runs(toks: list[_Tok]) -> list[_Run]:
    runs: list[_Run] = []
    current: list[int] = []

    def close() -> None:
        if current:
            digits, bounds = "", [0]
            for index in current:
                d = toks[index].digits
                if len(d) >= 8:  # a long unseparated string: a number may start or end anywhere in it
                    bounds.extend(range(len(digits) + 1, len(digits) + len(d)))
                digits += d
                bounds.append(len(digits))
            runs.append(_Run(list(current), digits, sorted(set(bounds))))
            current.clear()

    for index, tok in enumerate(toks):
        if tok.kind == "num":
            current.append(index)
        elif tok.kind == "word":
            close()
    close()
    return runs


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def plausible(digits: str) -> bool:
    """The number starts like a card of a network that issues numbers of its length (IIN ranges)."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if 2200 <= p4 <= 2204:
        return 16 <= n <= 19  # Mir
    if p2 in (36, 38, 39) or 300 <= p3 <= 305 or p4 == 3095:
        return 14 <= n <= 19  # Diners Club
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or p2 == 62:
        return 16 <= n <= 19  # Discover, UnionPay
    if p2 == 50 or 56 <= p2 <= 69:
        return 12 <= n <= 19  # Maestro
    if digits[0] == "1":
        return n == 15  # UATP
    return False


def _is_date(digits: str) -> bool:
    """MYY, MMYY, MYYYY or MMYYYY with a real month (and a 20xx year when it has four digits)."""
    n = len(digits)
    if n in (3, 5):
        month, year = int(digits[0]), digits[1:]
    elif n in (4, 6):
        month, year = int(digits[:2]), digits[2:]
    else:
        return False
    return 1 <= month <= 12 and (len(year) == 2 or year.startswith("20"))


def _is_ssn(digits: str) -> bool:
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return len(digits) == 9 and area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _card_window(run: _Run, context: bool) -> tuple[int, int] | None:
    """Digit offsets of the card number in the run: the whole run when it is one, else the
    longest (then first) window between group bounds; in a card context also a mis-heard one."""
    digits, n = run.digits, len(run.digits)

    def ok(d: str) -> bool:
        return luhn(d) and (context or plausible(d))

    if 13 <= n <= 19 and ok(digits):
        return 0, n
    best: tuple[int, int] | None = None
    for i in run.bounds:
        for j in run.bounds:
            if 13 <= j - i <= 19 and ok(digits[i:j]) and (best is None or j - i > best[1] - best[0]):
                best = (i, j)
    if best is None and ((context and n >= 13) or (13 <= n <= 19 and _major(digits))):
        # a number the recognizer got a digit wrong of (or dropped one): in a card context any
        # such run, elsewhere one that starts as the big four networks' numbers do
        return 0, n
    return best


def _major(digits: str) -> bool:
    """Visa, Mastercard, American Express or Discover by its first digits, whatever its length."""
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    return digits[0] == "4" or 51 <= p2 <= 55 or 2221 <= p4 <= 2720 or p2 in (34, 37) or p4 == 6011 \
        or p2 == 65 or 644 <= p3 <= 649


@dataclass
class _Found:
    spans: list[Span]
    card_words: bool = False
    card_at_end: bool = False  # a card number ends the text: its CVV or expiry may come next
    want_cvv: bool = False  # a CVV question with no digits after it yet
    want_expiry: bool = False
    want_ssn: bool = False
    used_cvv: bool = False
    used_expiry: bool = False
    used_ssn: bool = False
    trailing: str = ""  # digits of an unredacted run that ends the text


def _span_of(toks: list[_Tok], run: _Run, lo: int, hi: int, kind: str) -> Span:
    """The characters of the run's tokens that hold digits [lo, hi) (whole tokens)."""
    offset, first, last = 0, None, None
    for index in run.toks:
        size = len(toks[index].digits)
        if offset < hi and offset + size > lo:
            first = index if first is None else first
            last = index
        offset += size
    assert first is not None and last is not None
    return Span(toks[first].start, toks[last].end, kind)


def _split_rest(toks: list[_Tok], run: _Run, lo: int) -> list[Span]:
    """What follows a card number in the same run: an expiry date, a CVV, or more of the number."""
    rest = run.digits[lo:]
    if not rest:
        return []
    n = len(run.digits)
    if len(rest) in (3, 4) and not (len(rest) == 4 and _is_date(rest)):
        return [_span_of(toks, run, lo, n, CVV)]
    if _is_date(rest):
        return [_span_of(toks, run, lo, n, EXPIRY)]
    for cut in run.bounds:  # an expiry date, then a CVV
        if lo < cut < n and _is_date(run.digits[lo:cut]) and len(run.digits[cut:]) in (3, 4):
            return [_span_of(toks, run, lo, cut, EXPIRY), _span_of(toks, run, cut, n, CVV)]
    return [_span_of(toks, run, lo, n, CARD)]


def _words(toks: list[_Tok], index: int) -> tuple[str, str]:
    prev = toks[index - 1].text if index > 0 and toks[index - 1].kind in ("word", "num") else ""
    return prev, toks[index].text


def _analyse(text: str, *, context: bool, want_cvv: bool = False, want_expiry: bool = False,
             want_ssn: bool = False, editable_from: int = 0) -> _Found:
    """Every span to redact in ``text`` (only spans reaching past ``editable_from`` count for
    the expectations carried in ``want_*``)."""
    toks = _tokens(text)
    found = _Found([])
    # keywords, by token index
    cvv_at: list[int] = []
    expiry_at: list[int] = []
    ssn_at: list[int] = []
    for index, tok in enumerate(toks):
        if tok.kind not in ("word", "num"):
            continue
        prev, word = _words(toks, index)
        pair = (prev, word)
        if word in _CARD_WORDS or pair in _CARD_PAIRS:
            found.card_words = True
        if word in _CVV_WORDS or pair in _CVV_PAIRS:
            cvv_at.append(index)
        if word in _EXPIRY_WORDS or pair in _EXPIRY_PAIRS:
            expiry_at.append(index)
        if word in _SSN_WORDS or pair in _SSN_PAIRS:
            ssn_at.append(index)
    context = context or found.card_words
    if context:
        cvv_at += [i for i, t in enumerate(toks) if t.kind == "word" and t.text in _CVV_IN_CONTEXT]
    runs = _runs(toks)
    claimed: set[int] = set()  # runs already redacted

    def near(keys: list[int], run: _Run, reach: int = 8) -> bool:
        first = run.toks[0]
        return any(0 < first - k <= reach and not any(r.toks[0] < first and r.toks[0] > k for r in runs)
                   for k in keys)

    cards: list[int] = []  # token index of each card number's last token
    for number, run in enumerate(runs):
        window = _card_window(run, context)
        if window is not None:
            lo, hi = window
            found.spans.append(_span_of(toks, run, 0, hi, CARD))  # digits read before it go too
            found.spans += _split_rest(toks, run, hi)
            claimed.add(number)
            cards.append(run.toks[-1])
            context = True
    for number, run in enumerate(runs):
        if number in claimed:
            continue
        digits, first = run.digits, run.toks[0]
        editable = toks[first].end > editable_from
        # the first run after a card number, close to it: its expiry date or CVV
        after_card = number > 0 and number - 1 in claimed and runs[number - 1].toks[-1] in cards \
            and first - runs[number - 1].toks[-1] <= 12
        kind = None
        if _is_ssn(digits) and len(run.toks) == 3 and [len(toks[i].digits) for i in run.toks] == [3, 2, 4] \
                and all(text[toks[a].end:toks[b].start] == "-" for a, b in zip(run.toks, run.toks[1:])):
            kind = SSN  # 123-45-6789: the dashed form needs no context
        elif len(digits) == 9 and _is_ssn(digits) and (near(ssn_at, run, 12) or (want_ssn and editable)):
            kind = SSN
            found.used_ssn = found.used_ssn or not near(ssn_at, run, 12)
        elif context and _is_date(digits) and near(expiry_at, run):
            kind = EXPIRY
        elif len(digits) in (3, 4) and near(cvv_at, run):
            kind = CVV
        elif context and editable and want_expiry and _is_date(digits) and not (want_cvv and len(digits) == 3):
            kind, found.used_expiry = EXPIRY, True
        elif context and editable and want_cvv and len(digits) in (3, 4):
            kind, found.used_cvv = CVV, True
        elif after_card and len(digits) in (3, 4):
            kind = EXPIRY if len(digits) == 4 and _is_date(digits) else CVV
        elif after_card and _is_date(digits):
            kind = EXPIRY
        if kind is not None:
            found.spans.append(_span_of(toks, run, 0, len(digits), kind))
            claimed.add(number)
    # month names after an expiry word: "expires April twenty twenty seven"
    for k in expiry_at:
        for index in range(k + 1, min(k + 6, len(toks))):
            tok = toks[index]
            if tok.kind == "word" and tok.text in _MONTHS:
                year = next((r for r in runs if r.toks[0] > index and r.toks[0] - index <= 3), None)
                if year is not None and len(year.digits) in (2, 4):
                    found.spans.append(Span(tok.start, toks[year.toks[-1]].end, EXPIRY))
                break
    # questions whose answer has not come yet
    def pending(keys: list[int]) -> bool:
        return bool(keys) and not any(r.toks[0] > keys[-1] for r in runs)

    found.want_cvv = pending(cvv_at)
    found.want_expiry = pending(expiry_at)
    found.want_ssn = pending(ssn_at)
    found.card_words = found.card_words or bool(cards)
    if runs and not any(t.kind == "word" for t in toks[runs[-1].toks[-1] + 1:]):
        if len(runs) - 1 in claimed:
            found.card_at_end = runs[-1].toks[-1] in cards
        else:
            found.trailing = runs[-1].digits
    found.spans = _merge(found.spans)
    return found


def _merge(spans: Iterable[Span]) -> list[Span]:
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if out and span.start < out[-1].end:
            if span.end > out[-1].end:
                out[-1] = Span(out[-1].start, span.end, out[-1].kind)
            continue
        out.append(span)
    return out


def apply(text: str, spans: Iterable[Span]) -> Redacted:
    """``text`` with each span replaced by its marker."""
    parts, pos, kept = [], 0, []
    for span in sorted(spans, key=lambda s: s.start):
        parts.append(text[pos:span.start])
        parts.append(marker(span.kind))
        pos = span.end
        kept.append(span)
    parts.append(text[pos:])
    return Redacted("".join(parts), len(kept), tuple(kept))


def redact(text: str, *, context: bool = False) -> Redacted:
    """One text on its own (no turns before or after it): what a final would become."""
    return apply(text, _analyse(text, context=context).spans)


# -- words with timestamps (REST verbose_json)


def redact_words(words: Iterable[tuple[str, float, float, float]], spans: Iterable[Span]
                 ) -> list[tuple[str, float, float, float]]:
    """(word, start, end, probability) items whose concatenation is the text ``spans`` are in, with
    the words under each span replaced by one: the marker, from the first one's start to the last
    one's end (the least probability), so word timestamps never spell what the text hides."""
    out: list[tuple[str, float, float, float]] = []
    ordered = sorted(spans, key=lambda s: s.start)
    pos = 0
    current: tuple[Span, str, float, float, float] | None = None
    for word, start, end, probability in words:
        lo, hi = pos, pos + len(word)
        pos = hi
        span = next((s for s in ordered if s.start < hi and s.end > lo), None)
        if current is not None and (span is None or current[0] is not span):
            out.append(current[1:])
            current = None
        if span is None:
            out.append((word, start, end, probability))
        elif current is None:
            lead = word[: len(word) - len(word.lstrip())]
            current = (span, lead + marker(span.kind), start, end, probability)
        else:
            current = (span, current[1], current[2], end, min(current[4], probability))
    if current is not None:
        out.append(current[1:])
    return out


# -- the session's card context, shared by its legs


@dataclass
class CardContext:
    """Whether card details are being given in a session now: card words on any leg, a card
    number just found, or a question ("the security code?") still waiting for its digits."""

    context_s: float = CONTEXT_S
    until: float = float("-inf")
    cvv_until: float = float("-inf")
    expiry_until: float = float("-inf")
    ssn_until: float = float("-inf")

    def active(self, now: float) -> bool:
        return now < self.until

    def mark(self, now: float) -> None:
        self.until = max(self.until, now + self.context_s)

    def wants(self, now: float) -> dict[str, bool]:
        return {"want_cvv": now < self.cvv_until, "want_expiry": now < self.expiry_until,
                "want_ssn": now < self.ssn_until}

    def dtmf(self, digit: str, now: float) -> str | None:
        """A DTMF digit as it may be published: None (as it is), or ``*`` while a card context is
        active (the count of keys pressed stays visible, not which)."""
        if self.active(now) and digit not in ("*", "#", "flash"):
            self.mark(now)  # a card number typed in keeps the context
            return "*"
        return None

    def update(self, found: _Found, now: float) -> None:
        if found.card_words:
            self.mark(now)
        for name, used, wanted in (("cvv_until", found.used_cvv, found.want_cvv),
                                   ("expiry_until", found.used_expiry, found.want_expiry),
                                   ("ssn_until", found.used_ssn, found.want_ssn)):
            if wanted:
                setattr(self, name, now + EXPECT_S)
            elif used:
                setattr(self, name, float("-inf"))
        if found.card_at_end:
            self.cvv_until = max(self.cvv_until, now + EXPECT_S)
            self.expiry_until = max(self.expiry_until, now + EXPECT_S)


# -- per leg

T = TypeVar("T")


@dataclass(frozen=True)
class Release(Generic[T]):
    """A final that may be published now: the caller's ``item``, its text redacted, and the spans."""

    item: T
    text: str
    count: int
    spans: tuple[Span, ...] = ()


@dataclass
class _Held(Generic[T]):
    item: T
    text: str


_JOIN = " \n "  # between the texts of joined turns: whitespace, so digit runs continue across it


@dataclass
class Redactor(Generic[T]):
    """One leg's redaction: finals in (with the caller's item for each), finals out (maybe later).

    ``final`` answers the finals that may be published now, in order: none while a final
    is held back, several when the next final releases earlier ones. ``due`` releases
    held finals whose time is up; ``deadline`` says when that is; ``flush`` releases all
    (the leg ends). ``partial`` answers the redacted partial, or None: hold it back.
    """

    context: CardContext = field(default_factory=CardContext)
    hold_s: float = 3.0
    max_hold_s: float = 25.0
    max_held: int = 3
    _held: list[_Held[T]] = field(default_factory=list)
    _held_at: float = 0.0
    _deadline: float | None = None
    _tail: str = ""  # trailing digits of the last published final
    _tail_at: float = float("-inf")
    redactions: int = 0  # spans replaced on this leg so far

    # -- state
    @property
    def deadline(self) -> float | None:
        return self._deadline if self._held else None

    @property
    def holding(self) -> int:
        return len(self._held)

    def speech(self, now: float) -> None:
        """The leg's speaker started a new turn: held finals wait for its final, up to ``max_hold_s``
        from now (a turn is at most ``max_turn_s`` long, then ASR)."""
        if self._held:
            self._deadline = max(self._deadline or now, now + max(self.max_hold_s, self.hold_s))

    def _parts(self, texts: list[str], now: float) -> tuple[str, list[int]]:
        """The texts joined after the published tail; the offset of each text in the joined one."""
        tail = " ".join(self._tail) if now - self._tail_at < TAIL_S else ""
        joined, offsets = tail, []
        for text in texts:
            joined += _JOIN
            offsets.append(len(joined))
            joined += text
        return joined, offsets

    def _split(self, texts: list[str], offsets: list[int], spans: list[Span]) -> list[Redacted]:
        out = []
        for text, offset in zip(texts, offsets):
            mine = [Span(max(s.start, offset) - offset, min(s.end, offset + len(text)) - offset, s.kind)
                    for s in spans if s.end > offset and s.start < offset + len(text)]
            out.append(apply(text, mine))
        return out

    def _scan(self, texts: list[str], now: float) -> tuple[_Found, list[Redacted]]:
        joined, offsets = self._parts(texts, now)
        found = _analyse(joined, context=self.context.active(now), editable_from=offsets[0] if offsets else 0,
                         **self.context.wants(now))
        return found, self._split(texts, offsets, found.spans)

    def _might_continue(self, found: _Found, now: float) -> bool:
        """The text ends with digits that the next turn might complete into a card number."""
        n = len(found.trailing)
        return 1 <= n <= 18 and (n >= 4 or self.context.active(now) or found.card_words)

    # -- turns in
    def final(self, text: str, now: float, item: T) -> list[Release[T]]:
        texts = [h.text for h in self._held] + [text]
        found, redacted = self._scan(texts, now)
        if self._might_continue(found, now) and len(self._held) < self.max_held and self.hold_s > 0:
            if not self._held:
                self._held_at = now
            self._deadline = now + self.hold_s  # each final that joins waits hold_s for the next
            self._held.append(_Held(item, text))
            if found.card_words:
                self.context.mark(now)
            return []
        items = [h.item for h in self._held] + [item]
        self._held = []
        return self._release(items, redacted, found, now)

    def _release(self, items: list[T], redacted: list[Redacted], found: _Found, now: float) -> list[Release[T]]:
        self.context.update(found, now)
        if found.trailing:
            self._tail, self._tail_at = found.trailing[-MAX_TAIL:], now
        else:
            self._tail, self._tail_at = "", float("-inf")
        out = [Release(item, r.text, r.count, r.spans) for item, r in zip(items, redacted)]
        self.redactions += sum(r.count for r in redacted)
        return out

    def due(self, now: float) -> list[Release[T]]:
        """Held finals whose time is up (all of them, in order); [] before ``deadline``."""
        if not self._held or self._deadline is None or now < self._deadline:
            return []
        return self.flush(now)

    def flush(self, now: float) -> list[Release[T]]:
        """Every held final, now (the leg ends, or their time is up)."""
        if not self._held:
            return []
        texts = [h.text for h in self._held]
        items = [h.item for h in self._held]
        self._held = []
        found, redacted = self._scan(texts, now)
        return self._release(items, redacted, found, now)

    def partial(self, text: str, now: float) -> Redacted | None:
        """The partial as it may be published, or None: held back (it might be the start of a card
        number, or a final of the leg is held). Changes no state but the card context."""
        if self._held:
            return None
        found, redacted = self._scan([text], now)
        if 1 <= len(found.trailing) <= 18:
            return None  # any digits at its end may be the start of a number: the final decides
        if found.card_words:
            self.context.mark(now)
        return redacted[0]
