"""Fuzz targets: one function per protocol core, fed raw bytes.

Each target turns one fuzzer input into calls on a sans-I/O core and fails
(raises something other than its documented error) only on a real defect.
The documented errors are *expected* for hostile input and swallowed here:

=============  ==========================================  ===============================
target         what it drives                              documented error (not a bug)
=============  ==========================================  ===============================
sip_message    ``parse_message`` + serialize round trip    ``SipParseError``
useragent      ``UserAgent`` fed UDP datagrams and TCP     none: ``receive`` must not raise,
               streams (through ``StreamFramer``) with     log ERROR or report "Internal
               fake time, playing a cooperative app        error" (its safety net)
framer         ``StreamFramer.feed`` in arbitrary chunks   ``FramingError``
sdp            ``parse_sdp``, ``parse_crypto``,            ``SdpError`` (and its subclasses
               ``negotiate`` under every SRTP policy,      ``NoAcceptableCodec``,
               ``read_answer``, serialize round trip,      ``SrtpNotAcceptable``)
               an ``RtpReceiver`` for what was agreed
rtp            ``parse_rtp``, ``DtmfDecoder``,             ``RtpError`` from ``parse_rtp``;
               ``RtpReceiver`` (receive/poll/update/       nothing from the receiver, which
               flush) with fake time                       counts and drops bad datagrams
realtime       ``RealtimeConnection`` (query string +      ``ProtocolError`` becomes an
               client JSON events)                         ``error`` event; nothing escapes
twilio         ``TwilioStream`` (Twilio JSON messages)     ``ProtocolError`` actions; nothing
                                                           escapes
siprec_body    ``split_body`` (Content-Type line, then     ``SiprecError``
               the body), then ``parse_metadata`` of
               the metadata part it finds
siprec_        ``parse_metadata`` of each record, each     ``SiprecError``
metadata       one merged (``merge``) into the previous,
               ``leg_for_label`` of every label
=============  ==========================================  ===============================

A defect is reported by raising :class:`FuzzBug` (a broken invariant) or by
letting the unexpected exception escape; atheris then saves the input as a
``crash-*`` file and ``python bench/fuzz/fuzz.py TARGET crash-file`` replays it.

Multi-message targets split their input into *records* on :data:`SEP`; the
first byte of each record is a control byte (time step, transport, what the
application does), the rest is the message. The seed corpora
(``bench/fuzz/seeds.py``) are written in that format, so libFuzzer mutates
real call flows rather than noise.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import itertools
import json
import logging
import random
import re
import secrets
import urllib.parse
from collections.abc import Callable, Iterator

from gateway import sdp
from gateway.ingest.realtime import protocol as realtime
from gateway.ingest.twilio import protocol as twilio
from gateway.rtp.dtmf import DTMF_DIGITS, DtmfDecoder
from gateway.rtp.packet import RtpError, parse_rtp
from gateway.rtp import receiver as receiver_module
from gateway.rtp.receiver import AudioChunk, RtpReceiver
from gateway.sip.events import IncomingCall, MalformedMessage, Peer, ReInvite
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.message import SipParseError, SipRequest, SipResponse, parse_message, serialize
from gateway.sip import useragent as useragent_module
from gateway.sip.useragent import UserAgent
from gateway.siprec import body as siprec_body_module
from gateway.siprec import metadata as siprec_metadata_module
from gateway.siprec.body import SiprecError

__all__ = ["SEP", "TARGETS", "FuzzBug", "records"]

#: Record separator of multi-message inputs (never inside a valid SIP, SDP or JSON text).
SEP = b"\x00\xfe\xfe\x00"
#: Time steps (seconds) a record's control byte picks from: from "at once" to past every SIP timer.
STEPS = (0.0, 0.001, 0.02, 0.06, 0.5, 4.0, 33.0, 300.0)
#: Largest message the TCP framer is built with here (small, so size limits are reached).
MAX_TCP_MESSAGE = 4096


class FuzzBug(AssertionError):
    """An invariant of a target does not hold for this input."""


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(control byte, body)`` per record; empty records are skipped."""
    for chunk in data.split(SEP):
        if chunk:
            yield chunk[0], chunk[1:]


