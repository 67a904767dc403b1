"""Caller-controlled strings are cleaned once at ingress (gateway/identity.py), and the sinks
survive what older producers wrote.

The regression test plays a SIP caller over UDP against a real Gateway that runs the
persister (SQLite) and the dashboard: an INVITE whose From, To and Call-ID carry a raw
0xff byte and ESC sequences, and one whose From is 3000 characters long, used to make
``/``, ``/api/live`` and the call page answer 500 for everyone and every event of those
calls poison for the store.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from sqlalchemy import select

from gateway.events import CALL_STARTED, CallInfo, Event, EventFactory, Source
from gateway.identity import ELLIPSIS, MAX_IDENTITY, clean_event_body, identity, is_safe, safe_text
from gateway.ingest.twilio.protocol import TwilioStream
from gateway.persister import parse_entry
from gateway.store import migrate
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.models import Call
from gateway.store.users import create_token, create_user
from gateway.tail import format_event
from tests.unit.test_gateway_failures import G711, Caller, make_gateway, open_peer, published_events  # noqa: F401

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
PASSWORD = "correct horse battery"


# -- the sanitizer -----------------------------------------------------------------------------

def test_bad_bytes_and_lone_surrogates_become_replacement_characters() -> None:
    assert safe_text(b"sip:caf\xc3\xa9\xff@pbx", 100) == "sip:caf\u00e9\ufffd@pbx"
    # what the SIP parser makes of a 0xff byte (surrogateescape)
    assert safe_text(b"sip:a\xffb@pbx".decode("utf-8", "surrogateescape"), 100) == "sip:a\ufffdb@pbx"
    assert safe_text("x\ud800y", 100) == "x\ufffdy"
    assert safe_text(None, 10) == ""


@pytest.mark.parametrize("control", ["\x00", "\x07", "\t", "\r", "\n", "\x1b", "\x7f", "\x85", "\x9b", "\u2028",
                                     "\u2029", "\u202e", "\u202a", "\u2066", "\u2069", "\u200f", "\u061c", "\ufeff"])
def test_control_characters_are_removed(control: str) -> None:
    assert safe_text(f"sip:al{control}ice@pbx", 100) == "sip:alice@pbx"


def test_escape_sequences_lose_their_escape() -> None:
    assert safe_text('"\x1b]0;owned\x07\x1b[2J" <sip:a@b>', 100) == '"]0;owned[2J" <sip:a@b>'


def test_length_is_capped_with_a_visible_cut() -> None:
    assert len(identity("a" * 3000)) == MAX_IDENTITY
    assert identity("a" * 3000).endswith(ELLIPSIS)
    assert identity("a" * MAX_IDENTITY) == "a" * MAX_IDENTITY
    assert safe_text("abcdef", 3) == "ab" + ELLIPSIS
    with pytest.raises(ValueError):
        safe_text("x", 0)


def test_ordinary_text_is_unchanged() -> None:
    for value in ('"Zoë Ünal" <sip:+4930123@pbx.example;user=phone>', "tel:+15551234", "a84b4c76e66710@pc33",
                  "\u5f20\u4f1f <sip:zhang@example.cn>", "\U0001f600 <sip:emoji@x>"):
        assert safe_text(value, 512) == value


@hsettings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=700), st.text(max_size=700)), st.integers(1, 600))
def test_any_input_gives_encodable_bounded_text_without_controls(raw: bytes | str, limit: int) -> None:
    out = safe_text(raw, limit)
    out.encode("utf-8")  # never raises
    assert len(out) <= limit
    assert not UNSAFE.search(out)
    assert safe_text(out, limit) == out and is_safe(out, limit)  # idempotent


def test_a_sink_cleans_events_older_producers_wrote() -> None:
    body = {"from": "sip:\udcff\x1b[31m" + "a" * 3000, "to": "sip:b@x", "sip_call_id": "c\udcff",
            "source": {"kind": "sip", "call_id": "c\udcff"}, "tags": ["t\udcff"]}
    out = clean_event_body(json.loads(json.dumps(body)))
    assert len(out["from"]) == MAX_IDENTITY and "\x1b" not in out["from"] and "\ufffd" in out["from"]
    assert out["sip_call_id"] == "c\ufffd" and out["source"]["call_id"] == "c\ufffd" and out["tags"] == ["t\ufffd"]
    json.dumps(out, ensure_ascii=False).encode("utf-8")


def test_the_persister_stores_an_old_event_with_a_bad_identity(tmp_path) -> None:
    """An event published raw (no ingress cleaning) is stored, not skipped as poison."""
    info = CallInfo(str(uuid.uuid4()), "c\udcff", "sip:bad\udcff\x1b[2J" + "x" * 3000 + "@pbx", "sip:b@x", 0.0,
                    source=Source("sip", (("call_id", "c\udcff"),)))
    entry = parse_entry("1-0", EventFactory(info).make(CALL_STARTED, {"legs": ["caller"]}).to_fields())
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        from gateway.persister import EventStore

        assert EventStore(engine).write([entry]).poison == []
        with make_sessionmaker(engine)() as s:
            row = s.get(Call, info.call_id)
            assert row is not None and len(row.from_uri) == MAX_IDENTITY and row.sip_call_id == "c\ufffd"
    finally:
        engine.dispose()


def test_twilio_ids_with_a_trailing_newline_are_refused() -> None:
    stream = TwilioStream()
    start = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
             "start": {"streamSid": "MZ1", "callSid": "CA1\n\x1b[2J", "accountSid": "AC1",
                       "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    actions = stream.receive(json.dumps(start), 0.0)
    assert stream.started is None, actions
    start["start"]["callSid"] = "CA1\n"
    stream.receive(json.dumps(start), 0.0)
    assert stream.started is None


# -- through the real transport -----------------------------------------------------------------

class RawCaller(Caller):
    """A Caller whose From, To and Call-ID are raw bytes (not necessarily UTF-8), the same in
    every request of the dialog as RFC 3261 12.2.1.1 wants. ``call_id`` holds the Call-ID as
    the gateway's parser reads it (surrogateescape), so responses still match."""

    def __init__(self, peer, *, raw_from: bytes, raw_to: bytes | None = None, raw_call_id: bytes | None = None,
                 **kw) -> None:
        super().__init__(peer, **kw)
        self.raw_from = raw_from + b";tag=" + self.from_tag.encode()
        self.raw_to = raw_to
        if raw_call_id is not None:
            self.call_id = raw_call_id.decode("utf-8", "surrogateescape")

    def request(self, method: str, **kw) -> bytes:  # type: ignore[override]
        real, self.call_id = self.call_id, "call-id-placeholder"
        try:
            data = super().request(method, **kw)
        finally:
            self.call_id = real
        lines = data.replace(b"call-id-placeholder", real.encode("utf-8", "surrogateescape")).split(b"\r\n")
        for i, line in enumerate(lines):
            if line.startswith(b"From: "):
                lines[i] = b"From: " + self.raw_from
            elif line.startswith(b"To: ") and self.raw_to is not None:
                tag = kw.get("to_tag") if kw.get("to_tag") is not None else self.to_tag
                lines[i] = b"To: " + self.raw_to + (b";tag=" + tag.encode() if tag else b"")
        return b"\r\n".join(lines)


