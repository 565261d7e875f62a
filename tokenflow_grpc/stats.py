"""Reading the figures of GetStats: counters kept on the write path, per-second
buckets for the last minute, top consumers and a SCAN-based key count, which
is reused for --key-count-interval seconds.

Each shard of the key layout (keys.KeySpace) keeps its own counters, buckets
and consumers, so a snapshot sums the shards.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenflow_grpc.activity import ActivityEvent
from tokenflow_grpc.keys import KIND_CACHE, KIND_RATELIMIT, KeySpace

SECONDS_PER_MINUTE = 60
TOP_CONSUMERS = 10
SCAN_BATCH = 1000
# Per-minute stats keys live through the next minute, so the previous minute
# can always be read, plus a margin for clock differences between processes.
BUCKET_TTL_SECONDS = 3 * SECONDS_PER_MINUTE


@dataclass(frozen=True)
class Counters:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    blocked: int = 0

    @classmethod
    def from_hash(cls, values: dict[str, str]) -> Counters:
        return cls(
            **{name: int(values.get(name, 0)) for name in ("requests", "hits", "misses", "blocked")}
        )

    @classmethod
    def total(cls, parts: Iterable[Counters]) -> Counters:
        """Return the sum of the counters of several shards."""
        totals = cls()
        for part in parts:
            totals = cls(
                requests=totals.requests + part.requests,
                hits=totals.hits + part.hits,
                misses=totals.misses + part.misses,
                blocked=totals.blocked + part.blocked,
            )
        return totals

    @property
    def hit_ratio(self) -> float:
        """Hits per cache lookup, in percent; 0 before the first lookup."""
        total = self.hits + self.misses
        return 100.0 * self.hits / total if total else 0.0


@dataclass(frozen=True)
class StatsSnapshot:
    now_ms: int
    counters: Counters
    requests_last_minute: int
    blocked_last_minute: int
    top_consumers: list[tuple[str, int]]
    activity: list[ActivityEvent]
    key_distribution: dict[str, int] = field(default_factory=dict)

    @property
    def total_keys(self) -> int:
        return sum(self.key_distribution.values())

    @property
    def ratelimit_keys(self) -> int:
        return self.key_distribution.get(KIND_RATELIMIT, 0)

    @property
    def cached_keys(self) -> int:
        return self.key_distribution.get(KIND_CACHE, 0)


@dataclass(frozen=True)
class ShardFigures:
    """The figures of one shard; activity is None when it was read in another call."""

    counters: Counters
    requests_last_minute: int
    blocked_last_minute: int
    top_consumers: list[tuple[str, int]]
    activity: list[ActivityEvent] | None


def minute_of(now_ms: int) -> int:
    return now_ms // 1000 // SECONDS_PER_MINUTE


def sum_last_minute(now_ms: int, *buckets: dict[str, str]) -> int:
    """Sum per-second counts of the 60 seconds ending with the current one."""
    now_second = now_ms // 1000
    first = now_second - SECONDS_PER_MINUTE + 1
    return sum(
        int(count)
        for bucket in buckets
        for second, count in bucket.items()
        if first <= int(second) <= now_second
    )


async def read_stats(
    redis: Any,
    keys: KeySpace,
    now_ms: int,
    activity_limit: int,
    census: KeyCensus | None = None,
) -> StatsSnapshot:
    """Read one snapshot: one transaction per shard, then the key counts from
    census (a fresh SCAN without one).

    The activity read joins the transaction of the shard that shares its slot
    (the only shard of a single Valkey). On a cluster no shard does, so it is
    a call of its own, sent together with the shards' transactions. The shards
    are not read at one instant, so the sums are exact once the load stops.
    """
    if keys.activity_shard is None:
        shards, activity = await asyncio.gather(
            read_shards(redis, keys, now_ms), read_activity(redis, keys, activity_limit)
        )
    else:
        shards = await read_shards(redis, keys, now_ms, activity_limit)
        activity = shards[keys.activity_shard].activity or []

    distribution = await (census.counts() if census else count_keys(redis, keys))
    return StatsSnapshot(
        now_ms=now_ms,
        counters=Counters.total(shard.counters for shard in shards),
        requests_last_minute=sum(shard.requests_last_minute for shard in shards),
        blocked_last_minute=sum(shard.blocked_last_minute for shard in shards),
        top_consumers=merge_top_consumers(shard.top_consumers for shard in shards),
        activity=activity,
        key_distribution=distribution,
    )


async def read_shards(
    redis: Any, keys: KeySpace, now_ms: int, activity_limit: int | None = None
) -> list[ShardFigures]:
    """Read every shard, concurrently; the shard keys.activity_shard also reads
    activity_limit events when activity_limit is given."""
    return list(
        await asyncio.gather(
            *(
                read_shard(
                    redis,
                    keys,
                    shard,
                    now_ms,
                    activity_limit if shard == keys.activity_shard else None,
                )
                for shard in range(keys.shard_count)
            )
        )
    )


async def read_shard(
    redis: Any, keys: KeySpace, shard: int, now_ms: int, activity_limit: int | None
) -> ShardFigures:
    """Read one shard's figures in one transaction, and the activity when
    activity_limit is given (the stream must share the shard's slot)."""
    minute = minute_of(now_ms)
    scratch = keys.consumers_scratch(shard)
    minutes = [keys.consumers(shard, minute), keys.consumers(shard, minute - 1)]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.counters(shard))
        pipe.hgetall(keys.requests_bucket(shard, minute))
        pipe.hgetall(keys.requests_bucket(shard, minute - 1))
        pipe.hgetall(keys.blocked_bucket(shard, minute))
        pipe.hgetall(keys.blocked_bucket(shard, minute - 1))
        pipe.zunionstore(scratch, minutes)
        pipe.zrevrange(scratch, 0, TOP_CONSUMERS - 1, withscores=True)
        pipe.delete(scratch)
        if activity_limit is not None:
            pipe.xrevrange(keys.activity, count=activity_limit)
        replies = await pipe.execute()

    (
        counters,
        requests_now,
        requests_before,
        blocked_now,
        blocked_before,
        _union_size,
        top,
        _deleted,
    ) = replies[:8]
    activity = None
    if activity_limit is not None:
        activity = [ActivityEvent.from_entry(entry_id, fields) for entry_id, fields in replies[8]]
    return ShardFigures(
        counters=Counters.from_hash(counters),
        requests_last_minute=sum_last_minute(now_ms, requests_now, requests_before),
        blocked_last_minute=sum_last_minute(now_ms, blocked_now, blocked_before),
        top_consumers=[(client, int(score)) for client, score in top],
        activity=activity,
    )


