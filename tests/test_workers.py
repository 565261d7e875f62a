"""`tokenflow serve --workers N`: several server processes on one port,
supervised by a parent, tested as real processes on loopback sockets."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.cluster import LocalCluster
from tests.conftest import make_settings
from tests.helpers import ActivityWatch, wait_until
from tests.test_server import TOKENFLOW, child_pids, port_accepts, process_exists, wait_until_gone
from tokenflow_grpc import workers
from tokenflow_grpc.server import WORKER_METADATA_KEY, TokenFlowServer
from tokenflow_grpc.settings import settings_values
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc
from tokenflow_grpc.workers import WorkerProcess, reserve_port

STARTUP_SECONDS = 60.0
# Workers drain for up to 10 s and the parent kills them 5 s after that.
STOP_SECONDS = 20.0
SERVING_LINE = re.compile(r"TokenFlow is serving gRPC on 127\.0\.0\.1:(\d+) with (\d+) workers")
GATEWAY_LINE = re.compile(r"serving HTTP on http://127\.0\.0\.1:(\d+)")
STARTED_LINE = re.compile(r"worker (\d+) (?:started|restarted) as pid (\d+)")
VALKEY_LINE = re.compile(r"embedded Valkey started at redis://127\.0\.0\.1:(\d+)/")
# Separate subchannel pools make each channel open its own TCP connection,
# which the kernel hands to one of the workers.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass
class Pool:
    """A `tokenflow serve --workers N` process and the files it writes its output to."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    port: int = 0
    # Every child seen so far (workers, gateway, Valkey), for the teardown.
    children: set[int] = field(default_factory=set)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """Return the latest pid of each worker index, from the parent's log."""
        return {int(index): int(pid) for index, pid in STARTED_LINE.findall(self.log)}

    def record_children(self) -> list[int]:
        pids = child_pids(self.process.pid)
        self.children.update(pids)
        return pids

    def wait_for_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll stdout until pattern matches, or fail with the log."""
        return self._wait_for(lambda: self.output, pattern, timeout)

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        return self._wait_for(lambda: self.log, pattern, timeout)

    def _wait_for(self, read: Any, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(read()):
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no match for {pattern.pattern!r} (exit code {self.process.poll()}); "
            f"output:\n{self.output}\nlog:\n{self.log}"
        )


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[Any]:
    """Return a function that starts `tokenflow serve` with the given options and
    returns once it printed its address. Teardown stops it and its children."""
    started: list[Pool] = []

    def start(*options: str) -> Pool:
        run_dir = tmp_path / f"pool-{len(started)}"
        run_dir.mkdir()
        stdout_path, stderr_path = run_dir / "stdout.txt", run_dir / "stderr.txt"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    TOKENFLOW,
                    "serve",
                    "--grpc-address",
                    "127.0.0.1:0",
                    "--http-address",
                    "127.0.0.1:0",
                    "--data-dir",
                    str(run_dir / "data"),
                    *options,
                ],
                stdout=stdout,
                stderr=stderr,
                cwd=run_dir,
            )
        pool = Pool(process, stdout_path, stderr_path)
        started.append(pool)
        pool.port = int(pool.wait_for_output(SERVING_LINE, STARTUP_SECONDS).group(1))
        if "--no-gateway" not in options:
            pool.wait_for_output(GATEWAY_LINE, STARTUP_SECONDS)
        pool.record_children()
        return pool

    yield start

    for pool in started:
        if pool.process.poll() is None:
            pool.record_children()
            pool.process.send_signal(signal.SIGTERM)
            try:
                pool.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                pool.process.kill()
                pool.process.wait(STOP_SECONDS)
        for pid in pool.children:
            if process_exists(pid):
                os.kill(pid, signal.SIGKILL)


async def generate(
    channel: grpc.aio.Channel, prompt: str, wait_for_ready: bool = False
) -> tuple[grpc.StatusCode, int]:
    """Send one Generate and return its status code and the pid of the worker that handled it."""
    stub = pb_grpc.TokenFlowServiceStub(channel)
    call = stub.Generate(
        pb.GenerateRequest(prompt=prompt), timeout=60.0, wait_for_ready=wait_for_ready
    )
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), int(error.trailing_metadata()[WORKER_METADATA_KEY])
    trailers = await call.trailing_metadata()
    return grpc.StatusCode.OK, int(trailers[WORKER_METADATA_KEY])


async def generate_on_new_connection(target: str, prompt: str) -> tuple[grpc.StatusCode, int]:
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        return await generate(channel, prompt, wait_for_ready=True)


async def test_worker_id_in_trailing_metadata(valkey_url: str) -> None:
    server = TokenFlowServer(
        make_settings(valkey_url, rate_limit=1), reuse_port=True, worker_id="4242"
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TokenFlowServiceStub(channel)
            allowed = stub.Generate(pb.GenerateRequest(prompt="which worker"), timeout=10.0)
            await allowed
            allowed_trailers = await allowed.trailing_metadata()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(pb.GenerateRequest(prompt="which worker"), timeout=10.0)
    finally:
        await server.stop(grace=1.0)

    rejected_trailers = caught.value.trailing_metadata()
    assert allowed_trailers[WORKER_METADATA_KEY] == "4242"
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejected_trailers[WORKER_METADATA_KEY] == "4242"
    assert rejected_trailers["retry-after"]


async def test_single_server_sends_no_worker_id(valkey_url: str) -> None:
    server = TokenFlowServer(make_settings(valkey_url))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TokenFlowServiceStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt="no worker"), timeout=10.0)
            await call
            trailers = await call.trailing_metadata()
    finally:
        await server.stop(grace=1.0)

    assert WORKER_METADATA_KEY not in trailers


def test_reserved_port_is_free_and_refuses() -> None:
    reserved = reserve_port("127.0.0.1:0")
    try:
        port = reserved.getsockname()[1]
        accepts = port_accepts(port)
        with pytest.raises(OSError):
            # A server without SO_REUSEPORT cannot take the reserved port.
            with socket.socket() as other:
                other.bind(("127.0.0.1", port))
                other.listen()
    finally:
        reserved.close()

    assert port != 0
    assert not accepts


def test_reserve_fails_on_listening_port() -> None:
    with socket.socket() as listening:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]

        with pytest.raises(OSError):
            reserve_port(f"127.0.0.1:{port}").close()


@pytest.fixture(params=["valkey", "cluster"])
def shared_valkey(request: pytest.FixtureRequest, valkey_url: str) -> list[str]:
    """The options of `serve` for the session's Valkey or its Valkey Cluster."""
    if request.param == "valkey":
        return ["--valkey-url", valkey_url]
    cluster: LocalCluster = request.getfixturevalue("valkey_cluster")
    return ["--valkey-url", cluster.url, "--valkey-cluster"]


