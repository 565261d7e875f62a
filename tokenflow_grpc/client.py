"""Clients of TokenFlowService: AsyncTokenFlowClient (asyncio) and
TokenFlowClient (blocking), with the same methods.

Every call has a deadline. Only UNAVAILABLE is retried, with exponential
backoff and jitter, or after the delay the server asked for when that is
longer, until `retries` extra attempts or the deadline run out:

- stats() and watch() retry every UNAVAILABLE: they change nothing.
- generate() and generate_stream() retry an UNAVAILABLE that the server's
  handler did not send (the server unreachable, restarting or stopping).
  One that the handler sent (the upstream failing, Valkey down under the
  deny policy) is raised: the call may already have been counted.
  generate_stream() also retries only until its first message, so no text
  is delivered twice.
- simulate() is never retried: a burst is not idempotent.

A rejected Generate raises RateLimitExceeded, which carries the rate-limit
figures and the delay the server asks for; retry_delay() reads that delay
from any error. watch() reconnects after a dropped stream and resumes after
the last event it delivered, so no event still in the stream is lost or
repeated, and the first response after the resume counts in `dropped` the
events trimmed from the stream meanwhile.

NOTE: a connection lost while a Generate runs looks the same as one lost
before the call arrived, so that call may be retried and counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from tokenflow_grpc.request_id import REQUEST_ID_KEY
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
SIMULATE_TIMEOUT = 120.0
# One year: gRPC turns much longer deadlines into an immediate DEADLINE_EXCEEDED.
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600.0
DEFAULT_RETRIES = 3
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 2.0
# The resume point of a watch that starts with "new events only" and has
# seen none yet: every entry of an empty stream comes after it.
STREAM_START = "0-0"

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# gRPC's own reconnect backoff grows to 120 s by default, so a client would
# notice a restarted server up to two minutes late. These options cap it at 2 s.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
DETAILS_METADATA_KEY = "grpc-status-details-bin"

Result = TypeVar("Result")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateLimitInfo:
    """Rate-limit metadata of one Generate call; None where the server sent none
    (it sends none while it serves calls without Valkey)."""

    limit: int | None
    remaining: int | None
    reset_seconds: int | None
    window_seconds: int | None
    retry_after_seconds: int | None

    @classmethod
    def from_metadata(cls, *metadata: Sequence[tuple[str, Any]] | None) -> RateLimitInfo:
        values: dict[str, int] = {}
        for pairs in metadata:
            for key, value in pairs or ():
                if isinstance(value, str) and value.isdigit():
                    values[key] = int(value)
        return cls(
            values.get("x-ratelimit-limit"),
            values.get("x-ratelimit-remaining"),
            values.get("x-ratelimit-reset"),
            values.get("x-ratelimit-window"),
            values.get("retry-after"),
        )


@dataclass(frozen=True)
class GenerateReply:
    """A Generate response with the rate-limit metadata that came with it."""

    response: pb.GenerateResponse
    rate_limit: RateLimitInfo


class RateLimitExceeded(grpc.aio.AioRpcError):  # type: ignore[misc]
    """A Generate call rejected with RESOURCE_EXHAUSTED.

    rate_limit has the figures from the metadata; retry_after is the delay in
    seconds from google.rpc.RetryInfo, or from retry-after when the details
    are missing.
    """

    def __init__(self, error: grpc.RpcError) -> None:
        initial = _metadata(error, "initial_metadata")
        trailing = _metadata(error, "trailing_metadata")
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(*initial),
            grpc.aio.Metadata(*trailing),
            error.details() if hasattr(error, "details") else str(error),
        )
        self.rate_limit = RateLimitInfo.from_metadata(initial, trailing)
        self.retry_after = retry_delay(error)


def _metadata(error: grpc.RpcError, name: str) -> tuple[tuple[str, Any], ...]:
    getter = getattr(error, name, None)
    pairs = getter() if callable(getter) else None
    return tuple((key, value) for key, value in pairs or ())


def retry_delay(error: grpc.RpcError) -> float | None:
    """Return the seconds the server asked the caller to wait before trying
    again: google.rpc.RetryInfo, else the retry-after metadata; None if neither."""
    trailing = _metadata(error, "trailing_metadata")
    for key, value in trailing:
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                retry_info = error_details_pb2.RetryInfo()
                if detail.Unpack(retry_info):
                    return float(retry_info.retry_delay.ToTimedelta().total_seconds())
    rate_limit = RateLimitInfo.from_metadata(_metadata(error, "initial_metadata"), trailing)
    if rate_limit.retry_after_seconds is not None:
        return float(rate_limit.retry_after_seconds)
    return None


def _answered(error: grpc.RpcError) -> bool:
    """Return True when TokenFlow's handler sent error: it adds x-request-id to
    the trailing metadata of every response, errors included."""
    return any(key == REQUEST_ID_KEY for key, _ in _metadata(error, "trailing_metadata"))


def generate_request(
    prompt: str,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    skip_cache: bool,
    cache_ttl: float | None = None,
    cache_namespace: str = "",
) -> pb.GenerateRequest:
    """Build a GenerateRequest; None leaves an optional field unset.

    cache_ttl is in seconds; the server rounds fractions of a second up.
    """
    request = pb.GenerateRequest(
        prompt=prompt, skip_cache=skip_cache, cache_namespace=cache_namespace
    )
    if model is not None:
        request.model = model
    if temperature is not None:
        request.temperature = temperature
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if cache_ttl is not None:
        request.cache_ttl.FromTimedelta(timedelta(seconds=cache_ttl))
    return request


def stream_request(request: pb.GenerateRequest) -> pb.GenerateStreamRequest:
    """Return request as a GenerateStreamRequest; the two messages share their
    fields and field numbers, so the wire form carries over unchanged."""
    return pb.GenerateStreamRequest.FromString(request.SerializeToString())


# Retry policies: the UNAVAILABLE failures a method retries (see the module docstring).
RETRY_ANY = "any"
RETRY_UNANSWERED = "unanswered"
RETRY_NEVER = "never"


def _retry_wait(
    error: grpc.RpcError, policy: str, attempt: int, retries: int, deadline: float
) -> float | None:
    """Return the wait before retrying a call that failed with error, or None
    when it must not be retried."""
    if _code(error) not in RETRYABLE or attempt >= retries or policy == RETRY_NEVER:
        return None
    if policy == RETRY_UNANSWERED and _answered(error):
        return None
    wait = max(backoff_delay(attempt), retry_delay(error) or 0.0)
    if time.monotonic() + wait >= deadline:
        return None
    return wait


def _checked_timeout(seconds: float) -> float:
    """Return seconds; raise ValueError unless 0 < seconds <= MAX_TIMEOUT_SECONDS."""
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"timeout must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_SECONDS:g}, got {seconds!r}"
        )
    return seconds


def _deadline(timeout: float | None, default: float) -> float:
    """Return the monotonic deadline of a call; None means default seconds."""
    return time.monotonic() + _checked_timeout(default if timeout is None else timeout)


def _rate_limited(error: grpc.RpcError) -> bool:
    """Return True when the server's limiter rejected the call. gRPC's own
    RESOURCE_EXHAUSTED (a message or metadata over its size limit) is not."""
    return _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED and _answered(error)


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Return the wait before retry number attempt (counted from 0).

    The ceiling doubles from 0.1 s up to 2 s; the wait is drawn from its upper half.
    """
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**attempt)
    return (rng or random).uniform(ceiling / 2, ceiling)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """Return the status of a call's error; None when it has none."""
    if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)):
        code: grpc.StatusCode = error.code()
        return code
    return None


