"""WatchActivity fan-out load: many watchers on one server, as its own process.

Opens --watchers WatchActivity streams over --channels gRPC connections and
waits until the server has subscribed each of them. Then it prints a line
"ready N" and waits for a line on standard input, so that the benchmark can
count the server's Valkey connections. Then it sends --events Generate
calls, --rate per second. Each call adds one event to the activity stream,
and every watcher should receive each event once.

The delivery latency of an event at a watcher is the time the watcher read
it minus the event's time, the milliseconds part of its stream id: the
server's clock when the Generate call began, or the newest event's time
when that is later. Both clocks are this machine's.
The result is one JSON object on stdout.

measure_fan_out() runs this process and counts the server's Valkey
connections while it runs.

    python -m bench.watch 127.0.0.1:50051 --watchers 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.cpu import affinity
from bench.load import DEFAULT_PROMPT
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# Initial metadata the server sends once a watcher is subscribed.
SUBSCRIBED = ("tokenflow-watch", "subscribed")
READY_PREFIX = "ready"
CALL_TIMEOUT_SECONDS = 10.0
ROOT = Path(__file__).resolve().parent.parent
# Seconds the benchmark waits for the watchers to subscribe, and for the rest of the run.
SUBSCRIBE_TIMEOUT_SECONDS = 60.0
RUN_TIMEOUT_SECONDS = 180.0
# How long after the first event the benchmark counts the server's connections again.
DURING_DELAY_SECONDS = 1.0


@dataclass
class Watcher:
    """One WatchActivity stream and what it received."""

    call: Any
    latencies: list[float] = field(default_factory=list)
    dropped: int = 0
    received: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def subscribe(stub: pb_grpc.TokenFlowServiceStub, deadline: float) -> Watcher:
    call = stub.WatchActivity(pb.WatchActivityRequest(), timeout=deadline)
    metadata = await call.initial_metadata()
    if metadata.get(SUBSCRIBED[0]) != SUBSCRIBED[1]:
        raise RuntimeError(f"WatchActivity sent no {SUBSCRIBED} metadata: {metadata}")
    return Watcher(call)


async def receive(watcher: Watcher, expected: int) -> None:
    """Read events until expected ones arrived (or were reported dropped)."""
    try:
        async for response in watcher.call:
            now_ms = time.time() * 1000
            watcher.received += 1
            watcher.dropped += response.dropped
            watcher.latencies.append(now_ms - response.event.time.ToMilliseconds())
            if watcher.received + watcher.dropped >= expected:
                break
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            raise
    finally:
        watcher.done.set()


async def produce(stub: pb_grpc.TokenFlowServiceStub, events: int, rate: float) -> int:
    """Send events Generate calls at rate per second; return how many failed."""
    failed = 0
    started = time.perf_counter()
    for number in range(events):
        await asyncio.sleep(max(0.0, started + number / rate - time.perf_counter()))
        try:
            await stub.Generate(
                pb.GenerateRequest(prompt=DEFAULT_PROMPT), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError:
            failed += 1
    return failed


def _percentile(samples: list[float], percent: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    # A local subchannel pool gives each channel its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(arguments.target, options=options)
        for _ in range(arguments.channels)
    ]
    producer_channel = grpc.aio.insecure_channel(arguments.target, options=options)
    try:
        stubs = [pb_grpc.TokenFlowServiceStub(channel) for channel in channels]
        started = time.perf_counter()
        watchers = await asyncio.gather(
            *(
                subscribe(stubs[index % len(stubs)], arguments.timeout)
                for index in range(arguments.watchers)
            )
        )
        subscribe_seconds = time.perf_counter() - started
        receivers = [
            asyncio.create_task(receive(watcher, arguments.events)) for watcher in watchers
        ]

        print(f"{READY_PREFIX} {len(watchers)}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        producer = pb_grpc.TokenFlowServiceStub(producer_channel)
        failed = await produce(producer, arguments.events, arguments.rate)
        try:
            async with asyncio.timeout(arguments.drain_timeout):
                await asyncio.gather(*(watcher.done.wait() for watcher in watchers))
        except TimeoutError:
            pass  # Reported below as events that never arrived.
        for watcher in watchers:
            watcher.call.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    finally:
        for channel in [*channels, producer_channel]:
            await channel.close()

    latencies = [latency for watcher in watchers for latency in watcher.latencies]
    received = sum(watcher.received for watcher in watchers)
    dropped = sum(watcher.dropped for watcher in watchers)
    return {
        "watchers": len(watchers),
        "channels": arguments.channels,
        "events": arguments.events,
        "rate": arguments.rate,
        "failed_generate_calls": failed,
        "deliveries": received,
        "dropped": dropped,
        "missing": arguments.events * len(watchers) - received - dropped,
        "subscribe_seconds": subscribe_seconds,
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies, default=0.0),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__)
    parser.add_argument("target", help="gRPC HOST:PORT of the server.")
    parser.add_argument("--watchers", type=int, default=1000, help="WatchActivity streams.")
    parser.add_argument(
        "--channels", type=int, default=10, help="gRPC connections the streams share."
    )
    parser.add_argument("--events", type=int, default=50, help="Events to produce.")
    parser.add_argument("--rate", type=float, default=10.0, help="Events per second.")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="Deadline of each WatchActivity call, in seconds.",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="Seconds to wait for the last deliveries after the last event.",
    )
    return parser


@dataclass(frozen=True)
class FanOut:
    """One watcher (the reference) and many, with the server's Valkey connections.

    connections_*: connections of the server process in CLIENT LIST; readers_during:
    how many of them ran XREAD while the watchers received events;
    server_cpu_seconds: the server's CPU time during the run with many watchers.
    """

    reference: dict[str, Any]
    loaded: dict[str, Any]
    connections_before: int
    connections_during: int
    readers_during: int
    server_cpu_seconds: float

    @property
    def cpu_per_delivery_us(self) -> float:
        """The server's CPU time per event delivered to one watcher, in microseconds."""
        deliveries = int(self.loaded["deliveries"])
        return 1e6 * self.server_cpu_seconds / deliveries if deliveries else 0.0


