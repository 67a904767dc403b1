"""The call-control stream: consumers act on calls Earshot answered (docs/consumers.md, "Call control").

A command is an entry on ``<stream_prefix>:control`` (``earshot:control``)::

    XADD earshot:control * command_id c-42 call_id <earshot call id> action transfer target sip:billing@pbx

(plain fields, or one ``data`` field holding the same as a JSON object). ``action``:

- ``transfer``: a blind transfer, an RFC 3515 REFER from Earshot to the caller with
  ``Refer-To: <target>``; the caller's NOTIFYs (``message/sipfrag``) report the
  progress, and a successful transfer ends Earshot's leg with BYE (call.ended
  ``reason`` ``transferred``).
- ``hangup``: Earshot sends BYE (call.ended ``reason`` ``control-hangup``).
- ``pause`` / ``resume``: stop / restart transcribing the call's legs. Audio is still
  received (and recorded, when the profile records); while paused the VAD is fed
  silence of the same length, so no turns come and the call's timeline is kept.

Every command is answered on ``<stream_prefix>:control:results`` by
:class:`~gateway.consumer.ConsumerEvent`\\ s of type ``control.result``: ``outcome``
``done`` (hangup, pause, resume), ``rejected`` (the command is invalid: ``error``
names the field), ``failed`` (valid, but it could not be done, e.g. the REFER was
refused: ``sip_status``), and for transfers ``accepted`` (202 to the REFER),
``progress`` (a provisional NOTIFY) and ``transferred`` (the NOTIFY's 2xx).

Why a stream: commands are authenticated by access to Redis (whoever may XADD to
the control stream may act on calls; give consumers ACLs accordingly), they are
ordered, and they survive a consumer that disconnects after sending. Each gateway
reads the stream in a consumer group of its own (``earshot-control-<instance>``),
so every instance sees every command and the one that holds the call acts on it.
Idempotent by ``command_id``: the acting gateway marks the id in Redis before it
acts (``SET NX``), and results have stable ids (``control:<command_id>:<outcome>``),
so a command sent twice, or read twice after a restart, acts and answers once.

SIPREC recording sessions (a fork of someone else's call) cannot be transferred or
hung up from here; pause and resume work on them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .consumer import Entry, StreamConsumer, StreamWriter
from .sip.events import ReferNotify, ReferResponse
from .sip.message import SipUri

if TYPE_CHECKING:
    from .app import Gateway
    from .call import Call

log = logging.getLogger(__name__)

ACTIONS = ("transfer", "hangup", "pause", "resume")
RESULT = "control.result"
PRODUCER = "control"
_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
DONE_TTL_S = 7 * 86_400
STALE_GROUP_S = 3600.0  # a control group whose consumers were all silent this long belonged to a dead gateway


class CommandError(ValueError):
    """An invalid command; ``field`` is the one at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Command:
    command_id: str
    call_id: str
    action: str
    target: str = ""


@dataclass(frozen=True)
class Invalid:
    """What the decoder makes of an entry that is not a valid command: answered, not acted on."""

    command_id: str  # as given ("" when missing or unusable)
    action: str
    error: CommandError


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def parse_command(fields: Mapping[Any, Any]) -> Command:
    """Validate one control stream entry; :class:`CommandError` names the field at fault."""
    body: Mapping[Any, Any] = {_text(k): v for k, v in fields.items()}
    if "data" in body:
        try:
            body = json.loads(_text(body["data"]))
        except json.JSONDecodeError as exc:
            raise CommandError("data", f"not valid JSON: {exc}") from None
        if not isinstance(body, Mapping):
            raise CommandError("data", "expected a JSON object")
    values = {name: body.get(name) for name in ("command_id", "call_id", "action", "target")}
    for name in ("command_id", "call_id", "action", "target"):
        value = values[name]
        if value is not None and not isinstance(value, (str, bytes)):
            raise CommandError(name, f"expected a string, got {value!r:.60}")
        values[name] = _text(value).strip()
    command_id, call_id, action, target = (values[n] for n in ("command_id", "call_id", "action", "target"))
    if not command_id:
        raise CommandError("command_id", "missing")
    if not _ID.match(command_id):
        raise CommandError("command_id", "at most 128 characters of A-Z a-z 0-9 . _ : @ -")
    if not call_id:
        raise CommandError("call_id", "missing")
    if len(call_id) > 64:
        raise CommandError("call_id", "longer than 64 characters")
    if action not in ACTIONS:
        raise CommandError("action", f"expected one of {', '.join(ACTIONS)}, got {action!r:.40}")
    if action == "transfer":
        if not target:
            raise CommandError("target", "missing (a sip: or sips: URI to transfer the caller to)")
        if len(target) > 512 or any(c in target for c in "\r\n<>\" "):
            raise CommandError("target", "not a URI that can go in Refer-To")
        try:
            SipUri.parse(target)
        except ValueError as exc:
            raise CommandError("target", f"not a sip: or sips: URI ({exc})") from None
    elif target:
        raise CommandError("target", f"only for transfer, not {action}")
    return Command(command_id, call_id, action, target)


