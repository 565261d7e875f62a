"""The Valkey rounds of Generate's hot path: the rate-limit decision, the cache
claim and the activity event, in as few round trips as the key layout allows.

In the one-shard layout of a single Valkey every key shares one slot, so one
script does all three and a cache hit costs one round trip (SingleSlotRounds).
In the sharded layout of a Valkey Cluster each slot touched gets one round,
one after another because each needs the outcome of the one before
(ShardedRounds). The limiter runs in the client's shard and the cache claim in
the cache entry's shard, inside the limiter's round when both are the same
shard. The event goes to the activity stream's slot, which no shard shares.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from tokenflow_grpc.activity import (
    PROMPT_EXCERPT_CHARS,
    TYPE_CACHE_HIT,
    TYPE_CACHE_MISS,
    TYPE_RATE_LIMITED,
    TYPE_REQUEST,
)
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.keys import KeySpace
from tokenflow_grpc.logs import RepeatLimiter
from tokenflow_grpc.lua import Scripts
from tokenflow_grpc.policies import Policy
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.stats import BUCKET_TTL_SECONDS, minute_of

logger = logging.getLogger(__name__)

# Outcomes returned by the Generate scripts (scripts/*.lua).
OUTCOME_REJECTED = 0
OUTCOME_HIT = 1
OUTCOME_MISS = 2
OUTCOME_WAIT = 3
OUTCOME_SKIPPED = 4
# Only from limit_generate.lua: admitted, and the cache entry is in another shard.
OUTCOME_ADMITTED = 5

# The activity event of each outcome that records one: type, cached, blocked.
_EVENTS = {
    OUTCOME_REJECTED: (TYPE_RATE_LIMITED, False, True),
    OUTCOME_HIT: (TYPE_CACHE_HIT, True, False),
    OUTCOME_MISS: (TYPE_CACHE_MISS, False, False),
    OUTCOME_SKIPPED: (TYPE_REQUEST, False, False),
}


@dataclass(frozen=True)
class Call:
    """One Generate call, as its rounds need it.

    token is the request id: the call's member in the window and its lock token.
    policy is the limit policy matched for the call's client and model, and
    token_cost the tokens the call is admitted with (0 without a budget).
    """

    request: GenerationRequest
    client: str
    namespace: str
    cache_key: str
    token: str
    skip_cache: bool
    now_ms: int
    policy: Policy
    token_cost: int = 0

    @property
    def prompt_excerpt(self) -> str:
        return self.request.prompt[:PROMPT_EXCERPT_CHARS]

    def state_key(self, keys: KeySpace) -> str:
        policy = self.policy
        return keys.limit_state(policy.name, policy.algorithm, self.namespace, self.client)

    def tokens_key(self, keys: KeySpace) -> str:
        model = self.request.model if self.policy.tokens_per_model else None
        return keys.tokens(self.policy.name, self.namespace, self.client, model)

    def policy_args(self) -> list[object]:
        """Return the policy arguments that begin_generate and limit_generate take last."""
        policy = self.policy
        return [
            policy.algorithm,
            policy.capacity,
            "1" if policy.shadow else "0",
            policy.tokens or 0,
            self.token_cost,
            policy.window_ms,
        ]


@dataclass(frozen=True)
class Limited:
    """The values that limit_call (scripts/_common.lua) returns besides the outcome.

    reason: 0 admitted, 1 over the request limit, 2 over the token budget;
    tokens_remaining is -1 without a token budget.
    """

    reason: int = 0
    tokens_remaining: int = -1
    tokens_reset_ms: int = 0
    shadow_rejected: bool = False

    @classmethod
    def from_reply(cls, values: list[object]) -> Limited:
        reason, tokens_remaining, tokens_reset_ms, shadow_rejected = values
        return cls(
            int(reason),  # type: ignore[call-overload]
            int(tokens_remaining),  # type: ignore[call-overload]
            int(tokens_reset_ms),  # type: ignore[call-overload]
            bool(int(shadow_rejected)),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class Begun:
    """The outcome of a call's rate limit and cache claim.

    Times are milliseconds since the Unix epoch; retry_after_ms is 0 when admitted.
    """

    outcome: int
    remaining: int
    reset_at_ms: int
    retry_after_ms: int
    cached_text: str | None
    event_id: str | None
    limited: Limited = Limited()

    @classmethod
    def from_reply(cls, reply: list[Any], with_event: bool) -> Begun:
        """Read a limiting script's reply: outcome, remaining, reset, retry after and
        cached text, then the event id when with_event, then the Limited fields."""
        fields = 6 if with_event else 5
        return cls(
            outcome=int(reply[0]),
            remaining=int(reply[1]),
            reset_at_ms=int(reply[2]),
            retry_after_ms=int(reply[3]),
            cached_text=reply[4],
            event_id=reply[5] if with_event else None,
            limited=Limited.from_reply(reply[fields:]),
        )


@dataclass(frozen=True)
class Claimed:
    """The outcome of one cache claim: OUTCOME_HIT, OUTCOME_MISS or OUTCOME_WAIT."""

    outcome: int
    cached_text: str | None
    event_id: str | None


class Rounds(Protocol):
    async def begin(self, call: Call) -> Begun:
        """Rate limit the call, count it, claim its cache entry and record its event."""

    async def claim(self, call: Call, waiting: bool = False) -> Claimed:
        """Read the cache entry, or take over the lock that its holder released.

        waiting: the call is polling after its first claim returned
        OUTCOME_WAIT, which already counted it as a hit.
        """


def rounds_for(keys: KeySpace, scripts: Scripts, settings: Settings, lock_ttl_ms: int) -> Rounds:
    """Return the rounds that fit the key layout of keys."""
    if keys.shard_count == 1:
        return SingleSlotRounds(keys, scripts, settings, lock_ttl_ms)
    return ShardedRounds(keys, scripts, settings, lock_ttl_ms)


class SingleSlotRounds:
    """One script per step, because every key shares one slot."""

    def __init__(self, keys: KeySpace, scripts: Scripts, settings: Settings, lock_ttl_ms: int):
        self.keys = keys
        self.scripts = scripts
        self.settings = settings
        self.lock_ttl_ms = lock_ttl_ms

    async def begin(self, call: Call) -> Begun:
        keys = self.keys
        shard = keys.client_shard(call.client)
        minute = minute_of(call.now_ms)
        reply = await self.scripts.begin_generate(
            keys=[
                call.state_key(keys),
                keys.cache(call.cache_key),
                keys.lock(call.cache_key),
                keys.counters(shard),
                keys.requests_bucket(shard, minute),
                keys.blocked_bucket(shard, minute),
                keys.consumers(shard, minute),
                keys.activity,
                call.tokens_key(keys),
            ],
            args=[
                call.now_ms,
                call.policy.requests,
                call.policy.window_ms,
                call.token,
                self.lock_ttl_ms,
                call.client,
                call.prompt_excerpt,
                call.request.model,
                self.settings.activity_max_events,
                "0" if call.skip_cache else "1",
                BUCKET_TTL_SECONDS,
                *call.policy_args(),
            ],
        )
        return Begun.from_reply(reply, with_event=True)

    async def claim(self, call: Call, waiting: bool = False) -> Claimed:
        keys = self.keys
        reply = await self.scripts.claim_generate(
            keys=[
                keys.cache(call.cache_key),
                keys.lock(call.cache_key),
                keys.counters(keys.cache_shard(call.cache_key)),
                keys.activity,
            ],
            args=[
                call.token,
                self.lock_ttl_ms,
                "1" if waiting else "0",
                self.settings.activity_max_events,
                call.client,
                call.prompt_excerpt,
                call.request.model,
                call.now_ms,
            ],
        )
        outcome, cached_text, event_id = reply
        return Claimed(int(outcome), cached_text, event_id)


class ShardedRounds:
    """One round per slot touched, for the sharded layout of a Valkey Cluster.

    An event that cannot be added (its slot has no primary) is logged and
    lost, because the call was already decided and counted in other slots.
    """

    def __init__(self, keys: KeySpace, scripts: Scripts, settings: Settings, lock_ttl_ms: int):
        self.keys = keys
        self.scripts = scripts
        self.settings = settings
        self.lock_ttl_ms = lock_ttl_ms
        self._warnings = RepeatLimiter(logger)

    async def begin(self, call: Call) -> Begun:
        # NOTE: when the claim round fails after the limiter round admitted
        # the call, the call stays in the window and in the requests counter
        # but in no hit or miss count, and the caller treats the call as one
        # that could not reach Valkey.
        limited = await self._limit(call)
        outcome = limited.outcome
        if outcome == OUTCOME_ADMITTED:
            claimed = await self.claim(call)
            return dataclasses.replace(
                limited,
                outcome=claimed.outcome,
                cached_text=claimed.cached_text,
                event_id=claimed.event_id,
            )

        event_id = await self._record_event(call, outcome)
        return dataclasses.replace(limited, event_id=event_id)

    async def claim(self, call: Call, waiting: bool = False) -> Claimed:
        keys = self.keys
        reply = await self.scripts.claim_generate(
            keys=[
                keys.cache(call.cache_key),
                keys.lock(call.cache_key),
                keys.counters(keys.cache_shard(call.cache_key)),
            ],
            args=[call.token, self.lock_ttl_ms, "1" if waiting else "0"],
        )
        outcome, cached_text, _no_event = reply
        event_id = await self._record_event(call, int(outcome))
        return Claimed(int(outcome), cached_text, event_id)

    async def _limit(self, call: Call) -> Begun:
        """Run limit_generate in the client's shard, with the cache claim when
        the cache entry is in the same shard. The result has no event id."""
        keys = self.keys
        shard = keys.client_shard(call.client)
        minute = minute_of(call.now_ms)
        script_keys = [
            call.state_key(keys),
            keys.counters(shard),
            keys.requests_bucket(shard, minute),
            keys.blocked_bucket(shard, minute),
            keys.consumers(shard, minute),
            call.tokens_key(keys),
        ]
        if not call.skip_cache and keys.cache_shard(call.cache_key) == shard:
            script_keys += [keys.cache(call.cache_key), keys.lock(call.cache_key)]
        reply = await self.scripts.limit_generate(
            keys=script_keys,
            args=[
                call.now_ms,
                call.policy.requests,
                call.policy.window_ms,
                call.token,
                self.lock_ttl_ms,
                call.client,
                "0" if call.skip_cache else "1",
                BUCKET_TTL_SECONDS,
                *call.policy_args(),
            ],
        )
        return Begun.from_reply(reply, with_event=False)

    async def _record_event(self, call: Call, outcome: int) -> str | None:
        """Add the event of outcome to the activity stream and return its id.

        Returns None for an outcome without an event (a wait), and when the
        stream cannot be reached.
        """
        event = _EVENTS.get(outcome)
        if event is None:
            return None
        kind, cached, blocked = event
        try:
            event_id: str = await self.scripts.record_event(
                keys=[self.keys.activity],
                args=[
                    call.now_ms,
                    self.settings.activity_max_events,
                    kind,
                    call.client,
                    call.prompt_excerpt,
                    call.request.model,
                    "1" if cached else "0",
                    "1" if blocked else "0",
                ],
            )
        except (RedisError, OSError) as error:
            self._warnings.warning(
                "event", "could not add a %s event to the activity stream: %s", kind, error
            )
            return None
        return event_id
