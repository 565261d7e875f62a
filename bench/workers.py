"""Benchmark Generate cache hits with 1, 2 and 4 workers against a bare gRPC server.

Starts Valkey, one `tokenflow serve --workers N --no-gateway` for each worker
count, and bench.echo, a bare grpc.aio server that returns the bytes of a
recorded cache hit for every call. Sends the benchmark prompt, so that every
later Generate is a cache hit. Then, for each round, concurrency level and
server, runs `bench.load grpc` as its own process with one connection per
request in flight, so that the kernel spreads the connections over the
workers. Every ratio compares a TokenFlow run with the echo run of the same
round and level, which ran just before it under the same background load.
Prints the tables and writes them into bench/README.md.

    python -m bench.workers
    python -m bench.workers --workers 1,2 --levels 1,16 --rounds 1 --no-readme
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from bench.cpu import CpuSnapshot
from bench.load import DEFAULT_PROMPT
from bench.report import machine_description, update_readme
from bench.run import (
    LOAD_TIMEOUT_MARGIN_SECONDS,
    ROOT,
    add_load_arguments,
    parse_levels,
    warm_cache,
)
from bench.server import Echo, TokenFlow, running_echo, running_valkey, running_workers
from tokenflow_grpc.settings import MAX_RATE_LIMIT
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

ECHO = "echo"
SECTION_START = "<!-- bench:workers:start -->"
SECTION_END = "<!-- bench:workers:end -->"

# Results of every round, by (requests in flight, server): ECHO or a worker count.
Rounds = dict[tuple[int, str], list[dict[str, Any]]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument(
        "--workers",
        default="1,2,4",
        help="Comma-separated worker counts, one server each (default 1,2,4).",
    )
    add_load_arguments(parser)
    parser.add_argument(
        "--no-readme", action="store_true", help="Print the results without updating README.md."
    )
    return parser


def record_cache_hit(target: str) -> bytes:
    """Return a serialized cache-hit GenerateResponse for the benchmark prompt."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        response = stub.Generate(pb.GenerateRequest(prompt=DEFAULT_PROMPT), timeout=10.0)
    if not response.cached:
        raise RuntimeError("the recorded Generate of the benchmark prompt was not a cache hit")
    serialized: bytes = response.SerializeToString()
    return serialized


def run_load(server: TokenFlow | Echo, concurrency: int, arguments: Any) -> dict[str, Any]:
    """Run one `bench.load grpc` process and return its result, with the server's CPU time."""
    command = [
        sys.executable,
        "-m",
        "bench.load",
        "grpc",
        server.grpc_target,
        f"--concurrency={concurrency}",
        f"--connections={concurrency}",
        f"--duration={arguments.duration}",
        f"--warmup={arguments.warmup}",
        f"--max-requests={arguments.max_requests}",
    ]
    before = server.cpu_seconds()
    completed = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=arguments.warmup + arguments.duration + LOAD_TIMEOUT_MARGIN_SECONDS,
    )
    after = server.cpu_seconds()
    if completed.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed with exit code {completed.returncode}:\n"
            f"{completed.stderr}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    # NOTE: the CPU time includes the warm-up and the request count does not,
    # so CPU per request is an overestimate.
    result["server_cpu_seconds"] = after - before
    return result


def measure(
    arguments: Any, counts: list[int], levels: list[int], rate_limit: int
) -> tuple[Rounds, str]:
    """Start Valkey, the servers and the echo server, run every round, and
    return the results and Valkey's version."""
    rounds: Rounds = {}
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenflow-bench-")))
        valkey = stack.enter_context(running_valkey())
        servers: dict[str, TokenFlow | Echo] = {}
        for count in counts:
            pool = stack.enter_context(running_workers(valkey.url, count, rate_limit, log_dir))
            warm_cache(pool.grpc_target)
            servers[str(count)] = pool

        response_path = log_dir / "cache-hit.bin"
        response_path.write_bytes(record_cache_hit(servers[str(counts[0])].grpc_target))
        echo = stack.enter_context(running_echo(response_path, log_dir))
        servers = {ECHO: echo, **servers}

        # Echo runs first at each level, so each TokenFlow run has a floor
        # measured moments before it.
        for _ in range(arguments.rounds):
            for concurrency in levels:
                for name, server in servers.items():
                    result = run_load(server, concurrency, arguments)
                    print(describe(name, result), flush=True)
                    rounds.setdefault((concurrency, name), []).append(result)
        return rounds, valkey.version()


def describe(name: str, result: dict[str, Any]) -> str:
    server = "echo" if name == ECHO else f"{name} workers"
    return (
        f"{server:>9} x{result['concurrency']:<3} "
        f"{result['requests_per_second']:9,.0f} req/s  p50 {result['p50_ms']:7.2f} ms  "
        f"p99 {result['p99_ms']:7.2f} ms  misses {result['misses']}  errors {result['errors']}"
    )