# ---------------------------------------------------------------------------
# SIP message parser


def _comparable(msg: SipRequest | SipResponse) -> tuple[object, ...]:
    headers = [(n, v) for n, v in msg.headers if n.strip().lower() not in ("content-length", "l")]
    start = (msg.method, msg.uri) if isinstance(msg, SipRequest) else (msg.status, msg.reason)
    return (*start, headers, msg.body)


#: SipParseError reasons of the parser's size limits (gateway/sip/message.py MAX_HEADER_*)
_SIZE_LIMITS = frozenset({"Bad Request - Too Many Headers", "Bad Request - Header Line Too Long"})


def sip_message(data: bytes) -> None:
    """Only SipParseError; what parses must survive serialize -> parse unchanged.

    The round trip matters because the user agent builds every response by
    echoing the request's headers through :func:`serialize`: a value that
    re-reads differently is a response the peer reads differently.
    """
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        if not exc.reason or not 400 <= exc.status <= 599:
            raise FuzzBug(f"SipParseError without a usable reason/status: {exc.reason!r} {exc.status}") from exc
        return
    for name, value in msg.headers:
        if "\r" in value or "\n" in value:
            raise FuzzBug(f"header {name!r} kept a bare CR/LF: {value[:80]!r}")
    wire = serialize(msg)
    try:
        again = parse_message(wire)
    except SipParseError as exc:
        if exc.reason in _SIZE_LIMITS:
            return  # 200 header lines plus the Content-Length serialize adds: the input limit, not a defect
        raise FuzzBug(f"serialize() output does not parse: {exc.reason}: {wire[:200]!r}") from exc
    if _comparable(again) != _comparable(msg):
        raise FuzzBug(f"parse/serialize round trip changed the message: {wire[:200]!r}")


# ---------------------------------------------------------------------------
# SIP user agent

#: Loopback first (trusted and verified: the fuzzer reaches the call flows), a spoofed
#: loopback source, then with admission control (:func:`_admission`) a trunk that must
#: answer a digest challenge, and one that need not but whose address is unverified.
PEERS = (
    ("127.0.0.1", 5062),
    ("127.0.0.2", 40000),
    ("203.0.113.5", 5060),
    ("2001:db8::9", 5062),
)
OFFER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n"


class _CountingSecrets:
    """Stands in for :mod:`secrets` in the user agent: tags and branches from a counter,
    so an input replays identically and seeds can address the dialog the UA created
    (its first tag is ``0000000000000001``, the next token its BYE branch)."""

    def __init__(self) -> None:
        self.n = 0

    def token_hex(self, nbytes: int = 16) -> str:
        self.n += 1
        return format(self.n, f"0{2 * nbytes}x")

    def token_bytes(self, nbytes: int = 16) -> bytes:
        self.n += 1
        return self.n.to_bytes(nbytes, "big")

    def token_urlsafe(self, nbytes: int = 16) -> str:
        return self.token_hex(nbytes)

    def __getattr__(self, name: str) -> object:
        return getattr(secrets, name)


