"""Closed-loop load generator: one protocol at one concurrency, as its own process.

`concurrency` workers each send Generate with the same prompt, wait for the
response, and send again, until `--duration` seconds have passed after the
warm-up or `--max-requests` requests have been sent. Requests started during
the warm-up are sent but not measured. The result is one JSON object on stdout.

With --unique-prompts every request has a prompt of its own, so every
request is a cache miss.

    python -m bench.load grpc 127.0.0.1:50051 --concurrency 16
    python -m bench.load grpc 127.0.0.1:50051 --concurrency 16 --connections 16
    python -m bench.load http http://127.0.0.1:8080 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field

import aiohttp
import grpc

from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

DEFAULT_PROMPT = "What is a sliding window rate limiter?"
# A channel option that gives each channel its own TCP connection.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
GENERATE_PATH = "/v1/generate"
REQUEST_TIMEOUT_SECONDS = 10.0

# What one request returned: a cache hit, a response that was not a cache hit,
# or an error (a non-OK status, an HTTP status other than 200, or a timeout).
HIT, MISS, ERROR = "hit", "miss", "error"

Send = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class Bounds:
    """When a load run stops: after warmup + duration seconds or max_requests requests."""

    duration: float
    warmup: float
    max_requests: int


@dataclass
class LoadResult:
    """Counts and latencies of the measured requests of one load run."""

    protocol: str
    concurrency: int
    requests: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    def record(self, outcome: str, latency: float) -> None:
        self.requests += 1
        self.latencies.append(latency)
        if outcome == HIT:
            self.hits += 1
        elif outcome == MISS:
            self.misses += 1
        else:
            self.errors += 1

    def summary(self) -> dict[str, float | int | str]:
        """Return the counts with requests/s and p50/p99 latency in milliseconds."""
        values: dict[str, float | int | str] = asdict(self)
        del values["latencies"]
        values["requests_per_second"] = self.requests / self.seconds if self.seconds else 0.0
        values["p50_ms"] = _percentile(self.latencies, 50) * 1000
        values["p99_ms"] = _percentile(self.latencies, 99) * 1000
        return values


def _percentile(samples: list[float], percent: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


async def run_load(send: Send, result: LoadResult, bounds: Bounds) -> None:
    """Run result.concurrency workers that call send until the time or count bound."""
    start = time.perf_counter()
    measure_from = start + bounds.warmup
    stop_at = measure_from + bounds.duration
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < bounds.max_requests:
            began = time.perf_counter()
            if began >= stop_at:
                return
            sent += 1
            outcome = await send()
            if began >= measure_from:
                result.record(outcome, time.perf_counter() - began)

    cpu_before = time.process_time()
    await asyncio.gather(*(worker() for _ in range(result.concurrency)))
    ended = time.perf_counter()
    result.client_cpu_seconds = time.process_time() - cpu_before
    result.seconds = max(0.0, ended - measure_from)


def unique_prompts(prompt: str) -> Iterator[str]:
    """Yield prompt followed by a number, never the same text twice in any run."""
    run = uuid.uuid4().hex[:12]
    number = 0
    while True:
        number += 1
        yield f"{prompt} [{run}-{number}]"


async def load_grpc(
    target: str,
    prompt: str,
    result: LoadResult,
    bounds: Bounds,
    unique: bool = False,
    connections: int = 1,
) -> None:
    """Load Generate over grpc.aio channels, each multiplexing its calls over one
    HTTP/2 connection. Calls take the channels in turn."""
    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(connections)
    ]
    try:
        turns = itertools.cycle([pb_grpc.TokenFlowServiceStub(channel) for channel in channels])
        request = pb.GenerateRequest(prompt=prompt)
        prompts = unique_prompts(prompt)

        async def send() -> str:
            message = pb.GenerateRequest(prompt=next(prompts)) if unique else request
            try:
                response = await next(turns).Generate(message, timeout=REQUEST_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError:
                return ERROR
            return HIT if response.cached else MISS

        await run_load(send, result, bounds)
    finally:
        for channel in channels:
            await channel.close()


async def load_http(
    base_url: str, prompt: str, result: LoadResult, bounds: Bounds, unique: bool = False
) -> None:
    """Load POST /v1/generate over keep-alive HTTP/1.1, one connection per worker."""
    if unique:
        raise ValueError("--unique-prompts is only implemented for grpc")
    url = base_url.rstrip("/") + GENERATE_PATH
    body = json.dumps({"prompt": prompt}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=result.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send() -> str:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    payload = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                return ERROR
            if status != 200:
                return ERROR
            return HIT if json.loads(payload).get("cached") is True else MISS

        await run_load(send, result, bounds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("protocol", choices=("grpc", "http"))
    parser.add_argument("target", help="gRPC HOST:PORT, or the gateway's base URL for http.")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests in flight.")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="Measured seconds, after the warm-up."
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="Seconds of unmeasured requests first."
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="Maximum requests to send, the warm-up's included.",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The prompt of every request.")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="gRPC only: channels, each with its own TCP connection (default 1). "
        "HTTP uses one connection per request in flight.",
    )
    parser.add_argument(
        "--unique-prompts",
        action="store_true",
        help="Append a number to --prompt that makes each request's prompt new, so every "
        "request is a cache miss (grpc only).",
    )
    return parser


def main() -> int:
    arguments = build_parser().parse_args()
    if arguments.unique_prompts and arguments.protocol != "grpc":
        print("--unique-prompts is only implemented for grpc", file=sys.stderr)
        return 2
    if (
        arguments.concurrency < 1
        or arguments.max_requests < 1
        or arguments.duration <= 0
        or arguments.connections < 1
    ):
        print(
            "--concurrency, --max-requests, --duration and --connections must be greater "
            f"than 0, got {arguments.concurrency}, {arguments.max_requests}, "
            f"{arguments.duration} and {arguments.connections}",
            file=sys.stderr,
        )
        return 2
    result = LoadResult(arguments.protocol, arguments.concurrency)
    bounds = Bounds(arguments.duration, arguments.warmup, arguments.max_requests)
    target, prompt, unique = arguments.target, arguments.prompt, arguments.unique_prompts
    if arguments.protocol == "grpc":
        asyncio.run(load_grpc(target, prompt, result, bounds, unique, arguments.connections))
    else:
        asyncio.run(load_http(target, prompt, result, bounds, unique))
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
