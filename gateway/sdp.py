"""SDP (RFC 4566) parsing/serialization and offer/answer (RFC 3264) for a listener.

Earshot only ever *receives* audio, which makes negotiation simple and its
answers honest: we answer ``recvonly`` (or ``inactive``), pick exactly one
audio stream and one codec in the offerer's order of preference, accept RFC
4733 telephone-events at whatever payload type was offered, and reject every
other stream with port 0 as RFC 3264 section 6 requires.

The parser keeps lines it does not interpret (``a=``, ``b=``, ``k=``...), so a
description survives a parse/serialize round trip, but it is strict about the
lines negotiation depends on (``v=``, ``o=``, ``c=``, ``m=``, ``rtpmap``).

SRTP with SDES (RFC 4568): ``negotiate(srtp=...)`` accepts RTP/SAVP(F)
streams, and RTP/AVP streams carrying ``a=crypto`` (best-effort SRTP, as PJSIP
and others offer it), when the policy allows; the answer takes the first
``a=crypto`` line of a suite we support, in the offerer's order, and carries
our own fresh key under the same tag.  Crypto lines we cannot honour (unknown
suite, MKI, several keys, session parameters) are skipped, as RFC 4568 6.1
asks.  Whether SDES is allowed at all (only over TLS by default: the keys are
in the SDP) is the caller's decision, passed in as the policy.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Connection",
    "Crypto",
    "MediaDescription",
    "Negotiated",
    "NoAcceptableCodec",
    "Origin",
    "RtpMap",
    "SdpError",
    "SessionDescription",
    "SrtpKeys",
    "SrtpNotAcceptable",
    "RecordedStream",
    "answer_recording",
    "build_offer",
    "negotiate",
    "recorded_streams",
    "parse_crypto",
    "parse_sdp",
    "read_answer",
    "serialize_sdp",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
RTP_PROTOS = ("RTP/AVP", "RTP/AVPF")
SRTP_PROTOS = ("RTP/SAVP", "RTP/SAVPF")
SRTP_POLICIES = ("off", "optional", "required")
#: SDES suites and their inline key length (master key + salt), our preference first (RFC 4568, RFC 7714).
#: gateway/rtp/srtp.py maps the same names to libsrtp profiles.
CRYPTO_SUITES: dict[str, int] = {
    "AEAD_AES_128_GCM": 28,
    "AES_CM_128_HMAC_SHA1_80": 30,
    "AES_CM_128_HMAC_SHA1_32": 30,
}

# RFC 3551 static payload types that a telephone trunk may offer without rtpmap.
STATIC_PAYLOADS: dict[int, tuple[str, int]] = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    4: ("G723", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    13: ("CN", 8000),
    18: ("G729", 8000),
}
# Clock rates we insist on for codecs we can decode; others are taken as offered.
CODEC_CLOCK = {"PCMU": 8000, "PCMA": 8000, "G722": 8000}

MAX_SDP_BYTES = 65536


class SdpError(ValueError):
    """Malformed SDP.  ``reason`` says which line and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoAcceptableCodec(SdpError):
    """No audio stream with a codec we can decode: answer 488."""


class SrtpNotAcceptable(NoAcceptableCodec):
    """The offer's media security does not fit the SRTP policy: answer 488."""


@dataclass(frozen=True)
class Crypto:
    """One ``a=crypto`` line (RFC 4568 9.1) with a single inline key and no MKI."""

    tag: int
    suite: str
    key: bytes  # master key followed by master salt
    lifetime: str | None = None

    def __str__(self) -> str:
        inline = base64.b64encode(self.key).decode("ascii")
        return f"{self.tag} {self.suite} inline:{inline}" + (f"|{self.lifetime}" if self.lifetime else "")


@dataclass(frozen=True)
class SrtpKeys:
    """The negotiated SDES keys of one stream: ``remote_key`` protects what the peer
    sends (we decrypt with it), ``local_key`` is ours, from our answer or offer."""

    suite: str
    remote_key: bytes
    local_key: bytes
    tag: int


@dataclass
class Origin:
    username: str = "-"
    session_id: str = "0"
    session_version: str = "0"
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def __str__(self) -> str:
        return f"{self.username} {self.session_id} {self.session_version} {self.nettype} {self.addrtype} {self.address}"