def _median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the median requests/s, the lower one of an even count."""
    ordered = sorted(results, key=lambda result: float(result["requests_per_second"]))
    return ordered[(len(ordered) - 1) // 2]


def _ratios(rounds: Rounds, concurrency: int, name: str, key: str) -> list[float]:
    """Return, per round, the TokenFlow figure divided by the echo figure of that round."""
    pairs = zip(rounds[concurrency, name], rounds[concurrency, ECHO], strict=True)
    return [
        float(tokenflow[key]) / float(echo[key]) if echo[key] else 0.0 for tokenflow, echo in pairs
    ]


def _spread(values: list[float], digits: int) -> str:
    return f"{min(values):,.{digits}f}–{max(values):,.{digits}f}"


def echo_table(rounds: Rounds, levels: list[int]) -> list[str]:
    lines = [
        "| In flight | Echo req/s (range) | Echo p50 ms | Echo p99 ms | Load generator CPU % |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in levels:
        results = rounds[concurrency, ECHO]
        median = _median_round(results)
        rates = [float(result["requests_per_second"]) for result in results]
        lines.append(
            f"| {concurrency} | {median['requests_per_second']:,.0f} ({_spread(rates, 0)}) "
            f"| {median['p50_ms']:.2f} | {median['p99_ms']:.2f} "
            f"| {_load_percent(median):.0f} |"
        )
    return lines


def workers_table(rounds: Rounds, levels: list[int], counts: list[int]) -> list[str]:
    lines = [
        "| In flight | Workers | req/s (range) | req/s ÷ echo (range) | p50 ms | p50 ÷ echo "
        "| p99 ms | p99 ÷ echo | TokenFlow CPU µs/request | Load generator CPU % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in levels:
        for count in counts:
            name = str(count)
            results = rounds[concurrency, name]
            median = _median_round(results)
            rates = [float(result["requests_per_second"]) for result in results]
            rate_ratios = _ratios(rounds, concurrency, name, "requests_per_second")
            p50_ratio = statistics.median(_ratios(rounds, concurrency, name, "p50_ms"))
            p99_ratio = statistics.median(_ratios(rounds, concurrency, name, "p99_ms"))
            cpu_per_request = 1e6 * median["server_cpu_seconds"] / (median["requests"] or 1)
            lines.append(
                f"| {concurrency} | {count} "
                f"| {median['requests_per_second']:,.0f} ({_spread(rates, 0)}) "
                f"| {statistics.median(rate_ratios):.2f} ({_spread(rate_ratios, 2)}) "
                f"| {median['p50_ms']:.2f} | {p50_ratio:.2f} "
                f"| {median['p99_ms']:.2f} | {p99_ratio:.2f} "
                f"| {cpu_per_request:.0f} | {_load_percent(median):.0f} |"
            )
    return lines


def _load_percent(result: dict[str, Any]) -> float:
    return 100 * float(result["client_cpu_seconds"]) / (float(result["seconds"]) or 1.0)


def exact_command() -> str:
    """Return the command line of this run, with the venv's Python relative to the repository."""
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    return shlex.join([str(python), "-m", "bench.workers", *sys.argv[1:]])


def results_section(
    rounds: Rounds,
    levels: list[int],
    counts: list[int],
    machine: list[str],
    when: datetime.datetime,
) -> str:
    lines = [
        SECTION_START,
        f"Measured on {when:%Y-%m-%d %H:%M} UTC with:",
        "",
        "```sh",
        exact_command(),
        "```",
        "",
        *machine,
        "",
        *echo_table(rounds, levels),
        "",
        *workers_table(rounds, levels, counts),
        SECTION_END,
    ]
    return "\n".join(lines)


def main() -> int:
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so every server this
    # benchmark started is stopped by its context manager.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    arguments = build_parser().parse_args()
    try:
        levels = parse_levels(arguments.levels)
        counts = parse_levels(arguments.workers)
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if arguments.rounds < 1:
        print(f"bench: invalid --rounds {arguments.rounds}: expected 1 or more", file=sys.stderr)
        return 2
    # Every request comes from 127.0.0.1, one client, and each server has its
    # own key prefix, so each server's limit must exceed what it receives.
    rate_limit = arguments.rounds * len(levels) * arguments.max_requests + 10
    if rate_limit > MAX_RATE_LIMIT:
        print(
            f"bench: each server may receive {rate_limit:,} requests, more than the maximum "
            f"--rate-limit of {MAX_RATE_LIMIT:,}. Lower --max-requests, --rounds or --levels",
            file=sys.stderr,
        )
        return 2

    cpu_before = CpuSnapshot.take()
    rounds, valkey_version = measure(arguments, counts, levels, rate_limit)
    background = CpuSnapshot.take().background_since(cpu_before)

    not_hits = sum(
        result["errors"] + result["misses"] for runs in rounds.values() for result in runs
    )
    if not_hits:
        print(
            f"bench: {not_hits} measured requests failed or were not cache hits, so the "
            "figures do not measure cache hits; README.md is not updated",
            file=sys.stderr,
        )
        return 1

    machine = machine_description(ROOT, valkey_version, background)
    when = datetime.datetime.now(datetime.UTC)
    section = results_section(rounds, levels, counts, machine, when)
    if arguments.no_readme:
        print(section)
    else:
        update_readme(section, start_marker=SECTION_START, end_marker=SECTION_END)
        print("updated bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
