"""Benchmark TokenFlow on loopback and write the results into bench/README.md.

One run measures, each against a reference from the same run:

1. Cache-hit Generate throughput and latency at each --levels concurrency,
   against a bare grpc.aio server that returns a response of the same size
   (bench/echo.py), and the gateway's POST /v1/generate against direct gRPC.
2. Valkey commands and round trips per Generate, for a cache hit and a miss,
   from Valkey's INFO commandstats and INFO stats (bench/commands.py).
3. WatchActivity fan-out: delivery latency with --watchers watchers against
   one watcher, and the Valkey connections the server holds (bench/watch.py).
4. Valkey memory per tracked client of the rate limiter at limits 10 and
   1,000, every window full (bench/memory.py).

Every load runs as its own process (bench.load, bench.watch, bench.memory),
bounded in time and count. With two or more CPUs the servers are pinned to
the first half of them and the load generators and Valkey to the rest.

    python -m bench.run                      # what `make bench` runs
    python -m bench.run --quick --no-readme  # about half a minute, prints the results
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from bench import commands
from bench.cpu import CpuPlan, CpuSnapshot, affinity
from bench.load import DEFAULT_PROMPT
from bench.memory import MAX_CLIENTS, WindowMemory, window_memory
from bench.report import (
    SERVERS,
    Level,
    Results,
    machine_description,
    results_section,
    update_readme,
)
from bench.server import (
    TokenFlow,
    Valkey,
    running_echo,
    running_tokenflow,
    running_valkey,
)
from bench.watch import FanOut, measure_fan_out
from tokenflow_grpc.settings import MAX_RATE_LIMIT
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# Seconds a load process may take beyond its own bounds before it is killed.
LOAD_TIMEOUT_MARGIN_SECONDS = 30.0
# Rate limits at which the limiter's memory is measured.
MEMORY_LIMITS = (10, 1000)
# Settings that --quick replaces, for a run of about half a minute.
QUICK = {
    "rounds": 1,
    "duration": 1.0,
    "warmup": 0.5,
    "round_trip_calls": 100,
    "watchers": 200,
    "watch_events": 20,
    "memory_calls": 2000,
}


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the throughput runs that bench.run and bench.workers share."""
    parser.add_argument(
        "--levels",
        default="1,16,64",
        help="Comma-separated numbers of requests in flight (default 1,16,64).",
    )
    parser.add_argument(
        "--duration", type=float, default=3.0, help="Measured seconds per run (default 3)."
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="Unmeasured seconds at the start of each run (default 1).",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=20_000,
        help="Maximum requests per run, the warm-up's included (default 20000).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Runs of each server at each level. The tables show the median (default 3).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_arguments(parser)
    parser.add_argument(
        "--round-trip-calls",
        type=int,
        default=500,
        help="Generate calls counted for the round trips of a hit, and of a miss (default 500).",
    )
    parser.add_argument(
        "--watchers", type=int, default=1000, help="WatchActivity streams (default 1000)."
    )
    parser.add_argument(
        "--watch-events",
        type=int,
        default=50,
        help="Events sent to the watchers (default 50).",
    )
    parser.add_argument(
        "--watch-rate",
        type=float,
        default=10.0,
        help="Events sent to the watchers per second (default 10).",
    )
    parser.add_argument(
        "--memory-calls",
        type=int,
        default=20_000,
        help="Generate calls that fill the windows at each limit; the clients are the "
        f"calls divided by the limit, at most {MAX_CLIENTS} (default 20000).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="One short round of everything: "
        + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK.items())
        + ". Its figures are rougher.",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="Let every process run on any CPU instead of pinning servers and load apart.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="The server's --log-level (default INFO, the server's own default, at "
        "which the gateway logs every request).",
    )
    parser.add_argument(
        "--separate-gateway",
        action="store_true",
        help="Run the gateway as its own `tokenflow gateway` process instead of inside "
        "`tokenflow serve`.",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="Print the results without updating README.md."
    )
    return parser


