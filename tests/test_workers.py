"""`tokenflow serve --workers N`: several server processes on one port,
supervised by a parent, tested as real processes on loopback sockets."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import make_settings
from tokenflow_grpc.server import WORKER_METADATA_KEY, TokenFlowServer
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


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
