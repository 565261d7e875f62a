"""WatchActivity over real gRPC streams: order, resume, filters, cancellation
and the count of events a slow watcher loses."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import Running
from tests.helpers import ActivityWatch, event_order, wait_until
from tokenflow_grpc.activity import Subscription
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# Longer than the 50-character excerpt, with characters of more than one byte
# in UTF-8, so the excerpt is checked in characters rather than bytes.
LONG_PROMPT = (
    "Résumé des idées: explain how a sliding window rate limiter differs from a "
    "fixed window counter"
)
EXCERPT_CHARS = 50
FORWARDED_CLIENT = "10.0.0.9"
SECOND_FORWARDED_CLIENT = "10.0.0.10"
WATCH_HANDLER_PATH = "/tokenflow.v1.TokenFlowService/WatchActivity"
READER_TASK_NAME = "tokenflow-activity-reader"
# A receive window of one byte and no BDP probing keep the server's sends
# blocked while the test does not read, so the watcher's queue fills.
SLOW_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
CHURN_COUNT = 10_000
CHURN_WARMUP = 500
CHURN_CONCURRENCY = 50
# Growth of the resident set over CHURN_COUNT watches. Three runs grew by less
# than 1 MiB, and a leak of 1 KiB per watch would exceed it.
CHURN_MAX_GROWTH_BYTES = 8 * 2**20


def forwarded_for(client: str) -> list[tuple[str, str]]:
    """Return metadata that makes a loopback caller (a trusted proxy by default) count as client."""
    return [("x-forwarded-for", client)]


def watch_handler_tasks() -> list[asyncio.Task[Any]]:
    """Return the tasks of this event loop that run a WatchActivity handler.

    grpc.aio names each handler task after the method path, and the
    coroutines it awaits are walked to catch any task named otherwise.
    """
    found = []
    for task in asyncio.all_tasks():
        if WATCH_HANDLER_PATH in task.get_name():
            found.append(task)
            continue
        awaited = task.get_coro()
        while awaited is not None:
            code = getattr(awaited, "cr_code", None) or getattr(awaited, "ag_code", None)
            if code is not None and code.co_qualname.endswith("WatchActivity"):
                found.append(task)
                break
            awaited = getattr(awaited, "cr_await", None)
    return found


def reader_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == READER_TASK_NAME]


async def test_watch_order_and_fields(start_server: Any, backend: str) -> None:
    running: Running = await start_server(backend, rate_limit=3)
    watch = await ActivityWatch.open(running.channel())

    await running.client.generate(LONG_PROMPT)
    await running.client.generate(LONG_PROMPT)
    await running.client.generate("skip the cache", skip_cache=True)
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await running.client.generate("over the limit")
    assert rejected.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    events = [response.event for response in await watch.take(4)]
    await watch.close()

    assert [event.type for event in events] == [
        pb.ACTIVITY_TYPE_CACHE_MISS,
        pb.ACTIVITY_TYPE_CACHE_HIT,
        pb.ACTIVITY_TYPE_REQUEST,
        pb.ACTIVITY_TYPE_RATE_LIMITED,
    ]
    assert [event.prompt for event in events] == [
        LONG_PROMPT[:EXCERPT_CHARS],
        LONG_PROMPT[:EXCERPT_CHARS],
        "skip the cache",
        "over the limit",
    ]
    assert len(events[0].prompt) == EXCERPT_CHARS
    assert [event.cached for event in events] == [False, True, False, False]
    assert [event.blocked for event in events] == [False, False, False, True]
    assert {event.client for event in events} == {"127.0.0.1"}
    assert {event.model for event in events} == {running.settings.default_model}
    orders = [event_order(event.id) for event in events]
    assert orders == sorted(set(orders))
    assert all(
        event.time.ToMilliseconds() == order[0] for event, order in zip(events, orders, strict=True)
    )


async def test_watch_resume_since_id(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, rate_limit=100)
    first = await ActivityWatch.open(running.channel())
    for n in range(6):
        await running.client.generate(f"resume {n}")
    recorded = [response.event for response in await first.take(6)]
    resume_after = recorded[2]

    for n in range(6, 9):
        await running.client.generate(f"resume {n}")
    recorded += [response.event for response in await first.take(3)]
    await first.close()

    resumed = await ActivityWatch.open(running.channel(), since_id=resume_after.id)
    await running.client.generate("resume 9")
    received = [response.event for response in await resumed.take(7)]
    await running.client.generate("resume 10")
    following = (await resumed.next()).event
    await resumed.close()

    assert resume_after.prompt == "resume 2"
    assert [event.prompt for event in received] == [f"resume {n}" for n in range(3, 10)]
    assert [event.id for event in received[:6]] == [event.id for event in recorded[3:]]
    assert event_order(received[6].id) > event_order(recorded[-1].id)
    assert following.prompt == "resume 10"


async def test_watch_since_id_far_ahead_is_invalid(running_valkey: Running) -> None:
    await running_valkey.client.generate("the newest event")
    newest = (await running_valkey.client.stats(activity_limit=1)).activity[0].id
    millis, sequence = event_order(newest)
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    ahead = f"{millis + 600_000}-0"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchActivity(pb.WatchActivityRequest(since_id=ahead), timeout=10.0):
            pass

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert f"since_id: '{ahead}' is 600 s ahead of the server's clock" in details
    # The newest id, and one just after it (as a stream that lost its newest
    # events leaves with its clients), are valid resume points.
    for steps_ahead in (0, 5):
        newest = (await running_valkey.client.stats(activity_limit=1)).activity[0].id
        millis, sequence = event_order(newest)
        since_id = f"{millis}-{sequence + steps_ahead}"
        current = await ActivityWatch.open(running_valkey.channel(), since_id=since_id)
        # The next event's id then has a later millisecond, so it passes since_id.
        await asyncio.sleep(0.01)
        await running_valkey.client.generate(f"after {since_id}")
        assert (await current.next()).event.prompt == f"after {since_id}"
        await current.close()


async def test_watch_types_filter(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, rate_limit=4)
    channel = running.channel()
    everything = await ActivityWatch.open(channel)
    hits_and_rejections = await ActivityWatch.open(
        channel, types=[pb.ACTIVITY_TYPE_CACHE_HIT, pb.ACTIVITY_TYPE_RATE_LIMITED]
    )
    requests_and_misses = await ActivityWatch.open(
        channel, types=[pb.ACTIVITY_TYPE_REQUEST, pb.ACTIVITY_TYPE_CACHE_MISS]
    )

    # Each filter's last matching event comes last, so an event of another
    # type delivered by mistake shows up among the ones read.
    await running.client.generate("filter A")
    await running.client.generate("filter A")
    await running.client.generate("filter B", skip_cache=True)
    await running.client.generate("filter C")
    with pytest.raises(grpc.aio.AioRpcError):
        await running.client.generate("filter D")
    await running.client.generate("filter A", metadata=forwarded_for(FORWARDED_CLIENT))
    await running.client.generate(
        "filter B", skip_cache=True, metadata=forwarded_for(FORWARDED_CLIENT)
    )
    await running.client.generate("filter A", metadata=forwarded_for(FORWARDED_CLIENT))

    all_events = [response.event for response in await everything.take(8)]
    first_filtered = [response.event for response in await hits_and_rejections.take(4)]
    second_filtered = [response.event for response in await requests_and_misses.take(4)]

    # The filter applies to the events replayed after since_id as well.
    replayed_hits = await ActivityWatch.open(
        channel, since_id=all_events[0].id, types=[pb.ACTIVITY_TYPE_CACHE_HIT]
    )
    replayed = [response.event for response in await replayed_hits.take(3)]
    await running.client.generate(
        "filter B", skip_cache=True, metadata=forwarded_for(SECOND_FORWARDED_CLIENT)
    )
    await running.client.generate("filter A", metadata=forwarded_for(SECOND_FORWARDED_CLIENT))
    live = (await replayed_hits.next()).event
    for watch in (everything, hits_and_rejections, requests_and_misses, replayed_hits):
        await watch.close()

    assert [event.type for event in first_filtered] == [
        pb.ACTIVITY_TYPE_CACHE_HIT,
        pb.ACTIVITY_TYPE_RATE_LIMITED,
        pb.ACTIVITY_TYPE_CACHE_HIT,
        pb.ACTIVITY_TYPE_CACHE_HIT,
    ]
    assert [event.type for event in second_filtered] == [
        pb.ACTIVITY_TYPE_CACHE_MISS,
        pb.ACTIVITY_TYPE_REQUEST,
        pb.ACTIVITY_TYPE_CACHE_MISS,
        pb.ACTIVITY_TYPE_REQUEST,
    ]
    assert [event.id for event in first_filtered] == [
        event.id
        for event in all_events
        if event.type in (pb.ACTIVITY_TYPE_CACHE_HIT, pb.ACTIVITY_TYPE_RATE_LIMITED)
    ]
    assert [event.id for event in second_filtered] == [
        event.id
        for event in all_events
        if event.type in (pb.ACTIVITY_TYPE_REQUEST, pb.ACTIVITY_TYPE_CACHE_MISS)
    ]
    assert [event.client for event in first_filtered] == [
        "127.0.0.1",
        "127.0.0.1",
        FORWARDED_CLIENT,
        FORWARDED_CLIENT,
    ]
    assert [event.id for event in replayed] == [
        event.id for event in all_events if event.type == pb.ACTIVITY_TYPE_CACHE_HIT
    ]
    assert live.type == pb.ACTIVITY_TYPE_CACHE_HIT
    assert live.client == SECOND_FORWARDED_CLIENT
    assert event_order(live.id) > event_order(all_events[-1].id)


async def test_watch_cancel_leaves_no_task(running_valkey: Running) -> None:
    hub = running_valkey.core.hub
    watch = await ActivityWatch.open(running_valkey.channel(), read=False)

    assert hub.watcher_count == 1
    assert hub.reader_running
    assert len(watch_handler_tasks()) == 1
    assert len(reader_tasks()) == 1

    watch.call.cancel()

    assert await wait_until(lambda: hub.watcher_count == 0)
    assert await wait_until(lambda: not hub.reader_running)
    assert await wait_until(lambda: not watch_handler_tasks())
    assert await wait_until(lambda: not reader_tasks())


async def test_slow_watcher_drop_count(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, watch_queue_size=2, rate_limit=100)
    channel = grpc.aio.insecure_channel(running.address, options=SLOW_CHANNEL_OPTIONS)
    try:
        watch = await ActivityWatch.open(channel, read=False)
        burst = 10
        for n in range(burst):
            await running.client.generate(f"slow watcher {n}")
        watch.start_reading()

        # The server sends the count of lost events with the next delivered
        # event, so marker calls are made until one of them arrives. A marker
        # made while the queue is still full is lost and counted too.
        produced = burst
        received: list[pb.WatchActivityResponse] = []
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            marker = f"slow watcher marker {produced}"
            await running.client.generate(marker)
            produced += 1
            while True:
                try:
                    received.append(await watch.next(timeout=1.0))
                except TimeoutError:
                    break
                if received[-1].event.prompt == marker:
                    break
            if received and received[-1].event.prompt == marker:
                break
        await watch.close()
    finally:
        await channel.close()

    dropped = sum(response.dropped for response in received)
    print(f"slow watcher: {produced} events produced, {len(received)} received, {dropped} dropped")
    assert received[-1].event.prompt.startswith("slow watcher marker")
    assert dropped > 0
    assert len(received) + dropped == produced
    orders = [event_order(response.event.id) for response in received]
    assert orders == sorted(set(orders))


async def open_and_cancel(stub: pb_grpc.TokenFlowServiceStub) -> None:
    """Open a watch, wait until the server has subscribed it, then cancel it."""
    call = stub.WatchActivity(pb.WatchActivityRequest(), timeout=30.0)
    metadata = await call.initial_metadata()
    if metadata.get("tokenflow-watch") != "subscribed":
        raise AssertionError(f"the watch was not subscribed: {metadata}")
    call.cancel()


async def churn_watches(stub: pb_grpc.TokenFlowServiceStub, count: int) -> None:
    """Open and cancel count watches, CHURN_CONCURRENCY at a time."""
    for start in range(0, count, CHURN_CONCURRENCY):
        batch = min(CHURN_CONCURRENCY, count - start)
        await asyncio.gather(*(open_and_cancel(stub) for _ in range(batch)))


def resident_bytes() -> int:
    """Return this process's resident set size (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def count_instances(kind: type) -> int:
    return sum(isinstance(item, kind) for item in gc.get_objects())


