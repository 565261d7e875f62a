"""The server as a whole: reflection, health, and the `tokenflow` command run as
subprocesses, including shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import CountingGenerator, Running, make_settings
from tests.helpers import ActivityWatch, free_port
from tokenflow_grpc.client import AsyncTokenFlowClient
from tokenflow_grpc.server import TokenFlowServer
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# The console script installed next to the Python running the tests.
TOKENFLOW = str(Path(sys.executable).parent / "tokenflow")
SERVICE_NAME = "tokenflow.v1.TokenFlowService"
REFLECTION_PATHS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
CLI_SECONDS = 60.0
VALKEY_URL_IN_LOG = re.compile(r"embedded Valkey started at redis://127\.0\.0\.1:(\d+)/")


async def reflect(
    channel: grpc.aio.Channel, path: str, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Send requests on one ServerReflectionInfo stream and return the responses."""
    info = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info(iter(requests), timeout=10.0)
    return [response async for response in call]


def first_file(
    response: reflection_pb2.ServerReflectionResponse,
) -> descriptor_pb2.FileDescriptorProto:
    """Parse the first file descriptor of a file_descriptor_response."""
    return descriptor_pb2.FileDescriptorProto.FromString(
        response.file_descriptor_response.file_descriptor_proto[0]
    )


@pytest.mark.parametrize("version", sorted(REFLECTION_PATHS))
async def test_reflection_lists_and_describes(running_valkey: Running, version: str) -> None:
    responses = await reflect(
        running_valkey.channel(),
        REFLECTION_PATHS[version],
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        ],
    )
    listing, tokenflow_file, reflection_file = responses
    services = {service.name for service in listing.list_services_response.service}
    tokenflow_proto = first_file(tokenflow_file)
    reflection_proto = first_file(reflection_file)

    assert len(responses) == 3
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1.ServerReflection" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert not tokenflow_file.HasField("error_response")
    assert tokenflow_proto.name == "tokenflow/v1/tokenflow.proto"
    assert [method.name for method in tokenflow_proto.service[0].method] == [
        "Generate",
        "GenerateStream",
        "GetStats",
        "Simulate",
        "WatchActivity",
    ]
    assert not reflection_file.HasField("error_response")
    assert reflection_proto.name == "grpc/reflection/v1/reflection.proto"
    assert reflection_proto.package == "grpc.reflection.v1"
    assert [service.name for service in reflection_proto.service] == ["ServerReflection"]


@pytest.mark.parametrize("service", ["", SERVICE_NAME, "valkey"])
async def test_health_serving(running_valkey: Running, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(running_valkey.channel())

    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_drain_timeout_ends_calls_as_counted(valkey_url: str) -> None:
    settings = make_settings(valkey_url, rate_limit=100)
    generator = CountingGenerator(latency=5.0)
    server = TokenFlowServer(settings, generator=generator)
    await server.start()
    other = TokenFlowServer(make_settings(valkey_url, key_prefix=settings.key_prefix))
    await other.start()
    try:
        async with AsyncTokenFlowClient(f"127.0.0.1:{server.port}", retries=5) as client:
            calling = asyncio.ensure_future(client.generate("too slow to drain", timeout=20))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await server.stop(grace=0.5)
            stop_seconds = time.monotonic() - started
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await calling
        async with AsyncTokenFlowClient(f"127.0.0.1:{other.port}") as observer:
            stats = await observer.stats()
    finally:
        await other.stop(0)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "it was already counted" in (caught.value.details() or "")
    # Not sent again: one call, one request counted, one generator run.
    assert stats.rate_limit.requests_total == 1
    assert len(generator.requests) == 1
    assert stop_seconds < 2.0


async def read_to_end(call: Any) -> list[int]:
    """Read a Health.Watch stream until it ends and return the statuses it sent."""
    statuses = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        statuses.append(reply.status)
    return statuses


async def test_health_watches_end_at_shutdown(valkey_url: str) -> None:
    server = TokenFlowServer(make_settings(valkey_url))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    services = ["", "valkey", "no.such.Service"]
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in services]
    try:
        first = [await watch.read() for watch in watches]
        started = time.monotonic()
        await server.stop(grace=10.0)
        stop_seconds = time.monotonic() - started
        rest = [await read_to_end(watch) for watch in watches]
        codes = [await watch.code() for watch in watches]
    finally:
        await channel.close()

    status = health_pb2.HealthCheckResponse
    assert [reply.status for reply in first] == [
        status.SERVING,
        status.SERVING,
        status.SERVICE_UNKNOWN,
    ]
    assert rest == [[status.NOT_SERVING], [status.NOT_SERVING], []]
    assert codes == [grpc.StatusCode.OK] * 3
    # Without an end, each open watch would hold the drain for the whole grace period.
    assert stop_seconds < 5.0


