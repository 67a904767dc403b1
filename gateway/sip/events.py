"""What the SIP user agent tells the application, and where bytes go.

Everything here is plain data: the user agent queues :class:`Transmit` for the
transport and events for the application, and never calls back into either,
so both can be driven (and tested) with fake time and no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sip.message import SipRequest
from gateway.trunks import Trunk

__all__ = [
    "CallCancelled",
    "CallConfirmed",
    "CallEnded",
    "Event",
    "IncomingCall",
    "MalformedMessage",
    "Peer",
    "ReInvite",
    "ReInviteAck",
    "ReferNotify",
    "ReferResponse",
    "SessionRefreshed",
    "Transmit",
]


@dataclass(frozen=True)
class Peer:
    """Where a message came from or goes to.

    ``connection`` is the transport's id of a TCP connection (``None`` for
    UDP, or for TCP when a new connection has to be opened).
    """

    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    connection: int | None = None

    @property
    def reliable(self) -> bool:
        """Reliable transports switch off retransmission timers (RFC 3261 17)."""
        return self.transport != "udp"


@dataclass
class Transmit:
    data: bytes
    peer: Peer


@dataclass
class IncomingCall:
    """A new INVITE; ``100 Trying`` is already queued (to a verified source).

    The application must call ``answer()`` or ``reject()``.  An empty
    ``offer`` is a delayed-offer INVITE: ``answer()`` then takes our *offer*
    and the peer's answer arrives in :class:`CallConfirmed`.  ``trunk`` is the
    trunk the INVITE came from (None without admission control).  ``siprec``:
    a SIPREC recording INVITE (``Require: siprec`` or a ``+sip.src`` Contact,
    RFC 7866); its body (``request.body``) holds the recording metadata.
    """

    dialog_id: str
    request: SipRequest
    offer: bytes
    peer: Peer
    trunk: Trunk | None = None
    siprec: bool = False


@dataclass
class CallConfirmed:
    """The ACK for our 2xx arrived.  ``answer`` is the SDP it carried (only
    for a delayed-offer INVITE; empty otherwise)."""

    dialog_id: str
    answer: bytes = b""


@dataclass
class CallCancelled:
    """CANCEL before our final answer; 200 (CANCEL) and 487 (INVITE) are
    already queued.  A ``CallEnded(reason="cancelled")`` follows."""

    dialog_id: str


@dataclass
class ReInvite:
    """An in-dialog offer: re-INVITE (hold, resume, codec change) or UPDATE
    with SDP.  The application calls ``accept_reinvite()`` or
    ``reject_reinvite()``.  An empty ``offer`` (offerless re-INVITE) means our
    200 must carry an offer and the answer comes in :class:`ReInviteAck`."""

    dialog_id: str
    request: SipRequest
    offer: bytes


@dataclass
class ReInviteAck:
    """The ACK completing an offerless re-INVITE, carrying the peer's answer."""

    dialog_id: str
    answer: bytes


@dataclass
class CallEnded:
    """The dialog is over.  ``reason``: "bye" (remote BYE, 200 sent),
    "ack-timeout" (no ACK for our 2xx, BYE sent), "local-bye" (``hangup()``
    finished), "cancelled" (after :class:`CallCancelled`).  Every
    :class:`IncomingCall` ends in exactly one ``CallEnded`` unless the
    application itself called ``reject()``."""

    dialog_id: str
    reason: str


@dataclass
class MalformedMessage:
    """For logs and metrics; a 400 is already queued if it could be addressed."""

    peer: Peer
    reason: str


@dataclass(frozen=True)
class SessionRefreshed:
    """A 2xx granted an RFC 4028 session timer (answer, re-INVITE or UPDATE):
    the caller must refresh within ``interval`` seconds, or the application
    ends the call. ``interval`` 0: the request asked for no timer (none runs)."""

    dialog_id: str
    interval: int


@dataclass(frozen=True)
class ReferResponse:
    """The final answer to our REFER (``UserAgent.refer``): 202/200 accepted, else refused;
    408 when none came (Timer F)."""

    dialog_id: str
    status: int


@dataclass(frozen=True)
class ReferNotify:
    """A NOTIFY about our REFER: the caller's call to the transfer target reached ``status``
    (its ``message/sipfrag`` status line; None when the body had none). ``final``: the
    subscription ended (a final status, or ``Subscription-State: terminated``)."""

    dialog_id: str
    status: int | None
    reason: str
    final: bool


Event = (IncomingCall | CallConfirmed | CallCancelled | ReInvite | ReInviteAck | CallEnded | MalformedMessage
         | SessionRefreshed | ReferResponse | ReferNotify)