@dataclass
class Connection:
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"  # may carry /ttl[/count] for multicast

    @property
    def host(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def is_hold(self) -> bool:
        """RFC 2543-style hold: c=IN IP4 0.0.0.0."""
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass
class RtpMap:
    encoding: str
    clock_rate: int
    channels: int | None = None

    def __str__(self) -> str:
        out = f"{self.encoding}/{self.clock_rate}"
        return out + (f"/{self.channels}" if self.channels is not None else "")


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    connection: Connection | None = None
    rtpmap: dict[int, RtpMap] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: str | None = None  # None: inherit the session-level one
    ptime: int | None = None
    maxptime: int | None = None
    information: str | None = None
    bandwidths: list[str] = field(default_factory=list)
    key: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)  # others, in order

    def payload_types(self) -> list[int]:
        """Formats as integers (RTP profiles only)."""
        return [int(f) for f in self.formats]

    def encoding_of(self, pt: int) -> RtpMap | None:
        """rtpmap, or the RFC 3551 static assignment for PT < 96."""
        if pt in self.rtpmap:
            return self.rtpmap[pt]
        if pt in STATIC_PAYLOADS:
            name, rate = STATIC_PAYLOADS[pt]
            return RtpMap(name, rate)
        return None


@dataclass
class SessionDescription:
    origin: Origin = field(default_factory=Origin)
    session_name: str = "-"
    version: int = 0
    information: str | None = None
    uri: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    connection: Connection | None = None
    bandwidths: list[str] = field(default_factory=list)
    timing: list[str] = field(default_factory=lambda: ["0 0"])
    repeats: list[str] = field(default_factory=list)  # r= and z= lines, kept verbatim
    key: str | None = None
    direction: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> SessionDescription:
        """Same as :func:`parse_sdp`."""
        return parse_sdp(data)

    def to_bytes(self) -> bytes:
        """Same as :func:`serialize_sdp`."""
        return serialize_sdp(self)

    def connection_for(self, media: MediaDescription) -> Connection | None:
        return media.connection or self.connection

    def direction_of(self, media: MediaDescription) -> str:
        return media.direction or self.direction or "sendrecv"


@dataclass
class Negotiated:
    """The outcome of negotiating one offer: our answer and what it means."""

    answer: SessionDescription
    payload_type: int
    codec: str
    dtmf_payload_type: int | None
    remote_host: str
    remote_port: int
    remote_direction: str
    on_hold: bool
    ptime_ms: int
    srtp: SrtpKeys | None = None  # None: plain RTP


# ---------------------------------------------------------------------------
# Parsing

_CRYPTO_RE = re.compile(r"(\d{1,9})[ \t]+([A-Za-z0-9_]+)[ \t]+(\S+)((?:[ \t]+\S+)*)[ \t]*")
_LIFETIME_RE = re.compile(r"(?:2\^\d{1,2}|\d{1,20})")


def parse_crypto(value: str) -> Crypto:
    """Parse the value of an ``a=crypto`` attribute; raises :class:`SdpError`
    for anything we could not honour (RFC 4568: such lines are ignored)."""
    m = _CRYPTO_RE.fullmatch(value or "")
    if not m:
        raise SdpError(f"Malformed a=crypto: {str(value)[:40]!r}")
    tag, suite, key_params, session_params = int(m.group(1)), m.group(2), m.group(3), m.group(4).split()
    if suite not in CRYPTO_SUITES:
        raise SdpError(f"Unsupported crypto suite {suite[:40]!r}")
    if session_params:  # UNENCRYPTED_SRTP, KDR, FEC_ORDER...: none of them is honoured here
        raise SdpError(f"Unsupported crypto session parameter {session_params[0][:40]!r}")
    if ";" in key_params:
        raise SdpError("Several keys in one a=crypto line (needs MKI) are not supported")
    method, colon, info = key_params.partition(":")
    if method.lower() != "inline" or not colon:
        raise SdpError(f"Unsupported crypto key method {method[:20]!r}")
    key_text, *options = info.split("|")
    lifetime: str | None = None
    for option in options:
        if ":" in option:
            raise SdpError("MKI in a=crypto is not supported")
        if not _LIFETIME_RE.fullmatch(option) or lifetime is not None:
            raise SdpError(f"Malformed a=crypto key lifetime {option[:20]!r}")
        lifetime = option
    try:
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        raise SdpError("Malformed a=crypto key (not base64)") from None
    if len(key) != CRYPTO_SUITES[suite]:
        raise SdpError(f"a=crypto key for {suite} must be {CRYPTO_SUITES[suite]} bytes, got {len(key)}")
    return Crypto(tag, suite, key, lifetime)


