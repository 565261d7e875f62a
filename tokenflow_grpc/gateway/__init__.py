"""The HTTP/JSON gateway in front of a TokenFlow gRPC server."""

from __future__ import annotations

import grpc

from tokenflow_grpc.gateway.app import Gateway, GatewayServer
from tokenflow_grpc.settings import Network
from tokenflow_grpc.v1 import tokenflow_pb2

__all__ = ["Gateway", "GatewayServer", "start_gateway"]


async def start_gateway(
    target: str,
    http_address: str,
    trusted_proxies: tuple[Network, ...] = (),
    max_body_bytes: int = 1024 * 1024,
    access_log: bool = False,
    web_dashboard: bool = True,
) -> GatewayServer:
    """Start a gateway for TokenFlowService at target; return it once it listens."""
    channel = grpc.aio.insecure_channel(target)
    gateway = Gateway(
        channel,
        tokenflow_pb2.DESCRIPTOR.services_by_name.values(),
        trusted_proxies=trusted_proxies,
        max_body_bytes=max_body_bytes,
        web_dashboard=web_dashboard,
    )
    server = GatewayServer(gateway, access_log)
    await server.start(http_address)
    return server
