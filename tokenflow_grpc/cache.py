"""Response cache keys, cache entries and in-process single flight.

The cache key is the SHA-256 of the canonical request: the cache namespace,
the prompt, the resolved model and every generation parameter, so requests
that differ in any of them never share an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from tokenflow_grpc.generator import Generation, GenerationRequest, Usage, estimate_usage

# The cache namespace of calls made without an API key.
DEFAULT_CACHE_NAMESPACE = "default"


def cache_key(request: GenerationRequest, namespace: str = DEFAULT_CACHE_NAMESPACE) -> str:
    """Return the hex SHA-256 of the canonical JSON form of request in namespace."""
    canonical = json.dumps(
        {
            "max_tokens": request.max_tokens,
            "model": request.model,
            "namespace": namespace,
            "prompt": request.prompt,
            "temperature": request.temperature,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encode_entry(generation: Generation) -> str:
    """Return the cache entry of a generation: JSON with its text and token counts."""
    usage = generation.usage
    return json.dumps(
        {
            "text": generation.text,
            "usage": [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens],
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode_entry(entry: str, request: GenerationRequest) -> Generation:
    """Return the generation stored in a cache entry.

    An entry that is not encode_entry's JSON is plain text, the form that
    earlier versions stored, and gets estimated token counts.
    """
    try:
        fields = json.loads(entry)
        prompt_tokens, completion_tokens, total_tokens = fields["usage"]
        return Generation(
            str(fields["text"]),
            Usage(int(prompt_tokens), int(completion_tokens), int(total_tokens)),
        )
    except (ValueError, TypeError, KeyError):
        return Generation(entry, estimate_usage(request.prompt, entry))


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