async def test_hostile_identities_over_udp_break_neither_the_dashboard_nor_the_store(
        make_gateway, open_peer, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        user = create_user(s, "alice", PASSWORD, "supervisor")
        _, token = create_token(s, user, "tests")
        s.commit()
    gateway = await make_gateway(persist=True, web_enabled=True, database_url=url,
                                 web_secret_file=str(tmp_path / "web.secret"))
    peer = await open_peer(gateway)
    bad = RawCaller(peer, raw_from=b'"\x1b]0;owned\x07\x1b[31mEvil\xff\xe2\x80\xae" <sip:b\xffd@127.0.0.1>',
                    raw_to=f"<sip:10\xff00@127.0.0.1:{gateway.sip_port}>".encode("latin-1"),
                    raw_call_id=b"bad\xff" + uuid.uuid4().hex.encode())
    assert (await bad.invite(G711)).status == 200
    long = RawCaller(peer, raw_from=f"<sip:{'9' * 3000}@127.0.0.1>".encode())
    assert (await long.invite(G711)).status == 200
    assert len(gateway.calls) == 2

    base = f"http://127.0.0.1:{gateway.http.port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as web:
        live = await web.get("/api/live", headers={"Authorization": f"Bearer {token}"})
        assert live.status_code == 200, live.text
        calls = live.json()["calls"]
        assert len(calls) == 2
        for call in calls:
            assert not UNSAFE.search(call["from_uri"] + call["to_uri"]) and len(call["from_uri"]) <= MAX_IDENTITY
        froms = sorted(call["from_uri"] for call in calls)
        assert froms[0] == "sip:" + "9" * (MAX_IDENTITY - 5) + ELLIPSIS
        assert froms[1] == "sip:b\ufffdd@127.0.0.1"

        page = await web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        login = await web.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf,
                                               "next": "/"})
        assert login.status_code == 303, login.text
        board = await web.get("/")
        assert board.status_code == 200 and "b\ufffdd@127.0.0.1" in board.text
        for call in calls:
            page = await web.get(f"/calls/{call['call_id']}")
            assert page.status_code == 200, page.text[:300]
            assert "\x1b" not in page.text

        # what `earshot tail` prints of the published events
        events = await published_events(gateway)
        for body in events:
            assert not UNSAFE.search(body.get("from", "") + body.get("to", "") + body.get("sip_call_id", ""))
            line = format_event(Event.from_wire(body))
            assert line is None or "\x1b" not in line

        for caller in (bad, long):
            response = await caller.bye()
            assert response.status == 200, (response.status, response.reason)

        # the persister stored both calls (none of their events was poison)
        deadline = time.monotonic() + 15
        while True:
            with make_sessionmaker(engine)() as s:
                rows = list(s.scalars(select(Call)))
                if len(rows) == 2 and all(r.status == "ended" for r in rows):
                    break
            assert time.monotonic() < deadline, [(r.from_uri[:40], r.status) for r in rows]
            await asyncio.sleep(0.1)
        assert gateway.persister is not None and gateway.persister.poison == 0
        assert sorted(len(r.from_uri) for r in rows) == [len("sip:b\ufffdd@127.0.0.1"), MAX_IDENTITY]
        bad_row = next(r for r in rows if r.from_uri.startswith("sip:b"))
        assert bad_row.sip_call_id.startswith("bad\ufffd") and bad_row.to_uri == f"sip:10\ufffd00@127.0.0.1:{gateway.sip_port}"

        history = await web.get("/calls")
        assert history.status_code == 200
        for call in calls:
            page = await web.get(f"/calls/{call['call_id']}")
            assert page.status_code == 200
            api = await web.get(f"/api/calls/{call['call_id']}", headers={"Authorization": f"Bearer {token}"})
            assert api.status_code == 200
    engine.dispose()