async def test_limit_exact_across_workers(start_pool: Any, shared_valkey: list[str]) -> None:
    limit, calls, connections = 50, 400, 100
    pool: Pool = await asyncio.to_thread(
        start_pool,
        "--workers",
        "4",
        *shared_valkey,
        "--key-prefix",
        f"test-{uuid.uuid4().hex[:12]}",
        "--rate-limit",
        str(limit),
        "--no-gateway",
        # Under the default allow policy a Valkey timeout on a loaded machine
        # admits a call without the limit; deny makes any such error visible.
        "--on-valkey-error",
        "deny",
        "--valkey-timeout",
        "10",
    )
    channels = [
        grpc.aio.insecure_channel(pool.target, options=OWN_CONNECTION) for _ in range(connections)
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30.0) for c in channels))
        outcomes = await asyncio.gather(
            *(generate(channels[i % connections], f"prompt {i % 8}") for i in range(calls))
        )
        stats = await pb_grpc.TokenFlowServiceStub(channels[0]).GetStats(
            pb.GetStatsRequest(), timeout=10.0
        )
    finally:
        for channel in channels:
            await channel.close()

    codes = collections.Counter(code for code, _ in outcomes)
    answered_by = collections.Counter(pid for _, pid in outcomes)
    admitted_by = collections.Counter(pid for code, pid in outcomes if code == grpc.StatusCode.OK)
    print(f"calls per worker pid: {dict(answered_by)}; admitted: {dict(admitted_by)}")

    assert codes[grpc.StatusCode.OK] == limit
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] == calls - limit
    assert sum(codes.values()) == calls
    assert set(answered_by) == set(pool.worker_pids().values())
    assert len(answered_by) == 4
    assert stats.rate_limit.requests_total == calls
    assert stats.rate_limit.blocked_total == calls - limit
    assert stats.cache.hits + stats.cache.misses == limit
    assert stats.cache.hits + stats.cache.misses + stats.rate_limit.blocked_total == calls


