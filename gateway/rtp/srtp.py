"""SRTP and SRTCP (RFC 3711) for one call, keyed by SDES (RFC 4568), on libsrtp.

The SDP layer (:mod:`gateway.sdp`) negotiates a suite and two master keys: the
offerer's, which protects what it sends us, and ours, sent in the answer.
:class:`SrtpContext` turns each incoming datagram back into plain RTP (or
RTCP, for rtcp-mux) before the RTP receiver sees it.

Network input never raises here either: a datagram that fails authentication,
replays an old index, or is not SRTP at all is counted in
:class:`SrtpStats` and dropped (``unprotect`` returns ``None``).  That is also
what makes an SRTP call immune to the latch hijack: a sender without the key
never gets a packet as far as the latch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pylibsrtp

__all__ = ["SUITES", "SrtpContext", "SrtpStats", "Suite"]


@dataclass(frozen=True)
class Suite:
    name: str
    profile: int  # libsrtp's srtp_profile_t
    key_bytes: int
    salt_bytes: int

    @property
    def master_bytes(self) -> int:
        """Length of the SDES ``inline:`` key: master key then master salt."""
        return self.key_bytes + self.salt_bytes


#: The SDES suites we accept and offer, in our order of preference (RFC 4568 6.2, RFC 7714 12).
SUITES: dict[str, Suite] = {
    suite.name: suite for suite in (
        Suite("AEAD_AES_128_GCM", pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 16, 12),
        Suite("AES_CM_128_HMAC_SHA1_80", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 16, 14),
        Suite("AES_CM_128_HMAC_SHA1_32", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 16, 14),
    )
}


@dataclass(slots=True)
class SrtpStats:
    packets: int = 0  # SRTP packets authenticated and decrypted
    rtcp: int = 0  # SRTCP packets authenticated and decrypted (rtcp-mux)
    auth_failures: int = 0  # wrong key, tampered, or not SRTP at all
    replayed: int = 0  # an index seen before or too old (replay protection)
    errors: int = 0  # anything else libsrtp refused (too short, too long...)


def _is_rtcp(data: bytes) -> bool:
    # RFC 5761 4: RTCP packet types 192-223 sit where RTP's marker bit and payload type are
    return len(data) >= 2 and 192 <= data[1] <= 223


class SrtpContext:
    """Both directions of one call's SRTP.

    ``receive_key``: the peer's master key and salt (it protects what it
    sends); ``send_key``: ours.  We only listen, so ``protect`` exists for the
    peer's side of a test and for RTCP we might send one day.
    """

    __slots__ = ("suite", "receive_key", "send_key", "stats", "_rx", "_tx")

    def __init__(self, suite: str, receive_key: bytes, send_key: bytes) -> None:
        spec = SUITES.get(suite)
        if spec is None:
            raise ValueError(f"unsupported SRTP suite {suite!r}; expected one of {', '.join(SUITES)}")
        for name, key in (("receive_key", receive_key), ("send_key", send_key)):
            if len(key) != spec.master_bytes:
                raise ValueError(f"{name} for {suite} must be {spec.master_bytes} bytes, got {len(key)}")
        self.suite = spec
        self.receive_key = receive_key
        self.send_key = send_key
        self.stats = SrtpStats()
        # SSRC_ANY_*: a template; libsrtp adds a stream per SSRC only after a packet authenticates
        self._rx = pylibsrtp.Session(pylibsrtp.Policy(
            key=receive_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=spec.profile))
        self._tx = pylibsrtp.Session(pylibsrtp.Policy(
            key=send_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=spec.profile))

    def unprotect(self, datagram: bytes) -> bytes | None:
        """Plain RTP or RTCP, or ``None`` (counted) for anything that does not verify."""
        rtcp = _is_rtcp(datagram)
        try:
            plain = self._rx.unprotect_rtcp(datagram) if rtcp else self._rx.unprotect(datagram)
        except pylibsrtp.Error as exc:
            reason = str(exc)
            if reason.startswith("authentication failure"):
                self.stats.auth_failures += 1
            elif reason.startswith("replay check failed"):
                self.stats.replayed += 1
            else:
                self.stats.errors += 1
            return None
        except (ValueError, TypeError):  # longer than libsrtp's buffer
            self.stats.errors += 1
            return None
        if rtcp:
            self.stats.rtcp += 1
        else:
            self.stats.packets += 1
        return plain

    def protect(self, packet: bytes) -> bytes:
        """SRTP (or SRTCP, for an RTCP packet) with our key; raises ``pylibsrtp.Error``."""
        return self._tx.protect_rtcp(packet) if _is_rtcp(packet) else self._tx.protect(packet)
