"""The response cache and its single flight, through real gRPC calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.conftest import CountingGenerator, Running
from tokenflow_grpc.cache import cache_key
from tokenflow_grpc.core import LOCK_LEASE_SECONDS
from tokenflow_grpc.generator import Generation, GenerationRequest, Usage
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


async def counters(running: Running) -> dict[str, int]:
    stats = await running.client.stats()
    return {
        "hits": stats.cache.hits,
        "misses": stats.cache.misses,
        "blocked": stats.rate_limit.blocked_total,
        "requests": stats.rate_limit.requests_total,
    }


async def test_same_prompt_misses_then_hits(running: Running) -> None:
    first = await running.client.generate("What is Valkey?")
    second = await running.client.generate("What is Valkey?")

    assert first.response.cached is False
    assert second.response.cached is True
    assert second.response.response == first.response.response
    assert second.response.cache_key == first.response.cache_key
    assert len(running.generator.requests) == 1


@pytest.mark.parametrize(
    "variant",
    [
        {"model": "tokenflow-sim-2"},
        {"temperature": 0.2},
        {"max_tokens": 5},
    ],
    ids=["model", "temperature", "max_tokens"],
)
async def test_different_parameters_miss(running: Running, variant: dict[str, Any]) -> None:
    await running.client.generate("Explain caching")
    other = await running.client.generate("Explain caching", **variant)

    assert other.response.cached is False
    assert len(running.generator.requests) == 2


async def test_negative_zero_temperature_shares_entry(running: Running) -> None:
    first = await running.client.generate("Explain caching", temperature=0.0)
    negative = await running.client.generate("Explain caching", temperature=-0.0)

    assert negative.response.cached is True
    assert negative.response.cache_key == first.response.cache_key


async def test_default_model_shares_entry_with_named_default(running: Running) -> None:
    await running.client.generate("Explain caching")
    named = await running.client.generate("Explain caching", model="tokenflow-sim-1")

    assert named.response.cached is True


async def test_concurrent_cold_prompts_generate_once(start_server: Any, backend: str) -> None:
    running = await start_server(backend, generator=CountingGenerator(latency=0.2), rate_limit=100)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    calls = [
        stub.Generate(pb.GenerateRequest(prompt="a cold prompt"), timeout=10) for _ in range(20)
    ]
    responses = await asyncio.gather(*calls)

    assert len(running.generator.requests) == 1
    assert sum(not r.cached for r in responses) == 1
    assert sum(r.cached for r in responses) == 19
    assert len({r.response for r in responses}) == 1
    figures = await counters(running)
    assert figures["misses"] == 1
    assert figures["hits"] == 19


async def test_waiters_take_over_after_generator_failure(
    start_server: Any, valkey_url: str
) -> None:
    class FailingOnce(CountingGenerator):
        async def generate(self, request: GenerationRequest, deadline: float) -> Generation:
            self.requests.append(request)
            if len(self.requests) == 1:
                await asyncio.sleep(0.1)
                raise RuntimeError("upstream broke")
            return Generation("second attempt", Usage(1, 2, 3))

    running = await start_server(valkey_url, generator=FailingOnce(), rate_limit=100)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    calls = [stub.Generate(pb.GenerateRequest(prompt="flaky"), timeout=10) for _ in range(5)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    failures = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    answers = [o for o in outcomes if isinstance(o, pb.GenerateResponse)]
    assert len(failures) == 1
    assert failures[0].code() == grpc.StatusCode.UNAVAILABLE
    assert len(answers) == 4
    assert {a.response for a in answers} == {"second attempt"}
    assert len(running.generator.requests) == 2
    figures = await counters(running)
    assert figures["misses"] == 2
    assert figures["hits"] == 3


async def test_waiters_that_give_up_still_count(start_server: Any, backend: str) -> None:
    running = await start_server(backend, generator=CountingGenerator(latency=1.0), rate_limit=100)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    holder = stub.Generate(pb.GenerateRequest(prompt="slow to fill"), timeout=10)
    await asyncio.sleep(0.2)
    waiters = [
        stub.Generate(pb.GenerateRequest(prompt="slow to fill"), timeout=0.3) for _ in range(6)
    ]
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    answer = await holder

    assert answer.cached is False
    assert all(isinstance(outcome, grpc.aio.AioRpcError) for outcome in outcomes)
    assert {outcome.code() for outcome in outcomes} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    figures = await counters(running)
    assert figures["requests"] == 7
    # A call that waits for an identical one counts as a hit when it starts waiting.
    assert figures["misses"] == 1
    assert figures["hits"] == 6
    assert figures["hits"] + figures["misses"] + figures["blocked"] == figures["requests"]


async def test_simulated_stream_fills_cache(running: Running) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    call = stub.GenerateStream(pb.GenerateStreamRequest(prompt="stream on every backend"))
    streamed = [message async for message in call]
    reply = await running.client.generate("stream on every backend")

    text = "".join(message.delta for message in streamed)
    assert len(streamed) > 2
    assert reply.response.cached is True
    assert reply.response.response == text
    assert reply.response.usage == streamed[-1].usage
    assert streamed[-1].usage.completion_tokens == len(text.split())
    assert len(running.generator.requests) == 1


async def test_skip_cache_bypasses_entry(running: Running) -> None:
    await running.client.generate("bypass me")
    bypassed = await running.client.generate("bypass me", skip_cache=True)

    assert bypassed.response.cached is False
    assert len(running.generator.requests) == 2


async def test_cache_entry_has_ttl(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, cache_ttl=120)
    reply = await running.client.generate("ttl check")
    ttl = await running.core.redis.ttl(running.core.keys.cache(reply.response.cache_key))

    assert 0 < ttl <= 120


def test_cache_key_covers_every_parameter() -> None:
    base = GenerationRequest("p", "m", None, None)
    variants = [
        GenerationRequest("p ", "m", None, None),
        GenerationRequest("p", "n", None, None),
        GenerationRequest("p", "m", 0.0, None),
        GenerationRequest("p", "m", None, 1),
    ]

    keys = {cache_key(base)} | {cache_key(v) for v in variants}
    assert len(keys) == 5
    assert cache_key(base) == cache_key(GenerationRequest("p", "m", None, None))


async def test_dead_holder_lock_frees_within_lease(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url)
    request = GenerationRequest("orphaned lock", running.settings.default_model)
    lock = running.core.keys.lock(cache_key(request))
    # A holder that died mid-generation leaves its lock with one lease to live.
    await running.core.redis.set(lock, "dead-holder", px=int(LOCK_LEASE_SECONDS * 1000))

    reply = await running.client.generate("orphaned lock")

    assert reply.response.cached is False
    assert len(running.generator.requests) == 1
    assert await running.core.redis.exists(lock) == 0


async def test_lease_renewed_during_slow_generation(start_server: Any, valkey_url: str) -> None:
    slow = CountingGenerator(latency=LOCK_LEASE_SECONDS * 1.5)
    running = await start_server(valkey_url, generator=slow)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    calls = [stub.Generate(pb.GenerateRequest(prompt="slow"), timeout=20) for _ in range(3)]
    responses = await asyncio.gather(*calls)

    assert len(slow.requests) == 1
    assert sum(r.cached for r in responses) == 2