async def test_killed_worker_restarted(start_pool: Any, valkey_url: str) -> None:
    pool: Pool = await asyncio.to_thread(
        start_pool,
        "--workers",
        "2",
        "--valkey-url",
        valkey_url,
        "--no-gateway",
        "--key-prefix",
        f"test-{uuid.uuid4().hex[:12]}",
        "--rate-limit",
        "100000",
    )
    before = pool.worker_pids()
    victim = before[1]

    os.kill(victim, signal.SIGKILL)
    during = [await generate_on_new_connection(pool.target, f"while down {i}") for i in range(20)]
    restarted = await asyncio.to_thread(
        pool.wait_for_log, re.compile(r"worker 1 restarted as pid (\d+)")
    )
    successor = int(restarted.group(1))
    children = pool.record_children()
    answered_by_successor = False
    for attempt in range(200):
        _, pid = await generate_on_new_connection(pool.target, f"after restart {attempt}")
        if pid == successor:
            answered_by_successor = True
            break

    assert [code for code, _ in during] == [grpc.StatusCode.OK] * 20
    assert {pid for _, pid in during} <= {before[2], successor}
    assert f"worker 1 (pid {victim}) was killed by SIGKILL" in pool.log
    assert successor != victim
    assert successor in children
    assert before[2] in children
    assert not process_exists(victim)
    assert answered_by_successor


async def test_sigterm_stops_every_process(start_pool: Any) -> None:
    pool: Pool = await asyncio.to_thread(start_pool, "--workers", "2", "--generator-latency", "0.5")
    children = pool.record_children()
    valkey_port = int(VALKEY_LINE.search(pool.log).group(1))  # type: ignore[union-attr]
    gateway_port = int(GATEWAY_LINE.search(pool.output).group(1))  # type: ignore[union-attr]
    worker_pids = set(pool.worker_pids().values())

    channel = grpc.aio.insecure_channel(pool.target)
    try:
        watch = await ActivityWatch.open(channel)
        stub = pb_grpc.TokenFlowServiceStub(channel)
        generating = asyncio.ensure_future(
            stub.Generate(pb.GenerateRequest(prompt="drain me"), timeout=10.0)
        )
        # The event is recorded before the generator runs, so once it arrives
        # the call is inside the generator's 0.5 s.
        started = (await watch.next()).event
        in_flight = not generating.done()
        pool.process.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(generating, 15.0)
        exit_code = await asyncio.to_thread(pool.process.wait, STOP_SECONDS)
    finally:
        await channel.close()
    still_running = await asyncio.to_thread(wait_until_gone, children)
    log = pool.log

    assert started.prompt == "drain me"
    assert in_flight
    assert response.response
    assert exit_code == 0
    # Two workers, the gateway and the embedded Valkey.
    assert len(children) == 4
    assert worker_pids <= set(children)
    assert still_running == []
    assert len(SERVING_LINE.findall(pool.output)) == 1
    assert log.count("TokenFlow stopped") == 2
    assert log.index("all 2 workers stopped") < log.index("gateway stopped")
    assert log.index("gateway stopped") < log.index("embedded Valkey stopped")
    assert not port_accepts(pool.port)
    assert not port_accepts(gateway_port)
    assert not port_accepts(valkey_port)


async def test_second_sigint_cancels_calls(start_pool: Any, valkey_url: str) -> None:
    pool: Pool = await asyncio.to_thread(
        start_pool,
        "--workers",
        "2",
        "--valkey-url",
        valkey_url,
        "--no-gateway",
        "--generator-latency",
        "30",
    )
    children = pool.record_children()
    channel = grpc.aio.insecure_channel(pool.target)
    try:
        watch = await ActivityWatch.open(channel)
        stub = pb_grpc.TokenFlowServiceStub(channel)
        generating = asyncio.ensure_future(
            stub.Generate(pb.GenerateRequest(prompt="cancel me"), timeout=60.0)
        )
        await watch.next()
        signalled = time.monotonic()
        pool.process.send_signal(signal.SIGINT)
        # Signals of one kind do not queue, so the second waits until both
        # workers have handled the first.
        both_draining = await wait_until(
            lambda: pool.log.count("received SIGTERM: draining calls") == 2, timeout=20.0
        )
        pool.process.send_signal(signal.SIGINT)
        exit_code = await asyncio.to_thread(pool.process.wait, STOP_SECONDS)
        stop_seconds = time.monotonic() - signalled
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(generating, 5.0)
    finally:
        await channel.close()
    still_running = await asyncio.to_thread(wait_until_gone, children)

    assert both_draining
    assert exit_code == 0
    assert stop_seconds < 10.0
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert "received SIGINT again" in pool.log
    assert still_running == []


