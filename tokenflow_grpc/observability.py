"""A server interceptor that gives every RPC a request id, counts and times
it in the Prometheus metrics, and logs one line per request at DEBUG.

The request id comes from the caller's x-request-id metadata when valid, is
generated when missing, and goes back in the response's trailing metadata,
on errors too. An invalid one fails the call with INVALID_ARGUMENT.

A request whose bytes do not parse as its message type also fails with
INVALID_ARGUMENT; left to gRPC, it would be UNKNOWN with a Python class name.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from tokenflow_grpc.identity import client_identity
from tokenflow_grpc.metrics import RPC_DURATION, RPCS_HANDLED
from tokenflow_grpc.request_id import (
    REQUEST_ID_KEY,
    InvalidRequestIdError,
    checked_request_id,
    current_request_id,
    new_request_id,
)
from tokenflow_grpc.settings import Network

logger = logging.getLogger(__name__)

# grpc_type label values, as go-grpc-prometheus names them.
TYPE_UNARY = "unary"
TYPE_SERVER_STREAM = "server_stream"
TYPE_CLIENT_STREAM = "client_stream"
TYPE_BIDI_STREAM = "bidi_stream"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request ids, RPC metrics and request log lines for every method of the server."""

    def __init__(self, trusted_proxies: tuple[Network, ...]) -> None:
        """trusted_proxies: as --trusted-proxies, to log the client identity the limiter uses."""
        self.trusted_proxies = trusted_proxies

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None or handler.unary_stream is not None:
            deserializer = _tolerant(handler.request_deserializer)
            handler = handler._replace(request_deserializer=deserializer)
        rpc = _Rpc(self, handler_call_details.method)
        if handler.unary_unary is not None:
            rpc.kind = TYPE_UNARY
            return handler._replace(unary_unary=rpc.wrap_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            rpc.kind = TYPE_SERVER_STREAM
            return handler._replace(unary_stream=rpc.wrap_stream(handler.unary_stream))
        if handler.stream_unary is not None:
            rpc.kind = TYPE_CLIENT_STREAM
            return handler._replace(stream_unary=rpc.wrap_unary(handler.stream_unary))
        rpc.kind = TYPE_BIDI_STREAM
        return handler._replace(stream_stream=rpc.wrap_stream(handler.stream_stream))


class _Rpc:
    """The wrappers of one method's handler."""

    def __init__(self, interceptor: ObservabilityInterceptor, full_method: str) -> None:
        self.interceptor = interceptor
        self.service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.kind = TYPE_UNARY

    def wrap_unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            request_id, invalid = self._request_id(context)
            code = grpc.StatusCode.UNKNOWN
            try:
                if invalid:
                    await _reject_request_id(context, invalid, request_id)
                if isinstance(request, Undecodable):
                    await _reject_undecodable(context, request, request_id)
                response = await behavior(request, _RequestIdContext(context, request_id))
                code = _code_of(context)
                return response
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except BaseException as error:
                code = _code_of_exception(error)
                raise
            finally:
                self._finish(context, request, request_id, code, start)

        return observed

    def wrap_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A streaming handler that writes with context.write and returns None.
            return self.wrap_unary(behavior)

        async def observed(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            request_id, invalid = self._request_id(context)
            code = grpc.StatusCode.UNKNOWN
            try:
                if invalid:
                    await _reject_request_id(context, invalid, request_id)
                if isinstance(request, Undecodable):
                    await _reject_undecodable(context, request, request_id)
                async for response in behavior(request, _RequestIdContext(context, request_id)):
                    yield response
                code = _code_of(context)
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except BaseException as error:
                code = _code_of_exception(error)
                raise
            finally:
                self._finish(context, request, request_id, code, start)

        return observed

    def _request_id(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
        """Return (the call's request id, why the caller's id is invalid or "")."""
        caller_ids = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == REQUEST_ID_KEY and isinstance(value, str)
        ]
        if not caller_ids:
            request_id, invalid = new_request_id(), ""
        else:
            try:
                request_id, invalid = checked_request_id(caller_ids[0]), ""
            except InvalidRequestIdError as error:
                request_id, invalid = new_request_id(), str(error)
        current_request_id.set(request_id)
        return request_id, invalid

    def _finish(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any,
        request_id: str,
        code: grpc.StatusCode,
        start: float,
    ) -> None:
        duration = time.perf_counter() - start
        trailing = tuple(context.trailing_metadata() or ())
        if not any(key == REQUEST_ID_KEY for key, _ in trailing):
            context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, request_id)))

        RPCS_HANDLED.labels(self.service, self.method, self.kind, code.name).inc()
        RPC_DURATION.labels(self.service, self.method, self.kind).observe(duration)
        if logger.isEnabledFor(logging.DEBUG):
            self._log(context, request, request_id, code, duration)

    def _log(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any,
        request_id: str,
        code: grpc.StatusCode,
        duration: float,
    ) -> None:
        """Log the request's method, status, duration, client and size; never its content."""
        forwarded = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == "x-forwarded-for" and isinstance(value, str)
        ]
        client = client_identity(context.peer(), forwarded, self.interceptor.trusted_proxies)
        request_bytes = request.ByteSize() if hasattr(request, "ByteSize") else None
        fields = {
            "request_id": request_id,
            "method": f"{self.service}/{self.method}",
            "code": code.name,
            "duration_ms": round(duration * 1000, 3),
            "client": client,
            "request_bytes": request_bytes,
        }
        logger.debug(
            "%s %s in %.1f ms, client %s, request %s bytes, request id %s",
            fields["method"],
            code.name,
            duration * 1000,
            client,
            "-" if request_bytes is None else request_bytes,
            request_id,
            extra=fields,
        )


class _RequestIdContext:
    """The handler's view of its ServicerContext, which adds the request id to
    the trailing metadata that the handler sets or aborts with.

    gRPC sends the trailing metadata passed to context.abort(), and ignores
    set_trailing_metadata() after it, so the id must go in with the call.
    """

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], request_id: str) -> None:
        self._context = context
        self._request_id = request_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata(self._with_request_id(trailing_metadata))

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        await self._context.abort(code, details, self._with_request_id(trailing_metadata))
        raise AssertionError("context.abort returned")  # abort always raises

    def _with_request_id(self, metadata: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
        kept = tuple(pair for pair in metadata if pair[0] != REQUEST_ID_KEY)
        return (*kept, (REQUEST_ID_KEY, self._request_id))


async def _reject_request_id(
    context: grpc.aio.ServicerContext[Any, Any], message: str, request_id: str
) -> NoReturn:
    """Fail the call with INVALID_ARGUMENT, sending the id generated in place of the caller's."""
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=((REQUEST_ID_KEY, request_id),)
    )
    raise AssertionError("context.abort returned")  # abort always raises


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    type_name: str
    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so that a parse error returns Undecodable."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request message")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return Undecodable(type_name, str(error))

    return deserialize


async def _reject_undecodable(
    context: grpc.aio.ServicerContext[Any, Any], request: Undecodable, request_id: str
) -> NoReturn:
    """Fail a call whose request did not parse with INVALID_ARGUMENT."""
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid {request.type_name}: {request.error}",
        trailing_metadata=((REQUEST_ID_KEY, request_id),),
    )
    raise AssertionError("context.abort returned")  # abort always raises


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """Return the status the handler set with abort or set_code; OK when it set none."""
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for status_code in grpc.StatusCode:
        if status_code.value[0] == code:
            return status_code
    return grpc.StatusCode.UNKNOWN


def _code_of_exception(error: BaseException) -> grpc.StatusCode:
    """Return the status gRPC sends for a handler that raised error."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
