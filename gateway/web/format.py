"""How numbers, times and transcripts are shown on the pages (Jinja filters)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from markupsafe import Markup, escape

from ..store.search import search_terms


def mmss(ms: int | float | None) -> str:
    """Call offset as mm:ss (minutes keep counting past 59: 75:02)."""
    if ms is None or not isinstance(ms, (int, float)) or ms != ms or ms < 0:
        return "--:--"
    seconds = int(ms // 1000)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def duration(ms: int | float | None) -> str:
    """A call length: 42s, 3m 05s, 1h 02m."""
    if ms is None or not isinstance(ms, (int, float)) or ms != ms or ms < 0:
        return ""
    seconds = int(ms // 1000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"


def confidence(avg_logprob: float | None) -> str:
    """Whisper's mean token log-probability as a percentage (exp), the way people read certainty."""
    if avg_logprob is None or not isinstance(avg_logprob, (int, float)) or math.isnan(avg_logprob):
        return ""
    return f"{round(100 * math.exp(min(0.0, max(-20.0, avg_logprob))))}%"


def utc(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def party(uri: str | None) -> str:
    """The readable part of a SIP URI: the user (number) and host, no scheme or parameters."""
    if not uri:
        return ""
    text = uri.strip()
    if text.startswith("<") and ">" in text:
        text = text[1:text.index(">")]
    text = re.sub(r"^(sips?|tel):", "", text, flags=re.IGNORECASE)
    return text.split(";", 1)[0]


SOURCE_NAMES = {"sip": "SIP", "siprec": "SIPREC", "realtime": "Realtime", "rest": "REST", "twilio": "Twilio",
                "webrtc": "WebRTC"}


def source_name(kind: str | None) -> str:
    """How a kind of source is named on the pages (the kind itself when unknown)."""
    return SOURCE_NAMES.get(kind or "sip", kind or "")


def highlight(text: str | None, query: str | None) -> Markup:
    """``text`` escaped, with the words of ``query`` (and their prefixes' matches) in <mark>."""
    text = text or ""
    terms = search_terms(query or "")
    if not terms:
        return escape(text)
    pattern = re.compile("|".join(r"\b" + re.escape(t) + (r"\w*" if len(t) >= 3 else r"\b") for t in terms),
                         re.IGNORECASE)
    out: list[str] = []
    last = 0
    for match in pattern.finditer(text):
        out.append(str(escape(text[last:match.start()])))
        out.append(f"<mark>{escape(match.group(0))}</mark>")
        last = match.end()
    out.append(str(escape(text[last:])))
    return Markup("".join(out))


FILTERS = {"mmss": mmss, "duration": duration, "confidence": confidence, "utc": utc, "iso": iso,
           "party": party, "highlight": highlight, "source_name": source_name}