class _SipErrors(logging.Handler):
    """Collects ERROR records of the SIP core: its safety net logs every internal error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_sip_errors = _SipErrors()
_secrets = _CountingSecrets()


@contextlib.contextmanager
def _sip_harness() -> Iterator[None]:
    """Deterministic secrets and the ERROR catcher, only while one input runs (so importing
    this module changes nothing for anyone else)."""
    logger = logging.getLogger("gateway.sip")
    real, propagate = useragent_module.secrets, logger.propagate
    _secrets.n = 0
    _sip_errors.records.clear()
    useragent_module.secrets = _secrets  # type: ignore[assignment]
    logger.addHandler(_sip_errors)
    logger.propagate = False  # the fuzzer's output stays readable; the records are checked instead
    try:
        yield
    finally:
        useragent_module.secrets = real
        logger.removeHandler(_sip_errors)
        logger.propagate = propagate


def _check_ua(ua: UserAgent) -> list[object]:
    events = ua.take_events()
    if _sip_errors.records:
        record = _sip_errors.records[0]
        _sip_errors.records.clear()
        trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        raise FuzzBug(f"SIP core logged an error: {record.getMessage()}\n{trace}")
    for event in events:
        if isinstance(event, MalformedMessage) and event.reason == "Internal error":
            raise FuzzBug("UserAgent.receive hit its internal-error safety net")
    for transmit in ua.take_transmits():
        if not transmit.data:
            raise FuzzBug("empty transmit")
    return events


def useragent(data: bytes) -> None:
    """A whole call flow per input: control byte = step | tcp | action | peer.

    bits 0-2: time step (:data:`STEPS`) before the record; bit 3: TCP (through a
    per-peer :class:`StreamFramer`, as the transport does) else UDP; bits 4-5: what
    the application does after this record (0 nothing, 1 answer every waiting call and
    offer, 2 reject them, 3 hang up the newest call); bits 6-7: which peer sends it.
    """
    with _sip_harness():
        _useragent(data)


def _admission() -> object | None:
    """Admission control as the gateway runs it (gateway/sip/admission.py, issue 11): loopback,
    203.0.113.0/24 with digest auth, 2001:db8::/32 without; None where that module does not exist."""
    try:
        from gateway.sip.admission import Admission
        from gateway.trunks import LOOPBACK, Trunk, TrunkAuth, TrunkTable
    except ImportError:
        return None
    pbx = Trunk("pbx", (ipaddress.ip_network("203.0.113.0/24"),), auth=TrunkAuth("pbx", "secret"), max_calls=2)
    sbc = Trunk("sbc", (ipaddress.ip_network("2001:db8::/32"),))
    return Admission(TrunkTable([LOOPBACK, pbx, sbc]))


_UA_OPTIONS = set(inspect.signature(UserAgent).parameters)


def _useragent(data: bytes) -> None:
    options: dict[str, object] = {}
    if "session_expires" in _UA_OPTIONS:
        options["session_expires"] = 1800  # RFC 4028 session timers on: their headers get parsed
    if "admission" in _UA_OPTIONS and data[-1:] < b"\x80":  # the last byte picks: half the inputs admitted
        options["admission"] = _admission()
    ua = UserAgent(local_host="127.0.0.1", local_port=5060, **options)  # type: ignore[arg-type]
    framers: dict[int, StreamFramer] = {}
    dialogs: list[str] = []  # every call, newest last
    waiting: list[str] = []  # calls not yet answered or rejected
    offers: list[str] = []  # re-INVITEs/UPDATEs not yet answered
    now = 0.0
    for control, body in records(data):
        now += STEPS[control & 7]
        ua.handle_timers(now)
        _check_ua(ua)
        index = control >> 6
        host, port = PEERS[index]
        if control & 8:
            peer = Peer("tcp", host, port, connection=index + 1)
            framer = framers.setdefault(index, StreamFramer(max_message_bytes=MAX_TCP_MESSAGE))
            try:
                messages = framer.feed(body)
            except FramingError as exc:
                messages = exc.messages
                for message in messages:
                    ua.receive(message, peer, now)
                ua.stream_error(exc.head, exc.reason, peer)
                ua.connection_lost(index + 1)
                del framers[index]
                messages = []
            for message in messages:
                ua.receive(message, peer, now)
        else:
            ua.receive(body, Peer("udp", host, port), now)
        action = (control >> 4) & 3
        for event in _check_ua(ua):
            if isinstance(event, IncomingCall):
                dialogs.append(event.dialog_id)
                waiting.append(event.dialog_id)
            elif isinstance(event, ReInvite):
                offers.append(event.dialog_id)
        if action == 1:  # answer what waits (a call, or a re-INVITE/UPDATE)
            for dialog_id in waiting:
                ua.answer(dialog_id, OFFER, now)
            for dialog_id in offers:
                ua.accept_reinvite(dialog_id, OFFER, now)
        elif action == 2:
            for dialog_id in waiting:
                ua.reject(dialog_id, 486, now=now)
            for dialog_id in offers:
                ua.reject_reinvite(dialog_id, 488, now)
        elif action == 3 and dialogs:
            ua.hangup(dialogs[-1], now)
        if action:
            waiting.clear()
            offers.clear()
        _check_ua(ua)
    for step in (1.0, 40.0, 400.0):  # let every timer fire: retransmissions, ACK and BYE timeouts
        now += step
        ua.handle_timers(now)
        _check_ua(ua)


# ---------------------------------------------------------------------------
# TCP framer


def framer(data: bytes) -> None:
    """Chunks in, messages out: only FramingError, every message within the limit,
    the buffer bounded, and a failed framer stays failed."""
    framer = StreamFramer(max_message_bytes=MAX_TCP_MESSAGE)
    failed = False
    for _, chunk in records(data):
        try:
            messages = framer.feed(chunk)
        except FramingError as exc:
            if not exc.reason:
                raise FuzzBug("FramingError without a reason") from exc
            messages = exc.messages
            failed = True
        for message in messages:
            if not message or len(message) > MAX_TCP_MESSAGE:
                raise FuzzBug(f"framed message of {len(message)} bytes")
        if failed:
            try:
                framer.feed(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n")
            except FramingError:
                return
            raise FuzzBug("a framer that failed accepted more input")
        if framer.buffered > MAX_TCP_MESSAGE:
            raise FuzzBug(f"framer buffers {framer.buffered} bytes, over its {MAX_TCP_MESSAGE}-byte limit")


# ---------------------------------------------------------------------------
# SDP


def _receiver_for(n: sdp.Negotiated) -> RtpReceiver:
    """What gateway/app.py builds from a negotiation (``_Media.from_negotiated``)."""
    return RtpReceiver(
        expected_host=n.remote_host,
        expected_port=n.remote_port,
        codecs={n.payload_type: n.codec},
        dtmf_payload_type=n.dtmf_payload_type,
        signalling_host="203.0.113.5",
    )


#: SRTP policies to negotiate under, where gateway/sdp.py has them (``negotiate(srtp=...)``)
SRTP_POLICIES: tuple[str | None, ...] = (
    tuple(getattr(sdp, "SRTP_POLICIES", ())) or (None,)
)
_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def _fixed_key(size: int) -> bytes:
    return bytes(range(1, size + 1))


def _negotiate(offer: sdp.SessionDescription, local_host: str, policy: str | None) -> sdp.Negotiated:
    extra = {} if policy is None else {"srtp": policy, "new_key": _fixed_key}
    return sdp.negotiate(offer, local_host=local_host, local_port=40000, session_id=1, session_version=1, **extra)


def sdp_target(data: bytes) -> None:
    """parse -> serialize -> parse, a=crypto lines, negotiate under every SRTP policy (and
    its answer), read_answer, and an RtpReceiver for what was agreed."""
    try:
        offer = sdp.parse_sdp(data)
    except sdp.SdpError as exc:
        if not exc.reason:
            raise FuzzBug("SdpError without a reason") from exc
        return
    wire = sdp.serialize_sdp(offer)
    try:
        again = sdp.parse_sdp(wire)
    except sdp.SdpError as exc:
        raise FuzzBug(f"serialize_sdp() output does not parse: {exc.reason}: {wire[:200]!r}") from exc
    if sdp.serialize_sdp(again) != wire:
        raise FuzzBug(f"SDP round trip is not stable: {wire[:200]!r}")
    parse_crypto = getattr(sdp, "parse_crypto", None)
    if parse_crypto is not None:
        for md in offer.media:
            for name, value in md.attributes:
                if name.lower() == "crypto":
                    try:
                        parse_crypto(value or "")
                    except sdp.SdpError:
                        pass
    for local_host, policy in itertools.product(("198.51.100.7", "2001:db8::7"), SRTP_POLICIES):
        try:
            n = _negotiate(offer, local_host, policy)
        except sdp.SdpError:
            continue
        answer = n.answer.to_bytes()
        if _BARE_CR_LF.search(answer):
            raise FuzzBug(f"our SDP answer carries a bare CR, LF or NUL from the offer: {answer[:300]!r}")
        try:
            reread = sdp.parse_sdp(answer)
        except sdp.SdpError as exc:
            raise FuzzBug(f"our SDP answer does not parse: {exc.reason}: {answer[:300]!r}") from exc
        if reread.to_bytes() != answer:
            raise FuzzBug(f"our SDP answer does not re-read as sent: {answer[:300]!r}")
        if not 0 <= n.payload_type <= 127 or not 0 <= n.remote_port <= 65535:
            raise FuzzBug(f"negotiated out-of-range values: pt {n.payload_type} port {n.remote_port}")
        keys = getattr(n, "srtp", None)
        if policy == "required" and keys is None:
            raise FuzzBug("srtp=required negotiated plain RTP")
        if keys is not None and (policy == "off" or len(keys.remote_key) != len(keys.local_key)):
            raise FuzzBug(f"SRTP keys negotiated under srtp={policy}: {keys!r}")
        _receiver_for(n)
    for policy in SRTP_POLICIES:
        extra = {} if policy is None else {"srtp": policy, "new_key": _fixed_key}
        ours = sdp.build_offer(local_host="198.51.100.7", local_port=40000, session_id=1, session_version=1, **extra)
        try:
            _receiver_for(sdp.read_answer(ours, offer))
        except sdp.SdpError:
            pass


# ---------------------------------------------------------------------------
# RTP

_MAX_LEAD: float | None = getattr(receiver_module, "MAX_LEAD", None)
_MAX_DRIFT: float = getattr(receiver_module, "MAX_DRIFT", 0.0)
_RTP_SOURCES = (("203.0.113.5", 30000), ("203.0.113.5", 30002), ("192.0.2.66", 30000), ("::ffff:203.0.113.5", 30000))


def _check_chunks(out: list[object], position: list[int]) -> None:
    for item in out:
        if isinstance(item, AudioChunk):
            samples = len(item.pcm) // 2
            if len(item.pcm) % 2 or item.start_sample != position[0] or not 0 <= item.lost_samples <= samples:
                raise FuzzBug(f"audio chunk off the timeline: start {item.start_sample}, expected {position[0]}, "
                              f"{len(item.pcm)} bytes, {item.lost_samples} lost")
            position[0] += samples
        elif item.digit not in DTMF_DIGITS or item.duration_ms < 0:  # a DtmfEvent
            raise FuzzBug(f"bad DTMF event {item!r}")


def rtp(data: bytes) -> None:
    """Each record one datagram or operation: control bits 0-2 time step, bits 3-4
    source, bits 5-7 operation (receive / poll / re-INVITE update / flush)."""
    receiver = RtpReceiver(
        expected_host="203.0.113.5",
        expected_port=30000,
        codecs={0: "PCMU", 8: "PCMA"},
        dtmf_payload_type=101,
        signalling_host="198.51.100.9",
    )
    decoder = DtmfDecoder()
    position = [0]
    now = 100.0
    started: float | None = None  # when the receiver first latched (its timeline began)

    def check_bound() -> None:
        # the documented bound (gateway/rtp/receiver.py): audio out never runs ahead of the clock
        if started is not None and _MAX_LEAD is not None:
            limit = round(((now - started) * (1.0 + _MAX_DRIFT) + _MAX_LEAD) * receiver.clock_rate)
            if position[0] > limit:
                raise FuzzBug(f"{position[0]} samples out {now - started:.3f} s after the first packet: "
                              f"over the wall-clock bound {limit}")

    for control, body in records(data):
        check_bound()  # what the previous record released, at its time
        now += STEPS[control & 7] / 8  # RTP lives at packet pace: 0..37 s per step
        op = control >> 5
        if op == 5:
            _check_chunks(receiver.poll(now), position)
            continue
        if op == 6:
            receiver.update(expected_host="0.0.0.0" if body[:1] == b"\x00" else "203.0.113.5", expected_port=None,
                            codecs={0: "PCMU", 13: "CN"}, dtmf_payload_type=96)
            continue
        if op == 7:
            _check_chunks(receiver.flush(), position)
            continue
        try:
            packet = parse_rtp(body)
        except RtpError:
            pass
        else:
            end = len(body) - (body[-1] if body[0] & 0x20 else 0)
            if not 0 <= packet.payload_type <= 127 or len(packet.payload) > len(body) - 12 or end < 12:
                raise FuzzBug(f"parse_rtp accepted an impossible packet: {packet!r}")
            event = decoder.feed(packet)
            if event is not None and (event.digit not in DTMF_DIGITS or event.duration_ms < 0):
                raise FuzzBug(f"bad DTMF event {event!r}")
        _check_chunks(receiver.receive(body, _RTP_SOURCES[(control >> 3) & 3], now), position)
        if started is None and receiver.latched is not None:
            started = now
    _check_chunks(receiver.flush(), position)
    check_bound()
    decoder.flush()


# ---------------------------------------------------------------------------
# Realtime and Twilio


def _text(body: bytes) -> str:
    # A WebSocket text frame is valid UTF-8 by the time the endpoint sees it.
    return body.decode("utf-8", errors="replace")


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"


def realtime_target(data: bytes) -> None:
    """The first record is the query string (``?model=&input_audio_format=...``) and the
    dialect (control bit 0: beta); the others are client messages (control bit 3: sent as
    a binary frame), with ``committed()`` answered for every Commit as the edge does."""
    items = list(records(data))
    if not items:
        return
    control, query = items[0]
    params = dict(urllib.parse.parse_qsl(_text(query), keep_blank_values=True))
    conn = realtime.RealtimeConnection(session_id="sess_fuzz", query=params, beta=bool(control & 1),
                                       ids=_Ids(), clock=lambda: 1_700_000_000.0)
    for event in conn.start():
        json.dumps(event.to_wire())
    now = 0.0
    turn = 0
    for control, body in items[1:]:
        now += STEPS[control & 7]
        message: str | bytes = body if control & 8 else _text(body)
        for out in conn.receive(message, now):
            if isinstance(out, realtime.ServerEvent):
                out.to_json()
            elif isinstance(out, realtime.Commit):
                turn += 1
                for event in conn.committed(out.generation, turn if control & 16 else None):
                    event.to_json()
    conn.close(now)


def twilio_target(data: bytes) -> None:
    """Each record one WebSocket message (control bit 3: binary frame), arriving after a time step."""
    stream = twilio.TwilioStream(max_fill_ms=2_000, max_media_ms=1_000)
    now = 0.0
    for control, body in records(data):
        now += STEPS[control & 7]
        message: str | bytes = body if control & 8 else _text(body)
        for action in stream.receive(message, now):
            if isinstance(action, twilio.LegAudio) and (action.filled < 0 or len(action.pcm) < 2 * action.filled):
                raise FuzzBug(f"bad LegAudio: {len(action.pcm)} bytes, {action.filled} filled")
        for leg in stream.legs.values():
            # Each leg's audio is bounded by the stream's clock (plus the permitted lead).
            limit = round(now * twilio.SAMPLE_RATE) + stream.max_ahead + stream.max_media_bytes * stream.stats.media
            if leg.fed > limit:
                raise FuzzBug(f"leg fed {leg.fed} samples after {now} s")
    stream.close()


# ---------------------------------------------------------------------------
# SIPREC body and metadata


def _check_reason(exc: SiprecError) -> None:
    reason = exc.reason
    if not reason or not reason.isascii() or not reason.isprintable() or len(reason) > 120:
        raise FuzzBug(f"SiprecError reason unusable in a SIP reason phrase: {reason!r}") from exc


def siprec_body_target(data: bytes) -> None:
    """The first line is the Content-Type, the rest the body: only SiprecError; the SDP and the
    metadata are pieces of the body, and the metadata found is parsed (siprec_metadata's checks)."""
    content_type, _, body = data.partition(b"\n")
    try:
        got = siprec_body_module.split_body(content_type.decode("latin-1").rstrip("\r"), body)
    except SiprecError as exc:
        _check_reason(exc)
        return
    if got.sdp and got.sdp not in body:
        raise FuzzBug(f"split_body made up SDP bytes: {got.sdp[:200]!r}")
    if (got.metadata is None) != (got.metadata_type is None) or (
            got.metadata is not None and (got.metadata not in body
                                          or got.metadata_type not in siprec_body_module.METADATA_TYPES)):
        raise FuzzBug(f"inconsistent metadata part: {got.metadata_type!r} {(got.metadata or b'')[:200]!r}")
    if got.metadata is not None:
        _metadata_records([got.metadata])


def _check_metadata(meta: "siprec_metadata_module.RecordingMetadata", labels: list[str]) -> None:
    limit = siprec_metadata_module.MAX_PARTIES
    ids = [p.participant_id for p in meta.participants]
    if len(ids) != len(set(ids)) or len(ids) > limit or len(meta.streams) > limit:
        raise FuzzBug(f"participants/streams not unique or over {limit}: {ids[:10]} {len(meta.streams)} streams")
    if len({s.stream_id for s in meta.streams}) != len(meta.streams):
        raise FuzzBug("two streams with one stream_id")
    roles = {p.participant_id: p.role for p in meta.participants}
    if any(role not in siprec_metadata_module.ROLES for role in roles.values()):
        raise FuzzBug(f"a role outside {siprec_metadata_module.ROLES}: {roles}")
    if meta.participants and "customer" not in roles.values() and not any(p.role_hint for p in meta.participants):
        raise FuzzBug(f"nobody is the customer and no hint said so: {roles}")
    for label in [s.label for s in meta.streams] + labels:
        ident = meta.leg_for_label(label)
        if ident is None:
            continue
        if ident.participant_id not in roles or ident.role != roles[ident.participant_id] or ident.label != label.strip():
            raise FuzzBug(f"leg_for_label({label!r}) -> {ident!r}, not a participant of the metadata as given")


def _metadata_records(docs: list[bytes]) -> None:
    merged = None
    for xml in docs:
        try:
            meta = siprec_metadata_module.parse_metadata(xml)
        except SiprecError as exc:
            _check_reason(exc)
            continue
        _check_metadata(meta, ["1", "2", "caller", "agent"])
        if merged is None:
            merged = meta
            continue
        hinted = {p.participant_id for p in meta.participants if p.role_hint is not None}
        try:
            after = siprec_metadata_module.merge(merged, meta)
        except SiprecError as exc:
            _check_reason(exc)
            continue
        _check_metadata(after, [s.label for s in merged.streams])
        roles = {p.participant_id: p.role for p in after.participants}
        for party in merged.participants:
            if party.participant_id not in roles:
                raise FuzzBug(f"merge dropped participant {party.participant_id!r}")
            if party.participant_id not in hinted and roles[party.participant_id] != party.role:
                raise FuzzBug(f"merge changed the role of {party.participant_id!r} without a hint: "
                              f"{party.role} -> {roles[party.participant_id]}")
        merged = after
    if merged is not None and siprec_metadata_module.merge(merged, merged).participants != merged.participants:
        raise FuzzBug("merging metadata with itself changed its participants")


def siprec_metadata_target(data: bytes) -> None:
    """Each record (control byte ignored) one metadata document: the first as an INVITE's, each
    later one a re-INVITE/UPDATE merged into what came before; a single record is the whole input."""
    docs = [body for _, body in records(data)] if SEP in data else [data]
    _metadata_records(docs[:8])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sip_message": sip_message,
    "useragent": useragent,
    "framer": framer,
    "sdp": sdp_target,
    "rtp": rtp,
    "realtime": realtime_target,
    "twilio": twilio_target,
    "siprec_body": siprec_body_target,
    "siprec_metadata": siprec_metadata_target,
}


