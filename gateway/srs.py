"""The gateway as a SIPREC session recording server (RFC 7866): one leg per recorded stream.

An SRC (an SBC or PBX forking a call to us) sends an INVITE with ``Require: siprec``
(or a ``+sip.src`` Contact) and a ``multipart/mixed`` body: SDP with one ``sendonly``
``m=audio`` per party, each with ``a=label``, and RFC 7865 recording metadata naming
the participants and which stream carries whose voice.  Here that becomes one call
(:class:`~gateway.call.Call`) whose session has one leg per stream, each with its own
RTP port and receiver (latched on its own), VAD, turns and ASR context, and each
leg's events carry who speaks on it (``role``, ``participant``, ``number``).

The body and metadata parsing is :mod:`gateway.siprec` (sans-I/O); the SDP answer is
:func:`gateway.sdp.answer_recording`; this module decides the legs and drives the
gateway's sockets, user agent and sessions.  How legs are named and mapped is in
docs/siprec.md, "In the gateway".
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import sdp
from .call import Call, RecordedLeg
from .events import ROLES, Source
from .identity import identity as clean
from .rtp.receiver import RtpReceiver
from .rtp.transport import NoFreePortError, RtpSocket, open_rtp_socket
from .session import LegSpec
from .sip.useragent import has_metadata
from .siprec.body import SiprecError, split_body
from .siprec.metadata import merge, parse_metadata

if TYPE_CHECKING:
    from .app import Gateway
    from .dialplan import Route
    from .sip.events import IncomingCall, ReInvite
    from .trunks import Trunk

log = logging.getLogger(__name__)

#: streams recorded per call at most (an SRC offering more gets the rest rejected with port 0)
MAX_STREAMS = 8
#: the stable leg name of each role; a second party of the same role is named by its label
ROLE_LEGS = {"customer": "caller", "agent": "agent"}
_LEG_NAME = re.compile(r"[^A-Za-z0-9_.:-]+")


@dataclass(frozen=True)
class LegPlan:
    """What one recorded stream becomes: its leg name and who speaks on it."""

    stream: sdp.RecordedStream
    leg: str
    identity: dict[str, str] = field(default_factory=dict)


def identity_fields(ident: Any) -> dict[str, str]:
    """The ``role``/``participant``/``number`` fields of a leg's events from a
    :class:`gateway.siprec.metadata.LegIdentity` (None: nobody known, ``unknown``)."""
    if ident is None:
        return {"role": "unknown"}
    role = (getattr(ident, "role", None) or "unknown").lower()
    out = {"role": role if role in ROLES else "unknown"}
    name = clean(getattr(ident, "name", None) or "")[:256]
    number = clean(getattr(ident, "number", None) or "")[:64]
    if name:
        out["participant"] = name
    if number:
        out["number"] = number
    return out


def leg_name(stream: sdp.RecordedStream, role: str, taken: set[str]) -> str:
    """``caller`` for the customer, ``agent`` for the agent, else (or when that name is
    taken) the stream's label, made safe for a leg name; unique within the call."""
    wanted = ROLE_LEGS.get(role)
    if wanted and wanted not in taken:
        return wanted
    base = _LEG_NAME.sub("-", stream.label).strip("-")[:60] or f"stream{stream.index + 1}"
    if base in ROLE_LEGS.values():  # a label "agent" on the customer's stream must not pose as the agent
        base = f"label-{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def plan_legs(streams: Sequence[sdp.RecordedStream], metadata: Any, taken: set[str] | None = None) -> list[LegPlan]:
    """A leg for each stream, in m-line order; ``taken``: leg names already in the call."""
    used = set(taken or ())
    plans = []
    for stream in streams:
        ident = metadata.leg_for_label(stream.label) if metadata is not None else None
        fields = identity_fields(ident)
        name = leg_name(stream, fields["role"], used)
        used.add(name)
        plans.append(LegPlan(stream, name, fields))
    return plans


