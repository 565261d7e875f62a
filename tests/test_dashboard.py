"""The terminal dashboard against a real server over real gRPC. Drawn at
120 x 40 by textual's pilot, it shows the figures GetStats returns, sends a
Simulate burst on `s`, and shows a disconnected state that clears when a
server is back. With stdout on a pipe it prints one plain snapshot."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from textual.geometry import Region

from tests.conftest import Running
from tests.helpers import free_port, wait_until
from tokenflow_grpc.dashboard.app import DashboardApp
from tokenflow_grpc.dashboard.model import TILES, DashboardOptions
from tokenflow_grpc.v1 import tokenflow_pb2 as pb

SIZE = (120, 40)
# Seconds between the dashboard's GetStats calls, short so the tests wait little.
INTERVAL = 0.2
CALL_TIMEOUT = 5.0
POLL_SECONDS = 10.0
# The dashboard reconnects on its next poll after the new server listens.
RECOVERY_SECONDS = 15.0
SUBPROCESS_SECONDS = 30.0
TOKENFLOW = Path(sys.executable).with_name("tokenflow")
# "Simulate: 30 sent, 20 answered (5 from the cache), 10 blocked, 0 failed"
SIMULATE_LINE = re.compile(
    r"Simulate: (\d+) sent, (\d+) answered \((\d+) from the cache\), (\d+) blocked, (\d+) failed"
)


def dashboard(target: str, **options: Any) -> DashboardApp:
    return DashboardApp(DashboardOptions(target, CALL_TIMEOUT, INTERVAL, **options))


def shown_lines(app: DashboardApp, widget_id: str) -> list[str]:
    """Return the rows a widget draws, border included, after checking that it is on screen."""
    widget = app.query_one(f"#{widget_id}")
    assert app.screen.region.contains_region(widget.region), f"#{widget_id} is off screen"
    width, height = widget.outer_size
    return [strip.text for strip in widget.render_lines(Region(0, 0, width, height))]


def shown_inside(app: DashboardApp, widget_id: str) -> list[str]:
    """Return the rows inside a widget's rounded border, stripped of spaces."""
    return [line.strip("│").strip() for line in shown_lines(app, widget_id)[1:-1]]


def shown_tiles(app: DashboardApp) -> dict[str, str]:
    """Return each tile's value as drawn, keyed by widget id, connection included."""
    keys = [tile.key for tile in TILES] + ["connection"]
    return {key: shown_inside(app, key)[0] for key in keys}


def shown_rows(app: DashboardApp, widget_id: str) -> dict[str, int]:
    """Return a "name  count" panel's rows as a mapping."""
    rows = {}
    for line in shown_inside(app, widget_id):
        if line:
            name, count = line.rsplit(maxsplit=1)
            rows[name] = int(count)
    return rows


def snapshot_figures(lines: list[str]) -> dict[str, str]:
    """Return the snapshot's "Label   value" lines as a mapping from label to value."""
    values = {}
    for tile in TILES:
        for line in lines:
            if line.startswith(tile.label):
                values[tile.label] = line.removeprefix(tile.label).strip()
    return values


async def send_load(running: Running) -> pb.GetStatsResponse:
    """Send three distinct prompts, two repeats and a Simulate burst, then return GetStats."""
    for prompt in ["alpha", "beta", "gamma", "alpha", "beta"]:
        await running.client.generate(prompt)
    await running.client.simulate(20)
    return await running.client.stats()


@pytest.mark.parametrize("size", [SIZE, (80, 24)], ids=["120x40", "80x24"])
async def test_dashboard_shows_get_stats_figures(
    running_valkey: Running, size: tuple[int, int]
) -> None:
    stats = await send_load(running_valkey)
    app = dashboard(running_valkey.address)

    async with app.run_test(size=size):
        assert await wait_until(
            lambda: shown_tiles(app)["connection"] == "connected", POLL_SECONDS
        ), shown_tiles(app)
        tiles = shown_tiles(app)
        consumers = shown_rows(app, "top-consumers")
        keys = shown_rows(app, "key-distribution")
        feed = shown_inside(app, "activity")
        trend_title = shown_lines(app, "trend")[0]

    assert stats.connected
    assert stats.cache.hits > 0
    assert stats.cache.misses > 0
    assert int(tiles["requests-per-minute"]) == stats.rate_limit.requests_per_minute
    assert int(tiles["blocked-last-minute"]) == stats.rate_limit.blocked_requests
    assert int(tiles["blocked-total"]) == stats.rate_limit.blocked_total
    assert int(tiles["cache-hits"]) == stats.cache.hits
    assert int(tiles["cache-misses"]) == stats.cache.misses
    assert float(tiles["hit-ratio"].removesuffix(" %")) == pytest.approx(
        stats.cache.hit_ratio, abs=0.05
    )
    assert int(tiles["cached-keys"]) == stats.cache.cached_keys
    assert int(tiles["total-keys"]) == stats.total_keys
    expected_consumers = {c.client: c.requests for c in stats.rate_limit.top_consumers}
    if size == SIZE:
        assert consumers == expected_consumers
    else:
        # A shorter panel shows the first rows of the list.
        assert list(consumers.items()) == list(expected_consumers.items())[: len(consumers)]
        assert len(consumers) >= 3
    assert keys == dict(stats.key_distribution)
    assert f"latest {stats.rate_limit.requests_per_minute}" in trend_title
    shown_client = feed[0].split()[2]
    if size == SIZE:
        assert shown_client == stats.activity[0].client
    else:
        # A narrow feed cuts long client names, with an ellipsis.
        assert stats.activity[0].client.startswith(shown_client.removesuffix("…"))


