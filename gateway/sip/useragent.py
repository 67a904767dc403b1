"""The SIP user agent server core: sans-I/O, one per listening address.

Feed it datagrams/framed messages with ``receive(data, peer, now)`` and the
clock with ``handle_timers(now)``; collect what it wants sent with
``take_transmits()`` and what happened with ``take_events()``.  It never
touches sockets or clocks, so whole call flows (including 32-second ACK
timeouts) run in microseconds under test with fake time.

Earshot only answers calls: it never sends INVITE, so it never has to
resolve glare (491) for its own re-INVITEs, and its only client transactions
are BYE and REFER (``refer()``: a blind transfer asked for on the call-control
stream, gateway/callcontrol.py; the caller's NOTIFYs about it are taken in the
dialog and reported as :class:`ReferNotify`).  Policy decisions (accept, reject, which SDP) belong to the
application, which gets :mod:`gateway.sip.events` and answers through
``answer()``/``reject()``/``hangup()``/``accept_reinvite()``.

No exception escapes ``receive()``: malformed input becomes a 400 (when the
request can be addressed) plus a :class:`MalformedMessage` event, and an
unexpected internal error is logged and reported the same way rather than
tearing down the transport.

With an :class:`~gateway.sip.admission.Admission` (the gateway always has one),
every message passes it before it is parsed and every request before it gets a
transaction: requests from outside the trunks are dropped (or refused once,
statelessly), sources over their budgets are dropped, and a source that is not
*verified* (see :mod:`gateway.sip.admission`) gets no 100 Trying, no timer
retransmissions, no BYE and never more bytes than it sent. Trunks with ``auth``
must answer a digest challenge (:mod:`gateway.sip.digest`) on every new INVITE.

In-dialog requests we originate (BYE, REFER) go only to the address the dialog came
from: the INVITE's source address, on its connection, or for a TCP dialog whose
connection is gone a new connection to that same IP address at the port the
remote target (or first route) names. Request-URI and Route headers still follow
RFC 3261 12.2.1.1, but neither a Contact, a Record-Route nor ``maddr`` can make
Earshot send a request to a third party.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import secrets
from collections.abc import Sequence
from dataclasses import replace

from gateway.sip.admission import Admission
from gateway.sip.dialog import Dialog, PendingAnswer, next_hop
from gateway.sip.events import (
    CallCancelled,
    CallConfirmed,
    CallEnded,
    Event,
    IncomingCall,
    MalformedMessage,
    Peer,
    ReferNotify,
    ReferResponse,
    ReInvite,
    ReInviteAck,
    SessionRefreshed,
    Transmit,
)
from gateway.sip import session_timer
from gateway.sip.message import (
    Headers,
    NameAddress,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    canonical_name,
    extract_sdp,
    format_host,
    media_type,
    parse_cseq,
    parse_message,
    serialize,
    split_list,
)
from gateway.trunks import Trunk
from gateway.sip.transaction import (
    MAGIC_COOKIE,
    ClientTransaction,
    InviteServerTransaction,
    NonInviteServerTransaction,
    ServerTransaction,
    Timed,
    TimerConfig,
    TransactionKey,
    server_key,
)

__all__ = ["UserAgent", "REASON_PHRASES"]

logger = logging.getLogger(__name__)

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    422: "Session Interval Too Small",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
    603: "Decline",
}

# Methods we answer.  UPDATE is here for RFC 4028 session refreshes (Cisco,
# FreeSWITCH) and mid-call offers; INFO so in-dialog DTMF/info packages from
# Cisco trunks get a 200 instead of killing the call.
ALLOWED_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "UPDATE", "INFO")
# Methods we know but refuse: a transcriber neither registers, subscribes,
# takes messages nor is transferred (a NOTIFY about our own REFER is taken:
# _on_notify).  PRACK is handled apart: we never send
# reliable provisional responses, so any PRACK gets 481 (RFC 3262 section 3).
REFUSED_METHODS = frozenset({"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"})
KNOWN_METHODS = frozenset(ALLOWED_METHODS) | REFUSED_METHODS | {"PRACK"}
# Option tags we implement (Require with anything else gets 420).  "timer"
# (RFC 4028) only with session_expires set: we grant it with refresher=uac,
# so we never have to refresh sessions ourselves.
SUPPORTED_OPTIONS: tuple[str, ...] = ()
# Option tags accepted in Require without being advertised in every Supported:
# "siprec" (RFC 7866): Earshot is a recording server; the gateway checks the
# recording metadata and answers each recorded stream (gateway/sdp.py, gateway/siprec/).
ACCEPTED_REQUIRE = frozenset({"siprec"})
#: body types of RFC 7865 recording metadata (the "+xml" one is the registered type; some SRCs send the other)
METADATA_TYPES = frozenset({"application/rs-metadata+xml", "application/rs-metadata"})
ACCEPTABLE_TYPES = frozenset({"application/sdp", "application/*", "*/*"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class UserAgent:
    """SIP UAS core.  See module docstring; events in :mod:`gateway.sip.events`."""

    def __init__(
        self,
        *,
        local_host: str,
        local_port: int,
        user_agent: str = "Earshot",
        t1: float = 0.5,
        t2: float = 4.0,
        t4: float = 5.0,
        admission: Admission | None = None,
        session_expires: int = 0,
        min_se: int = session_timer.RFC_MIN_SE,
    ) -> None:
        self.admission = admission  # None: every source is trusted and verified (unit tests, tools)
        # RFC 4028 (gateway/sip/session_timer.py): the longest interval granted; 0: no session timers
        self.session_expires = session_expires
        self.min_se = min_se
        self._supported = SUPPORTED_OPTIONS + (("timer",) if session_expires else ())
        self.local_host = local_host
        self.local_port = local_port
        self.local_tls_port = 5061  # SIP over TLS listens here (Via and Contact of TLS peers)
        self.user_agent = user_agent
        # Set while the gateway drains (SIGTERM): out-of-dialog OPTIONS get 503 + Retry-After, so a
        # load balancer probing with OPTIONS (Kamailio's dispatcher) takes this gateway out of its set
        # before any INVITE is refused; in-dialog OPTIONS of the calls still up stay 200.
        self.draining = False
        self.draining_retry_after = 30
        self.timers = TimerConfig(t1=t1, t2=t2, t4=t4)
        self._transmits: list[Transmit] = []
        self._events: list[Event] = []
        self._server_txns: dict[TransactionKey, ServerTransaction] = {}
        self._client_txns: dict[str, tuple[ClientTransaction, str]] = {}
        self._dialogs: dict[str, Dialog] = {}
        self._by_call: dict[tuple[str, str], Dialog] = {}
        self._heap: list[tuple[float, int, Timed]] = []
        self._seq = itertools.count()
        self._rng = random.SystemRandom()
        self._now = 0.0

    # ------------------------------------------------------------------
    # Driving the core

    def receive(self, data: bytes, peer: Peer, now: float) -> None:
        """Process one UDP datagram or one framed TCP message."""
        self._now = now
        try:
            self._receive(data, peer, now)
        except Exception:  # a bug must not take the listener down with it
            logger.exception("SIP: internal error on message from %s:%s", peer.host, peer.port)
            self._events.append(MalformedMessage(peer, "Internal error"))

    def handle_timers(self, now: float) -> None:
        self._now = now
        for _ in range(100_000):  # bound: a timer bug must not hang the loop
            if not self._heap or self._heap[0][0] > now:
                return
            at, _, obj = heapq.heappop(self._heap)
            if obj.deadline() != at:
                continue  # superseded
            try:
                self._fire(obj, now)
            except Exception:
                logger.exception("SIP: internal error in timer")
        logger.error("SIP: timer loop did not settle")

    def next_timer(self) -> float | None:
        while self._heap:
            at, _, obj = self._heap[0]
            if obj.deadline() == at:
                return at
            heapq.heappop(self._heap)
        return None

    def take_transmits(self) -> list[Transmit]:
        out, self._transmits = self._transmits, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def connection_lost(self, connection: int) -> None:
        """A TCP connection closed: later messages for it need a new one.

        Responses then go to the source address at the Via sent-by port (RFC
        3261 18.2.2), where the peer listens, not to its old ephemeral port;
        our BYE goes to the remote target as always.
        """
        for dialog in self._dialogs.values():
            if dialog.peer.connection == connection:
                dialog.peer = replace(dialog.peer, connection=None)
            answer = dialog.pending_answer
            if answer is not None and answer.peer.connection == connection:
                answer.peer = _response_fallback(answer.request, answer.peer)
        for txn in self._server_txns.values():
            if txn.peer.connection == connection:
                txn.peer = _response_fallback(txn.request, txn.peer)

    def stream_error(self, head: bytes, reason: str, peer: Peer) -> None:
        """A TCP stream could not be framed (see :mod:`gateway.sip.framing`):
        answer 400 with ``reason`` if the offending header block can address
        one, and report it.  The transport closes the connection afterwards."""
        try:
            partial: SipRequest | None = None
            if head:
                try:
                    msg = parse_message(head + b"\r\n\r\n")
                    partial = msg if isinstance(msg, SipRequest) else None
                except SipParseError as exc:
                    partial = exc.partial
            self._malformed(SipParseError(reason, partial), peer)
        except Exception:
            logger.exception("SIP: internal error answering a stream error")

    def local_host_for(self, request: SipRequest) -> str:
        """Host for our Contact and SDP: ``local_host`` unless it is a
        wildcard, in which case the host the caller addressed (Request-URI,
        then To) is by definition one that reaches us."""
        if self.local_host not in WILDCARD_HOSTS:
            return self.local_host
        try:
            return SipUri.parse(request.uri).host
        except ValueError:
            pass
        try:
            return SipUri.parse(NameAddress.parse(request.headers.get("to") or "", "To").uri).host
        except ValueError:
            return "127.0.0.1"

    @property
    def dialog_count(self) -> int:
        return len(self._dialogs)

    # ------------------------------------------------------------------
    # Application decisions

    def answer(self, dialog_id: str, sdp: bytes, now: float) -> bool:
        """Send 200 OK with ``sdp``; retransmitted until ACK.

        Returns False (and does nothing) when the call is no longer waiting
        for an answer, e.g. the caller cancelled in the meantime.
        """
        if not sdp:
            raise ValueError("answer() needs an SDP body")
        self._now = now
        dialog = self._dialogs.get(dialog_id)
        if dialog is None or dialog.state != "pending" or dialog.invite.has_final:
            return False
        txn = dialog.invite
        data = self._response(
            txn.request, txn.peer, 200, to_tag=dialog.local_tag,
            extra=self._capabilities(txn) + self._session_timer(dialog, txn.request), body=sdp
        )
        txn.respond(200, data, now)
        dialog.state = "answered"
        cseq, _ = parse_cseq(txn.request.headers.get("cseq") or "")
        offerless = not extract_sdp(txn.request.headers.get("content-type"), txn.request.body)
        dialog.start_answer(
            PendingAnswer(cseq, data, txn.peer, self.timers.t1, offerless, reinvite=False, request=txn.request), now
        )
        return True

    def reject(
        self,
        dialog_id: str,
        status: int,
        reason: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        now: float | None = None,
    ) -> bool:
        """Final non-2xx response (486, 488, 503 + Retry-After ...).  No
        CallEnded follows: the application made the decision itself."""
        if not 300 <= status <= 699:
            raise ValueError(f"reject() needs a 3xx-6xx status, got {status}")
        now = self._now if now is None else now
        dialog = self._dialogs.get(dialog_id)
        if dialog is None or dialog.state != "pending" or dialog.invite.has_final:
            return False
        txn = dialog.invite
        data = self._response(txn.request, txn.peer, status, reason, to_tag=dialog.local_tag, extra=list(headers))
        txn.respond(status, data, now)
        self._remove_dialog(dialog)
        return True

    def hangup(self, dialog_id: str, now: float) -> bool:
        """End the call from our side.

        Answered: BYE (CallEnded("local-bye") once it is answered or times
        out).  Not yet answered: 480 and CallEnded("local-bye") at once.
        2xx sent but not yet ACKed: the BYE waits for the ACK (RFC 3261
        section 15) or for the ACK timeout.
        """
        self._now = now
        dialog = self._dialogs.get(dialog_id)
        if dialog is None or dialog.ended or dialog.state == "terminating":
            return False
        if dialog.state == "pending":
            txn = dialog.invite
            data = self._response(txn.request, txn.peer, 480, to_tag=dialog.local_tag)
            txn.respond(480, data, now)
            self._end(dialog, "local-bye")
            self._remove_dialog(dialog)
        elif dialog.state == "answered":
            dialog.hangup_requested = True
        else:
            self._finish_pending_offer(dialog, now)
            self._send_bye(dialog, now)
        return True

    def accept_reinvite(self, dialog_id: str, sdp: bytes, now: float) -> bool:
        """200 with ``sdp`` to the pending re-INVITE/UPDATE (retransmitted
        until ACK for re-INVITE).  An UPDATE that carried no offer (SIPREC
        metadata only) is answered with an empty ``sdp``: a 200 without a body."""
        self._now = now
        dialog = self._dialogs.get(dialog_id)
        txn = dialog.offer_txn if dialog else None
        if not sdp and not (txn is not None and txn.request.method == "UPDATE" and dialog is not None
                            and dialog.offer_offerless):
            raise ValueError("accept_reinvite() needs an SDP body")
        if dialog is None or txn is None or txn.has_final:
            return False
        data = self._response(txn.request, txn.peer, 200,
                              extra=self._capabilities(txn) + self._session_timer(dialog, txn.request), body=sdp)
        txn.respond(200, data, now)
        dialog.offer_txn = None
        if isinstance(txn, InviteServerTransaction):
            if dialog.pending_answer is not None:
                dialog.stop_answer()
            cseq, _ = parse_cseq(txn.request.headers.get("cseq") or "")
            answer = PendingAnswer(
                cseq, data, txn.peer, self.timers.t1, dialog.offer_offerless, reinvite=True, request=txn.request
            )
            dialog.start_answer(answer, now)
        return True

    def reject_reinvite(self, dialog_id: str, status: int, now: float) -> bool:
        """Refuse the pending re-INVITE/UPDATE (e.g. 488); the call goes on."""
        if not 300 <= status <= 699:
            raise ValueError(f"reject_reinvite() needs a 3xx-6xx status, got {status}")
        self._now = now
        dialog = self._dialogs.get(dialog_id)
        txn = dialog.offer_txn if dialog else None
        if dialog is None or txn is None or txn.has_final:
            return False
        txn.respond(status, self._response(txn.request, txn.peer, status), now)
        dialog.offer_txn = None
        return True

    # ------------------------------------------------------------------
    # Incoming messages

    def _receive(self, data: bytes, peer: Peer, now: float) -> None:
        if not data.strip(b"\r\n\t "):
            return  # CRLF keep-alive
        adm = self.admission
        if adm is not None and not adm.datagram(peer.transport, peer.host, len(data), now):
            return  # blocked, or over its budget: not even parsed
        try:
            msg = parse_message(data)
        except SipParseError as exc:
            if adm is None or adm.trunks.match(peer.host) is not None:
                self._malformed(exc, peer)
            return
        if isinstance(msg, SipResponse):
            self._on_response(msg, now)
            return
        trunk: Trunk | None = None
        if adm is not None:
            verdict, trunk = adm.request(msg.method, peer.transport, peer.host, now)
            if verdict == "reject" and msg.method != "ACK":
                # stateless and once: no transaction, so nothing to retransmit
                self._send(self._response(msg, peer, 403, "Forbidden - Unknown Source", to_tag=self._new_tag()), peer)
            if verdict != "accept":
                return
        self._on_request(msg, peer, now, trunk)

    def _verified(self, peer: Peer) -> bool:
        """Has ``peer``'s address shown it receives what we send (gateway.sip.admission)?"""
        return self.admission is None or self.admission.is_verified(peer.transport, peer.host, self._now)

    def _malformed(self, exc: SipParseError, peer: Peer) -> None:
        self._events.append(MalformedMessage(peer, exc.reason))
        req = exc.partial
        if req is None or req.method == "ACK" or not req.headers.raw("via"):
            return  # responses and ACKs are never answered; no Via, no address
        to_tag = None
        try:
            if NameAddress.parse(req.headers.get("to") or "", "To").tag is None:
                to_tag = self._new_tag()
        except ValueError:
            pass
        self._send(self._response(req, peer, exc.status, exc.reason, to_tag=to_tag), peer)

    def _on_request(self, req: SipRequest, peer: Peer, now: float, trunk: Trunk | None = None) -> None:
        via = Via.parse(req.headers.get("via") or "")
        if req.method == "ACK":
            self._on_ack(req, via, peer, now)
            return
        key = server_key(req, via)
        existing = self._server_txns.get(key)
        if existing is not None:
            existing.retransmission(now)
            return
        txn: ServerTransaction
        if req.method == "INVITE":
            txn = InviteServerTransaction(key, req, peer, self._send, self._arm, self.timers)
        else:
            txn = NonInviteServerTransaction(key, req, peer, self._send, self._arm, self.timers)
        txn.trunk = trunk
        txn.retransmit = self._verified(peer)
        self._server_txns[key] = txn
        if req.method == "CANCEL":
            self._on_cancel(req, via, txn, now)
        else:
            self._dispatch(req, txn, now)

    def _dispatch(self, req: SipRequest, txn: ServerTransaction, now: float) -> None:
        h = req.headers
        method = req.method
        if (h.get("max-forwards") or "70").strip() == "0":
            self._reply(txn, 483, now)
            return
        if method not in KNOWN_METHODS:
            self._reply(txn, 501, now, extra=[("Allow", ", ".join(ALLOWED_METHODS))])
            return
        if method in REFUSED_METHODS and not (method == "NOTIFY" and _has_to_tag(h)):
            # (an in-dialog NOTIFY may report on our REFER: _on_notify)
            self._reply(txn, 405, now, extra=[("Allow", ", ".join(ALLOWED_METHODS))])
            return
        if req.uri.split(":", 1)[0].lower() not in ("sip", "sips", "tel"):
            self._reply(txn, 416, now)
            return
        unsupported = [t for t in h.get_all("require")
                       if t and t.lower() not in self._supported and t.lower() not in ACCEPTED_REQUIRE]
        if unsupported:
            self._reply(txn, 420, now, extra=[("Unsupported", ", ".join(unsupported))])
            return
        to_tag = NameAddress.parse(h.get("to") or "", "To").tag
        if to_tag is not None:
            self._in_dialog(req, txn, to_tag, now)
        elif method == "INVITE":
            assert isinstance(txn, InviteServerTransaction)
            self._on_invite(req, txn, now)
        elif method == "OPTIONS" and self.draining:
            self._reply(txn, 503, now, reason="Service Unavailable - Shutting Down",
                        extra=[("Retry-After", str(self.draining_retry_after))])
        elif method == "OPTIONS":
            self._reply(txn, 200, now, extra=self._capabilities(txn, contact=False))
        else:
            # BYE, UPDATE, INFO, PRACK only make sense inside a dialog.
            self._reply(txn, 481, now)

    def _in_dialog(self, req: SipRequest, txn: ServerTransaction, to_tag: str, now: float) -> None:
        h = req.headers
        dialog = self._dialogs.get(to_tag)
        from_tag = NameAddress.parse(h.get("from") or "", "From").tag or ""
        if (
            dialog is None
            or dialog.state == "pending"
            or dialog.call_id != h.get("call-id")
            or dialog.remote_tag != from_tag
        ):
            self._reply(txn, 481, now)
            return
        txn.dialog_id = dialog.id
        _adopt_connection(dialog, txn.peer)
        if req.method == "BYE":
            self._on_bye(dialog, txn, now)
            return
        if dialog.ended or dialog.state == "terminating":
            self._reply(txn, 481, now)
            return
        cseq, _ = parse_cseq(h.get("cseq") or "")
        if cseq <= dialog.remote_cseq:
            # Out of order (RFC 3261 12.2.2).  BYE skips this check above:
            # ending a call must never fail on a peer's CSeq quirk.
            self._reply(txn, 500, now, reason="Server Internal Error - CSeq out of order")
            return
        dialog.remote_cseq = cseq
        if req.method == "INVITE":
            assert isinstance(txn, InviteServerTransaction)
            self._on_offer(dialog, req, txn, now)
        elif req.method == "UPDATE":
            self._on_offer(dialog, req, txn, now)
        elif req.method in ("OPTIONS", "INFO"):
            self._reply(txn, 200, now, extra=self._capabilities(txn, contact=False) if req.method == "OPTIONS" else [])
        elif req.method == "NOTIFY":
            self._on_notify(dialog, req, txn, now)
        else:  # PRACK
            self._reply(txn, 481, now)

    def _on_invite(self, req: SipRequest, txn: InviteServerTransaction, now: float) -> None:
        h = req.headers
        if not self._authenticated(req, txn, now):
            return
        if not txn.retransmit and self.admission is not None:
            unacked = sum(1 for d in self._dialogs.values() if not d.retransmit and d.state in ("pending", "answered"))
            if unacked >= self.admission.config.max_unacked:
                self._reply(txn, 503, now, reason="Service Unavailable - Too Many Unconfirmed Calls",
                            extra=[("Retry-After", "5")])
                return
        call_id = h.get("call-id") or ""
        from_tag = NameAddress.parse(h.get("from") or "", "From").tag or ""
        cseq, _ = parse_cseq(h.get("cseq") or "")
        offer = self._body_offer(req, txn, now, metadata_ok=is_siprec(req))
        if offer is None:
            return
        existing = self._by_call.get((call_id, from_tag))
        if existing is not None:
            existing_cseq, _ = parse_cseq(existing.invite.request.headers.get("cseq") or "")
            if existing_cseq == cseq:
                # Same request over another path: merged request (RFC 3261 8.2.2.2).
                self._reply(txn, 482, now)
            else:
                # A second INVITE while the first is in progress (RFC 3261 14.2).
                retry = str(self._rng.randint(0, 10))
                self._reply(txn, 500, now, extra=[("Retry-After", retry)])
            return
        contacts = h.get_all("contact")
        if contacts:
            try:
                remote_target = NameAddress.parse(contacts[0], "Contact").uri
            except ValueError:
                self._reply(txn, 400, now, reason="Bad Request - Malformed Contact")
                return
        else:
            # RFC 3261 requires Contact in INVITE; without it the source is
            # the best target we have for our BYE.
            remote_target = f"sip:{format_host(txn.peer.host)}:{txn.peer.port}"
        if self._too_small(req, txn, now):
            return
        local_tag = self._new_tag()
        to_value = h.get("to") or ""
        dialog = Dialog(
            dialog_id=local_tag,
            call_id=call_id,
            local_tag=local_tag,
            remote_tag=from_tag,
            local_party=f"{to_value};tag={local_tag}",
            remote_party=h.get("from") or "",
            remote_target=remote_target,
            route_set=h.get_all("record-route"),
            remote_cseq=cseq,
            peer=txn.peer,
            local_host=self.local_host_for(req),
            invite=txn,
            send=self._send,
            arm=self._arm,
            timers=self.timers,
        )
        dialog.retransmit = txn.retransmit
        self._dialogs[dialog.id] = dialog
        self._by_call[(call_id, from_tag)] = dialog
        txn.dialog_id = dialog.id
        if txn.retransmit:
            # To an unverified source a 100 would only add bytes; without it the
            # client keeps resending the INVITE, and each copy may fetch the final.
            self._reply(txn, 100, now)
        self._events.append(IncomingCall(dialog.id, req, offer, txn.peer, trunk=txn.trunk, siprec=is_siprec(req)))

    def _authenticated(self, req: SipRequest, txn: InviteServerTransaction, now: float) -> bool:
        """Digest check of a new INVITE from a trunk with ``auth``; False after
        answering 401/407 (a challenge) or 403 (too many wrong answers)."""
        adm, trunk = self.admission, txn.trunk
        digest = adm.digest(trunk) if adm is not None and trunk is not None else None
        if digest is None or trunk is None or trunk.auth is None:
            return True
        assert adm is not None
        host = txn.peer.host
        if adm.auth_locked(host, now):
            self._reply(txn, 403, now, reason="Forbidden - Too Many Failed Authentications")
            return False
        proxy = trunk.auth.challenge == 407
        answers = req.headers.raw("proxy-authorization" if proxy else "authorization")
        stale = False
        for value in answers[:4]:
            result = digest.verify(req.method, req.uri, value, now)
            if result.ok:
                logger.info("SIP: INVITE from %s authenticated (trunk %s, digest %s)", host, trunk.name,
                            result.algorithm)
                adm.verify(host, now)
                txn.retransmit = True
                return True
            stale = stale or result.stale
            logger.info("SIP: digest from %s (trunk %s) refused: %s", host, trunk.name, result.reason)
        if answers and not stale and adm.auth_failed_at(host, now):
            self._reply(txn, 403, now, reason="Forbidden - Too Many Failed Authentications")
            return False
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        self._reply(txn, trunk.auth.challenge, now, extra=[(header, v) for v in digest.challenge(now, stale=stale)])
        return False

    def _body_offer(self, req: SipRequest, txn: ServerTransaction, now: float, *,
                    metadata_ok: bool = False) -> bytes | None:
        """SDP offer of an INVITE/UPDATE (b"" if none), or None after
        answering 415/406 for a body or Accept we cannot work with.
        ``metadata_ok``: a SIPREC request, whose body may be recording metadata alone."""
        h = req.headers
        accepts = h.raw("accept")
        if accepts and not any(media_type(v) in ACCEPTABLE_TYPES for v in h.get_all("accept")):
            self._reply(txn, 406, now, extra=[("Accept", "application/sdp")])
            return None
        if not req.body.strip():
            return b""
        encodings = [e.lower() for e in h.get_all("content-encoding") if e]
        if any(e != "identity" for e in encodings):
            self._reply(txn, 415, now, extra=[("Accept-Encoding", "identity"), ("Accept", "application/sdp")])
            return None
        sdp = extract_sdp(h.get("content-type"), req.body)
        if sdp is None and metadata_ok and has_metadata(h.get("content-type"), req.body):
            return b""  # SIPREC metadata without SDP (RFC 7866 7.1.1.2): no offer; the gateway reads it
        if sdp is None:
            self._reply(txn, 415, now, extra=[("Accept", "application/sdp")])
            return None
        return sdp

    def _on_offer(self, dialog: Dialog, req: SipRequest, txn: ServerTransaction, now: float) -> None:
        """re-INVITE, or UPDATE (which without a body is a session refresh)."""
        pending = dialog.offer_txn is not None and not dialog.offer_txn.has_final
        if pending or (dialog.state == "answered" and req.method == "INVITE"):
            # RFC 3261 14.2 / RFC 3311 5.2: one offer at a time.
            self._reply(txn, 500, now, extra=[("Retry-After", str(self._rng.randint(0, 10)))])
            return
        siprec = is_siprec(dialog.invite.request) or is_siprec(req)
        offer = self._body_offer(req, txn, now, metadata_ok=siprec)
        if offer is None:
            return
        contacts = req.headers.get_all("contact")
        if contacts:  # target refresh (RFC 3261 12.2.2)
            try:
                dialog.remote_target = NameAddress.parse(contacts[0], "Contact").uri
            except ValueError:
                self._reply(txn, 400, now, reason="Bad Request - Malformed Contact")
                return
        if self._too_small(req, txn, now):
            return
        if req.method == "UPDATE" and not offer and not (siprec and has_metadata(req.headers.get("content-type"),
                                                                                 req.body)):
            # a session refresh (an UPDATE with recording metadata only goes to the gateway)
            self._reply(txn, 200, now, extra=self._capabilities(txn) + self._session_timer(dialog, req))
            return
        dialog.offer_txn = txn
        dialog.offer_offerless = not offer
        if req.method == "INVITE":
            self._reply(txn, 100, now)
        self._events.append(ReInvite(dialog.id, req, offer))

    def _on_ack(self, req: SipRequest, via: Via, peer: Peer, now: float) -> None:
        txn = self._server_txns.get(server_key(req, via))
        if isinstance(txn, InviteServerTransaction) and txn.receive_ack(now):
            return  # ACK to our non-2xx: the transaction absorbs it
        h = req.headers
        to_tag = NameAddress.parse(h.get("to") or "", "To").tag
        dialog = self._dialogs.get(to_tag or "")
        if dialog is None or dialog.call_id != h.get("call-id"):
            return  # stray ACK: ACKs never get a response
        _adopt_connection(dialog, peer)
        answer = dialog.pending_answer
        cseq, _ = parse_cseq(h.get("cseq") or "")
        if answer is None or answer.cseq != cseq:
            return  # retransmitted ACK
        if self.admission is not None:
            # the ACK names our To tag, which only a receiver of our 2xx knows
            self.admission.verify(peer.host, now)
            dialog.retransmit = True
        dialog.stop_answer()
        sdp = b""
        if answer.offerless and req.body.strip():
            sdp = extract_sdp(h.get("content-type"), req.body) or b""
        if answer.reinvite:
            if answer.offerless:
                self._events.append(ReInviteAck(dialog.id, sdp))
            return
        dialog.state = "confirmed"
        self._events.append(CallConfirmed(dialog.id, sdp))
        if dialog.hangup_requested:
            self._send_bye(dialog, now)

    def _on_cancel(self, req: SipRequest, via: Via, txn: ServerTransaction, now: float) -> None:
        invite_txn = self._server_txns.get(server_key(req, via, method="INVITE"))
        if not isinstance(invite_txn, InviteServerTransaction):
            self._reply(txn, 481, now)
            return
        dialog = self._dialogs.get(invite_txn.dialog_id or "")
        to_tag = dialog.local_tag if dialog is not None and dialog.invite is invite_txn else None
        self._reply(txn, 200, now, to_tag=to_tag)
        if invite_txn.has_final:
            return  # too late: the INVITE already has its final response
        self._reply(invite_txn, 487, now, to_tag=to_tag)
        if dialog is None:
            return
        if dialog.invite is invite_txn:
            self._events.append(CallCancelled(dialog.id))
            self._end(dialog, "cancelled")
            self._remove_dialog(dialog)
        elif dialog.offer_txn is invite_txn:
            dialog.offer_txn = None

    def _on_bye(self, dialog: Dialog, txn: ServerTransaction, now: float) -> None:
        self._reply(txn, 200, now)
        if dialog.ended:
            return
        self._finish_pending_offer(dialog, now)
        dialog.stop_answer()
        self._end(dialog, "bye")
        if dialog.bye is None or dialog.bye.terminated:
            self._remove_dialog(dialog)

    def _on_response(self, resp: SipResponse, now: float) -> None:
        via = Via.parse(resp.headers.get("via") or "")
        entry = self._client_txns.get(via.branch or "")
        if entry is None:
            logger.debug("SIP: dropping stray %d response", resp.status)
            return
        txn, dialog_id = entry
        _, method = parse_cseq(resp.headers.get("cseq") or "")
        if method != txn.method:
            return
        if txn.receive_response(resp.status, now):
            self._client_finished(txn, dialog_id)

    # ------------------------------------------------------------------
    # Timers

    def _arm(self, obj: Timed) -> None:
        at = obj.deadline()
        if at is not None:
            heapq.heappush(self._heap, (at, next(self._seq), obj))

    def _fire(self, obj: Timed, now: float) -> None:
        if isinstance(obj, Dialog):
            if obj.on_timer(now):
                self._ack_timeout(obj, now)
        elif isinstance(obj, ClientTransaction):
            if obj.on_timer(now):
                self._client_finished(obj, self._client_txns.get(obj.branch, (obj, ""))[1])
            if obj.terminated:
                self._client_txns.pop(obj.branch, None)
        elif isinstance(obj, ServerTransaction):
            obj.on_timer(now)
            if obj.terminated and self._server_txns.get(obj.key) is obj:
                del self._server_txns[obj.key]

    def _ack_timeout(self, dialog: Dialog, now: float) -> None:
        """64*T1 without ACK for our 2xx: end the session with a BYE
        (RFC 3261 13.3.1.4 and 14.2)."""
        dialog.stop_answer()
        dialog.state = "confirmed"
        self._end(dialog, "ack-timeout")
        if not dialog.retransmit:
            # never verified: perhaps a spoofed INVITE; a BYE (and its retransmissions)
            # would go to a victim
            self._remove_dialog(dialog)
            return
        self._send_bye(dialog, now, reason='SIP;cause=408;text="ACK Timeout"')

    # ------------------------------------------------------------------
    # Our requests

    def _dialog_request(self, dialog: Dialog, method: str, now: float,
                        extra: list[tuple[str, str]]) -> ClientTransaction:
        """Start our ``method`` request inside ``dialog``, to the dialog's source address only
        (module docstring); ``extra`` headers follow the dialog's own."""
        request_uri, routes, hop = dialog.request_target()
        peer = next_hop(hop, dialog.peer)
        branch = MAGIC_COOKIE + secrets.token_hex(10)
        transport = peer.transport.upper() if peer.transport in ("tcp", "tls") else "UDP"
        h = Headers()
        h.add("Via", f"SIP/2.0/{transport} {format_host(dialog.local_host)}:{self._port_for(peer.transport)}"
                     f";branch={branch};rport")
        h.add("Max-Forwards", "70")
        for route in routes:
            h.add("Route", route)
        h.add("From", dialog.local_party)
        h.add("To", dialog.remote_party)
        h.add("Call-ID", dialog.call_id)
        h.add("CSeq", f"{dialog.next_cseq()} {method}")
        for name, value in extra:
            h.add(name, value)
        h.add("User-Agent", self.user_agent)
        data = serialize(SipRequest(method, request_uri, h))
        txn = ClientTransaction(branch, method, data, peer, self._send, self._arm, self.timers, now)
        self._client_txns[branch] = (txn, dialog.id)
        return txn

    def _port_for(self, transport: str) -> int:
        """Our listening port for ``transport`` (the dialog's: next_hop never changes it)."""
        return self.local_tls_port if transport == "tls" else self.local_port

    def _send_bye(self, dialog: Dialog, now: float, reason: str | None = None) -> None:
        dialog.state = "terminating"
        dialog.bye = self._dialog_request(dialog, "BYE", now, [("Reason", reason)] if reason else [])

    def refer(self, dialog_id: str, target: str, now: float) -> bool:
        """Ask the caller to call ``target`` instead (blind transfer, RFC 3515 REFER).

        Sent inside the dialog, to the dialog's source only (as BYE). The answer
        comes as :class:`ReferResponse` (202: accepted; 408 on timeout) and the
        transfer's progress as :class:`ReferNotify` (the ``message/sipfrag`` of the
        caller's NOTIFYs). False when the call is not confirmed (not yet ACKed,
        ending) or a REFER of it is still unanswered.
        """
        self._now = now
        dialog = self._dialogs.get(dialog_id)
        if dialog is None or dialog.ended or dialog.state != "confirmed" or _waiting(dialog.refer):
            return False
        if any(c in target for c in "\r\n<>\"") or ":" not in target:
            raise ValueError(f"refer(): not a URI for Refer-To: {target!r:.80}")
        transport = dialog.peer.transport
        suffix = f";transport={transport}" if transport in ("tcp", "tls") else ""
        host = format_host(dialog.local_host)
        dialog.refer = self._dialog_request(dialog, "REFER", now, [
            ("Contact", f"<sip:earshot@{host}:{self._port_for(transport)}{suffix}>"),
            ("Refer-To", f"<{target}>"),
            ("Referred-By", f"<sip:earshot@{host}>"),
        ])
        dialog.refer_subscribed = True  # NOTIFYs may overtake the 202 (RFC 3515 2.4.4)
        return True

    def _client_finished(self, txn: ClientTransaction, dialog_id: str) -> None:
        """A client transaction got its final response (``txn.result``) or timed out (408)."""
        if txn.method != "REFER":
            self._bye_finished(dialog_id)
            return
        dialog = self._dialogs.get(dialog_id)
        status = txn.result or 408
        if dialog is not None and dialog.refer is txn and status >= 300:
            dialog.refer_subscribed = False  # refused: no subscription, later NOTIFYs get 481
        self._events.append(ReferResponse(dialog_id, status))

    def _on_notify(self, dialog: Dialog, req: SipRequest, txn: ServerTransaction, now: float) -> None:
        """A NOTIFY of the implicit subscription our REFER created (RFC 3515 2.4.4): its
        ``message/sipfrag`` body is the status line of the caller's call to the target."""
        h = req.headers
        event = (h.get("event") or h.get("o") or "").split(";", 1)[0].strip().lower()
        if event != "refer":
            self._reply(txn, 489, now, reason="Bad Event")
            return
        if not dialog.refer_subscribed:
            self._reply(txn, 481, now)
            return
        state = (h.get("subscription-state") or "").split(";", 1)[0].strip().lower()
        status, phrase = _sipfrag_status(req.body)
        self._reply(txn, 200, now)
        final = state == "terminated" or (status is not None and status >= 200)
        if final:
            dialog.refer_subscribed = False
        self._events.append(ReferNotify(dialog.id, status, phrase, final))

    def _bye_finished(self, dialog_id: str) -> None:
        dialog = self._dialogs.get(dialog_id)
        if dialog is None:
            return
        self._end(dialog, "local-bye")
        self._remove_dialog(dialog)

    # ------------------------------------------------------------------
    # Helpers

    def _end(self, dialog: Dialog, reason: str) -> None:
        if not dialog.ended:
            dialog.ended = True
            self._events.append(CallEnded(dialog.id, reason))

    def _remove_dialog(self, dialog: Dialog) -> None:
        dialog.stop_answer()
        self._dialogs.pop(dialog.id, None)
        if self._by_call.get((dialog.call_id, dialog.remote_tag)) is dialog:
            del self._by_call[(dialog.call_id, dialog.remote_tag)]

    def _finish_pending_offer(self, dialog: Dialog, now: float) -> None:
        """A re-INVITE/UPDATE still waiting for the app when the call ends
        gets 487 (RFC 3261 15.1.2)."""
        txn = dialog.offer_txn
        if txn is not None and not txn.has_final:
            self._reply(txn, 487, now)
        dialog.offer_txn = None

    def _send(self, data: bytes, peer: Peer) -> None:
        if self.admission is not None and not self.admission.may_send(peer.transport, peer.host, len(data), self._now):
            logger.debug("SIP: not sending %d bytes to unverified %s: over its credit", len(data), peer.host)
            return
        self._transmits.append(Transmit(data, peer))

    def _new_tag(self) -> str:
        return secrets.token_hex(8)

    def _reply(
        self,
        txn: ServerTransaction,
        status: int,
        now: float,
        *,
        reason: str | None = None,
        to_tag: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Respond through ``txn``.  Out-of-dialog final responses get a
        fresh To tag (RFC 3261 8.2.6.2) unless one is given."""
        if to_tag is None and status > 100:
            to_value = txn.request.headers.get("to") or ""
            if ";tag=" not in to_value.replace(" ", "").lower():
                to_tag = txn.reply_tag or self._new_tag()
                txn.reply_tag = to_tag
        data = self._response(txn.request, txn.peer, status, reason, to_tag=to_tag, extra=extra)
        txn.respond(status, data, now)

    def _too_small(self, req: SipRequest, txn: ServerTransaction, now: float) -> bool:
        """RFC 4028: a Session-Expires below our Min-SE gets 422 with it (True: answered)."""
        if not self.session_expires:
            return False
        verdict = session_timer.negotiate(req.headers, interval=self.session_expires, min_se=self.min_se)
        if isinstance(verdict, session_timer.TooSmall):
            self._reply(txn, 422, now, extra=[("Min-SE", str(verdict.min_se))])
            return True
        return False

    def _session_timer(self, dialog: Dialog, req: SipRequest) -> list[tuple[str, str]]:
        """Session-timer headers for the 2xx to ``req``; tells the application what it granted."""
        if not self.session_expires:
            return []
        verdict = session_timer.negotiate(req.headers, interval=self.session_expires, min_se=self.min_se)
        if not isinstance(verdict, session_timer.SessionTimer):
            self._events.append(SessionRefreshed(dialog.id, 0))
            return []
        self._events.append(SessionRefreshed(dialog.id, verdict.interval))
        return session_timer.response_headers(verdict)

    def _capabilities(self, txn: ServerTransaction, contact: bool = True) -> list[tuple[str, str]]:
        headers = []
        if contact:
            host = format_host(self.local_host_for(txn.request))
            if txn.peer.transport == "tls":
                # RFC 5630: a sips Request-URI gets a sips Contact; else sip with transport=tls
                if txn.request.uri[:5].lower() == "sips:":
                    headers.append(("Contact", f"<sips:earshot@{host}:{self.local_tls_port}>"))
                else:
                    headers.append(("Contact", f"<sip:earshot@{host}:{self.local_tls_port};transport=tls>"))
            else:
                transport = ";transport=tcp" if txn.peer.transport == "tcp" else ""
                headers.append(("Contact", f"<sip:earshot@{host}:{self.local_port}{transport}>"))
            if is_siprec(txn.request):  # RFC 7866 6.1.2: the SRS marks its Contact with +sip.srs
                name, value = headers[-1]
                headers[-1] = (name, value + ";+sip.srs")
        headers += [
            ("Allow", ", ".join(ALLOWED_METHODS)),
            ("Accept", "application/sdp"),
        ]
        if self._supported:  # an empty Supported header is legal but trips some parsers (pyVoIP)
            headers.append(("Supported", ", ".join(self._supported)))
        return headers

    def _response(
        self,
        req: SipRequest,
        peer: Peer,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> bytes:
        """Build a response per RFC 3261 8.2.6: Via (all, top one stamped
        with received/rport), From, To (+tag), Call-ID, CSeq copied."""
        h = Headers()
        stamped = False
        dialog_creating = req.method == "INVITE" and 100 < status < 300
        for name, value in req.headers:
            key = canonical_name(name)
            if key == "via":
                if not stamped:
                    value = _stamp_via(value, peer)
                    stamped = True
                h.add(name, value)
            elif key == "to":
                if to_tag and status != 100 and ";tag=" not in value.replace(" ", "").lower():
                    value = f"{value};tag={to_tag}"
                h.add(name, value)
            elif key in ("from", "call-id", "cseq"):
                h.add(name, value)
            elif key == "record-route" and dialog_creating:
                h.add(name, value)
            elif key == "timestamp" and status == 100:
                h.add(name, value)
        h.add("Server", self.user_agent)
        for name, value in extra:
            h.add(name, value)
        if body:
            h.add("Content-Type", "application/sdp")
        phrase = reason or REASON_PHRASES.get(status) or "Unknown"
        return serialize(SipResponse(status, _safe_phrase(phrase), h, body))


def is_siprec(req: SipRequest) -> bool:
    """A SIPREC recording session (RFC 7866 6.1.1): ``Require: siprec``, or a Contact
    with the ``+sip.src`` feature tag (BroadWorks puts a ``src`` URI parameter there)."""
    if any(t.strip().lower() == "siprec" for t in req.headers.get_all("require")):
        return True
    for value in req.headers.get_all("contact")[:4]:
        try:
            address = NameAddress.parse(value, "Contact")
        except ValueError:
            continue
        if "+sip.src" in address.params:
            return True
        uri_params = address.uri.split(";")[1:]
        if any(p.split("=", 1)[0].strip().lower() in ("src", "+sip.src") for p in uri_params):
            return True
    return False


def has_metadata(content_type: str | None, body: bytes) -> bool:
    """The body is, or (multipart) holds, RFC 7865 recording metadata."""
    mtype = media_type(content_type)
    if mtype in METADATA_TYPES:
        return bool(body.strip())
    if not mtype.startswith("multipart/"):
        return False
    return re.search(rb"(?im)^(?:content-type|c)[ \t]*:[ \t]*application/rs-metadata(?:\+xml)?[ \t]*(?:;|\r?$)",
                     body) is not None


def _has_to_tag(h: Headers) -> bool:
    try:
        return NameAddress.parse(h.get("to") or "", "To").tag is not None
    except ValueError:
        return False


def _waiting(txn: ClientTransaction | None) -> bool:
    return txn is not None and txn.result is None and not txn.terminated


def _sipfrag_status(body: bytes) -> tuple[int | None, str]:
    """Status code and phrase of a ``message/sipfrag`` body (``SIP/2.0 180 Ringing``); (None, "") if none."""
    line = body.lstrip(b"\r\n ").split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    match = re.match(r"SIP/2\.0\s+([1-6][0-9][0-9])(?:\s+(.*))?$", line, re.IGNORECASE)
    if match is None:
        return None, ""
    return int(match.group(1)), _safe_phrase(match.group(2) or "")


def _stamp_via(line: str, peer: Peer) -> str:
    """Add ``received``/``rport`` to the top Via of a header line (RFC 3261
    18.2.1, RFC 3581) textually, leaving everything else byte-identical."""
    values = split_list(line)
    if not values:
        return line
    top = values[0]
    try:
        via = Via.parse(top)
    except ValueError:
        return line
    if via.rport and via.params.get("rport") is None:
        top = re.sub(r";\s*rport\s*(?=;|$)", f";rport={peer.port}", top, count=1, flags=re.IGNORECASE)
    if via.received is None and (via.rport or via.host.lower() != peer.host.lower()):
        top += f";received={peer.host}"
    return ", ".join([top, *values[1:]])


def _adopt_connection(dialog: Dialog, peer: Peer) -> None:
    """After its TCP connection was lost, a dialog's requests use the
    connection on which the peer's next in-dialog request arrives."""
    if dialog.peer.connection is None and peer.connection is not None and peer.transport == dialog.peer.transport:
        dialog.peer = replace(dialog.peer, connection=peer.connection)


def _response_fallback(request: SipRequest, peer: Peer) -> Peer:
    """Where to send responses once the request's connection is gone."""
    try:
        port = Via.parse(request.headers.get("via") or "").port or (5061 if peer.transport == "tls" else 5060)
    except ValueError:
        port = 5060
    return Peer(peer.transport, peer.host, port, None)


def _safe_phrase(phrase: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", phrase)[:120]