def participants(metadata: Any, legs: dict[str, str]) -> list[dict[str, str]]:
    """call.started's ``participants``: every party of the metadata, with the leg that
    carries its voice (``legs``: label -> leg name) where one does."""
    if metadata is None:
        return []
    by_participant: dict[str, str] = {}
    for label, leg in legs.items():
        ident = metadata.leg_for_label(label)
        if ident is not None and getattr(ident, "participant_id", None):
            by_participant.setdefault(ident.participant_id, leg)
    out = []
    for party in list(getattr(metadata, "participants", ()))[:64]:
        entry: dict[str, str] = {}
        leg = by_participant.get(getattr(party, "participant_id", "") or "")
        if leg:
            entry["leg"] = leg
        role = (getattr(party, "role", None) or "unknown").lower()
        entry["role"] = role if role in ROLES else "unknown"
        for key, attr, limit in (("name", "name", 256), ("number", "number", 64), ("aor", "aor", 512)):
            value = clean(getattr(party, attr, None) or "")[:limit]
            if value:
                entry[key] = value
        out.append(entry)
    return out


def _receiver(gw: "Gateway", peer_host: str, stream: sdp.RecordedStream) -> RtpReceiver:
    s = gw.settings
    return RtpReceiver(
        expected_host=stream.remote_host,
        expected_port=stream.remote_port,
        codecs={stream.payload_type: stream.codec},
        dtmf_payload_type=stream.dtmf_payload_type,
        jitter_delay=s.rtp_jitter_ms / 1000.0,
        signalling_host=peer_host,
        latch=s.rtp_latch,
        dtmf_per_second=s.dtmf_max_per_s,
        dtmf_per_call=s.dtmf_max_per_call,
    )


async def _open_sockets(gw: "Gateway", count: int) -> tuple[list[RtpSocket], list[list[Callable[..., None]]]]:
    """``count`` RTP sockets, lowest port first (the first stream gets the lowest), each
    delivering to the handler later put in its box; NoFreePortError/OSError closes them all."""
    opened: list[tuple[RtpSocket, list[Callable[..., None]]]] = []
    try:
        for _ in range(count):
            box: list[Callable[..., None]] = []
            sock = await open_rtp_socket(gw.settings.rtp_host, gw.ports,
                                         lambda data, addr, box=box: box[0](data, addr) if box else None)
            opened.append((sock, box))
    except BaseException:
        for sock, _box in opened:
            sock.close()
        raise
    opened.sort(key=lambda pair: pair[0].port)
    return [sock for sock, _ in opened], [box for _, box in opened]


def _bad(gw: "Gateway", dialog_id: str, status: int, reason: str, outcome: str) -> None:
    log.info("SIPREC INVITE refused: %d %s", status, reason)
    gw._reject(dialog_id, status, reason, outcome=outcome)


