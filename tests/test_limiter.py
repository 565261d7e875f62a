"""The sliding-window limiter through real gRPC calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import ManualClock, Running, make_settings
from tokenflow_grpc.keys import NAMESPACE_CLIENT
from tokenflow_grpc.server import TokenFlowServer
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc
from tokenflow_grpc.valkey import connect


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin in the trailing metadata")


async def window_size(running: Running, client: str = "127.0.0.1") -> int:
    return int(await running.core.redis.zcard(running.core.keys.window(NAMESPACE_CLIENT, client)))


async def test_concurrent_burst_admits_exactly_limit(running: Running) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    calls = [stub.Generate(pb.GenerateRequest(prompt=f"burst {n}"), timeout=10) for n in range(50)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    admitted = [o for o in outcomes if isinstance(o, pb.GenerateResponse)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == 10
    assert len(rejected) == 40
    assert {e.code() for e in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert await window_size(running) == 10


async def test_bursts_over_fresh_channels_admit_exactly_limit(running_valkey: Running) -> None:
    stubs = [pb_grpc.TokenFlowServiceStub(running_valkey.channel()) for _ in range(10)]
    calls = [
        stubs[n % 10].Generate(pb.GenerateRequest(prompt=f"fresh {n}"), timeout=10)
        for n in range(100)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert sum(isinstance(o, pb.GenerateResponse) for o in outcomes) == 10


async def test_burst_beyond_connection_pool_exact(valkey_url: str) -> None:
    # More calls in flight than Valkey connections: the calls beyond the pool
    # wait for a connection, so every call is rate limited. CLIENT PAUSE delays
    # every reply for a moment, so that all the calls are in flight at once.
    redis = connect(valkey_url, 5.0, max_connections=2)
    server = TokenFlowServer(make_settings(valkey_url), redis=redis)
    await server.start()
    pauser = connect(valkey_url, 5.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TokenFlowServiceStub(channel)
            await pauser.execute_command("CLIENT", "PAUSE", 500, "ALL")
            calls = [
                stub.Generate(pb.GenerateRequest(prompt=f"pool {n}"), timeout=30)
                for n in range(40)
            ]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await server.stop(grace=1.0)
        await redis.aclose()
        await pauser.aclose()

    admitted = [o for o in outcomes if isinstance(o, pb.GenerateResponse)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == 10
    assert all(response.HasField("rate_limit") for response in admitted)
    assert len(rejected) == 30
    assert {e.code() for e in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_rejected_request_not_added_to_window(running: Running) -> None:
    for n in range(10):
        await running.client.generate(f"fill {n}")
    for n in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await running.client.generate(f"over {n}")

    assert await window_size(running) == 10


async def test_allowed_call_carries_rate_limit_metadata(running: Running) -> None:
    first = await running.client.generate("metadata one")
    second = await running.client.generate("metadata two")

    assert first.rate_limit.limit == 10
    assert first.rate_limit.remaining == 9
    assert second.rate_limit.remaining == 8
    assert first.rate_limit.reset_seconds is not None
    assert 0 < first.rate_limit.reset_seconds <= 60
    assert first.rate_limit.retry_after_seconds is None
    assert first.response.rate_limit.limit == 10
    assert first.response.rate_limit.remaining == 9
    assert first.response.rate_limit.window.seconds == 60


async def test_rejection_has_metadata_and_details(running: Running) -> None:
    for n in range(10):
        await running.client.generate(f"fill {n}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("one too many")
    error = caught.value

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "127.0.0.1" in (error.details() or "")
    metadata = dict((k, v) for k, v in error.trailing_metadata() if isinstance(v, str))
    assert metadata["x-ratelimit-limit"] == "10"
    assert metadata["x-ratelimit-remaining"] == "0"
    assert 1 <= int(metadata["retry-after"]) <= 60
    assert 1 <= int(metadata["x-ratelimit-reset"]) <= 60

    status = rich_status(error)
    retry_info = error_details_pb2.RetryInfo()
    quota_failure = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(retry_info)
    assert status.details[1].Unpack(quota_failure)
    assert 0 < retry_info.retry_delay.seconds + retry_info.retry_delay.nanos / 1e9 <= 60
    assert quota_failure.violations[0].subject == "client:127.0.0.1"


async def test_window_slides_with_time(start_server: Any, backend: str) -> None:
    clock = ManualClock()
    running = await start_server(backend, clock=clock, rate_limit=3, rate_window=10.0)
    for n in range(3):
        await running.client.generate(f"slide {n}")
        clock.advance(2.0)
    # The window contains calls at t=0, 2 and 4, and now t=6.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("too soon")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = dict(caught.value.trailing_metadata())["retry-after"]
    assert retry_after == "4"

    clock.advance(4.0)  # t=10: the call made at t=0 has left the window.
    reply = await running.client.generate("after the oldest expired")
    assert reply.rate_limit.remaining == 0

    with pytest.raises(grpc.aio.AioRpcError):
        await running.client.generate("still full")


async def test_limit_setting_is_applied(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=2)
    await running.client.generate("a")
    await running.client.generate("b")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("c")

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_simulate_does_not_touch_client_window(running: Running) -> None:
    await running.client.generate("before the burst")
    await running.client.simulate(200)
    reply = await running.client.generate("after the burst")

    assert reply.rate_limit.remaining == 8
    assert await window_size(running) == 2
