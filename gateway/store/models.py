"""SQL tables of the transcript store (SQLAlchemy 2 typed ORM).

The persister fills calls, legs, turns, dtmf and call_events from the Redis
event stream; the dashboard reads them. Every timestamp is timezone-aware UTC:
SQLite has no time zone type, so :class:`UTCDateTime` stores naive UTC there
and gives back aware datetimes everywhere, and a naive datetime is refused
rather than silently taken as local time.

The full-text index is not declared here: it is dialect-specific (an FTS5
table kept in sync by triggers on SQLite, a generated tsvector column with a
GIN index on PostgreSQL) and lives in the migration (see
:mod:`gateway.store.search`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

CALL_LIVE = "live"
CALL_ENDED = "ended"
CALL_STATUSES = (CALL_LIVE, CALL_ENDED)

ROLE_SUPERVISOR = "supervisor"
ROLE_ADMIN = "admin"
ROLES = (ROLE_SUPERVISOR, ROLE_ADMIN)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone-aware one (UTC)")
        value = value.astimezone(timezone.utc)
        # SQLite keeps text: naive UTC sorts and compares correctly as text
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# 64-bit ids on PostgreSQL (events and turns grow fast); INTEGER on SQLite, where
# only an INTEGER PRIMARY KEY is the rowid (FTS5 external content needs that)
BigId = BigInteger().with_variant(Integer(), "sqlite")

# JSON everywhere; JSONB on PostgreSQL so that tags can be matched with @>
JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType, list[str]: JSONType}


class Call(Base):
    """One answered call or API session; created by its first event (normally call.started)."""

    __tablename__ = "calls"

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sip_call_id: Mapped[str] = mapped_column(Text, default="")
    from_uri: Mapped[str] = mapped_column(Text, default="")
    to_uri: Mapped[str] = mapped_column(Text, default="")
    # user parts of the URIs (the numbers, usually): what supervisors search by
    from_user: Mapped[str] = mapped_column(Text, default="")
    to_user: Mapped[str] = mapped_column(Text, default="")
    # where the session's audio came from (events' ``source``): sip, siprec, realtime,
    # rest, twilio or webrtc, and that source's own ids (Twilio's callSid, a file name...)
    source_kind: Mapped[str] = mapped_column(String(16), default="sip", server_default="sip", index=True)
    source_ids: Mapped[dict[str, Any] | None]
    tags: Mapped[list[str]] = mapped_column(default=list)
    dialplan_rule: Mapped[str | None] = mapped_column(Text)
    dialplan_profile: Mapped[str | None] = mapped_column(Text)  # the rule's profile (call.started), migration 0005
    codec: Mapped[str | None] = mapped_column(String(16))
    transport: Mapped[str | None] = mapped_column(String(8))
    remote_media: Mapped[str | None] = mapped_column(Text)
    local_media_port: Mapped[int | None] = mapped_column(Integer)
    language: Mapped[str | None] = mapped_column(String(16))  # forced ASR language, if any
    # the gateway instance that carried it (call.started), migration 0007: its gateway-lost sweep
    gateway: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(8), default=CALL_LIVE)
    started_at: Mapped[datetime]  # answer time (call.started), else the first event seen
    answered_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(32))
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    dtmf_count: Mapped[int] = mapped_column(Integer, default=0)
    rtp_stats: Mapped[dict[str, Any] | None]
    # the call's WAV (call.ended; docs/recordings.md), migration 0004: path relative to recordings_dir
    recording: Mapped[str | None] = mapped_column(Text)
    recording_duration_ms: Mapped[int | None] = mapped_column(Integer)
    recording_bytes: Mapped[int | None] = mapped_column(BigInteger)
    recording_error: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    legs: Mapped[list[Leg]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True, order_by="Leg.label")
    turns: Mapped[list[Turn]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True,
        order_by="(Turn.start_ms, Turn.leg, Turn.turn)")
    dtmf: Mapped[list[Dtmf]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True,
        order_by="(Dtmf.offset_ms, Dtmf.id)")

    __table_args__ = (
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_status_started_at", "status", "started_at"),
    )

    @property
    def source_id_map(self) -> dict[str, str]:
        """The source's ids; a row stored before sources were (revision 0002) was a SIP call: its Call-ID."""
        if self.source_ids:
            return {str(k): str(v) for k, v in self.source_ids.items()}
        return {"call_id": self.sip_call_id} if self.sip_call_id and self.source_kind in (None, "sip") else {}

    def __repr__(self) -> str:
        return f"<Call {self.call_id} {self.status} {self.source_kind} {self.from_uri} -> {self.to_uri}>"