async def answer(gw: "Gateway", event: "IncomingCall", route: "Route", trunk: "Trunk | None",
                 from_uri: str, to_uri: str) -> None:
    """Answer a SIPREC INVITE (called by the gateway once admission and the dialplan took it);
    the route's profile (language, turns, partials, redaction, recording) applies as to any call."""
    from .app import call_partials, call_turn_config  # the same per-call options as a plain SIP call
    dialog_id = event.dialog_id
    request = event.request
    s = gw.settings
    try:
        body = split_body(request.headers.get("content-type") or "", request.body)
        if body.metadata is None:
            raise SiprecError("SIPREC INVITE without recording metadata (application/rs-metadata+xml)")
        metadata = parse_metadata(body.metadata)
    except SiprecError as exc:
        _bad(gw, dialog_id, 400, f"Bad Request - {exc.reason}", "bad-siprec")
        return
    if not body.sdp.strip():
        _bad(gw, dialog_id, 488, "Not Acceptable Here - SIPREC INVITE without an SDP offer", "bad-siprec")
        return
    srtp_policy, _refusal = gw._srtp_policy(trunk, event.peer.transport)
    if srtp_policy == "required":
        _bad(gw, dialog_id, 488, "Not Acceptable Here - SRTP is not supported on SIPREC streams", "srtp")
        return
    try:
        offer = sdp.SessionDescription.parse(body.sdp)
        streams = sdp.recorded_streams(offer)[:MAX_STREAMS]
    except sdp.NoAcceptableCodec as exc:
        _bad(gw, dialog_id, 488, f"Not Acceptable Here - {exc.reason}", "no-codec")
        return
    except sdp.SdpError as exc:
        _bad(gw, dialog_id, 400, f"Bad Request - Malformed SDP: {exc.reason}", "bad-sdp")
        return
    try:
        sockets, boxes = await _open_sockets(gw, len(streams))
    except (OSError, NoFreePortError) as exc:
        log.error("no RTP ports for a new SIPREC call: %s", exc)
        gw._reject(dialog_id, 503, "Service Unavailable - No RTP Port", [("Retry-After", str(s.retry_after_s))],
                   "overload")
        return
    plans = plan_legs(streams, metadata)
    local_host = gw.ua.local_host_for(request)
    session_id = uuid.uuid4().int % (2**31 - 1) + 1
    ports = {plan.stream.index: sock.port for plan, sock in zip(plans, sockets)}
    answer_sdp = sdp.answer_recording(offer, streams, ports, local_host=local_host, session_id=session_id,
                                      session_version=1).to_bytes()
    first, first_socket = plans[0], sockets[0]
    now = time.monotonic()
    call = Call(
        call_id=str(uuid.uuid4()),
        dialog_id=dialog_id,
        leg=first.leg,
        receiver=_receiver(gw, event.peer.host, first.stream),
        answered_at=now,
        local_port=first_socket.port,
        codec=first.stream.codec,
        session_id=session_id,
        language=None if route.language == "auto" else route.language or s.asr_language or None,
        clock=time.monotonic,
        siprec=True,
        label=first.stream.label,
        mline=first.stream.index,
        metadata=metadata,
        last_answer=answer_sdp,
        peer_host=event.peer.host,
    )
    call.socket = first_socket
    boxes[0].append(call.on_datagram)
    for plan, sock, box in zip(plans[1:], sockets[1:], boxes[1:]):
        recorded = RecordedLeg(leg=plan.leg, label=plan.stream.label, mline=plan.stream.index,
                               receiver=_receiver(gw, event.peer.host, plan.stream), local_port=sock.port,
                               codec=plan.stream.codec, socket=sock, paused=plan.stream.paused)
        call.recorded.append(recorded)
        box.append(lambda data, addr, r=recorded: call.on_recorded(r, data, addr))
    call.set_hold(first.stream.paused and all(r.paused for r in call.recorded), now)
    if gw._setting_up.pop(dialog_id, False):  # cancelled while we were setting up
        for sock in sockets:
            sock.close()
        return
    gw.calls[dialog_id] = call
    if not gw.ua.answer(dialog_id, answer_sdp, now):  # lost a race with CANCEL
        gw.sip.flush()
        gw.calls.pop(dialog_id, None)
        for sock in sockets:
            sock.close()
        return
    gw.sip.flush()
    gw.metrics.calls.labels("answered").inc()
    assert gw.sessions is not None
    labels = {plan.stream.label: plan.leg for plan in plans}
    started: dict[str, Any] = {
        "codec": first.stream.codec,
        "local_media_port": first_socket.port,
        "transport": event.peer.transport,
        **route.started_fields,  # dialplan_rule, dialplan_version, dialplan_profile
        "trunk": trunk.name if trunk is not None else "",
        "remote_media": f"{first.stream.remote_host}:{first.stream.remote_port}",
        "participants": participants(metadata, labels),
    }
    origins = {r.leg: call.leg_origin(r) for r in call.recorded}
    specs = [LegSpec(plan.leg, origin_ms=origins.get(plan.leg), identity=plan.identity) for plan in plans]
    sip_call_id = clean(request.headers.get("Call-ID") or "")
    call.session = gw.sessions.open(
        Source("siprec", (("call_id", sip_call_id), ("transport", event.peer.transport))), specs,
        session_id=call.call_id, sip_call_id=sip_call_id, from_uri=from_uri, to_uri=to_uri,
        language=call.language, tags=route.tags, started=started, origin_ms=call.origin_ms, admit=False,
        redact=route.redact, turn_config=call_turn_config(s, route), partials=call_partials(s, route),
        record=route.record)
    log.info("SIPREC call %s: %s", call.call_id,
             ", ".join(f"{p.leg}={p.stream.label}:{p.identity.get('role')}" for p in plans))


def apply_identities(call: Call) -> None:
    """Every leg's event fields from the call's metadata as it stands (after an update)."""
    session = call.session
    if session is None:
        return
    for label, leg in [(call.label, call.leg)] + [(r.label, r.leg) for r in call.recorded]:
        pipeline = session.legs.get(leg)
        if pipeline is not None:
            ident = call.metadata.leg_for_label(label) if call.metadata is not None else None  # type: ignore[attr-defined]
            pipeline.identity = identity_fields(ident)


