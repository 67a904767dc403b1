"""Sessions from every source in the store and on the dashboard: the persister fills
calls.source_kind/source_ids (from v2 events, and from v1 events as SIP), and the board,
history, call page and JSON API show them. A real migrated SQLite store; the live board is
fed the events directly (its Redis side is tested in test_web_live)."""

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from gateway.config import Settings
from gateway.events import Source
from gateway.persister import parse_entry, store_events
from gateway.store import migrate
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.models import Call
from gateway.store.users import create_user
from gateway.web import Dashboard
from tests.pg_server import recorded_call

T0 = 1_767_000_000.0
PASSWORD = "correct horse battery"
TWILIO = Source("twilio", (("call_sid", "CA5f0c"), ("stream_sid", "MZ18aa"), ("account_sid", "AC02bb")))
REALTIME = Source("realtime", (("session_id", "sess_4e1d"),))
REST = Source("rest", (("request_id", "req_77"), ("filename", "meeting.wav")))


def as_v1(event) -> dict:
    """The event as a gateway from before sources wrote it."""
    wire = event.to_wire()
    del wire["source"]
    wire["schema"] = "earshot.event.v1"
    return wire


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('sources') / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    calls = {
        "sip": recorded_call(["Hello from a phone."], start=T0, from_user="5551234"),
        "v1": recorded_call(["An old stream entry."], start=T0 + 10, from_user="5550000"),
        "twilio": recorded_call(["Hello from Twilio."], start=T0 + 20, tags=(), source=TWILIO),
        "rest": recorded_call(["Hello from an upload."], start=T0 + 30, tags=(), source=REST),
    }
    entries, n = [], 0
    for name, events in calls.items():
        for event in events:
            n += 1
            fields = {"data": json.dumps(as_v1(event))} if name == "v1" else event.to_fields()
            entries.append(parse_entry(f"{n}-0", fields))
    with make_sessionmaker(engine)() as s:
        create_user(s, "alice", PASSWORD, "supervisor")
        s.commit()
        store_events(s, entries)
        s.commit()
    yield {"url": url, "engine": engine, "calls": calls,
           "ids": {name: events[0].call.call_id for name, events in calls.items()}}
    engine.dispose()


@pytest.fixture
def client(store, tmp_path):
    settings = Settings(database_url=store["url"], stream_prefix="earshot-sources-unused",
                        web_secret_file=str(tmp_path / "secret"))
    dashboard = Dashboard(settings, engine=store["engine"])
    with TestClient(dashboard.asgi) as c:  # the hub is not started: the board is fed by the test
        c.dashboard = dashboard
        form = c.get("/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        assert c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf, "next": "/"},
                      follow_redirects=False).status_code == 303  # pages: the session cookie; the API takes it too
        yield c


def test_the_persister_stores_each_sessions_source(store):
    with make_sessionmaker(store["engine"])() as s:
        rows = {name: s.get(Call, call_id) for name, call_id in store["ids"].items()}
        sip_ids = dict(store["calls"]["sip"][0].call.source.ids)
        assert (rows["sip"].source_kind, rows["sip"].source_ids) == ("sip", sip_ids)
        v1_sip_call_id = store["calls"]["v1"][0].call.sip_call_id
        assert (rows["v1"].source_kind, rows["v1"].source_ids) == ("sip", {"call_id": v1_sip_call_id})
        assert rows["v1"].from_user == "5550000" and rows["v1"].turn_count == 1
        assert (rows["twilio"].source_kind, rows["twilio"].source_ids) == \
            ("twilio", {"call_sid": "CA5f0c", "stream_sid": "MZ18aa", "account_sid": "AC02bb"})
        assert (rows["twilio"].from_uri, rows["twilio"].sip_call_id, rows["twilio"].codec) == ("", "", None)
        assert rows["rest"].source_id_map == {"request_id": "req_77", "filename": "meeting.wav"}
        assert rows["rest"].status == "ended" and rows["rest"].end_reason == "client-closed"


def test_the_api_shows_the_source_and_filters_by_it(client, store):
    listed = client.get("/api/calls").json()["items"]
    kinds = {c["call_id"]: c["source_kind"] for c in listed}
    assert kinds[store["ids"]["twilio"]] == "twilio" and kinds[store["ids"]["v1"]] == "sip"
    only = client.get("/api/calls", params={"source": "twilio"}).json()
    assert [c["call_id"] for c in only["items"]] == [store["ids"]["twilio"]] and only["total"] == 1
    assert client.get("/api/calls", params={"source": "fax"}).status_code == 422
    detail = client.get(f"/api/calls/{store['ids']['rest']}").json()
    assert detail["source_kind"] == "rest" and detail["source_ids"] == {"request_id": "req_77",
                                                                       "filename": "meeting.wav"}
    assert detail["turns"][0]["text"] == "Hello from an upload."


def test_history_and_call_pages_show_the_source(client, store):
    page = client.get("/calls").text
    assert page.count('<span class="source twilio"') == 1 and page.count('<span class="source sip"') == 2
    assert '<option value="webrtc"' in page
    filtered = client.get("/calls", params={"source": "rest"}).text
    assert store["ids"]["rest"] in filtered and store["ids"]["sip"] not in filtered
    assert "source: must be one of" in client.get("/calls", params={"source": "fax"}).text
    call = client.get(f"/calls/{store['ids']['twilio']}").text
    assert "Twilio session" in call
    for name, value in (("call_sid", "CA5f0c"), ("stream_sid", "MZ18aa"), ("account_sid", "AC02bb")):
        assert f'<span class="source-id">{name} <code>{value}</code></span>' in call
    sip = client.get(f"/calls/{store['ids']['sip']}").text
    assert "5551234" in sip and '<span class="source sip">SIP</span>' in sip


def test_the_live_board_shows_every_sessions_source(client):
    board = client.dashboard.hub.board
    live = {"realtime": recorded_call(["Streaming words."], start=time.time(), tags=(), ended=False,
                                      source=REALTIME),
            "sip": recorded_call(["A phone call."], start=time.time(), ended=False)}
    for events in live.values():
        for event in events:
            board.apply(event)
    page = client.get("/").text
    assert '<span class="source realtime">Realtime</span>' in page and '<span class="source sip">SIP</span>' in page
    calls = {c["call_id"]: c for c in client.get("/api/live").json()["calls"]}
    realtime = calls[live["realtime"][0].call.call_id]
    assert (realtime["source_kind"], realtime["source_ids"]) == ("realtime", {"session_id": "sess_4e1d"})
    assert realtime["latest_text"] == "Streaming words."
    call = client.get(f"/calls/{live['realtime'][0].call.call_id}").text
    assert "Realtime session" in call and "<code>sess_4e1d</code>" in call
