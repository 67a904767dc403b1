"""Agent-assist suggestions on the dashboard: the per-call SSE stream over a real HTTP server and Redis."""

from __future__ import annotations

import re

import httpx
import redis.asyncio as aioredis

from examples.agent_assist import PRODUCER, SUGGESTION
from gateway.consumer import StreamWriter
from tests.conftest import REDIS_URL
from tests.unit.test_web_live import publish
from tests.unit.test_web_sse import SseReader, live_call, server  # noqa: F401  (fixture)
from tests.pg_server import prompt_texts


async def suggest(prefix: str, call_id: str, key: str, text: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        writer = StreamWriter(client, f"{prefix}:assist", PRODUCER, per_call=True)
        assert await writer.publish(SUGGESTION, call_id, key, {"suggestion": key, "text": text, "matched": key,
                                                               "start_ms": 61_000, "link": "https://kb.example/x"})
    finally:
        await client.aclose()


async def test_suggestions_replay_then_follow_live_and_resume_after_last_event_id(server):  # noqa: F811
    call_id = "4f1c2a9e-0000-4000-8000-00000000aaaa"
    await suggest(server["prefix"], call_id, "refund", "Offer a refund")
    await suggest(server["prefix"], "another-call", "cancel", "Not for this call")
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", f"/calls/{call_id}/assist/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            sse = SseReader(response)
            event, first_id, data = await sse.next()
            assert (event, data["suggestion"], data["text"], data["call_id"]) == \
                ("suggestion", "refund", "Offer a refund", call_id)
            assert data["event_id"] == "assist:refund" and data["link"] == "https://kb.example/x"
            await suggest(server["prefix"], call_id, "password", "Send the reset link")
            event, second_id, data = await sse.next()
            assert (event, data["suggestion"]) == ("suggestion", "password")
            assert second_id > first_id
        headers = {**server["headers"], "Last-Event-ID": first_id}
        async with client.stream("GET", f"/calls/{call_id}/assist/stream", headers=headers) as response:
            event, ident, data = await SseReader(response).next()
            assert (ident, data["suggestion"]) == (second_id, "password")  # not the one it had


async def test_assist_stream_needs_authentication_and_a_valid_id(server):  # noqa: F811
    async with httpx.AsyncClient(base_url=server["base"], timeout=10) as client:
        assert (await client.get("/calls/x/assist/stream")).status_code == 401
        r = await client.get("/calls/bad%20id/assist/stream", headers=server["headers"])
        assert r.status_code == 404


async def test_live_call_page_has_the_suggestions_panel(server):  # noqa: F811
    call = live_call(prompt_texts()[:1], ended=False)
    await publish(server["prefix"], call)
    call_id = call[0].call.call_id
    dashboard = server["dashboard"]
    from tests.waiting import wait_for

    await wait_for(lambda: dashboard.hub.get(call_id) is not None, 10, "the call on the live board")
    async with httpx.AsyncClient(base_url=server["base"], timeout=10) as client:  # a browser: log in
        form = await client.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        r = await client.post("/login", data={"username": "alice", "password": "correct horse battery",
                                              "csrf_token": csrf, "next": "/"})
        assert r.status_code in (200, 303), r.status_code
        page = await client.get(f"/calls/{call_id}")
    assert page.status_code == 200
    assert f'data-stream="/calls/{call_id}/assist/stream"' in page.text
    assert "/static/assist.js" in page.text
