"""Who is asking: signed session cookies for the pages, API tokens for programs.

A session is a signed (not encrypted) cookie holding a random session id, the
CSRF token and, once logged in, the user's id. It carries its own absolute
expiry, checked against an injected wall clock, so expiry is testable and
independent of the signer's timestamp. The cookie also carries a keyed
fingerprint of the user's password hash: changing a password ends every
session of that user without any server-side session table. Logout revokes the
session id in memory (per process) and clears the cookie.

Every visitor gets a session, logged in or not, so that the login form itself
is CSRF-protected (a forged login would sign the victim in as the attacker).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from itsdangerous import BadSignature, URLSafeSerializer

from ..config import state_file

log = logging.getLogger(__name__)

SESSION_COOKIE = "earshot_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SECRET_BYTES = 32
MAX_COOKIE_LENGTH = 4096


class SecretError(RuntimeError):
    """The session secret cannot be read or created; the message says where and why."""


def secret_file_for(database_url: str, configured: str = "") -> Path:
    """Where the generated secret lives: the setting, else next to the SQLite file, else the working directory."""
    return state_file(database_url, configured, ".web-secret", "earshot-web.secret")


def load_secret(key: str, path: Path) -> bytes:
    """The configured key, or the one kept in ``path`` (created once, mode 0600, race-free)."""
    if key:
        if len(key) < 16:
            raise SecretError("web_secret_key must have at least 16 characters")
        return key.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SecretError(f"{path}: cannot create the session secret file: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
        log.info("created the dashboard session secret in %s", path)
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{path}: cannot read the session secret file: {exc}") from None
    if len(value) < 32:
        # another process may be writing it right now: wait for it once
        time.sleep(0.05)
        value = path.read_text(encoding="ascii").strip()
        if len(value) < 32:
            raise SecretError(f"{path}: the session secret file is empty or too short; delete it to make a new one")
    return value.encode("ascii")


@dataclass
class SessionData:
    sid: str
    csrf: str
    expires: float  # wall clock, seconds since the epoch
    user_id: int | None = None
    username: str = ""
    pw: str = ""  # keyed fingerprint of the password hash at login

    @property
    def logged_in(self) -> bool:
        return self.user_id is not None


class SessionCodec:
    """Makes, signs, checks and revokes sessions."""

    def __init__(self, secret: bytes, ttl_s: float, *, wall: Callable[[], float] = time.time,
                 anonymous_ttl_s: float = 3600.0) -> None:
        self._secret = secret
        self._serializer = URLSafeSerializer(secret, salt="earshot.session.v1")
        self.ttl_s = ttl_s
        self.anonymous_ttl_s = anonymous_ttl_s
        self.wall = wall
        self._revoked: dict[str, float] = {}  # sid -> expiry

    def fingerprint(self, password_hash: str) -> str:
        return hmac.new(self._secret, password_hash.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def anonymous(self) -> SessionData:
        return SessionData(sid=secrets.token_urlsafe(16), csrf=secrets.token_urlsafe(24),
                           expires=self.wall() + self.anonymous_ttl_s)

    def login(self, user_id: int, username: str, password_hash: str) -> SessionData:
        """A fresh session (new id and CSRF token: no fixation) for a user who just logged in."""
        return SessionData(sid=secrets.token_urlsafe(16), csrf=secrets.token_urlsafe(24),
                           expires=self.wall() + self.ttl_s, user_id=user_id, username=username,
                           pw=self.fingerprint(password_hash))

    def dumps(self, session: SessionData) -> str:
        return self._serializer.dumps(asdict(session))

    def loads(self, cookie: str | None) -> SessionData | None:
        """The session in the cookie; None if absent, forged, malformed, expired or revoked."""
        if not cookie or len(cookie) > MAX_COOKIE_LENGTH:
            return None
        try:
            data = self._serializer.loads(cookie)
            session = SessionData(**data)
        except (BadSignature, TypeError, ValueError):
            return None
        if not isinstance(session.sid, str) or not isinstance(session.csrf, str) \
                or not isinstance(session.expires, (int, float)) \
                or not (session.user_id is None or type(session.user_id) is int):
            return None
        now = self.wall()
        if session.expires <= now or session.sid in self._revoked:
            return None
        return session

    def revoke(self, session: SessionData) -> None:
        now = self.wall()
        for sid, expires in list(self._revoked.items()):
            if expires <= now:
                del self._revoked[sid]
        self._revoked[session.sid] = session.expires

    def max_age(self, session: SessionData) -> int:
        return max(0, int(session.expires - self.wall()))


def csrf_ok(session: SessionData | None, submitted: str | None) -> bool:
    return bool(session is not None and submitted and hmac.compare_digest(session.csrf.encode(), submitted.encode()))


def same_origin(origin: str | None, host: str | None, scheme: str) -> bool:
    """True unless the browser says the request comes from another site (Origin header)."""
    if not origin:
        return True  # older browsers and non-browser clients; the CSRF token still applies
    if origin == "null":
        return False
    return bool(host) and origin.lower() in (f"{scheme}://{host}".lower(), f"http://{host}".lower(),
                                             f"https://{host}".lower())


@dataclass(frozen=True)
class Principal:
    """An authenticated user, however they proved it."""

    user_id: int
    username: str
    role: str
    via: str  # "session" or "token"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