def test_embedded_valkey_restarted(start_pool: Any) -> None:
    pool: Pool = start_pool("--workers", "2", "--no-gateway")
    valkey_port = int(VALKEY_LINE.search(pool.log).group(1))  # type: ignore[union-attr]
    valkey_pid = next(
        pid
        for pid in pool.record_children()
        if b"valkey-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )

    os.kill(valkey_pid, signal.SIGKILL)
    pool.wait_for_log(re.compile(r"embedded Valkey exited .* restarting it on port"))
    # Workers reconnect on their own; until then Generate admits calls without a limit.
    limited = False
    with grpc.insecure_channel(pool.target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        for attempt in range(100):
            response = stub.Generate(
                pb.GenerateRequest(prompt=f"after Valkey restart {attempt}"), timeout=10.0
            )
            if response.HasField("rate_limit"):
                limited = True
                break
            time.sleep(0.1)

    assert limited
    assert port_accepts(valkey_port)
    assert not process_exists(valkey_pid)


def test_killed_parent_leaves_no_process(start_pool: Any) -> None:
    pool: Pool = start_pool("--workers", "2")
    children = pool.record_children()

    pool.process.kill()
    pool.process.wait(STOP_SECONDS)
    still_running = wait_until_gone(children, timeout=STOP_SECONDS)

    assert len(children) == 4
    assert still_running == []


async def test_worker_stops_when_stdin_closes(valkey_url: str) -> None:
    settings = make_settings(valkey_url, grpc_address="127.0.0.1:0")
    line = json.dumps({"index": 1, "settings": settings_values(settings)}) + "\n"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenflow_grpc.workers",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(line.encode())
        await process.stdin.drain()
        ready = await asyncio.wait_for(process.stdout.readline(), STARTUP_SECONDS)
        process.stdin.close()
        exit_code = await asyncio.wait_for(process.wait(), STOP_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    errors = (await process.stderr.read()).decode() if process.stderr else ""

    assert workers.READY_LINE.match(ready.decode().strip())
    assert exit_code == 0
    assert "the parent process exited" in errors
    assert "TokenFlow stopped" in errors


def test_busy_port_reported(valkey_url: str) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        completed = subprocess.run(
            [
                TOKENFLOW,
                "serve",
                "--workers",
                "2",
                "--grpc-address",
                f"127.0.0.1:{port}",
                "--no-gateway",
                "--valkey-url",
                valkey_url,
            ],
            capture_output=True,
            text=True,
            timeout=STARTUP_SECONDS,
        )
    last_line = completed.stderr.strip().splitlines()[-1]

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert f"cannot listen on the gRPC address 127.0.0.1:{port}" in last_line
    assert "worker" not in completed.stderr


def test_worker_start_failure_reported() -> None:
    completed = subprocess.run(
        [
            TOKENFLOW,
            "serve",
            "--workers",
            "2",
            "--grpc-address",
            "127.0.0.1:0",
            "--no-gateway",
            "--valkey-url",
            "bogus://x",
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
    )
    last_line = completed.stderr.strip().splitlines()[-1]

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "exited with status 1 at start" in last_line
    assert "bogus://" in last_line


async def test_restart_delay_doubles(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "FIRST_RESTART_DELAY_SECONDS", 0.05)
    caplog.set_level(logging.WARNING, logger="tokenflow_grpc.workers")
    # A worker that gets no valid settings exits at once, at every start.
    worker = WorkerProcess(1, b"not json\n")
    worker.process = await asyncio.create_subprocess_exec(sys.executable, "-c", "exit(3)")
    supervisor = asyncio.create_task(worker._supervise())

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "restart failed" in r.getMessage()]

    try:
        found = await wait_until(lambda: len(failures()) >= 3, timeout=30.0)
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
    messages = failures()
    first_exit = next(r.getMessage() for r in caplog.records if "exited" in r.getMessage())

    assert found
    assert "worker 1 (pid" in first_exit
    assert "exited with status 3" in first_exit
    assert "restarting it in 0.05 s" in first_exit
    assert "invalid settings line on stdin" in messages[0]
    assert messages[0].endswith("trying again in 0.1 s")
    assert messages[1].endswith("trying again in 0.2 s")
    assert messages[2].endswith("trying again in 0.4 s")
    assert worker.restarts == 0
