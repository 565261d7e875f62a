"""The web dashboard in a real headless Chromium, against a live server and gateway.

The browser is Debian's chromium, driven by Playwright with executable_path;
Playwright's own browser download is never used. Screenshots of each page
state go to test-artifacts/ (or $TOKENFLOW_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from tests.conftest import ManualClock, Running, RunningGateway
from tests.helpers import start_valkey
from tokenflow_grpc.gateway.web import STATIC_DIR

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TOKENFLOW_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Page loads, polls (every 2 s) and stream reconnects (about 3 s) all fit in this.
WAIT_MS = 15_000
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
TILES = {
    "stat-requests-per-minute": lambda s: f"{s.rate_limit.requests_per_minute:,}",
    "stat-blocked-requests": lambda s: f"{s.rate_limit.blocked_requests:,}",
    "stat-cache-hits": lambda s: f"{s.cache.hits:,}",
    "stat-cache-misses": lambda s: f"{s.cache.misses:,}",
    "stat-hit-ratio": lambda s: f"{s.cache.hit_ratio:.1f} %",
    "stat-cached-keys": lambda s: f"{s.cache.cached_keys:,}",
    "stat-total-keys": lambda s: f"{s.total_keys:,}",
}


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "no Chromium on PATH: install Debian's chromium package "
            "(make test does so when it can run apt-get as root)"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


async def open_page(
    browser: Browser, gateway: RunningGateway, **viewport: int
) -> tuple[Page, Console]:
    page = await browser.new_page(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
    console = Console(page)
    await page.goto(gateway.url + "/")
    return page, console


async def wait_for_polls(page: Page, count: int) -> None:
    """Wait until the page has finished count polls of /v1/stats since it loaded."""
    await page.wait_for_function(
        "(count) => Number(document.getElementById('updated-at').dataset.updates || 0) >= count",
        arg=count,
        timeout=WAIT_MS,
    )


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"web-{name}.png"


async def screenshot(page: Page, name: str) -> Path:
    path = artifact(name)
    await page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
async def frozen(start_server: Any, valkey_url: str) -> Running:
    """A server whose clock is fixed, so requests per minute cannot drift."""
    result: Running = await start_server(valkey_url, clock=ManualClock())
    return result


async def test_figures_match_get_stats(
    browser: Browser, frozen: Running, start_gateway_for: Any
) -> None:
    for prompt in ("alpha", "beta", "gamma", "alpha"):
        await frozen.client.generate(prompt)
    gateway = await start_gateway_for(frozen.address)

    page, console = await open_page(browser, gateway)
    await wait_for_polls(page, 1)
    stats = await frozen.client.stats()

    await expect(page.locator("#connection")).to_have_text("Connected")
    await expect(page.locator("#banner")).to_be_hidden()
    for element_id, expected in TILES.items():
        await expect(page.locator(f"#{element_id}")).to_have_text(expected(stats))
    assert stats.cache.hits == 1
    assert stats.cache.misses == 3
    consumers = [f"{c.client}: {c.requests:,}" for c in stats.rate_limit.top_consumers]
    await expect(page.locator("#consumers-list li")).to_have_text(consumers)
    kinds = sorted(stats.key_distribution.items())
    await expect(page.locator("#keys-list li")).to_have_text([f"{k}: {n:,}" for k, n in kinds])
    charted = await page.evaluate(
        """() => ({
            trend: Chart.getChart('chart-trend').data.datasets[0].data.length,
            keys: Chart.getChart('chart-keys').data.datasets[0].data,
            consumers: Chart.getChart('chart-consumers').data.datasets[0].data,
        })"""
    )
    assert charted["trend"] >= 1
    assert charted["keys"] == [n for _, n in kinds]
    assert charted["consumers"] == [c.requests for c in stats.rate_limit.top_consumers]
    await screenshot(page, "figures")
    assert console.errors == []


async def test_feed_shows_a_generate_made_during_the_test(
    browser: Browser, running_valkey: Running, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(running_valkey.address)
    page, console = await open_page(browser, gateway)
    await expect(page.locator("#feed-state")).to_have_text("live", timeout=WAIT_MS)

    prompt = f"feed probe {uuid.uuid4().hex[:8]}"
    await running_valkey.client.generate(prompt)

    entry = page.locator("#feed li", has_text=prompt)
    await expect(entry).to_have_count(1, timeout=WAIT_MS)
    await expect(entry.locator(".type")).to_have_text("cache miss")
    assert console.errors == []


@pytest.mark.parametrize("shown_before", [["before the restart"], []], ids=["resume", "empty"])
async def test_feed_resumes_after_a_gateway_restart(
    browser: Browser, running_valkey: Running, start_gateway_for: Any, shown_before: list[str]
) -> None:
    """Events made while the gateway is away appear once it is back, also when
    the feed had shown nothing yet (it then resumes from when the page started)."""
    gateway = await start_gateway_for(running_valkey.address)
    page, console = await open_page(browser, gateway)
    await expect(page.locator("#feed-state")).to_have_text("live", timeout=WAIT_MS)
    for prompt in shown_before:
        await running_valkey.client.generate(prompt)
        await expect(page.locator("#feed li", has_text=prompt)).to_have_count(1, timeout=WAIT_MS)

    await gateway.server.stop()
    await expect(page.locator("#feed-state")).not_to_have_text("live", timeout=WAIT_MS)
    missed = [f"while away {n}" for n in range(3)]
    for prompt in missed:
        await running_valkey.client.generate(prompt)
    await start_gateway_for(running_valkey.address, f"127.0.0.1:{gateway.server.port}")

    for prompt in [*missed, *shown_before]:
        await expect(page.locator("#feed li", has_text=prompt)).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#feed-state")).to_have_text("live", timeout=WAIT_MS)
    await expect(page.locator("#connection")).to_have_text("Connected", timeout=WAIT_MS)
    ids = await page.locator("#feed li").evaluate_all("items => items.map(i => i.dataset.eventId)")
    assert len(ids) == len(set(ids)) == len(missed) + len(shown_before)
    # The browser reports the requests that failed while the gateway was away.
    assert all("net::ERR_" in error for error in console.errors), console.errors


async def test_load_test_button_shows_a_summary(
    browser: Browser, running_valkey: Running, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(running_valkey.address)
    page, console = await open_page(browser, gateway)

    await page.get_by_label("Requests to send").fill("30")
    await page.get_by_role("button", name="Run load test").click()

    await expect(page.locator("#sim-summary")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#sim-total")).to_have_text("30")
    parts = [
        int(await page.locator(f"#sim-{name}").inner_text())
        for name in ("successful", "blocked", "failed")
    ]
    assert sum(parts) == 30
    await wait_for_polls(page, 2)
    await screenshot(page, "load-test")
    assert console.errors == []


async def test_load_test_shows_the_servers_error(
    browser: Browser, start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    running = await start_server(valkey_url, simulate_max_count=20)
    gateway = await start_gateway_for(running.address)
    page, _ = await open_page(browser, gateway)

    await page.get_by_label("Requests to send").fill("21")
    await page.get_by_role("button", name="Run load test").click()

    await expect(page.locator("#sim-error")).to_contain_text("400", timeout=WAIT_MS)
    await expect(page.locator("#sim-error")).to_contain_text("21")
    await expect(page.locator("#sim-summary")).to_be_hidden()


async def test_try_it_second_try_cached(
    browser: Browser, running_valkey: Running, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(running_valkey.address)
    page, console = await open_page(browser, gateway)
    prompt = f"try it {uuid.uuid4().hex[:8]}"

    await page.get_by_label("Prompt").fill(prompt)
    await page.get_by_role("button", name="Send to /v1/generate").click()
    await expect(page.locator("#try-cached")).to_have_text("generated", timeout=WAIT_MS)
    first_answer = await page.locator("#try-answer").inner_text()
    await expect(page.locator("[data-header='x-ratelimit-remaining']")).to_have_text("9")

    await page.get_by_role("button", name="Send to /v1/generate").click()
    await expect(page.locator("#try-cached")).to_have_text("cached", timeout=WAIT_MS)
    await expect(page.locator("#try-answer")).to_have_text(first_answer)
    await expect(page.locator("[data-header='x-ratelimit-remaining']")).to_have_text("8")
    await expect(page.locator("[data-header='x-ratelimit-limit']")).to_have_text("10")
    assert prompt in first_answer
    await screenshot(page, "try-it")
    assert console.errors == []


async def test_try_it_shows_the_rate_limit(
    browser: Browser, start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    running = await start_server(valkey_url, rate_limit=1)
    gateway = await start_gateway_for(running.address)
    page, _ = await open_page(browser, gateway)

    send = page.get_by_role("button", name="Send to /v1/generate")
    await send.click()
    await expect(page.locator("#try-cached")).to_have_text("generated", timeout=WAIT_MS)
    await send.click()

    await expect(page.locator("#try-cached")).to_have_text("rate limited", timeout=WAIT_MS)
    await expect(page.locator("#try-error")).to_contain_text("429")
    await expect(page.locator("[data-header='retry-after']")).to_have_text(
        re.compile(r"^[1-9]\d*$")
    )


async def test_banner_when_valkey_is_down(
    browser: Browser, start_server: Any, start_gateway_for: Any
) -> None:
    own = start_valkey()
    try:
        running = await start_server(f"redis://127.0.0.1:{own.port}/0", on_valkey_error="allow")
        await running.client.generate("seen before the outage")
        gateway = await start_gateway_for(running.address)
        page, _ = await open_page(browser, gateway)
        await expect(page.locator("#stat-cache-misses")).to_have_text("1", timeout=WAIT_MS)

        own.stop()

        await expect(page.locator("#banner")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#banner")).to_contain_text("Valkey")
        await expect(page.locator("#connection")).to_have_text("Valkey down")
        for element_id in TILES:
            await expect(page.locator(f"#{element_id}")).to_have_text("—")
        await expect(page.locator("#keys-list li")).to_have_count(0)
        await expect(page.locator("#consumers-list li")).to_have_count(0)
        charted = await page.evaluate("Chart.getChart('chart-consumers').data.datasets[0].data")
        assert charted == []

        await page.get_by_role("button", name="Send to /v1/generate").click()
        await expect(page.locator("#try-cached")).to_have_text("generated", timeout=WAIT_MS)
        await expect(page.locator("#try-headers")).to_contain_text("limit was not applied")
        await screenshot(page, "valkey-down")
    finally:
        if own.is_running():
            own.stop()


async def test_banner_when_the_server_is_down(
    browser: Browser, running_valkey: Running, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(running_valkey.address)
    page, _ = await open_page(browser, gateway)
    await expect(page.locator("#connection")).to_have_text("Connected", timeout=WAIT_MS)

    await running_valkey.server.stop(grace=0.5)

    await expect(page.locator("#connection")).to_have_text("Server unreachable", timeout=WAIT_MS)
    await expect(page.locator("#banner")).to_contain_text("503")
    for element_id in TILES:
        await expect(page.locator(f"#{element_id}")).to_have_text("—")


async def test_fits_a_phone_and_labels_every_control(
    browser: Browser, running_valkey: Running, start_gateway_for: Any
) -> None:
    await running_valkey.client.simulate(40)
    gateway = await start_gateway_for(running_valkey.address)
    page, console = await open_page(browser, gateway, **PHONE)
    await wait_for_polls(page, 1)

    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, button, canvas')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.textContent.trim())
            .map(e => e.id)"""
    )
    assert unlabelled == []
    assert await page.evaluate("document.documentElement.lang") == "en"
    await screenshot(page, "phone")
    assert console.errors == []


