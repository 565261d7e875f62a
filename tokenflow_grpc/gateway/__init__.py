"""The HTTP/JSON gateway in front of a TokenFlow gRPC server."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

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
    channel_credentials: Any = None,
    channel_options: Sequence[tuple[str, Any]] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> GatewayServer:
    """Start a gateway for TokenFlowService at target; return it once it listens.

    channel_credentials: TLS credentials of the channel to target, None for
    plaintext. ssl_context: serve HTTPS with it instead of HTTP.
    """
    if channel_credentials is None:
        channel = grpc.aio.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.aio.secure_channel(target, channel_credentials, options=channel_options)
    gateway = Gateway(
        channel,
        tokenflow_pb2.DESCRIPTOR.services_by_name.values(),
        trusted_proxies=trusted_proxies,
        max_body_bytes=max_body_bytes,
        web_dashboard=web_dashboard,
    )
    server = GatewayServer(gateway, access_log, ssl_context)
    await server.start(http_address)
    return server
