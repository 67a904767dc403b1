"""SIP transactions (RFC 3261 section 17, with the RFC 6026 "Accepted" state).

Transactions own retransmission and absorption: a retransmitted request is
answered with the last response without bothering the dialog layer, and our
own requests are retransmitted until answered.  They are sans-I/O: they send
through a callable handed in by the user agent and expose their next
``deadline()``; the user agent calls ``on_timer(now)`` once it has passed.

Timer names follow RFC 3261 so the code can be read against its figures:
G/H/I (INVITE server), J (non-INVITE server), E/F/K (non-INVITE client),
L (RFC 6026: INVITE server after a 2xx).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.events import Peer
from gateway.sip.message import NameAddress, SipRequest, Via, parse_cseq
from gateway.trunks import Trunk

__all__ = [
    "ClientTransaction",
    "Timed",
    "InviteServerTransaction",
    "NonInviteServerTransaction",
    "ServerTransaction",
    "TimerConfig",
    "TransactionKey",
    "server_key",
]

Send = Callable[[bytes, Peer], None]
Arm = Callable[["Timed"], None]
TransactionKey = tuple[str, ...]

MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True)
class TimerConfig:
    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # cap on non-INVITE request and INVITE response retransmit interval
    t4: float = 5.0  # how long a message may linger in the network

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J, L and the 2xx-without-ACK limit."""
        return 64 * self.t1


def server_key(request: SipRequest, via: Via, method: str | None = None) -> TransactionKey:
    """Key matching a request to its server transaction (RFC 3261 17.2.3).

    ``method`` overrides the request's method class: ACK and CANCEL look up
    the INVITE transaction with ``method="INVITE"``.  Requests from RFC 2543
    elements (branch without the magic cookie) fall back to the old rule:
    Request-URI, From tag, Call-ID, CSeq number and top Via.
    """
    m = method or ("INVITE" if request.method == "ACK" else request.method)
    branch = via.branch
    host, port = via.sent_by()
    if branch and branch.startswith(MAGIC_COOKIE):
        return ("3261", branch, host, str(port), m)
    h = request.headers
    from_tag = NameAddress.parse(h.get("from") or "", "From").tag or ""
    cseq_number, _ = parse_cseq(h.get("cseq") or "")
    return (
        "2543",
        h.get("call-id") or "",
        from_tag,
        str(cseq_number),
        request.uri,
        host,
        str(port),
        branch or "",
        m,
    )


class Timed:
    """Something with named deadlines.  Every change is reported through
    ``arm`` so the owner can keep a heap of deadlines without polling."""

    def __init__(self, arm: Arm) -> None:
        self._deadlines: dict[str, float] = {}
        self._arm = arm

    def deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def _set_timers(self, **deadlines: float) -> None:
        """Replace all timers by ``deadlines``."""
        self._deadlines = dict(deadlines)
        if deadlines:
            self._arm(self)

    def _set_timer(self, name: str, at: float) -> None:
        self._deadlines[name] = at
        self._arm(self)

    def _due(self, now: float) -> list[str]:
        return [name for name, at in sorted(self._deadlines.items(), key=lambda kv: kv[1]) if at <= now]

    def on_timer(self, now: float) -> bool | None:  # pragma: no cover - overridden
        """Run due timers; subclasses may return a flag for the owner."""
        raise NotImplementedError


