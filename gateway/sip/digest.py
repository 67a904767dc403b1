"""SIP digest authentication, server side (RFC 3261 22.4, RFC 8760, qop=auth).

Sans-I/O: :class:`DigestServer` builds challenge header values and checks
Authorization values; time comes in as ``now``, so nonce expiry is tested with
fake time. It offers every configured algorithm in one challenge header each,
SHA-256 first (RFC 8760 section 2.4: a client takes the first one it knows), and
takes an answer in any of them.

Nonces are self-validating: ``base64(issued-at | random | HMAC(secret, both))``.
Any nonce we minted is recognised without keeping it, so a flood of
unauthenticated INVITEs costs no memory; an expired one is answered with
``stale=true`` (the client retries with the same credentials, no prompt). Replay
protection keeps, only for nonces that authenticated someone, the highest nonce
count (nc) seen: a request must bring a higher one. That table is bounded; a
nonce pushed out of it (and any older untracked one) is treated as stale, which
costs an honest client one extra round trip and a replayer everything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["DigestResult", "DigestServer", "digest_response", "parse_digest"]

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')
_NONCE_RAND = 12
_NONCE_MAC = 16
MAX_HEADER = 4096  # an Authorization value longer than this is not worth parsing


@dataclass(frozen=True)
class DigestResult:
    """``ok``: authenticated. Otherwise ``stale`` (an expired or forgotten nonce
    of ours with the right credentials: re-challenge with stale=true) or a
    ``reason`` for the log (never sent: it would help a guesser)."""

    ok: bool
    stale: bool = False
    reason: str = ""
    username: str = ""
    algorithm: str = ""


def parse_digest(value: str) -> dict[str, str] | None:
    """``Digest k=v, k="v"`` -> {k (lower case): v}; None if not a Digest credential."""
    if len(value) > MAX_HEADER:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            return None
        key, raw = m.group(1).lower(), m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key in params:
            return None  # a parameter given twice: ambiguous, refuse
        params[key] = raw
        pos = m.end()
    return params


class DigestServer:
    """One trunk's credentials, nonces and nonce counts."""

    def __init__(
        self,
        username: str,
        password: str,
        *,
        realm: str = "earshot",
        algorithms: tuple[str, ...] = ("SHA-256", "MD5"),
        nonce_ttl: float = 300.0,
        secret: bytes | None = None,
        max_tracked: int = 4096,
    ) -> None:
        unknown = [a for a in algorithms if a not in _HASHES]
        if unknown or not algorithms:
            raise ValueError(f"unsupported digest algorithms {unknown or algorithms}")
        self.username = username
        self.realm = realm or "earshot"
        self.algorithms = tuple(algorithms)
        self.nonce_ttl = nonce_ttl
        self._password = password
        self._secret = secret if secret is not None else os.urandom(32)
        self._max_tracked = max_tracked
        self._nc: OrderedDict[str, int] = OrderedDict()  # nonce -> highest nc accepted, in first-use order
        # Every nonce pushed out of ``_nc`` was issued at or before this time; an untracked
        # nonce issued after it has never been used.
        self._floor = float("-inf")
        # H(A1) per algorithm: the password is not needed again
        self._ha1 = {a: _hash(a, f"{username}:{self.realm}:{password}") for a in self.algorithms}

    # -- challenges ---------------------------------------------------------

    def new_nonce(self, now: float) -> str:
        issued = struct.pack(">d", now)
        rand = os.urandom(_NONCE_RAND)
        mac = hmac.new(self._secret, issued + rand, hashlib.sha256).digest()[:_NONCE_MAC]
        return base64.urlsafe_b64encode(issued + rand + mac).decode().rstrip("=")

    def challenge(self, now: float, *, stale: bool = False) -> list[str]:
        """WWW-Authenticate / Proxy-Authenticate values: one per algorithm, one nonce."""
        nonce = self.new_nonce(now)
        tail = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"{tail}'
            for algorithm in self.algorithms
        ]

    def _nonce_time(self, nonce: str) -> float | None:
        """When we issued ``nonce``, or None if we did not."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 8 + _NONCE_RAND + _NONCE_MAC:
            return None
        body, mac = raw[:-_NONCE_MAC], raw[-_NONCE_MAC:]
        expected = hmac.new(self._secret, body, hashlib.sha256).digest()[:_NONCE_MAC]
        if not hmac.compare_digest(mac, expected):
            return None
        return struct.unpack(">d", body[:8])[0]

    # -- answers ------------------------------------------------------------

    def verify(self, method: str, uri: str, value: str, now: float) -> DigestResult:
        """Check one Authorization / Proxy-Authorization value for a request."""
        p = parse_digest(value)
        if p is None:
            return DigestResult(False, reason="not a Digest credential")
        username = p.get("username", "")
        algorithm = p.get("algorithm", "MD5")  # RFC 2617: absent means MD5
        algorithm = {a.lower(): a for a in _HASHES}.get(algorithm.lower(), algorithm)
        if algorithm not in self.algorithms:
            return DigestResult(False, reason=f"algorithm {algorithm!r} not offered", username=username)
        if p.get("realm") != self.realm:
            return DigestResult(False, reason="wrong realm", username=username)
        if p.get("qop", "").lower() != "auth":
            return DigestResult(False, reason="qop=auth required", username=username)
        nonce, cnonce, nc_text, response = p.get("nonce", ""), p.get("cnonce", ""), p.get("nc", ""), p.get("response", "")
        if not (nonce and cnonce and re.fullmatch(r"[0-9A-Fa-f]{8}", nc_text) and response):
            return DigestResult(False, reason="incomplete credentials", username=username)
        if p.get("uri") != uri:
            return DigestResult(False, reason="digest uri differs from the Request-URI", username=username)
        issued = self._nonce_time(nonce)
        if issued is None:
            return DigestResult(False, reason="nonce not ours", username=username)
        expected = _response(algorithm, self._ha1[algorithm], method, p["uri"], nonce, nc_text, cnonce)
        right = hmac.compare_digest(expected.encode(), response.lower().encode()) and hmac.compare_digest(
            username.encode(), self.username.encode()
        )
        if not right:
            return DigestResult(False, reason="wrong credentials", username=username)
        if not 0 <= now - issued <= self.nonce_ttl:
            return DigestResult(False, stale=True, reason="nonce expired", username=username)
        nc = int(nc_text, 16)
        last = self._nc.get(nonce)
        if last is None and issued <= self._floor:
            # Possibly used before and pushed out of the table: this nc cannot be proven
            # new, so the client takes a fresh nonce (stale: no new password prompt).
            return DigestResult(False, stale=True, reason="nonce no longer tracked", username=username)
        if last is not None and nc <= last:
            return DigestResult(False, reason=f"nonce count {nc_text} replayed", username=username)
        self._nc[nonce] = nc
        while len(self._nc) > self._max_tracked:
            evicted, _ = self._nc.popitem(last=False)
            self._floor = max(self._floor, self._nonce_time(evicted) or 0.0)
        self._forget_expired(now)
        return DigestResult(True, username=username, algorithm=algorithm)

    def _forget_expired(self, now: float) -> None:
        """Drop counts of nonces past their life: those are refused as stale anyway."""
        while self._nc:
            nonce = next(iter(self._nc))
            issued = self._nonce_time(nonce)
            if issued is not None and now - issued <= self.nonce_ttl:
                break
            del self._nc[nonce]


def digest_response(algorithm: str, username: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, nc: str, cnonce: str) -> str:
    """The ``response`` a client computes for qop=auth (RFC 7616 3.4.1), e.g. in tests."""
    return _response(algorithm, _hash(algorithm, f"{username}:{realm}:{password}"), method, uri, nonce, nc, cnonce)


def _response(algorithm: str, ha1: str, method: str, uri: str, nonce: str, nc: str, cnonce: str) -> str:
    ha2 = _hash(algorithm, f"{method}:{uri}")
    return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")


def _hash(algorithm: str, text: str) -> str:
    return _HASHES[algorithm](text.encode("utf-8", "surrogateescape")).hexdigest()
