"""The grpc.aio server: TokenFlowService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenflow_grpc import validation
from tokenflow_grpc.activity import ActivityEvent, ActivityHub
from tokenflow_grpc.auth import current_key, interceptors_for, redact_prompts
from tokenflow_grpc.core import Clock, GenerateOptions, GenerateResult, TokenFlow
from tokenflow_grpc.errors import ServerStoppingError, TokenFlowError
from tokenflow_grpc.generator import GenerationRequest, Generator, SimulatedGenerator, Usage
from tokenflow_grpc.health_service import HealthService
from tokenflow_grpc.identity import client_identity
from tokenflow_grpc.input_limits import SimulateLimit, WatcherLimit, grpc_size_options
from tokenflow_grpc.limiter import Decision, TokenState
from tokenflow_grpc.metrics import VALKEY_UP, MetricsServer
from tokenflow_grpc.observability import ObservabilityInterceptor
from tokenflow_grpc.reflection import enable_reflection
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.simulate import OUTCOME_BLOCKED, OUTCOME_SUCCESS, run_simulation
from tokenflow_grpc.stats import StatsSnapshot
from tokenflow_grpc.status import to_status
from tokenflow_grpc.tasks import stop_task
from tokenflow_grpc.tls import server_credentials
from tokenflow_grpc.upstream import UpstreamGenerator
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc
from tokenflow_grpc.valkey import connect, is_memory, redact

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenFlowService"].full_name
# Health entry that reports Valkey itself, whatever the failure policy.
VALKEY_HEALTH_NAME = "valkey"
HEALTH_CHECK_SECONDS = 1.0
# Time that Generate calls ended by the server get to send their UNAVAILABLE
# before gRPC cancels whatever still runs.
CALL_END_SECONDS = 1.0
# A stopped health loop ends at its next pass. One pass can take a Valkey
# timeout, so this bound leaves room for it when a cancel was lost.
HEALTH_STOP_SECONDS = 10.0
# Initial metadata sent once a WatchActivity stream is subscribed: events
# recorded after the client receives it are delivered.
WATCH_READY_METADATA = (("tokenflow-watch", "subscribed"),)
# Initial metadata of Generate and GenerateStream: the key of the call's cache entry.
CACHE_KEY_METADATA_KEY = "x-cache-key"
# Trailing metadata that a worker of `serve --workers N` adds to each Generate
# response or error. Its value is the worker's process id.
WORKER_METADATA_KEY = "x-tokenflow-worker"

_SIMULATE_OUTCOMES = {
    OUTCOME_SUCCESS: pb.SIMULATE_OUTCOME_SUCCESS,
    OUTCOME_BLOCKED: pb.SIMULATE_OUTCOME_BLOCKED,
}


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _duration(ms: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(ms)
    return duration


def rate_limit_message(decision: Decision) -> pb.RateLimit:
    return pb.RateLimit(
        limit=decision.limit,
        remaining=decision.remaining,
        reset_at=_timestamp(decision.reset_at_ms),
        window=_duration(decision.window_ms),
        policy=decision.policy,
        shadow=decision.shadow,
        shadow_rejected=decision.shadow_rejected,
    )


def token_budget_message(tokens: TokenState) -> pb.TokenBudget:
    return pb.TokenBudget(
        limit=tokens.limit,
        remaining=tokens.remaining,
        reset_at=_timestamp(tokens.reset_at_ms),
        window=_duration(tokens.window_ms),
    )


def usage_message(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def generate_metadata(decision: Decision | None, cache_key: str) -> list[tuple[str, str]]:
    """Return the initial metadata of a completed Generate or GenerateStream call."""
    metadata = decision.metadata() if decision is not None else []
    return [*metadata, (CACHE_KEY_METADATA_KEY, cache_key)]


def event_message(event: ActivityEvent) -> pb.ActivityEvent:
    return pb.ActivityEvent(
        id=event.id,
        time=_timestamp(event.time_ms),
        type=validation.ACTIVITY_TYPES_BY_NAME.get(event.type, pb.ACTIVITY_TYPE_UNSPECIFIED),
        client=event.client,
        prompt=event.prompt,
        cached=event.cached,
        blocked=event.blocked,
        model=event.model,
    )


def stats_message(snapshot: StatsSnapshot, settings: Settings) -> pb.GetStatsResponse:
    counters = snapshot.counters
    return pb.GetStatsResponse(
        connected=True,
        timestamp=_timestamp(snapshot.now_ms),
        rate_limit=pb.RateLimitStats(
            total_keys=snapshot.ratelimit_keys,
            top_consumers=[
                pb.Consumer(client=client, requests=requests)
                for client, requests in snapshot.top_consumers
            ],
            blocked_requests=snapshot.blocked_last_minute,
            requests_per_minute=snapshot.requests_last_minute,
            blocked_total=counters.blocked,
            requests_total=counters.requests,
            limit=settings.rate_limit,
            window=_duration(settings.rate_window_ms),
        ),
        cache=pb.CacheStats(
            hits=counters.hits,
            misses=counters.misses,
            total=counters.hits + counters.misses,
            hit_ratio=counters.hit_ratio,
            cached_keys=snapshot.cached_keys,
        ),
        activity=[event_message(event) for event in snapshot.activity],
        key_distribution=snapshot.key_distribution,
        total_keys=snapshot.total_keys,
    )


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    error: TokenFlowError,
    extra_metadata: Sequence[tuple[str, str]] = (),
) -> NoReturn:
    """Fail the call with error's status, adding extra_metadata to its trailing metadata."""
    code, message, metadata = to_status(error)
    await context.abort(code, message, trailing_metadata=(*metadata, *extra_metadata))
    raise AssertionError("context.abort returned")  # abort always raises


