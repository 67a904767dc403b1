"""SIP digest authentication (gateway/sip/digest.py): RFC 7616 vectors, nonce expiry and replay, fake time."""

from __future__ import annotations

import pytest

from gateway.sip.digest import DigestServer, digest_response, parse_digest

URI = "sip:1000@198.51.100.7"


def test_rfc7616_vectors() -> None:
    # RFC 7616 section 3.9.1: the same credentials, nonce and cnonce with SHA-256 and with MD5
    args = ("Mufasa", "http-auth@example.org", "Circle of Life", "GET", "/dir/index.html",
            "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", "00000001", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
    assert digest_response("SHA-256", *args) == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    assert digest_response("MD5", *args) == "8ca523f5e9506fed4657c9700eebdbec"


def challenge_params(value: str) -> dict[str, str]:
    params = parse_digest(value)
    assert params is not None, value
    return params


def answer(server: DigestServer, challenge: str, *, nc: int = 1, password: str = "s3cret", username: str = "pbx",
           method: str = "INVITE", uri: str = URI, cnonce: str = "0a4f113b") -> str:
    """An Authorization value as a client builds it from one challenge value."""
    p = challenge_params(challenge)
    nc_text = f"{nc:08x}"
    response = digest_response(p["algorithm"], username, p["realm"], password, method, uri, p["nonce"], nc_text,
                               cnonce)
    return (f'Digest username="{username}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
            f'response="{response}", algorithm={p["algorithm"]}, cnonce="{cnonce}", qop=auth, nc={nc_text}')


@pytest.fixture
def server() -> DigestServer:
    return DigestServer("pbx", "s3cret", realm="earshot", nonce_ttl=300.0)


def test_challenge_offers_sha256_first_then_md5_with_one_nonce(server: DigestServer) -> None:
    values = server.challenge(0.0)
    params = [challenge_params(v) for v in values]
    assert [p["algorithm"] for p in params] == ["SHA-256", "MD5"]
    assert {p["nonce"] for p in params} == {params[0]["nonce"]}
    assert all(p["qop"] == "auth" and p["realm"] == "earshot" and "stale" not in p for p in params)
    assert challenge_params(server.challenge(0.0, stale=True)[0])["stale"] == "true"


@pytest.mark.parametrize("index", [0, 1], ids=["sha-256", "md5"])
def test_right_credentials_in_either_algorithm(server: DigestServer, index: int) -> None:
    challenge = server.challenge(10.0)[index]
    result = server.verify("INVITE", URI, answer(server, challenge), 11.0)
    assert result.ok and result.username == "pbx"


@pytest.mark.parametrize(("change", "reason"), [
    ({"password": "guess"}, "wrong credentials"),
    ({"username": "other"}, "wrong credentials"),
    ({"method": "BYE"}, "wrong credentials"),  # signed for another method
    ({"uri": "sip:2000@198.51.100.7"}, "digest uri differs from the Request-URI"),
])
def test_wrong_answers_are_refused_not_stale(server: DigestServer, change: dict[str, str], reason: str) -> None:
    challenge = server.challenge(0.0)[0]
    result = server.verify("INVITE", URI, answer(server, challenge, **change), 1.0)
    assert not result.ok and not result.stale and result.reason == reason


def test_expired_nonce_is_stale_only_with_the_right_password(server: DigestServer) -> None:
    challenge = server.challenge(0.0)[0]
    late = server.verify("INVITE", URI, answer(server, challenge), 301.0)
    assert (late.ok, late.stale) == (False, True)
    wrong_and_late = server.verify("INVITE", URI, answer(server, challenge, password="x"), 301.0)
    assert (wrong_and_late.ok, wrong_and_late.stale) == (False, False)


def test_replayed_nonce_count_is_refused_and_a_higher_one_taken(server: DigestServer) -> None:
    challenge = server.challenge(0.0)[0]
    assert server.verify("INVITE", URI, answer(server, challenge, nc=1), 1.0).ok
    replay = server.verify("INVITE", URI, answer(server, challenge, nc=1), 2.0)
    assert not replay.ok and not replay.stale and "replayed" in replay.reason
    assert server.verify("INVITE", URI, answer(server, challenge, nc=2), 3.0).ok
    assert not server.verify("INVITE", URI, answer(server, challenge, nc=2), 4.0).ok


def test_forged_or_foreign_nonce_is_refused(server: DigestServer) -> None:
    other = DigestServer("pbx", "s3cret", realm="earshot")  # same credentials, another secret
    challenge = other.challenge(0.0)[0]
    result = server.verify("INVITE", URI, answer(server, challenge), 1.0)
    assert not result.ok and result.reason == "nonce not ours"
    tampered = challenge.replace('nonce="', 'nonce="A', 1)
    assert not server.verify("INVITE", URI, answer(server, tampered), 1.0).ok


def test_nonce_table_is_bounded_and_forgotten_nonces_cannot_be_replayed() -> None:
    server = DigestServer("pbx", "s3cret", max_tracked=2)
    challenges = [server.challenge(float(t))[0] for t in range(3)]
    for t, challenge in enumerate(challenges):
        assert server.verify("INVITE", URI, answer(server, challenge), 10.0 + t).ok
    assert len(server._nc) == 2
    # the first nonce was pushed out: a replay of its nc=1 must not pass
    replay = server.verify("INVITE", URI, answer(server, challenges[0]), 20.0)
    assert not replay.ok and replay.stale
    # a nonce issued later and never used still works
    assert server.verify("INVITE", URI, answer(server, server.challenge(21.0)[0]), 22.0).ok


@pytest.mark.parametrize("value", [
    "Basic cGJ4OnMzY3JldA==",
    'Digest username="pbx", username="x"',
    "Digest " + "a" * 5000,
    'Digest username="pbx" realm="x"',
])
def test_unparsable_credentials_are_refused(server: DigestServer, value: str) -> None:
    assert not server.verify("INVITE", URI, value, 0.0).ok


def test_only_offered_algorithms_and_qop_auth() -> None:
    server = DigestServer("pbx", "s3cret", algorithms=("SHA-256",))
    assert [challenge_params(v)["algorithm"] for v in server.challenge(0.0)] == ["SHA-256"]
    challenge = server.challenge(0.0)[0]
    md5 = answer(server, challenge).replace("algorithm=SHA-256", "algorithm=MD5")
    assert server.verify("INVITE", URI, md5, 1.0).reason == "algorithm 'MD5' not offered"
    no_qop = answer(server, challenge).replace(", qop=auth", "")
    assert server.verify("INVITE", URI, no_qop, 1.0).reason == "qop=auth required"
