"""TokenFlow's domain logic over one Valkey connection: Generate's hot path,
stats, Simulate and activity. No gRPC or HTTP types appear here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from tokenflow_grpc.activity import ActivityHub
from tokenflow_grpc.cache import (
    DEFAULT_CACHE_NAMESPACE,
    InFlight,
    cache_key,
    decode_entry,
    encode_entry,
)
from tokenflow_grpc.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FieldViolation,
    GeneratorError,
    GeneratorTimeoutError,
    InvalidArgumentError,
    RateLimitedError,
)
from tokenflow_grpc.generator import (
    Chunk,
    Generation,
    GenerationRequest,
    Generator,
    Usage,
    estimate_usage,
)
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
    OUTCOME_WAIT,
    Begun,
    Call,
    Claimed,
    rounds_for,
)
from tokenflow_grpc.rounds_metrics import CountedRounds
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.stats import KeyCensus, StatsSnapshot, read_stats
from tokenflow_grpc.usage import admission_tokens
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
    usage: Usage = Usage()


@dataclass(frozen=True)
class GenerateOptions:
    """The per-call options of Generate and GenerateStream.

    limit replaces settings.rate_limit for this client (an API key's own
    limit). cache_ttl, in seconds, replaces settings.cache_ttl for the entry
    this call writes. timeout is the time left until the call's deadline, in
    seconds.
    """

    namespace: str = NAMESPACE_CLIENT
    skip_cache: bool = False
    limit: int | None = None
    cache_ttl: int | None = None
    cache_namespace: str = DEFAULT_CACHE_NAMESPACE
    timeout: float | None = None


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
        self.settings = settings
        self.policies = policies or load_policies(settings)
        self.generator = generator
        self.keys = key_space(settings.key_prefix, settings.valkey_cluster)
        self.scripts = Scripts.register(redis)
        self.in_flight = InFlight()
        self.hub = hub or ActivityHub(redis, self.keys.activity, settings.watch_queue_size)
        self.census = KeyCensus(redis, self.keys, settings.key_count_interval)
        self._clock = clock
        self._warnings = RepeatLimiter(logger)
        self._lock_ttl_ms = int(LOCK_LEASE_SECONDS * 1000)
        self.rounds = CountedRounds(
            rounds_for(self.keys, self.scripts, settings, self._lock_ttl_ms)
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

    async def end_watches(self) -> None:
        """End every WatchActivity stream and stop the activity reader."""
        await self.hub.close()

    async def close(self) -> None:
        await self.hub.close()
        await self.scripts.close()

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
        self, request: GenerationRequest, client: str, options: GenerateOptions = GenerateOptions()
    ) -> GenerateResult:
        """Rate limit the call, then return the response from the cache or the generator.

        Raises RateLimitedError when the client is over its limit,
        BackendUnavailableError when Valkey cannot be reached and the policy
        is deny, and GeneratorError when the generator fails.
        """
        call, deadline = self._call(request, client, options)
        try:
            begun = await self.rounds.begin(call)
        except (RedisError, OSError) as error:
            self._check_fail_open(error)
            generation = await self._call_generator(request, deadline)
            return self._result(call, generation, False, None, None)

        decision = self._decision(call, begun)
        claimed = await self._resolve_wait(call, begun)
        if claimed.outcome == OUTCOME_HIT:
            cached = decode_entry(claimed.cached_text or "", request)
            result = self._result(call, cached, True, decision, claimed.event_id)
            return await self._settle_tokens(call, result)
        if claimed.outcome == OUTCOME_MISS:
            ttl = options.cache_ttl or self.settings.cache_ttl
            generation = await self._generate_and_store(call, ttl, deadline)
        else:
            generation = await self._call_generator(request, deadline)
        result = self._result(call, generation, False, decision, claimed.event_id)
        return await self._settle_tokens(call, result)

    async def open_stream(
        self, request: GenerationRequest, client: str, options: GenerateOptions = GenerateOptions()
    ) -> GenerationStream:
        """Rate limit the call and claim its cache entry, then return its stream.

        The rounds run before this returns, so the caller has the decision
        before the first chunk. A call that finds an identical call
        generating waits here for it and then streams the cached response.
        Raises as generate() does; the stream raises GeneratorError.
        """
        call, deadline = self._call(request, client, options)
        try:
            begun = await self.rounds.begin(call)
        except (RedisError, OSError) as error:
            self._check_fail_open(error)
            return GenerationStream(call, None, False, self._relay(request, deadline))

        decision = self._decision(call, begun)
        claimed = await self._resolve_wait(call, begun)
        cached = claimed.outcome == OUTCOME_HIT
        if cached:
            chunks = _replay(decode_entry(claimed.cached_text or "", request))
        elif claimed.outcome == OUTCOME_MISS:
            ttl = options.cache_ttl or self.settings.cache_ttl
            chunks = self._stream_and_store(call, ttl, deadline)
        else:
            chunks = self._relay(request, deadline)
        stream = GenerationStream(call, decision, cached, chunks, claimed.event_id)
        stream.wrap(lambda inner: self._settled(call, stream, inner))
        return stream

    def _call(
        self, request: GenerationRequest, client: str, options: GenerateOptions
    ) -> tuple[Call, float]:
        """Return the call's Call and its deadline in time.monotonic() seconds."""
        policy = self.policies.match(client, request.model, options.limit)
        token_cost = admission_tokens(request, policy.default_max_tokens) if policy.tokens else 0
        if policy.tokens and token_cost > policy.tokens and not policy.shadow:
            # It could never fit, so a rejection with retry-after would be retried forever.
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "max_tokens",
                        f"the request needs about {token_cost} tokens (prompt and max_tokens), "
                        f"more than the whole token budget of {policy.tokens} per window of "
                        f"policy {policy.name!r}; ask for fewer max_tokens",
                    )
                ]
            )
        call = Call(
            request,
            client,
            options.namespace,
            cache_key(request, options.cache_namespace),
            uuid.uuid4().hex,
            options.skip_cache,
            self.now_ms(),
            policy,
            token_cost,
        )
        timeout = self.settings.generator_timeout
        if options.timeout is not None:
            timeout = min(timeout, options.timeout)
        return call, time.monotonic() + timeout

    def _decision(self, call: Call, begun: Begun) -> Decision:
        """Return the rate-limit decision of begun; raise RateLimitedError when
        rejected, and report a rejection that a shadow policy turned into an admission."""
        policy, limited = call.policy, begun.limited
        tokens = None
        if policy.tokens:
            tokens = TokenState(
                policy.tokens,
                max(limited.tokens_remaining, 0),
                policy.window_ms,
                limited.tokens_reset_ms,
            )
        decision = Decision(
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
        if begun.outcome == OUTCOME_REJECTED:
            raise RateLimitedError(call.client, decision)
        if decision.shadow_rejected:
            self._report_shadow_rejection(call, decision)
        return decision

    def _report_shadow_rejection(self, call: Call, decision: Decision) -> None:
        SHADOW_REJECTIONS.labels(decision.policy, decision.reason).inc()
        self._warnings.warning(
            f"shadow {decision.policy}",
            "shadow policy %s would have rejected a call from %s (over its %s limit); admitted it",
            decision.policy,
            call.client,
            decision.reason,
        )

    async def _settle_tokens(self, call: Call, result: GenerateResult) -> GenerateResult:
        """Replace the call's token estimate with the tokens it used, and report
        the budget left. A cache hit uses no tokens, because no model ran."""
        used = 0 if result.cached else result.usage.total_tokens
        decision = await self._charge_usage(call, result.decision, used)
        return dataclasses.replace(result, decision=decision)

    async def _charge_usage(
        self, call: Call, decision: Decision | None, used: int
    ) -> Decision | None:
        """Charge the difference between used and the call's admission estimate
        to its token budget, and return decision with the budget left.

        A call admitted only by a shadow policy was never charged. When the
        generator fails, this is not reached and the estimate stays charged.
        """
        if decision is None or decision.tokens is None or decision.shadow_rejected:
            return decision
        delta = used - call.token_cost
        if delta == 0:
            return decision
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
            return decision
        tokens = dataclasses.replace(decision.tokens, remaining=int(remaining))
        return dataclasses.replace(decision, tokens=tokens)

    async def _settled(
        self, call: Call, stream: GenerationStream, chunks: AsyncGenerator[Chunk, None]
    ) -> AsyncGenerator[Chunk, None]:
        """Relay a stream's chunks; at its usage chunk, charge the tokens used
        and update stream.decision, which the last message reports."""
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if chunk.usage is not None:
                    used = 0 if stream.cached else chunk.usage.total_tokens
                    stream.decision = await self._charge_usage(call, stream.decision, used)
                yield chunk

    async def _resolve_wait(self, call: Call, begun: Begun) -> Claimed:
        """Return the claim of an admitted call: a hit, a miss (this call
        generates and fills the cache) or a skip (this call generates without
        the cache), after waiting for an identical call when one holds the lock."""
        if begun.outcome != OUTCOME_WAIT:
            return Claimed(begun.outcome, begun.cached_text, begun.event_id)
        return await self._wait_for_claim(call)

    @staticmethod
    def _result(
        call: Call,
        generation: Generation,
        cached: bool,
        decision: Decision | None,
        event_id: str | None,
    ) -> GenerateResult:
        return GenerateResult(
            response=generation.text,
            cached=cached,
            model=call.request.model,
            cache_key=call.cache_key,
            decision=decision,
            event_id=event_id,
            usage=generation.usage,
        )

    def _check_fail_open(self, error: Exception) -> None:
        """Raise BackendUnavailableError for a Valkey error under the deny policy,
        else log that the call goes on without limit or cache."""
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

    def _timeout_error(self) -> GeneratorTimeoutError:
        """Return the error of a generator that missed the call's deadline."""
        return GeneratorTimeoutError(
            "the generator did not respond within the call's deadline or "
            f"--generator-timeout ({self.settings.generator_timeout:g} s)"
        )

    @contextlib.contextmanager
    def _generator_errors(self, model: str) -> Iterator[None]:
        """Turn a timeout into the call's timeout error and any other failure
        of the generator into GeneratorError."""
        try:
            yield
        except TimeoutError as error:
            raise self._timeout_error() from error
        except GeneratorError:
            raise
        except Exception as error:
            logger.exception("generator failed for model %s", model)
            raise GeneratorError(f"the generator failed: {error}") from error

    async def _call_generator(self, request: GenerationRequest, deadline: float) -> Generation:
        with self._generator_errors(request.model):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self.generator.generate(request, deadline)

    async def _relay(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        """Yield the generator's chunks, each within deadline, ending with one that has usage."""
        chunks = self.generator.stream(request, deadline)
        text: list[str] = []
        usage: Usage | None = None
        try:
            while True:
                with self._generator_errors(request.model):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        chunk = await anext(chunks, None)
                if chunk is None:
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.text:
                    text.append(chunk.text)
                    yield Chunk(chunk.text)
        finally:
            await chunks.aclose()
        yield Chunk(usage=usage or estimate_usage(request.prompt, "".join(text)))

    async def _generate_and_store(self, call: Call, ttl: int, deadline: float) -> Generation:
        """Generate as the holder of the single-flight lock, then fill the cache."""
        key, token = call.cache_key, call.token
        future = self.in_flight.start(key)
        renewal = asyncio.create_task(self._renew_lock(key, token), name="tokenflow-lock-renewal")
        try:
            try:
                generation = await self._call_generator(call.request, deadline)
            except BaseException:
                renewal.cancel()
                await self._release_lock(key, token)
                raise
            renewal.cancel()
            await self._store(key, token, generation, ttl)
            return generation
        finally:
            self.in_flight.finish(key, future)

    async def _stream_and_store(
        self, call: Call, ttl: int, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        """Relay the generator's stream as the holder of the single-flight lock,
        then fill the cache. A stream that fails or is closed early stores
        nothing and releases the lock, so a waiting call takes it over."""
        key, token = call.cache_key, call.token
        future = self.in_flight.start(key)
        renewal = asyncio.create_task(self._renew_lock(key, token), name="tokenflow-lock-renewal")
        text: list[str] = []
        try:
            try:
                async with contextlib.aclosing(self._relay(call.request, deadline)) as chunks:
                    async for chunk in chunks:
                        if chunk.usage is not None:
                            generation = Generation("".join(text), chunk.usage)
                            renewal.cancel()
                            await self._store(key, token, generation, ttl)
                        text.append(chunk.text)
                        yield chunk
            except BaseException:
                renewal.cancel()
                await self._release_lock(key, token)
                raise
        finally:
            renewal.cancel()
            self.in_flight.finish(key, future)

    async def _store(self, key: str, token: str, generation: Generation, ttl: int) -> None:
        """Fill the cache entry and release the lock; a Valkey error is logged, not raised."""
        try:
            await self.scripts.complete_generate(
                keys=[self.keys.cache(key), self.keys.lock(key)],
                args=[encode_entry(generation), ttl, token],
            )
        except (RedisError, OSError) as error:
            # The response is good and only caching it failed. The lock expires by itself.
            self._warnings.warning("store", "could not store cache entry %s: %s", key[:16], error)

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

    async def _wait_for_claim(self, call: Call) -> Claimed:
        """Wait for the call holding the lock, then claim the entry again.

        A call of this process is awaited directly; one of another process
        is polled. Returns a hit, or a miss when the holder failed and this
        call took the lock over, or a skip when Valkey became unreachable
        and the policy lets the call generate without the cache.
        """
        key = call.cache_key
        deadline = time.monotonic() + self._max_wait_seconds
        delay = _WAIT_POLL_MIN_SECONDS
        while time.monotonic() < deadline:
            remaining_time = deadline - time.monotonic()
            if not await self.in_flight.wait(key, remaining_time):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WAIT_POLL_MAX_SECONDS)

            try:
                # The event of this claim carries the time it was made.
                claim = dataclasses.replace(call, now_ms=self.now_ms())
                claimed = await self.rounds.claim(claim, waiting=True)
            except (RedisError, OSError) as error:
                self._check_fail_open(error)
                return Claimed(OUTCOME_SKIPPED, None, None)
            if claimed.outcome == OUTCOME_HIT and claimed.cached_text is not None:
                return claimed
            if claimed.outcome == OUTCOME_MISS:
                return claimed

        raise GeneratorError(
            f"timed out after {self._max_wait_seconds:.0f} s waiting for an identical request "
            "to fill the cache"
        )

    async def stats(self, activity_limit: int) -> StatsSnapshot | None:
        """Return a snapshot of the figures, or None when Valkey cannot be reached."""
        try:
            with valkey_timer(OPERATION_STATS):
                return await read_stats(
                    self.redis, self.keys, self.now_ms(), activity_limit, self.census
                )
        except (RedisError, OSError) as error:
            self._warnings.warning("stats", "GetStats could not reach Valkey: %s", error)
            return None


class GenerationStream:
    """An admitted GenerateStream call: its decision and the chunks of its response.

    Iterating yields text chunks and then one chunk with usage set. decision
    is None when the call was answered without Valkey (fail-open). Closing
    the stream early (aclose) stops the generator and releases the lock.
    """

    def __init__(
        self,
        call: Call,
        decision: Decision | None,
        cached: bool,
        chunks: AsyncGenerator[Chunk, None],
        event_id: str | None = None,
    ) -> None:
        self.model = call.request.model
        self.cache_key = call.cache_key
        self.decision = decision
        self.cached = cached
        self.event_id = event_id
        self._chunks = chunks

    def wrap(
        self,
        wrapper: Callable[[AsyncGenerator[Chunk, None]], AsyncGenerator[Chunk, None]],
    ) -> None:
        """Pass the chunks through wrapper before the caller sees them."""
        self._chunks = wrapper(self._chunks)

    def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def _replay(generation: Generation) -> AsyncGenerator[Chunk, None]:
    """Yield a cached response as one text chunk and its usage."""
    if generation.text:
        yield Chunk(generation.text)
    yield Chunk(usage=generation.usage)