class ServerTransaction(Timed):
    """Common part: remembers the last response so retransmitted requests
    can be answered without involving the dialog layer."""

    def __init__(
        self, key: TransactionKey, request: SipRequest, peer: Peer, send: Send, arm: Arm, timers: TimerConfig
    ) -> None:
        super().__init__(arm)
        self.key = key
        self.request = request
        self.peer = peer
        self.state = "trying"
        self.last_response: bytes | None = None
        self.final_status: int | None = None
        self.dialog_id: str | None = None  # the dialog this request belongs to or created
        self.reply_tag: str | None = None  # To tag of our out-of-dialog responses
        self.trunk: Trunk | None = None  # the trunk the request came from (admission control)
        # False for a source not yet verified (gateway.sip.admission): a UDP source may be a
        # spoofed victim, so our final is resent only when the request is, never on Timer G.
        self.retransmit = True
        self._send = send
        self._timers = timers

    @property
    def terminated(self) -> bool:
        return self.state == "terminated"

    @property
    def has_final(self) -> bool:
        return self.final_status is not None

    def respond(self, status: int, data: bytes, now: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def retransmission(self, now: float) -> None:
        """The same request arrived again: resend whatever we last sent."""
        if self.last_response is not None and not self.terminated:
            self._send(self.last_response, self.peer)

    def _terminate(self) -> None:
        self.state = "terminated"
        self._deadlines.clear()


class InviteServerTransaction(ServerTransaction):
    """proceeding -> completed -> confirmed (non-2xx, waits for ACK)
    or proceeding -> accepted (2xx; the dialog retransmits it)."""

    def __init__(
        self, key: TransactionKey, request: SipRequest, peer: Peer, send: Send, arm: Arm, timers: TimerConfig
    ) -> None:
        super().__init__(key, request, peer, send, arm, timers)
        self.state = "proceeding"
        self._g_interval = timers.t1
        self.timed_out = False

    def respond(self, status: int, data: bytes, now: float) -> None:
        if self.state != "proceeding":
            if self.state == "accepted" and 200 <= status < 300:
                # 2xx retransmissions come from the dialog layer (RFC 6026 8.5).
                self.last_response = data
                self._send(data, self.peer)
            return
        self.last_response = data
        self._send(data, self.peer)
        if status < 200:
            return
        self.final_status = status
        if status < 300:
            self.state = "accepted"
            self._set_timers(L=now + self._timers.timeout)
        elif self.peer.reliable or not self.retransmit:
            self.state = "completed"
            self._set_timers(H=now + self._timers.timeout)
        else:
            self.state = "completed"
            self._set_timers(H=now + self._timers.timeout, G=now + self._g_interval)

    def receive_ack(self, now: float) -> bool:
        """ACK matched this transaction.  True if it was the ACK to our
        non-2xx response (absorbed here); False if the dialog should see it."""
        if self.state == "completed":
            self.state = "confirmed"
            self._set_timers(I=now + (0.0 if self.peer.reliable else self._timers.t4))
            return True
        return self.state == "confirmed"

    def on_timer(self, now: float) -> None:
        for name in self._due(now):
            if self.terminated:
                return
            if name == "G":
                if self.state == "completed" and self.last_response is not None:
                    self._send(self.last_response, self.peer)
                    self._g_interval = min(2 * self._g_interval, self._timers.t2)
                    self._set_timer("G", now + self._g_interval)
                else:
                    del self._deadlines["G"]
            elif name == "H":
                self.timed_out = True
                self._terminate()
            elif name in ("I", "L"):
                self._terminate()


class NonInviteServerTransaction(ServerTransaction):
    """trying -> proceeding -> completed (Timer J absorbs retransmissions)."""

    def respond(self, status: int, data: bytes, now: float) -> None:
        if self.state in ("completed", "terminated"):
            return
        self.last_response = data
        self._send(data, self.peer)
        if status < 200:
            self.state = "proceeding"
            return
        self.final_status = status
        self.state = "completed"
        self._set_timers(J=now + (0.0 if self.peer.reliable else self._timers.timeout))

    def on_timer(self, now: float) -> None:
        if self._deadlines.get("J", float("inf")) <= now:
            self._terminate()


class ClientTransaction(Timed):
    """Non-INVITE client transaction (we only ever send BYE and REFER).

    ``result`` becomes the final status code, or 408 when Timer F fires
    (RFC 3261 8.1.3.1 treats a timeout as a 408).
    """

    def __init__(
        self, branch: str, method: str, data: bytes, peer: Peer, send: Send, arm: Arm, timers: TimerConfig, now: float
    ) -> None:
        super().__init__(arm)
        self.branch = branch
        self.method = method
        self.data = data
        self.peer = peer
        self.state = "trying"
        self.result: int | None = None
        self._send = send
        self._timers = timers
        self._e_interval = timers.t1
        if peer.reliable:
            self._set_timers(F=now + timers.timeout)
        else:
            self._set_timers(F=now + timers.timeout, E=now + self._e_interval)
        send(data, peer)

    @property
    def terminated(self) -> bool:
        return self.state == "terminated"

    def receive_response(self, status: int, now: float) -> bool:
        """Feed a matching response; True when it is the (first) final one."""
        if self.state in ("completed", "terminated"):
            return False
        if status < 200:
            self.state = "proceeding"
            return False
        self.result = status
        self.state = "completed"
        self._set_timers(K=now + (0.0 if self.peer.reliable else self._timers.t4))
        return True

    def on_timer(self, now: float) -> bool:
        """Run due timers; True when Timer F just gave up (result 408)."""
        for name in self._due(now):
            if self.terminated:
                break
            if name == "F":
                self.result = 408
                self.state = "terminated"
                self._deadlines.clear()
                return True
            if name == "K":
                self.state = "terminated"
                self._deadlines.clear()
            elif name == "E":
                self._send(self.data, self.peer)
                if self.state == "trying":
                    self._e_interval = min(2 * self._e_interval, self._timers.t2)
                else:
                    self._e_interval = self._timers.t2
                self._set_timer("E", now + self._e_interval)
        return False
