"""The HTTP/JSON gateway: an aiohttp application that transcodes each request
to a call on a gRPC channel, like grpc-gateway. Routes come from the
services' google.api.http annotations; the gateway never imports the core."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Iterable
from typing import Any

import grpc
from aiohttp import log as aiohttp_log
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import descriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenflow_grpc.gateway.bodies import (
    SUPPORTED_CODINGS,
    BodyTooLargeError,
    UnsupportedEncodingError,
    content_codings,
    decode_body,
)
from tokenflow_grpc.gateway.headers import (
    HeaderError,
    Metadata,
    challenge_headers,
    parse_timeout,
    request_metadata,
    response_headers,
)
from tokenflow_grpc.gateway.openapi import build_openapi
from tokenflow_grpc.gateway.protocol_log import ProtocolLogger
from tokenflow_grpc.gateway.request_ids import (
    add_request_id_header,
    request_ids,
    with_request_id,
)
from tokenflow_grpc.gateway.responses import (
    READ_METHODS,
    Handler,
    error_response,
    method_not_allowed,
    read_only,
)
from tokenflow_grpc.gateway.routes import RESUME_FIELD, InvalidPathError, Route, routes_for
from tokenflow_grpc.gateway.transcode import (
    TranscodeError,
    build_request,
    error_json,
    http_status,
    status_json,
    to_json,
)
from tokenflow_grpc.gateway.web import WebDashboard
from tokenflow_grpc.settings import Network

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
# A response with this field path gives each SSE event its id.
EVENT_ID_PATH = ("event", "id")
SSE_KEEPALIVE_SECONDS = 15.0
# How long a stopping gateway lets its requests finish, as long as the gRPC
# server's drain. Streams that can resume end at once instead.
SHUTDOWN_GRACE_SECONDS = 10.0
# Stream ids are two 20-digit numbers and a dash.
MAX_EVENT_ID_LENGTH = 41
HEALTH_TIMEOUT_SECONDS = 2.0


@web.middleware
async def status_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every error response, aiohttp's own included, a google.rpc.Status body."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size  # NOTE: aiohttp keeps the limit only here.
        body = status_json(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body exceeds the maximum of {limit} bytes (--http-max-body-bytes)",
        )
        return web.json_response(body, status=413)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = (
            grpc.StatusCode.NOT_FOUND if error.status == 404 else grpc.StatusCode.INVALID_ARGUMENT
        )
        return web.json_response(status_json(code, error.reason), status=error.status)
    except Exception:
        logger.exception("gateway failed on %s %s", request.method, request.path)
        return error_response(grpc.StatusCode.INTERNAL, "internal gateway error")


class Gateway:
    """Routes HTTP requests to the methods of services on a gRPC channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        services: Iterable[descriptor.ServiceDescriptor],
        trusted_proxies: tuple[Network, ...] = (),
        max_body_bytes: int = 1024 * 1024,
        web_dashboard: bool = True,
    ) -> None:
        """web_dashboard: serve the dashboard page at `/` and its files under /static/."""
        self.channel = channel
        self.web_dashboard = WebDashboard() if web_dashboard else None
        self.routes = routes_for(services)
        self.trusted_proxies = trusted_proxies
        self.max_body_bytes = max_body_bytes
        self.openapi = build_openapi(self.routes)
        self._callables = {route.grpc_path: self._callable(route) for route in self.routes}
        self._health = health_pb2_grpc.HealthStub(channel)
        # Open gRPC streams, each mapped to True when it can resume.
        self._streams: dict[Any, bool] = {}
        self.closing = False

    def end_streams(self) -> None:
        """Cancel the open streams that can resume (WatchActivity), which then
        end with an UNAVAILABLE error line. The others (GenerateStream) run on
        to their end, within the shutdown grace."""
        self.closing = True
        for call, resumable in list(self._streams.items()):
            if resumable:
                call.cancel()

    def _callable(self, route: Route) -> Any:
        factory = self.channel.unary_stream if route.server_streaming else self.channel.unary_unary
        return factory(
            route.grpc_path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[request_ids, status_errors]
        )
        app.on_response_prepare.append(add_request_id_header)
        app.router.add_route("*", "/healthz", read_only(self.healthz))
        app.router.add_route("*", "/openapi.json", read_only(self.openapi_document))
        if self.web_dashboard is not None:
            self.web_dashboard.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        """Report the server's overall gRPC health: 200 when SERVING, else 503."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            return web.json_response({"status": "UNKNOWN", "error": error_json(error)}, status=503)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        return web.json_response({"status": name}, status=200 if ok else 503)

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    def find_route(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        """Return the route and decoded path variables for a request, or raise 404 or 405.

        raw_path is the percent-encoded path. A GET route also serves HEAD.
        Raises InvalidPathError when the path does not decode to UTF-8.
        """
        allowed: set[str] = set()
        for route in self.routes:
            values = route.template.match(raw_path)
            if values is None:
                continue
            methods = READ_METHODS if route.http_method == "GET" else (route.http_method,)
            if method in methods:
                return route, values
            allowed.update(methods)
        if allowed:
            raise web.HTTPMethodNotAllowed(method, sorted(allowed))
        raise web.HTTPNotFound(reason=f"no route for {raw_path}")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            route, path_values = self.find_route(request.method, request.rel_url.raw_path)
        except InvalidPathError as error:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except web.HTTPMethodNotAllowed as error:
            return method_not_allowed(request, sorted(error.allowed_methods))
        except web.HTTPNotFound:
            return error_response(grpc.StatusCode.NOT_FOUND, f"no route for {request.path}")

        try:
            body = await _read_body(request, self.max_body_bytes) if route.body else b""
            query = {key: request.query.getall(key) for key in request.query.keys()}
            message = build_request(route, path_values, query, body)
            timeout = _timeout(request)
            metadata = request_metadata(request.headers, request.remote, self.trusted_proxies)
            with_request_id(request, metadata)
        except UnsupportedEncodingError as error:
            return web.json_response(
                status_json(grpc.StatusCode.INVALID_ARGUMENT, str(error)),
                status=415,
                headers={"Accept-Encoding": ", ".join(SUPPORTED_CODINGS)},
            )
        except (TranscodeError, HeaderError) as error:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        if route.server_streaming:
            return await self.stream(request, route, message, metadata, timeout)
        return await self.unary(route, message, metadata, timeout)

    async def unary(
        self,
        route: Route,
        message: Message,
        metadata: Metadata,
        timeout: float | None,
    ) -> web.Response:
        call = self._callables[route.grpc_path](message, metadata=metadata, timeout=timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            return _rpc_error_response(error)
        headers = response_headers(await call.initial_metadata(), await call.trailing_metadata())
        return web.json_response(to_json(response), headers=headers)

    async def stream(
        self,
        request: web.Request,
        route: Route,
        message: Message,
        metadata: Metadata,
        timeout: float | None,
    ) -> web.StreamResponse:
        """Relay a server stream as NDJSON, or as Server-Sent Events when accepted."""
        sse = EVENT_STREAM in request.headers.get("Accept", "").lower()
        last_event_id = request.headers.get("Last-Event-ID", "")
        if sse and last_event_id and RESUME_FIELD in message.DESCRIPTOR.fields_by_name:
            if not last_event_id.isascii() or len(last_event_id) > MAX_EVENT_ID_LENGTH:
                return error_response(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"invalid Last-Event-ID: expected an event id of at most "
                    f"{MAX_EVENT_ID_LENGTH} ASCII characters",
                )
            setattr(message, RESUME_FIELD, last_event_id)

        call = self._callables[route.grpc_path](message, metadata=metadata, timeout=timeout)
        resumable = RESUME_FIELD in message.DESCRIPTOR.fields_by_name
        self._streams[call] = resumable
        try:
            return await self._relay_stream(request, call, sse, resumable)
        finally:
            self._streams.pop(call, None)

    async def _relay_stream(
        self, request: web.Request, call: Any, sse: bool, resumable: bool
    ) -> web.StreamResponse:
        try:
            initial = await call.initial_metadata()
            if call.done() and await call.code() != grpc.StatusCode.OK:
                raise await _call_error(call)
        except grpc.aio.AioRpcError as error:
            return _rpc_error_response(error)

        response = web.StreamResponse(
            headers={
                "Content-Type": EVENT_STREAM if sse else NDJSON,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **response_headers(initial, None),
            }
        )
        await response.prepare(request)
        if request.method == "HEAD":
            call.cancel()  # HEAD gets the stream's headers and no body.
            await response.write_eof()
            return response
        writer = _StreamWriter(response, sse)
        keepalive = asyncio.create_task(writer.keepalive()) if sse else None
        try:
            async for item in call:
                await writer.result(to_json(item), _event_id(item))
        except grpc.aio.AioRpcError as error:
            await writer.error(error_json(error))
        except asyncio.CancelledError:
            if not self.closing:
                raise  # The HTTP client went away.
            message = (
                "the gateway is shutting down; reconnect and resume from the last event id"
                if resumable
                else "the gateway shut down before the stream ended; send the request again"
            )
            await writer.error(status_json(grpc.StatusCode.UNAVAILABLE, message))
        finally:
            call.cancel()
            if keepalive is not None:
                keepalive.cancel()
        await response.write_eof()
        return response


class _StreamWriter:
    """Writes NDJSON lines or SSE events, one at a time."""

    def __init__(self, response: web.StreamResponse, sse: bool) -> None:
        self.response = response
        self.sse = sse
        self.lock = asyncio.Lock()

    async def _write(self, text: str) -> None:
        async with self.lock:
            await self.response.write(text.encode("utf-8"))

    async def result(self, result: dict[str, Any], event_id: str | None) -> None:
        if not self.sse:
            await self._write(json.dumps({"result": result}, separators=(",", ":")) + "\n")
            return
        head = f"id: {event_id}\n" if event_id else ""
        await self._write(f"{head}data: {json.dumps(result, separators=(',', ':'))}\n\n")

    async def error(self, status: dict[str, Any]) -> None:
        if not self.sse:
            await self._write(json.dumps({"error": status}, separators=(",", ":")) + "\n")
            return
        await self._write(f"event: error\ndata: {json.dumps(status, separators=(',', ':'))}\n\n")

    async def keepalive(self) -> None:
        """Send an SSE comment now and then, so idle proxies keep the stream open."""
        while True:
            await asyncio.sleep(SSE_KEEPALIVE_SECONDS)
            await self._write(": keepalive\n\n")


async def _read_body(request: web.Request, max_bytes: int) -> bytes:
    """Read the body and undo its Content-Encoding.

    Raises UnsupportedEncodingError for a coding the gateway cannot decode,
    TranscodeError for a body that cannot be read or decoded, and 413 for a
    body over max_bytes, before or after decoding.
    """
    codings = content_codings(request.headers.getall("Content-Encoding", []))
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    except web.HTTPException as error:
        raise TranscodeError(f"cannot read the body: {error.text or error.reason}") from error
    except (RequestPayloadError, ValueError, OSError) as error:
        raise TranscodeError(f"cannot read the body: {error}") from error
    try:
        return decode_body(body, codings, max_bytes)
    except BodyTooLargeError as error:
        raise web.HTTPRequestEntityTooLarge(
            max_size=max_bytes, actual_size=max_bytes + 1
        ) from error


def _timeout(request: web.Request) -> float | None:
    header = request.headers.get("Grpc-Timeout")
    return parse_timeout(header) if header else None


def _event_id(message: Message) -> str | None:
    current: Any = message
    for name in EVENT_ID_PATH:
        if name not in current.DESCRIPTOR.fields_by_name:
            return None
        current = getattr(current, name)
    return str(current) or None


async def _call_error(call: Any) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        await call.code(),
        await call.initial_metadata(),
        await call.trailing_metadata(),
        await call.details(),
    )


def _rpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    headers = response_headers(error.initial_metadata(), error.trailing_metadata())
    headers.update(challenge_headers(error.code()))
    return web.json_response(error_json(error), status=http_status(error.code()), headers=headers)


class GatewayServer:
    """A running gateway: an aiohttp server and its gRPC channel."""

    def __init__(
        self,
        gateway: Gateway,
        access_log: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """access_log: log one line per request (aiohttp.access, INFO); off by
        default because it costs about 6% of a cache hit's time. ssl_context:
        serve HTTPS with it instead of HTTP."""
        self.gateway = gateway
        self.ssl_context = ssl_context
        self.runner = web.AppRunner(
            gateway.application(),
            handler_cancellation=True,
            access_log=aiohttp_log.access_logger if access_log else None,
            # bodies.py decodes Content-Encoding, so that unsupported codings get 415.
            auto_decompress=False,
            logger=ProtocolLogger(),
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        self.port = 0

    async def start(self, address: str) -> int:
        """Listen on HOST:PORT and return the bound port."""
        host, _, port = address.rpartition(":")
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host.strip("[]") or "127.0.0.1", int(port), ssl_context=self.ssl_context
        )
        await site.start()
        server = site._server  # NOTE: aiohttp exposes the bound port only here.
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        scheme = "HTTPS" if self.ssl_context is not None else "HTTP"
        logger.info("gateway serving %s on %s (port %d)", scheme, address, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening, end the streams that can resume, and wait up to
        SHUTDOWN_GRACE_SECONDS for the other requests to finish."""
        self.gateway.end_streams()
        await self.runner.cleanup()
        await self.gateway.channel.close()
        logger.info("gateway stopped")
