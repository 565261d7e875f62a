"""Responses that the gateway sends itself, each with a google.rpc.Status body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc
from aiohttp import web

from tokenflow_grpc.gateway.transcode import http_status, status_json

# The methods of a resource that GET serves. RFC 9110 (section 9.3.2) defines
# HEAD as GET without the response body.
READ_METHODS = ("GET", "HEAD")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(status_json(code, message), status=http_status(code), headers=headers)


def method_not_allowed(request: web.Request, allowed: Sequence[str]) -> web.Response:
    """Return 405 for request, listing the allowed methods in Allow and in the message."""
    methods = ", ".join(allowed)
    return web.json_response(
        status_json(
            grpc.StatusCode.UNIMPLEMENTED,
            f"method {request.method} is not allowed on {request.path}; allowed: {methods}",
        ),
        status=405,
        headers={"Allow": methods},
    )


def read_only(handler: Handler) -> Handler:
    """Wrap handler so that it serves GET and HEAD and returns 405 for other methods."""

    async def checked(request: web.Request) -> web.StreamResponse:
        if request.method not in READ_METHODS:
            return method_not_allowed(request, READ_METHODS)
        return await handler(request)

    return checked
