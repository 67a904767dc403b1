"""Caller-controlled strings made safe once, where they enter Earshot.

A SIP From, To or Call-ID, a Twilio parameter or an uploaded file's name is
chosen by whoever sends it. Left raw, one bad value breaks every consumer
downstream: a byte that is not UTF-8 (the SIP parser keeps it as a lone
surrogate, ``surrogateescape``) cannot be encoded by the JSON responses, the
HTML pages or the SQL drivers; a value longer than the event schema's limit
makes every event of the call invalid; an ESC sequence recolours or rewrites
the terminal of an operator running ``earshot tail``.

So every ingest passes such strings through :func:`identity` (or
:func:`safe_text` with its own limit) before they reach a session, an event or
a log line, and nothing downstream has to guess:

* bytes that are not UTF-8 (and lone surrogates) become U+FFFD;
* control characters are removed: C0 (tab, CR and LF included), DEL, C1
  (ESC-less CSI is C1 too), the line and paragraph separators, and the bidi
  embedding/override/isolate marks that make text display in another order
  than it is stored (CVE-2021-42574, "Trojan Source");
* the result is capped at a stated length (:data:`MAX_IDENTITY` for SIP
  identities), a cut value ending in U+2026 so a reader sees it was cut.

Sinks that print to a terminal still escape what they print (``earshot tail``),
because events written by older versions, or by other producers, were not
cleaned.
"""

from __future__ import annotations

import re
from typing import Any

# Longest SIP identity kept (From/To URI, Call-ID), in characters. Real ones are far
# shorter (a URI with parameters rarely passes 200); the event schema takes 2048, so a
# capped value always fits an event and the store.
MAX_IDENTITY = 512

ELLIPSIS = "\u2026"
REPLACEMENT = "\ufffd"

_SURROGATES = re.compile("[\ud800-\udfff]")
# C0, DEL, C1; LINE/PARAGRAPH SEPARATOR; ARABIC LETTER MARK; LRM/RLM; LRE..RLO
# (embeddings and overrides); LRI..PDI (isolates); BOM/ZWNBSP
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def safe_text(value: str | bytes | None, limit: int) -> str:
    """``value`` as valid UTF-8 text with no control characters, at most ``limit`` characters.

    ``bytes`` are decoded as UTF-8 with each invalid byte replaced; a ``str``
    that carries lone surrogates (``surrogateescape`` from a parser) gets U+FFFD
    for each. Idempotent: a cleaned value is returned unchanged.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "replace")
    else:
        text = _SURROGATES.sub(REPLACEMENT, str(value))
    text = _CONTROLS.sub("", text)
    if len(text) > limit:
        text = text[:limit - 1] + ELLIPSIS
    return text


def identity(value: str | bytes | None) -> str:
    """A SIP identity string (From/To URI, Call-ID) cleaned and capped at :data:`MAX_IDENTITY`."""
    return safe_text(value, MAX_IDENTITY)


def is_safe(value: str, limit: int) -> bool:
    """True when ``value`` is what :func:`safe_text` would make of it."""
    return safe_text(value, limit) == value


# the identity fields of an event's wire form (docs/events.md)
EVENT_IDENTITY_FIELDS = ("from", "to", "sip_call_id")


def clean_event_body(body: Any) -> Any:
    """An event's decoded JSON made safe for a sink (the store, the dashboard).

    For events that were not cleaned at ingress (written by an older version or
    another producer): the SIP identity fields go through :func:`identity`, and
    every lone surrogate anywhere (JSON can carry ``"\\udcff"``) becomes U+FFFD,
    so one such event cannot make its call's events fail in an encoder. Anything
    else is left for the schema to judge.
    """
    body = _without_surrogates(body)
    if isinstance(body, dict):
        for key in EVENT_IDENTITY_FIELDS:
            if isinstance(body.get(key), str):
                body[key] = identity(body[key])
    return body


def _without_surrogates(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _SURROGATES.sub(REPLACEMENT, value)
    if depth > 32:  # deeper than any event; the schema refuses it anyway
        return value
    if isinstance(value, dict):
        return {_without_surrogates(k, depth + 1): _without_surrogates(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v, depth + 1) for v in value]
    return value
