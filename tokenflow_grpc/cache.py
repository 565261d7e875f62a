"""Response cache keys and in-process single flight.

The cache key is the SHA-256 of the canonical request: the prompt, the
resolved model and every generation parameter, so requests that differ in any
of them never share an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from tokenflow_grpc.generator import GenerationRequest


def cache_key(request: GenerationRequest) -> str:
    """Return the hex SHA-256 of the request's canonical JSON form."""
    canonical = json.dumps(
        {
            "max_tokens": request.max_tokens,
            "model": request.model,
            "prompt": request.prompt,
            "temperature": request.temperature,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class InFlight:
    """Generations running in this process, by cache key.

    A request that finds the cache lock held by another request of this
    process waits on that request's future instead of polling Valkey. The
    lock in Valkey, not this table, decides who generates; this table only
    shortens the wait.
    """

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def start(self, key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures[key] = future
        return future

    def finish(self, key: str, future: asyncio.Future[None]) -> None:
        if self._futures.get(key) is future:
            del self._futures[key]
        if not future.done():
            future.set_result(None)

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait for this process's generation of key; False when there is none."""
        future = self._futures.get(key)
        if future is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            pass
        return True