async def test_dashboard_simulate_key_sends_burst(running_valkey: Running) -> None:
    app = dashboard(running_valkey.address, simulate_count=30)

    async with app.run_test(size=SIZE) as pilot:
        assert await wait_until(lambda: shown_tiles(app)["connection"] == "connected")
        await pilot.press("s")
        assert await wait_until(
            lambda: SIMULATE_LINE.search(shown_lines(app, "simulate")[0]) is not None,
            POLL_SECONDS,
        ), shown_lines(app, "simulate")
        summary = SIMULATE_LINE.search(shown_lines(app, "simulate")[0])
        assert await wait_until(
            lambda: shown_tiles(app)["requests-per-minute"] == "30", POLL_SECONDS
        ), shown_tiles(app)
        feed = shown_inside(app, "activity")

    assert summary is not None
    total, answered, cached, blocked, failed = (int(group) for group in summary.groups())
    assert total == 30
    assert answered + blocked + failed == 30
    assert cached <= answered
    stats = await running_valkey.client.stats()
    assert stats.rate_limit.requests_total == 30
    assert all("sim-client-" in line for line in feed if line)


async def test_dashboard_disconnects_and_recovers(start_server: Any, valkey_url: str) -> None:
    port = free_port()
    first: Running = await start_server(valkey_url, grpc_address=f"127.0.0.1:{port}")
    app = dashboard(first.address)

    async with app.run_test(size=SIZE):
        await first.client.generate("before the outage")
        assert await wait_until(
            lambda: "before the outage" in "\n".join(shown_inside(app, "activity")), POLL_SECONDS
        ), shown_inside(app, "activity")

        # A stop that hangs fails here, not later in a torn-down app.
        await asyncio.wait_for(first.server.stop(grace=0), 15.0)
        assert await wait_until(
            lambda: shown_tiles(app)["connection"] == "disconnected", POLL_SECONDS
        ), shown_tiles(app)
        down_tiles = shown_tiles(app)
        down_status = " ".join(shown_lines(app, "status"))
        down_consumers = shown_inside(app, "top-consumers")

        second: Running = await start_server(valkey_url, grpc_address=f"127.0.0.1:{port}")
        assert await wait_until(
            lambda: shown_tiles(app)["connection"] == "connected", RECOVERY_SECONDS
        ), shown_tiles(app)
        await second.client.generate("after the outage")
        assert await wait_until(
            lambda: "after the outage" in "\n".join(shown_inside(app, "activity")), POLL_SECONDS
        ), shown_inside(app, "activity")
        assert await wait_until(
            lambda: shown_tiles(app)["requests-per-minute"] == "1", POLL_SECONDS
        ), shown_tiles(app)
        up_status = " ".join(shown_lines(app, "status"))

    assert {key: value for key, value in down_tiles.items() if key != "connection"} == {
        tile.key: "-" for tile in TILES
    }
    # A server stopped with grace 0 cancels the GetStats in flight, so the
    # first failure can be CANCELLED as well as UNAVAILABLE.
    assert f"disconnected from 127.0.0.1:{port}: GetStats failed:" in down_status
    assert down_consumers[0] == "-"
    assert up_status.strip() == f"connected to 127.0.0.1:{port}"


async def test_dashboard_pipe_prints_one_snapshot(running_valkey: Running) -> None:
    stats = await send_load(running_valkey)
    assert TOKENFLOW.exists(), f"no tokenflow script beside {sys.executable}: pip install -e ."

    process = await asyncio.create_subprocess_exec(
        str(TOKENFLOW),
        "dashboard",
        "--target",
        running_valkey.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(process.communicate(), SUBPROCESS_SECONDS)
    text = output.decode()
    lines = text.splitlines()
    figures = snapshot_figures(lines)

    assert process.returncode == 0, errors.decode()
    assert "\x1b" not in text
    assert lines[0] == f"TokenFlow dashboard: connected to {running_valkey.address}"
    assert text.count("TokenFlow dashboard:") == 1
    assert figures["Requests / min"] == str(stats.rate_limit.requests_per_minute)
    assert figures["Blocked, last min"] == str(stats.rate_limit.blocked_requests)
    assert figures["Blocked, total"] == str(stats.rate_limit.blocked_total)
    assert figures["Cache hits"] == str(stats.cache.hits)
    assert figures["Cache misses"] == str(stats.cache.misses)
    assert figures["Hit ratio"] == f"{stats.cache.hit_ratio:.1f} %"
    assert figures["Cached keys"] == str(stats.cache.cached_keys)
    assert figures["Total keys"] == str(stats.total_keys)
    for consumer in stats.rate_limit.top_consumers:
        assert re.search(rf"^  {re.escape(consumer.client)} +{consumer.requests}$", text, re.M)


async def test_dashboard_pipe_without_server_exits_1() -> None:
    target = f"127.0.0.1:{free_port()}"

    process = await asyncio.create_subprocess_exec(
        str(TOKENFLOW),
        "dashboard",
        "--target",
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(process.communicate(), SUBPROCESS_SECONDS)
    lines = output.decode().splitlines()

    assert process.returncode == 1
    assert lines[0].startswith(f"TokenFlow dashboard: disconnected from {target}: GetStats failed")
    assert "Requests / min       -" in lines
    assert "Total keys           -" in lines
