"""Every Valkey key TokenFlow uses is built here.

Each key starts with a hash tag, ``{TAG}:``, and the keys that one script
touches always share a tag, so they share a Valkey Cluster slot. A deployment
uses one of two layouts:

- One shard (a single Valkey): every key is under the tag ``{PREFIX}``, so one
  script can touch them all and a cache hit costs one round trip.
- CLUSTER_SHARDS shards (a Valkey Cluster): a client's window and the stats
  it counts live under the tag ``{PREFIX:N}`` of the client's shard, and a
  cache entry with its lock and the hits and misses it counts live under the
  tag of the entry's shard. The shards' slots are spread over the slot range,
  so the load spreads over the cluster's primaries.

The activity stream is ``{PREFIX}:activity`` in both layouts.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import cached_property

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# Kinds of key, as reported in GetStatsResponse.key_distribution.
KIND_RATELIMIT = "ratelimit"
KIND_CACHE = "cache"
KIND_LOCK = "lock"
KIND_STATS = "stats"
KIND_ACTIVITY = "activity"
KIND_TOKENS = "tokens"
KINDS = (KIND_RATELIMIT, KIND_CACHE, KIND_LOCK, KIND_STATS, KIND_ACTIVITY, KIND_TOKENS)

# Rate-limit windows of real clients and of Simulate's clients live in
# separate namespaces, so a burst never touches a real client's window.
NAMESPACE_CLIENT = "client"
NAMESPACE_SIMULATED = "sim"

# Shards of the cluster layout. The load can spread over at most this many
# primaries, and GetStats reads each shard's counters in its own transaction.
# Changing it moves every window, cache entry and counter to other keys.
CLUSTER_SHARDS = 16

_GLOB_SPECIAL = "\\*?[]"


def key_space(prefix: str, cluster: bool) -> KeySpace:
    """Return the key layout for a deployment on a cluster or on a single Valkey."""
    return KeySpace(prefix, CLUSTER_SHARDS if cluster else 1)


@dataclass(frozen=True)
class KeySpace:
    """Builds the keys of one deployment, all under one prefix, in shard_count shards."""

    prefix: str
    shard_count: int = 1

    @property
    def root(self) -> str:
        """The hash tag of the activity stream, and of every key in the one-shard layout."""
        return "{" + self.prefix + "}"

    @cached_property
    def shard_tags(self) -> tuple[str, ...]:
        """The hash tag (without braces) of each shard."""
        if self.shard_count == 1:
            return (self.prefix,)
        return spread_tags(self.prefix, self.shard_count)

    @property
    def activity_shard(self) -> int | None:
        """The shard whose keys share the activity stream's slot, or None when none does."""
        return 0 if self.shard_count == 1 else None

    @property
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for every key of this deployment.

        In the sharded layout it also matches the keys of a deployment whose
        prefix is this prefix followed by a colon, and kind_of() rejects them.
        NOTE: kind_of() accepts one such key, the activity stream of a
        deployment whose prefix is "PREFIX:N" with N the number of one of this
        deployment's shard tags, because that stream's tag is the shard's tag.
        """
        escaped = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in self.prefix)
        if self.shard_count == 1:
            return "{" + escaped + "}:*"
        return "{" + escaped + "[:}]*"

    def client_shard(self, client: str) -> int:
        """Return the shard of a client's window and stats, the same in every namespace."""
        return self._shard_of(client)

    def cache_shard(self, cache_key: str) -> int:
        """Return the shard of a cache entry, its lock and the hits and misses it counts."""
        return self._shard_of(cache_key)

    def window(self, namespace: str, client: str) -> str:
        """Return the key of the sorted set that is one client's sliding window."""
        return f"{self._tag(self.client_shard(client))}:{KIND_RATELIMIT}:{namespace}:{client}"

    def limit_state(self, policy: str, algorithm: str, namespace: str, client: str) -> str:
        """Return the key of one client's state under a limit policy.

        The sliding log of the policy named "default" is the window() key, so
        a deployment keeps its windows when it starts using a policy file.
        Other keys name the algorithm, so a policy whose algorithm changes on
        reload starts from a fresh key instead of one of another type.
        """
        if policy == "default" and algorithm == "sliding_log":
            return self.window(namespace, client)
        tag = self._tag(self.client_shard(client))
        return f"{tag}:{KIND_RATELIMIT}:{algorithm}.{policy}:{namespace}:{client}"

    def tokens(self, policy: str, namespace: str, client: str, model: str | None = None) -> str:
        """Return the key of one client's token-budget counter under a policy,
        per model when model is set."""
        tag = self._tag(self.client_shard(client))
        scope = f"{policy}@{model}" if model is not None else policy
        return f"{tag}:{KIND_TOKENS}:{scope}:{namespace}:{client}"

    def cache(self, cache_key: str) -> str:
        return f"{self._tag(self.cache_shard(cache_key))}:{KIND_CACHE}:{cache_key}"

    def lock(self, cache_key: str) -> str:
        """Return the key of the single-flight lock taken while one request generates cache_key."""
        return f"{self._tag(self.cache_shard(cache_key))}:{KIND_LOCK}:{cache_key}"

    def counters(self, shard: int) -> str:
        """Hash of one shard's all-time counters: requests, hits, misses, blocked."""
        return f"{self._tag(shard)}:{KIND_STATS}:counters"

    def requests_bucket(self, shard: int, minute: int) -> str:
        """Hash of one shard's requests per second (field: epoch second) within one minute."""
        return f"{self._tag(shard)}:{KIND_STATS}:requests:{minute}"

    def blocked_bucket(self, shard: int, minute: int) -> str:
        """Hash of one shard's rejected requests per second within one minute."""
        return f"{self._tag(shard)}:{KIND_STATS}:blocked:{minute}"

    def consumers(self, shard: int, minute: int) -> str:
        """Sorted set of requests per client of one shard within one minute."""
        return f"{self._tag(shard)}:{KIND_STATS}:consumers:{minute}"

    def consumers_scratch(self, shard: int) -> str:
        """Temporary union of two minutes of one shard's consumers, deleted in the same
        transaction."""
        return f"{self._tag(shard)}:{KIND_STATS}:consumers:union"

    @property
    def activity(self) -> str:
        """The capped activity stream."""
        return f"{self.root}:{KIND_ACTIVITY}"

    def kind_of(self, key: str) -> str | None:
        """Return the kind of one of this deployment's keys, or None for another key."""
        if not key.startswith("{"):
            return None
        tag, separator, rest = key[1:].partition("}:")
        if not separator or tag not in self._tags:
            return None
        kind = rest.split(":", 1)[0]
        return kind if kind in KINDS else None

    @cached_property
    def _tags(self) -> frozenset[str]:
        return frozenset(self.shard_tags) | {self.prefix}

    def _tag(self, shard: int) -> str:
        return "{" + self.shard_tags[shard] + "}"

    def _shard_of(self, text: str) -> int:
        if self.shard_count == 1:
            return 0
        return zlib.crc32(text.encode("utf-8")) % self.shard_count


def spread_tags(prefix: str, count: int) -> tuple[str, ...]:
    """Return count hash tags "PREFIX:N", the i-th hashing into the i-th of count
    equal ranges of slots, none into the slot of the tag PREFIX itself.

    Each N is the smallest that fits its range, so every process computes the
    same tags. A cluster whose slots are assigned in contiguous ranges, as
    CLUSTER ADDSLOTSRANGE and valkey-cli --cluster create do, gets its
    shards spread as evenly as its slots.
    """
    stream_slot = key_slot(prefix.encode("utf-8"))
    tags: list[str | None] = [None] * count
    missing = count
    for number in itertools.count():
        tag = f"{prefix}:{number}"
        slot = key_slot(tag.encode("utf-8"))
        index = slot * count // REDIS_CLUSTER_HASH_SLOTS
        if tags[index] is None and slot != stream_slot:
            tags[index] = tag
            missing -= 1
            if missing == 0:
                break
    return tuple(tag for tag in tags if tag is not None)