# ---------------------------------------------------------------------------
# Structure-aware mutation of the JSON targets

#: Names the JSON protocols use, so a mutation can put any of them anywhere.
JSON_KEYS = (
    "type", "event_id", "session", "audio", "input", "format", "rate", "transcription", "model", "language",
    "prompt", "turn_detection", "threshold", "prefix_padding_ms", "silence_duration_ms", "speech_pad_ms",
    "min_silence_duration_ms", "min_speech_duration_ms", "max_speech_duration_s", "eagerness", "noise_reduction",
    "include", "input_audio_format", "input_audio_transcription", "input_audio_noise_reduction",
    "event", "start", "media", "payload", "timestamp", "track", "tracks", "chunk", "customParameters",
    "mediaFormat", "encoding", "sampleRate", "channels", "streamSid", "callSid", "accountSid", "dtmf", "digit",
    "mark", "name", "stop", "sequenceNumber",
)
JSON_STRINGS = (
    "session.update", "transcription_session.update", "transcription_session.updated", "input_audio_buffer.append",
    "input_audio_buffer.commit", "input_audio_buffer.clear", "response.create", "transcription", "realtime",
    "audio/pcm", "audio/pcmu", "audio/pcma", "pcm16", "g711_ulaw", "g711_alaw", "pcm_s16le_16000", "server_vad",
    "semantic_vad", "low", "high", "auto", "near_field", "far_field", "en", "en-US", "auto", "xx-",
    "connected", "start", "media", "dtmf", "mark", "stop", "inbound", "outbound", "inbound_track", "both_tracks",
    "audio/x-mulaw", "MZ1", "bad sid!", "7", "#", "**", "", "AAAA", "/w==", "!!", "0", "-1", "99999999999999",
    "1e400", "NaN", "\u00b2", "1\u00b2", "\u0663\u0660",  # digits str.isdigit() takes and int() may not
)
JSON_VALUES: tuple[object, ...] = (
    None, True, False, 0, -1, 1, 16000, 24000, 8000, 0.5, -0.0, 1.5, 1e308, 2**63, [], {}, [None], ["inbound"],
    {"type": "server_vad"}, {"type": "semantic_vad", "eagerness": "x"}, [[[[]]]], "x" * 300,
)


