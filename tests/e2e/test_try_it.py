"""The dashboard's "Try it" page in a real browser, against a real `earshot run`.

Debian's headless Chromium (Playwright) signs in, opens Try it and presses Start:
its fake microphone plays a speech fixture (``--use-file-for-fake-audio-capture``,
a 16-bit PCM WAV made with sox; Chromium loops it), the page sends it over WebRTC
(``POST /v1/whip`` with the login cookie) and shows the live transcript from the
session's call stream. Stop ends the session (``DELETE``); the session is then in
the history with source WebRTC, persisted by the gateway's own persister.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import add_user, running_gateway
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, NARROW, PASSWORD, WIDE, async_api, log_in, shot
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e]

pytest.importorskip("aiortc")

FIXTURE = "prompt_queue-youarenext.wav"  # "Your call is now first in line and will be answered by ..."
WAIT_MS = 45_000
WER_BOUND = 0.35  # one sentence through the browser's audio processing, Opus and tiny.en


@pytest.fixture
def gateway(tmp_path):
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    with running_gateway({"EARSHOT_DATABASE_URL": url}) as gw:
        # the gateway has upgraded the schema by the time it says it is ready
        add_user(url, "supervisor1", PASSWORD, role="supervisor")
        yield gw


def fake_microphone(directory) -> str:
    """The fixture as Chromium's fake capture device wants it: 16-bit PCM, with a pause after the
    sentence (the file loops) long enough to end the turn."""
    out = directory / "microphone.wav"
    subprocess.run(["sox", str(get_entry(FIXTURE).path), "-b", "16", "-e", "signed-integer", "-r", "48000",
                    str(out), "pad", "0.5", "2.0"], check=True, capture_output=True)
    return str(out)


async def test_try_it_transcribes_the_microphone_and_keeps_the_session(gateway, tmp_path):
    expect = async_api.expect
    base = f"http://127.0.0.1:{gateway.http_port}"
    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_microphone(tmp_path)}"]
    reference = get_entry(FIXTURE).text
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page(viewport=WIDE)
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            # every request the page makes succeeds (the browser's own favicon.ico probe aside)
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)

            await log_in(page, base)
            await expect(page.locator("h1")).to_contain_text("Live calls")
            await page.click("nav a[href='/try']")
            await expect(page).to_have_url(base + "/try")
            await expect(page.locator("h1")).to_have_text("Try it")
            await expect(page.locator("#try-stop")).to_be_hidden()

            await page.click("#try-start")
            await expect(page.locator("#try-status")).to_have_text("live: speak now")
            await expect(page.locator("#try")).to_have_attribute("data-session-id", re.compile(r"^[0-9a-f-]{36}$"))
            session_id = await page.locator("#try").get_attribute("data-session-id")
            await expect(page.locator("#try-stop")).to_be_visible()
            await expect(page.locator("#try-start")).to_be_hidden()
            await expect(page.locator("#try-done")).to_be_hidden()

            # the sentence shows up as a final turn while the microphone is still on
            final = page.locator("#try-transcript li.turn.final .text").first
            await expect(final).not_to_be_empty()
            heard = await final.text_content() or ""
            wer = word_error_rate(reference, heard)
            assert wer <= WER_BOUND, (wer, heard, reference)
            await shot(page, "try-it-live-1280")

            await page.click("#try-stop")
            await expect(page.locator("#try-status")).to_have_text("ended")
            await expect(page.locator("#try-done")).to_be_visible()
            await expect(page.locator("#try-start")).to_be_visible()
            await expect(page.locator("#try-stop")).to_be_hidden()
            await shot(page, "try-it-ended-1280")
            await page.set_viewport_size(NARROW)
            await shot(page, "try-it-ended-375")  # and nothing overflows a phone's width
            await page.set_viewport_size(WIDE)

            # the session is in the history, as WebRTC, and its page has what was said
            await page.goto(base + "/calls?source=webrtc")
            row = page.locator(f"#history tr[data-call-id='{session_id}']")
            await expect(row).to_have_count(1)
            await expect(row.locator("td[data-label=Source]")).to_have_text("WebRTC")
            await row.locator("a").first.click()
            await expect(page).to_have_url(f"{base}/calls/{session_id}")
            await expect(page.locator("#call-status")).to_have_text("ended")
            stored = page.locator("#timeline li.turn.final .text").first
            await expect(stored).to_have_text(heard.strip())
            await shot(page, "try-it-history-call-1280")
            assert not problems, problems
        finally:
            await browser.close()
