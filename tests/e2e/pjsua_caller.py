"""Places real SIP calls with PJSIP (pjsua2) and plays a WAV file into each.

Run as its own process (pjsua2 owns threads and global state):

    python tests/e2e/pjsua_caller.py --target 127.0.0.1:5060 --calls 20 --wav a.wav [--wav b.wav ...]

Each call i plays wav[i % len(wav)] (16-bit PCM WAV, 8 or 16 kHz), optionally sends
DTMF digits after the audio, waits --hold seconds, hangs up, and the script prints
one JSON line per call: {"index", "call_id" (SIP Call-ID), "wav", "status", "confirmed",
"disconnect_reason"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave

import pjsua2 as pj


def wav_seconds(path: str) -> float:
    with wave.open(path, "rb") as w:
        return w.getnframes() / w.getframerate()


class Call(pj.Call):
    follow_transfer = False  # --follow-transfer: accept a REFER (202) and call its Refer-To target

    def __init__(self, account: pj.Account, index: int, wav: str) -> None:
        super().__init__(account)
        self.account = account
        self.transfer: dict | None = None  # the REFER we followed: its target
        self.child: Call | None = None  # the new call to the transfer target
        self.index = index
        self.wav = wav
        self.player: pj.AudioMediaPlayer | None = None
        self.confirmed_at: float | None = None
        self.disconnected = False
        self.status = 0
        self.reason = ""
        self.sip_call_id = ""

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        info = self.getInfo()
        self.sip_call_id = info.callIdString
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.confirmed_at is None:
            self.confirmed_at = time.monotonic()
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            self.status = info.lastStatusCode
            self.reason = info.lastReason

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        if not self.follow_transfer:
            prm.statusCode = 603
            return
        prm.statusCode = 202
        self.transfer = {"target": prm.dstUri}
        self.child = Call(self.account, self.index, self.wav)
        prm.newCall = self.child

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        info = self.getInfo()
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                if self.player is None:
                    self.player = pj.AudioMediaPlayer()
                    self.player.createPlayer(self.wav, pj.PJMEDIA_FILE_NO_LOOP)
                    self.player.startTransmit(self.getAudioMedia(media.index))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port of the gateway")
    parser.add_argument("--user", default="1000")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--wav", action="append", required=True)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds to stay up after the audio")
    parser.add_argument("--dtmf", default="", help="digits to send (RFC 4733) after the audio")
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    # SIP over TLS and SRTP (tests/e2e/test_tls_srtp.py)
    parser.add_argument("--tls-ca", default="", help="PEM CA file the gateway's certificate must verify against")
    parser.add_argument("--tls-cert", default="", help="our client certificate (PEM), for trunks that require one")
    parser.add_argument("--tls-key", default="", help="its private key (PEM)")
    parser.add_argument("--srtp", choices=("off", "optional", "mandatory"), default="off",
                        help="SDES-SRTP: optional offers RTP/AVP with a=crypto, mandatory RTP/SAVP")
    parser.add_argument("--srtp-suite", action="append", default=[],
                        help="offer only these SDES suites (default: PJSIP's list)")
    parser.add_argument("--srtp-any-signalling", action="store_true",
                        help="offer SRTP keys over UDP/TCP too (PJSIP's default refuses to)")
    parser.add_argument("--auth-user", default="", help="digest username (trunks with auth)")
    parser.add_argument("--auth-password", default="")
    parser.add_argument("--auth-algorithm", choices=("any", "MD5", "SHA-256"), default="any",
                        help="answer only a challenge in this digest algorithm")
    parser.add_argument("--bind", default="", help="local address to send from (e.g. 127.0.0.2)")
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between call starts")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--delayed-offer", action="store_true", help="INVITE without SDP (offer in the 200)")
    parser.add_argument("--follow-transfer", action="store_true",
                        help="accept a REFER and call its target; that call is hung up --transfer-hold s after it is up")
    parser.add_argument("--transfer-hold", type=float, default=1.0)
    parser.add_argument("--hold-at", type=float, default=0.0,
                        help="seconds after answer to put the call on hold (re-INVITE), resumed 1 s later")
    args = parser.parse_args()
    Call.follow_transfer = args.follow_transfer

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.maxCalls = max(4, args.calls + 2)
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.userAgent = "pjsua2-earshot-test"
    cfg.logConfig.level = 1
    cfg.logConfig.consoleLevel = 1
    cfg.medConfig.noVad = True  # send every packet: the gateway must find the silence itself
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.port = 0
    if args.bind:
        tcfg.boundAddress = args.bind
    kind = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}[args.transport]
    if args.transport == "tls":
        tls = tcfg.tlsConfig
        tls.method = pj.PJSIP_TLSV1_2_METHOD
        if args.tls_ca:
            tls.CaListFile = args.tls_ca
            tls.verifyServer = True
        if args.tls_cert:
            tls.certFile = args.tls_cert
            tls.privKeyFile = args.tls_key
    ep.transportCreate(kind, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()
    # G.711 only, PCMU first, as a PBX trunk would offer
    for codec in ep.codecEnum2():
        cid = codec.codecId
        prio = 255 if cid.startswith("PCMU/") else 254 if cid.startswith("PCMA/") else 0
        ep.codecSetPriority(cid, prio)

    account = pj.Account()
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:tester@{args.bind or '127.0.0.1'}"
    if args.auth_user:
        cred = pj.AuthCredInfo("digest", "*", args.auth_user, 0, args.auth_password)
        cred.algoType = {"any": pj.PJSIP_AUTH_ALGORITHM_NOT_SET, "MD5": pj.PJSIP_AUTH_ALGORITHM_MD5,
                         "SHA-256": pj.PJSIP_AUTH_ALGORITHM_SHA256}[args.auth_algorithm]
        acfg.sipConfig.authCreds.append(cred)
    media = acfg.mediaConfig
    if args.bind:
        media.transportConfig.boundAddress = args.bind  # RTP from the signalling address too
    media.srtpUse = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL,
                     "mandatory": pj.PJMEDIA_SRTP_MANDATORY}[args.srtp]
    media.srtpSecureSignaling = 0 if args.srtp_any_signalling else 1  # 1: SRTP only over TLS (PJSIP's default)
    if args.srtp != "off":
        media.srtpOpt.keyings.clear()
        media.srtpOpt.keyings.append(pj.PJMEDIA_SRTP_KEYING_SDES)
        for name in args.srtp_suite:
            crypto = pj.SrtpCrypto()
            crypto.name = name
            media.srtpOpt.cryptos.append(crypto)
    account.create(acfg)

    suffix = f";transport={args.transport}" if args.transport != "udp" else ""
    uri = f"sip:{args.user}@{args.target}{suffix}"
    calls: list[Call] = []
    durations = [wav_seconds(w) for w in args.wav]
    deadline = time.monotonic() + args.timeout
    for i in range(args.calls):
        call = Call(account, i, args.wav[i % len(args.wav)])
        prm = pj.CallOpParam(True)
        if args.delayed_offer:
            prm.opt.flag |= pj.PJSUA_CALL_NO_SDP_OFFER
        call.makeCall(uri, prm)
        calls.append(call)
        end = time.monotonic() + args.stagger
        while time.monotonic() < end:
            ep.libHandleEvents(10)

    dtmf_sent: set[int] = set()
    hung_up: set[int] = set()
    held: set[int] = set()
    resumed: set[int] = set()
    def everyone() -> list[Call]:
        return calls + [c.child for c in calls if c.child is not None]

    while time.monotonic() < deadline and not all(c.disconnected for c in everyone()):
        ep.libHandleEvents(10)
        now = time.monotonic()
        for call in calls:  # a followed transfer: the new call stays up --transfer-hold s
            child = call.child
            if child is not None and child.confirmed_at is not None and not child.disconnected \
                    and not getattr(child, "hung_up", False) and now >= child.confirmed_at + args.transfer_hold:
                child.hangup(pj.CallOpParam(True))
                child.hung_up = True
        for call in calls:
            if call.disconnected or call.confirmed_at is None or call.index in hung_up:
                continue
            audio_end = call.confirmed_at + durations[call.index % len(durations)]
            if args.hold_at and call.index not in held and now >= call.confirmed_at + args.hold_at:
                call.setHold(pj.CallOpParam(True))
                held.add(call.index)
            if args.hold_at and call.index in held and call.index not in resumed \
                    and now >= call.confirmed_at + args.hold_at + 1.0:
                prm = pj.CallOpParam(True)
                prm.opt.flag |= pj.PJSUA_CALL_UNHOLD
                call.reinvite(prm)
                resumed.add(call.index)
            if args.dtmf and call.index not in dtmf_sent and now >= audio_end:
                call.dialDtmf(args.dtmf)
                dtmf_sent.add(call.index)
            if now >= audio_end + args.hold:
                call.hangup(pj.CallOpParam(True))
                hung_up.add(call.index)
    end = time.monotonic() + 2
    while time.monotonic() < end and not all(c.disconnected for c in everyone()):
        ep.libHandleEvents(10)
    for call in calls:
        transfer = None
        if call.transfer is not None:
            child = call.child
            transfer = {**call.transfer, "call_id": child.sip_call_id if child else "",
                        "confirmed": bool(child and child.confirmed_at is not None),
                        "status_at_end": child.status if child else None}
        print(json.dumps({"transfer": transfer,
            "index": call.index, "call_id": call.sip_call_id, "wav": call.wav, "status": call.status,
            "confirmed": call.confirmed_at is not None, "disconnect_reason": call.reason,
            "held": call.index in held, "resumed": call.index in resumed,
        }), flush=True)
    ok = all(c.confirmed_at is not None for c in calls)
    for call in calls:
        if call.player is not None:
            call.player = None
        if call.child is not None:
            call.child.player = None
            call.child = None
    # Every Call must be gone before libDestroy: the loop variable holds the last one, and its
    # destructor after libDestroy trips pjsua's assertion in pjsua_call_set_user_data.
    call = None  # type: ignore[assignment]
    calls.clear()
    ep.libDestroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
