"""The persister: Redis event stream in, SQL store out.

Transcripts reach SQL only through here, reading the global event stream with a
consumer group, so a slow or down database never stalls a call: the gateway
only ever writes to Redis, and the stream holds what the database has not taken
yet.

Delivery is at-least-once at every hop, so every write is idempotent:

* ``call_events.event_id`` is unique; an event already stored is skipped
  (a duplicate publish, a replay after a crash, a reclaimed entry);
* turns are keyed (call, leg, turn): a partial updates the live text only if it
  is newer than the one stored and the turn is not final yet, a final replaces
  the partial text. Partials are transient and idempotent through that rule, so
  they are not logged in ``call_events`` (they would be most of its rows);
* any event may come first: the call row is created from the fields every event
  repeats, and call.started or call.ended fill in the rest whenever they come.

Entries are acknowledged (XACK) only after the transaction holding them
committed. A batch read from Redis is one transaction. While the database is
down the batch is retried with capped exponential backoff and nothing more is
read; its entries stay pending in Redis. On start, and after a Redis outage,
this consumer first re-reads its own pending entries, then takes over entries
left pending too long by dead consumers (XAUTOCLAIM). An entry that is not a
valid event (bad JSON, unknown schema, a field of the wrong type) is logged,
counted and acknowledged: it must never block the stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from .events import (
    TURN_PARTIAL,
    AsrInfo,
    CallEnded,
    CallStarted,
    Confidence,
    Dtmf,
    Event,
    EventError,
    TurnFinal,
    TurnPartial,
)
from .identity import clean_event_body
from .instances import GATEWAY_LOST, GatewayLostSweep
from .tasks import stop_tasks

if TYPE_CHECKING:  # SQLAlchemy and redis.asyncio load with the persister, not with the package
    import redis.asyncio as aioredis
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from .config import Settings
    from .store.models import Call, Turn

log = logging.getLogger(__name__)

DEFAULT_GROUP = "earshot-persister"


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# -- parsing and validation (gateway.events): anything that fails here is a poison entry


class PoisonEvent(ValueError):
    """A stream entry that is not a valid event; it is acknowledged and skipped."""


class TrimmedEntry(PoisonEvent):
    """A pending entry that is no longer in the stream: trimmed (or deleted) before it was stored.
    The event is lost to the store; counted apart from poison and logged as an error."""


@dataclass
class StreamEvent:
    """A validated event, the JSON it was decoded from, and the stream entry it came from."""

    stream_id: str
    event: Event
    body: dict[str, Any]  # as read: what call_events.raw keeps

    @property
    def type(self) -> str:
        return self.event.type

    @property
    def event_id(self) -> str:
        return self.event.event_id

    @property
    def call_id(self) -> str:
        return self.event.call_id

    @property
    def time(self) -> datetime:
        return self.event.time


def _reject_constant(name: str) -> Any:
    raise PoisonEvent(f"non-finite number {name} in event JSON")


def _field(fields: dict[Any, Any], name: str) -> Any:
    return fields.get(name.encode(), fields.get(name))


def parse_entry(stream_id: bytes | str, fields: dict[Any, Any] | None) -> StreamEvent:
    """Decode and validate one stream entry written by the gateway's publisher."""
    sid = stream_id.decode("ascii", "replace") if isinstance(stream_id, bytes) else str(stream_id)
    if not fields:
        raise TrimmedEntry("entry no longer in the stream (trimmed or deleted before it was stored)")
    raw = _field(fields, "data")
    if raw is None:
        raise PoisonEvent("entry has no 'data' field")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise PoisonEvent("'data' is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, PoisonEvent):
            raise
        raise PoisonEvent(f"'data' is not valid JSON: {exc}") from None
    try:
        # identities not cleaned at ingress (older producers) must not make the call's events poison
        event = Event.from_wire(clean_event_body(body))
    except EventError as exc:
        raise PoisonEvent(str(exc)) from None
    return StreamEvent(stream_id=sid, event=event, body=body)


# -- storing: a batch of validated events in one session


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    poison: list[tuple[str, str]] = field(default_factory=list)  # (stream id, reason)

    def add(self, other: WriteResult) -> None:
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.poison += other.poison


def uri_user(uri: str) -> str:
    """The user part of a SIP/tel URI: ``sip:+15551234@pbx;user=phone`` -> ``+15551234``."""
    uri = uri.strip()
    if "<" in uri and ">" in uri:
        uri = uri[uri.index("<") + 1:uri.index(">")]
    scheme, sep, rest = uri.partition(":")
    if not sep:
        scheme, rest = "", uri
    if "@" in rest:
        user = rest.split("@", 1)[0]
    else:
        user = "" if scheme.lower() in ("sip", "sips") else rest  # sip:host has no user; tel:+1555 is one
    return user.split(";", 1)[0][:255]


class _Batch:
    """Applies events to rows, loading every row a batch touches in a few queries."""

    def __init__(self, session: Session, events: list[StreamEvent]) -> None:
        from sqlalchemy import select, tuple_

        from .store.models import Call, CallEvent, Leg, Turn

        self.session = session
        call_ids = {e.call_id for e in events}
        self.calls: dict[str, Call] = {
            c.call_id: c for c in session.scalars(select(Call).where(Call.call_id.in_(call_ids)))}
        self.legs: set[tuple[str, str]] = {
            (row[0], row[1]) for row in session.execute(select(Leg.call_id, Leg.label).where(Leg.call_id.in_(call_ids)))}
        self.leg_rows: dict[tuple[str, str], Leg] = {}  # legs whose speaker this batch set
        keys = {(e.call_id, e.event.leg or "", e.event.payload.turn) for e in events
                if isinstance(e.event.payload, (TurnPartial, TurnFinal))}
        self.turns: dict[tuple[str, str, int], Turn] = {}
        if keys:
            stmt = select(Turn).where(tuple_(Turn.call_id, Turn.leg, Turn.turn).in_(list(keys)))
            self.turns = {(t.call_id, t.leg, t.turn): t for t in session.scalars(stmt)}
        ids = [e.event_id for e in events if e.type != TURN_PARTIAL]
        self.seen: set[str] = set(session.scalars(select(CallEvent.event_id).where(CallEvent.event_id.in_(ids))))
        self.result = WriteResult()

    def apply(self, item: StreamEvent, now: datetime) -> None:
        from .store.models import CallEvent

        event, payload = item.event, item.event.payload
        if event.type != TURN_PARTIAL:
            if item.event_id in self.seen:
                self.result.duplicates += 1
                return
            self.seen.add(item.event_id)
        call = self._call(event, now)
        if event.type != TURN_PARTIAL:
            self.session.add(CallEvent(event_id=item.event_id, type=event.type, call_id=event.call_id,
                                       stream_id=item.stream_id, event_time=event.time, received_at=now,
                                       raw=item.body))
        if event.leg is not None:
            self._leg(call.call_id, event.leg, now, _speaker(payload))
        if isinstance(payload, CallStarted):
            self._started(call, payload, event.time, now)
        elif isinstance(payload, TurnPartial):
            if not self._partial(call, event.leg or "", payload, event.time):
                self.result.duplicates += 1  # a replay, or older than what is stored
                return
        elif isinstance(payload, TurnFinal):
            self._final(call, event.leg or "", payload, event.time)
        elif isinstance(payload, Dtmf):
            self._dtmf(call, event.leg or "", payload, item)
        elif isinstance(payload, CallEnded):
            self._ended(call, payload, event.time)
        self.result.stored += 1

    def _call(self, event: Event, now: datetime) -> Call:
        from .store.models import CALL_LIVE, Call

        when = event.time
        call = self.calls.get(event.call_id)
        if call is None:
            # the first event seen of this call: every event repeats the call's identity
            info = event.call
            call = Call(call_id=info.call_id, sip_call_id=info.sip_call_id, from_uri=info.from_uri,
                        to_uri=info.to_uri, from_user=uri_user(info.from_uri), to_user=uri_user(info.to_uri),
                        source_kind=info.source.kind, source_ids=dict(info.source.ids),
                        tags=list(info.tags), status=CALL_LIVE, started_at=when,
                        turn_count=0, dtmf_count=0, updated_at=now)
            self.session.add(call)
            self.calls[call.call_id] = call
        else:
            if call.answered_at is None and when < call.started_at:
                call.started_at = when
            call.updated_at = now
        return call

    def _leg(self, call_id: str, label: str, now: datetime,
             speaker: tuple[str | None, str | None, str | None] | None = None) -> None:
        """The leg's row; ``speaker``: (role, participant, number) of a SIPREC leg's event."""
        from .store.models import Leg

        key = (call_id, label)
        if key not in self.legs:
            self.legs.add(key)
            row = Leg(call_id=call_id, label=label, created_at=now)
            self.session.add(row)
            self.leg_rows[key] = row
        if speaker is None:
            return
        row = self.leg_rows.get(key) or self.session.get(Leg, key)
        if row is not None and (row.role, row.participant, row.number) != speaker:
            row.role, row.participant, row.number = speaker
            self.leg_rows[key] = row

    def _started(self, call: Call, started: CallStarted, when: datetime, now: datetime) -> None:
        call.started_at = call.answered_at = when
        call.codec = started.codec or None
        call.transport = started.transport or None
        call.remote_media = started.remote_media or None
        call.local_media_port = started.local_media_port
        call.dialplan_rule = started.dialplan_rule or None
        call.dialplan_profile = started.dialplan_profile or None
        call.language = started.language or None
        call.gateway = started.gateway or None
        speakers = {p.leg: (p.role, p.name, p.number) for p in started.participants if p.leg}
        for label in started.legs:
            self._leg(call.call_id, label, now, speakers.get(label))

    def _turn(self, call: Call, leg: str, payload: TurnPartial | TurnFinal, when: datetime) -> Turn:
        from .store.models import Turn

        key = (call.call_id, leg, payload.turn)
        turn = self.turns.get(key)
        if turn is None:
            turn = Turn(call_id=key[0], leg=key[1], turn=key[2], start_ms=payload.start_ms,
                        end_ms=payload.end_ms, final=False, partial_count=0, created_at=when)
            self.session.add(turn)
            self.turns[key] = turn
        return turn

    def _partial(self, call: Call, leg: str, partial: TurnPartial, when: datetime) -> bool:
        turn = self._turn(call, leg, partial, when)
        if turn.final or partial.partial <= turn.partial_count:
            return False  # this partial, a newer one or the final is already stored
        turn.partial_count = partial.partial
        turn.partial_text = partial.text
        turn.start_ms, turn.end_ms = partial.start_ms, partial.end_ms
        turn.language = partial.language or turn.language
        return True

    def _final(self, call: Call, leg: str, final: TurnFinal, when: datetime) -> None:
        from .store.models import CALL_ENDED as STATUS_ENDED

        turn = self._turn(call, leg, final, when)
        if not turn.final and call.status != STATUS_ENDED:
            call.turn_count += 1  # call.ended's count, when stored, is authoritative
        confidence, asr = final.confidence or Confidence(), final.asr or AsrInfo()
        turn.final = True
        turn.text = final.text
        turn.partial_text = None
        turn.partial_count = final.partials or turn.partial_count
        turn.start_ms, turn.end_ms = final.start_ms, final.end_ms
        turn.reason = final.reason
        turn.language = final.language or None
        turn.avg_logprob = confidence.avg_logprob
        turn.no_speech_prob = confidence.no_speech_prob
        turn.compression_ratio = confidence.compression_ratio
        turn.language_probability = confidence.language_probability
        turn.asr_model = asr.model
        turn.asr_audio_ms = asr.audio_ms
        turn.asr_processing_ms = asr.processing_ms
        turn.speculative = asr.speculative
        turn.latency_ms = final.latency_ms
        turn.error = final.error
        turn.finalized_at = when

    def _dtmf(self, call: Call, leg: str, dtmf: Dtmf, item: StreamEvent) -> None:
        from .store.models import CALL_ENDED as STATUS_ENDED
        from .store.models import Dtmf as DtmfRow

        self.session.add(DtmfRow(call_id=call.call_id, leg=leg, digit=dtmf.digit,
                                 duration_ms=dtmf.duration_ms or 0, offset_ms=dtmf.offset_ms or 0,
                                 event_id=item.event_id, created_at=item.time))
        if call.status != STATUS_ENDED:
            call.dtmf_count += 1

    def _ended(self, call: Call, ended: CallEnded, when: datetime) -> None:
        from .store.models import CALL_ENDED as STATUS_ENDED

        if ended.reason == GATEWAY_LOST and call.status == STATUS_ENDED:
            return  # the gateway's own call.ended came first: it says more
        call.status = STATUS_ENDED
        call.ended_at = when
        call.end_reason = ended.reason
        call.duration_ms = ended.duration_ms
        if ended.turns is not None:
            call.turn_count = ended.turns
        if ended.dtmf is not None:
            call.dtmf_count = ended.dtmf
        call.rtp_stats = ended.rtp.to_wire() if ended.rtp is not None else None
        call.recording = ended.recording
        call.recording_duration_ms = ended.recording_duration_ms
        call.recording_bytes = ended.recording_bytes
        call.recording_error = ended.recording_error


def store_events(session: Session, events: list[StreamEvent], now: datetime | None = None) -> WriteResult:
    """Apply events, in order, to the session (not committed); duplicates change nothing."""
    now = now or datetime.now(timezone.utc)
    batch = _Batch(session, events)
    for event in events:
        batch.apply(event, now)
    session.flush()
    return batch.result


class DatabaseUnavailable(Exception):
    """The database cannot take writes now (down, locked, schema missing): retry later."""


class EventStore:
    """Writes batches in transactions, telling transient failures from bad events."""

    def __init__(self, engine: Engine) -> None:
        from .store.db import make_sessionmaker

        self.engine = engine
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        self.schema_checked = False

    def write(self, events: list[StreamEvent]) -> WriteResult:
        """Store a batch in one transaction; if that fails on a bad event, one by one."""
        from sqlalchemy.exc import DataError, IntegrityError

        self._check_schema()
        try:
            return self._transaction(events)
        except (IntegrityError, DataError, ValueError, TypeError, KeyError) as exc:
            log.info("batch of %d failed (%s); storing its events one by one", len(events), _short(exc))
        result = WriteResult()
        for event in events:
            result.add(self._write_one(event))
        return result

    def _write_one(self, event: StreamEvent) -> WriteResult:
        from sqlalchemy.exc import DataError, IntegrityError

        for attempt in range(3):
            try:
                return self._transaction([event])
            except IntegrityError as exc:
                # most likely another consumer stored the same row meanwhile: the
                # next attempt sees it; a row that keeps conflicting is a bad event
                if attempt == 2:
                    return WriteResult(poison=[(event.stream_id, f"rejected by the database: {_short(exc)}")])
            except (DataError, ValueError, TypeError, KeyError) as exc:
                return WriteResult(poison=[(event.stream_id, f"rejected by the database: {_short(exc)}")])
        raise AssertionError("unreachable")

    def _transaction(self, events: list[StreamEvent]) -> WriteResult:
        from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

        try:
            with self.sessions() as session, session.begin():
                return store_events(session, events)
        except (IntegrityError, DataError):
            raise
        except SQLAlchemyError as exc:  # connection lost, server down, locked, no such table...
            self.schema_checked = False
            raise DatabaseUnavailable(_short(exc)) from exc

    def _check_schema(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from .store.migrate import SchemaError, check_schema

        if self.schema_checked:
            return
        try:
            check_schema(self.engine)
        except SchemaError as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(_short(exc)) from exc
        self.schema_checked = True


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- the consumer


class _Stopping(Exception):
    pass


class Persister:
    """Consumes the event stream into the SQL store; ``start()``/``close()`` or ``run()``."""

    def __init__(
        self,
        redis_url: str,
        database_url: str | None = None,
        *,
        stream: str,
        engine: Engine | None = None,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        batch_size: int = 200,
        block_ms: int = 1000,
        claim_min_idle_ms: int = 60_000,
        claim_interval_s: float = 30.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        forget_consumers_after_s: float = 3600.0,
        gateway_lost: GatewayLostSweep | None = None,
    ) -> None:
        if engine is None and database_url is None:
            raise ValueError("give a database_url or an engine")
        if batch_size < 1 or block_ms < 1 or claim_min_idle_ms < 1:
            raise ValueError("batch_size, block_ms and claim_min_idle_ms must be positive")
        self.redis_url = redis_url
        self.database_url = database_url
        self.stream = stream
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_min_idle_ms = claim_min_idle_ms
        self.claim_interval_s = claim_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.forget_consumers_after_s = forget_consumers_after_s
        self.gateway_lost = gateway_lost  # ends lost gateways' open calls (gateway/instances.py)
        self._engine = engine
        self._owns_engine = engine is None
        self._store: EventStore | None = None
        self._redis: aioredis.Redis | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        # counters (read by metrics and tests)
        self.stored = 0
        self.duplicates = 0
        self.poison = 0
        self.trimmed = 0  # pending entries gone from the stream before they were stored
        self.acked = 0
        self.batches = 0
        self.db_failures = 0
        self.redis_failures = 0
        self.db_ok = False
        self.redis_ok = False
        self.last_error = ""

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Persister:
        return cls(settings.redis_url, settings.database_url, stream=settings.events_stream,
                   group=settings.persister_group, consumer=settings.persister_consumer or None,
                   batch_size=settings.persister_batch,
                   claim_min_idle_ms=int(settings.persister_claim_idle_s * 1000),
                   **{"gateway_lost": GatewayLostSweep.from_settings(settings), **kwargs})

    # -- lifecycle
    async def start(self) -> None:
        """Start consuming in the background; never fails because Redis or the database is down."""
        import redis.asyncio as aioredis

        from .store.db import make_engine

        if self._task is not None:
            raise RuntimeError("persister already started")
        if self._engine is None:
            self._engine = make_engine(self.database_url)  # type: ignore[arg-type]
        self._store = EventStore(self._engine)
        self._redis = aioredis.Redis.from_url(
            self.redis_url, socket_connect_timeout=2, socket_timeout=self.block_ms / 1000 + 5)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="earshot-persister")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="earshot-persister")

    async def close(self, timeout: float = 10.0) -> None:
        """Stop after the batch in hand (committed and acked, or left pending)."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.warning("persister did not stop within %.0f s; cancelling", timeout)
                await stop_tasks([self._task])
            except Exception:  # already logged by _run
                pass
            self._task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()
            self._engine = None

    async def run(self) -> None:
        """Consume until cancelled or :meth:`close` is called (for ``earshot persist``)."""
        await self.start()
        try:
            assert self._task is not None
            await asyncio.shield(self._task)
        finally:
            await self.close()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until a read found no new entries and all entries read were handled."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def snapshot(self) -> dict[str, float]:
        return {"persister_stored": self.stored, "persister_duplicates": self.duplicates,
                "persister_poison": self.poison, "persister_trimmed": self.trimmed,
                "persister_db_failures": self.db_failures,
                "persister_redis_failures": self.redis_failures, "persister_db_up": float(self.db_ok),
                "persister_redis_up": float(self.redis_ok)}

    # -- the loop
    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        if self._stopping.is_set():
            raise _Stopping

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.backoff_initial_s
        group_ready = False
        recover = True  # re-read own pending entries and reclaim dead consumers' ones
        next_claim = next_sweep = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if not group_ready:
                        await self._create_group()
                        group_ready = True
                    if recover:
                        await self._read_own_pending()
                        await self._autoclaim()
                        recover, next_claim = False, loop.time() + self.claim_interval_s
                    elif loop.time() >= next_claim:
                        await self._autoclaim()
                        next_claim = loop.time() + self.claim_interval_s
                    if self.gateway_lost is not None and loop.time() >= next_sweep:
                        assert self._redis is not None and self._store is not None
                        await self.gateway_lost.sweep(self._redis, self._store.sessions, self._executor)
                        next_sweep = loop.time() + self.gateway_lost.interval_s
                    assert self._redis is not None
                    reply = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                         count=self.batch_size, block=self.block_ms)
                    if not self.redis_ok:
                        log.info("persister: reading %s as %s/%s", self.stream, self.group, self.consumer)
                    self.redis_ok = True
                    backoff = self.backoff_initial_s
                    entries = _entries(reply)
                    if not entries:
                        self._idle.set()
                        continue
                    await self._handle(entries)
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):  # the stream or group was deleted under us
                        group_ready, recover = False, True
                        continue
                    backoff = await self._redis_failed(exc, backoff)
                    recover = True
                except (RedisError, OSError) as exc:
                    backoff = await self._redis_failed(exc, backoff)
                    recover = True  # entries read but not acked wait in our pending list
                except _Stopping:
                    raise
                except Exception as exc:  # a bug must not end persisting: log, back off, retry
                    log.exception("persister: unexpected error; retrying")
                    self.last_error = f"unexpected: {exc}"
                    self._idle.clear()
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    recover = True
        except _Stopping:
            pass

    async def _redis_failed(self, exc: BaseException, backoff: float) -> float:
        self.redis_failures += 1
        self.last_error = f"redis: {exc}"
        if self.redis_ok:
            log.warning("persister: Redis unavailable (%s); retrying", exc)
        self.redis_ok = False
        self._idle.clear()
        await self._sleep(backoff)
        return min(backoff * 2, self.backoff_max_s)

    async def _create_group(self) -> None:
        assert self._redis is not None
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("persister: created consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_own_pending(self) -> None:
        """Entries delivered to this consumer earlier and never acked (a crash, an outage)."""
        assert self._redis is not None
        last: bytes | str = "0-0"
        while True:
            reply = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: last},
                                                 count=self.batch_size)
            entries = _entries(reply)
            if not entries:
                return
            await self._handle(entries)
            last = entries[-1][0]

    async def _autoclaim(self) -> None:
        """Take over entries other consumers left pending longer than claim_min_idle_ms."""
        assert self._redis is not None
        start: bytes | str = "0-0"
        while True:
            reply = await self._redis.xautoclaim(self.stream, self.group, self.consumer,
                                                 min_idle_time=self.claim_min_idle_ms, start_id=start,
                                                 count=self.batch_size)
            start, claimed = reply[0], [e for e in reply[1] if e[0] is not None]
            if claimed:
                log.info("persister: claimed %d entries pending in other consumers", len(claimed))
                await self._handle(claimed)
            if start in (b"0-0", "0-0"):
                break
        await self._forget_idle_consumers()

    async def _forget_idle_consumers(self) -> None:
        """Remove consumers with nothing pending that have been silent for long.

        Every run of the persister is a new consumer (hostname-pid); without this
        the group would list every process that ever ran. A live consumer reads
        every block_ms, so it is never this idle (and would come back by reading).
        """
        assert self._redis is not None
        for consumer in await self._redis.xinfo_consumers(self.stream, self.group):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if (name != self.consumer and consumer["pending"] == 0
                    and consumer["idle"] > self.forget_consumers_after_s * 1000):
                await self._redis.xgroup_delconsumer(self.stream, self.group, name)
                log.info("persister: removed idle consumer %s from group %s", name, self.group)

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> None:
        """Store a batch, then acknowledge it; the database is retried until it takes it."""
        self._idle.clear()
        events: list[StreamEvent] = []
        poison: list[tuple[str, str]] = []
        for stream_id, fields in entries:
            try:
                events.append(parse_entry(stream_id, fields))
            except TrimmedEntry:
                self.trimmed += 1
                log.error("persister: entry %r of %s was trimmed before it was stored: its event is lost to the "
                          "store (earshot_persister_trimmed_total)", stream_id, self.stream)
            except PoisonEvent as exc:
                poison.append((stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id), str(exc)))
        if events:
            result = await self._write(events)
            self.stored += result.stored
            self.duplicates += result.duplicates
            poison += result.poison
        for stream_id, reason in poison:
            log.warning("persister: skipping poison entry %s of %s: %s", stream_id, self.stream, reason)
        self.poison += len(poison)
        assert self._redis is not None
        self.acked += await self._redis.xack(self.stream, self.group, *[e[0] for e in entries])
        self.batches += 1

    async def _write(self, events: list[StreamEvent]) -> WriteResult:
        assert self._store is not None
        loop = asyncio.get_running_loop()
        backoff = self.backoff_initial_s
        while True:
            try:
                result = await loop.run_in_executor(self._executor, self._store.write, events)
            except DatabaseUnavailable as exc:
                self.db_failures += 1
                self.last_error = f"database: {exc}"
                if self.db_ok or self.db_failures == 1:
                    log.warning("persister: database unavailable (%s); keeping %d entries pending and retrying",
                                exc, len(events))
                self.db_ok = False
                await self._sleep(backoff)  # raises _Stopping on close: the entries stay pending
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if not self.db_ok:
                log.info("persister: database reachable")
            self.db_ok = True
            return result


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The (id, fields) pairs of a one-stream XREADGROUP reply."""
    if not reply:
        return []
    return [e for e in reply[0][1] if e[0] is not None]


def _speaker(payload: object) -> tuple[str | None, str | None, str | None] | None:
    """(role, participant, number) of a SIPREC leg's turn or dtmf event; None for other events."""
    role = getattr(payload, "role", None)
    if role is None:
        return None
    return role, getattr(payload, "participant", None), getattr(payload, "number", None)
