"""Dashboard users and API tokens.

Passwords are hashed with scrypt (memory-hard, in the standard library) with a
random per-user salt; the cost parameters are stored in the hash so they can be
raised later without invalidating old hashes. Verification compares in
constant time. Failed logins are counted here but never lock the account: an
account-wide lockout lets anyone who reaches the login form lock out the admin,
so the dashboard throttles per address and per (address, account) instead
(gateway/web/throttle.py). API tokens
are random and shown once: only their SHA-256 is stored (a token has 256 bits
of entropy, so a fast hash is enough and lets a token be found by its hash).

Functions change the session and flush; the caller commits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .models import ROLES, ApiToken, User, WebRevocation, utcnow

SCRYPT_N = 2**15  # 32 MiB and ~0.1 s per hash: slow for guessing, fine for logins
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 256 * 1024 * 1024
SALT_BYTES = 16
KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
TOKEN_PREFIX = "esk_"

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")


class UserError(ValueError):
    """A user or token operation was refused; the message says why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$key`` (base64 salt and key)."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=KEY_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password_hash: str, password: str) -> bool:
    """True if ``password`` matches; a malformed hash never matches."""
    try:
        scheme, n, r, p, salt, key = password_hash.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True), n=int(n),
                                r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError, AttributeError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


# hashed once, so a login for an unknown user costs as much as one for a real
# user and response time does not tell which usernames exist
_DUMMY_HASH: str | None = None


def _burn_time(password: str) -> None:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(16))
    verify_password(_DUMMY_HASH, password)


def normalize_username(username: str) -> str:
    name = username.strip().lower() if isinstance(username, str) else ""
    if not _USERNAME.match(name):
        raise UserError("username must be 1-64 characters: letters, digits, '.', '_', '@', '-' "
                        "(starting with a letter or digit)")
    return name


def check_password_policy(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"password must have at most {MAX_PASSWORD_LENGTH} characters")


def get_user(session: Session, username: str) -> User | None:
    try:
        name = normalize_username(username)
    except UserError:
        return None
    return session.scalar(select(User).where(User.username == name))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def create_user(session: Session, username: str, password: str, role: str) -> User:
    name = normalize_username(username)
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_password_policy(password)
    if get_user(session, name) is not None:
        raise UserError(f"user {name!r} already exists")
    user = User(username=name, password_hash=hash_password(password), role=role, created_at=utcnow(),
                failed_logins=0, disabled=False)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, user: User, password: str) -> None:
    check_password_policy(password)
    user.password_hash = hash_password(password)
    user.failed_logins = 0
    user.locked_until = None
    session.flush()


def is_locked(user: User, now: datetime | None = None) -> bool:
    """A lock set before failures stopped locking accounts (it runs out by itself)."""
    now = now or utcnow()
    return user.locked_until is not None and user.locked_until > now


def record_failed_login(session: Session, user: User, now: datetime | None = None) -> None:
    """Count a failed login (consecutive, reset by a success); it never locks the account."""
    user.failed_logins += 1
    session.flush()


def record_login(session: Session, user: User, now: datetime | None = None) -> None:
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now or utcnow()
    session.flush()


def authenticate(session: Session, username: str, password: str, now: datetime | None = None) -> User | None:
    """The user if the password is right and the account is usable; None otherwise.

    A disabled account is refused without checking the password (but in the
    same time); failures are counted, for `earshot users list`.
    """
    now = now or utcnow()
    user = get_user(session, username)
    if user is None or user.disabled or is_locked(user, now) or not isinstance(password, str):
        _burn_time(password if isinstance(password, str) else "")
        return None
    if not verify_password(user.password_hash, password):
        record_failed_login(session, user, now)
        return None
    record_login(session, user, now)
    return user


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, user: User, name: str) -> tuple[ApiToken, str]:
    """A new API token for ``user``: the row and the token itself, which is not stored."""
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > 128:
        raise UserError("token name must be 1-128 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_sha256=token_digest(token), created_at=utcnow(), revoked=False)
    session.add(row)
    session.flush()
    return row, token


def verify_token(session: Session, token: str, now: datetime | None = None, *, record_use: bool = True) -> User | None:
    """The token's user if the token is known, not revoked and its user enabled; records its use
    (unless ``record_use`` is false: the re-checks of a long-lived stream only read)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token)))
    if row is None or row.revoked or row.user.disabled:
        return None
    if record_use:
        row.last_used_at = now or utcnow()
        session.flush()
    return row.user


def revoke_token(session: Session, token_id: int) -> bool:
    row = session.get(ApiToken, token_id)
    if row is None:
        return False
    row.revoked = True
    session.flush()
    return True


def revoke_session(session: Session, sid: str, expires_at: datetime, now: datetime | None = None) -> None:
    """Remember that dashboard session ``sid`` ended, until its cookie would expire anyway;
    revocations that ran out are dropped on the way (the table stays the size of the
    logouts of one session lifetime)."""
    now = now or utcnow()
    session.execute(delete(WebRevocation).where(WebRevocation.expires_at <= now))
    if expires_at > now and session.get(WebRevocation, sid) is None:
        session.add(WebRevocation(sid=sid[:64], expires_at=expires_at, revoked_at=now))
    session.flush()


def session_revoked(session: Session, sid: str) -> bool:
    return isinstance(sid, str) and session.get(WebRevocation, sid[:64]) is not None
