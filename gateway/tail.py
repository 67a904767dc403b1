"""``earshot tail``: follow the event stream and print transcripts as they come."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import redis
from redis.exceptions import RedisError

from .events import CALL_ENDED, CALL_STARTED, DTMF, TURN_FINAL, TURN_PARTIAL, parse_fields


def format_event(event: dict[str, Any]) -> str | None:
    """One human line per event, or None for events this view skips."""
    kind = event.get("type")
    call = str(event.get("call_id", "?"))[:8]
    clock = str(event.get("time", ""))[11:23]
    if kind == CALL_STARTED:
        return f"{clock} {call} call started  {event.get('from')} -> {event.get('to')}"
    if kind == CALL_ENDED:
        return f"{clock} {call} call ended    ({event.get('reason')}, {event.get('duration_ms', 0) / 1000:.1f} s)"
    if kind == DTMF:
        return f"{clock} {call} dtmf {event.get('digit')}"
    if kind in (TURN_FINAL, TURN_PARTIAL):
        leg = event.get("leg", "")
        seq = event.get("turn")
        if kind == TURN_PARTIAL:
            return f"{clock} {call} {leg}#{seq} ...  {event.get('text', '')}"
        latency = event.get("latency_ms")
        suffix = f"  [{latency:.0f} ms]" if isinstance(latency, (int, float)) else ""
        return f"{clock} {call} {leg}#{seq} {event.get('text', '')}{suffix}"
    return None


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
                print(f"earshot tail: cannot read {stream} from {redis_url}: {exc}", file=sys.stderr)
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
                        event = parse_fields(fields)
                    except (ValueError, UnicodeDecodeError):
                        continue
                    if event.get("type") == TURN_PARTIAL and not partials:
                        continue
                    line = json.dumps(event) if as_json else format_event(event)
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