def _cryptos(md: MediaDescription) -> list[Crypto]:
    """The stream's usable a=crypto lines, in the offerer's order."""
    out = []
    for name, value in md.attributes:
        if name.lower() == "crypto":
            try:
                out.append(parse_crypto(value or ""))
            except SdpError:
                continue
    return out

# RFC 4566 byte-string: no NUL or CR inside a line (a bare CR would reach our answer via a=fmtp).
_LINE_RE = re.compile(r"([a-z])=([^\x00\r]*)")
_RTPMAP_RE = re.compile(r"(\d{1,3})\s+([A-Za-z0-9_.\-]+)/(\d{1,6})(?:/(\d{1,2}))?\s*")
_FMTP_RE = re.compile(r"(\d{1,3})\s+(.*)")


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"Malformed c= line: {value[:60]!r}")
    host = parts[2].split("/", 1)[0]
    if not host or not re.fullmatch(r"[A-Za-z0-9.:\-_]+", host):
        raise SdpError(f"Malformed c= address: {host[:60]!r}")
    return Connection(parts[0], parts[1], parts[2])


def _parse_media(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpError(f"Malformed m= line: {value[:60]!r}")
    media, port_text, proto, *formats = parts
    port_str, slash, count_str = port_text.partition("/")
    # isascii(): str.isdigit() is also true for "²", which int() refuses
    if not _digits(port_str) or int(port_str) > 65535 or (slash and not _digits(count_str)):
        raise SdpError(f"Malformed m= port: {port_text[:20]!r}")
    if proto.upper().startswith("RTP/"):
        for fmt in formats:
            if not _digits(fmt) or int(fmt) > 127:
                raise SdpError(f"Malformed payload type in m= line: {fmt[:20]!r}")
    return MediaDescription(
        media=media,
        port=int(port_str),
        proto=proto,
        formats=formats,
        port_count=int(count_str) if slash else None,
    )


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _parse_int_attr(name: str, value: str | None) -> int:
    if value is None or not re.fullmatch(r"[ \t]*[0-9]{1,5}(\.[0-9]+)?[ \t]*", value):  # \s, \d: Unicode too
        raise SdpError(f"Malformed a={name} attribute")
    return int(float(value))


def parse_sdp(data: bytes) -> SessionDescription:
    """Parse one session description; raises :class:`SdpError`."""
    if len(data) > MAX_SDP_BYTES:
        raise SdpError("SDP too large")
    text = data.decode("utf-8", errors="replace")
    lines = [line for line in re.split(r"\r?\n", text) if line.strip()]
    if not lines:
        raise SdpError("Empty SDP")
    sd = SessionDescription(timing=[])
    current: MediaDescription | None = None
    seen_origin = False
    for index, line in enumerate(lines):
        m = _LINE_RE.fullmatch(line.rstrip("\r"))
        if not m:
            raise SdpError(f"Malformed SDP line {index + 1}: {line[:40]!r}")
        kind, value = m.group(1), m.group(2)
        if index == 0:
            if kind != "v" or value.strip() != "0":
                raise SdpError("SDP must start with v=0")
            continue
        if kind == "v":
            raise SdpError("Duplicate v= line")
        if kind == "m":
            current = _parse_media(value)
            sd.media.append(current)
            continue
        if kind == "a":
            name, colon, attr_value = value.partition(":")
            _apply_attribute(sd, current, name.strip(), attr_value if colon else None)
            continue
        if current is not None:
            if kind == "c":
                current.connection = _parse_connection(value)
            elif kind == "i":
                current.information = value
            elif kind == "b":
                current.bandwidths.append(value)
            elif kind == "k":
                current.key = value
            # other letters are not allowed at media level; ignore them
            continue
        if kind == "o":
            parts = value.split()
            if len(parts) != 6:
                raise SdpError("Malformed o= line")
            sd.origin = Origin(*parts)
            seen_origin = True
        elif kind == "s":
            sd.session_name = value
        elif kind == "i":
            sd.information = value
        elif kind == "u":
            sd.uri = value
        elif kind == "e":
            sd.emails.append(value)
        elif kind == "p":
            sd.phones.append(value)
        elif kind == "c":
            sd.connection = _parse_connection(value)
        elif kind == "b":
            sd.bandwidths.append(value)
        elif kind == "t":
            sd.timing.append(value)
        elif kind in ("r", "z"):
            sd.repeats.append(f"{kind}={value}")
        elif kind == "k":
            sd.key = value
        # unknown letters: ignored (be liberal with what trunks send)
    if not seen_origin:
        raise SdpError("Missing o= line")
    if not sd.timing:
        sd.timing = ["0 0"]
    return sd


def _apply_attribute(sd: SessionDescription, media: MediaDescription | None, name: str, value: str | None) -> None:
    lname = name.lower()
    if lname in DIRECTIONS and value is None:
        if media is not None:
            media.direction = lname
        else:
            sd.direction = lname
        return
    if media is None:
        sd.attributes.append((name, value))
        return
    if lname == "rtpmap":
        m = _RTPMAP_RE.fullmatch(value or "")
        if not m:
            # A broken rtpmap (RFC 4475's "a=rtpmap:31 LPC") only costs us
            # that payload type; keep it verbatim rather than refuse the call.
            media.attributes.append((name, value))
            return
        media.rtpmap[int(m.group(1))] = RtpMap(
            m.group(2), int(m.group(3)), int(m.group(4)) if m.group(4) else None
        )
    elif lname == "fmtp":
        m = _FMTP_RE.fullmatch(value or "")
        if not m:
            raise SdpError(f"Malformed a=fmtp: {str(value)[:40]!r}")
        media.fmtp[int(m.group(1))] = m.group(2).strip()
    elif lname == "ptime":
        media.ptime = _parse_int_attr("ptime", value)
    elif lname == "maxptime":
        media.maxptime = _parse_int_attr("maxptime", value)
    else:
        media.attributes.append((name, value))


# ---------------------------------------------------------------------------
# Serialization


def _attr(name: str, value: str | None) -> str:
    return f"a={name}" if value is None else f"a={name}:{value}"


def serialize_sdp(sd: SessionDescription) -> bytes:
    """Lines in RFC 4566 order, CRLF-terminated."""
    lines = [f"v={sd.version}", f"o={sd.origin}", f"s={sd.session_name or '-'}"]
    if sd.information is not None:
        lines.append(f"i={sd.information}")
    if sd.uri is not None:
        lines.append(f"u={sd.uri}")
    lines += [f"e={e}" for e in sd.emails] + [f"p={p}" for p in sd.phones]
    if sd.connection is not None:
        lines.append(f"c={sd.connection}")
    lines += [f"b={b}" for b in sd.bandwidths]
    lines += [f"t={t}" for t in (sd.timing or ["0 0"])]
    lines += sd.repeats
    if sd.key is not None:
        lines.append(f"k={sd.key}")
    if sd.direction is not None:
        lines.append(f"a={sd.direction}")
    lines += [_attr(n, v) for n, v in sd.attributes]
    for md in sd.media:
        port = f"{md.port}/{md.port_count}" if md.port_count is not None else str(md.port)
        lines.append(f"m={md.media} {port} {md.proto} {' '.join(md.formats)}".rstrip())
        if md.information is not None:
            lines.append(f"i={md.information}")
        if md.connection is not None:
            lines.append(f"c={md.connection}")
        lines += [f"b={b}" for b in md.bandwidths]
        if md.key is not None:
            lines.append(f"k={md.key}")
        for pt, rtpmap in md.rtpmap.items():
            lines.append(f"a=rtpmap:{pt} {rtpmap}")
        for pt, params in md.fmtp.items():
            lines.append(f"a=fmtp:{pt} {params}")
        if md.ptime is not None:
            lines.append(f"a=ptime:{md.ptime}")
        if md.maxptime is not None:
            lines.append(f"a=maxptime:{md.maxptime}")
        if md.direction is not None:
            lines.append(f"a={md.direction}")
        lines += [_attr(n, v) for n, v in md.attributes]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# ---------------------------------------------------------------------------
# Offer/answer


def _addrtype(host: str) -> str:
    try:
        return "IP6" if ipaddress.ip_address(host).version == 6 else "IP4"
    except ValueError:
        return "IP6" if ":" in host else "IP4"


def _answer_direction(offered: str) -> str:
    """We only listen: we receive what the offerer sends."""
    return "recvonly" if offered in ("sendrecv", "sendonly") else "inactive"


def _choose_codec(md: MediaDescription, wanted: dict[str, str]) -> tuple[int, str, RtpMap] | None:
    for pt in md.payload_types():
        enc = md.encoding_of(pt)
        if enc is None:
            continue
        name = wanted.get(enc.encoding.upper())
        if name is None:
            continue
        if enc.clock_rate != CODEC_CLOCK.get(name.upper(), enc.clock_rate):
            continue
        if enc.channels not in (None, 1):
            continue
        return pt, name, enc
    return None


def _dtmf_payload(md: MediaDescription) -> int | None:
    for pt in md.payload_types():
        enc = md.rtpmap.get(pt)
        if enc and enc.encoding.lower() == "telephone-event" and enc.clock_rate == 8000:
            return pt
    return None


def negotiate(
    offer: SessionDescription,
    *,
    local_host: str,
    local_port: int,
    codecs: Sequence[str] = ("PCMU", "PCMA"),
    session_id: int,
    session_version: int,
    srtp: str = "off",
    keep_srtp: SrtpKeys | None = None,
    new_key: Callable[[int], bytes] = os.urandom,
) -> Negotiated:
    """Answer ``offer`` as a pure listener; raises :class:`NoAcceptableCodec`
    (:class:`SrtpNotAcceptable` when media security is what does not fit).

    The first audio stream (RTP/AVP(F), or RTP/SAVP(F) when SRTP is allowed,
    non-zero port) carrying a codec in ``codecs`` is used, choosing the codec
    the offerer listed first; every other stream is rejected with port 0.

    ``srtp``: ``off`` (plain RTP only; a=crypto ignored), ``optional`` (SRTP
    when offered, else plain), ``required`` (a stream without a usable
    a=crypto is refused).  ``keep_srtp``: the stream's current keys (a
    re-INVITE): an unchanged offered key keeps our answer key too.
    ``new_key(n)``: ``n`` random bytes, our master key and salt.
    """
    if srtp not in SRTP_POLICIES:
        raise ValueError(f"srtp must be one of {SRTP_POLICIES}")
    wanted = {c.upper(): c for c in codecs}
    chosen_index: int | None = None
    chosen: tuple[int, str, RtpMap] | None = None
    crypto: Crypto | None = None
    srtp_refusal = ""  # why a stream was passed over for its media security
    for index, md in enumerate(offer.media):
        proto = md.proto.upper()
        if md.media.lower() != "audio" or md.port == 0 or proto not in RTP_PROTOS + SRTP_PROTOS:
            continue
        usable = _cryptos(md) if srtp != "off" else []
        candidate = usable[0] if usable else None
        if proto in SRTP_PROTOS and candidate is None:
            srtp_refusal = srtp_refusal or (
                f"SRTP ({md.proto}) offered, but not accepted here" if srtp == "off"
                else "No usable a=crypto (we take AES_CM_128_HMAC_SHA1_80/32, AEAD_AES_128_GCM; no MKI)")
            continue
        if srtp == "required" and candidate is None:
            srtp_refusal = srtp_refusal or "SRTP required: offer RTP/SAVP with a=crypto"
            continue
        pick = _choose_codec(md, wanted)
        if pick is not None:
            chosen_index, chosen, crypto = index, pick, candidate
            break
    if chosen is None or chosen_index is None:
        if not any(md.media.lower() == "audio" for md in offer.media):
            raise NoAcceptableCodec("No audio stream offered")
        if srtp_refusal:
            raise SrtpNotAcceptable(srtp_refusal)
        raise NoAcceptableCodec(f"No acceptable audio codec offered (we take {', '.join(codecs)})")
    md = offer.media[chosen_index]
    connection = offer.connection_for(md)
    if connection is None:
        raise SdpError("Missing c= line for the audio stream")
    pt, codec, encoding = chosen
    dtmf = _dtmf_payload(md)
    remote_direction = offer.direction_of(md)
    keys: SrtpKeys | None = None
    if crypto is not None:
        if keep_srtp is not None and (keep_srtp.suite, keep_srtp.remote_key) == (crypto.suite, crypto.key):
            local_key = keep_srtp.local_key
        else:
            local_key = new_key(CRYPTO_SUITES[crypto.suite])
        keys = SrtpKeys(crypto.suite, crypto.key, local_key, crypto.tag)

    answer_media: list[MediaDescription] = []
    for index, other in enumerate(offer.media):
        if index != chosen_index:
            # RFC 3264 6: rejected streams keep media, proto and formats, port 0.
            answer_media.append(MediaDescription(other.media, 0, other.proto, list(other.formats) or ["0"]))
            continue
        formats = [str(pt)] + ([str(dtmf)] if dtmf is not None else [])
        audio = MediaDescription("audio", local_port, md.proto, formats)
        audio.rtpmap[pt] = RtpMap(encoding.encoding, encoding.clock_rate, encoding.channels)
        if dtmf is not None:
            audio.rtpmap[dtmf] = RtpMap("telephone-event", 8000)
            audio.fmtp[dtmf] = md.fmtp.get(dtmf, "0-15")
        audio.ptime = md.ptime
        audio.direction = _answer_direction(remote_direction)
        if keys is not None:
            audio.attributes.append(("crypto", str(Crypto(keys.tag, keys.suite, keys.local_key))))
        answer_media.append(audio)

    addrtype = _addrtype(local_host)
    answer = SessionDescription(
        origin=Origin("earshot", str(session_id), str(session_version), "IN", addrtype, local_host),
        session_name="Earshot",
        connection=Connection("IN", addrtype, local_host),
        media=answer_media,
    )
    return Negotiated(
        answer=answer,
        payload_type=pt,
        codec=codec,
        dtmf_payload_type=dtmf,
        remote_host=connection.host,
        remote_port=md.port,
        remote_direction=remote_direction,
        on_hold=remote_direction in ("sendonly", "inactive") or connection.is_hold,
        ptime_ms=md.ptime or 20,
        srtp=keys,
    )


def build_offer(
    *,
    local_host: str,
    local_port: int,
    codecs: Sequence[str] = ("PCMU", "PCMA"),
    session_id: int,
    session_version: int,
    dtmf_payload_type: int | None = 101,
    direction: str = "recvonly",
    ptime_ms: int | None = 20,
    srtp: str = "off",
    new_key: Callable[[int], bytes] = os.urandom,
) -> SessionDescription:
    """Our offer, for a delayed-offer INVITE or an offerless re-INVITE.

    ``srtp="required"`` offers RTP/SAVP with one a=crypto per suite (fresh
    keys); ``off`` and ``optional`` offer plain RTP/AVP, which every peer
    understands (a best-effort a=crypto in RTP/AVP is not standard)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    if srtp not in SRTP_POLICIES:
        raise ValueError(f"srtp must be one of {SRTP_POLICIES}")
    reverse = {name: pt for pt, (name, _) in STATIC_PAYLOADS.items()}
    formats: list[str] = []
    proto = "RTP/SAVP" if srtp == "required" else "RTP/AVP"
    audio = MediaDescription("audio", local_port, proto, formats, ptime=ptime_ms, direction=direction)
    next_dynamic = 96
    for codec in codecs:
        pt = reverse.get(codec.upper())
        if pt is None:
            while next_dynamic == dtmf_payload_type:
                next_dynamic += 1
            pt, next_dynamic = next_dynamic, next_dynamic + 1
        formats.append(str(pt))
        audio.rtpmap[pt] = RtpMap(codec, CODEC_CLOCK.get(codec.upper(), 8000))
    if dtmf_payload_type is not None:
        formats.append(str(dtmf_payload_type))
        audio.rtpmap[dtmf_payload_type] = RtpMap("telephone-event", 8000)
        audio.fmtp[dtmf_payload_type] = "0-15"
    if srtp == "required":
        for tag, (suite, size) in enumerate(CRYPTO_SUITES.items(), start=1):
            audio.attributes.append(("crypto", str(Crypto(tag, suite, new_key(size)))))
    addrtype = _addrtype(local_host)
    return SessionDescription(
        origin=Origin("earshot", str(session_id), str(session_version), "IN", addrtype, local_host),
        session_name="Earshot",
        connection=Connection("IN", addrtype, local_host),
        media=[audio],
    )


def read_answer(offer: SessionDescription, answer: SessionDescription) -> Negotiated:
    """Interpret the peer's answer to our :func:`build_offer` offer.

    The codec is the first format in the answer's audio stream that we
    offered; the answer's direction is from the peer's point of view.  To an
    SRTP offer the answer must accept one of our a=crypto tags (RFC 4568 7.1.3).
    """
    ours = next((md for md in offer.media if md.media.lower() == "audio"), None)
    if ours is None:
        raise SdpError("Our offer has no audio stream")
    secure = ours.proto.upper() in SRTP_PROTOS
    our_cryptos = {c.tag: c for c in _cryptos(ours)}
    offered: dict[int, RtpMap] = {}
    for pt in ours.payload_types():
        enc = ours.encoding_of(pt)
        if enc is not None:
            offered[pt] = enc
    for md in answer.media:
        wanted_protos = SRTP_PROTOS if secure else RTP_PROTOS
        if md.media.lower() != "audio" or md.port == 0 or md.proto.upper() not in wanted_protos:
            continue
        keys: SrtpKeys | None = None
        if secure:
            for crypto in _cryptos(md):
                mine = our_cryptos.get(crypto.tag)
                if mine is not None and mine.suite == crypto.suite:
                    keys = SrtpKeys(crypto.suite, crypto.key, mine.key, crypto.tag)
                    break
            if keys is None:
                raise SrtpNotAcceptable("Answer accepts none of our a=crypto lines")
        codec_pt: int | None = None
        dtmf: int | None = None
        for pt in md.payload_types():
            enc = offered.get(pt)
            if enc is None:
                continue
            if enc.encoding.lower() == "telephone-event":
                dtmf = pt if dtmf is None else dtmf
            elif codec_pt is None:
                codec_pt = pt
        if codec_pt is None:
            continue
        connection = answer.connection_for(md)
        if connection is None:
            raise SdpError("Missing c= line for the audio stream")
        direction = answer.direction_of(md)
        return Negotiated(
            answer=answer,
            payload_type=codec_pt,
            codec=offered[codec_pt].encoding,
            dtmf_payload_type=dtmf,
            remote_host=connection.host,
            remote_port=md.port,
            remote_direction=direction,
            on_hold=direction in ("sendonly", "inactive") or connection.is_hold,
            ptime_ms=md.ptime or ours.ptime or 20,
            srtp=keys,
        )
    if secure:
        raise SrtpNotAcceptable("Answer has no RTP/SAVP audio stream for our SRTP offer")
    raise NoAcceptableCodec("Answer accepts none of our codecs")


# ---------------------------------------------------------------------------
# SIPREC (RFC 7866): one recorded stream per m-line


@dataclass(frozen=True)
class RecordedStream:
    """One ``m=audio`` line of a SIPREC offer that Earshot records: the SRC sends each
    party's audio ``sendonly`` on its own stream, told apart by ``a=label`` (which the
    recording metadata's ``<stream>`` elements name).  ``index`` is the m-line's position."""

    index: int
    label: str
    payload_type: int
    codec: str
    dtmf_payload_type: int | None
    remote_host: str
    remote_port: int
    remote_direction: str
    ptime_ms: int

    @property
    def paused(self) -> bool:
        """RFC 7866 9.2: the SRC pauses a recording with ``a=inactive`` (or ``c=0.0.0.0``)."""
        return self.remote_direction in ("inactive", "recvonly") or self.remote_host in ("0.0.0.0", "::")


def _label(md: MediaDescription) -> str:
    for name, value in md.attributes:
        if name.lower() == "label" and value:
            return value.strip()[:64]
    return ""


def recorded_streams(offer: SessionDescription, codecs: Sequence[str] = ("PCMU", "PCMA")) -> list[RecordedStream]:
    """The audio streams of a SIPREC offer Earshot can record, in m-line order.

    Every RTP/AVP(F) ``m=audio`` with a port and a G.711 codec counts, with its own
    connection (media-level ``c=`` wins over the session's, as Sonus/Ribbon SRCs send it)
    and its own codec, in the offerer's order.  Other lines (video, SRTP, port 0) are
    left out: :func:`answer_recording` rejects them with port 0.  Raises
    :class:`NoAcceptableCodec` when nothing can be recorded.  Labels are unique: a
    repeated or missing ``a=label`` becomes ``stream<index>``.
    """
    wanted = {c.upper(): c for c in codecs}
    out: list[RecordedStream] = []
    seen: set[str] = set()
    for index, md in enumerate(offer.media):
        if md.media.lower() != "audio" or md.port == 0 or md.proto.upper() not in RTP_PROTOS:
            continue
        pick = _choose_codec(md, wanted)
        if pick is None:
            continue
        connection = offer.connection_for(md)
        if connection is None:
            raise SdpError(f"Missing c= line for audio stream {index + 1}")
        label = _label(md)
        if not label or label in seen:
            label = f"stream{index + 1}"
        seen.add(label)
        pt, codec, _encoding = pick
        out.append(RecordedStream(index, label, pt, codec, _dtmf_payload(md), connection.host, md.port,
                                  offer.direction_of(md), md.ptime or 20))
    if not out:
        if not any(md.media.lower() == "audio" for md in offer.media):
            raise NoAcceptableCodec("No audio stream offered")
        raise NoAcceptableCodec(f"No recordable audio stream offered (RTP/AVP with {', '.join(codecs)})")
    return out


def answer_recording(offer: SessionDescription, streams: Sequence[RecordedStream], ports: dict[int, int], *,
                     local_host: str, session_id: int, session_version: int) -> SessionDescription:
    """Our answer to a SIPREC offer: each recorded stream (``ports``: m-line index -> our
    RTP port for it) ``recvonly`` (``inactive`` when the SRC paused it) on its own port,
    its ``a=label`` kept so the SRC can tell the streams apart; every other m-line
    rejected with port 0 (RFC 3264 6)."""
    by_index = {stream.index: stream for stream in streams}
    media: list[MediaDescription] = []
    for index, other in enumerate(offer.media):
        stream = by_index.get(index)
        if stream is None or index not in ports:
            media.append(MediaDescription(other.media, 0, other.proto, list(other.formats) or ["0"]))
            continue
        md = offer.media[index]
        encoding = md.encoding_of(stream.payload_type)
        assert encoding is not None  # recorded_streams chose it
        formats = [str(stream.payload_type)]
        audio = MediaDescription("audio", ports[index], md.proto, formats)
        audio.rtpmap[stream.payload_type] = RtpMap(encoding.encoding, encoding.clock_rate, encoding.channels)
        if stream.dtmf_payload_type is not None:
            formats.append(str(stream.dtmf_payload_type))
            audio.rtpmap[stream.dtmf_payload_type] = RtpMap("telephone-event", 8000)
            audio.fmtp[stream.dtmf_payload_type] = md.fmtp.get(stream.dtmf_payload_type, "0-15")
        audio.ptime = md.ptime
        audio.direction = "inactive" if stream.paused else _answer_direction(stream.remote_direction)
        audio.attributes.append(("label", _label(md) or stream.label))
        media.append(audio)
    addrtype = _addrtype(local_host)
    return SessionDescription(
        origin=Origin("earshot", str(session_id), str(session_version), "IN", addrtype, local_host),
        session_name="Earshot",
        connection=Connection("IN", addrtype, local_host),
        media=media,
    )
