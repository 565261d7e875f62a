"""A minimal asyncio client of TokenFlowService with deadlines on every call,
used by the CLI and the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
SIMULATE_TIMEOUT = 120.0

RATE_LIMIT_KEYS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")


@dataclass(frozen=True)
class RateLimitHeaders:
    """Rate-limit metadata of one Generate call; None where the server sent none."""

    limit: int | None
    remaining: int | None
    reset_seconds: int | None
    retry_after_seconds: int | None

    @classmethod
    def from_metadata(cls, *metadata: Sequence[tuple[str, Any]] | None) -> RateLimitHeaders:
        values: dict[str, int] = {}
        for pairs in metadata:
            for key, value in pairs or ():
                if key in RATE_LIMIT_KEYS and isinstance(value, str) and value.isdigit():
                    values[key] = int(value)
        return cls(
            values.get("x-ratelimit-limit"),
            values.get("x-ratelimit-remaining"),
            values.get("x-ratelimit-reset"),
            values.get("retry-after"),
        )


@dataclass(frozen=True)
class GenerateReply:
    response: pb.GenerateResponse
    rate_limit: RateLimitHeaders


class AsyncTokenFlowClient:
    """Async client over one channel; use as an async context manager."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.TokenFlowServiceStub(self.channel)

    async def __aenter__(self) -> AsyncTokenFlowClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        skip_cache: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> GenerateReply:
        """Call Generate. A rejected call raises grpc.aio.AioRpcError; its
        rate-limit metadata is in the error's trailing_metadata()."""
        request = pb.GenerateRequest(prompt=prompt, skip_cache=skip_cache)
        if model is not None:
            request.model = model
        if temperature is not None:
            request.temperature = temperature
        if max_tokens is not None:
            request.max_tokens = max_tokens

        call = self.stub.Generate(
            request, timeout=self.timeout, metadata=self.metadata + tuple(metadata)
        )
        response = await call
        headers = RateLimitHeaders.from_metadata(
            await call.initial_metadata(), await call.trailing_metadata()
        )
        return GenerateReply(response, headers)

    async def stats(self, activity_limit: int = 0) -> pb.GetStatsResponse:
        response: pb.GetStatsResponse = await self.stub.GetStats(
            pb.GetStatsRequest(activity_limit=activity_limit),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return response

    async def simulate(self, count: int = 0) -> pb.SimulateResponse:
        response: pb.SimulateResponse = await self.stub.Simulate(
            pb.SimulateRequest(count=count),
            timeout=max(self.timeout, SIMULATE_TIMEOUT),
            metadata=self.metadata,
        )
        return response

    async def watch(
        self, since_id: str = "", types: Sequence[int] = (), timeout: float | None = None
    ) -> AsyncIterator[pb.WatchActivityResponse]:
        """Yield activity events until the stream ends or timeout seconds pass."""
        call = self.stub.WatchActivity(
            pb.WatchActivityRequest(
                since_id=since_id, types=[pb.ActivityType.ValueType(t) for t in types]
            ),
            timeout=timeout,
            metadata=self.metadata,
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()
