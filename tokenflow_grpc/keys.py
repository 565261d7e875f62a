"""Every Valkey key TokenFlow uses is built here.

All keys start with ``{prefix}:`` where the braces make ``prefix`` the hash
tag, so the keys that one script touches always share a Valkey Cluster slot.

NOTE: one hash tag puts every key of a deployment in one cluster slot: correct
on a cluster, but it does not spread load across primaries.
"""

from __future__ import annotations

from dataclasses import dataclass

# Kinds of key, as reported in GetStatsResponse.key_distribution.
KIND_RATELIMIT = "ratelimit"
KIND_CACHE = "cache"
KIND_LOCK = "lock"
KIND_STATS = "stats"
KIND_ACTIVITY = "activity"
KINDS = (KIND_RATELIMIT, KIND_CACHE, KIND_LOCK, KIND_STATS, KIND_ACTIVITY)

# Rate-limit windows of real clients and of Simulate's clients live in
# separate namespaces, so a burst never touches a real client's window.
NAMESPACE_CLIENT = "client"
NAMESPACE_SIMULATED = "sim"


@dataclass(frozen=True)
class KeySpace:
    """Builds the keys of one deployment, all under one prefix."""

    prefix: str

    @property
    def root(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for every key of this deployment."""
        return self.root.replace("[", "\\[") + ":*"

    def window(self, namespace: str, client: str) -> str:
        """Return the key of the sorted set that is one client's sliding window."""
        return f"{self.root}:{KIND_RATELIMIT}:{namespace}:{client}"

    def cache(self, cache_key: str) -> str:
        return f"{self.root}:{KIND_CACHE}:{cache_key}"

    def lock(self, cache_key: str) -> str:
        """Return the key of the single-flight lock taken while one request generates cache_key."""
        return f"{self.root}:{KIND_LOCK}:{cache_key}"

    @property
    def counters(self) -> str:
        """Hash of all-time counters: requests, hits, misses, blocked."""
        return f"{self.root}:{KIND_STATS}:counters"

    def requests_bucket(self, minute: int) -> str:
        """Hash of requests per second (field: epoch second) within one minute."""
        return f"{self.root}:{KIND_STATS}:requests:{minute}"

    def blocked_bucket(self, minute: int) -> str:
        """Hash of rejected requests per second within one minute."""
        return f"{self.root}:{KIND_STATS}:blocked:{minute}"

    def consumers(self, minute: int) -> str:
        """Sorted set of requests per client within one minute."""
        return f"{self.root}:{KIND_STATS}:consumers:{minute}"

    @property
    def consumers_scratch(self) -> str:
        """Temporary union of two minutes of consumers, deleted in the same transaction."""
        return f"{self.root}:{KIND_STATS}:consumers:union"

    @property
    def activity(self) -> str:
        """The capped activity stream."""
        return f"{self.root}:{KIND_ACTIVITY}"

    def kind_of(self, key: str) -> str | None:
        """Return the kind of one of this deployment's keys, or None for another key."""
        head = self.root + ":"
        if not key.startswith(head):
            return None
        kind = key[len(head) :].split(":", 1)[0]
        return kind if kind in KINDS else None
