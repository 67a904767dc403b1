"""End to end through the real call path, watched in a real browser.

`earshot run` runs as its own process with a private SQLite store: it answers a
real PJSIP call that plays a multi-turn recording, transcribes it with Whisper,
publishes to Redis, serves the dashboard and persists the call. A supervisor
created with `earshot users add` logs in with Debian's headless Chromium
(Playwright), sees the call on the live board while it is up, opens it and
watches its transcript grow, then finds it in the history search by a word that
was said and opens its detail page. Screenshots go to artifacts/screenshots/
(real-call-*.png).

What the dashboard shows is checked against what the gateway published on its
event stream (the same finals, in order) and against the recording's reference
text (the words really said reach the page).
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import add_user, by_call, pcm_wav, place_calls, read_events, running_gateway
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, PASSWORD, WIDE, async_api, log_in, shot
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e]

FIXTURE = "caller_03_greetings.wav"  # four turns over 19 s, each pause >= 1 s
HOLD_S = 2.0
# Words of the reference that tiny.en gets right on this recording; the search uses
# the first one the call's transcript really contains.
DISTINCTIVE = ("unavailable", "temporary", "greeting", "removed")
# the same path as tests/e2e/test_calls.py (tiny.en on 8 kHz G.711 turns): room for
# run-to-run differences in turn boundaries under load
WER_BOUND = 0.3
WAIT_MS = 30_000  # one step's wait: generous, yet the test stays well within two minutes


@pytest.fixture
def gateway(tmp_path):
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    # recorded (docs/recordings.md): the detail page plays it, and a click on a turn seeks there
    with running_gateway({"EARSHOT_DATABASE_URL": url, "EARSHOT_RECORDINGS_DIR": str(tmp_path / "recordings"),
                          "EARSHOT_RECORD": "true"}) as gw:
        # the gateway has upgraded the schema by the time it says it is ready
        add_user(url, "supervisor1", PASSWORD, role="supervisor")
        yield gw


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


async def test_real_call_watched_live_then_found_in_history(gateway, tmp_path):
    expect = async_api.expect
    entry = get_entry(FIXTURE)
    wav = pcm_wav(entry.file, tmp_path)
    base = f"http://127.0.0.1:{gateway.http_port}"
    calling: asyncio.Task[list[dict]] | None = None
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport=WIDE)
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)

            # a wrong password is refused
            await log_in(page, base, password="not the password at all")
            await expect(page.locator(".error")).to_have_text("Wrong username or password.")
            assert "/login" in page.url
            await shot(page, "real-call-login-refused-1280")

            await log_in(page, base)
            await expect(page.locator("h1")).to_contain_text("Live calls")
            await expect(page.locator("#feed-status")).to_have_text("live")
            await expect(page.locator("#board-empty")).to_be_visible()
            await shot(page, "real-call-board-empty-1280")

            # a real SIP call plays the recording; place_calls returns once it has hung up
            calling = asyncio.create_task(asyncio.to_thread(
                place_calls, f"127.0.0.1:{gateway.sip_port}", [wav], 1, hold=HOLD_S, timeout=90))

            # it appears on the live board while it is up (the stream prefix is this test's own)
            rows = page.locator("#board-rows tr")
            await expect(rows).to_have_count(1)
            call_id = await rows.first.get_attribute("data-call-id")
            assert call_id
            row = page.locator(f"#board-rows tr[data-call-id='{call_id}']")
            await expect(row.locator("td[data-label=From]")).to_have_text("tester@127.0.0.1")
            await expect(page.locator("#live-count")).to_have_text("1")
            await expect(page.locator("#board-empty")).to_be_hidden()
            await expect(row.locator(".latest")).not_to_be_empty()  # what is being said, as it is said
            assert not calling.done()
            await shot(page, "real-call-board-live-1280")

            # its live view: finals arrive while the call is still up, and the transcript grows
            await row.locator(".ticker").click()
            await expect(page).to_have_url(f"{base}/calls/{call_id}")
            await expect(page.locator("#call-status")).to_have_text("live")
            finals = page.locator("#timeline li.turn.final")
            await expect(finals.first).to_be_visible()
            up = [e for e in read_events(gateway.events_stream) if e["call_id"] == call_id]
            assert "call.ended" not in [e["type"] for e in up], "the first final came only after the call ended"
            assert not calling.done()
            await expect(page.locator("#call-status")).to_have_text("live")
            first_count = await finals.count()
            await shot(page, "real-call-live-first-turn-1280")
            await expect(page.locator("#timeline")).to_contain_text(re.compile("temporary", re.I))
            await expect(finals).not_to_have_count(first_count)  # the next turn came in live
            await shot(page, "real-call-live-growing-1280")

            # the caller hangs up: the view says so without a reload
            await expect(page.locator("#call-status")).to_have_text("ended", timeout=60_000)
            results = await asyncio.wait_for(calling, 60)
            assert results[0]["confirmed"], results
            events = by_call(read_events(gateway.events_stream))[results[0]["call_id"]]
            assert events[0]["call_id"] == call_id
            assert events[-1]["type"] == "call.ended", [e["type"] for e in events]
            published = [e["text"] for e in events if e["type"] == "turn.final"]
            # what the page shows is what was published, each turn once, in order
            await expect(finals).to_have_count(len(published))
            await expect(page.locator("#timeline li.turn")).to_have_count(len(published))
            shown = [t.strip() for t in await finals.locator(".text").all_text_contents()]
            assert shown == [t.strip() for t in published]
            said = " ".join(shown)
            assert word_error_rate(entry.text, said) <= WER_BOUND, said
            await shot(page, "real-call-live-ended-1280")

            # the board lets it go
            await page.goto(base + "/")
            await expect(page.locator("#board-empty")).to_be_visible()
            await expect(page.locator("#live-count")).to_have_text("0")

            # afterwards: found in the history by a word that was said, from the SQL store
            word = next((w for w in DISTINCTIVE if w in words(said)), None)
            assert word, f"none of {DISTINCTIVE} in {said!r}"
            await page.goto(base + "/calls")
            await page.fill("input[name=q]", word)
            await page.click(".filters button[type=submit]")
            hit = page.locator(f"#history tr[data-call-id='{call_id}']")
            deadline = time.monotonic() + 30
            while True:  # the persister may still be writing the call's last events
                ended = await hit.count() == 1 and (await hit.locator("td[data-label=Duration]").inner_text()).strip()
                if ended or time.monotonic() > deadline:
                    break
                await page.wait_for_timeout(500)
                await page.reload()
            await expect(hit).to_be_visible(timeout=1)
            await expect(hit.locator("td[data-label=Duration]")).not_to_be_empty(timeout=1)
            await expect(page.locator("#history tbody tr")).to_have_count(1)
            await expect(hit.locator("td[data-label=Turns]")).to_have_text(str(len(published)))
            await expect(hit.locator("mark").first).to_have_text(re.compile(f"^{word}$", re.I))
            await shot(page, "real-call-history-search-1280")

            # its detail page, from SQL: every turn, in order, not followed live
            await hit.locator("a").click()
            await expect(page).to_have_url(f"{base}/calls/{call_id}")
            await expect(page.locator("#call-status")).to_have_text("ended")
            await expect(page.locator("li.turn")).to_have_count(len(published))
            await expect(page.locator("li.turn .text")).to_have_text(published)
            await expect(page.locator("li.turn .no")).to_have_text([f"#{i}" for i in range(1, len(published) + 1)])
            await expect(page.locator(".call-head")).to_contain_text("ended: bye")
            assert await page.locator("#timeline").get_attribute("data-stream") is None
            await shot(page, "real-call-detail-1280")

            # the recording beside it: the browser loads it (Range requests), a click on a turn seeks to it
            ended = events[-1]
            assert ended.get("recording"), ended
            player = page.locator("audio#recording")
            await expect(player).to_have_attribute("src", f"/calls/{call_id}/recording")
            await page.wait_for_function("document.getElementById('recording').readyState >= 1")
            duration = await page.evaluate("document.getElementById('recording').duration")
            assert abs(duration * 1000 - ended["recording_duration_ms"]) < 50, (duration, ended)
            turn = page.locator("li.turn").nth(len(published) - 1)
            start_ms = int(await turn.get_attribute("data-start"))
            await turn.locator(".text").click()
            await page.wait_for_function(
                f"Math.abs(document.getElementById('recording').currentTime - {start_ms / 1000}) < 0.3")
        finally:
            expect.set_options(timeout=5_000)  # Playwright's default, for the tests that run next
            await browser.close()
            if calling is not None and not calling.done():  # failed mid-call: let the caller hang up
                await asyncio.wait([calling], timeout=60)
