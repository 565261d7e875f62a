"""TokenFlow's domain logic over one Valkey connection: Generate's hot path,
stats, Simulate and activity. No gRPC or HTTP types appear here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from tokenflow_grpc.activity import ActivityHub
from tokenflow_grpc.cache import InFlight, cache_key
from tokenflow_grpc.errors import (
    BackendUnavailableError,
    ConfigurationError,
    GeneratorError,
    RateLimitedError,
)
from tokenflow_grpc.generator import GenerationRequest, Generator
from tokenflow_grpc.keys import NAMESPACE_CLIENT, key_space
from tokenflow_grpc.limiter import REASONS, Decision, TokenState
from tokenflow_grpc.logs import RepeatLimiter
from tokenflow_grpc.lua import Scripts
from tokenflow_grpc.metrics import (
    OPERATION_PING,
    OPERATION_STATS,
    SHADOW_REJECTIONS,
    valkey_timer,
)
from tokenflow_grpc.policies import TOKEN_BUCKET, PolicySet, load_policies
from tokenflow_grpc.rounds import (
    OUTCOME_HIT,
    OUTCOME_MISS,
    OUTCOME_REJECTED,
    OUTCOME_SKIPPED,
    Begun,
    Call,
    rounds_for,
)
from tokenflow_grpc.rounds_metrics import CountedRounds
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.stats import StatsSnapshot, read_stats
from tokenflow_grpc.usage import admission_tokens, generation_usage
from tokenflow_grpc.valkey import ping

logger = logging.getLogger(__name__)

# Polling interval of a request waiting for another process to fill the cache.
_WAIT_POLL_MIN_SECONDS = 0.005
_WAIT_POLL_MAX_SECONDS = 0.1
# The single-flight lock is a lease that its holder renews every third of
# it while generating, so the lock of a holder that died (or of a Valkey that
# restarted mid-generation) frees within one lease.
LOCK_LEASE_SECONDS = 3.0
# A request waits for the lock holder up to the generator timeout plus this margin.
_WAIT_MARGIN_SECONDS = 5.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class GenerateResult:
    """The answer to one Generate call.

    decision is None when the call was answered without Valkey (fail-open).
    """

    response: str
    cached: bool
    model: str
    cache_key: str
    decision: Decision | None
    event_id: str | None = None


class TokenFlow:
    """Rate limiter, response cache, counters and activity stream over Valkey."""

    def __init__(
        self,
        redis: Any,
        settings: Settings,
        generator: Generator,
        clock: Clock = time.time,
        hub: ActivityHub | None = None,
        policies: PolicySet | None = None,
    ) -> None:
        """policies: the limit policies, by default those of settings.policies_file;
        raises ConfigurationError when that file is invalid."""
        self.redis = redis
        self.policies = policies or load_policies(settings)
        self.settings = settings
        self.generator = generator
        self.keys = key_space(settings.key_prefix, settings.valkey_cluster)
        self.scripts = Scripts.register(redis)
        self.in_flight = InFlight()
        self.hub = hub or ActivityHub(redis, self.keys.activity, settings.watch_queue_size)
        self._clock = clock
        self._warnings = RepeatLimiter(logger)
        self._lock_ttl_ms = int(LOCK_LEASE_SECONDS * 1000)
        self.rounds = CountedRounds(
            rounds_for(redis, self.keys, self.scripts, settings, self._lock_ttl_ms)
        )
        self._max_wait_seconds = settings.generator_timeout + _WAIT_MARGIN_SECONDS

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def valkey_error(self) -> Exception | None:
        """Return None when Valkey (every primary of a cluster) replies to PING, else the error."""
        try:
            with valkey_timer(OPERATION_PING):
                await ping(self.redis)
        except (RedisError, OSError) as error:
            return error
        return None

    async def close(self) -> None:
        await self.hub.close()

    def reload_policies(self) -> bool:
        """Read settings.policies_file again and apply it to the calls that start after.

        Calls in flight keep the policy they matched. An invalid file leaves
        the policies in force and is logged; returns whether the new ones apply.
        """
        try:
            policies = load_policies(self.settings)
        except ConfigurationError as error:
            logger.error("policy reload failed, keeping the policies in force: %s", error)
            return False
        self.policies = policies
        logger.info(
            "reloaded %d limit policies from %s",
            len(policies.policies) + 1,
            policies.source or "the command-line flags",
        )
        return True

    async def generate(
        self,
        request: GenerationRequest,
        client: str,
        namespace: str = NAMESPACE_CLIENT,
        skip_cache: bool = False,
        limit: int | None = None,
    ) -> GenerateResult:
        """Rate limit the call, then return the response from the cache or the generator.

        limit replaces settings.rate_limit for this client (an API key's own limit).

        Raises RateLimitedError when the client is over its limit,
        BackendUnavailableError when Valkey cannot be reached and the policy
        is deny, and GeneratorError when the generator fails.
        """
        key = cache_key(request)
        policy = self.policies.match(client, request.model, limit)
        token_cost = admission_tokens(request, policy.default_max_tokens) if policy.tokens else 0
        call = Call(
            request,
            client,
            namespace,
            key,
            uuid.uuid4().hex,
            skip_cache,
            self.now_ms(),
            policy,
            token_cost,
        )
        try:
            begun = await self.rounds.begin(call)
        except (RedisError, OSError) as error:
            return await self._answer_without_valkey(request, key, error)

        decision = self._decision(call, begun)
        if begun.outcome == OUTCOME_REJECTED:
            raise RateLimitedError(client, decision)
        if decision.shadow_rejected:
            self._report_shadow_rejection(call, decision)
        result = await self._answer(call, begun, decision)
        return await self._settle_tokens(call, result)

    async def _answer(self, call: Call, begun: Begun, decision: Decision) -> GenerateResult:
        """Return the answer of an admitted call, from the cache or the generator."""
        request, key = call.request, call.cache_key
        if begun.outcome == OUTCOME_HIT:
            return GenerateResult(
                begun.cached_text or "", True, request.model, key, decision, begun.event_id
            )
        if begun.outcome == OUTCOME_SKIPPED:
            text = await self._call_generator(request)
            return GenerateResult(text, False, request.model, key, decision, begun.event_id)
        if begun.outcome == OUTCOME_MISS:
            text = await self._generate_and_store(request, key, call.token)
            return GenerateResult(text, False, request.model, key, decision, begun.event_id)
        return await self._wait_for_fill(call, decision)

    def _decision(self, call: Call, begun: Begun) -> Decision:
        policy, limited = call.policy, begun.limited
        tokens = None
        if policy.tokens:
            tokens = TokenState(
                policy.tokens,
                max(limited.tokens_remaining, 0),
                policy.window_ms,
                limited.tokens_reset_ms,
            )
        return Decision(
            allowed=begun.outcome != OUTCOME_REJECTED,
            limit=policy.capacity if policy.algorithm == TOKEN_BUCKET else policy.requests,
            remaining=begun.remaining,
            window_ms=policy.window_ms,
            reset_at_ms=begun.reset_at_ms,
            retry_after_ms=begun.retry_after_ms,
            now_ms=call.now_ms,
            policy=policy.name,
            shadow=policy.shadow,
            shadow_rejected=limited.shadow_rejected,
            reason=REASONS.get(limited.reason, ""),
            tokens=tokens,
            tokens_needed=call.token_cost,
        )

    def _report_shadow_rejection(self, call: Call, decision: Decision) -> None:
        SHADOW_REJECTIONS.labels(decision.policy, decision.reason).inc()
        self._warnings.warning(
            f"shadow {decision.policy}",
            "shadow policy %s would have rejected a call from %s (over its %s limit); "
            "admitted it",
            decision.policy,
            call.client,
            decision.reason,
        )

    async def _settle_tokens(self, call: Call, result: GenerateResult) -> GenerateResult:
        """Replace the call's token estimate with the tokens it used, and report
        the budget left. A cache hit uses no tokens, because no model ran.

        A call admitted only by a shadow policy was never charged. When the
        generator fails, this is not reached and the estimate stays charged.
        """
        decision = result.decision
        if decision is None or decision.tokens is None or decision.shadow_rejected:
            return result
        used = 0 if result.cached else generation_usage(call.request, result.response)
        delta = used - call.token_cost
        if delta == 0:
            return result
        window_ms = call.policy.window_ms
        charged_window = call.now_ms // window_ms
        try:
            remaining = await self.scripts.charge_tokens(
                keys=[call.tokens_key(self.keys)],
                args=[charged_window, delta, decision.tokens.limit, window_ms, self.now_ms()],
            )
        except (RedisError, OSError) as error:
            self._warnings.warning(
                "charge", "could not charge %d tokens to %s: %s", used, call.client, error
            )
            return result
        tokens = dataclasses.replace(decision.tokens, remaining=int(remaining))
        return dataclasses.replace(result, decision=dataclasses.replace(decision, tokens=tokens))

    async def _answer_without_valkey(
        self, request: GenerationRequest, key: str, error: Exception
    ) -> GenerateResult:
        if self.settings.on_valkey_error == "deny":
            self._warnings.warning(
                "deny", "Valkey unreachable, rejecting Generate (policy deny): %s", error
            )
            raise BackendUnavailableError(
                "Valkey is unreachable and the server is set to fail closed "
                "(--on-valkey-error deny); retry later"
            ) from error
        self._warnings.warning(
            "allow", "Valkey unreachable, answering Generate without limit or cache: %s", error
        )
        text = await self._call_generator(request)
        return GenerateResult(text, False, request.model, key, None)

    async def _call_generator(self, request: GenerationRequest) -> str:
        try:
            return await asyncio.wait_for(
                self.generator.generate(request), self.settings.generator_timeout
            )
        except TimeoutError as error:
            raise GeneratorError(
                f"the generator timed out after {self.settings.generator_timeout} s"
            ) from error
        except GeneratorError:
            raise
        except Exception as error:
            logger.exception("generator failed for model %s", request.model)
            raise GeneratorError(f"the generator failed: {error}") from error

    async def _generate_and_store(self, request: GenerationRequest, key: str, token: str) -> str:
        """Generate as the holder of the single-flight lock, then fill the cache."""
        future = self.in_flight.start(key)
        renewal = asyncio.create_task(self._renew_lock(key, token), name="tokenflow-lock-renewal")
        try:
            try:
                text = await self._call_generator(request)
            except BaseException:
                renewal.cancel()
                await self._release_lock(key, token)
                raise
            renewal.cancel()
            try:
                await self.scripts.complete_generate(
                    keys=[self.keys.cache(key), self.keys.lock(key)],
                    args=[text, self.settings.cache_ttl, token],
                )
            except (RedisError, OSError) as error:
                # The response is good and only caching it failed. The lock expires by itself.
                self._warnings.warning(
                    "store", "could not store cache entry %s: %s", key[:16], error
                )
            return text
        finally:
            self.in_flight.finish(key, future)

    async def _renew_lock(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(LOCK_LEASE_SECONDS / 3)
            try:
                held = await self.scripts.extend_lock(
                    keys=[self.keys.lock(key)], args=[token, self._lock_ttl_ms]
                )
            except (RedisError, OSError) as error:
                self._warnings.warning(
                    "renew", "could not renew cache lock %s: %s", key[:16], error
                )
                continue
            if not held:
                return

    async def _release_lock(self, key: str, token: str) -> None:
        try:
            await self.scripts.release_lock(keys=[self.keys.lock(key)], args=[token])
        except (RedisError, OSError) as error:
            # The lock expires by itself after its TTL.
            logger.warning("could not release cache lock %s: %s", key[:16], error)

    async def _wait_for_fill(self, call: Call, decision: Decision) -> GenerateResult:
        """Wait for the request holding the lock, then read its answer.

        A request of this process is awaited directly; one of another process
        is polled. When the holder fails, this request takes the lock over
        and generates itself.
        """
        request, key = call.request, call.cache_key
        deadline = time.monotonic() + self._max_wait_seconds
        delay = _WAIT_POLL_MIN_SECONDS
        while time.monotonic() < deadline:
            remaining_time = deadline - time.monotonic()
            if not await self.in_flight.wait(key, remaining_time):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WAIT_POLL_MAX_SECONDS)

            try:
                claimed = await self.rounds.claim(call)
            except (RedisError, OSError) as error:
                fallback = await self._answer_without_valkey(request, key, error)
                return GenerateResult(fallback.response, False, request.model, key, decision, None)
            if claimed.outcome == OUTCOME_HIT and claimed.cached_text is not None:
                return GenerateResult(
                    claimed.cached_text, True, request.model, key, decision, claimed.event_id
                )
            if claimed.outcome == OUTCOME_MISS:
                text = await self._generate_and_store(request, key, call.token)
                return GenerateResult(text, False, request.model, key, decision, claimed.event_id)

        raise GeneratorError(
            f"timed out after {self._max_wait_seconds:.0f} s waiting for an identical request "
            "to fill the cache"
        )

    async def stats(self, activity_limit: int) -> StatsSnapshot | None:
        """Return a snapshot of the figures, or None when Valkey cannot be reached."""
        try:
            with valkey_timer(OPERATION_STATS):
                return await read_stats(self.redis, self.keys, self.now_ms(), activity_limit)
        except (RedisError, OSError) as error:
            self._warnings.warning("stats", "GetStats could not reach Valkey: %s", error)
            return None
