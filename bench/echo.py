"""A bare grpc.aio server, the reference that TokenFlow's Generate is measured against.

It serves the method path of `tokenflow.v1.TokenFlowService/Generate`, so
bench.load sends it the same GenerateRequest as TokenFlow, and every call
returns one fixed GenerateResponse: a cache-hit response that the benchmark
read from TokenFlow and saved to --response-file. Request and response are
therefore the same size as TokenFlow's. The server does nothing else: no
validation, no metadata, no Valkey. It prints its address and runs until
SIGTERM.

    python -m bench.echo --response-file response.bin
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from tokenflow_grpc.v1 import tokenflow_pb2 as pb

SERVICE = "tokenflow.v1.TokenFlowService"
METHOD = "Generate"
# bench.server reads the address from this line.
READY_LINE = "echo server is serving gRPC on {address}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument(
        "--response-file",
        type=Path,
        required=True,
        help="A serialized GenerateResponse, returned by every call.",
    )
    parser.add_argument(
        "--address", default="127.0.0.1:0", help="Listen address, HOST:PORT (default port 0)."
    )
    return parser


def echo_handler(response: pb.GenerateResponse) -> grpc.GenericRpcHandler:
    """Return a handler whose Generate parses the request and returns response."""

    async def generate(
        request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        return response

    method = grpc.unary_unary_rpc_method_handler(
        generate,
        request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.GenerateResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


async def serve(address: str, response: pb.GenerateResponse) -> None:
    # The same server options as TokenFlowServer.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((echo_handler(response),))
    port = server.add_insecure_port(address)
    await server.start()
    host = address.rsplit(":", 1)[0]
    print(READY_LINE.format(address=f"{host}:{port}"), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    arguments = build_parser().parse_args()
    response = pb.GenerateResponse.FromString(arguments.response_file.read_bytes())
    if not response.cached:
        print(
            f"invalid --response-file {arguments.response_file}: expected a GenerateResponse "
            "with cached set",
            file=sys.stderr,
        )
        return 2
    asyncio.run(serve(arguments.address, response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
