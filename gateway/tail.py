"""``earshot tail``: follow the event stream and print transcripts as they come."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

import redis
from redis.exceptions import RedisError

from .config import mask_url
from .events import (
    CallEnded,
    CallStarted,
    Dtmf,
    Event,
    EventError,
    TurnFinal,
    TurnPartial,
    parse_fields,
)

# C0 and C1 control characters, DEL, the line/paragraph separators and the bidi marks
# (gateway/identity.py): a caller's From header or a transcript must not move the cursor,
# recolour the terminal or reorder what the operator reads. Ingress already removes them;
# this covers events from older producers, escaped so the operator sees they were there.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff"
                      "\ud800-\udfff]")


def clean(value: object) -> str:
    """``value`` as text safe to print on a terminal: control characters as ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100
                        else f"\\u{ord(m.group(0)):04x}", str(value))


def describe_source(event: Event) -> str:
    """Who is on the session: SIP's From -> To, else the source's kind and ids."""
    source = event.call.source
    if source.is_sip:
        return f"{event.call.from_uri} -> {event.call.to_uri}"
    ids = " ".join(f"{name}={value}" for name, value in source.ids if value)
    return f"{source.kind}{' ' + ids if ids else ''}"


def format_event(event: Event | dict[str, Any]) -> str | None:
    """One human line per event, or None for events this view skips (and for invalid ones)."""
    if not isinstance(event, Event):
        try:
            event = Event.from_wire(event)
        except EventError:
            return None
    payload = event.payload
    call = event.call_id[:8]
    clock = event.time.isoformat(timespec="milliseconds")[11:23]
    if isinstance(payload, CallStarted):
        line = f"{clock} {call} call started  {describe_source(event)}"
    elif isinstance(payload, CallEnded):
        line = f"{clock} {call} call ended    ({payload.reason}, {(payload.duration_ms or 0) / 1000:.1f} s)"
    elif isinstance(payload, Dtmf):
        line = f"{clock} {call} dtmf {payload.digit}"
    elif isinstance(payload, TurnPartial):
        line = f"{clock} {call} {event.leg}#{payload.turn} ...  {payload.text}"
    elif isinstance(payload, TurnFinal):
        text = payload.text or (f"[{payload.error}]" if payload.error else "")
        suffix = f"  [{payload.latency_ms:.0f} ms]" if payload.latency_ms is not None else ""
        line = f"{clock} {call} {event.leg}#{payload.turn} {text}{suffix}"
    else:
        return None
    return clean(line)


def tail(
    redis_url: str,
    stream: str,
    *,
    from_start: bool = False,
    partials: bool = False,
    as_json: bool = False,
    count: int | None = None,
    block_ms: int = 1000,
    out: TextIO = sys.stdout,
    idle_exit_s: float | None = None,
) -> int:
    """Print events until interrupted (or until ``count`` were printed). Returns an exit code."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    last_id = "0-0" if from_start else "$"
    printed = 0
    idle = 0.0
    try:
        while count is None or printed < count:
            try:
                reply = client.xread({stream: last_id}, block=block_ms, count=100)
            except RedisError as exc:
                print(f"earshot tail: cannot read {stream} from {mask_url(redis_url)}: {clean(exc)}", file=sys.stderr)
                return 1
            if not reply:
                idle += block_ms / 1000
                if idle_exit_s is not None and idle >= idle_exit_s:
                    return 0
                continue
            idle = 0.0
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id
                    try:
                        body = parse_fields(fields)
                        event = Event.from_wire(body)
                    except (ValueError, UnicodeDecodeError) as exc:  # EventError is a ValueError
                        print(f"earshot tail: skipping entry {clean(_text(entry_id))}: {clean(exc)}",
                              file=sys.stderr)
                        continue
                    if isinstance(event.payload, TurnPartial) and not partials:
                        continue
                    # JSON as it was published (json.dumps escapes control characters)
                    line = json.dumps(body) if as_json else format_event(event)
                    if line is None:
                        continue
                    print(line, file=out, flush=True)
                    printed += 1
                    if count is not None and printed >= count:
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
