"""The Python clients: deadlines, retries on UNAVAILABLE only (and for
streams only before the first message), rate-limit errors, metadata and TLS,
and watch() resuming across a server restart."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import CountingGenerator, Running, make_settings
from tests.helpers import free_port
from tokenflow_grpc.client import (
    AsyncTokenFlowClient,
    RateLimitExceeded,
    TokenFlowClient,
    backoff_delay,
    retry_delay,
)
from tokenflow_grpc.server import TokenFlowServer
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


@dataclass
class Scripted(pb_grpc.TokenFlowServiceServicer):
    """A Generate that fails with the scripted codes first, recording each call."""

    failures: list[grpc.StatusCode]
    calls: list[dict[str, str]] = field(default_factory=list)
    # GenerateStream fails with this code after its first delta.
    fail_after_first: grpc.StatusCode | None = None
    # Trailing metadata of every scripted failure; TokenFlow's own handlers
    # always send x-request-id.
    trailing: tuple[tuple[str, Any], ...] = ()

    async def fail_if_scripted(self, context: Any) -> None:
        self.calls.append(dict(context.invocation_metadata()))
        if self.failures:
            await context.abort(self.failures.pop(0), "scripted failure", self.trailing)

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        await self.fail_if_scripted(context)
        return pb.GenerateResponse(response=f"echo {request.prompt}")

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        await self.fail_if_scripted(context)
        return pb.GetStatsResponse(connected=True)

    async def Simulate(self, request: pb.SimulateRequest, context: Any) -> pb.SimulateResponse:
        await self.fail_if_scripted(context)
        return pb.SimulateResponse()

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self.fail_if_scripted(context)
        yield pb.GenerateStreamResponse(delta="echo ")
        if self.fail_after_first is not None:
            await context.abort(self.fail_after_first, "scripted failure mid-stream")
        yield pb.GenerateStreamResponse(delta=request.prompt)
        yield pb.GenerateStreamResponse(model="scripted")


@pytest.fixture
async def scripted_server() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []

    async def start(
        failures: list[grpc.StatusCode], credentials: Any = None
    ) -> tuple[Scripted, str]:
        servicer = Scripted(list(failures))
        server = grpc.aio.server()
        pb_grpc.add_TokenFlowServiceServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


async def test_retries_unavailable_then_succeeds(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE] * 2)
    async with AsyncTokenFlowClient(target, retries=3) as client:
        reply = await client.generate("hello")

    assert reply.response.response == "echo hello"
    assert len(servicer.calls) == 3


async def test_other_codes_not_retried(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.INTERNAL])
    async with AsyncTokenFlowClient(target, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("hello")

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert len(servicer.calls) == 1


async def test_retries_stop_after_limit(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE] * 5)
    async with AsyncTokenFlowClient(target, retries=2) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("hello")

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.calls) == 3


async def test_sync_client_retries_unavailable(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE])

    def call() -> str:
        with TokenFlowClient(target, retries=2) as client:
            return client.generate("sync").response.response

    # The sync client blocks, so it runs in a thread while the server runs here.
    text = await asyncio.to_thread(call)

    assert text == "echo sync"
    assert len(servicer.calls) == 2


async def test_stream_retries_unavailable_before_first_message(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE] * 2)
    async with AsyncTokenFlowClient(target, retries=3) as client:
        messages = [message async for message in client.generate_stream("hello")]

    assert [message.delta for message in messages] == ["echo ", "hello", ""]
    assert messages[-1].model == "scripted"
    assert len(servicer.calls) == 3


async def test_stream_not_retried_after_a_message(scripted_server: Any) -> None:
    servicer, target = await scripted_server([])
    servicer.fail_after_first = grpc.StatusCode.UNAVAILABLE
    deltas: list[str] = []
    async with AsyncTokenFlowClient(target, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in client.generate_stream("hello"):
                deltas.append(message.delta)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert deltas == ["echo "]
    assert len(servicer.calls) == 1


async def test_sync_stream_retries_only_before_first_message(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE])

    def call() -> tuple[list[str], grpc.StatusCode | None]:
        with TokenFlowClient(target, retries=2) as client:
            deltas = [message.delta for message in client.generate_stream("sync")]
            servicer.fail_after_first = grpc.StatusCode.UNAVAILABLE
            try:
                for _ in client.generate_stream("again"):
                    pass
            except grpc.RpcError as error:
                return deltas, error.code() if isinstance(error, grpc.Call) else None
        return deltas, None

    deltas, code = await asyncio.to_thread(call)

    assert deltas == ["echo ", "sync", ""]
    assert code == grpc.StatusCode.UNAVAILABLE
    # One retried call for the first stream, one unretried call for the second.
    assert len(servicer.calls) == 3


ANSWERED = (("x-request-id", "answered-by-the-handler"),)


def retry_info(seconds: int) -> tuple[tuple[str, Any], ...]:
    """Trailing metadata carrying google.rpc.RetryInfo, as the server sends it."""
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="busy")
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))
    )
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def test_generate_not_retried_when_the_handler_answered(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE] * 2)
    servicer.trailing = ANSWERED
    async with AsyncTokenFlowClient(target, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("counted once")
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in client.generate_stream("counted once"):
                pass

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.calls) == 2


async def test_stats_retried_even_when_answered(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE] * 2)
    servicer.trailing = ANSWERED
    async with AsyncTokenFlowClient(target, retries=3) as client:
        stats = await client.stats()

    assert stats.connected
    assert len(servicer.calls) == 3


async def test_simulate_never_retried(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE])
    async with AsyncTokenFlowClient(target, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.simulate(10)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.calls) == 1


async def test_retry_waits_the_delay_the_server_asks_for(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE])
    servicer.trailing = retry_info(1)
    started = time.monotonic()
    async with AsyncTokenFlowClient(target, retries=3) as client:
        reply = await client.generate("after a second", timeout=5.0)
    waited = time.monotonic() - started

    assert reply.response.response == "echo after a second"
    assert len(servicer.calls) == 2
    assert waited >= 1.0


async def test_no_retry_when_the_delay_passes_the_deadline(scripted_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.UNAVAILABLE])
    servicer.trailing = retry_info(30)
    started = time.monotonic()
    async with AsyncTokenFlowClient(target, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("not worth waiting", timeout=5.0)

    assert time.monotonic() - started < 1.0
    assert retry_delay(caught.value) == 30.0
    assert len(servicer.calls) == 1


async def test_sync_client_codes_and_deadline(scripted_server: Any, start_server: Any) -> None:
    servicer, target = await scripted_server([grpc.StatusCode.INTERNAL])
    running = await start_server("memory://sync-deadline", generator=CountingGenerator(latency=2.0))

    def calls() -> tuple[Any, Any, float]:
        with TokenFlowClient(target, retries=3) as client:
            try:
                client.generate("internal")
            except grpc.RpcError as error:
                internal = error
        with TokenFlowClient(running.address) as client:
            started = time.monotonic()
            try:
                client.generate("too slow", timeout=0.3)
            except grpc.RpcError as error:
                late = error
            return internal, late, time.monotonic() - started

    internal, late, seconds = await asyncio.to_thread(calls)

    assert internal.code() == grpc.StatusCode.INTERNAL
    assert len(servicer.calls) == 1
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seconds < 1.5


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), 1e10])
async def test_timeout_out_of_range_rejected(scripted_server: Any, timeout: float) -> None:
    servicer, target = await scripted_server([])
    async with AsyncTokenFlowClient(target) as client:
        with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
            await client.generate("no usable deadline", timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
            async for _ in client.watch(since_id="1-0", timeout=timeout):
                pass

    assert servicer.calls == []


async def test_size_rejection_is_not_a_rate_limit(running_valkey: Running) -> None:
    # gRPC itself rejects a message over the server's limit with RESOURCE_EXHAUSTED.
    async with AsyncTokenFlowClient(running_valkey.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("x" * (running_valkey.settings.max_message_bytes + 1))

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not isinstance(caught.value, RateLimitExceeded)


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(attempt) for attempt in range(8)]

    assert 0.05 <= delays[0] <= 0.1
    assert 0.1 <= delays[1] <= 0.2
    assert all(1.0 <= delay <= 2.0 for delay in delays[5:])


async def test_deadline_applies(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, generator=CountingGenerator(latency=2.0))
    async with AsyncTokenFlowClient(running.address, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("slow")
        elapsed = time.monotonic() - started

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5


async def test_retry_while_server_restarts(valkey_url: str) -> None:
    port = free_port()
    settings = make_settings(valkey_url, grpc_address=f"127.0.0.1:{port}")
    first = TokenFlowServer(settings)
    await first.start()
    await first.stop(0)

    async with AsyncTokenFlowClient(f"127.0.0.1:{port}", timeout=10, retries=20) as client:
        pending = asyncio.ensure_future(client.generate("through a restart"))
        await asyncio.sleep(0.3)  # Let the first attempts fail against the closed port.
        assert not pending.done()
        second = TokenFlowServer(settings)
        await second.start()
        try:
            reply = await pending
        finally:
            await second.stop(0)

    assert reply.response.response
    assert reply.rate_limit.remaining == 9


async def test_rate_limit_error_carries_figures(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=2)
    async with AsyncTokenFlowClient(running.address) as client:
        first = await client.generate("a")
        await client.generate("b")
        with pytest.raises(RateLimitExceeded) as caught:
            await client.generate("c")

    assert first.rate_limit.limit == 2
    assert first.rate_limit.remaining == 1
    assert first.rate_limit.window_seconds == 60
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.rate_limit.remaining == 0
    assert error.rate_limit.limit == 2
    assert error.retry_after is not None
    assert 0 < error.retry_after <= 60
    assert error.rate_limit.retry_after_seconds is not None


async def test_stream_against_server(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=3)
    async with AsyncTokenFlowClient(running.address) as client:
        streamed = [
            message
            async for message in client.generate_stream(
                "stream this", cache_ttl=30, cache_namespace="team-a"
            )
        ]
        unary = await client.generate("stream this", cache_namespace="team-a")
        other_namespace = await client.generate("stream this")
        with pytest.raises(RateLimitExceeded) as caught:
            async for _ in client.generate_stream("one too many"):
                pass

    last = streamed[-1]
    text = "".join(message.delta for message in streamed)
    assert len(streamed) >= 2
    assert last.delta == ""
    assert last.cached is False
    assert text == unary.response.response
    assert unary.response.cached is True
    assert other_namespace.response.cached is False
    assert last.rate_limit.limit == 3
    assert last.rate_limit.remaining == 2
    assert last.usage.total_tokens > 0
    ttl = await running.core.redis.ttl(running.core.keys.cache(last.cache_key))
    assert 25 <= ttl <= 30
    assert caught.value.rate_limit.remaining == 0
    assert caught.value.retry_after is not None


async def test_sync_client_against_server(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=2)

    def session() -> tuple[Any, Any, Any]:
        with TokenFlowClient(running.address) as client:
            first = client.generate("sync one")
            client.generate("sync one")
            try:
                client.generate("sync two")
            except RateLimitExceeded as error:
                rejected = error
            return first, client.stats(), rejected

    first, stats, rejected = await asyncio.to_thread(session)

    assert first.response.cached is False
    assert stats.cache.hits == 1
    assert rejected.retry_after is not None
    assert rejected.rate_limit.remaining == 0


async def test_api_key_and_metadata_sent(scripted_server: Any) -> None:
    servicer, target = await scripted_server([])
    async with AsyncTokenFlowClient(
        target, metadata=[("x-team", "search")], api_key="secret-key"
    ) as client:
        await client.generate("with a key", metadata=[("x-request-id", "r-1")])

    sent = servicer.calls[0]
    assert sent["authorization"] == "Bearer secret-key"
    assert sent["x-team"] == "search"
    assert sent["x-request-id"] == "r-1"


def self_signed_certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


async def test_tls_round_trip(scripted_server: Any) -> None:
    certificate, key = self_signed_certificate()
    server_credentials = grpc.ssl_server_credentials([(key, certificate)])
    _, target = await scripted_server([], credentials=server_credentials)
    port = target.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    async with AsyncTokenFlowClient(
        f"localhost:{port}", credentials=credentials, retries=0
    ) as client:
        reply = await client.generate("over TLS")

    assert reply.response.response == "echo over TLS"


async def test_watch_resumes_across_restart(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenflow_grpc.client")
    port = free_port()
    settings = make_settings(valkey_url, grpc_address=f"127.0.0.1:{port}", rate_limit=100)
    # A second server on the same Valkey and prefix records events while the
    # first is down, as another replica would.
    other = TokenFlowServer(make_settings(valkey_url, key_prefix=settings.key_prefix))
    server = TokenFlowServer(settings)
    await server.start()
    await other.start()
    received: list[str] = []
    try:
        async with (
            AsyncTokenFlowClient(f"127.0.0.1:{port}", retries=50) as client,
            AsyncTokenFlowClient(f"127.0.0.1:{other.port}") as producer,
        ):
            stream = client.watch()

            async def collect(count: int) -> None:
                async for response in stream:
                    received.append(response.event.prompt)
                    if len(received) == count:
                        return

            collecting = asyncio.ensure_future(collect(6))
            await _wait_for_watcher(server)
            for n in range(3):
                await producer.generate(f"before {n}")
            await _wait_until(lambda: len(received) == 3)

            await server.stop(0.5)
            for n in range(3):
                await producer.generate(f"during {n}")
            server = TokenFlowServer(settings)
            await server.start()
            await asyncio.wait_for(collecting, 20)
    finally:
        await server.stop(0)
        await other.stop(0)

    assert received == [f"before {n}" for n in range(3)] + [f"during {n}" for n in range(3)]
    reconnects = [r.getMessage() for r in caplog.records if r.name == "tokenflow_grpc.client"]
    assert reconnects
    assert all(message.startswith("watch stream lost (UNAVAILABLE") for message in reconnects)


async def _wait_for_watcher(server: TokenFlowServer) -> None:
    await _wait_until(lambda: server.core.hub.watcher_count == 1)


async def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_sync_watch_yields_events(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url)

    def follow() -> list[str]:
        with TokenFlowClient(running.address) as client:
            prompts = []
            for response in client.watch(timeout=20):
                prompts.append(response.event.prompt)
                if len(prompts) == 2:
                    return prompts
        return prompts

    following = asyncio.ensure_future(asyncio.to_thread(follow))
    await _wait_for_watcher(running.server)
    await running.client.generate("sync watch one")
    await running.client.generate("sync watch two")

    assert await asyncio.wait_for(following, 20) == ["sync watch one", "sync watch two"]


async def test_watch_timeout_ends_iteration(running_valkey: Any) -> None:
    received = [item async for item in running_valkey.client.watch(timeout=0.5)]

    assert received == []
