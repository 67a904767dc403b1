"""UAS dialog state (RFC 3261 section 12) and 2xx retransmission (13.3.1.4).

A dialog starts when an INVITE arrives (we reserve our To tag at once, so
every final response for it carries the same tag) and holds what we need to
send our own in-dialog requests later: the remote target, the route set and
our CSeq counter.  It also owns the retransmission of our 2xx responses,
which RFC 3261 assigns to the user agent core, not the transaction: the 2xx
is resent with T1 doubling up to T2 until the ACK arrives, over UDP and TCP
alike, and after 64*T1 without an ACK the dialog is torn down.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sip.events import Peer
from gateway.sip.message import NameAddress, SipRequest, SipUri
from gateway.sip.transaction import (
    Arm,
    ClientTransaction,
    InviteServerTransaction,
    Send,
    ServerTransaction,
    Timed,
    TimerConfig,
)

__all__ = ["Dialog", "PendingAnswer", "next_hop"]


@dataclass
class PendingAnswer:
    """Our 2xx to an INVITE, resent until its ACK (matched by CSeq) arrives."""

    cseq: int
    data: bytes
    peer: Peer
    interval: float
    offerless: bool  # the INVITE had no SDP: the ACK carries the answer
    reinvite: bool
    request: SipRequest  # the INVITE answered, for re-addressing after a lost connection


class Dialog(Timed):
    """One call, from INVITE to the end of our BYE.

    ``state``: "pending" (IncomingCall emitted, waiting for answer/reject),
    "answered" (2xx sent, waiting for ACK), "confirmed", "ended" (CallEnded
    emitted; kept only while our BYE transaction runs).
    """

    def __init__(
        self,
        *,
        dialog_id: str,
        call_id: str,
        local_tag: str,
        remote_tag: str,
        local_party: str,
        remote_party: str,
        remote_target: str,
        route_set: list[str],
        remote_cseq: int,
        peer: Peer,
        local_host: str,
        invite: InviteServerTransaction,
        send: Send,
        arm: Arm,
        timers: TimerConfig,
    ) -> None:
        super().__init__(arm)
        self.id = dialog_id
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_party = local_party  # our To, with our tag: the From of our requests
        self.remote_party = remote_party  # their From, with their tag: the To of our requests
        self.remote_target = remote_target
        self.route_set = route_set
        self.remote_cseq = remote_cseq
        self.local_cseq = 0
        self.peer = peer
        self.local_host = local_host
        self.invite = invite
        self.state = "pending"
        self.offer_txn: ServerTransaction | None = None  # re-INVITE/UPDATE waiting for the app
        self.offer_offerless = False
        self.pending_answer: PendingAnswer | None = None
        self.hangup_requested = False
        self.bye: ClientTransaction | None = None
        self.refer: ClientTransaction | None = None  # our latest REFER (call transfer, RFC 3515)
        self.refer_subscribed = False  # its implicit subscription is open: NOTIFYs are taken
        self.ended = False
        # False while the source is unverified (gateway.sip.admission): no 2xx retransmission
        # on timers and no BYE after an ACK timeout, both of which would hit a spoofed victim.
        self.retransmit = True
        self._send = send
        self._timers = timers

    @property
    def connection(self) -> int | None:
        return self.peer.connection

    # -- 2xx retransmission ------------------------------------------------

    def start_answer(self, answer: PendingAnswer, now: float) -> None:
        """Begin retransmitting ``answer`` (it has just been sent once)."""
        self.pending_answer = answer
        if self.retransmit:
            self._set_timers(retransmit=now + answer.interval, give_up=now + self._timers.timeout)
        else:
            self._set_timers(give_up=now + self._timers.timeout)

    def stop_answer(self) -> PendingAnswer | None:
        answer, self.pending_answer = self.pending_answer, None
        self._set_timers()
        return answer

    def on_timer(self, now: float) -> bool:
        """Resend the pending 2xx if due; True when 64*T1 passed without ACK."""
        answer = self.pending_answer
        if answer is None:
            self._set_timers()
            return False
        if self._deadlines.get("give_up", float("inf")) <= now:
            return True
        if self._deadlines.get("retransmit", float("inf")) <= now:
            self._send(answer.data, answer.peer)
            answer.interval = min(2 * answer.interval, self._timers.t2)
            self._set_timer("retransmit", now + answer.interval)
        return False

    # -- our requests ------------------------------------------------------

    def next_cseq(self) -> int:
        self.local_cseq += 1
        return self.local_cseq

    def request_target(self) -> tuple[str, list[str], str]:
        """Request-URI, Route values and next-hop URI for a new request
        (RFC 3261 12.2.1.1: loose routing if the first route has ``lr``,
        else the strict-routing rewrite)."""
        if not self.route_set:
            return self.remote_target, [], self.remote_target
        first = _route_uri(self.route_set[0])
        if _is_loose(first):
            return self.remote_target, list(self.route_set), first
        return _strip_for_request_uri(first), self.route_set[1:] + [f"<{self.remote_target}>"], first


def _route_uri(route: str) -> str:
    try:
        return NameAddress.parse(route, "Route").uri
    except ValueError:
        return route.strip().strip("<>")


def _is_loose(uri: str) -> bool:
    try:
        return "lr" in SipUri.parse(uri).params
    except ValueError:
        return True


def _strip_for_request_uri(uri: str) -> str:
    """Drop what a Request-URI must not carry (RFC 3261 19.1.1 table)."""
    try:
        parsed = SipUri.parse(uri)
    except ValueError:
        return uri
    for name in ("method", "ttl"):
        parsed.params.pop(name, None)
    parsed.headers = None
    return str(parsed)


def next_hop(uri: str, source: Peer) -> Peer:
    """Where a request we originate in a dialog goes: the dialog's source only.

    The host is always the address the dialog came from (the trunk), whatever
    the remote target or route set say: a Contact, Record-Route or ``maddr``
    naming a third party must not turn Earshot into a request cannon. Over UDP,
    or on a TCP connection still open, the source port too (symmetric
    signalling, NAT-safe). A TCP dialog whose connection is gone opens a new
    one to the same IP address at the port ``uri`` names, where the peer said
    it listens (RFC 3261 18.2.2 does the same with Via for responses).
    """
    if source.transport == "udp" or source.connection is not None:
        return source
    try:
        parsed = SipUri.parse(uri)
    except ValueError:
        return source
    port = parsed.port or (5061 if parsed.scheme == "sips" else 5060)
    return Peer(source.transport, source.host, port, None)