def child_pids(parent: int) -> list[int]:
    """Return the ids of the processes whose parent is parent, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in brackets and may contain spaces.
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def process_exists(pid: int) -> bool:
    """Return True while pid is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class ServeProcess:
    """A `tokenflow serve` subprocess with its own embedded Valkey."""

    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    # Processes the server had started once it was SERVING: its embedded Valkey.
    children: list[int] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> None:
        """Poll the health service until it reports SERVING, or fail with the log."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"tokenflow serve exited with {self.process.returncode}:\n{self.log}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"tokenflow serve not SERVING after {timeout} s:\n{self.log}")

    def valkey_port(self) -> int:
        match = VALKEY_URL_IN_LOG.search(self.log)
        if match is None:
            raise AssertionError(f"no embedded Valkey address in the log:\n{self.log}")
        return int(match.group(1))

    def stop(self, timeout: float = STOP_SECONDS) -> int:
        """Send SIGTERM and return the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Return a function that starts `tokenflow serve`. Teardown stops any still running."""
    started: list[ServeProcess] = []

    def start(data_dir: Path, *extra: str) -> ServeProcess:
        port = free_port()
        run_dir = tmp_path / f"run-{len(started)}"
        run_dir.mkdir()
        stdout_path, stderr_path = run_dir / "stdout.txt", run_dir / "stderr.txt"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    TOKENFLOW,
                    "serve",
                    "--grpc-address",
                    f"127.0.0.1:{port}",
                    "--data-dir",
                    str(data_dir),
                    "--http-address",
                    "127.0.0.1:0",
                    *extra,
                ],
                stdout=stdout,
                stderr=stderr,
                cwd=run_dir,
            )
        serving = ServeProcess(process, port, stdout_path, stderr_path)
        started.append(serving)
        serving.wait_ready()
        serving.children = child_pids(process.pid)
        return serving

    yield start

    for serving in started:
        if serving.process.poll() is None:
            serving.process.send_signal(signal.SIGTERM)
            try:
                serving.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                serving.process.kill()
                serving.process.wait(STOP_SECONDS)
        for pid in serving.children:
            if process_exists(pid):
                os.kill(pid, signal.SIGKILL)


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOKENFLOW, *arguments], capture_output=True, text=True, timeout=CLI_SECONDS, check=False
    )


def cli_json(*arguments: str) -> dict[str, Any]:
    """Run a client command that must succeed and return its parsed JSON output."""
    completed = run_cli(*arguments)
    if completed.returncode != 0:
        raise AssertionError(
            f"tokenflow {' '.join(arguments)} exited with {completed.returncode}: "
            f"{completed.stderr}"
        )
    parsed: dict[str, Any] = json.loads(completed.stdout)
    return parsed


def cli_json_lines(*arguments: str) -> list[dict[str, Any]]:
    """Run a client command that must succeed and return its JSON lines, parsed."""
    completed = run_cli(*arguments)
    if completed.returncode != 0:
        raise AssertionError(
            f"tokenflow {' '.join(arguments)} exited with {completed.returncode}: "
            f"{completed.stderr}"
        )
    return [json.loads(line) for line in completed.stdout.splitlines()]


def wait_until_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Poll until none of pids runs, and return the ones still running at the timeout."""
    deadline = time.monotonic() + timeout
    while any(process_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if process_exists(pid)]