def measure_fan_out(
    target: str,
    connections: Callable[[], list[dict[str, Any]]],
    server_cpu: Callable[[], float],
    options: list[str],
    watchers: int,
    channels: int,
    cpus: frozenset[int] | None = None,
    reference_watchers: int = 1,
) -> FanOut:
    """Run bench.watch with reference_watchers and then watchers, counting connections.

    connections() returns the server's entries of Valkey's CLIENT LIST, and
    server_cpu() the server's CPU time in seconds.
    """
    before = len(connections())
    reference, _ = run_watch_process(target, reference_watchers, 1, options, connections, cpus)
    cpu_before = server_cpu()
    loaded, during = run_watch_process(target, watchers, channels, options, connections, cpus)
    cpu_seconds = server_cpu() - cpu_before
    readers = sum(1 for client in during if str(client.get("cmd", "")) == "xread")
    return FanOut(reference, loaded, before, len(during), readers, cpu_seconds)


def run_watch_process(
    target: str,
    watchers: int,
    channels: int,
    options: list[str],
    connections: Callable[[], list[dict[str, Any]]],
    cpus: frozenset[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one bench.watch process; return its result and the connections seen mid-run."""
    command = [
        sys.executable,
        "-m",
        "bench.watch",
        target,
        f"--watchers={watchers}",
        f"--channels={channels}",
        *options,
    ]
    with affinity(cpus):
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    try:
        assert process.stdin is not None and process.stdout is not None
        ready = _read_line(process, SUBSCRIBE_TIMEOUT_SECONDS)
        if not ready.startswith(READY_PREFIX):
            raise RuntimeError(f"{shlex.join(command)} did not subscribe: {ready!r}")
        process.stdin.write("start\n")
        process.stdin.flush()
        time.sleep(DURING_DELAY_SECONDS)
        during = connections()
        output, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed with exit code {process.returncode}")
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result, during


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """Return the next line process prints, or "" when none comes within timeout seconds."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.append(process.stdout.readline())

    reader = threading.Thread(target=read, name="bench-watch-stdout", daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def main() -> int:
    arguments = build_parser().parse_args()
    counts = (arguments.watchers, arguments.channels, arguments.events, arguments.rate)
    if min(counts) <= 0:
        print(
            "--watchers, --channels, --events and --rate must be greater than 0, got "
            f"{', '.join(str(count) for count in counts)}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(asyncio.run(run(arguments))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
