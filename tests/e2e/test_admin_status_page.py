"""Issue 12, item 6: the live status page in a real headless Chromium (Debian's chromium) driven by
Playwright: it loads with no console errors, shows the right counts, and a suspend done on the
page takes effect."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from playwright.async_api import async_playwright, expect

from tests.e2e.conftest import body, drained, send
from tests.e2e.test_admin_api import ADMIN, admin_url, call, wait_state

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
async def browser():
    # The page test needs Debian's chromium (apt-get install chromium); the brief forbids
    # `playwright install`, so a missing binary is a setup error, not a skip.
    assert os.path.exists(CHROMIUM) or shutil.which("chromium"), "install Debian's chromium package"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


async def test_status_page_counts_and_a_suspend_done_on_the_page(sinks, relay, browser):
    """"the page loads with no console errors; it shows the right counts after test mail is
    queued; a suspend done on the page takes effect.\""""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "queued.test"})
    for i in range(3):
        await send(h, [f"u{i}@queued.test"], body(f"q{i}"))
    await wait_state(h, {"ready": 3})

    page = await browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    outside: list[str] = []
    base = admin_url(h)
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(base) else None)
    await page.goto(base + "/status")
    await page.wait_for_selector("body[data-loaded='1']", timeout=15000)
    assert await page.text_content("#total") == "3"
    assert await page.text_content("#ready") == "3"
    row = page.locator("#domains tbody tr[data-domain='queued.test'] td")
    assert (await row.nth(0).text_content(), await row.nth(1).text_content()) == ("queued.test", "3")
    assert await page.locator("#suspended tbody tr[data-dest='queued.test']").count() == 1
    assert await page.locator("#chart-queue svg polyline").count() == 1

    # Suspend on the page: it takes effect in the relay, and mail for it stays queued.
    await page.fill("#suspend-domain", "paged.test")
    await page.click("#suspend-button")
    await page.wait_for_selector("#suspended tbody tr[data-dest='paged.test']", timeout=10000)
    _, s = await call(h, "GET", "/api/v1/suspensions")
    assert {x["domain"] for x in s["suspensions"]} == {"queued.test", "paged.test"}
    await send(h, ["x@paged.test"], body("paged"))
    await expect(page.locator("#total")).to_have_text("4", timeout=10000)
    await asyncio.sleep(0.3)
    assert sink.messages == []

    # Resume both from the page: everything goes out and the page shows an empty queue.
    for dest in ("paged.test", "queued.test"):
        await page.click(f"#suspended tbody tr[data-dest='{dest}'] button.resume")
        await page.wait_for_selector(f"#suspended tbody tr[data-dest='{dest}']", state="detached", timeout=10000)
    await sink.wait_for(4)
    await drained(h)
    await expect(page.locator("#total")).to_have_text("0", timeout=10000)
    assert problems == []
    assert outside == [], "the page loads nothing from elsewhere (no CDN)"
    await page.close()