def _channel_metadata(
    metadata: Sequence[tuple[str, str]], api_key: str | None
) -> tuple[tuple[str, str], ...]:
    pairs = tuple(metadata)
    if api_key is not None:
        pairs += (("authorization", f"Bearer {api_key}"),)
    return pairs


def _watch_ended(code: grpc.StatusCode | None, end: float | None) -> bool:
    """Return True when a watch stopped because its own timeout ran out."""
    return code == grpc.StatusCode.DEADLINE_EXCEEDED and end is not None


def _reconnect_wait(error: grpc.RpcError, attempt: int, last_id: str) -> float:
    """Return the wait before reconnecting a dropped watch, and log the reconnect,
    so that the log shows why a watch whose server stays away is silent."""
    wait = backoff_delay(attempt)
    details = error.details() if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)) else ""
    logger.warning(
        "watch stream lost (%s: %s); reconnecting in %.1f s, attempt %d, resuming after %s",
        getattr(_code(error), "name", "UNKNOWN"),
        details,
        wait,
        attempt + 1,
        last_id or "the newest event",
    )
    return wait


def _resume_point(stats: pb.GetStatsResponse) -> str:
    """Return the id after which a "new events only" watch starts.

    Without Valkey the newest id is unknown, so the watch starts empty and
    the server delivers events from its subscription on.
    """
    if not stats.connected:
        return ""
    return stats.activity[0].id if stats.activity else STREAM_START


