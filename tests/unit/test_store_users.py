import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import select

from gateway.store import users
from gateway.store.models import ApiToken, utcnow
from tests.pg_server import engine, pg_store_url, session, store_url  # noqa: F401


def test_password_hash_is_salted_scrypt_and_verifies():
    first, second = users.hash_password("correct horse"), users.hash_password("correct horse")
    assert first.startswith("scrypt$32768$8$1$") and first != second  # per-user salt
    assert "correct horse" not in first
    assert users.verify_password(first, "correct horse")
    assert not users.verify_password(first, "correct horsE")
    assert not users.verify_password("scrypt$garbage", "x") and not users.verify_password("", "x")
    assert not users.verify_password("md5$1$2$3$4$5", "x")


def test_users_login_failures_and_tokens(session):
    name = f"sup{utcnow().timestamp():.0f}".replace(".", "")
    user = users.create_user(session, f"  {name.upper()} ", "s3cret-pass", "supervisor")
    session.commit()
    assert user.username == name and user.role == "supervisor" and user.created_at.tzinfo is not None
    with pytest.raises(users.UserError, match="already exists"):
        users.create_user(session, name, "another-pass", "admin")
    assert name in [u.username for u in users.list_users(session)]

    now = utcnow()
    assert users.authenticate(session, name, "s3cret-pass", now) is user
    assert user.last_login_at == now and user.failed_logins == 0
    # failures are counted but never lock the account (a stranger could lock out its owner):
    # the dashboard throttles per address instead (tests/unit/test_web_throttle.py)
    for _ in range(50):
        assert users.authenticate(session, name, "wrong-pass", now) is None
    assert user.failed_logins == 50 and not users.is_locked(user, now) and user.locked_until is None
    later = now + timedelta(seconds=1)
    assert users.authenticate(session, name, "s3cret-pass", later) is user
    assert user.failed_logins == 0
    # a lock an older version set still holds until it runs out
    user.locked_until = later + timedelta(minutes=5)
    assert users.authenticate(session, name, "s3cret-pass", later) is None
    assert users.authenticate(session, name, "s3cret-pass", later + timedelta(minutes=6)) is user
    session.commit()
    assert users.authenticate(session, "nobody-here", "s3cret-pass") is None

    row, token = users.create_token(session, user, "wallboard")
    session.commit()
    assert token.startswith(users.TOKEN_PREFIX) and len(token) > 40
    stored = session.scalar(select(ApiToken).where(ApiToken.id == row.id))
    assert stored.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {stored.token_sha256, stored.name}
    assert users.verify_token(session, token) is user and stored.last_used_at is not None
    assert users.verify_token(session, token + "x") is None
    assert users.verify_token(session, "not-a-token") is None
    assert users.revoke_token(session, row.id)
    assert users.verify_token(session, token) is None
    user.disabled = True
    assert users.authenticate(session, name, "s3cret-pass", later) is None
    session.commit()


@pytest.mark.parametrize("username, password, role, message", [
    ("ok-user", "short", "admin", "at least 8"),
    ("ok-user", "long enough", "root", "role must be"),
    ("bad name", "long enough", "admin", "username"),
    ("", "long enough", "admin", "username"),
    ("-dash", "long enough", "admin", "username"),
])
def test_invalid_users_are_refused(session, username, password, role, message):
    with pytest.raises(users.UserError, match=message):
        users.create_user(session, username, password, role)
