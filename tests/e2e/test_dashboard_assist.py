"""Agent assist in a real browser: the example consumer's suggestions appear beside the live transcript.

The dashboard runs in process (the `stack` of tests/e2e/test_dashboard.py: uvicorn, the
LiveHub, the persister, the gateway's own Publisher on the real Redis); the real
examples/agent_assist.py handler runs in a consumer group on the same event stream.
Debian's headless Chromium (Playwright) opens the call's live view: a customer final
that names a knowledge phrase makes a suggestion card appear without a reload, and a
later one adds a second card on top. Screenshot: artifacts/screenshots/assist-live-1280.png.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from examples.agent_assist import PRODUCER, AgentAssist, load_knowledge
from gateway.consumer import StreamConsumer, StreamWriter
from tests.e2e.test_dashboard import (  # noqa: F401  (the stack fixture)
    CHROMIUM,
    CHROMIUM_ARGS,
    REDIS_URL,
    ROOT,
    WIDE,
    async_api,
    log_in,
    publish,
    shot,
    stack,
)
from tests.pg_server import recorded_call

pytestmark = [pytest.mark.e2e]


async def test_suggestions_appear_beside_the_live_transcript(stack):  # noqa: F811
    expect = async_api.expect
    prefix = stack["publisher"].events_stream.rsplit(":", 1)[0]
    spoken = ["Hello, I have a question about my account",
              "I was charged twice this month and I want my money back",
              "Also I forgot my password"]
    call = recorded_call(spoken, start=time.time(), partials=0)
    call_id = call[0].call.call_id
    finals = [i for i, e in enumerate(call) if e.type == "turn.final"]
    client = aioredis.Redis.from_url(REDIS_URL)
    assist = AgentAssist(load_knowledge(ROOT / "examples" / "agent_assist.yaml"),
                         StreamWriter(client, f"{prefix}:assist", PRODUCER, per_call=True))
    consumer = StreamConsumer(client, stream=f"{prefix}:events", group="assist", consumer="e2e", start="0",
                              block_ms=200)
    running = asyncio.create_task(consumer.run(assist))
    base = stack["base"]
    try:
        async with async_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport=WIDE)
                page.set_default_timeout(15_000)
                await log_in(page, base)
                await expect(page.locator("h1")).to_contain_text("Live calls")
                await publish(stack, call[:finals[0] + 1])  # started and the first final: no suggestion
                await page.goto(f"{base}/calls/{call_id}")
                await expect(page.locator("#call-status")).to_have_text("live")
                await expect(page.locator("#timeline li.turn.final")).to_have_count(1)
                await expect(page.locator("#suggestions-empty")).to_be_visible()
                cards = page.locator("#suggestions li.suggestion")
                await expect(cards).to_have_count(0)

                await publish(stack, call[finals[0] + 1:finals[1] + 1])
                await expect(cards).to_have_count(1)
                await expect(cards.first).to_contain_text("Refunds:")
                await expect(cards.first.locator(".said")).to_contain_text("money back")
                await expect(cards.first.locator("a")).to_have_attribute("href", "https://kb.example.com/billing/refunds")
                await expect(page.locator("#suggestions-empty")).to_be_hidden()

                await publish(stack, call[finals[1] + 1:finals[2] + 1])
                await expect(cards).to_have_count(2)
                await expect(cards.first).to_have_attribute("data-suggestion", "password")  # newest on top
                await expect(page.locator("#timeline li.turn.final")).to_have_count(3)
                box = await page.locator("#assist").bounding_box()
                timeline = await page.locator("#timeline").bounding_box()
                assert box and timeline and box["x"] >= timeline["x"] + timeline["width"] - 1, (box, timeline)
                await shot(page, "assist-live-1280")

                await publish(stack, call[finals[2] + 1:])  # call.ended
                await expect(page.locator("#call-status")).to_have_text("ended")
                assert assist.published == 2
            finally:
                await browser.close()
    finally:
        consumer.stop()
        await asyncio.wait_for(running, 10)
        await client.aclose()