def test_cli_end_to_end(serve: Any, tmp_path: Path) -> None:
    server: ServeProcess = serve(tmp_path / "data")
    target = ("--target", server.target)
    valkey_port = server.valkey_port()

    first = cli_json("generate", "What is a token bucket?", *target)
    second = cli_json("generate", "What is a token bucket?", *target)
    stats = cli_json("stats", *target)
    streamed = cli_json_lines(
        "generate", "--stream", "Stream a haiku", "--cache-ttl", "30", *target
    )
    streamed_again = cli_json_lines("generate", "--stream", "Stream a haiku", *target)
    simulated = cli_json("simulate", "--count", "20", *target)

    watcher = subprocess.Popen(
        [TOKENFLOW, "watch", "--count", "1", *target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The watch prints nothing when it subscribes, so probes are sent until
    # it has printed its one event and exited.
    probes: list[str] = []
    deadline = time.monotonic() + 30.0
    while watcher.poll() is None and time.monotonic() < deadline:
        probes.append(f"watch probe {len(probes)}")
        cli_json("generate", probes[-1], *target)
        try:
            watcher.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
    if watcher.poll() is None:
        watcher.kill()
    watch_output, watch_errors = watcher.communicate(timeout=5.0)
    watch_lines = watch_output.splitlines()
    watched = json.loads(watch_lines[0])["event"]
    printed = server.stdout_path.read_text()
    page_url = re.search(r"Web dashboard: (http://127\.0\.0\.1:\d+/)", printed)
    assert page_url is not None, printed
    with urllib.request.urlopen(page_url.group(1), timeout=10.0) as page:
        page_status, page_text = page.status, page.read().decode()

    exit_code = server.stop()
    still_running = wait_until_gone(server.children)

    assert first["response"]
    assert first["model"] == "tokenflow-sim-1"
    assert first.get("cached", False) is False
    assert first["rateLimit"]["limit"] == 10
    assert first["rateLimit"]["remaining"] == 9
    assert re.fullmatch(r"[0-9a-f]{64}", first["cacheKey"])
    assert second["cached"] is True
    assert second["response"] == first["response"]
    assert second["rateLimit"]["remaining"] == 8

    assert stats["connected"] is True
    assert stats["rateLimit"]["requestsTotal"] == "2"
    assert stats["cache"]["hits"] == "1"
    assert stats["cache"]["misses"] == "1"
    assert stats["cache"]["cachedKeys"] == "1"
    assert [event["type"] for event in stats["activity"]] == [
        "ACTIVITY_TYPE_CACHE_HIT",
        "ACTIVITY_TYPE_CACHE_MISS",
    ]

    deltas = [message["delta"] for message in streamed[:-1]]
    assert len(deltas) >= 1
    assert all(deltas)
    assert streamed[-1]["delta"] == ""
    assert streamed[-1]["cached"] is False
    assert streamed[-1]["rateLimit"]["remaining"] == 7
    assert streamed_again[-1]["cached"] is True
    assert "".join(message["delta"] for message in streamed_again) == "".join(deltas)

    summary = simulated["summary"]
    assert summary["total"] == 20
    assert summary.get("successful", 0) + summary.get("blocked", 0) == 20
    assert summary.get("failed", 0) == 0
    assert len(simulated["results"]) == 20

    assert watcher.returncode == 0, watch_errors
    assert len(watch_lines) == 1
    assert watched["prompt"] in probes
    assert watched["type"] == "ACTIVITY_TYPE_CACHE_MISS"
    assert watched["client"] == "127.0.0.1"

    assert page_status == 200
    assert "<title>TokenFlow dashboard</title>" in page_text

    assert exit_code == 0
    assert f"TokenFlow is serving gRPC on {server.target}" in server.stdout_path.read_text()
    assert "TokenFlow stopped" in server.log
    # The embedded Valkey and the gateway.
    assert len(server.children) == 2
    assert still_running == []
    assert not port_accepts(valkey_port)


def test_cli_restart_keeps_data(serve: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first_server: ServeProcess = serve(data_dir)
    first = cli_json("generate", "Kept across restarts", "--target", first_server.target)
    first_stats = cli_json("stats", "--target", first_server.target)
    first_exit = first_server.stop()

    second_server: ServeProcess = serve(data_dir)
    second_stats = cli_json("stats", "--target", second_server.target)
    again = cli_json("generate", "Kept across restarts", "--target", second_server.target)
    second_exit = second_server.stop()

    assert first_exit == 0
    assert second_exit == 0
    assert first_stats["rateLimit"]["requestsTotal"] == "1"
    assert second_stats["rateLimit"]["requestsTotal"] == "1"
    assert second_stats["cache"]["misses"] == "1"
    assert second_stats["cache"]["cachedKeys"] == "1"
    assert again["cached"] is True
    assert again["response"] == first["response"]
    # The rate-limit window (60 s by default) survives the restart too.
    assert again["rateLimit"]["remaining"] == 8


async def test_sigterm_drains_generate(serve: Any, tmp_path: Path) -> None:
    server: ServeProcess = serve(tmp_path / "data", "--generator-latency", "0.5")
    channel = grpc.aio.insecure_channel(server.target)
    try:
        watch = await ActivityWatch.open(channel)
        stub = pb_grpc.TokenFlowServiceStub(channel)
        call = stub.Generate(pb.GenerateRequest(prompt="drain me"), timeout=10.0)
        generating = asyncio.ensure_future(call)

        # The event is recorded before the generator runs, so once it arrives
        # the call is inside the generator's 0.5 s.
        started = (await watch.next()).event
        in_flight = not generating.done()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        response = await asyncio.wait_for(generating, 10.0)
        exit_code = await asyncio.to_thread(server.process.wait, STOP_SECONDS)
        stop_seconds = time.monotonic() - signalled
        await asyncio.wait_for(watch.ended.wait(), 5.0)
    finally:
        await channel.close()
    print(f"SIGTERM to exit with one Generate in flight: {stop_seconds:.3f} s")

    assert started.prompt == "drain me"
    assert in_flight
    assert response.response
    assert response.cached is False
    assert response.HasField("rate_limit")
    assert exit_code == 0
    assert stop_seconds < 5.0
    assert "TokenFlow stopped" in server.log
    # Watch streams end with UNAVAILABLE at shutdown, so clients know to reconnect.
    assert watch.error is not None
    assert watch.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "since_id" in (watch.error.details() or "")


# SIGTERM with many Generate calls in flight.
DRAIN_CLIENTS = 20
DRAIN_CALLS_PER_CLIENT = 6
DRAIN_RATE_LIMIT = 5
DRAIN_LATENCY_SECONDS = 0.5
# Calls sent after the signal, which the stopping server must reject
# without running them.
LATE_CALLS = 20
# Identical calls from one more client: one generates, the others wait for
# its cache entry, so the drain must keep Valkey until they have read it.
SHARED_CALLS = 4
SHARED_CLIENT = "198.51.100.200"


async def outcome_of(call: Any) -> str:
    """Await a Generate call and return "OK" or its status code name."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def wait_for_requests(stub: pb_grpc.TokenFlowServiceStub, count: int) -> None:
    """Poll GetStats until the server has counted count requests."""
    deadline = time.monotonic() + 20.0
    while True:
        stats = await stub.GetStats(pb.GetStatsRequest(), timeout=5.0)
        if stats.rate_limit.requests_total >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{stats.rate_limit.requests_total} of {count} requests counted")
        await asyncio.sleep(0.02)


async def wait_until_rejecting(channel: grpc.aio.Channel) -> None:
    """Call Health.Check until the stopping server rejects new calls.

    The server reports NOT_SERVING before it stops taking calls, so only a
    call that fails with UNAVAILABLE shows that the next one will be refused.
    """
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return
            raise
        if time.monotonic() > deadline:
            raise AssertionError("the server still takes calls 10 s after SIGTERM")
        await asyncio.sleep(0.01)


async def test_sigterm_under_load_loses_nothing(serve: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server: ServeProcess = serve(
        data_dir,
        "--generator-latency",
        str(DRAIN_LATENCY_SECONDS),
        "--rate-limit",
        str(DRAIN_RATE_LIMIT),
    )
    channel = grpc.aio.insecure_channel(server.target)
    try:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        watch = await ActivityWatch.open(channel)
        calls = [
            stub.Generate(
                pb.GenerateRequest(prompt=f"drain {client}-{n}"),
                metadata=(("x-forwarded-for", f"198.51.100.{client + 1}"),),
                timeout=30.0,
            )
            for client in range(DRAIN_CLIENTS)
            for n in range(DRAIN_CALLS_PER_CLIENT)
        ]
        outcomes = asyncio.gather(*(outcome_of(call) for call in calls))
        # Each call records its event before it generates, so once every
        # event has arrived every call is inside the server.
        await watch.take(len(calls), timeout=20.0)
        shared = [
            stub.Generate(
                pb.GenerateRequest(prompt="drain shared"),
                metadata=(("x-forwarded-for", SHARED_CLIENT),),
                timeout=30.0,
            )
            for _ in range(SHARED_CALLS)
        ]
        shared_outcomes = asyncio.gather(*(outcome_of(call) for call in shared))
        # A waiter records its event only once it has the response, but it is
        # counted as a request as soon as it is admitted.
        await wait_for_requests(stub, len(calls) + SHARED_CALLS)
        in_flight = sum(not call.done() for call in [*calls, *shared])
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await wait_until_rejecting(channel)
        late = [
            outcome_of(stub.Generate(pb.GenerateRequest(prompt=f"late {n}"), timeout=10.0))
            for n in range(LATE_CALLS)
        ]
        results = await outcomes
        shared_results = await shared_outcomes
        late_results = await asyncio.gather(*late)
        exit_code = await asyncio.to_thread(server.process.wait, STOP_SECONDS)
        stop_seconds = time.monotonic() - signalled
    finally:
        await channel.close()

    restarted: ServeProcess = serve(data_dir)
    stats = cli_json("stats", "--target", restarted.target)
    admitted = DRAIN_CLIENTS * DRAIN_RATE_LIMIT
    blocked = len(calls) - admitted
    counters = stats["rateLimit"]["requestsTotal"], stats["rateLimit"].get("blockedTotal", "0")
    print(
        f"SIGTERM with {in_flight} of {len(calls) + SHARED_CALLS} Generate calls in flight: "
        f"exit after {stop_seconds:.3f} s; outcomes {sorted(set(results))}, late calls "
        f"{sorted(set(late_results))}; after a restart {counters[0]} requests and "
        f"{counters[1]} blocked are counted"
    )

    assert in_flight >= admitted + SHARED_CALLS
    assert results.count("OK") == admitted
    assert results.count("RESOURCE_EXHAUSTED") == blocked
    assert shared_results == ["OK"] * SHARED_CALLS
    assert set(late_results) == {"UNAVAILABLE"}
    assert exit_code == 0
    assert int(stats["rateLimit"]["requestsTotal"]) == len(calls) + SHARED_CALLS
    assert int(stats["cache"].get("misses", 0)) == admitted + 1
    assert int(stats["cache"].get("hits", 0)) == SHARED_CALLS - 1
    assert int(stats["rateLimit"]["blockedTotal"]) == blocked
    # Every generated response was stored before the server closed Valkey.
    assert int(stats["cache"]["cachedKeys"]) == admitted + 1
