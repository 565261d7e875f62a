"""Activity event ids "<ms>-<n>": n numbers the stream's events from 1, and ids
increase whatever the writers' clocks do."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import ManualClock, Running
from tests.helpers import event_order, stream_ids

CONCURRENT_CALLS = 40


async def test_ids_number_events_from_two_servers(start_server: Any, backend: str) -> None:
    first: Running = await start_server(backend, rate_limit=1000)
    second: Running = await start_server(
        backend, rate_limit=1000, key_prefix=first.settings.key_prefix
    )

    await asyncio.gather(
        *(
            running.client.generate(f"concurrent {name} {n}", skip_cache=True)
            for n in range(CONCURRENT_CALLS)
            for name, running in (("first", first), ("second", second))
        )
    )
    ids = await stream_ids(first)

    orders = [event_order(event_id) for event_id in ids]
    assert len(ids) == 2 * CONCURRENT_CALLS
    assert orders == sorted(set(orders))
    assert [sequence for _ms, sequence in orders] == list(range(1, 2 * CONCURRENT_CALLS + 1))


async def test_ids_increase_when_clock_goes_back(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    start_ms = int(clock() * 1000)
    running: Running = await start_server(backend, clock=clock, rate_limit=1000)

    await running.client.generate("before the clock goes back", skip_cache=True)
    clock.advance(-10.0)
    await running.client.generate("ten seconds earlier", skip_cache=True)
    await running.client.generate("still earlier than the first", skip_cache=True)
    clock.advance(20.0)
    await running.client.generate("ten seconds after the first", skip_cache=True)
    ids = await stream_ids(running)

    assert [event_order(event_id) for event_id in ids] == [
        (start_ms, 1),
        (start_ms, 2),
        (start_ms, 3),
        (start_ms + 10_000, 4),
    ]


async def test_ids_follow_other_kinds_of_event(start_server: Any, backend: str) -> None:
    running: Running = await start_server(backend, rate_limit=3)

    await running.client.generate("a miss, then a hit")
    await running.client.generate("a miss, then a hit")
    await running.client.generate("skipped cache", skip_cache=True)
    rejected = await asyncio.gather(
        running.client.generate("over the limit"), return_exceptions=True
    )
    ids = await stream_ids(running)
    kinds = [
        fields["type"]
        for _id, fields in await running.core.redis.xrange(running.core.keys.activity)
    ]

    assert isinstance(rejected[0], Exception)
    assert kinds == ["cache_miss", "cache_hit", "request", "rate_limited"]
    assert [event_order(event_id)[1] for event_id in ids] == [1, 2, 3, 4]


async def test_ids_after_newest_entry_deleted(start_server: Any, backend: str) -> None:
    # A clock that does not move makes the next id the deleted one's again,
    # which Valkey rejects because it is not above the stream's last id.
    running: Running = await start_server(backend, clock=ManualClock(), rate_limit=1000)
    await running.client.generate("kept", skip_cache=True)
    await running.client.generate("deleted by hand", skip_cache=True)
    deleted = (await stream_ids(running))[-1]
    await running.core.redis.xdel(running.core.keys.activity, deleted)

    reply = await running.client.generate("after the deletion", skip_cache=True)
    ids = await stream_ids(running)

    assert reply.response
    assert len(ids) == 2
    # Valkey chose the id after the stream's last one, as the manual clock
    # is ahead of Valkey's, so the numbering goes on.
    deleted_ms, deleted_sequence = event_order(deleted)
    assert event_order(ids[-1]) == (deleted_ms, deleted_sequence + 1)