async def settled_counts(hub: Any) -> tuple[int, int, int]:
    """Wait until the hub has no watcher and no reader, collect garbage, and
    return the numbers of tasks, watch queues and subscriptions alive."""
    await wait_until(lambda: hub.watcher_count == 0 and not hub.reader_running, timeout=10.0)
    await wait_until(lambda: not watch_handler_tasks(), timeout=10.0)
    gc.collect()
    return (
        len(asyncio.all_tasks()),
        count_instances(asyncio.Queue),
        count_instances(Subscription),
    )


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
async def test_watch_churn_releases_everything(running_valkey: Running) -> None:
    hub = running_valkey.core.hub
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    await churn_watches(stub, CHURN_WARMUP)
    tasks_before, queues_before, subscriptions_before = await settled_counts(hub)
    resident_before = resident_bytes()
    started = time.monotonic()

    await churn_watches(stub, CHURN_COUNT)

    seconds = time.monotonic() - started
    tasks_after, queues_after, subscriptions_after = await settled_counts(hub)
    growth = resident_bytes() - resident_before
    print(
        f"{CHURN_COUNT} watches opened and cancelled in {seconds:.2f} s; resident memory grew "
        f"{growth / 2**20:.1f} MiB; tasks {tasks_before} before, {tasks_after} after"
    )

    assert hub.watcher_count == 0
    assert not hub.reader_running
    assert tasks_after == tasks_before
    assert queues_after == queues_before
    assert subscriptions_after == subscriptions_before == 0
    assert growth < CHURN_MAX_GROWTH_BYTES
