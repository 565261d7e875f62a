"""X-Request-Id on the gateway: the client's header when valid, else a new
id, sent to the server as x-request-id metadata and returned on every
response, streams and the gateway's own errors included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from tokenflow_grpc.errors import quoted
from tokenflow_grpc.gateway.headers import Metadata
from tokenflow_grpc.gateway.transcode import status_json
from tokenflow_grpc.request_id import (
    REQUEST_ID_KEY,
    REQUEST_ID_RULE,
    InvalidRequestIdError,
    checked_request_id,
    new_request_id,
)

HEADER = "X-Request-Id"
# aiohttp 3.13 and later warn about plain string keys; older ones lack RequestKey.
_STATE_KEY: Any = (
    web.RequestKey("tokenflow_request_id", str)
    if hasattr(web, "RequestKey")
    else "tokenflow_request_id"
)


@web.middleware
async def request_ids(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give the request an id before any other handling; reject an invalid one with 400."""
    header_value = request.headers.get(HEADER)
    if header_value is None:
        request_id = new_request_id()
    else:
        try:
            request_id = checked_request_id(header_value)
        except InvalidRequestIdError:
            request[_STATE_KEY] = new_request_id()
            message = (
                f"invalid header {HEADER!r}: expected {REQUEST_ID_RULE}, got {quoted(header_value)}"
            )
            body = status_json(grpc.StatusCode.INVALID_ARGUMENT, message)
            return web.json_response(body, status=400)
    request[_STATE_KEY] = request_id
    return await handler(request)


def with_request_id(request: web.Request, metadata: Metadata) -> None:
    """Add the request's id, the one that X-Request-Id returns, to metadata."""
    request_id = request.get(_STATE_KEY)
    if request_id:
        metadata.append((REQUEST_ID_KEY, request_id))


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Set X-Request-Id on a response as it is prepared (an on_response_prepare signal)."""
    request_id = request.get(_STATE_KEY)
    if request_id:
        response.headers[HEADER] = request_id
