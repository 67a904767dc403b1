"""SIP admission control: which sources get any state, and how much traffic.

Sans-I/O, consulted by :class:`~gateway.sip.useragent.UserAgent` before a
message is parsed (:meth:`Admission.datagram`) and before a request creates any
transaction (:meth:`Admission.request`):

- **Trunks.** A request from an address outside every trunk's networks is
  dropped silently (``sip_unknown_source: drop``) or answered ``403`` once,
  statelessly (``403``). Either way nothing is retransmitted and the operator
  sees, at most every few seconds, "dropped INVITE from X, see the trunks
  setting".
- **Budgets per source.** Messages and bytes per second (checked before
  parsing, so a flood of 64 KB datagrams costs a dictionary lookup each), and
  INVITE / OPTIONS / REGISTER per second. An *unverified* source over a budget
  is put on a short block list (``sip_block_s``); a verified one is only
  throttled, because over UDP anyone can spoof its address and a block would
  let them cut a trunk off.
- **Verification.** A source is *verified* once it has shown that it receives
  what we send to its address: it completed a handshake that needs a value only
  our messages carried (the ACK of a 2xx carries our To tag; a digest answer
  carries our nonce), or its request came over TCP/TLS (the TCP handshake did
  the same). A loopback source is verified from the start (``sip_loopback_verified``):
  the kernel drops packets that claim a loopback source from outside, so it
  cannot be a spoofed victim. Until then a UDP source may be a spoofed victim, so it gets no
  100 Trying, no timer retransmissions and no BYE, and never more bytes back
  than it sent (an anti-amplification credit, as QUIC's): the response to a
  retransmitted request is resent once per retransmission, which is all an
  honest client needs.

Every table is bounded (least recently seen sources go first), so a spoofed
flood from every address on the internet costs a fixed amount of memory.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.sip.digest import DigestServer
from gateway.trunks import Trunk, TrunkTable

__all__ = ["Admission", "AdmissionConfig", "SourceState"]

logger = logging.getLogger(__name__)

LOG_INTERVAL = 10.0  # at most one "dropped ... from X" line per reason this often
FAILURE_WINDOW = 60.0  # sip_auth_failures counts wrong credentials in this window


@dataclass(frozen=True)
class AdmissionConfig:
    unknown_source: str = "drop"  # drop | 403
    max_unacked: int = 16
    invite_rate: float = 20.0
    options_rate: float = 5.0
    register_rate: float = 2.0
    msgs_per_s: float = 200.0
    bytes_per_s: float = 262_144.0
    block_s: float = 10.0
    nonce_ttl: float = 300.0
    auth_failures: int = 5
    max_sources: int = 8192  # per-source entries kept (budgets, credit, verification)
    verified_ttl: float = 3600.0  # a verification lasts this long after the source's last handshake
    credit_cap: int = 131_072  # bytes of unspent anti-amplification credit a source may bank
    loopback_verified: bool = True  # loopback can only be this host (tests switch it off to play a spoofer)


class _Bucket:
    """Token bucket: ``rate`` per second, holding at most ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, amount: float, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass
class SourceState:
    """What we know about one source address."""

    msgs: _Bucket
    bytes: _Bucket
    methods: dict[str, _Bucket] = field(default_factory=dict)
    blocked_until: float = 0.0
    verified_until: float = 0.0
    credit: int = 0  # bytes we may still send to it while it is unverified
    failures: list[float] = field(default_factory=list)  # times of wrong credentials