def _watch_request(since_id: str, types: Sequence[int]) -> pb.WatchActivityRequest:
    return pb.WatchActivityRequest(
        since_id=since_id, types=[pb.ActivityType.ValueType(value) for value in types]
    )


class AsyncTokenFlowClient:
    """asyncio client over one channel; use it as an async context manager.

    credentials: TLS channel credentials (grpc.ssl_channel_credentials()),
    None for plaintext. api_key: sent as `authorization: Bearer KEY`.
    metadata: sent with every call.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        retries: int = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.metadata = _channel_metadata(metadata, api_key)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=[*CHANNEL_OPTIONS, *options])
        else:
            self.channel = grpc.aio.secure_channel(
                target, credentials, options=[*CHANNEL_OPTIONS, *options]
            )
        self.stub = pb_grpc.TokenFlowServiceStub(self.channel)

    async def __aenter__(self) -> AsyncTokenFlowClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(
        self,
        attempt_call: Callable[[float], Awaitable[Result]],
        timeout: float | None,
        policy: str,
        default_timeout: float | None = None,
    ) -> Result:
        """Run attempt_call(remaining seconds) until it succeeds or policy
        allows no more retries."""
        deadline = _deadline(timeout, default_timeout or self.timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await attempt_call(max(remaining, 0.001))
            except grpc.RpcError as error:
                wait = _retry_wait(error, policy, attempt, self.retries, deadline)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        skip_cache: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        cache_ttl: float | None = None,
        cache_namespace: str = "",
    ) -> GenerateReply:
        """Call Generate; raise RateLimitExceeded when the client is over its limit.

        cache_ttl (seconds) and cache_namespace are GenerateRequest's fields
        of those names; None and "" leave the server's defaults.
        """
        request = generate_request(
            prompt, model, temperature, max_tokens, skip_cache, cache_ttl, cache_namespace
        )

        async def attempt(remaining: float) -> GenerateReply:
            call = self.stub.Generate(
                request, timeout=remaining, metadata=self.metadata + tuple(metadata)
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as error:
                if _rate_limited(error):
                    raise RateLimitExceeded(error) from None
                raise
            headers = RateLimitInfo.from_metadata(
                await call.initial_metadata(), await call.trailing_metadata()
            )
            return GenerateReply(response, headers)

        return await self._call(attempt, timeout, RETRY_UNANSWERED)

    async def generate_stream(
        self,
        prompt: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        skip_cache: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        cache_ttl: float | None = None,
        cache_namespace: str = "",
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Call GenerateStream and yield its messages: the text deltas, then a
        last message with no text and the final fields (cached, model, usage,
        rate_limit, token_budget).

        timeout bounds the whole stream. A rejected call raises
        RateLimitExceeded before any message. UNAVAILABLE is retried as for
        generate(), and only while no message has arrived, so no text is
        delivered twice.
        """
        request = stream_request(
            generate_request(
                prompt, model, temperature, max_tokens, skip_cache, cache_ttl, cache_namespace
            )
        )
        deadline = _deadline(timeout, self.timeout)
        attempt = 0
        while True:
            call = self.stub.GenerateStream(
                request,
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=self.metadata + tuple(metadata),
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as error:
                if _rate_limited(error):
                    raise RateLimitExceeded(error) from None
                policy = RETRY_NEVER if received else RETRY_UNANSWERED
                wait = _retry_wait(error, policy, attempt, self.retries, deadline)
                if wait is None:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(wait)
            attempt += 1

    async def stats(
        self, activity_limit: int = 0, timeout: float | None = None
    ) -> pb.GetStatsResponse:
        request = pb.GetStatsRequest(activity_limit=activity_limit)

        async def attempt(remaining: float) -> pb.GetStatsResponse:
            response: pb.GetStatsResponse = await self.stub.GetStats(
                request, timeout=remaining, metadata=self.metadata
            )
            return response

        return await self._call(attempt, timeout, RETRY_ANY)

    async def simulate(self, count: int = 0, timeout: float | None = None) -> pb.SimulateResponse:
        request = pb.SimulateRequest(count=count)

        async def attempt(remaining: float) -> pb.SimulateResponse:
            response: pb.SimulateResponse = await self.stub.Simulate(
                request, timeout=remaining, metadata=self.metadata
            )
            return response

        return await self._call(attempt, timeout, RETRY_NEVER, max(self.timeout, SIMULATE_TIMEOUT))

    async def watch(
        self,
        since_id: str = "",
        types: Sequence[int] = (),
        timeout: float | None = None,
        reconnect: bool = True,
    ) -> AsyncIterator[pb.WatchActivityResponse]:
        """Yield activity events until the caller stops, or until timeout seconds
        pass, when the iteration simply ends.

        With reconnect, a stream that fails with UNAVAILABLE (the server
        restarting, for one) is opened again after a backoff, resuming after
        the last event delivered. With an empty since_id the watch starts at
        the newest event in the stream, so a reconnect before the first event
        also misses nothing.
        """
        end = None if timeout is None else time.monotonic() + _checked_timeout(timeout)
        last_id = since_id or (await self._newest_event_id() if reconnect else "")
        attempt = 0
        while True:
            remaining = None if end is None else max(end - time.monotonic(), 0.001)
            call = self.stub.WatchActivity(
                _watch_request(last_id, types), timeout=remaining, metadata=self.metadata
            )
            try:
                async for response in call:
                    attempt = 0
                    last_id = response.event.id
                    yield response
                return
            except grpc.aio.AioRpcError as error:
                if _watch_ended(error.code(), end):
                    return
                expired = end is not None and time.monotonic() >= end
                if not reconnect or error.code() not in RETRYABLE or expired:
                    raise
                wait = _reconnect_wait(error, attempt, last_id)
            finally:
                call.cancel()
            await asyncio.sleep(wait)
            attempt += 1

    async def _newest_event_id(self) -> str:
        return _resume_point(await self.stats(activity_limit=1))


class TokenFlowClient:
    """Blocking client over one channel; use it as a context manager.

    The arguments are those of AsyncTokenFlowClient.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        retries: int = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.metadata = _channel_metadata(metadata, api_key)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=[*CHANNEL_OPTIONS, *options])
        else:
            self.channel = grpc.secure_channel(
                target, credentials, options=[*CHANNEL_OPTIONS, *options]
            )
        self.stub = pb_grpc.TokenFlowServiceStub(self.channel)

    def __enter__(self) -> TokenFlowClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(
        self,
        attempt_call: Callable[[float], Result],
        timeout: float | None,
        policy: str,
        default_timeout: float | None = None,
    ) -> Result:
        deadline = _deadline(timeout, default_timeout or self.timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return attempt_call(max(remaining, 0.001))
            except grpc.RpcError as error:
                wait = _retry_wait(error, policy, attempt, self.retries, deadline)
                if wait is None:
                    raise
            time.sleep(wait)
            attempt += 1

    def generate(
        self,
        prompt: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        skip_cache: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        cache_ttl: float | None = None,
        cache_namespace: str = "",
    ) -> GenerateReply:
        """Call Generate; raise RateLimitExceeded when the client is over its limit.

        cache_ttl (seconds) and cache_namespace are GenerateRequest's fields
        of those names; None and "" leave the server's defaults.
        """
        request = generate_request(
            prompt, model, temperature, max_tokens, skip_cache, cache_ttl, cache_namespace
        )

        def attempt(remaining: float) -> GenerateReply:
            try:
                response, call = self.stub.Generate.with_call(
                    request, timeout=remaining, metadata=self.metadata + tuple(metadata)
                )
            except grpc.RpcError as error:
                if _rate_limited(error):
                    raise RateLimitExceeded(error) from None
                raise
            headers = RateLimitInfo.from_metadata(call.initial_metadata(), call.trailing_metadata())
            return GenerateReply(response, headers)

        return self._call(attempt, timeout, RETRY_UNANSWERED)

    def generate_stream(
        self,
        prompt: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        skip_cache: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        cache_ttl: float | None = None,
        cache_namespace: str = "",
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Yield GenerateStream's messages; see AsyncTokenFlowClient.generate_stream."""
        request = stream_request(
            generate_request(
                prompt, model, temperature, max_tokens, skip_cache, cache_ttl, cache_namespace
            )
        )
        deadline = _deadline(timeout, self.timeout)
        attempt = 0
        while True:
            stream = self.stub.GenerateStream(
                request,
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=self.metadata + tuple(metadata),
            )
            received = False
            try:
                for message in stream:
                    received = True
                    yield message
                return
            except grpc.RpcError as error:
                if _rate_limited(error):
                    raise RateLimitExceeded(error) from None
                policy = RETRY_NEVER if received else RETRY_UNANSWERED
                wait = _retry_wait(error, policy, attempt, self.retries, deadline)
                if wait is None:
                    raise
            finally:
                stream.cancel()
            time.sleep(wait)
            attempt += 1

    def stats(self, activity_limit: int = 0, timeout: float | None = None) -> pb.GetStatsResponse:
        request = pb.GetStatsRequest(activity_limit=activity_limit)

        def attempt(remaining: float) -> pb.GetStatsResponse:
            response: pb.GetStatsResponse = self.stub.GetStats(
                request, timeout=remaining, metadata=self.metadata
            )
            return response

        return self._call(attempt, timeout, RETRY_ANY)

    def simulate(self, count: int = 0, timeout: float | None = None) -> pb.SimulateResponse:
        request = pb.SimulateRequest(count=count)

        def attempt(remaining: float) -> pb.SimulateResponse:
            response: pb.SimulateResponse = self.stub.Simulate(
                request, timeout=remaining, metadata=self.metadata
            )
            return response

        return self._call(attempt, timeout, RETRY_NEVER, max(self.timeout, SIMULATE_TIMEOUT))

    def watch(
        self,
        since_id: str = "",
        types: Sequence[int] = (),
        timeout: float | None = None,
        reconnect: bool = True,
    ) -> Iterator[pb.WatchActivityResponse]:
        """Yield activity events; see AsyncTokenFlowClient.watch."""
        end = None if timeout is None else time.monotonic() + _checked_timeout(timeout)
        last_id = since_id or (self._newest_event_id() if reconnect else "")
        attempt = 0
        while True:
            remaining = None if end is None else max(end - time.monotonic(), 0.001)
            stream = self.stub.WatchActivity(
                _watch_request(last_id, types), timeout=remaining, metadata=self.metadata
            )
            try:
                for response in stream:
                    attempt = 0
                    last_id = response.event.id
                    yield response
                return
            except grpc.RpcError as error:
                code = _code(error)
                if _watch_ended(code, end):
                    return
                expired = end is not None and time.monotonic() >= end
                if not reconnect or code not in RETRYABLE or expired:
                    raise
                wait = _reconnect_wait(error, attempt, last_id)
            finally:
                stream.cancel()
            time.sleep(wait)
            attempt += 1

    def _newest_event_id(self) -> str:
        return _resume_point(self.stats(activity_limit=1))