def parse_levels(text: str) -> list[int]:
    levels = [int(item) for item in text.split(",") if item.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(f"invalid --levels {text!r}: expected positive integers such as 1,16,64")
    return levels


def warm_cache(target: str) -> pb.GenerateResponse:
    """Send the benchmark prompt twice, so it is cached, and return the second, a hit."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        request = pb.GenerateRequest(prompt=DEFAULT_PROMPT)
        stub.Generate(request, timeout=10.0)
        response: pb.GenerateResponse = stub.Generate(request, timeout=10.0)
    if not response.cached:
        raise RuntimeError("the second Generate of the benchmark prompt was not a cache hit")
    return response


def run_load(
    options: list[str], timeout: float, cpus: frozenset[int] | None = None
) -> dict[str, Any]:
    """Run one bench.load process with options and return its result."""
    command = [sys.executable, "-m", "bench.load", *options]
    with affinity(cpus):
        completed = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + LOAD_TIMEOUT_MARGIN_SECONDS,
        )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed with exit code {completed.returncode}:\n"
            f"{completed.stderr}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run_throughput(
    server: str,
    target: str,
    server_cpu: Callable[[], float],
    valkey: Valkey,
    concurrency: int,
    arguments: Any,
    cpus: frozenset[int] | None,
) -> dict[str, Any]:
    """Run one closed-loop load against target; add the server's and Valkey's CPU time."""
    protocol = "http" if server == "http" else "grpc"
    options = [
        protocol,
        target,
        f"--concurrency={concurrency}",
        f"--duration={arguments.duration}",
        f"--warmup={arguments.warmup}",
        f"--max-requests={arguments.max_requests}",
    ]
    server_before, valkey_before = server_cpu(), valkey.cpu_seconds()
    result = run_load(options, arguments.warmup + arguments.duration, cpus)
    # NOTE: the CPU time covers the whole load process, warm-up included, while the
    # request count covers only the measured part, so CPU per request is an overestimate.
    result["server"] = server
    result["server_cpu_seconds"] = server_cpu() - server_before
    result["valkey_cpu_seconds"] = valkey.cpu_seconds() - valkey_before
    return result


def describe(result: dict[str, Any]) -> str:
    return (
        f"{result['server']:>4} x{result['concurrency']:<3} "
        f"{result['requests_per_second']:9,.0f} req/s  p50 {result['p50_ms']:7.2f} ms  "
        f"p99 {result['p99_ms']:7.2f} ms  misses {result['misses']}  errors {result['errors']}"
    )


def measure_throughput(
    arguments: Any,
    levels: list[int],
    tokenflow: TokenFlow,
    valkey: Valkey,
    log_dir: Path,
    plan: CpuPlan,
) -> list[Level]:
    """Run every round of the echo server, TokenFlow's gRPC and its gateway at each level."""
    response_file = log_dir / "cache-hit-response.bin"
    response_file.write_bytes(warm_cache(tokenflow.grpc_target).SerializeToString())
    rounds: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with running_echo(response_file, log_dir, plan.servers) as echo:
        targets = {
            "echo": (echo.grpc_target, echo.cpu_seconds),
            "grpc": (tokenflow.grpc_target, tokenflow.cpu_seconds),
            "http": (tokenflow.http_url, tokenflow.cpu_seconds),
        }
        # Rounds go over every level in turn, so a burst of background load
        # falls on one round of several levels rather than on one level.
        for _ in range(arguments.rounds):
            for concurrency in levels:
                for server in SERVERS:
                    target, server_cpu = targets[server]
                    result = run_throughput(
                        server, target, server_cpu, valkey, concurrency, arguments, plan.load
                    )
                    print(describe(result), flush=True)
                    rounds.setdefault((concurrency, server), []).append(result)
    return [
        Level(concurrency, {server: rounds[concurrency, server] for server in SERVERS})
        for concurrency in levels
    ]


def measure_round_trips(
    tokenflow: TokenFlow, valkey: Valkey, calls: int, cpus: frozenset[int] | None
) -> list[commands.CommandCounts]:
    """Count Valkey's commands and reads for `calls` cache hits, then `calls` misses."""
    counts = []
    for kind, extra in (("cache hit", []), ("cache miss", ["--unique-prompts"])):
        options = [
            "grpc",
            tokenflow.grpc_target,
            "--concurrency=1",
            "--warmup=0",
            "--duration=600",
            f"--max-requests={calls}",
            *extra,
        ]
        commands.reset(valkey.client)
        result = run_load(options, 600.0, cpus)
        count = commands.read_counts(valkey.client, kind, result["requests"])
        expected = result["hits"] if kind == "cache hit" else result["misses"]
        if expected != calls:
            raise RuntimeError(
                f"{calls} calls for the {kind} count, but only {expected} were a {kind}: {result}"
            )
        print(
            f"{kind}: {count.per_call(count.round_trips):.2f} round trips, "
            f"{count.per_call(count.commands):.2f} commands per call",
            flush=True,
        )
        counts.append(count)
    return counts


def measure_fan_out_phase(
    tokenflow: TokenFlow, valkey: Valkey, arguments: Any, cpus: frozenset[int] | None
) -> FanOut:
    fan_out = measure_fan_out(
        tokenflow.grpc_target,
        lambda: valkey.connections_of(tokenflow.pid),
        tokenflow.cpu_seconds,
        [f"--events={arguments.watch_events}", f"--rate={arguments.watch_rate}"],
        watchers=arguments.watchers,
        channels=max(1, arguments.watchers // 100),
        cpus=cpus,
    )
    print(
        f"fan-out: {fan_out.loaded['watchers']} watchers, p99 {fan_out.loaded['p99_ms']:.1f} "
        f"ms (1 watcher: {fan_out.reference['p99_ms']:.1f} ms), "
        f"{fan_out.connections_during} Valkey connections",
        flush=True,
    )
    return fan_out


def measure_memory(
    valkey: Valkey, arguments: Any, log_dir: Path, plan: CpuPlan
) -> list[WindowMemory]:
    """Fill full windows at each of MEMORY_LIMITS and read their MEMORY USAGE."""
    measured = []
    for limit in MEMORY_LIMITS:
        clients = max(1, min(MAX_CLIENTS, arguments.memory_calls // limit))
        with running_tokenflow(
            valkey.url, limit, "WARNING", log_dir, cpus=plan.servers, gateway=False
        ) as tokenflow:
            options = [tokenflow.grpc_target, f"--clients={clients}", f"--calls-per-client={limit}"]
            command = [sys.executable, "-m", "bench.memory", *options]
            with affinity(plan.load):
                completed = subprocess.run(
                    command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
                )
            if completed.returncode != 0:
                raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stderr}")
            outcomes = json.loads(completed.stdout.strip().splitlines()[-1])
            if outcomes["admitted"] != clients * limit + 1:
                raise RuntimeError(
                    f"not every call that fills the windows was admitted: {outcomes}"
                )
            fill = window_memory(valkey.client, tokenflow.key_prefix, clients, limit)
        print(
            f"limit {limit}: {fill.mean_usage:,.0f} bytes per client over {clients} clients",
            flush=True,
        )
        measured.append(fill)
    return measured


def measure(
    arguments: Any, levels: list[int], rate_limit: int, plan: CpuPlan
) -> tuple[Results, str]:
    """Start Valkey and TokenFlow, run every measurement, and return them with Valkey's version."""
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenflow-bench-")))
        valkey = stack.enter_context(running_valkey(plan.load))
        tokenflow = stack.enter_context(
            running_tokenflow(
                valkey.url,
                rate_limit,
                arguments.log_level,
                log_dir,
                arguments.separate_gateway,
                cpus=plan.servers,
            )
        )
        levels_measured = measure_throughput(arguments, levels, tokenflow, valkey, log_dir, plan)
        connections_after_load = len(valkey.connections_of(tokenflow.pid))
        round_trips = measure_round_trips(tokenflow, valkey, arguments.round_trip_calls, plan.load)
        fan_out = measure_fan_out_phase(tokenflow, valkey, arguments, plan.load)
        memory = measure_memory(valkey, arguments, log_dir, plan)
        results = Results(levels_measured, connections_after_load, round_trips, fan_out, memory)
        return results, valkey.version()


def exact_command() -> str:
    """Return the command line of this run, with the venv's Python relative to the repository."""
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    return shlex.join([str(python), "-m", "bench.run", *sys.argv[1:]])


def validate(arguments: Any) -> str | None:
    """Return what is wrong with the arguments, or None."""
    if arguments.rounds < 1:
        return f"invalid --rounds {arguments.rounds}: expected 1 or more"
    for name in ("round_trip_calls", "watchers", "watch_events", "watch_rate", "memory_calls"):
        if getattr(arguments, name) < 1:
            flag = "--" + name.replace("_", "-")
            return f"invalid {flag} {getattr(arguments, name)}: expected 1 or more"
    return None


def main() -> int:
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so every server this
    # benchmark started is stopped by its context manager.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    arguments = build_parser().parse_args()
    if arguments.quick:
        for name, value in QUICK.items():
            setattr(arguments, name, value)
    try:
        levels = parse_levels(arguments.levels)
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    problem = validate(arguments)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    # Every request comes from 127.0.0.1, one client, so the limit must exceed them all.
    rate_limit = (
        2 * arguments.rounds * len(levels) * arguments.max_requests
        + 2 * arguments.round_trip_calls
        + 2 * arguments.watch_events
        + 10
    )
    if rate_limit > MAX_RATE_LIMIT:
        print(
            f"bench: the run may send {rate_limit:,} requests, more than the server's maximum "
            f"--rate-limit of {MAX_RATE_LIMIT:,}. Lower --max-requests, --rounds or --levels",
            file=sys.stderr,
        )
        return 2

    plan = CpuPlan.split(pin=not arguments.no_pin)
    cpu_before = CpuSnapshot.take()
    results, valkey_version = measure(arguments, levels, rate_limit, plan)
    background = CpuSnapshot.take().background_since(cpu_before)

    not_hits = sum(
        result["errors"] + result["misses"]
        for level in results.levels
        for runs in level.rounds.values()
        for result in runs
    )
    if not_hits:
        print(
            f"bench: {not_hits} measured requests failed or were not cache hits, so the "
            "figures do not measure cache hits; README.md is not updated",
            file=sys.stderr,
        )
        return 1

    machine = [*machine_description(ROOT, valkey_version, background), f"- CPUs: {plan.describe()}"]
    when = datetime.datetime.now(datetime.UTC)
    section = results_section(results, exact_command(), machine, when)
    if arguments.no_readme:
        print(section)
    else:
        update_readme(section)
        print("updated bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
