"""TokenFlow on a Valkey Cluster of three primaries with one replica each:
exact limits and counters over sharded keys, single flight across
processes, GetStats over every primary, resume after a restart, and the
failover of a primary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from grpc_health.v1 import health_pb2
from redis.crc import key_slot

from tests.cluster import LocalCluster, Node, _free_ports
from tests.conftest import CountingGenerator, Running, make_settings
from tests.helpers import ActivityWatch
from tests.test_outage import health_status, wait_for_health
from tokenflow_grpc.cache import cache_key
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.keys import NAMESPACE_CLIENT, KeySpace
from tokenflow_grpc.server import TokenFlowServer
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The failover test's cluster marks a primary failed after 1 s without a reply.
FAILOVER_NODE_TIMEOUT_MS = 1000
# From the kill to TokenFlow working again: failure detection (1 s), the
# replica's election delay (0.5 to 1 s) and TokenFlow's topology refresh (at
# most 1 s apart), with a wide margin for a loaded machine.
RECOVERY_DEADLINE_SECONDS = 30.0
# TokenFlow's cluster client refreshes its slot map at most once a second
# (redis-py's default), so it finds the promoted replica soon after.
REFRESH_MARGIN_SECONDS = 5.0
PROBE_INTERVAL_SECONDS = 0.05


def forwarded(client: str) -> list[tuple[str, str]]:
    return [("x-forwarded-for", client)]


def slot_of(key: str) -> int:
    return key_slot(key.encode("utf-8"))


def clients_where(keys: KeySpace, condition: Any, count: int, network: str = "10.6") -> list[str]:
    """Return count client identities whose window key satisfies condition."""
    found = []
    for number in range(1, 60_000):
        client = f"{network}.{number // 250}.{number % 250}"
        if condition(keys.window(NAMESPACE_CLIENT, client)):
            found.append(client)
            if len(found) == count:
                return found
    raise AssertionError(f"found {len(found)} of {count} client identities")


def one_client_per_shard(keys: KeySpace, network: str) -> list[str]:
    """Return one client identity in each shard, in shard order."""
    return [
        clients_where(keys, lambda key, tag=tag: key.startswith("{" + tag + "}"), 1, network)[0]
        for tag in keys.shard_tags
    ]


def prompts_where(running: Running, condition: Any, count: int, stem: str) -> list[str]:
    """Return count prompts whose cache entry key satisfies condition."""
    keys = running.core.keys
    found = []
    for number in range(10_000):
        prompt = f"{stem} {number}"
        entry = keys.cache(cache_key(GenerationRequest(prompt, running.settings.default_model)))
        if condition(entry):
            found.append(prompt)
            if len(found) == count:
                return found
    raise AssertionError(f"found {len(found)} of {count} prompts")


async def admitted_of(running: Running, client: str, calls: int, stem: str) -> int:
    """Send calls concurrent Generate calls as client; return how many were admitted."""
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    outcomes = await asyncio.gather(
        *(
            stub.Generate(
                pb.GenerateRequest(prompt=f"{stem} {n}"), metadata=forwarded(client), timeout=10
            )
            for n in range(calls)
        ),
        return_exceptions=True,
    )
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert {e.code() for e in rejected} <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    return sum(isinstance(o, pb.GenerateResponse) for o in outcomes)


async def test_bursts_over_channels_admit_exactly_limit(
    start_server: Any, valkey_cluster: LocalCluster
) -> None:
    running: Running = await start_server(valkey_cluster.url)
    stubs = [pb_grpc.TokenFlowServiceStub(running.channel()) for _ in range(10)]
    calls = [
        stubs[n % 10].Generate(pb.GenerateRequest(prompt=f"fresh {n}"), timeout=10)
        for n in range(100)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert sum(isinstance(o, pb.GenerateResponse) for o in outcomes) == 10


async def test_many_clients_each_admit_exactly_limit(
    start_server: Any, valkey_cluster: LocalCluster
) -> None:
    running: Running = await start_server(valkey_cluster.url, rate_limit=5)
    # One client per shard, so every shard and every primary takes part.
    clients = one_client_per_shard(running.core.keys, "10.6")

    admitted = await asyncio.gather(
        *(admitted_of(running, client, 15, f"many {client}") for client in clients)
    )
    stats = await running.client.stats()

    assert admitted == [5] * len(clients)
    assert stats.rate_limit.requests_total == 15 * len(clients)
    assert stats.rate_limit.blocked_total == 10 * len(clients)
    assert stats.cache.hits + stats.cache.misses == 5 * len(clients)


async def test_single_flight_across_servers(
    start_server: Any, valkey_cluster: LocalCluster
) -> None:
    generator = CountingGenerator(latency=0.3)
    first: Running = await start_server(valkey_cluster.url, generator=generator, rate_limit=100)
    second: Running = await start_server(
        valkey_cluster.url,
        generator=generator,
        rate_limit=100,
        key_prefix=first.settings.key_prefix,
    )
    request = pb.GenerateRequest(prompt="one generation for two servers")
    stubs = [pb_grpc.TokenFlowServiceStub(s.channel()) for s in (first, second)]
    replies = await asyncio.gather(*(stubs[n % 2].Generate(request, timeout=10) for n in range(20)))
    stats = await first.client.stats()

    assert len(generator.requests) == 1
    assert len({reply.response for reply in replies}) == 1
    assert sum(not reply.cached for reply in replies) == 1
    assert stats.cache.misses == 1
    assert stats.cache.hits == 19
    assert len(stats.activity) == 20


async def test_stats_cover_every_primary(start_server: Any, valkey_cluster: LocalCluster) -> None:
    running: Running = await start_server(valkey_cluster.url, rate_limit=20)
    keys = running.core.keys
    # One client per shard puts keys on every primary. The client at index i
    # sends i + 1 requests, so the top consumers have distinct counts, and
    # the clients share len(clients) // 2 prompts, so most calls are hits.
    clients = one_client_per_shard(keys, "10.7")
    calls = 0
    for index, client in enumerate(clients):
        for n in range(index + 1):
            await running.client.generate(f"stats {n // 2}", metadata=forwarded(client))
            calls += 1

    stats = await running.client.stats()
    per_primary = await keys_per_primary(valkey_cluster.primaries(), keys)

    prompts = len(clients) // 2
    assert stats.rate_limit.requests_total == calls
    assert stats.cache.hits + stats.cache.misses + stats.rate_limit.blocked_total == calls
    assert stats.cache.misses == prompts
    assert stats.rate_limit.requests_per_minute == calls
    assert [(c.client, c.requests) for c in stats.rate_limit.top_consumers] == [
        (client, index + 1) for index, client in reversed(list(enumerate(clients)))
    ][:10]
    assert stats.key_distribution["ratelimit"] == len(clients)
    assert stats.key_distribution["cache"] == prompts
    assert stats.key_distribution["activity"] == 1
    assert stats.total_keys == sum(per_primary)
    assert all(count > 0 for count in per_primary)


async def keys_per_primary(primaries: list[Node], keys: KeySpace) -> list[int]:
    """Count the deployment's keys on each primary with SCAN."""
    counts = []
    for node in primaries:
        async with redis_asyncio.Redis(port=node.port, decode_responses=True) as client:
            found = [k async for k in client.scan_iter(match=keys.scan_pattern, count=1000)]
        counts.append(sum(keys.kind_of(key) is not None for key in found))
    return counts


