"""Valkey memory per tracked client of the rate limiter.

As a process, `python -m bench.memory TARGET` fills the windows of --clients
clients with --calls-per-client Generate calls each, so that a server whose
--rate-limit equals --calls-per-client ends with every window full. One more
client, the reference, sends a single call: its window shows what a key
costs with one request in it. Each
client is named by an x-forwarded-for address from the documentation ranges
(RFC 5737), which the server believes because the call comes from
127.0.0.1, a trusted proxy by default. The header only names the client: no
traffic goes to those addresses. The result is one JSON object on stdout.

window_memory() then reads MEMORY USAGE of every window key.

    python -m bench.memory 127.0.0.1:50051 --clients 100 --calls-per-client 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import grpc

from bench.load import DEFAULT_PROMPT
from tokenflow_grpc.keys import NAMESPACE_CLIENT, KeySpace
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# TEST-NET-2 and TEST-NET-3 (RFC 5737), reserved for documentation.
DOCUMENTATION_NETWORKS = ("198.51.100", "203.0.113")
# One address is left for the reference client.
MAX_CLIENTS = 254 * len(DOCUMENTATION_NETWORKS) - 1
CALL_TIMEOUT_SECONDS = 10.0


def client_address(index: int) -> str:
    """Return the documentation address of client index, 0 <= index < MAX_CLIENTS."""
    network = DOCUMENTATION_NETWORKS[index // 254]
    return f"{network}.{index % 254 + 1}"


async def fill(
    target: str, clients: int, calls_per_client: int, concurrency: int
) -> dict[str, int]:
    """Send calls_per_client Generate calls for each client and one for the
    reference client (index clients); count the outcomes."""
    outcomes = {"admitted": 0, "rejected": 0, "errors": 0}
    addresses = [client_address(index) for index in range(clients)] * calls_per_client
    calls = iter([*addresses, client_address(clients)])
    request = pb.GenerateRequest(prompt=DEFAULT_PROMPT)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)

        async def worker() -> None:
            for address in calls:
                try:
                    await stub.Generate(
                        request,
                        metadata=(("x-forwarded-for", address),),
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                    outcomes["admitted"] += 1
                except grpc.aio.AioRpcError as error:
                    rejected = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    outcomes["rejected" if rejected else "errors"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


@dataclass(frozen=True)
class WindowMemory:
    """MEMORY USAGE of the window keys of one fill, in bytes."""

    limit: int
    clients: int
    entries: list[int]
    usage: list[int]
    reference_usage: int
    example_key: str

    @property
    def mean_usage(self) -> float:
        return statistics.fmean(self.usage) if self.usage else 0.0

    @property
    def full_windows(self) -> int:
        return sum(1 for count in self.entries if count == self.limit)


def window_memory(client: Any, key_prefix: str, clients: int, limit: int) -> WindowMemory:
    """Read ZCARD and MEMORY USAGE (SAMPLES 0, every element counted) of each
    client's window and of the reference client's."""
    keys = KeySpace(key_prefix)
    names = [keys.window(NAMESPACE_CLIENT, client_address(index)) for index in range(clients)]
    pipeline = client.pipeline(transaction=False)
    for name in names:
        pipeline.zcard(name)
        pipeline.memory_usage(name, samples=0)
    pipeline.memory_usage(keys.window(NAMESPACE_CLIENT, client_address(clients)), samples=0)
    replies = pipeline.execute()
    return WindowMemory(
        limit=limit,
        clients=clients,
        entries=[int(reply) for reply in replies[0:-1:2]],
        usage=[int(reply or 0) for reply in replies[1:-1:2]],
        reference_usage=int(replies[-1] or 0),
        example_key=names[0],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("target", help="gRPC HOST:PORT of the server.")
    parser.add_argument(
        "--clients", type=int, default=100, help=f"Clients to track, at most {MAX_CLIENTS}."
    )
    parser.add_argument(
        "--calls-per-client", type=int, default=10, help="Generate calls sent for each client."
    )
    parser.add_argument("--concurrency", type=int, default=64, help="Calls in flight.")
    return parser


def main() -> int:
    arguments = build_parser().parse_args()
    if not 1 <= arguments.clients <= MAX_CLIENTS:
        print(f"--clients must be 1 to {MAX_CLIENTS}, got {arguments.clients}", file=sys.stderr)
        return 2
    if arguments.calls_per_client < 1 or arguments.concurrency < 1:
        print(
            "--calls-per-client and --concurrency must be greater than 0, got "
            f"{arguments.calls_per_client} and {arguments.concurrency}",
            file=sys.stderr,
        )
        return 2
    outcomes = asyncio.run(
        fill(arguments.target, arguments.clients, arguments.calls_per_client, arguments.concurrency)
    )
    print(json.dumps(outcomes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
