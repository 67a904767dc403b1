"""Writes the seed corpora of the fuzz targets into ``bench/fuzz/seeds/<target>/``.

    .venv/bin/python bench/fuzz/seeds.py

Seeds are valid (or nearly valid) protocol traffic, so that mutations start from
messages that reach deep into each parser: INVITE/ACK/BYE/CANCEL/OPTIONS/UPDATE/
INFO and responses over UDP and TCP framing, SDP offers (RTP/AVP, RTP/SAVP with
``a=crypto``, hold, multi-stream), RTP audio, comfort noise and telephone-event
packets, Realtime and Twilio JSON sessions. Multi-message seeds use the record
format of :mod:`bench.fuzz.targets` (``SEP`` between records, a control byte first).
The files are committed; re-run this script after changing it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.fuzz.targets import SEP  # noqa: E402
from gateway.rtp.packet import build_rtp  # noqa: E402

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

# -- SIP ----------------------------------------------------------------------------------

HOST = "127.0.0.1"
US = "127.0.0.1:5060"
#: the UA's deterministic tags in the fuzz harness: the first tag it makes, then the BYE branch
FIRST_TAG = "0000000000000001"
BYE_BRANCH = "z9hG4bK00000000000000000002"

OFFER = (
    "v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 49170 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)
SAVP_OFFER = (
    "v=0\r\no=- 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 49172 RTP/SAVP 0 101\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32\r\n"
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj\r\n"
    "a=crypto:3 AEAD_AES_128_GCM inline:w7W5e4PuqB1VQQ5vPFM4PjlWMX7+UidJZlAaXQ==\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)


def sip(method: str, branch: str, cseq: int, *, to_tag: str = "", body: str = "", transport: str = "UDP",
        call_id: str = "a84b4c76e66710@127.0.0.1", extra: str = "", cseq_method: str | None = None) -> bytes:
    to = f"<sip:earshot@{US}>" + (f";tag={to_tag}" if to_tag else "")
    head = (
        f"{method} sip:earshot@{US}{';transport=tcp' if transport == 'TCP' else ''} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:5062;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f'From: "Alice" <sip:alice@{HOST}>;tag=1928301774\r\n'
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"Contact: <sip:alice@{HOST}:5062{';transport=tcp' if transport == 'TCP' else ''}>\r\n"
        + extra
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body.encode())}\r\n\r\n"
    )
    return (head + body).encode()


def response(status: int, reason: str, branch: str, method: str, cseq: int = 1) -> bytes:
    return (
        f"SIP/2.0 {status} {reason}\r\nVia: SIP/2.0/UDP {US};branch={branch};rport=5060\r\n"
        f"From: <sip:earshot@{US}>;tag={FIRST_TAG}\r\nTo: \"Alice\" <sip:alice@{HOST}>;tag=1928301774\r\n"
        f"Call-ID: a84b4c76e66710@127.0.0.1\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


COMPACT = (
    "INVITE sip:earshot@127.0.0.1 SIP/2.0\r\n"
    "v: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKcompact;rport\r\n"
    "v: SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bKup;received=192.0.2.1\r\n"
    "f: Bob <sip:bob@127.0.0.1>;tag=88\r\nt: sip:earshot@127.0.0.1\r\ni: compact-1\r\n"
    "CSeq: 7\r\n INVITE\r\nm: <sip:bob@127.0.0.1:5062>;expires=60\r\n"
    "Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    "Route: <sip:127.0.0.1;lr>\r\nRequire: \r\nSupported: timer, 100rel\r\nSession-Expires: 1800;refresher=uac\r\n"
    "Accept: application/sdp, multipart/mixed\r\nc: application/sdp\r\nl: 0\r\n\r\n"
)
MULTIPART_BODY = (
    "--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\n" + OFFER + "\r\n"
    "--unique-boundary-1\r\nContent-Type: application/isup;version=itu-t92+\r\n"
    "Content-Disposition: signal;handling=optional\r\n\r\n\x01\x00\x49\x00\x00\x03\x02\x00\x07\x04\x10\r\n"
    "--unique-boundary-1--\r\n"
)


def sip_messages() -> dict[str, bytes]:
    multipart = sip("INVITE", "z9hG4bKmp", 1, body=MULTIPART_BODY).replace(
        b"Content-Type: application/sdp\r\n", b'Content-Type: multipart/mixed;boundary="unique-boundary-1"\r\n', 1
    )
    return {
        "invite_udp": sip("INVITE", "z9hG4bK776asdhds", 1, body=OFFER),
        "invite_tcp": sip("INVITE", "z9hG4bKtcp1", 1, body=OFFER, transport="TCP"),
        "invite_savp": sip("INVITE", "z9hG4bKsavp", 1, body=SAVP_OFFER, transport="TLS"),
        "invite_delayed_offer": sip("INVITE", "z9hG4bKdelayed", 1),
        "invite_compact_folded": COMPACT.encode(),
        "invite_multipart": multipart,
        "invite_auth": sip("INVITE", "z9hG4bKauth", 2, body=OFFER, call_id="auth-1@127.0.0.1", extra=(
            'Authorization: Digest username="trunk1", realm="earshot", nonce="abc123", '
            'uri="sip:earshot@127.0.0.1:5060", response="6629fae49393a05397450978507c4ef1", '
            'algorithm=SHA-256, qop=auth, nc=00000001, cnonce="0a4f113b"\r\n')),
        "ack": sip("ACK", "z9hG4bKack1", 1, to_tag=FIRST_TAG),
        "bye": sip("BYE", "z9hG4bKbye1", 2, to_tag=FIRST_TAG),
        "cancel": sip("CANCEL", "z9hG4bK776asdhds", 1, cseq_method="CANCEL"),
        "options": sip("OPTIONS", "z9hG4bKopt", 1, extra="Accept: application/sdp\r\n"),
        "update": sip("UPDATE", "z9hG4bKupd", 3, to_tag=FIRST_TAG, body=OFFER),
        "info": sip("INFO", "z9hG4bKinfo", 4, to_tag=FIRST_TAG, body="", extra="Info-Package: dtmf\r\n"),
        "register": sip("REGISTER", "z9hG4bKreg", 1, extra="Expires: 3600\r\n"),
        "response_100": response(100, "Trying", BYE_BRANCH, "BYE", 1),
        "response_200_bye": response(200, "OK", BYE_BRANCH, "BYE", 1),
        "response_487": response(487, "Request Terminated", BYE_BRANCH, "BYE", 1),
        "response_603": response(603, "Decline", "z9hG4bKother", "INVITE", 1),
    }


def record(control: int, body: bytes) -> bytes:
    return bytes([control]) + body


def ctl(step: int = 0, tcp: bool = False, action: int = 0, peer: int = 0) -> int:
    """Control byte of a useragent record: see :func:`bench.fuzz.targets.useragent`."""
    return step | (8 if tcp else 0) | (action << 4) | (peer << 6)


def useragent_flows() -> dict[str, bytes]:
    m = sip_messages()
    tcp = {k: sip(*a, transport="TCP", **kw) for k, a, kw in (
        ("invite", ("INVITE", "z9hG4bKt1", 1), {"body": OFFER}),
        ("ack", ("ACK", "z9hG4bKt2", 1), {"to_tag": FIRST_TAG}),
        ("bye", ("BYE", "z9hG4bKt3", 2), {"to_tag": FIRST_TAG}),
    )}
    flows = {
        "call_udp": [record(ctl(action=1), m["invite_udp"]), record(ctl(step=2), m["ack"]),
                     record(ctl(step=5), m["bye"])],
        "call_tcp": [record(ctl(tcp=True, action=1), tcp["invite"]), record(ctl(step=2, tcp=True), tcp["ack"]),
                     record(ctl(step=1, tcp=True), b"\r\n\r\n"), record(ctl(step=5, tcp=True), tcp["bye"])],
        # one TCP message split over two reads, then two messages in one read
        "call_tcp_split": [record(ctl(tcp=True), tcp["invite"][:100]),
                           record(ctl(tcp=True, action=1), tcp["invite"][100:]),
                           record(ctl(step=2, tcp=True), tcp["ack"] + tcp["bye"])],
        "cancel": [record(ctl(), m["invite_udp"]), record(ctl(step=3), m["cancel"]),
                   record(ctl(step=2), m["ack"].replace(b"z9hG4bKack1", b"z9hG4bK776asdhds"))],
        "reject": [record(ctl(action=2), m["invite_udp"]),
                   record(ctl(step=1), m["ack"].replace(b"z9hG4bKack1", b"z9hG4bK776asdhds"))],
        "reinvite_update": [
            record(ctl(action=1), m["invite_udp"]), record(ctl(step=2), m["ack"]),
            record(ctl(step=5, action=1), sip("INVITE", "z9hG4bKre1", 2, to_tag=FIRST_TAG, body=OFFER.replace(
                "a=sendrecv", "a=sendonly"))),
            record(ctl(step=2), sip("ACK", "z9hG4bKre2", 2, to_tag=FIRST_TAG)),
            record(ctl(step=4, action=1), m["update"]), record(ctl(step=4), m["info"]),
            record(ctl(step=4), m["options"]), record(ctl(step=5), sip("BYE", "z9hG4bKbye9", 9, to_tag=FIRST_TAG)),
        ],
        "local_hangup": [record(ctl(action=1), m["invite_udp"]), record(ctl(step=2, action=3), m["ack"]),
                         record(ctl(step=2), m["response_100"]), record(ctl(step=3), m["response_200_bye"])],
        "ack_timeout": [record(ctl(action=1), m["invite_udp"]), record(ctl(step=6), b""),
                        record(ctl(step=4), m["response_487"])],
        "delayed_offer": [record(ctl(action=1), m["invite_delayed_offer"]),
                          record(ctl(step=2), sip("ACK", "z9hG4bKack1", 1, to_tag=FIRST_TAG, body=OFFER)),
                          record(ctl(step=5), m["bye"])],
        "retransmissions": [record(ctl(), m["invite_udp"]), record(ctl(step=4), m["invite_udp"]),
                            record(ctl(step=4, action=1), m["invite_udp"]), record(ctl(step=2), m["ack"]),
                            record(ctl(step=2), m["ack"]), record(ctl(step=5), m["bye"]),
                            record(ctl(step=2), m["bye"])],
        "out_of_dialog": [record(ctl(), m["options"]), record(ctl(peer=1), m["register"]),
                          record(ctl(peer=2), m["invite_compact_folded"]), record(ctl(peer=3), m["invite_multipart"]),
                          record(ctl(), m["response_603"]), record(ctl(), m["bye"]),
                          record(ctl(), b"\r\n\r\n"), record(ctl(), m["invite_auth"])],
        # with admission control: a digest trunk (401 challenge), an unverified trunk, session timers
        "trunks_and_timers": [
            record(ctl(peer=2, action=1), sip("INVITE", "z9hG4bKpbx1", 1, body=OFFER, call_id="pbx-1")),
            record(ctl(step=2, peer=2), sip("ACK", "z9hG4bKpbx1", 1, call_id="pbx-1", to_tag=FIRST_TAG)),
            record(ctl(step=2, peer=2, action=1), sip("INVITE", "z9hG4bKpbx2", 2, body=OFFER, call_id="pbx-1", extra=(
                'Authorization: Digest username="pbx", realm="earshot", nonce="AAAA", uri="sip:earshot@127.0.0.1:5060", '
                'response="00000000000000000000000000000000", algorithm=MD5, qop=auth, nc=00000001, cnonce="c"\r\n'))),
            record(ctl(step=1, peer=3, action=1), sip("INVITE", "z9hG4bKsbc1", 1, body=OFFER, call_id="sbc-1",
                                                      extra="Session-Expires: 90\r\nSupported: timer\r\n")),
            record(ctl(step=1, peer=3, action=1), sip("INVITE", "z9hG4bKsbc2", 2, body=OFFER, call_id="sbc-1",
                                                      extra="Session-Expires: 1800;refresher=uac\r\nMin-SE: 90\r\n"
                                                            "Supported: timer\r\nRequire: timer\r\n")),
            record(ctl(step=1, action=1), sip("INVITE", "z9hG4bKlo1", 1, body=OFFER, call_id="lo-1",
                                              extra="Session-Expires: 120;refresher=uas\r\nSupported: timer\r\n")),
            record(ctl(step=2), sip("ACK", "z9hG4bKlo2", 1, call_id="lo-1", to_tag="0000000000000004")),
            record(ctl(step=6, action=1), sip("UPDATE", "z9hG4bKlo3", 2, call_id="lo-1", to_tag="0000000000000004",
                                              extra="Session-Expires: 120;refresher=uac\r\n")),
            record(ctl(step=7), b""),
        ],
        "tcp_garbage": [record(ctl(tcp=True), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
                        record(ctl(tcp=True, peer=1), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                        record(ctl(tcp=True, peer=2), tcp["invite"].replace(b"Content-Length", b"X-Length"))],
    }
    return {name: SEP.join(parts) for name, parts in flows.items()}


def framer_streams() -> dict[str, bytes]:
    m = sip_messages()
    tcp = sip("INVITE", "z9hG4bKt1", 1, body=OFFER, transport="TCP")
    return {
        "one_message": record(0, tcp),
        "pipelined": record(0, tcp + m["bye"] + m["options"]),
        "split": SEP.join(record(0, tcp[i : i + 37]) for i in range(0, len(tcp), 37)),
        "keepalives": SEP.join([record(0, b"\r\n\r\n"), record(0, b"\r\n"), record(0, b"\r\n"), record(0, tcp)]),
        "bare_lf": record(0, tcp.replace(b"\r\n", b"\n")),
        "folded_length": record(0, m["options"].replace(b"Content-Length: 0", b"Content-Length:\r\n 0")),
        "compact_length": record(0, m["invite_compact_folded"]),
        "no_length": record(0, m["options"].replace(b"Content-Length: 0\r\n", b"")),
        "tls_hello": record(0, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)),
    }


# -- SDP ----------------------------------------------------------------------------------

def sdp_offers() -> dict[str, bytes]:
    offers = {
        "pcmu_pcma_dtmf": OFFER,
        "savp_crypto": SAVP_OFFER,
        "savp_and_avp": (
            "v=0\r\no=- 8 8 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
            "m=audio 49174 RTP/SAVP 8\r\nc=IN IP4 127.0.0.1\r\n"
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj|2^31\r\n"
            "m=audio 49176 RTP/AVP 8\r\nc=IN IP4 127.0.0.1\r\n"
        ),
        "hold_sendonly": OFFER.replace("a=sendrecv", "a=sendonly"),
        "hold_zero_address": OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0"),
        "inactive": OFFER.replace("a=sendrecv", "a=inactive"),
        "ipv6_video": (
            "v=0\r\no=- 3 4 IN IP6 2001:db8::1\r\ns=call\r\ni=info\r\nu=http://x\r\ne=a@b\r\np=+1 555\r\n"
            "c=IN IP6 2001:db8::1\r\nb=AS:64\r\nt=0 0\r\nr=604800 3600 0 90000\r\nz=2882844526 -1h\r\n"
            "k=prompt\r\na=group:BUNDLE 0 1\r\n"
            "m=video 51372 RTP/AVPF 99\r\na=rtpmap:99 h263-1998/90000\r\n"
            "m=audio 49170/2 RTP/AVP 18 0 13\r\nb=CT:100\r\nk=clear:x\r\na=ptime:30\r\na=maxptime:60\r\n"
            "a=fmtp:18 annexb=no\r\na=rtcp:49171\r\na=recvonly\r\n"
        ),
        "static_only": "v=0\r\no=- 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        "no_codec": "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 9 96\r\na=rtpmap:96 opus/48000/2\r\n",
        "multicast_bare_lf": "v=0\no=- 1 1 IN IP4 224.2.1.1\ns=-\nc=IN IP4 224.2.1.1/127/3\nt=0 0\nm=audio 5000 RTP/AVP 8 0\n",
        "image_t38": "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=image 6000 udptl t38\r\na=T38FaxVersion:0\r\nm=audio 6002 RTP/AVP 8\r\n",
    }
    return {k: v.encode() for k, v in offers.items()}


# -- RTP ----------------------------------------------------------------------------------

def _pcmu(n: int) -> bytes:
    return bytes((0xFF - (i % 32)) for i in range(n))


def dtmf(code: int, end: bool, duration: int, volume: int = 10) -> bytes:
    return bytes([code, (0x80 if end else 0) | volume, duration >> 8, duration & 0xFF])


def rtp_streams() -> dict[str, bytes]:
    def rtp_ctl(step: int = 2, source: int = 0, op: int = 0) -> int:
        return step | (source << 3) | (op << 5)

    audio = [record(rtp_ctl(), build_rtp(0, 1000 + i, 160 * i, 0x1234, _pcmu(160), marker=i == 0)) for i in range(6)]
    digits = []
    for i in range(4):
        digits.append(record(rtp_ctl(step=3), build_rtp(101, 2000 + i, 8000, 0x1234, dtmf(5, False, 400 * (i + 1)))))
    for i in range(3):
        digits.append(record(rtp_ctl(step=1), build_rtp(101, 2004 + i, 8000, 0x1234, dtmf(5, True, 1600))))
    streams = {
        "audio": audio,
        "audio_loss_reorder": [audio[0], audio[2], audio[1], audio[4], record(rtp_ctl(step=4, op=5), b""), audio[5]],
        "dtmf": [audio[0], *digits, record(rtp_ctl(), build_rtp(0, 2007, 8160, 0x1234, _pcmu(160)))],
        "cn_and_pcma": [audio[0], record(rtp_ctl(step=5), build_rtp(13, 1001, 1600, 0x1234, b"\x40")),
                        record(rtp_ctl(), build_rtp(8, 1002, 3200, 0x1234, bytes(160)))],
        "ssrc_change": [audio[0], audio[1], record(rtp_ctl(step=4), build_rtp(0, 7, 99999, 0x9999, _pcmu(160))),
                        record(rtp_ctl(), build_rtp(0, 8, 100159, 0x9999, _pcmu(160)))],
        "extension_csrc_padding": [record(rtp_ctl(), build_rtp(0, 5, 800, 1, _pcmu(160), csrcs=(1, 2),
                                                               extension=(0xBEDE, b"\x10\xaa\x00\x00"), padding=4))],
        "rtcp_mux_and_foreign": [audio[0],
                                 record(rtp_ctl(), b"\x81\xc8\x00\x06" + bytes(24)),
                                 record(rtp_ctl(source=2), build_rtp(0, 1, 160, 0x5, _pcmu(160))),
                                 record(rtp_ctl(source=1), audio[1][1:])],
        "late_latch": [record(rtp_ctl(source=2), build_rtp(0, 1, 160, 0x5, _pcmu(160))),
                       record(rtp_ctl(step=6, source=2), build_rtp(0, 2, 320, 0x5, _pcmu(160))),
                       audio[0]],
        "reinvite_flush": [audio[0], record(rtp_ctl(op=6), b"\x00"), record(rtp_ctl(source=3), build_rtp(
            0, 1, 160, 0x77, _pcmu(160))), record(rtp_ctl(op=7), b"")],
        "timestamp_jump": [audio[0], record(rtp_ctl(), build_rtp(0, 1001, 40000, 0x1234, _pcmu(160))),
                           record(rtp_ctl(), build_rtp(0, 1002, 80000, 0x1234, _pcmu(160)))],
    }
    return {k: SEP.join(v) for k, v in streams.items()}


# -- Realtime and Twilio -----------------------------------------------------------------

def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def realtime_sessions() -> dict[str, bytes]:
    pcm24 = base64.b64encode(bytes(960)).decode()
    ulaw = base64.b64encode(b"\xff" * 160).decode()
    ga_update = {"type": "session.update", "event_id": "c1", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1", "language": "en",
                                                                          "prompt": "x"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": 500},
        "noise_reduction": {"type": "near_field"}}}, "include": ["item.input_audio_transcription.logprobs"]}}
    beta_update = {"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "whisper-1", "language": "de"},
        "turn_detection": None, "input_audio_noise_reduction": None}}
    semantic = {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}}
    sessions = {
        "ga": [record(0, b""), record(1, _j(ga_update)),
               *[record(3, _j({"type": "input_audio_buffer.append", "audio": pcm24})) for _ in range(3)],
               record(2, _j({"type": "input_audio_buffer.commit"})), record(2, _j({"type": "input_audio_buffer.clear"})),
               record(1, _j(semantic)), record(2, _j({"type": "input_audio_buffer.append", "audio": pcm24}))],
        "beta_manual": [record(1, b""), record(0, _j(beta_update)),
                        *[record(3, _j({"type": "input_audio_buffer.append", "audio": ulaw})) for _ in range(6)],
                        record(16 | 2, _j({"type": "input_audio_buffer.commit"})),
                        record(2, _j({"type": "input_audio_buffer.commit"}))],
        "together_query": [record(0, b"model=openai/whisper-large-v3&input_audio_format=pcm_s16le_16000&language=en"
                                     b"&threshold=0.4&min_silence_duration_ms=300&speech_pad_ms=100"
                                     b"&min_speech_duration_ms=250&max_speech_duration_s=30"),
                           record(3, _j({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(641)).decode()})),
                           record(3, _j({"type": "input_audio_buffer.commit"}))],
        "query_manual": [record(0, b"turn_detection=none&input_audio_format=g711_alaw&language=auto"),
                         record(3, _j({"type": "input_audio_buffer.append", "audio": ulaw}))],
        "errors": [record(0, b"threshold=x&eagerness=wild&turn_detection=semantic_vad"),
                   record(0, b"{not json"), record(8, b"\x00\x01binary"), record(0, b"[1,2]"),
                   record(0, _j({"type": "response.create"})), record(0, _j({"type": "session.update", "session": 3})),
                   record(0, _j({"type": "input_audio_buffer.append", "audio": "!!"})),
                   record(0, _j({"type": "session.update", "session": {"type": "realtime"}}))],
    }
    return {k: SEP.join(v) for k, v in sessions.items()}


def twilio_streams() -> dict[str, bytes]:
    payload = base64.b64encode(b"\xff" * 160).decode()
    start = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
             "start": {"streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0", "accountSid": "AC123",
                       "callSid": "CA123", "tracks": ["inbound", "outbound"],
                       "customParameters": {"token": "tok", "tags": "a,b", "n": 3},
                       "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    def media(track: str, ts: int | str, chunk: int) -> bytes:
        return _j({"event": "media", "sequenceNumber": str(chunk + 2), "streamSid": "MZ1",
                   "media": {"track": track, "chunk": str(chunk), "timestamp": str(ts), "payload": payload}})

    streams = {
        "both_tracks": [record(0, _j({"event": "connected", "protocol": "Call", "version": "1.0.0"})),
                        record(0, _j(start)),
                        *[record(2, media("inbound", 20 * i, i)) for i in range(4)],
                        *[record(0, media("outbound", 20 * i + 100, i)) for i in range(3)],
                        record(2, _j({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "7"}})),
                        record(2, _j({"event": "mark", "mark": {"name": "m1"}})),
                        record(2, _j({"event": "stop", "stop": {"accountSid": "AC123", "callSid": "CA123"}}))],
        "gaps_and_rewinds": [record(0, _j(start)), record(2, media("inbound", 0, 1)),
                             record(2, media("inbound", 900000, 2)), record(2, media("inbound", 5, 3)),
                             record(5, media("inbound", 9000, 4)), record(0, _j({"event": "media", "media": {
                                 "payload": payload, "timestamp": 12.5}}))],
        "errors": [record(0, _j({"event": "media", "media": {"payload": payload}})), record(8, b"\x00"),
                   record(0, b"nope"), record(0, _j({"event": "start", "start": {"streamSid": "bad sid!"}})),
                   record(0, _j({"event": "start", "start": {"streamSid": "MZ2", "mediaFormat": {
                       "encoding": "audio/l16", "sampleRate": 16000}}}))],
    }
    return {k: SEP.join(v) for k, v in streams.items()}


# -- SIPREC -------------------------------------------------------------------------------


def _siprec_samples() -> dict[str, tuple[str, bytes]]:
    """``name -> (Content-Type, body)`` of the hand-written vendor requests in tests/siprec_samples/."""
    from tests.siprec_samples import NAMES, load, split

    out = {}
    for name in NAMES:
        out[name] = split(load(name))
        out[f"{name}_lf"] = split(load(name, crlf=False))
    return out


_SIPREC_XML = (
    '<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>'
    '<participant participant_id="p1"><participant_id>p1</participant_id><aor>tel:+1-555-0100</aor><name>A</name>'
    '<send>s1</send><extensiondata><x:callingParty xmlns:x="urn:x">true</x:callingParty></extensiondata>'
    '</participant><participant participant_id="p2" role="agent"><nameID aor="sips:b;x=y@h"/></participant>'
    '<stream stream_id="s1"><label>1</label></stream><stream stream_id="s2"><label>2</label>'
    '<extensiondata><participant>p2</participant></extensiondata></stream>'
    '<participantstreamassoc participant_id="p2"><send>s2</send><recv>s1</recv></participantstreamassoc>'
    "<!-- c --><![CDATA[x]]></recording>"
)


def siprec_bodies() -> dict[str, bytes]:
    seeds = {name: ct.encode() + b"\n" + body for name, (ct, body) in _siprec_samples().items()}
    seeds["plain_sdp"] = b"application/sdp\n" + OFFER.encode()
    seeds["metadata_only"] = b"application/rs-metadata\n" + _SIPREC_XML.encode()
    seeds["quoted_boundary_preamble"] = (
        b'multipart/mixed; boundary="a;b"\npreamble\r\n--a;b\r\nContent-Type: application/sdp\r\n\r\n'
        + OFFER.encode() + b"\r\n--a;b\r\nContent-Type: application/rs-metadata+xml\r\n"
        b"Content-Disposition: recording-session;handling=required\r\n\r\n" + _SIPREC_XML.encode() + b"\r\n--a;b--")
    return seeds


def siprec_metadata_docs() -> dict[str, bytes]:
    docs = {}
    for name, (ct, body) in _siprec_samples().items():
        if name.endswith("_lf"):
            continue
        from gateway.siprec.body import split_body

        metadata = split_body(ct, body).metadata
        if metadata is not None:
            docs[name] = metadata
    docs["avaya_invite_then_reinvite"] = SEP.join(
        record(0, docs[n]) for n in ("avaya_sbce_invite", "avaya_sbce_reinvite"))
    docs["hints_nested_partial"] = _SIPREC_XML.encode()
    docs["hints_then_swap"] = SEP.join([record(0, _SIPREC_XML.encode()), record(0, _SIPREC_XML.replace(
        "true", "false").replace('role="agent"', 'role="caller"').encode()), record(0, docs["cisco_cube"])])
    docs["undeclared_prefix"] = (b'<rs:recording><rs:participant rs:participant_id="a"><rs:nameID aor="sip:9@x"/>'
                                 b"</rs:participant></rs:recording>")
    docs["utf16"] = _SIPREC_XML.encode("utf-16")
    docs["doctype"] = b'<!DOCTYPE r [<!ENTITY x "y">]><recording/>'
    return docs


def corpora() -> dict[str, dict[str, bytes]]:
    return {
        "sip_message": sip_messages(),
        "useragent": useragent_flows(),
        "framer": framer_streams(),
        "sdp": sdp_offers(),
        "rtp": rtp_streams(),
        "realtime": realtime_sessions(),
        "twilio": twilio_streams(),
        "siprec_body": siprec_bodies(),
        "siprec_metadata": siprec_metadata_docs(),
    }


def main() -> None:
    for target, seeds in corpora().items():
        folder = os.path.join(SEEDS, target)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name, data in seeds.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds in {os.path.relpath(folder, ROOT)}")


if __name__ == "__main__":
    main()
