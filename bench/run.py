"""Benchmark the gateway's POST /v1/generate against direct gRPC Generate, on cache hits.

Starts Valkey and `tokenflow serve` (the gRPC server, and the gateway as its child)
and sends the benchmark prompt, so that every later call is a cache hit.
Then runs bench.load as a separate process for each concurrency level and
protocol, all on loopback. Prints the tables and writes them into
bench/README.md.

    python -m bench.run                      # what `make bench` runs
    python -m bench.run --levels 1,16 --duration 2 --no-readme
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from bench.cpu import CpuSnapshot
from bench.load import DEFAULT_PROMPT
from bench.report import Level, machine_description, results_section, update_readme
from bench.server import TokenFlow, Valkey, running_tokenflow, running_valkey
from tokenflow_grpc.settings import MAX_RATE_LIMIT
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")
# Seconds a load process may take beyond its warm-up and duration before it is killed.
LOAD_TIMEOUT_MARGIN_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
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
        default=5,
        help="Runs of each protocol at each level. The tables show the median (default 5).",
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


def warm_cache(target: str) -> None:
    """Send the benchmark prompt twice, so it is cached, and check the second is a hit."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        request = pb.GenerateRequest(prompt=DEFAULT_PROMPT)
        stub.Generate(request, timeout=10.0)
        if not stub.Generate(request, timeout=10.0).cached:
            raise RuntimeError("the second Generate of the benchmark prompt was not a cache hit")


def run_load(
    protocol: str, server: TokenFlow, valkey: Valkey, concurrency: int, arguments: Any
) -> dict[str, Any]:
    """Run one bench.load process and return its result, with TokenFlow and Valkey CPU time."""
    target = server.grpc_target if protocol == "grpc" else server.http_url
    command = [
        sys.executable,
        "-m",
        "bench.load",
        protocol,
        target,
        f"--concurrency={concurrency}",
        f"--duration={arguments.duration}",
        f"--warmup={arguments.warmup}",
        f"--max-requests={arguments.max_requests}",
    ]

    server_before, valkey_before = server.cpu_seconds(), valkey.cpu_seconds()
    completed = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=arguments.warmup + arguments.duration + LOAD_TIMEOUT_MARGIN_SECONDS,
    )
    server_after, valkey_after = server.cpu_seconds(), valkey.cpu_seconds()

    if completed.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed with exit code {completed.returncode}:\n"
            f"{completed.stderr}"
        )

    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    # NOTE: the CPU time covers the whole load process, warm-up included, while the
    # request count covers only the measured part, so CPU per request is an overestimate.
    result["tokenflow_cpu_seconds"] = server_after - server_before
    result["valkey_cpu_seconds"] = valkey_after - valkey_before
    return result


def describe(result: dict[str, Any]) -> str:
    return (
        f"{result['protocol']:>4} x{result['concurrency']:<3} "
        f"{result['requests_per_second']:9,.0f} req/s  p50 {result['p50_ms']:7.2f} ms  "
        f"p99 {result['p99_ms']:7.2f} ms  misses {result['misses']}  errors {result['errors']}"
    )


def measure(
    arguments: Any, levels: list[int], rate_limit: int
) -> tuple[dict[tuple[int, str], list[dict[str, Any]]], str]:
    """Start Valkey and TokenFlow, run every round, and return the results and Valkey's version.

    The results are keyed by (requests in flight, protocol), one entry per round.
    """
    rounds: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenflow-bench-")))
        valkey = stack.enter_context(running_valkey())
        server = stack.enter_context(
            running_tokenflow(
                valkey.url, rate_limit, arguments.log_level, log_dir, arguments.separate_gateway
            )
        )
        warm_cache(server.grpc_target)
        # Rounds go over every level in turn, so a burst of background load
        # falls on one round of several levels rather than on one level.
        for _ in range(arguments.rounds):
            for concurrency in levels:
                for protocol in PROTOCOLS:
                    result = run_load(protocol, server, valkey, concurrency, arguments)
                    print(describe(result), flush=True)
                    rounds.setdefault((concurrency, protocol), []).append(result)
        return rounds, valkey.version()


def exact_command() -> str:
    """Return the command line of this run, with the venv's Python relative to the repository."""
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    return shlex.join([str(python), "-m", "bench.run", *sys.argv[1:]])


def main() -> int:
    arguments = build_parser().parse_args()
    try:
        levels = parse_levels(arguments.levels)
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if arguments.rounds < 1:
        print(f"bench: invalid --rounds {arguments.rounds}: expected 1 or more", file=sys.stderr)
        return 2
    # Every request comes from 127.0.0.1, one client, so the limit must exceed them all.
    rate_limit = 2 * arguments.rounds * len(levels) * arguments.max_requests + 10
    if rate_limit > MAX_RATE_LIMIT:
        print(
            f"bench: the run may send {rate_limit:,} requests, more than the server's maximum "
            f"--rate-limit of {MAX_RATE_LIMIT:,}. Lower --max-requests, --rounds or --levels",
            file=sys.stderr,
        )
        return 2

    cpu_before = CpuSnapshot.take()
    rounds, valkey_version = measure(arguments, levels, rate_limit)
    background = CpuSnapshot.take().background_since(cpu_before)

    results = [
        Level(concurrency, rounds[concurrency, "grpc"], rounds[concurrency, "http"])
        for concurrency in levels
    ]
    for level in results:
        print(f"ratio gateway/gRPC at {level.concurrency} in flight: {level.ratio:.2f}")
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
    section = results_section(results, exact_command(), machine, when)
    if arguments.no_readme:
        print(section)
    else:
        update_readme(section)
        print("updated bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