class TokenFlowServicer(pb_grpc.TokenFlowServiceServicer):
    """Validates requests, finds the client identity and maps errors to statuses."""

    def __init__(self, core: TokenFlow, settings: Settings, worker_id: str | None = None) -> None:
        """worker_id: sent as x-tokenflow-worker trailing metadata with each Generate."""
        self.core = core
        self.settings = settings
        self.worker_metadata: tuple[tuple[str, str], ...] = (
            ((WORKER_METADATA_KEY, worker_id),) if worker_id else ()
        )
        self.watchers = WatcherLimit(settings.max_watchers_per_client)
        self.simulate_limit = SimulateLimit(core.redis, core.keys, settings, core.now_ms)
        # The tasks of the Generate calls running. When the drain runs out,
        # end_calls() cancels them and each ends with its own UNAVAILABLE,
        # which marks the call as counted. gRPC's cancellation at the end of
        # server.stop() would carry no such mark.
        self._calls: set[asyncio.Task[Any]] = set()
        self.ending_calls = False

    def end_calls(self) -> None:
        """End every Generate and GenerateStream call still running."""
        self.ending_calls = True
        for task in list(self._calls):
            task.cancel()

    @contextlib.asynccontextmanager
    async def _until_stopped(self) -> AsyncIterator[None]:
        """Run the block as a call that end_calls() ends with ServerStoppingError."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._calls.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self.ending_calls:
                raise
            task.uncancel()
            raise ServerStoppingError(
                "the server stopped before this call finished; it was already counted, "
                "so sending it again counts it again"
            ) from None
        finally:
            self._calls.discard(task)

    def client_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Return the call's API key identity, or else its address (x-forwarded-for
        from a trusted proxy included)."""
        key = current_key()
        if key is not None:
            return key.client
        forwarded = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == "x-forwarded-for" and isinstance(value, str)
        ]
        return client_identity(context.peer(), forwarded, self.settings.trusted_proxies)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        try:
            async with self._until_stopped():
                generation, options = self._generate_call(request, context)
                result = await self.core.generate(generation, self.client_of(context), options)
        except TokenFlowError as error:
            await abort(context, error, self.worker_metadata)
        if self.worker_metadata:
            context.set_trailing_metadata(self.worker_metadata)
        return await self._generate_response(result, context)

    def _generate_call(
        self,
        request: validation.AnyGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[GenerationRequest, GenerateOptions]:
        """Validate a Generate or GenerateStream request and return its core arguments."""
        generation = validation.generation_request(request, self.settings)
        cache_ttl = validation.cache_ttl(request, self.settings)
        key = current_key()
        options = GenerateOptions(
            skip_cache=request.skip_cache,
            limit=key.limit if key is not None else None,
            cache_ttl=cache_ttl,
            cache_namespace=validation.cache_namespace(request, key),
            timeout=context.time_remaining(),
        )
        return generation, options

    async def _generate_response(
        self, result: GenerateResult, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        response = pb.GenerateResponse(
            response=result.response,
            cached=result.cached,
            model=result.model,
            cache_key=result.cache_key,
            usage=usage_message(result.usage),
        )
        if result.decision is not None:
            response.rate_limit.CopyFrom(rate_limit_message(result.decision))
            if result.decision.tokens is not None:
                response.token_budget.CopyFrom(token_budget_message(result.decision.tokens))
        await context.send_initial_metadata(generate_metadata(result.decision, result.cache_key))
        return response

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async with self._until_stopped():
                generation, options = self._generate_call(request, context)
                stream = await self.core.open_stream(generation, self.client_of(context), options)
        except TokenFlowError as error:
            await abort(context, error, self.worker_metadata)
        if self.worker_metadata:
            context.set_trailing_metadata(self.worker_metadata)

        usage = Usage()
        async with contextlib.aclosing(stream):
            metadata = generate_metadata(stream.decision, stream.cache_key)
            # The headers wait for the first chunk. A generator that fails
            # before any text then ends the call with its status alone, with
            # the rate-limit metadata in the trailers, so an HTTP gateway can
            # respond with that status instead of a 200 stream.
            chunks = aiter(stream)
            try:
                async with self._until_stopped():
                    chunk = await anext(chunks, None)
            except TokenFlowError as error:
                await abort(context, error, (*metadata, *self.worker_metadata))
            await context.send_initial_metadata(metadata)
            try:
                while chunk is not None:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.text:
                        yield pb.GenerateStreamResponse(delta=chunk.text)
                    async with self._until_stopped():
                        chunk = await anext(chunks, None)
            except TokenFlowError as error:
                await abort(context, error, self.worker_metadata)

        last = pb.GenerateStreamResponse(
            cached=stream.cached,
            model=stream.model,
            cache_key=stream.cache_key,
            usage=usage_message(usage),
        )
        if stream.decision is not None:
            last.rate_limit.CopyFrom(rate_limit_message(stream.decision))
            if stream.decision.tokens is not None:
                last.token_budget.CopyFrom(token_budget_message(stream.decision.tokens))
        yield last

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        try:
            limit = validation.activity_limit(request)
        except TokenFlowError as error:
            await abort(context, error)
        snapshot = await self.core.stats(limit)
        if snapshot is None:
            return pb.GetStatsResponse(connected=False, timestamp=_timestamp(self.core.now_ms()))
        response = stats_message(snapshot, self.settings)
        redact_prompts(response.activity)
        return response

    async def Simulate(
        self, request: pb.SimulateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SimulateResponse:
        try:
            count = validation.simulate_count(request, self.settings)
            await self.simulate_limit.check(self.client_of(context))
        except TokenFlowError as error:
            await abort(context, error)
        report = await run_simulation(self.core, count)
        return pb.SimulateResponse(
            summary=pb.SimulateSummary(
                total=report.total,
                successful=report.successful,
                blocked=report.blocked,
                cached=report.cached,
                failed=report.failed,
            ),
            results=[
                pb.SimulateResult(
                    prompt=result.prompt,
                    client=result.client,
                    status=_SIMULATE_OUTCOMES.get(result.outcome, pb.SIMULATE_OUTCOME_FAILED),
                    cached=result.cached,
                    blocked=result.outcome == OUTCOME_BLOCKED,
                    error=result.error,
                )
                for result in report.results
            ],
        )

    async def WatchActivity(
        self, request: pb.WatchActivityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchActivityResponse]:
        client = self.client_of(context)
        try:
            since_id, types = validation.watch_filter(request)
            if since_id:
                await self.core.hub.check_readable(since_id)
            self.watchers.acquire(client)
        except TokenFlowError as error:
            await abort(context, error)

        try:
            async with self.core.hub.subscription(types) as subscription:
                # Replayed before the headers go out, so that a since_id that
                # cannot be resumed fails with its status alone.
                replay = (
                    await self.core.hub.replay(since_id, self.core.now_ms()) if since_id else None
                )
                await context.send_initial_metadata(WATCH_READY_METADATA)
                events = self.core.hub.watch(subscription, replay)
                async for event, dropped in events:
                    message = event_message(event)
                    redact_prompts([message])
                    yield pb.WatchActivityResponse(event=message, dropped=dropped)
        except TokenFlowError as error:
            await abort(context, error)
        finally:
            self.watchers.release(client)
        # The hub ends a watch only when the server stops.
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; reconnect with since_id set to the last event id",
        )


class HealthMonitor:
    """Keeps the health service in step with Valkey and logs connection changes."""

    def __init__(
        self,
        core: TokenFlow,
        servicer: health.aio.HealthServicer,
        settings: Settings,
        on_valkey_down: Callable[[], Awaitable[object]] | None = None,
    ):
        """on_valkey_down: called at each check while Valkey is unreachable
        (the embedded Valkey restarts itself there)."""
        self.core = core
        self.servicer = servicer
        self.settings = settings
        self.on_valkey_down = on_valkey_down
        self.connected: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def check(self) -> bool:
        error = await self.core.valkey_error()
        if error is not None and self.on_valkey_down is not None:
            await self.on_valkey_down()
            error = await self.core.valkey_error()
        connected = error is None
        VALKEY_UP.set(1 if connected else 0)
        if connected != self.connected:
            if connected:
                logger.info("Valkey connection is up")
            elif self.connected is None:
                logger.warning("Valkey is unreachable at start: %s", error)
            else:
                logger.warning("Valkey connection lost: %s", error)
            self.connected = connected
        serving = connected or self.settings.on_valkey_error == "allow"
        service_status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        valkey_status = (
            health_pb2.HealthCheckResponse.SERVING
            if connected
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set("", service_status)
        await self.servicer.set(SERVICE_NAME, service_status)
        await self.servicer.set(VALKEY_HEALTH_NAME, valkey_status)
        return connected

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tokenflow-health")

    async def stop(self) -> None:
        """Stop the checks, repeating the cancel in case a library call swallowed it."""
        self._stopped = True
        task, self._task = self._task, None
        if not await stop_task(task, HEALTH_STOP_SECONDS):
            logger.warning("health checks did not stop within %g s", HEALTH_STOP_SECONDS)

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            await self.check()


class TokenFlowServer:
    """A running TokenFlow gRPC server and everything it owns."""

    def __init__(
        self,
        settings: Settings,
        redis: Any = None,
        generator: Generator | None = None,
        core: TokenFlow | None = None,
        clock: Clock = time.time,
        on_valkey_down: Callable[[], Awaitable[object]] | None = None,
        reuse_port: bool = False,
        worker_id: str | None = None,
    ) -> None:
        """redis: a client to use instead of connecting to settings.valkey_url;
        clock: seconds since the epoch, replaced by tests; on_valkey_down: see
        HealthMonitor; reuse_port: share the port with other processes that set
        SO_REUSEPORT; worker_id: see TokenFlowServicer."""
        self.settings = settings
        self.worker_id = worker_id
        self._owns_redis = redis is None and core is None
        self._upstream: UpstreamGenerator | None = None
        if core is None:
            redis = (
                redis
                if redis is not None
                else connect(
                    settings.valkey_url,
                    settings.valkey_timeout,
                    cluster=settings.valkey_cluster,
                    ca_cert=settings.valkey_ca_cert,
                )
            )
            generator = generator or self._default_generator(settings)
            core = TokenFlow(redis, settings, generator, clock, hub=self._hub(redis, settings))
        self.core = core
        # Without SO_REUSEPORT a second server on the same port fails to bind
        # instead of silently sharing the port with the first. The workers of
        # `serve --workers N` set it to share one port on purpose.
        self.server = grpc.aio.server(
            # The observability interceptor comes first, so that it counts, logs and
            # gives a request id to the calls that authentication rejects.
            interceptors=[
                ObservabilityInterceptor(settings.trusted_proxies),
                *interceptors_for(settings, SERVICE_NAME),
            ],
            options=[("grpc.so_reuseport", int(reuse_port)), *grpc_size_options(settings)],
        )
        self.metrics = MetricsServer(settings.metrics_address) if settings.metrics_address else None
        self.health = HealthService()
        self.servicer = TokenFlowServicer(self.core, self.settings, self.worker_id)
        self._ending: asyncio.Future[None] | None = None
        self.monitor = HealthMonitor(core, self.health, settings, on_valkey_down)
        self.port = 0

    def _default_generator(self, settings: Settings) -> Generator:
        """Return the generator of --upstream-url, or else the simulated generator."""
        if not settings.upstream_url:
            return SimulatedGenerator(settings.generator_latency)
        self._upstream = UpstreamGenerator.from_settings(settings)
        logger.info(
            "generating with the upstream %s (key from $%s)",
            redact(self._upstream.url),
            settings.upstream_api_key_env,
        )
        return self._upstream

    @staticmethod
    def _hub(redis: Any, settings: Settings) -> ActivityHub:
        from tokenflow_grpc.keys import key_space

        stream = key_space(settings.key_prefix, settings.valkey_cluster).activity
        if is_memory(settings.valkey_url):
            return ActivityHub(redis, stream, settings.watch_queue_size, block_ms=None)
        # The blocking reader gets its own client, with a read timeout longer than its block time.
        block_ms = 1000
        reader = connect(
            settings.valkey_url,
            settings.valkey_timeout,
            read_timeout=block_ms / 1000 + settings.valkey_timeout,
            cluster=settings.valkey_cluster,
            ca_cert=settings.valkey_ca_cert,
        )
        return ActivityHub(reader, stream, settings.watch_queue_size, block_ms=block_ms)

    async def start(self) -> int:
        """Bind, register services and start serving; return the bound port."""
        pb_grpc.add_TokenFlowServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, [SERVICE_NAME, health.SERVICE_NAME])

        try:
            self.port = self._add_port()
        except RuntimeError as error:
            raise OSError(
                f"cannot listen on the gRPC address {self.settings.grpc_address}: the port is "
                "in use or the address is not local; pass another --grpc-address"
            ) from error

        if any(network.prefixlen == 0 for network in self.settings.trusted_proxies):
            logger.warning(
                "--trusted-proxies trusts every address, so any client can choose the "
                "identity it is limited by through x-forwarded-for"
            )
        if self.metrics is not None:
            self.metrics.start()
        await self.monitor.check()
        self.monitor.start()
        await self.server.start()
        logger.info(
            "TokenFlow serving gRPC%s on %s (port %d), Valkey %s%s, limit %d per %g s%s",
            " over TLS" if self.settings.tls_cert else "",
            self.settings.grpc_address,
            self.port,
            redact(self.settings.valkey_url) or "embedded",
            " (cluster)" if self.settings.valkey_cluster else "",
            self.settings.rate_limit,
            self.settings.rate_window,
            ", API keys required" if self.settings.api_keys or self.settings.api_keys_file else "",
        )
        return self.port

    def _add_port(self) -> int:
        address = self.settings.grpc_address
        if not self.settings.tls_cert:
            port: int = self.server.add_insecure_port(address)
            return port
        credentials = server_credentials(self.settings.tls_cert, self.settings.tls_key)
        port = self.server.add_secure_port(address, credentials)
        return port

    def reload_policies(self) -> bool:
        """Read --policies-file again; see TokenFlow.reload_policies."""
        return self.core.reload_policies()

    def end_calls_now(self) -> None:
        """End the Generate calls still running, as when the drain runs out,
        and cancel every other call CALL_END_SECONDS later."""
        logger.warning("ending the calls still running")
        self.servicer.end_calls()
        # Kept, because the event loop holds only a weak reference to a task.
        self._ending = asyncio.ensure_future(self.server.stop(CALL_END_SECONDS))

    async def stop(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, drain in-flight calls for up to grace seconds, then close."""
        logger.info("TokenFlow stopping: draining calls for up to %g s", grace)
        await self.monitor.stop()
        await self.health.enter_graceful_shutdown()
        # stop() rejects new calls at once; ending the watch streams then lets
        # the drain finish without waiting the whole grace period for them.
        # The calls still draining need Valkey (single-flight waiters read the
        # cache, generators store their responses), so the scripts close last.
        stopping = asyncio.create_task(self.server.stop(grace + CALL_END_SECONDS))
        await asyncio.sleep(0)
        await self.core.end_watches()
        drained, _ = await asyncio.wait({stopping}, timeout=grace)
        if not drained:
            logger.warning("the %g s drain ran out: ending the calls still running", grace)
            self.servicer.end_calls()
        await stopping
        await self.core.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self._upstream is not None:
            await self._upstream.close()
        if self._owns_redis:
            if self.core.hub.redis is not self.core.redis:
                await self.core.hub.redis.aclose()
            await self.core.redis.aclose()
        logger.info("TokenFlow stopped")
