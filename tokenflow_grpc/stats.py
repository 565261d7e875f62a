"""Reading the figures of GetStats: counters kept on the write path, per-second
buckets for the last minute, top consumers and a SCAN-based key count."""

from __future__ import annotations

from collections import Counter
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


async def read_stats(redis: Any, keys: KeySpace, now_ms: int, activity_limit: int) -> StatsSnapshot:
    """Read one snapshot: one transaction for the figures, then SCAN for key counts."""
    minute = minute_of(now_ms)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.counters)
        pipe.hgetall(keys.requests_bucket(minute))
        pipe.hgetall(keys.requests_bucket(minute - 1))
        pipe.hgetall(keys.blocked_bucket(minute))
        pipe.hgetall(keys.blocked_bucket(minute - 1))
        pipe.zunionstore(
            keys.consumers_scratch, [keys.consumers(minute), keys.consumers(minute - 1)]
        )
        pipe.zrevrange(keys.consumers_scratch, 0, TOP_CONSUMERS - 1, withscores=True)
        pipe.delete(keys.consumers_scratch)
        pipe.xrevrange(keys.activity, count=activity_limit)
        (
            counters,
            requests_now,
            requests_before,
            blocked_now,
            blocked_before,
            _union_size,
            top,
            _deleted,
            entries,
        ) = await pipe.execute()

    distribution = await count_keys(redis, keys)
    return StatsSnapshot(
        now_ms=now_ms,
        counters=Counters.from_hash(counters),
        requests_last_minute=sum_last_minute(now_ms, requests_now, requests_before),
        blocked_last_minute=sum_last_minute(now_ms, blocked_now, blocked_before),
        top_consumers=[(client, int(score)) for client, score in top],
        activity=[ActivityEvent.from_entry(entry_id, fields) for entry_id, fields in entries],
        key_distribution=distribution,
    )


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