async def test_page_headers_and_files(gateway: RunningGateway) -> None:
    async with gateway.session.get(gateway.url + "/") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert "<title>TokenFlow dashboard</title>" in await reply.text()
    async with gateway.session.get(gateway.url + "/static/app.js") as reply:
        assert reply.status == 200
        assert "javascript" in reply.headers["Content-Type"]
    for path in ("/static/../web.py", "/static/", "/static/missing.js", "/static/..%5cweb.py"):
        async with gateway.session.get(gateway.url + path) as reply:
            assert reply.status == 404, path
            assert (await reply.json())["code"] == grpc.StatusCode.NOT_FOUND.value[0], path
    for method, path in (("POST", "/"), ("PUT", "/static/app.js"), ("DELETE", "/")):
        async with gateway.session.request(method, gateway.url + path) as reply:
            assert reply.status == 405, (method, path)
            assert reply.headers["Allow"] == "GET, HEAD"
            assert (await reply.json())["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    async with gateway.session.head(gateway.url + "/") as reply:
        assert reply.status == 200
    # API responses keep their own headers.
    async with gateway.session.get(gateway.url + "/v1/stats") as reply:
        assert reply.status == 200
        assert "Content-Security-Policy" not in reply.headers


async def test_page_can_be_turned_off(running_valkey: Running, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(running_valkey.address, web_dashboard=False)

    async with gateway.session.get(gateway.url + "/") as reply:
        assert reply.status == 404
        body = await reply.json()
    assert body["code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_vendored_chart_js_matches_the_npm_package() -> None:
    """The vendored Chart.js is the one package-lock.json pins; refresh with `make vendor-web`."""
    installed = ROOT / "node_modules" / "chart.js"
    if not installed.exists():
        pytest.skip("node_modules/chart.js is missing; run `make test`, which installs it")
    vendored = STATIC_DIR / "vendor"
    pairs = {
        "chart.umd.min.js": installed / "dist" / "chart.umd.min.js",
        "chart.js.LICENSE.md": installed / "LICENSE.md",
        "kurkle-color.LICENSE.md": ROOT / "node_modules" / "@kurkle" / "color" / "LICENSE.md",
    }
    for name, source in pairs.items():
        assert (vendored / name).read_bytes() == source.read_bytes(), name
