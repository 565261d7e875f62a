"""GetStats: exact counters, time buckets, top consumers and key counts."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from redis import Redis

from tests.conftest import ManualClock, Running
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


async def test_counters_add_up_after_mixed_load(start_server: Any, backend: str) -> None:
    running = await start_server(backend, rate_limit=25)
    stubs = [pb_grpc.TokenFlowServiceStub(running.channel()) for _ in range(4)]
    prompts = ["alpha", "beta", "gamma", "alpha", "beta", "delta"]
    calls = [
        stubs[n % 4].Generate(pb.GenerateRequest(prompt=prompts[n % len(prompts)]), timeout=10)
        for n in range(60)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    report = await running.client.simulate(80)

    stats = await running.client.stats()
    calls_made = len(outcomes) + report.summary.total
    assert stats.cache.hits + stats.cache.misses + stats.rate_limit.blocked_total == calls_made
    assert stats.rate_limit.requests_total == calls_made
    blocked = sum(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
    assert blocked == 35
    assert stats.rate_limit.blocked_total == blocked + report.summary.blocked
    assert stats.cache.total == stats.cache.hits + stats.cache.misses
    assert stats.cache.misses == len(running.generator.requests)


async def test_hit_ratio_is_percent(running: Running) -> None:
    for _ in range(4):
        await running.client.generate("ratio")

    stats = await running.client.stats()
    assert stats.cache.hits == 3
    assert stats.cache.misses == 1
    assert stats.cache.hit_ratio == 75.0


async def test_requests_per_minute_uses_time_buckets(start_server: Any, backend: str) -> None:
    clock = ManualClock(start=1_800_000_030.0)
    running = await start_server(backend, clock=clock, rate_limit=100)
    for n in range(5):
        await running.client.generate(f"early {n}")
    clock.advance(40.0)
    for n in range(3):
        await running.client.generate(f"late {n}")

    stats = await running.client.stats()
    assert stats.rate_limit.requests_per_minute == 8

    clock.advance(30.0)  # 70 s after the early calls, 30 s after the late ones.
    stats = await running.client.stats()
    assert stats.rate_limit.requests_per_minute == 3
    assert stats.rate_limit.requests_total == 8


async def test_blocked_requests_counts_last_minute(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running = await start_server(backend, clock=clock, rate_limit=2)
    for n in range(5):
        try:
            await running.client.generate(f"block {n}")
        except grpc.aio.AioRpcError:
            pass

    stats = await running.client.stats()
    assert stats.rate_limit.blocked_requests == 3

    clock.advance(61.0)
    stats = await running.client.stats()
    assert stats.rate_limit.blocked_requests == 0
    assert stats.rate_limit.blocked_total == 3


async def test_top_consumers_by_requests(running: Running) -> None:
    await running.client.simulate(30)
    for n in range(5):
        await running.client.generate(f"consumer {n}")

    stats = await running.client.stats()
    top = [(c.client, c.requests) for c in stats.rate_limit.top_consumers]
    assert top[0] == ("127.0.0.1", 5)
    assert len(top) == 10
    # Ten simulated clients sent 3 requests each; nine fit after the real client.
    assert all(client.startswith("sim-client-") for client, _ in top[1:])
    assert all(requests == 3 for _, requests in top[1:])


async def test_key_distribution_counts_keys(running: Running) -> None:
    await running.client.generate("one")
    await running.client.generate("two")
    await running.client.generate("two")

    stats = await running.client.stats()
    assert stats.key_distribution["cache"] == 2
    assert stats.key_distribution["ratelimit"] == 1
    assert stats.key_distribution["activity"] == 1
    assert stats.cache.cached_keys == 2
    assert stats.rate_limit.total_keys == 1
    assert stats.total_keys == sum(stats.key_distribution.values())
    assert "lock" not in stats.key_distribution


async def test_key_counts_reused_within_interval(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, key_count_interval=0.5)
    await running.client.generate("counted")
    first = await running.client.stats()
    await running.client.generate("written after the count")
    reused = await running.client.stats()
    await asyncio.sleep(0.6)
    recounted = await running.client.stats()

    assert first.cache.cached_keys == 1
    assert reused.cache.cached_keys == 1
    assert reused.cache.misses == 2
    assert recounted.cache.cached_keys == 2


def scan_calls(valkey_url: str) -> int:
    with Redis.from_url(valkey_url) as client:
        stats = client.info("commandstats").get("cmdstat_scan", {})
        return int(stats.get("calls", 0))


async def test_concurrent_stats_share_one_key_count(start_server: Any, valkey_url: str) -> None:
    every_call = await start_server(valkey_url, key_count_interval=0.0)
    shared = await start_server(valkey_url, key_count_interval=60.0)
    before = scan_calls(valkey_url)
    await every_call.client.stats()
    one_count = scan_calls(valkey_url) - before

    before = scan_calls(valkey_url)
    replies = await asyncio.gather(*(shared.client.stats() for _ in range(20)))
    twenty_callers = scan_calls(valkey_url) - before

    assert one_count >= 1
    assert twenty_callers == one_count
    assert {reply.total_keys for reply in replies} == {replies[0].total_keys}


async def test_stats_ignore_other_prefixes(start_server: Any, valkey_url: str) -> None:
    first = await start_server(valkey_url)
    second = await start_server(valkey_url)
    await first.client.generate("only in the first deployment")

    stats = await second.client.stats()
    assert stats.total_keys == 0
    assert stats.cache.hits + stats.cache.misses == 0


async def test_activity_newest_first_and_limited(running: Running) -> None:
    for n in range(10):
        await running.client.generate(f"event {n}", skip_cache=True)
    stats = await running.client.stats()
    prompts = [event.prompt for event in stats.activity]

    assert prompts == [f"event {n}" for n in range(9, -1, -1)]
    assert stats.connected is True

    limited = await running.client.stats(activity_limit=3)
    assert [event.prompt for event in limited.activity] == ["event 9", "event 8", "event 7"]
    assert limited.activity[0].type == pb.ACTIVITY_TYPE_REQUEST


async def test_activity_default_is_twenty(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=100)
    for n in range(25):
        await running.client.generate(f"event {n}")

    stats = await running.client.stats()
    assert len(stats.activity) == 20
    assert stats.activity[0].prompt == "event 24"


async def test_activity_stream_is_capped(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=1000, activity_max_events=100)
    await running.client.simulate(600)

    length = await running.core.redis.xlen(running.core.keys.activity)
    assert 100 <= length < 300
