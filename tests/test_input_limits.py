"""Every input limit, each rejected with its status and a message that names
the limit: gRPC message and metadata sizes, prompt size, Simulate count and
rate, and open watchers per client."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import ManualClock, Running
from tests.helpers import ActivityWatch
from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.status import DETAILS_METADATA_KEY
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    return status_pb2.Status.FromString(dict(error.trailing_metadata())[DETAILS_METADATA_KEY])


async def test_message_over_max_rejected(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, max_message_bytes=2000, max_prompt_bytes=1000)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())

    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await stub.Generate(pb.GenerateRequest(prompt="x" * 3000), timeout=10.0)
    with pytest.raises(grpc.aio.AioRpcError) as long_prompt:
        await stub.Generate(pb.GenerateRequest(prompt="x" * 1500), timeout=10.0)
    fits = await stub.Generate(pb.GenerateRequest(prompt="x" * 1000), timeout=10.0)

    # gRPC writes this message itself, so it names the size but not the flag.
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (too_big.value.details() or "")
    assert "2000" in (too_big.value.details() or "")
    assert long_prompt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-prompt-bytes" in (long_prompt.value.details() or "")
    assert "the maximum is 1000" in (long_prompt.value.details() or "")
    assert fits.response


async def test_metadata_over_max_rejected(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, max_metadata_bytes=1024)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())

    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await stub.Generate(
            pb.GenerateRequest(prompt="metadata"), metadata=(("x-big", "y" * 2000),), timeout=10.0
        )
    fits = await stub.Generate(
        pb.GenerateRequest(prompt="metadata"), metadata=(("x-small", "y" * 100),), timeout=10.0
    )

    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds" in (too_big.value.details() or "")
    assert fits.response


async def test_simulate_count_over_max(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, simulate_max_count=5)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Simulate(pb.SimulateRequest(count=6), timeout=10.0)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--simulate-max-count" in (caught.value.details() or "")


async def test_simulate_rate_limited(start_server: Any, valkey_url: str) -> None:
    clock = ManualClock()
    running: Running = await start_server(valkey_url, clock=clock, simulate_per_minute=2)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())

    for _ in range(2):
        await stub.Simulate(pb.SimulateRequest(count=1), timeout=10.0)
    clock.advance(20)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Simulate(pb.SimulateRequest(count=1), timeout=10.0)
    clock.advance(40.001)
    admitted_again = await stub.Simulate(pb.SimulateRequest(count=1), timeout=10.0)

    status = status_details(caught.value)
    retry_info = error_details_pb2.RetryInfo()
    quota_failure = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(retry_info)
    assert status.details[1].Unpack(quota_failure)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--simulate-per-minute" in (caught.value.details() or "")
    assert dict(caught.value.trailing_metadata())["retry-after"] == "40"
    assert retry_info.retry_delay.ToMilliseconds() == 40_000
    assert "--simulate-per-minute" in quota_failure.violations[0].description
    assert admitted_again.summary.total == 1


async def test_watchers_per_client_limited(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, max_watchers_per_client=2)
    watches = [await ActivityWatch.open(running.channel()) for _ in range(2)]
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchActivity(pb.WatchActivityRequest(), timeout=10.0):
                pass
        await watches.pop().close()
        # The closed stream's slot frees once the server receives the cancellation.
        for _ in range(100):
            if running.server.core.hub.watcher_count == 1:
                break
            await running.server.core.hub.redis.ping()
        watches.append(await ActivityWatch.open(running.channel()))
    finally:
        for watch in watches:
            await watch.close()

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-watchers-per-client 2" in (caught.value.details() or "")
    assert len(watches) == 2


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"max_message_bytes": 1000, "max_prompt_bytes": 1000}, "--max-message-bytes"),
        ({"max_metadata_bytes": 0}, "--max-metadata-bytes"),
        ({"max_watchers_per_client": 0}, "--max-watchers-per-client"),
        ({"simulate_per_minute": -1}, "--simulate-per-minute"),
        ({"metrics_address": "9464"}, "--metrics-address"),
    ],
)
def test_invalid_limit_setting_named(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings(**overrides)

    assert named in str(caught.value)
