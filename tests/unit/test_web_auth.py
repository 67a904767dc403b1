"""Session cookies (signing, expiry, revocation), the session secret file, and redirect/origin checks."""

import os
import stat

import pytest

from gateway.web.auth import SecretError, SessionCodec, csrf_ok, load_secret, same_origin, secret_file_for
from gateway.web.pages import safe_next


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_session_round_trip_and_expiry():
    clock = Clock()
    codec = SessionCodec(b"k" * 32, ttl_s=3600, wall=clock)
    session = codec.login(7, "alice", "scrypt$hash")
    cookie = codec.dumps(session)
    loaded = codec.loads(cookie)
    assert loaded == session and loaded.logged_in
    clock.now += 3599
    assert codec.loads(cookie) is not None
    clock.now += 1
    assert codec.loads(cookie) is None  # expired


def test_tampered_or_foreign_cookies_are_refused():
    codec = SessionCodec(b"k" * 32, ttl_s=3600)
    cookie = codec.dumps(codec.login(7, "alice", "h"))
    payload, _, signature = cookie.rpartition(".")
    assert codec.loads(payload + "." + signature[::-1]) is None
    other = SessionCodec(b"x" * 32, ttl_s=3600)
    assert other.loads(cookie) is None
    for junk in ("", "abc", "a.b.c", "." * 5000, "\x00"):
        assert codec.loads(junk) is None


def test_forged_payload_types_are_refused():
    codec = SessionCodec(b"k" * 32, ttl_s=3600)
    # correctly signed but malformed content (e.g. from an older version): never an exception
    for data in ({"sid": 1, "csrf": "c", "expires": 9e12}, {"sid": "s", "csrf": "c", "expires": "never"},
                 {"sid": "s", "csrf": "c", "expires": 9e12, "user_id": "7"}, {"unexpected": 1}, [1, 2]):
        assert codec.loads(codec._serializer.dumps(data)) is None


def test_revoked_session_is_refused():
    codec = SessionCodec(b"k" * 32, ttl_s=3600)
    session = codec.login(7, "alice", "h")
    cookie = codec.dumps(session)
    codec.revoke(session)
    assert codec.loads(cookie) is None
    assert codec.loads(codec.dumps(codec.login(7, "alice", "h"))) is not None


def test_login_rotates_session_id_and_csrf_token():
    codec = SessionCodec(b"k" * 32, ttl_s=3600)
    before = codec.anonymous()
    after = codec.login(1, "alice", "h")
    assert before.sid != after.sid and before.csrf != after.csrf
    assert not before.logged_in


def test_password_fingerprint_changes_with_the_hash():
    codec = SessionCodec(b"k" * 32, ttl_s=60)
    assert codec.fingerprint("scrypt$a") != codec.fingerprint("scrypt$b")
    assert "scrypt" not in codec.fingerprint("scrypt$a")


def test_csrf_comparison():
    codec = SessionCodec(b"k" * 32, ttl_s=60)
    session = codec.anonymous()
    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, session.csrf + "x")
    assert not csrf_ok(session, "")
    assert not csrf_ok(session, None)
    assert not csrf_ok(None, session.csrf)


def test_secret_is_generated_once_and_kept(tmp_path):
    path = secret_file_for(f"sqlite:///{tmp_path / 'earshot.db'}")
    assert path == tmp_path / "earshot.db.web-secret"
    first = load_secret("", path)
    assert len(first) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret("", path) == first  # a restart keeps sessions valid
    assert load_secret("a-configured-secret-key", path) == b"a-configured-secret-key"


def test_secret_errors_are_specific(tmp_path):
    with pytest.raises(SecretError, match="at least 16"):
        load_secret("short", tmp_path / "x")
    with pytest.raises(SecretError, match="cannot create"):
        load_secret("", tmp_path / "missing-dir" / "secret")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(SecretError, match="too short"):
        load_secret("", empty)


def test_secret_file_location():
    assert str(secret_file_for("postgresql+psycopg://u@h/db")) == "earshot-web.secret"
    assert str(secret_file_for("sqlite:///x.db", "/etc/earshot/secret")) == "/etc/earshot/secret"


@pytest.mark.parametrize("value,expected", [
    ("/calls?q=refund", "/calls?q=refund"), ("/", "/"), (None, "/"), ("", "/"),
    ("https://evil.example/", "/"), ("//evil.example/x", "/"), ("/\\evil.example", "/"),
    ("javascript:alert(1)", "/"), ("/calls\r\nSet-Cookie: x=1", "/"), ("/login?next=/x", "/"),
])
def test_safe_next(value, expected):
    assert safe_next(value) == expected


def test_same_origin():
    assert same_origin(None, "127.0.0.1:8080", "http")
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080", "http")
    assert not same_origin("http://evil.example", "127.0.0.1:8080", "http")
    assert not same_origin("null", "127.0.0.1:8080", "http")
