"""A bare grpc.aio server, the floor that bench.workers compares Generate with.

It serves `tokenflow.v1.TokenFlowService/Generate` on a loopback port the
kernel chooses and returns the same bytes for every call: a serialized
cache-hit GenerateResponse recorded from a real server. It parses neither
the request nor the response and sends no metadata, so a call costs only
gRPC itself, with the message sizes of a real cache hit.

    python -m bench.echo RESPONSE_FILE
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc

SERVICE = "tokenflow.v1.TokenFlowService"


async def serve(response: bytes) -> None:
    """Serve until the process is killed, and print the address once it listens."""

    async def generate(request: bytes, context: Any) -> bytes:
        return response

    server = grpc.aio.server()
    # Without serializers the handler receives and returns raw bytes.
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Generate": grpc.unary_unary_rpc_method_handler(generate)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo serving gRPC on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("response_file", type=Path, help="The response bytes of every call.")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.response_file.read_bytes()))


if __name__ == "__main__":
    main()
