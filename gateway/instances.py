"""Gateway instances: who is alive, draining or lost, and the gateway-lost sweep.

Every ``earshot run`` writes its heartbeat (:class:`gateway.presence.Heartbeat`)
to a key with a TTL and to the registry hash ``<prefix>:gateways`` (no TTL): the
key says "alive now", the registry remembers that an instance existed and when
it was last seen. An instance that stopped cleanly removes itself; one killed
(``kill -9``, a lost box) stays, and once it has been silent longer than
``gateway_lost_after_s`` it is *lost*.

A lost gateway's calls never get their ``call.ended``. :class:`GatewayLostSweep`
(run by every persister) finds them in the store (``calls.gateway``, from
``call.started``'s ``gateway``) and publishes a ``call.ended`` with reason
``gateway-lost`` for each, to the events stream and the call's stream, so every
consumer sees it, and the persister stores it like any other. Exactly once: the
event_id is ``<call_id>:gateway-lost`` and one Lua script writes it only if its
marker key was not set yet (two persisters racing write it once), and not at all
if the call's own stream already ends with a ``call.ended`` (the gateway's
own, not stored yet).

An instance with a fixed ``instance_id`` that is killed and restarted within the
timeout is never lost, but its earlier run's calls are: the calls of a live
instance answered before its current run started are ended the same way (dated
at that start).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from .events import CALL_ENDED, CallEnded, CallInfo, Event, Source

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

__all__ = ["ALIVE", "DRAINING", "GATEWAY_LOST", "LOST", "SILENT", "GatewayLostSweep", "InstanceView", "OpenCall",
           "classify", "gateway_lost_event", "read_instances", "registry_key"]

GATEWAY_LOST = "gateway-lost"  # call.ended reason (docs/events.md)
ALIVE, DRAINING, SILENT, LOST = "alive", "draining", "silent", "lost"
MARKER_TTL_S = 7 * 86_400  # how long the "already published" marker of a call is kept
FORGET_LOST_AFTER_S = 86_400  # a lost instance with no open call left leaves the registry this long after


def registry_key(prefix: str) -> str:
    """The hash of every gateway's last heartbeat (field: its heartbeat key; value: the JSON body)."""
    return f"{prefix}:gateways"


def marker_key(prefix: str, call_id: str) -> str:
    return f"{prefix}:gateway-lost:{call_id}"


@dataclass(frozen=True)
class InstanceView:
    """One gateway instance as the registry last saw it, and what that makes it now."""

    instance: str
    state: str  # alive, draining, silent (missed heartbeats, not lost yet) or lost
    last_seen: float  # wall clock of its last heartbeat
    age_s: float
    host: str | None = None
    sip_port: int | None = None
    http_port: int | None = None
    version: str | None = None
    started_at: float | None = None
    active_calls: int | None = None
    draining: bool = False
    field: str = ""  # its registry field (the heartbeat key)

    def to_dict(self) -> dict[str, Any]:
        return {"instance": self.instance, "state": self.state, "last_seen": self.last_seen,
                "heartbeat_age_s": round(self.age_s, 1), "host": self.host, "sip_port": self.sip_port,
                "http_port": self.http_port, "version": self.version, "started_at": self.started_at,
                "active_calls": self.active_calls, "draining": self.draining}


def classify(body: dict[str, Any], now: float, heartbeat_s: float, lost_after_s: float,
             field: str = "") -> InstanceView | None:
    """A registry body -> its view; None when it is not a gateway heartbeat (no instance or time)."""
    instance, seen = body.get("instance"), body.get("heartbeat")
    if not isinstance(instance, str) or not instance or not isinstance(seen, (int, float)):
        return None
    age = max(0.0, now - float(seen))
    draining = bool(body.get("draining"))
    if age > lost_after_s:
        state = LOST
    elif age > 3 * heartbeat_s:  # its key has expired: missed heartbeats, not lost yet
        state = SILENT
    else:
        state = DRAINING if draining else ALIVE

    def num(name: str) -> int | None:
        value = body.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    started = body.get("started")
    return InstanceView(instance=instance, state=state, last_seen=float(seen), age_s=age,
                        host=body.get("host") if isinstance(body.get("host"), str) else None,
                        sip_port=num("sip_port"), http_port=num("http_port"),
                        version=body.get("version") if isinstance(body.get("version"), str) else None,
                        started_at=float(started) if isinstance(started, (int, float)) else None,
                        active_calls=num("active_calls"), draining=draining, field=field)


async def read_instances(client: Any, prefix: str, *, heartbeat_s: float, lost_after_s: float,
                         now: float | None = None) -> list[InstanceView]:
    """Every gateway in the registry, sorted by id; unreadable entries are skipped."""
    now = time.time() if now is None else now
    out = []
    for field, raw in (await client.hgetall(registry_key(prefix))).items():
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, dict):
            view = classify(body, now, heartbeat_s, lost_after_s,
                            field.decode() if isinstance(field, bytes) else str(field))
            if view is not None:
                out.append(view)
    return sorted(out, key=lambda v: v.instance)


@dataclass(frozen=True)
class OpenCall:
    """What the store knows of a call with no call.ended: enough to write its call.ended."""

    call_id: str
    sip_call_id: str
    from_uri: str
    to_uri: str
    tags: tuple[str, ...]
    source_kind: str
    source_ids: tuple[tuple[str, Any], ...]
    answered_at: datetime | None
    turns: int
    dtmf: int


