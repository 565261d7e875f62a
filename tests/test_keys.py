"""The key layouts: one hash tag on a single Valkey, shards on a cluster."""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tokenflow_grpc.cache import cache_key
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.keys import CLUSTER_SHARDS, NAMESPACE_CLIENT, NAMESPACE_SIMULATED, key_space

PREFIX = "tokenflow"
CLIENTS = [f"10.0.{n // 256}.{n % 256}" for n in range(500)] + ["sim-client-01", "::1"]
CACHE_KEYS = [cache_key(GenerationRequest(f"prompt {n}", "tokenflow-sim-1")) for n in range(500)]


def slot(key: str) -> int:
    return key_slot(key.encode("utf-8"))


def test_single_layout_keeps_key_names() -> None:
    keys = key_space(PREFIX, cluster=False)

    assert keys.shard_count == 1
    assert keys.window(NAMESPACE_CLIENT, "10.0.0.1") == "{tokenflow}:ratelimit:client:10.0.0.1"
    assert keys.cache("abc") == "{tokenflow}:cache:abc"
    assert keys.lock("abc") == "{tokenflow}:lock:abc"
    assert keys.counters(0) == "{tokenflow}:stats:counters"
    assert keys.requests_bucket(0, 7) == "{tokenflow}:stats:requests:7"
    assert keys.activity == "{tokenflow}:activity"
    assert keys.scan_pattern == "{tokenflow}:*"
    assert keys.activity_shard == 0


def test_cluster_tags_spread_over_slot_ranges() -> None:
    keys = key_space(PREFIX, cluster=True)
    slots = [key_slot(tag.encode()) for tag in keys.shard_tags]
    range_size = REDIS_CLUSTER_HASH_SLOTS // CLUSTER_SHARDS

    assert len(keys.shard_tags) == CLUSTER_SHARDS
    assert [found // range_size for found in slots] == list(range(CLUSTER_SHARDS))
    assert slot(keys.activity) not in slots
    assert keys.activity_shard is None
    assert key_space(PREFIX, cluster=True).shard_tags == keys.shard_tags


def test_cluster_uses_every_shard() -> None:
    keys = key_space(PREFIX, cluster=True)

    assert {keys.client_shard(client) for client in CLIENTS} == set(range(CLUSTER_SHARDS))
    assert {keys.cache_shard(key) for key in CACHE_KEYS} == set(range(CLUSTER_SHARDS))


def test_limiter_keys_share_one_slot() -> None:
    keys = key_space(PREFIX, cluster=True)
    for client in CLIENTS:
        shard = keys.client_shard(client)
        slots = {
            slot(keys.window(NAMESPACE_CLIENT, client)),
            slot(keys.window(NAMESPACE_SIMULATED, client)),
            slot(keys.counters(shard)),
            slot(keys.requests_bucket(shard, 1)),
            slot(keys.blocked_bucket(shard, 1)),
            slot(keys.consumers(shard, 1)),
            slot(keys.consumers_scratch(shard)),
        }
        assert len(slots) == 1, client


def test_cache_keys_share_one_slot() -> None:
    keys = key_space(PREFIX, cluster=True)
    for key in CACHE_KEYS:
        counters = keys.counters(keys.cache_shard(key))
        slots = {slot(keys.cache(key)), slot(keys.lock(key)), slot(counters)}
        assert len(slots) == 1, key


def test_kind_of_own_keys_only() -> None:
    keys = key_space(PREFIX, cluster=True)
    other = key_space(PREFIX + ":other", cluster=True)

    assert keys.kind_of(keys.window(NAMESPACE_CLIENT, "10.0.0.1")) == "ratelimit"
    assert keys.kind_of(keys.cache(CACHE_KEYS[0])) == "cache"
    assert keys.kind_of(keys.counters(3)) == "stats"
    assert keys.kind_of(keys.activity) == "activity"
    assert keys.kind_of(other.cache(CACHE_KEYS[0])) is None
    assert keys.kind_of(other.activity) is None
    assert keys.kind_of("{tokenflow:unknown}:cache:x") is None
    assert keys.kind_of("tokenflow:cache:x") is None