async def read_activity(redis: Any, keys: KeySpace, activity_limit: int) -> list[ActivityEvent]:
    """Return the latest activity_limit events, newest first."""
    entries = await redis.xrevrange(keys.activity, count=activity_limit)
    return [ActivityEvent.from_entry(entry_id, fields) for entry_id, fields in entries]


def merge_top_consumers(tops: Iterable[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """Merge the shards' top consumers into the overall TOP_CONSUMERS.

    The result is exact because a client is counted in its own shard only
    (keys.KeySpace.client_shard). Ties are ordered as ZREVRANGE orders them,
    by client name, descending.
    """
    totals: Counter[str] = Counter()
    for top in tops:
        for client, requests in top:
            totals[client] += requests
    ranked = sorted(totals.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return ranked[:TOP_CONSUMERS]


async def count_keys(redis: Any, keys: KeySpace) -> dict[str, int]:
    """Count this deployment's keys per kind with SCAN (never KEYS).

    SCAN may return a key twice while the keyspace is rehashed, so the count
    is exact only when keys are not being added at the same time.
    """
    distribution: Counter[str] = Counter()
    async for key in redis.scan_iter(match=keys.scan_pattern, count=SCAN_BATCH):
        kind = keys.kind_of(key)
        if kind is not None:
            distribution[kind] += 1
    return dict(distribution)


class KeyCensus:
    """The count of keys per kind, reused for max_age seconds.

    Counting walks the whole keyspace, so its cost grows with the number of
    keys. Reusing a recent count bounds how often GetStats pays that cost,
    however many callers poll. Concurrent callers share one count in progress.
    """

    def __init__(
        self,
        redis: Any,
        keys: KeySpace,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.max_age = max_age
        self.clock = clock
        self._counted: tuple[float, dict[str, int]] | None = None
        self._counting: asyncio.Future[dict[str, int]] | None = None

    async def counts(self) -> dict[str, int]:
        if self._counted is not None and self.clock() - self._counted[0] < self.max_age:
            return self._counted[1]
        if self._counting is None:
            self._counting = asyncio.ensure_future(self._count())
            self._counting.add_done_callback(self._forget)
        # Shielded, so that a caller that gives up does not stop the count
        # that other callers wait for.
        return await asyncio.shield(self._counting)

    async def _count(self) -> dict[str, int]:
        started = self.clock()
        counted = await count_keys(self.redis, self.keys)
        self._counted = (started, counted)
        return counted

    def _forget(self, future: asyncio.Future[dict[str, int]]) -> None:
        self._counting = None
        if not future.cancelled():
            # Read the exception, if any, so asyncio does not log it as never retrieved.
            future.exception()
