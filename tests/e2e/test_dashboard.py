"""End to end in a real browser: Debian's headless Chromium driven by Playwright.

The dashboard runs as in the gateway (uvicorn in the event loop, the LiveHub
reading Redis, the persister filling SQLite from the same stream); a call's
events are published to the real Redis server by the gateway's own Publisher,
at a call's pace. A supervisor created with `earshot users add` logs in, watches
the call appear on the board, opens it and sees its transcript grow (partials
grey and italic, then replaced by the final), finds it afterwards by a word in
the history search, and opens its detail page. Screenshots of every page at
1280x800 and 375x812 go to artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from gateway.config import Settings
from gateway.http import HttpServer, build_app
from gateway.metrics import Metrics
from gateway.persister import Persister
from gateway.publisher import Publisher
from gateway.store import migrate
from gateway.web import Dashboard
from tests.pg_server import prompt_texts, recorded_call

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
REDIS_URL = "redis://127.0.0.1:6379/0"
PASSWORD = "a long supervisor password"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 375, "height": 812}

if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (deploy/setup.sh installs it)", allow_module_level=True)
async_api = pytest.importorskip("playwright.async_api")


@pytest.fixture
async def stack(tmp_path):
    prefix = f"earshot-dash-{uuid.uuid4().hex[:10]}"
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    migrate.upgrade(url)
    earshot = [sys.executable, "-m", "gateway"] if not shutil.which("earshot") else ["earshot"]
    done = subprocess.run([*earshot, "users", "add", "supervisor1", "--role", "supervisor", "--password-stdin",
                           "--database-url", url], input=PASSWORD + "\n", capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    settings = Settings(database_url=url, redis_url=REDIS_URL, stream_prefix=prefix)
    persister = Persister(REDIS_URL, url, stream=settings.events_stream, block_ms=100)
    dashboard = Dashboard(settings, keepalive_s=5.0)
    dashboard.hub.block_ms = 200
    await persister.start()
    await dashboard.start()

    async def health():
        return {"status": "ok"}

    http = HttpServer(build_app(Metrics(lambda: {}), health, web=dashboard.asgi), "127.0.0.1", 0)
    await http.start()
    await asyncio.wait_for(dashboard.hub.ready.wait(), 10)
    publisher = Publisher(REDIS_URL, events_stream=settings.events_stream, call_stream=settings.call_stream)
    await publisher.start()
    yield {"base": f"http://127.0.0.1:{http.port}", "publisher": publisher, "persister": persister}
    await publisher.close()
    await http.close()
    await dashboard.close()
    await persister.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def publish(stack, events) -> None:
    for event in events:
        stack["publisher"].publish(event)
    assert await stack["publisher"].flush(10)


async def no_horizontal_overflow(page) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    viewport = await page.evaluate("window.innerWidth")
    assert width <= viewport, f"{page.url}: content is {width}px wide in a {viewport}px viewport"


async def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    await no_horizontal_overflow(page)


async def log_in(page, base: str, password: str = PASSWORD) -> None:
    await page.goto(base + "/")
    await page.fill("input[name=username]", "supervisor1")
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")


async def test_supervisor_watches_a_call_live_then_finds_it_in_history(stack):
    expect = async_api.expect
    texts = prompt_texts()
    spoken = [texts[0], "I would like to check the balance of my savings account please", texts[2]]
    call = recorded_call(spoken, start=time.time(), partials=2, from_user="5551234", tags=("support", "vip"),
                         digits="42#")
    call_id = call[0].call.call_id
    # events: started, then per turn partial, partial, final; then the digits and the end
    started, turn1, turn2, turn3, tail = call[:1], call[1:4], call[4:7], call[7:10], call[10:]
    base = stack["base"]
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport=WIDE)
            page.set_default_timeout(15_000)

            # a wrong password is refused
            await log_in(page, base, password="not the password at all")
            await expect(page.locator(".error")).to_have_text("Wrong username or password.")
            assert "/login" in page.url
            await shot(page, "login-refused-1280")

            await log_in(page, base)
            await expect(page.locator("h1")).to_contain_text("Live calls")
            await expect(page.locator("#board-empty")).to_be_visible()
            await expect(page.locator("#feed-status")).to_have_text("live")

            # the call appears on the board as soon as it is answered, then shows what is said
            await publish(stack, started + turn1[:1])
            row = page.locator(f"#board-rows tr[data-call-id='{call_id}']")
            await expect(row).to_be_visible()
            await expect(row.locator("td[data-label=From]")).to_have_text("5551234@pbx.example")
            await expect(row.locator(".tag")).to_have_text(["support", "vip"])
            await expect(row.locator(".latest.partial")).to_have_text(turn1[0].data["text"])
            await publish(stack, turn1[1:])
            await expect(row.locator(".latest")).to_have_text(spoken[0])
            await expect(row.locator(".latest")).not_to_have_class("latest partial")
            ticker = row.locator(".ticker")
            first = await ticker.text_content()
            await expect(ticker).not_to_have_text(first or "")  # the duration ticks in the browser
            await expect(page.locator("#live-count")).to_have_text("1")
            await shot(page, "board-1280")

            # open the call mid-way: turn 1 is replayed, turn 2 arrives live, partial then final
            await ticker.click()
            await expect(page).to_have_url(f"{base}/calls/{call_id}")
            await expect(page.locator("#call-status")).to_have_text("live")
            turn_1 = page.locator("li[data-key='caller:1']")
            await expect(turn_1).to_have_class(re.compile(r"^turn final( |$)"))
            await expect(turn_1.locator(".text")).to_have_text(spoken[0])
            await publish(stack, turn2[:1])
            turn_2 = page.locator("li[data-key='caller:2']")
            await expect(turn_2).to_have_class(re.compile(r"^turn partial( |$)"))
            await expect(turn_2.locator(".text")).to_have_text(turn2[0].data["text"])
            style = await turn_2.evaluate("e => getComputedStyle(e).fontStyle + ' ' + getComputedStyle(e).color")
            assert style.startswith("italic"), style
            await shot(page, "call-live-partial-1280")
            await publish(stack, turn2[1:])
            await expect(turn_2).to_have_class(re.compile(r"^turn final( |$)"))
            await expect(turn_2.locator(".text")).to_have_text(spoken[1])
            await expect(page.locator("li[data-key='caller:2']")).to_have_count(1)  # replaced, not added
            await publish(stack, turn3 + tail)
            await expect(page.locator("#call-status")).to_have_text("ended")
            await expect(page.locator("li.turn.final")).to_have_count(3)
            await expect(page.locator("li.dtmf")).to_have_count(3)
            start = turn2[-1].data["start_ms"] // 1000
            await expect(page.locator("li.turn .at").nth(1)).to_have_text(f"{start // 60:02d}:{start % 60:02d}")
            await shot(page, "call-live-ended-1280")

            # the board lets it go
            await page.goto(base + "/")
            await expect(page.locator("#board-empty")).to_be_visible()

            # afterwards: found in history by a word said in turn 2, detail page from SQL
            assert await stack["persister"].wait_idle(20)
            await page.goto(base + "/calls")
            await page.fill("input[name=q]", "savings")
            await page.click(".filters button[type=submit]")
            hit = page.locator(f"#history tr[data-call-id='{call_id}']")
            await expect(hit).to_be_visible()
            await expect(hit.locator("mark")).to_have_text("savings")
            await expect(page.locator("#history tbody tr")).to_have_count(1)
            await shot(page, "history-search-1280")
            await hit.locator("a").click()
            await expect(page.locator("#call-status")).to_have_text("ended")
            await expect(page.locator("li.turn")).to_have_count(3)
            await expect(page.locator("li.turn .text")).to_have_text(spoken)
            await expect(page.locator("li.turn .no")).to_have_text(["#1", "#2", "#3"])
            await expect(page.locator(".digits kbd")).to_have_text(["4", "2", "#"])
            assert "/stream" not in (await page.content())  # ended: not followed live
            await shot(page, "call-detail-1280")

            # the same pages on a phone-sized screen
            phone = await browser.new_page(viewport=NARROW)
            phone.set_default_timeout(15_000)
            await log_in(phone, base)
            await expect(phone.locator("h1")).to_contain_text("Live calls")
            await shot(phone, "board-375")
            await phone.goto(base + "/calls?q=savings")
            await expect(phone.locator(f"#history tr[data-call-id='{call_id}']")).to_be_visible()
            await shot(phone, "history-search-375")
            await phone.goto(f"{base}/calls/{call_id}")
            await expect(phone.locator("li.turn")).to_have_count(3)
            await shot(phone, "call-detail-375")
            await phone.goto(base + "/login?next=/calls")  # logged in: goes on to history
            await expect(phone).to_have_url(base + "/calls")

            # log out
            await page.click(".logout button")
            await expect(page).to_have_url(base + "/login")
            await page.goto(base + "/calls")
            await expect(page).to_have_url(base + "/login?next=%2Fcalls")
            await shot(page, "logged-out-1280")
        finally:
            await browser.close()


async def test_live_call_on_a_narrow_screen(stack):
    """The board and a live call view with long parties and text stay within 375 px."""
    expect = async_api.expect
    call = recorded_call(["supercalifragilisticexpialidocious " * 6 + "and a very long sentence follows it"],
                         start=time.time(), partials=1, ended=False,
                         from_user="a-very-long-caller-name-without-any-spaces-0123456789", tags=("support",))
    call_id = call[0].call.call_id
    base = stack["base"]
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport=NARROW)
            page.set_default_timeout(15_000)
            await log_in(page, base)
            await publish(stack, call)
            row = page.locator(f"#board-rows tr[data-call-id='{call_id}']")
            await expect(row.locator(".latest")).to_contain_text("and a very long sentence follows it")
            await shot(page, "board-live-375")
            await page.goto(f"{base}/calls/{call_id}")
            await expect(page.locator("li.turn.final")).to_have_count(1)
            await shot(page, "call-live-375")
            await page.set_viewport_size(WIDE)
            await shot(page, "call-live-1280")
        finally:
            await browser.close()
