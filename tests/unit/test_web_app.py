"""Dashboard pages, login, CSRF, sessions and the JSON API, against a real migrated SQLite store.

The store is filled the way production fills it: realistic gateway events
(tests.pg_server.recorded_call) written by the persister's own store_events.
Time is injected: a fake monotonic clock for the login throttle and a fake
wall clock for session expiry, so no test sleeps.
"""

import re
from datetime import datetime, timezone
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from gateway.config import Settings
from gateway.http import build_app
from gateway.metrics import Metrics
from gateway.persister import parse_entry, store_events
from gateway.store import migrate
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.users import create_token, create_user, get_user, revoke_token, set_password
from gateway.web import Dashboard
from gateway.web.auth import SESSION_COOKIE
from tests.pg_server import prompt_texts, recorded_call

PASSWORD = "correct horse battery"
T0 = datetime(2026, 1, 10, 10, 0, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_calls(session, calls) -> None:
    entries, n = [], 0
    for events in calls:
        for event in events:
            n += 1
            entries.append(parse_entry(f"{n}-0", event.to_fields()))
    store_events(session, entries)
    session.commit()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A migrated SQLite store with users, a token and three calls (two ended, one live)."""
    path = tmp_path_factory.mktemp("webstore") / "earshot.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    engine = make_engine(url)
    texts = prompt_texts()
    calls = {
        "support": recorded_call(texts[:3], start=T0, from_user="5551234", tags=("support",), digits="12#"),
        "refund": recorded_call(["I would like a refund for my order please", "Thank you for calling"],
                                start=T0 + DAY, from_user="bob", to_user="sales", tags=("sales",)),
        "live": recorded_call([texts[5]], start=T0 + 2 * DAY, from_user="carol", tags=("support", "vip"),
                              ended=False),
    }
    with make_sessionmaker(engine)() as s:
        alice = create_user(s, "alice", PASSWORD, "supervisor")
        create_user(s, "root", PASSWORD, "admin")
        create_user(s, "target", PASSWORD, "supervisor")
        create_user(s, "changer", PASSWORD, "supervisor")
        _, token = create_token(s, alice, "tests")
        revoked, revoked_token = create_token(s, alice, "old")
        revoke_token(s, revoked.id)
        s.commit()
        store_calls(s, calls.values())
    yield {"url": url, "engine": engine, "token": token, "revoked_token": revoked_token,
           "ids": {name: events[0].call.call_id for name, events in calls.items()}, "texts": texts}
    engine.dispose()


@pytest.fixture
def clock():
    return Clock(1000.0)


@pytest.fixture
def wall():
    return Clock(T0 + 3 * DAY)


@pytest.fixture
def dashboard(store, clock, wall, tmp_path):
    settings = Settings(database_url=store["url"], stream_prefix="earshot-webapp-unused",
                        web_secret_file=str(tmp_path / "secret"), web_session_ttl_s=3600)
    d = Dashboard(settings, engine=store["engine"], clock=clock, wall=wall)
    yield d


@pytest.fixture
def client(dashboard):
    with TestClient(dashboard.asgi) as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def login(client, username="alice", password=PASSWORD, next="/"):
    page = client.get("/login")
    assert page.status_code == 200
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf_of(page.text),
                                       "next": next}, follow_redirects=False)


def auth(store, token=None):
    return {"Authorization": f"Bearer {token or store['token']}"}


# -- login, logout, sessions


def test_pages_need_a_login(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = client.get("/calls?q=refund", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=" + quote("/calls?q=refund", safe="")


def test_login_sets_a_safe_session_cookie_and_logout_ends_it(client):
    r = login(client, next="/calls")
    assert r.status_code == 303 and r.headers["location"] == "/calls"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE + "=")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=3600" in cookie
    value = client.cookies[SESSION_COOKIE]
    board = client.get("/")
    assert board.status_code == 200 and "Live calls" in board.text and "alice" in board.text
    r = client.post("/logout", data={"csrf_token": csrf_of(board.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).status_code == 303
    # the old cookie, replayed, is dead too (revoked, not just deleted from the browser)
    client.cookies.set(SESSION_COOKIE, value)
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_page_when_already_logged_in_goes_on(client):
    login(client)
    r = client.get("/login?next=/calls", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/calls"


def test_wrong_password_is_refused(client):
    r = login(client, password="not the password")
    assert r.status_code == 401 and "Wrong username or password." in r.text
    assert client.get("/", follow_redirects=False).status_code == 303
    r = login(client, username="nobody-here")
    assert r.status_code == 401 and "Wrong username or password." in r.text  # same words: no user enumeration


def test_offsite_next_is_ignored(client):
    r = login(client, next="https://evil.example/")
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_repeated_failures_from_one_address_are_slowed(client, clock):
    for i in range(4):  # three free failures, the fourth imposes 1 s
        assert login(client, username=f"guess{i}", password="x" * 9).status_code == 401
    r = login(client, username="alice")  # right password, but too soon: refused unchecked
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "Too many failed logins" in r.text
    clock.now += 1.0
    assert login(client, username="guess5", password="x" * 9).status_code == 401  # fifth failure: 2 s
    clock.now += 1.0
    assert login(client, username="alice").status_code == 429
    clock.now += 1.0
    assert login(client, username="alice").status_code == 303
    # a success does not reset the address: the next failure still counts as the sixth
    client.cookies.clear()
    assert login(client, username="guess6", password="x" * 9).status_code == 401
    r = login(client, username="guess7", password="x" * 9)
    assert r.status_code == 429 and r.headers["retry-after"] == "4"


def test_a_stranger_guessing_cannot_lock_the_account_out(dashboard, clock):
    """Five wrong passwords from one address lock that address out of that account, not the
    account: its owner, at another address, logs in at once (gateway/web/throttle.py)."""
    with TestClient(dashboard.asgi, client=("203.0.113.9", 40000)) as stranger, \
            TestClient(dashboard.asgi, client=("198.51.100.1", 40000)) as owner:
        for i in range(5):
            clock.now += 60
            r = login(stranger, username="target", password=f"wrong-{i}-password")
            assert r.status_code == 401
        assert "this address must wait a while" in r.text
        clock.now += 120  # past any delay: the stranger's lockout (15 min) for this account holds
        r = login(stranger, username="target")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 600
        assert login(stranger, username="alice").status_code == 303  # other accounts are not locked
        assert login(owner, username="target").status_code == 303
        assert owner.get("/", follow_redirects=False).status_code == 200


def test_login_and_logout_need_the_csrf_token(client):
    page = client.get("/login")
    token = csrf_of(page.text)
    base = {"username": "alice", "password": PASSWORD, "next": "/"}
    r = client.post("/login", data=base, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/login", data={**base, "csrf_token": token + "x"}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/login", data={**base, "csrf_token": token}, headers={"Origin": "http://evil.example"},
                    follow_redirects=False)
    assert r.status_code == 403 and "cross-site" in r.text
    # a token from another visitor's session is no good either
    other = TestClient(client.app)
    r = other.post("/login", data={**base, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 403
    assert login(client).status_code == 303
    r = client.post("/logout", data={}, follow_redirects=False)
    assert r.status_code == 403
    assert client.get("/").status_code == 200  # still logged in


def test_session_expires(client, wall):
    login(client)
    wall.now += 3599
    assert client.get("/").status_code == 200
    wall.now += 1
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/me").status_code == 401


def test_password_change_ends_existing_sessions(client, store):
    login(client, username="changer")
    assert client.get("/").status_code == 200
    with make_sessionmaker(store["engine"])() as s:
        set_password(s, get_user(s, "changer"), "a brand new password")
        s.commit()
    assert client.get("/", follow_redirects=False).status_code == 303


def test_sessions_survive_a_restart(store, clock, wall, tmp_path):
    settings = Settings(database_url=store["url"], web_secret_file=str(tmp_path / "secret"))
    first = TestClient(Dashboard(settings, engine=store["engine"], clock=clock, wall=wall).asgi)
    login(first)
    second = TestClient(Dashboard(settings, engine=store["engine"], clock=clock, wall=wall).asgi)
    second.cookies.set(SESSION_COOKIE, first.cookies[SESSION_COOKIE])
    assert second.get("/").status_code == 200


def test_a_logout_holds_across_a_restart_and_in_every_process(store, clock, wall, tmp_path):
    """The logged-out cookie, replayed to a dashboard started afresh on the same store (a
    restart, or a second gateway), is refused: the revocation is in the store, not in memory."""
    settings = Settings(database_url=store["url"], web_secret_file=str(tmp_path / "secret"))
    first = TestClient(Dashboard(settings, engine=store["engine"], clock=clock, wall=wall).asgi)
    login(first)
    board = first.get("/")
    value = first.cookies[SESSION_COOKIE]
    other = TestClient(Dashboard(settings, engine=store["engine"], clock=clock, wall=wall).asgi)
    other.cookies.set(SESSION_COOKIE, value)
    assert other.get("/", follow_redirects=False).status_code == 200  # the other process sees it logged in
    assert first.post("/logout", data={"csrf_token": csrf_of(board.text)}, follow_redirects=False).status_code == 303
    assert other.get("/", follow_redirects=False).status_code == 303  # ... and now logged out
    restarted = TestClient(Dashboard(settings, engine=store["engine"], clock=clock, wall=wall).asgi)
    restarted.cookies.set(SESSION_COOKIE, value)
    assert restarted.get("/", follow_redirects=False).status_code == 303
    assert restarted.get("/api/me").status_code == 401


def test_revocations_are_dropped_once_their_session_would_have_expired(store):
    from datetime import timedelta

    from gateway.store.models import WebRevocation
    from gateway.store.users import revoke_session, session_revoked

    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    with make_sessionmaker(store["engine"])() as s:
        revoke_session(s, "old-sid", now + timedelta(hours=1), now)
        revoke_session(s, "new-sid", now + timedelta(hours=3), now + timedelta(hours=2))
        assert not session_revoked(s, "old-sid") and session_revoked(s, "new-sid")
        revoke_session(s, "gone-sid", now, now + timedelta(hours=2))  # already expired: not kept
        assert s.query(WebRevocation).filter(WebRevocation.sid.in_(["old-sid", "gone-sid"])).count() == 0
        s.rollback()


# -- the JSON API


def test_api_needs_a_token_or_a_session(client, store):
    r = client.get("/api/calls")
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.get("/api/calls", headers=auth(store, "esk_not-a-real-token"))
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API token"
    assert client.get("/api/calls", headers=auth(store, store["revoked_token"])).status_code == 401
    r = client.get("/api/calls", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert client.get("/api/me", headers=auth(store)).json() == {"username": "alice", "role": "supervisor",
                                                                 "via": "token"}
    login(client)
    assert client.get("/api/me").json()["via"] == "session"


def test_api_admin_only_endpoint(client, store):
    r = client.get("/api/users", headers=auth(store))
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    login(client, username="root")
    names = [u["username"] for u in client.get("/api/users").json()]
    assert {"alice", "root"} <= set(names)


def test_api_lists_and_filters_calls(client, store):
    ids = store["ids"]
    h = auth(store)
    everything = client.get("/api/calls", headers=h).json()
    assert everything["total"] == 3 and [c["call_id"] for c in everything["items"]] == [
        ids["live"], ids["refund"], ids["support"]]  # newest first

    def found(**params):
        r = client.get("/api/calls", params=params, headers=h)
        assert r.status_code == 200, r.text
        return [c["call_id"] for c in r.json()["items"]]

    assert found(party="5551234") == [ids["support"]]
    assert found(party="SALES") == [ids["refund"]]
    assert found(tag="vip") == [ids["live"]]
    assert found(tag="support") == [ids["live"], ids["support"]]
    assert found(status="live") == [ids["live"]]
    assert found(status="ended") == [ids["refund"], ids["support"]]
    assert found(q="refunds") == []
    assert found(q="refund order") == [ids["refund"]]
    assert found(since="2026-01-11T00:00:00Z") == [ids["live"], ids["refund"]]
    assert found(since="2026-01-11T00:00:00Z", until="2026-01-12T00:00:00Z") == [ids["refund"]]
    assert found(until="2026-01-11T09:00:00") == [ids["support"]]  # no offset: UTC
    assert found(since="2026-01-11T12:00:00+02:00", until="2026-01-11T12:00:01+02:00") == [ids["refund"]]
    page = client.get("/api/calls", params={"limit": 2, "offset": 1}, headers=h).json()
    assert [c["call_id"] for c in page["items"]] == [ids["refund"], ids["support"]]
    assert page["total"] == 3 and not page["has_more"]
    assert client.get("/api/calls", params={"limit": 1}, headers=h).json()["has_more"]


@pytest.mark.parametrize("params,field", [
    ({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"offset": -1}, "offset"), ({"limit": "ten"}, "limit"),
    ({"since": "yesterday"}, "since"), ({"status": "paused"}, "status"), ({"party": "a\x00b"}, "party"),
    ({"q": "x" * 501}, "q"),
])
def test_api_422_names_the_field(client, store, params, field):
    r = client.get("/api/calls", params=params, headers=auth(store))
    assert r.status_code == 422
    body = r.json()
    assert body["errors"][0]["field"] == field and body["detail"].startswith(field + ":")


def test_api_extreme_dates_are_a_422_not_a_crash(client, store):
    r = client.get("/api/calls", params={"until": "9999-12-31T23:59:59-23:59"}, headers=auth(store))
    assert r.status_code == 422 and r.json()["detail"].startswith("until:")


def test_api_call_detail(client, store):
    call_id = store["ids"]["support"]
    r = client.get(f"/api/calls/{call_id}", headers=auth(store))
    assert r.status_code == 200
    call = r.json()
    assert call["from_user"] == "5551234" and call["status"] == "ended" and call["end_reason"] == "bye"
    assert [t["text"] for t in call["turns"]] == store["texts"][:3]
    assert [t["turn"] for t in call["turns"]] == [1, 2, 3] and all(t["final"] for t in call["turns"])
    assert call["turns"][0]["avg_logprob"] == pytest.approx(-0.21)
    assert [d["digit"] for d in call["dtmf"]] == ["1", "2", "#"]
    assert call["legs"] == ["caller"] and call["rtp"]["lost"] == 3
    r = client.get("/api/calls/00000000-0000-0000-0000-000000000000", headers=auth(store))
    assert r.status_code == 404 and "no call" in r.json()["detail"]
    assert client.get("/api/calls/" + "x" * 65, headers=auth(store)).status_code == 422


def test_api_search(client, store):
    r = client.get("/api/search", params={"q": "refund"}, headers=auth(store))
    hits = r.json()
    assert hits["total"] == 1 and hits["items"][0]["call"]["call_id"] == store["ids"]["refund"]
    assert hits["items"][0]["text"] == "I would like a refund for my order please"
    assert client.get("/api/search", params={"q": "\"'); DROP TABLE turns; --"}, headers=auth(store)).json()[
        "total"] == 0
    r = client.get("/api/search", headers=auth(store))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "q"


def test_api_live_reads_the_hub_not_sql(client, store):
    body = client.get("/api/live", headers=auth(store)).json()
    assert body == {"redis": "unreachable", "calls": []}  # hub never started: SQL's live call is not shown


def test_openapi_documents_the_api_only(client):
    doc = client.get("/openapi.json").json()
    assert {"/api/calls", "/api/calls/{call_id}", "/api/search", "/api/live"} <= set(doc["paths"])
    assert not any(p.startswith("/login") or p.endswith("/stream") for p in doc["paths"])
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_errors_are_json_for_the_api_and_html_for_people(client):
    r = client.get("/api/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "nothing at /api/nothing-here"}
    r = client.get("/nothing-here", headers={"Accept": "text/html"})
    assert r.status_code == 404 and "<html" in r.text and "nothing at /nothing-here" in r.text
    r = client.delete("/api/calls")
    assert r.status_code == 405 and "DELETE" in r.json()["detail"]


def test_database_down_is_a_503(store, tmp_path, clock, wall):
    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    d = Dashboard(Settings(database_url=url, web_secret_file=str(tmp_path / "s")), clock=clock, wall=wall)
    r = TestClient(d.asgi).get("/api/calls", headers=auth(store))
    assert r.status_code == 503 and "database" in r.json()["detail"]


# -- pages


def test_history_page_filters_and_searches(client, store):
    login(client)
    r = client.get("/calls")
    assert r.status_code == 200 and "3 calls" in r.text
    for call_id in store["ids"].values():
        assert call_id in r.text
    r = client.get("/calls", params={"q": "refund"})
    assert "1 call with" in r.text and store["ids"]["refund"] in r.text
    assert "<mark>refund</mark>" in r.text
    r = client.get("/calls", params={"party": "5551234"})
    assert store["ids"]["support"] in r.text and store["ids"]["refund"] not in r.text
    r = client.get("/calls", params={"tag": "vip", "status": "live"})
    assert store["ids"]["live"] in r.text and store["ids"]["support"] not in r.text
    r = client.get("/calls", params={"from": "2026-01-11", "to": "2026-01-11"})
    assert "1 call" in r.text and store["ids"]["refund"] in r.text
    r = client.get("/calls", params={"from": "last tuesday", "page": "x"})
    assert r.status_code == 200 and "from: not a date" in r.text and "page: not a number" in r.text


def test_search_text_is_escaped(client):
    login(client)
    r = client.get("/calls", params={"q": "<script>alert(1)</script>"})
    assert r.status_code == 200 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text


def test_call_detail_page(client, store):
    login(client)
    r = client.get(f"/calls/{store['ids']['support']}")
    assert r.status_code == 200
    html = r.text
    for text in store["texts"][:3]:
        assert text in html
    assert 'data-key="caller:1"' in html and ">00:00<" in html and ">81%<" in html
    assert "<kbd" in html and "#</kbd>" in html
    assert 'data-stream=' not in html  # an ended call is not followed live
    assert client.get("/calls/no-such-call").status_code == 404


def test_security_headers_and_static_assets(client):
    r = client.get("/login")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    css = client.get("/static/earshot.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = client.get("/static/earshot.js")
    assert js.status_code == 200 and "EventSource" in js.text
    assert "<script>" not in r.text and "http" not in re.sub(r'href="/[^"]*"', "", r.text.split("<body>")[0])


def test_gateway_http_app_serves_health_metrics_and_the_dashboard(dashboard):
    async def health():
        return {"status": "ok"}

    app = build_app(Metrics(lambda: {}), health, web=dashboard.asgi)
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/metrics").status_code == 200
        assert c.get("/", follow_redirects=False).headers["location"] == "/login"
        assert c.get("/openapi.json").status_code == 200
    plain = build_app(Metrics(lambda: {}), health)
    with TestClient(plain) as c:
        assert c.get("/").status_code == 404