async def reinvite(gw: "Gateway", call: Call, event: "ReInvite") -> None:
    """A re-INVITE or UPDATE of a SIPREC call: new metadata (participants joined, left,
    changed), a new stream (a new leg with its own receiver), a paused or resumed one."""
    dialog_id = event.dialog_id
    request = event.request
    ctype = request.headers.get("content-type") or ""
    metadata = call.metadata
    if has_metadata(ctype, request.body):
        try:
            body = split_body(ctype, request.body)
            if body.metadata is not None:
                update = parse_metadata(body.metadata)
                metadata = merge(metadata, update) if metadata is not None else update
        except SiprecError as exc:
            log.info("SIPREC update on %s refused: %s", call.call_id, exc.reason)
            gw.ua.reject_reinvite(dialog_id, 400, time.monotonic())
            gw.sip.flush()
            return
    if not event.offer.strip():  # metadata only
        call.metadata = metadata
        apply_identities(call)
        if request.method == "UPDATE":
            gw.ua.accept_reinvite(dialog_id, b"", time.monotonic())
        else:  # a re-INVITE without SDP: our 200 must offer; the streams as they stand
            call.sdp_version += 1
            offer = sdp.SessionDescription.parse(call.last_answer)
            offer.origin.session_version = str(call.sdp_version)
            call.last_answer = offer.to_bytes()
            gw.ua.accept_reinvite(dialog_id, call.last_answer, time.monotonic())
        gw.sip.flush()
        log.info("SIPREC call %s: metadata updated", call.call_id)
        return
    try:
        offer = sdp.SessionDescription.parse(event.offer)
        streams = sdp.recorded_streams(offer)[:MAX_STREAMS]
    except sdp.SdpError as exc:
        log.info("SIPREC re-INVITE on %s refused: %s", call.call_id, exc.reason)
        gw.ua.reject_reinvite(dialog_id, 488, time.monotonic())
        gw.sip.flush()
        return
    existing: dict[str, RecordedLeg | None] = {call.label: None, **{r.label: r for r in call.recorded}}
    new_streams = [st for st in streams if st.label not in existing]
    try:
        sockets, boxes = await _open_sockets(gw, len(new_streams))
    except (OSError, NoFreePortError) as exc:
        log.error("SIPREC call %s: no RTP port for a new stream: %s", call.call_id, exc)
        gw.ua.reject_reinvite(dialog_id, 503, time.monotonic())
        gw.sip.flush()
        return
    if call.ending or call.session is None or call.session.ended:
        for sock in sockets:
            sock.close()
        return
    call.metadata = metadata
    ports: dict[int, int] = {}
    offered = {st.label for st in streams}
    for st in streams:
        if st.label not in existing:
            continue
        recorded = existing[st.label]
        receiver = call.receiver if recorded is None else recorded.receiver
        receiver.update(expected_host=st.remote_host, expected_port=st.remote_port,
                        codecs={st.payload_type: st.codec}, dtmf_payload_type=st.dtmf_payload_type)
        if recorded is None:
            call.mline, call.codec = st.index, st.codec
            ports[st.index] = call.local_port
        else:
            recorded.mline, recorded.codec, recorded.paused = st.index, st.codec, st.paused
            ports[st.index] = recorded.local_port
    for recorded in call.recorded:
        if recorded.label not in offered:
            recorded.paused = True  # its m-line is gone (or port 0): nothing more comes on it
    taken = set(call.session.legs)
    plans = plan_legs(new_streams, metadata, taken)
    for plan, sock, box in zip(plans, sockets, boxes):
        recorded = RecordedLeg(leg=plan.leg, label=plan.stream.label, mline=plan.stream.index,
                               receiver=_receiver(gw, call.peer_host, plan.stream),
                               local_port=sock.port, codec=plan.stream.codec, socket=sock,
                               paused=plan.stream.paused)
        call.recorded.append(recorded)
        box.append(lambda data, addr, r=recorded: call.on_recorded(r, data, addr))
        call.session.add_leg(LegSpec(plan.leg, identity=plan.identity), origin_ms=call.leg_origin(recorded))
        ports[plan.stream.index] = sock.port
        log.info("SIPREC call %s: stream %s joined as leg %s", call.call_id, plan.stream.label, plan.leg)
    first_paused = next((st.paused for st in streams if st.label == call.label), True)
    call.set_hold(first_paused and all(r.paused for r in call.recorded), time.monotonic())
    apply_identities(call)
    call.sdp_version += 1
    call.last_answer = sdp.answer_recording(offer, streams, ports, local_host=gw.ua.local_host_for(request),
                                            session_id=call.session_id,
                                            session_version=call.sdp_version).to_bytes()
    gw.ua.accept_reinvite(dialog_id, call.last_answer, time.monotonic())
    gw.sip.flush()
