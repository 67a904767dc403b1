"""RFC 4028 session timers, as a UAS that never refreshes (sans-I/O, pure functions).

A session timer is how a dialog survives a lost BYE: the caller re-sends its
INVITE or UPDATE every interval, and the side that stops hearing refreshes
ends the call. Earshot only answers calls and sends no re-INVITEs, so it
always makes the caller the refresher (``refresher=uac``) and only watches
the deadline. A caller that does not say ``Supported: timer`` gets no
session timer (it could not refresh it); ``max_call_s`` still bounds its call.

:func:`negotiate` reads a dialog-creating or refreshing request and returns
the interval to grant, a :class:`TooSmall` verdict (answer 422 with
``Min-SE``), or None (no timer); :func:`response_headers` writes the 2xx
headers and :func:`bye_at` the moment to give up on a refresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sip.message import Headers

__all__ = ["RFC_MIN_SE", "SessionTimer", "TooSmall", "bye_at", "negotiate", "response_headers"]

#: The smallest Min-SE RFC 4028 allows (section 4).
RFC_MIN_SE = 90


@dataclass(frozen=True)
class SessionTimer:
    """The interval granted; the caller refreshes (we never do)."""

    interval: int
    refresher: str = "uac"


@dataclass(frozen=True)
class TooSmall:
    """The request asked for less than our minimum: answer 422 with ``Min-SE: min_se``."""

    min_se: int


def _delta(value: str | None) -> int | None:
    """The delta-seconds of a Session-Expires / Min-SE value; None if absent or unreadable."""
    if not value:
        return None
    text = value.split(";", 1)[0].strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:  # "²".isdigit(), but int() refuses it
        return None
    return int(text)


def negotiate(headers: Headers, *, interval: int, min_se: int) -> SessionTimer | TooSmall | None:
    """What to grant a request with these headers (RFC 4028 section 9).

    ``interval``: the longest session interval we grant (and the one we pick
    when the caller proposes none); ``min_se``: the shortest we accept (the
    settings keep it at or above :data:`RFC_MIN_SE`).
    """
    supported = any(tag.strip().lower() == "timer" for tag in headers.get_all("supported"))
    required = any(tag.strip().lower() == "timer" for tag in headers.get_all("require"))
    if not (supported or required):
        return None  # the caller cannot refresh: no timer (a proxy's Session-Expires is ignored)
    floor = max(min_se, _delta(headers.get("min-se")) or 0)
    asked = _delta(headers.get("session-expires"))
    if asked is None:
        return SessionTimer(max(interval, floor))
    if asked < min_se:
        return TooSmall(min_se)
    # a UAS may shorten the interval, never below the request's Min-SE (section 9)
    return SessionTimer(max(min(asked, interval), floor))


def response_headers(timer: SessionTimer) -> list[tuple[str, str]]:
    """Headers of the 2xx that grants ``timer``: Require obliges the caller to refresh."""
    return [("Session-Expires", f"{timer.interval};refresher={timer.refresher}"), ("Require", "timer")]


def bye_at(granted_at: float, timer: SessionTimer) -> float:
    """When to end the call if no refresh came: RFC 4028 section 10 recommends the BYE
    at expiry minus the smaller of 32 seconds and a third of the interval."""
    return granted_at + timer.interval - min(32.0, timer.interval / 3)