def decode_command(fields: Mapping[Any, Any]) -> Command | Invalid:
    try:
        return parse_command(fields)
    except CommandError as exc:
        raw = {_text(k): v for k, v in fields.items()}
        cid, action = _text(raw.get("command_id")), _text(raw.get("action"))
        return Invalid(cid if _ID.match(cid) else "", action if action in ACTIONS else "", exc)


def command_key(item: Command | Invalid) -> str:
    return item.command_id if isinstance(item, Command) else f"invalid:{item.command_id}:{item.error}"


@dataclass
class _Transfer:
    command: Command
    accepted: bool = False


class CallControl:
    """The gateway's side of the control stream: reads commands, acts, answers."""

    def __init__(self, gateway: Gateway, *, block_ms: int = 1000) -> None:
        s = gateway.settings
        self.gateway = gateway
        self.stream = f"{s.stream_prefix}:control"
        self.results_stream = f"{s.stream_prefix}:control:results"
        self.group = f"earshot-control-{gateway.instance_id}"
        self._redis = aioredis.Redis.from_url(s.redis_url, socket_connect_timeout=2, socket_timeout=block_ms / 1000 + 5)
        self.consumer: StreamConsumer[Command | Invalid] = StreamConsumer(
            self._redis, group=self.group, stream=self.stream, consumer=gateway.instance_id, start="$",
            decode=decode_command, key=command_key, block_ms=block_ms)
        self.results = StreamWriter(self._redis, self.results_stream, PRODUCER)
        self.transfers: dict[str, _Transfer] = {}  # dialog id -> the transfer under way
        self._task: asyncio.Task[None] | None = None
        # results of SIP events (REFER answers, NOTIFYs), written in the order they happened
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.acted = 0
        self.rejected = 0

    async def start(self) -> None:
        try:
            await self.consumer.ensure_group()  # from now on: commands sent after start are seen
            await self._forget_stale_groups()
        except (RedisError, OSError) as exc:
            log.warning("call control: Redis unavailable at start (%s); retrying in the background", exc)
        self._task = asyncio.create_task(self.consumer.run(self._handle), name="earshot-call-control")
        self._writer = asyncio.create_task(self._write_outbox(), name="earshot-call-control-results")

    async def close(self) -> None:
        self.consumer.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._outbox.put_nowait(None)  # what is queued is written first
            await asyncio.gather(self._writer, return_exceptions=True)
        try:  # this instance's group dies with it (a new start gets a new instance id)
            await self._redis.xgroup_destroy(self.stream, self.group)
        except (RedisError, OSError):
            pass
        await self._redis.aclose()

    async def _forget_stale_groups(self) -> None:
        """Groups of gateways that died without closing (their consumers all silent for an hour)."""
        for info in await self._redis.xinfo_groups(self.stream):
            name = _text(info["name"])
            if not name.startswith("earshot-control-") or name == self.group:
                continue
            consumers = await self._redis.xinfo_consumers(self.stream, name)
            if all(c["idle"] > STALE_GROUP_S * 1000 for c in consumers):
                await self._redis.xgroup_destroy(self.stream, name)
                log.info("call control: removed the group %s of a gateway gone for over an hour", name)

    # -- commands
    def _find(self, call_id: str) -> Call | None:
        for call in self.gateway.calls.values():
            if call.call_id == call_id:
                return call
        return None

    async def _answer(self, command_id: str, action: str, outcome: str, key_suffix: str = "",
                      call_id: str = "-", **data: Any) -> None:
        body = {"command_id": command_id, "action": action, "outcome": outcome,
                "instance": self.gateway.instance_id, **{k: v for k, v in data.items() if v not in (None, "")}}
        key = f"{command_id or 'invalid'}:{outcome}{key_suffix}"
        await self.results.publish(RESULT, call_id or "-", key, body)

    async def _alone(self) -> bool:
        """No other live gateway (heartbeats): a command for a call nobody holds is answered here."""
        from .presence import read_presence

        pattern = self.gateway.settings.asr_pool_names.gateways_pattern
        try:
            others = [p for p in await read_presence(self._redis, pattern)
                      if p.get("instance") != self.gateway.instance_id]
        except (RedisError, OSError):
            return False
        return not others

    async def _handle(self, item: Command | Invalid, entry: Entry) -> None:
        if isinstance(item, Invalid):
            self.rejected += 1
            log.info("call control: rejected entry %s: %s", entry.id, item.error)
            await self._answer(item.command_id, item.action, "rejected", key_suffix=f":{entry.id}",
                               error=str(item.error), field=item.error.field)
            return
        command = item
        call = self._find(command.call_id)
        if call is None:
            if await self._alone():
                await self._answer(command.command_id, command.action, "rejected", call_id=command.call_id,
                                   error="call_id: no active call with this id", field="call_id")
            return  # another gateway may hold it
        if not await self._redis.set(f"{self.stream}:done:{command.command_id}", entry.id, nx=True, ex=DONE_TTL_S):
            log.info("call control: command %s already acted on; skipped", command.command_id)
            return
        self.acted += 1
        await self._act(command, call)

    async def _act(self, command: Command, call: Call) -> None:
        answer = lambda outcome, **kw: self._answer(command.command_id, command.action, outcome,  # noqa: E731
                                                    call_id=command.call_id, **kw)
        if call.ending:
            await answer("failed", error="the call is ending")
            return
        siprec = bool(getattr(call, "siprec", False))
        if command.action in ("pause", "resume"):
            if call.session is None:
                await answer("failed", error="the call has no session yet")
                return
            call.session.transcription_paused = command.action == "pause"
            log.info("call %s: transcription %sd by command %s", call.call_id, command.action, command.command_id)
            await answer("done")
            return
        if siprec:
            await answer("rejected", field="action",
                         error=f"action: {command.action} is for calls Earshot answered, not SIPREC recordings")
            return
        gw = self.gateway
        if command.action == "hangup":
            log.info("call %s: hung up by command %s", call.call_id, command.command_id)
            gw.end_call(call, "control-hangup", hangup=True)
            await answer("done")
            return
        # transfer
        if call.dialog_id in self.transfers:
            await answer("failed", error="a transfer of this call is under way")
            return
        if not gw.ua.refer(call.dialog_id, command.target, time.monotonic()):
            await answer("failed", error="the call is not in a state to transfer (not yet confirmed, or ending)")
            return
        gw.sip.flush()
        self.transfers[call.dialog_id] = _Transfer(command)
        log.info("call %s: REFER to %s (command %s)", call.call_id, command.target, command.command_id)

    # -- what the SIP user agent reports about our REFERs (Gateway._on_sip_event)
    def on_sip_event(self, event: ReferResponse | ReferNotify) -> None:
        transfer = self.transfers.get(event.dialog_id)
        if transfer is None:
            return
        command = transfer.command
        outcome: str | None
        extra: dict[str, Any] = {"target": command.target}
        suffix = ""
        if isinstance(event, ReferResponse):
            extra["sip_status"] = event.status
            if event.status < 300:
                transfer.accepted, outcome = True, "accepted"
            else:
                outcome = "failed"
                extra["error"] = f"the caller refused the REFER ({event.status})"
                self.transfers.pop(event.dialog_id, None)
        else:
            extra["sip_status"] = event.status
            extra["reason"] = event.reason
            if not event.final:
                outcome, suffix = "progress", f":{event.status}"
            elif event.status is not None and 200 <= event.status < 300:
                outcome = "transferred"
            else:
                outcome = "failed"
                extra["error"] = ("the transfer target answered " + str(event.status) if event.status
                                  else "the transfer subscription ended without a final status")
            if event.final:
                self.transfers.pop(event.dialog_id, None)
        self._later(command, outcome, suffix, **extra)
        if outcome == "transferred":  # the caller is with the target now: our leg ends (RFC 5589 6.1)
            call = self.gateway.calls.get(event.dialog_id)
            if call is not None:
                self.gateway.end_call(call, "transferred", hangup=True)

    def call_ended(self, dialog_id: str) -> None:
        """The call ended while a transfer was under way: its outcome is unknown to us."""
        transfer = self.transfers.pop(dialog_id, None)
        if transfer is not None:
            command = transfer.command
            self._later(command, "failed", target=command.target,
                        error="the call ended before the transfer's final NOTIFY")

    def _later(self, command: Command, outcome: str, key_suffix: str = "", **data: Any) -> None:
        self._outbox.put_nowait({"command_id": command.command_id, "action": command.action, "outcome": outcome,
                                 "key_suffix": key_suffix, "call_id": command.call_id, **data})

    async def _write_outbox(self) -> None:
        while (item := await self._outbox.get()) is not None:
            for attempt in range(5):
                try:
                    await self._answer(**item)
                    break
                except (RedisError, OSError) as exc:
                    log.warning("call control: could not publish a result (%s); retrying", exc)
                    await asyncio.sleep(0.2 * 2 ** attempt)
            else:
                log.error("call control: result %s of command %s lost: Redis unavailable", item["outcome"],
                          item["command_id"])
