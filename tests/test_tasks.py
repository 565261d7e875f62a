"""Stopping tasks whose cancellation gets lost, as redis-py can lose one
that arrives while it reads a reply."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import Running
from tests.helpers import wait_until
from tokenflow_grpc.activity import ActivityHub, Subscription
from tokenflow_grpc.tasks import stop_task


async def swallowing(cancels_to_swallow: int, released: asyncio.Event | None = None) -> None:
    """Wait for released, ignoring the first cancels_to_swallow cancellations."""
    swallowed = 0
    while True:
        try:
            await (released or asyncio.Event()).wait()
            return
        except asyncio.CancelledError:
            swallowed += 1
            if swallowed > cancels_to_swallow:
                raise


async def test_stop_task_repeats_the_cancel() -> None:
    task = asyncio.ensure_future(swallowing(3))
    await asyncio.sleep(0)

    assert await stop_task(task, timeout=2.0)
    assert task.cancelled()


async def test_stop_task_gives_up_after_timeout() -> None:
    released = asyncio.Event()
    task = asyncio.ensure_future(swallowing(10**9, released))
    await asyncio.sleep(0)
    started = time.monotonic()

    stopped = await stop_task(task, timeout=0.3)
    seconds = time.monotonic() - started
    released.set()
    await task

    assert not stopped
    assert 0.3 <= seconds < 1.0


class LosingHub(ActivityHub):
    """A hub whose blocking reads ignore every cancellation, the worst case."""

    async def _read_after(self, last_id: str) -> Any:
        read = asyncio.ensure_future(super()._read_after(last_id))
        while True:
            try:
                return await asyncio.shield(read)
            except asyncio.CancelledError:
                continue


async def reading_hub(running: Running) -> tuple[LosingHub, Subscription, asyncio.Task[None]]:
    """Return a LosingHub with one subscriber, its reader inside a blocking read."""
    core = running.core
    hub = LosingHub(core.redis, core.keys.activity, 16, block_ms=200)
    subscription = await hub.subscribe()
    assert hub._reader is not None
    await asyncio.sleep(0.05)
    return hub, subscription, hub._reader.task


async def test_hub_close_ends_a_reader_that_ignores_cancel(running_valkey: Running) -> None:
    hub, subscription, reader = await reading_hub(running_valkey)
    started = time.monotonic()

    await asyncio.wait_for(hub.close(), 10.0)
    seconds = time.monotonic() - started

    assert reader.done()
    assert seconds < 1.0
    assert subscription.queue.get_nowait() is None


async def test_unsubscribe_stops_a_reader_that_ignores_cancel(running_valkey: Running) -> None:
    hub, subscription, reader = await reading_hub(running_valkey)

    hub.unsubscribe(subscription)

    assert await wait_until(reader.done, timeout=2.0)