def gateway_lost_event(call: OpenCall, last_seen: float) -> Event:
    """The synthetic call.ended of a lost gateway's call, dated at its last heartbeat."""
    info = CallInfo(call_id=call.call_id, sip_call_id=call.sip_call_id, from_uri=call.from_uri,
                    to_uri=call.to_uri, tags=call.tags, source=Source(call.source_kind, call.source_ids))
    duration = None
    if call.answered_at is not None:
        duration = max(0, round((last_seen - call.answered_at.timestamp()) * 1000))
    payload = CallEnded(reason=GATEWAY_LOST, duration_ms=duration, turns=call.turns, dtmf=call.dtmf)
    return Event(CALL_ENDED, info, 0, payload, created_at=last_seen, event_id=f"{call.call_id}:{GATEWAY_LOST}")


def open_calls(sessions: sessionmaker[Session], instance: str, before: float | None = None,
               limit: int = 1000) -> list[OpenCall]:
    """The store's calls of ``instance`` without call.ended (runs in a worker thread);
    ``before``: only those answered before this wall-clock time (an earlier run's)."""
    from sqlalchemy import select

    from .store.models import CALL_LIVE, Call

    query = select(Call).where(Call.gateway == instance, Call.status == CALL_LIVE)
    if before is not None:
        query = query.where(Call.answered_at < datetime.fromtimestamp(before, timezone.utc))
    with sessions() as session:
        rows = session.scalars(query.order_by(Call.started_at).limit(limit))
        return [OpenCall(call_id=c.call_id, sip_call_id=c.sip_call_id or "", from_uri=c.from_uri or "",
                         to_uri=c.to_uri or "", tags=tuple(c.tags or ()), source_kind=c.source_kind or "sip",
                         source_ids=tuple((str(k), v) for k, v in (c.source_ids or {}).items()),
                         answered_at=c.answered_at, turns=c.turn_count or 0, dtmf=c.dtmf_count or 0)
                for c in rows]


# KEYS: marker, events stream, call stream; ARGV: marker ttl, call maxlen, call ttl, event_id, type, call_id, data.
# Returns 1 when written, 0 when already written (marker) or the call's stream already ends with call.ended.
_PUBLISH_ONCE = """
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if last[1] then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'type' and f[i + 1] == 'call.ended' then return 0 end
  end
end
if not redis.call('SET', KEYS[1], ARGV[4], 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'event_id', ARGV[4], 'type', ARGV[5], 'call_id', ARGV[6], 'data', ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'event_id', ARGV[4], 'type', ARGV[5],
           'call_id', ARGV[6], 'data', ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""


class GatewayLostSweep:
    """Ends the open calls of lost gateways; every persister runs one, racing is harmless."""

    def __init__(self, prefix: str, *, heartbeat_s: float, lost_after_s: float,
                 call_maxlen: int = 2000, call_ttl_s: int = 86_400) -> None:
        self.prefix = prefix
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.call_maxlen = call_maxlen
        self.call_ttl_s = call_ttl_s
        #: how often a persister sweeps: a lost call ends at most this long after the timeout
        self.interval_s = min(30.0, max(0.5, lost_after_s / 4))
        self.published = 0  # call.ended events this sweep wrote (metrics, tests)
        self.skipped = 0  # ... found already written (by another persister, or the gateway's own)

    @classmethod
    def from_settings(cls, settings: Any) -> GatewayLostSweep:
        return cls(settings.stream_prefix, heartbeat_s=settings.asr_pool_heartbeat_s,
                   lost_after_s=settings.gateway_lost_after_s, call_maxlen=settings.call_stream_maxlen,
                   call_ttl_s=settings.call_stream_ttl_s)

    async def sweep(self, client: Any, sessions: sessionmaker[Session],
                    executor: concurrent.futures.Executor | None = None, now: float | None = None) -> int:
        """One pass: publish gateway-lost call.ended events; returns how many were written.

        Never raises for Redis or the database being down: the next pass retries."""
        from sqlalchemy.exc import SQLAlchemyError

        loop = asyncio.get_running_loop()
        written = 0
        try:
            views = await read_instances(client, self.prefix, heartbeat_s=self.heartbeat_s,
                                         lost_after_s=self.lost_after_s, now=now)
            for view in views:
                if view.state == LOST:
                    calls = await loop.run_in_executor(executor, open_calls, sessions, view.instance)
                    ended_at = view.last_seen
                elif view.started_at is not None:  # restarted under the same id: its earlier run's calls
                    calls = await loop.run_in_executor(executor, open_calls, sessions, view.instance,
                                                       view.started_at)
                    ended_at = view.started_at
                else:
                    continue
                for call in calls:
                    written += await self._publish_once(client, gateway_lost_event(call, ended_at))
                if view.state == LOST and not calls and view.age_s > FORGET_LOST_AFTER_S:
                    await client.hdel(registry_key(self.prefix), view.field)
        except ResponseError as exc:  # not an outage: say so
            log.warning("gateway-lost sweep failed: %s", exc)
        except (RedisError, OSError, SQLAlchemyError) as exc:  # down: the persister says so; next pass retries
            log.debug("gateway-lost sweep deferred: %s", exc)
        return written

    async def _publish_once(self, client: Any, event: Event) -> int:
        fields = event.to_fields()
        call_stream = f"{self.prefix}:call:{event.call_id}"
        done = int(await client.eval(_PUBLISH_ONCE, 3, marker_key(self.prefix, event.call_id),
                                     f"{self.prefix}:events", call_stream, MARKER_TTL_S, self.call_maxlen,
                                     self.call_ttl_s, fields["event_id"], fields["type"], fields["call_id"],
                                     fields["data"]))
        if done:
            self.published += 1
            log.warning("call %s: its gateway is lost; published call.ended (reason gateway-lost)", event.call_id)
        else:
            self.skipped += 1
        return done