class Leg(Base):
    """An audio leg of a call (``caller`` unless the dialplan says otherwise)."""

    __tablename__ = "legs"

    call_id: Mapped[str] = mapped_column(ForeignKey("calls.call_id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # SIPREC (docs/siprec.md): who speaks on the leg, as its latest event said; NULL for other calls
    role: Mapped[str | None] = mapped_column(String(16))
    participant: Mapped[str | None] = mapped_column(String(256))
    number: Mapped[str | None] = mapped_column(String(64))

    call: Mapped[Call] = relationship(back_populates="legs")


class Turn(Base):
    """One turn of one leg: live partial text until its final replaces it.

    ``text`` is NULL until the final arrives, so the full-text index only ever
    holds final transcripts. The integer ``id`` is the FTS5 rowid.
    """

    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.call_id", ondelete="CASCADE"))
    leg: Mapped[str] = mapped_column(String(64))
    turn: Mapped[int] = mapped_column(Integer)
    start_ms: Mapped[int] = mapped_column(Integer, default=0)
    end_ms: Mapped[int] = mapped_column(Integer, default=0)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    text: Mapped[str | None] = mapped_column(Text)
    partial_count: Mapped[int] = mapped_column(Integer, default=0)
    partial_text: Mapped[str | None] = mapped_column(Text)  # latest partial while the turn is live
    reason: Mapped[str | None] = mapped_column(String(16))
    language: Mapped[str | None] = mapped_column(String(16))
    avg_logprob: Mapped[float | None] = mapped_column(Float)
    no_speech_prob: Mapped[float | None] = mapped_column(Float)
    compression_ratio: Mapped[float | None] = mapped_column(Float)
    language_probability: Mapped[float | None] = mapped_column(Float)
    asr_model: Mapped[str | None] = mapped_column(Text)
    asr_audio_ms: Mapped[float | None] = mapped_column(Float)
    asr_processing_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    speculative: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)  # time of the turn's first event
    finalized_at: Mapped[datetime | None]

    call: Mapped[Call] = relationship(back_populates="turns")

    __table_args__ = (
        UniqueConstraint("call_id", "leg", "turn", name="uq_turns_call_leg_turn"),
        Index("ix_turns_call_start", "call_id", "start_ms"),
    )

    @property
    def display_text(self) -> str:
        """The final text, or the latest partial while the turn is still being spoken."""
        return (self.text if self.final else self.partial_text) or ""


class Dtmf(Base):
    __tablename__ = "dtmf"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.call_id", ondelete="CASCADE"))
    leg: Mapped[str] = mapped_column(String(64))
    digit: Mapped[str] = mapped_column(String(8))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    offset_ms: Mapped[int] = mapped_column(Integer, default=0)
    event_id: Mapped[str] = mapped_column(String(96), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    call: Mapped[Call] = relationship(back_populates="dtmf")

    __table_args__ = (Index("ix_dtmf_call_offset", "call_id", "offset_ms"),)


class CallEvent(Base):
    """Every event stored, by its stable event_id: the persister's idempotency key.

    turn.partial events are not logged here: they are transient, and replaying
    one changes nothing (a turn keeps only its newest partial, none after its final).
    """

    __tablename__ = "call_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(96), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.call_id", ondelete="CASCADE"))
    stream_id: Mapped[str] = mapped_column(String(48))  # Redis entry id it was read from
    event_time: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    raw: Mapped[dict[str, Any]]

    call: Mapped[Call] = relationship()

    __table_args__ = (Index("ix_call_events_call_id", "call_id"),)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16), default=ROLE_SUPERVISOR)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    last_login_at: Mapped[datetime | None]
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True, order_by="ApiToken.id")

    def __repr__(self) -> str:
        return f"<User {self.username} {self.role}>"


class ApiToken(Base):
    """An API token; only its SHA-256 is kept, the token itself is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship(back_populates="tokens")


class WebRevocation(Base):
    """A dashboard session ended (logout, login rotation) before its expiry. The cookie is
    signed and self-expiring, so the end must be kept until then, here rather than in one
    process's memory: it holds across restarts and for every gateway sharing the store."""

    __tablename__ = "web_revocations"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_web_revocations_expires_at", "expires_at"),)