async def test_watch_resume_after_restart(start_server: Any, valkey_cluster: LocalCluster) -> None:
    settings = make_settings(valkey_cluster.url, rate_limit=100)
    # A second server on the same prefix records events while the first is
    # down, as another replica of the service would.
    other: Running = await start_server(valkey_cluster.url, key_prefix=settings.key_prefix)
    server = TokenFlowServer(settings)
    await server.start()
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        watch = await ActivityWatch.open(channel)
        for n in range(3):
            await other.client.generate(f"before {n}")
        seen = [response.event for response in await watch.take(3)]
        await watch.close()
        await channel.close()
        await server.stop(0.5)

        for n in range(3):
            await other.client.generate(f"during {n}")
        server = TokenFlowServer(settings)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        resumed = await ActivityWatch.open(channel, since_id=seen[-1].id)
        await other.client.generate("after the restart")
        received = [response.event for response in await resumed.take(4)]
        await resumed.close()
        await channel.close()
    finally:
        await server.stop(0.5)

    assert [event.prompt for event in seen] == [f"before {n}" for n in range(3)]
    assert [event.prompt for event in received] == [
        "during 0",
        "during 1",
        "during 2",
        "after the restart",
    ]


@pytest.fixture
def failover_cluster() -> Iterator[LocalCluster]:
    """A cluster of its own for a test that kills one of its primaries. Request
    it before start_server, so the TokenFlow servers stop before it does."""
    cluster = LocalCluster(node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def test_primary_failover_recovers(failover_cluster: LocalCluster, start_server: Any) -> None:
    limit = 10
    running: Running = await start_server(
        failover_cluster.url, valkey_cluster=True, rate_limit=limit, on_valkey_error="deny"
    )
    lenient: Running = await start_server(
        failover_cluster.url, valkey_cluster=True, rate_limit=1000, on_valkey_error="allow"
    )
    keys = running.core.keys
    stream_slot = slot_of(keys.activity)
    victim = failover_cluster.primary_of(stream_slot)
    replica = failover_cluster.replica_of(victim)
    victim_slots = failover_cluster.slots_of(victim)

    def on_victim(key: str) -> bool:
        return slot_of(key) in victim_slots

    # The probe's window and cache entries share its shard, so each probe call
    # runs in one round and is counted whole or not at all.
    probe = clients_where(keys, on_victim, 1)[0]
    probe_tag = keys.window(NAMESPACE_CLIENT, probe).split("}")[0] + "}"
    probe_prompts = prompts_where(running, lambda key: key.startswith(probe_tag), 400, "probe")
    healthy_clients = clients_where(keys, lambda key: not on_victim(key), 100, network="10.8")
    healthy_prompts = prompts_where(running, lambda key: not on_victim(key), 5, "healthy")
    fresh_client = clients_where(keys, on_victim, 2)[1]
    lenient_probe = clients_where(lenient.core.keys, on_victim, 1)[0]
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    lenient_stub = pb_grpc.TokenFlowServiceStub(lenient.channel())

    watch = await ActivityWatch.open(running.channel())
    await running.client.generate(probe_prompts[0], metadata=forwarded(probe))
    await running.client.generate(healthy_prompts[0], metadata=forwarded(healthy_clients[0]))
    await watch.take(2)
    # Every write so far reached the replica, so the failover loses none.
    async with redis_asyncio.Redis(port=victim.port) as client:
        acknowledged = await client.execute_command("WAIT", 1, 5000)
    # The other primaries forget the scripts, so the calls made during the
    # outage have to get them cached again while one primary is down.
    for node in failover_cluster.primaries():
        if node is not victim:
            async with redis_asyncio.Redis(port=node.port) as client:
                await client.script_flush()

    failover_cluster.kill(victim)
    healthy_calls = [
        (client, healthy_prompts[n % len(healthy_prompts)])
        for n, client in enumerate(healthy_clients)
    ]
    outage = await probe_until_recovered(
        stub,
        replica,
        probe,
        probe_prompts,
        healthy_calls,
        lenient_stub,
        lenient_probe,
        running.channel(),
    )
    print(
        f"failover: replica promoted {outage.promoted_after} s after the kill, TokenFlow "
        f"recovered {outage.recovered_after} s after the kill; {outage.probe_failures} probe "
        f"calls failed, {len(outage.healthy)} calls sent to the other primaries"
    )

    assert acknowledged == 1
    assert failures(outage.healthy) == []
    assert failures(outage.lenient) == []
    assert outage.promoted_after is not None
    assert outage.recovered_after is not None
    assert outage.recovered_after - outage.promoted_after < REFRESH_MARGIN_SECONDS
    assert outage.probe_failures > 0
    assert {outcome_code(o) for o in outage.probes[:-1]} == {grpc.StatusCode.UNAVAILABLE}
    assert isinstance(outage.probes[-1], pb.GenerateResponse)
    assert not outage.lenient[0].HasField("rate_limit")
    assert outage.connected[0] is False
    assert NOT_SERVING in outage.valkey_health
    assert failover_cluster.primary_of(stream_slot) is replica

    # Two calls before the kill, the healthy ones during it, and the probe
    # that succeeded; the failed probes were counted nowhere.
    decided = 2 + len(outage.healthy) + 1
    await check_recovered(running, watch, decided)
    assert await admitted_of(running, fresh_client, 3 * limit, "after the failover") == limit


class Outage:
    """What probe_until_recovered saw; times are seconds after the kill."""

    def __init__(self) -> None:
        self.promoted_after: float | None = None
        self.recovered_after: float | None = None
        self.probes: list[Any] = []
        self.healthy: list[Any] = []
        self.lenient: list[Any] = []
        # GetStats' connected field and the health of the entry "valkey", per probe.
        self.connected: list[bool] = []
        self.valkey_health: list[int] = []

    @property
    def probe_failures(self) -> int:
        return sum(not isinstance(o, pb.GenerateResponse) for o in self.probes)


async def probe_until_recovered(
    stub: pb_grpc.TokenFlowServiceStub,
    replica: Node,
    probe: str,
    probe_prompts: list[str],
    healthy_calls: list[tuple[str, str]],
    lenient_stub: pb_grpc.TokenFlowServiceStub,
    lenient_probe: str,
    channel: grpc.aio.Channel,
) -> Outage:
    """Send a call on the other primaries, a probe on the killed one and a
    probe to the server that fails open, and read GetStats and health, until
    a probe succeeds, noting when the replica became a primary."""
    outage = Outage()
    started = time.monotonic()
    async with redis_asyncio.Redis(port=replica.port, decode_responses=True) as replica_client:

        async def note_promotion() -> None:
            if outage.promoted_after is None and (await replica_client.role())[0] == "master":
                outage.promoted_after = time.monotonic() - started

        for attempt in range(1, len(probe_prompts)):
            if time.monotonic() - started > RECOVERY_DEADLINE_SECONDS:
                return outage
            await note_promotion()

            client, prompt = healthy_calls[attempt % len(healthy_calls)]
            outage.healthy.append(await send(stub, prompt, client))
            outage.lenient.append(await send(lenient_stub, probe_prompts[attempt], lenient_probe))
            stats = await stub.GetStats(pb.GetStatsRequest(), timeout=10)
            outage.connected.append(stats.connected)
            outage.valkey_health.append(await health_status(channel, "valkey"))
            probed = await send(stub, probe_prompts[attempt], probe)
            outage.probes.append(probed)
            if isinstance(probed, pb.GenerateResponse):
                outage.recovered_after = time.monotonic() - started
                # The replica may have been promoted since the last check.
                await note_promotion()
                return outage
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
    return outage


async def send(stub: pb_grpc.TokenFlowServiceStub, prompt: str, client: str) -> Any:
    """Send one Generate as client; return the response or the error."""
    try:
        return await stub.Generate(
            pb.GenerateRequest(prompt=prompt), metadata=forwarded(client), timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error


def failures(outcomes: list[Any]) -> list[str]:
    """Return the status and details of each call in outcomes that failed."""
    return [
        f"{o.code().name}: {o.details()}" for o in outcomes if isinstance(o, grpc.aio.AioRpcError)
    ]


def outcome_code(outcome: Any) -> grpc.StatusCode:
    if isinstance(outcome, grpc.aio.AioRpcError):
        return outcome.code()
    return grpc.StatusCode.OK


async def check_recovered(running: Running, watch: ActivityWatch, decided: int) -> None:
    """Check that events, GetStats and health work again after a failover.

    decided: the Generate calls admitted or rejected so far.
    """
    await running.client.generate("after the failover")
    prompts = []
    while "after the failover" not in prompts:
        prompts.append((await watch.next(RECOVERY_DEADLINE_SECONDS)).event.prompt)
    await watch.close()

    stats = await running.client.stats()
    channel = running.channel()
    await wait_for_health(channel, "valkey", SERVING, RECOVERY_DEADLINE_SECONDS)

    assert stats.connected
    assert stats.rate_limit.requests_total == decided + 1
    counted = stats.cache.hits + stats.cache.misses + stats.rate_limit.blocked_total
    assert counted == decided + 1
    assert await health_status(channel, "valkey") == SERVING


async def test_url_list_skips_dead_node(
    start_server: Any, valkey_cluster: LocalCluster
) -> None:
    """--valkey-url may list several nodes; the client starts from any that responds."""
    dead = f"127.0.0.1:{_free_ports(1)[0]}"
    live = valkey_cluster.url.removeprefix("redis://").split("/")[0]
    running: Running = await start_server(
        f"redis://{dead},{live}", valkey_cluster=True, rate_limit=2
    )

    first = await running.client.generate("through the second node")
    second = await running.client.generate("through the second node")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("through the second node")

    assert not first.response.cached
    assert second.response.cached
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