def _json_nodes(value: object, parent: object = None, key: object = None) -> Iterator[tuple[object, object, object]]:
    yield parent, key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_nodes(v, value, k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_nodes(v, value, i)


def _random_json(rng: "random.Random") -> object:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(JSON_VALUES)
    if roll < 0.8:
        return rng.choice(JSON_STRINGS)
    return {rng.choice(JSON_KEYS): rng.choice(JSON_STRINGS)}


def mutate_json(data: bytes, rng: "random.Random") -> bytes | None:
    """One structural mutation of one JSON record (a value replaced by another of any
    type, a key added or dropped, a record duplicated or dropped), or None when the
    input holds no JSON record to work on."""
    parts = data.split(SEP)
    candidates = []
    for i, part in enumerate(parts):
        try:
            candidates.append((i, json.loads(part[1:].decode("utf-8"))))
        except (ValueError, UnicodeDecodeError, IndexError):
            continue
    if not candidates:
        return None
    index, doc = rng.choice(candidates)
    op = rng.random()
    if op < 0.08 and len(parts) < 64:
        parts.insert(rng.randrange(len(parts) + 1), parts[index])
        return SEP.join(parts)
    if op < 0.12 and len(parts) > 1:
        del parts[index]
        return SEP.join(parts)
    parent, key, node = rng.choice(list(_json_nodes(doc)))
    if op < 0.35 and isinstance(node, dict):
        node[rng.choice(JSON_KEYS)] = _random_json(rng)
    elif op < 0.45 and isinstance(node, dict) and node:
        del node[rng.choice(list(node))]
    elif parent is None:
        doc = _random_json(rng) if op < 0.5 else {"type": rng.choice(JSON_STRINGS)}
    else:
        parent[key] = _random_json(rng)  # type: ignore[index]
    parts[index] = parts[index][:1] + json.dumps(doc).encode()
    return SEP.join(parts)


#: Targets whose records are JSON texts, and get :func:`mutate_json` besides libFuzzer's own mutations.
JSON_TARGETS = frozenset({"realtime", "twilio"})