class Admission:
    def __init__(self, trunks: TrunkTable | None = None, config: AdmissionConfig | None = None) -> None:
        self.trunks = trunks if trunks is not None else TrunkTable()
        self.config = config or AdmissionConfig()
        self._sources: OrderedDict[str, SourceState] = OrderedDict()
        self._digest: dict[str, DigestServer] = {}
        for trunk in self.trunks.trunks:
            if trunk.auth is not None:
                self._digest[trunk.name] = DigestServer(
                    trunk.auth.username, trunk.auth.password, realm=trunk.auth.realm or "earshot",
                    algorithms=trunk.auth.algorithms, nonce_ttl=self.config.nonce_ttl)
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed since)
        # counters for /metrics
        self.dropped_unknown = 0
        self.rejected_unknown = 0
        self.dropped_rate = 0
        self.dropped_blocked = 0
        self.amplification_dropped = 0  # responses not sent for lack of credit
        self.auth_failed = 0

    # -- per-source state ----------------------------------------------------

    def _state(self, host: str, now: float) -> SourceState:
        state = self._sources.get(host)
        if state is None:
            c = self.config
            state = SourceState(_Bucket(c.msgs_per_s, c.msgs_per_s, now), _Bucket(c.bytes_per_s, c.bytes_per_s, now))
            self._sources[host] = state
            while len(self._sources) > c.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(host)
        return state

    def is_verified(self, transport: str, host: str, now: float) -> bool:
        if transport != "udp":
            return True  # the TCP (and TLS) handshake proved the address
        if self.config.loopback_verified and _is_loopback(host):
            return True
        state = self._sources.get(host)
        return state is not None and state.verified_until > now

    def verify(self, host: str, now: float) -> None:
        """``host`` completed a handshake (see the module docstring)."""
        self._state(host, now).verified_until = now + self.config.verified_ttl

    # -- before parsing -------------------------------------------------------

    def datagram(self, transport: str, host: str, size: int, now: float) -> bool:
        """May a message of ``size`` bytes from ``host`` be parsed at all?"""
        state = self._state(host, now)
        if state.blocked_until > now:
            self.dropped_blocked += 1
            return False
        if state.msgs.take(1, now) and state.bytes.take(size, now):
            if transport == "udp" and not self.is_verified(transport, host, now):
                state.credit = min(self.config.credit_cap, state.credit + size)
            return True
        self.dropped_rate += 1
        self._block_unverified(state, transport, host, now)
        self._log("budget", f"SIP: dropping messages from {host}: over sip_source_msgs_per_s / "
                            f"sip_source_bytes_per_s", now)
        return False

    # -- before a transaction -------------------------------------------------

    def request(self, method: str, transport: str, host: str, now: float) -> tuple[str, Trunk | None]:
        """``("accept", trunk)``, ``("drop", None)`` or ``("reject", None)`` (a 403, sent once)."""
        trunk = self.trunks.match(host)
        if trunk is None:
            if self.config.unknown_source == "403":
                self.rejected_unknown += 1
                verdict = "reject"
            else:
                self.dropped_unknown += 1
                verdict = "drop"
            self._log("unknown", f"SIP: dropped {method} from {host}, not in any trunk: see the trunks "
                                 f"setting (README, Trunks and security)", now)
            return verdict, None
        rate = {"INVITE": self.config.invite_rate, "OPTIONS": self.config.options_rate,
                "REGISTER": self.config.register_rate}.get(method)
        if rate is not None:
            state = self._state(host, now)
            bucket = state.methods.get(method)
            if bucket is None:
                bucket = state.methods[method] = _Bucket(rate, max(1.0, rate), now)
            if not bucket.take(1, now):
                self.dropped_rate += 1
                self._block_unverified(state, transport, host, now)
                self._log(f"rate-{method}", f"SIP: dropped {method} from {host} (trunk {trunk.name}): over "
                                            f"sip_{method.lower()}_rate", now)
                return "drop", None
        return "accept", trunk

    # -- what we send ----------------------------------------------------------

    def may_send(self, transport: str, host: str, size: int, now: float) -> bool:
        """Spend anti-amplification credit for ``size`` bytes to an unverified source."""
        if self.is_verified(transport, host, now):
            return True
        state = self._sources.get(host)
        if state is None or state.credit < size:
            self.amplification_dropped += 1
            return False
        state.credit -= size
        return True

    # -- digest ------------------------------------------------------------------

    def digest(self, trunk: Trunk) -> DigestServer | None:
        return self._digest.get(trunk.name)

    def auth_failed_at(self, host: str, now: float) -> bool:
        """Count wrong credentials from ``host``; True when it has had its share
        (``sip_auth_failures`` a minute) and gets 403 from now on."""
        self.auth_failed += 1
        state = self._state(host, now)
        state.failures = [t for t in state.failures if now - t < FAILURE_WINDOW] + [now]
        return len(state.failures) > self.config.auth_failures

    def auth_locked(self, host: str, now: float) -> bool:
        state = self._sources.get(host)
        if state is None:
            return False
        return len([t for t in state.failures if now - t < FAILURE_WINDOW]) > self.config.auth_failures

    # -- helpers -------------------------------------------------------------------

    def _block_unverified(self, state: SourceState, transport: str, host: str, now: float) -> None:
        if self.config.block_s > 0 and not self.is_verified(transport, host, now):
            state.blocked_until = now + self.config.block_s

    def _log(self, reason: str, message: str, now: float) -> None:
        """One line per reason per LOG_INTERVAL, with how many were not logged."""
        last, suppressed = self._logged.get(reason, (float("-inf"), 0))
        if now - last < LOG_INTERVAL:
            self._logged[reason] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more dropped since the last message)" if suppressed else ""
        logger.warning("%s%s", message, more)
        self._logged[reason] = (now, 0)

    @property
    def sources(self) -> int:
        return len(self._sources)


def _is_loopback(host: str) -> bool:
    return host.startswith(("127.", "::ffff:127.")) or host == "::1"
