"""The upstream generator against a fake OpenAI-compatible server on loopback:
usage, retries on 429 and 5xx with Retry-After, error statuses, timeouts,
GenerateStream over gRPC and the gateway, and the per-request cache controls
(namespace per tenant, TTL)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import CountingGenerator, Running, RunningGateway, make_settings
from tests.fake_openai import FakeOpenAI, Reply
from tokenflow_grpc.apikeys import ApiKey, entry_toml, hash_secret, new_secret
from tokenflow_grpc.client import AsyncTokenFlowClient, retry_delay
from tokenflow_grpc.server import CACHE_KEY_METADATA_KEY
from tokenflow_grpc.upstream import UpstreamGenerator
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

API_KEY_ENV = "TOKENFLOW_TEST_UPSTREAM_KEY"
UPSTREAM_SECRET = "sk-test-upstream"
UPSTREAM_MODEL = "fake-model-large"
CALL_TIMEOUT = 20.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20.0)


@pytest.fixture
async def start_upstream() -> AsyncIterator[Any]:
    """Return a function that starts a FakeOpenAI and stops it at teardown."""
    started: list[FakeOpenAI] = []

    async def start(*replies: Reply) -> FakeOpenAI:
        fake = FakeOpenAI(replies or [Reply()])
        await fake.start()
        started.append(fake)
        return fake

    yield start

    for fake in started:
        await fake.stop()


@pytest.fixture
def start_with_upstream(start_server: Any, valkey_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Return a function that starts a server whose generator is fake's API."""
    monkeypatch.setenv(API_KEY_ENV, UPSTREAM_SECRET)

    async def start(fake: FakeOpenAI, **overrides: Any) -> Running:
        values: dict[str, Any] = {
            "upstream_url": fake.base_url,
            "upstream_api_key_env": API_KEY_ENV,
            "upstream_models": (f"tokenflow-sim-1={UPSTREAM_MODEL}",),
            "upstream_backoff": 0.01,
            "rate_limit": 100,
        }
        values.update(overrides)
        running: Running = await start_server(valkey_url, **values)
        return running

    return start


def stub_of(running: Running) -> pb_grpc.TokenFlowServiceStub:
    return pb_grpc.TokenFlowServiceStub(running.channel())


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin in the trailing metadata")


def retry_delay_seconds(error: grpc.aio.AioRpcError) -> float | None:
    for detail in status_details(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


async def generate_error(running: Running, prompt: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub_of(running).Generate(pb.GenerateRequest(prompt=prompt), timeout=CALL_TIMEOUT)
    return caught.value


# Generate through the upstream


async def test_upstream_answer_with_usage(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(text="forty-two", usage=(7, 3, 10)))
    running = await start_with_upstream(fake)

    call = stub_of(running).Generate(
        pb.GenerateRequest(prompt="the answer?", temperature=0.5, max_tokens=20),
        timeout=CALL_TIMEOUT,
    )
    reply = await call
    metadata = dict(await call.initial_metadata())

    assert reply.response == "forty-two"
    assert reply.cached is False
    assert reply.model == "tokenflow-sim-1"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 3)
    assert reply.usage.total_tokens == 10
    assert metadata[CACHE_KEY_METADATA_KEY] == reply.cache_key
    assert len(fake.received) == 1
    sent = fake.received[0]
    assert sent.body["model"] == UPSTREAM_MODEL
    assert sent.body["messages"] == [{"role": "user", "content": "the answer?"}]
    assert sent.body["temperature"] == 0.5
    assert sent.body["max_tokens"] == 20
    assert "stream" not in sent.body
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_SECRET}"


async def test_cache_hit_keeps_usage(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(text="cached text", usage=(4, 5, 9)))
    running = await start_with_upstream(fake)
    stub = stub_of(running)

    first = await stub.Generate(pb.GenerateRequest(prompt="twice"), timeout=CALL_TIMEOUT)
    second = await stub.Generate(pb.GenerateRequest(prompt="twice"), timeout=CALL_TIMEOUT)

    assert second.cached is True
    assert second.response == first.response == "cached text"
    assert second.usage == first.usage
    assert second.usage.total_tokens == 9
    assert len(fake.received) == 1


async def test_retry_after_429_then_success(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(
        Reply(status=429, headers={"Retry-After": "1"}), Reply(text="after the wait")
    )
    running = await start_with_upstream(fake, upstream_retries=2)

    reply = await stub_of(running).Generate(pb.GenerateRequest(prompt="busy"), timeout=CALL_TIMEOUT)

    assert reply.response == "after the wait"
    assert len(fake.received) == 2
    # The backoff is 0.01 s, so a gap of about a second is the Retry-After.
    assert fake.received[1].time - fake.received[0].time >= 0.9


async def test_429_after_retries_is_unavailable(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(status=429, headers={"Retry-After": "0"}))
    running = await start_with_upstream(fake, upstream_retries=2)

    error = await generate_error(running, "always busy")

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 429" in (error.details() or "")
    assert "scripted failure" in (error.details() or "")
    assert len(fake.received) == 3
    assert retry_delay_seconds(error) == 0.0
    assert dict(error.trailing_metadata() or ())["retry-after"] == "1"


async def test_retry_after_past_deadline_fails_at_once(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(status=429, headers={"Retry-After": "60"}))
    running = await start_with_upstream(fake, upstream_retries=5, generator_timeout=10.0)

    started = time.monotonic()
    error = await generate_error(running, "wait a minute")
    elapsed = time.monotonic() - started

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.received) == 1
    assert elapsed < 5.0
    assert retry_delay_seconds(error) == 60.0
    assert dict(error.trailing_metadata() or ())["retry-after"] == "60"


async def test_client_does_not_retry_an_upstream_failure(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(status=429, headers={"Retry-After": "30"}))
    running = await start_with_upstream(fake, upstream_retries=0)

    async with AsyncTokenFlowClient(running.address, retries=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("upstream busy")
        stats = await client.stats()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert retry_delay(caught.value) == 30.0
    # One call: one upstream request and one request in the limiter.
    assert len(fake.received) == 1
    assert stats.rate_limit.requests_total == 1


async def test_5xx_retried_then_success(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(status=503), Reply(status=502), Reply(text="recovered"))
    running = await start_with_upstream(fake, upstream_retries=2)

    reply = await stub_of(running).Generate(
        pb.GenerateRequest(prompt="flaky"), timeout=CALL_TIMEOUT
    )

    assert reply.response == "recovered"
    assert len(fake.received) == 3


async def test_5xx_after_retries_is_unavailable(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(status=500))
    running = await start_with_upstream(fake, upstream_retries=1)

    error = await generate_error(running, "broken")

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 500" in (error.details() or "")
    assert len(fake.received) == 2
    assert retry_delay_seconds(error) is None


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.FAILED_PRECONDITION),
        (403, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_4xx_not_retried(
    start_upstream: Any, start_with_upstream: Any, status: int, code: grpc.StatusCode
) -> None:
    fake = await start_upstream(Reply(status=status, error_message="max_tokens is too large"))
    running = await start_with_upstream(fake, upstream_retries=3)

    error = await generate_error(running, "rejected")

    assert error.code() == code
    assert f"HTTP {status}" in (error.details() or "")
    assert "max_tokens is too large" in (error.details() or "")
    assert len(fake.received) == 1


async def test_upstream_timeout_is_deadline_exceeded(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(delay=5.0))
    running = await start_with_upstream(fake, upstream_timeout=0.3, upstream_retries=2)

    started = time.monotonic()
    error = await generate_error(running, "slow")

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--upstream-timeout" in (error.details() or "")
    assert time.monotonic() - started < 4.0
    assert len(fake.received) == 1


async def test_generator_timeout_is_deadline_exceeded(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(delay=5.0))
    running = await start_with_upstream(fake, generator_timeout=0.3)

    error = await generate_error(running, "slower than the deadline")

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--generator-timeout" in (error.details() or "")


async def test_unreachable_upstream_is_unavailable(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream()
    await fake.stop()
    running = await start_with_upstream(fake, upstream_retries=1)

    error = await generate_error(running, "nobody home")

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not reach the upstream" in (error.details() or "")


def test_key_not_sent_when_variable_unset() -> None:
    settings = make_settings("memory://unused", upstream_url="http://127.0.0.1:9/v1")
    generator = UpstreamGenerator.from_settings(settings, environ={})

    assert "Authorization" not in generator._headers


# GenerateStream


async def read_stream(call: Any) -> list[pb.GenerateStreamResponse]:
    """Read the rest of a stream with call.read(), which a test may also have called."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def test_stream_relays_deltas_before_upstream_ends(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    gate = asyncio.Event()
    deltas = ["Hello", ", ", "streaming", " world"]
    fake = await start_upstream(Reply(deltas=deltas, usage=(2, 4, 6), gate=gate, gate_after=2))
    running = await start_with_upstream(fake)

    call = stub_of(running).GenerateStream(
        pb.GenerateStreamRequest(prompt="stream please"), timeout=CALL_TIMEOUT
    )
    early = [await call.read(), await call.read()]
    finished_before_gate = fake.finished_streams
    gate.set()
    rest = await read_stream(call)

    assert [message.delta for message in early] == ["Hello", ", "]
    assert finished_before_gate == 0
    assert [message.delta for message in rest[:-1]] == ["streaming", " world"]
    last = rest[-1]
    assert last.delta == ""
    assert last.cached is False
    assert last.model == "tokenflow-sim-1"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 4)
    assert last.usage.total_tokens == 6
    assert last.rate_limit.limit == 100
    assert last.cache_key == dict(await call.initial_metadata())[CACHE_KEY_METADATA_KEY]
    assert fake.received[0].body["stream"] is True
    assert fake.received[0].body["stream_options"] == {"include_usage": True}


async def test_stream_fills_cache_for_generate(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream(Reply(deltas=["One", " two", " three"], usage=(1, 3, 4)))
    running = await start_with_upstream(fake)
    stub = stub_of(running)

    streamed = await read_stream(
        stub.GenerateStream(pb.GenerateStreamRequest(prompt="fill"), timeout=CALL_TIMEOUT)
    )
    reply = await stub.Generate(pb.GenerateRequest(prompt="fill"), timeout=CALL_TIMEOUT)

    assert "".join(message.delta for message in streamed) == "One two three"
    assert reply.cached is True
    assert reply.response == "One two three"
    assert reply.usage == streamed[-1].usage
    assert reply.cache_key == streamed[-1].cache_key
    assert len(fake.received) == 1


async def test_stream_of_cache_hit(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(text="from generate", usage=(1, 2, 3)))
    running = await start_with_upstream(fake)
    stub = stub_of(running)

    await stub.Generate(pb.GenerateRequest(prompt="hit me"), timeout=CALL_TIMEOUT)
    streamed = await read_stream(
        stub.GenerateStream(pb.GenerateStreamRequest(prompt="hit me"), timeout=CALL_TIMEOUT)
    )

    assert [message.delta for message in streamed] == ["from generate", ""]
    assert streamed[-1].cached is True
    assert streamed[-1].usage.total_tokens == 3
    assert len(fake.received) == 1


async def test_stream_error_after_retries(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(status=503))
    running = await start_with_upstream(fake, upstream_retries=1)
    call = stub_of(running).GenerateStream(
        pb.GenerateStreamRequest(prompt="no stream"), timeout=CALL_TIMEOUT
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_stream(call)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.received) == 2


async def test_stream_rate_limited(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(deltas=["a"]))
    running = await start_with_upstream(fake, rate_limit=1)
    stub = stub_of(running)
    await read_stream(stub.GenerateStream(pb.GenerateStreamRequest(prompt="1"), timeout=10))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_stream(stub.GenerateStream(pb.GenerateStreamRequest(prompt="2"), timeout=10))

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry-after" in dict(caught.value.trailing_metadata() or ())


async def test_concurrent_streams_share_one_upstream_call(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    gate = asyncio.Event()
    fake = await start_upstream(Reply(deltas=["shared", " answer"], gate=gate, gate_after=1))
    running = await start_with_upstream(fake)
    stub = stub_of(running)
    first = stub.GenerateStream(pb.GenerateStreamRequest(prompt="same"), timeout=CALL_TIMEOUT)
    assert (await first.read()).delta == "shared"

    second = stub.GenerateStream(pb.GenerateStreamRequest(prompt="same"), timeout=CALL_TIMEOUT)
    second_messages = asyncio.ensure_future(read_stream(second))
    await asyncio.sleep(0.2)
    gate.set()
    await read_stream(first)
    waited = await second_messages

    assert [message.delta for message in waited] == ["shared answer", ""]
    assert waited[-1].cached is True
    assert len(fake.received) == 1


# Cache controls


def api_keys_toml(secrets: dict[str, tuple[str, str]]) -> str:
    """TOML of keys given as {id: (secret, role)}."""
    return "".join(
        entry_toml(ApiKey(key_id, hash_secret(secret), role))
        for key_id, (secret, role) in secrets.items()
    )


async def test_tenants_never_share_answers(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream(Reply(text="tenant answer"))
    alpha, beta, ops = new_secret(), new_secret(), new_secret()
    toml = api_keys_toml({"alpha": (alpha, "user"), "beta": (beta, "user"), "ops": (ops, "admin")})
    running = await start_with_upstream(fake, api_keys=toml)
    stub = stub_of(running)

    def ask(secret: str, namespace: str = "") -> Any:
        request = pb.GenerateRequest(prompt="shared prompt", cache_namespace=namespace)
        return stub.Generate(request, metadata=[("x-api-key", secret)], timeout=CALL_TIMEOUT)

    first_alpha = await ask(alpha)
    first_beta = await ask(beta)
    second_alpha = await ask(alpha)
    admin_in_alpha = await ask(ops, "alpha")

    assert first_alpha.cached is False
    assert first_beta.cached is False
    assert first_alpha.cache_key != first_beta.cache_key
    assert second_alpha.cached is True
    assert admin_in_alpha.cached is True
    assert admin_in_alpha.cache_key == first_alpha.cache_key
    assert len(fake.received) == 2


async def test_user_key_cannot_pick_other_namespace(
    start_upstream: Any, start_with_upstream: Any
) -> None:
    fake = await start_upstream()
    alpha = new_secret()
    running = await start_with_upstream(fake, api_keys=api_keys_toml({"alpha": (alpha, "user")}))
    request = pb.GenerateRequest(prompt="peek", cache_namespace="beta")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub_of(running).Generate(
            request, metadata=[("x-api-key", alpha)], timeout=CALL_TIMEOUT
        )

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'beta'" in (caught.value.details() or "")
    assert len(fake.received) == 0


async def test_namespace_without_keys(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream()
    running = await start_with_upstream(fake)
    stub = stub_of(running)

    default = await stub.Generate(pb.GenerateRequest(prompt="ns"), timeout=CALL_TIMEOUT)
    named = await stub.Generate(
        pb.GenerateRequest(prompt="ns", cache_namespace="team-a"), timeout=CALL_TIMEOUT
    )
    explicit_default = await stub.Generate(
        pb.GenerateRequest(prompt="ns", cache_namespace="default"), timeout=CALL_TIMEOUT
    )

    assert named.cached is False
    assert named.cache_key != default.cache_key
    assert explicit_default.cached is True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(
            pb.GenerateRequest(prompt="ns", cache_namespace="no spaces"), timeout=CALL_TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_namespace" in (caught.value.details() or "")


async def test_custom_ttl_on_entry(start_upstream: Any, start_with_upstream: Any) -> None:
    fake = await start_upstream()
    running = await start_with_upstream(fake, cache_ttl=3600, max_cache_ttl=7200)
    stub = stub_of(running)

    short = await stub.Generate(
        pb.GenerateRequest(prompt="short", cache_ttl=duration_pb2.Duration(seconds=42)),
        timeout=CALL_TIMEOUT,
    )
    rounded = await stub.Generate(
        pb.GenerateRequest(prompt="rounded", cache_ttl=duration_pb2.Duration(nanos=200_000_000)),
        timeout=CALL_TIMEOUT,
    )
    default = await stub.Generate(pb.GenerateRequest(prompt="default"), timeout=CALL_TIMEOUT)

    redis, keys = running.core.redis, running.core.keys
    assert 40 <= await redis.ttl(keys.cache(short.cache_key)) <= 42
    assert await redis.ttl(keys.cache(rounded.cache_key)) == 1
    assert 3500 <= await redis.ttl(keys.cache(default.cache_key)) <= 3600


@pytest.mark.parametrize("seconds", [7201, 0, -5])
async def test_ttl_out_of_range(
    start_upstream: Any, start_with_upstream: Any, seconds: int
) -> None:
    fake = await start_upstream()
    running = await start_with_upstream(fake, max_cache_ttl=7200)
    request = pb.GenerateRequest(prompt="ttl", cache_ttl=duration_pb2.Duration(seconds=seconds))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub_of(running).Generate(request, timeout=CALL_TIMEOUT)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 7200 s (--max-cache-ttl)" in (caught.value.details() or "")
    assert len(fake.received) == 0


# GenerateStream through the gateway


async def post_stream(
    gateway: RunningGateway, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, str]:
    async with gateway.session.post(
        gateway.url + "/v1/generate:stream", json=body, headers=headers, timeout=HTTP_TIMEOUT
    ) as response:
        return response, await response.text()


async def test_gateway_stream_ndjson(
    start_upstream: Any, start_with_upstream: Any, start_gateway_for: Any
) -> None:
    fake = await start_upstream(Reply(deltas=["line", " by", " line"], usage=(1, 3, 4)))
    running = await start_with_upstream(fake)
    gateway = await start_gateway_for(running.address)

    response, text = await post_stream(gateway, {"prompt": "ndjson"})
    lines = [json.loads(line) for line in text.splitlines()]

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["X-RateLimit-Limit"] == "100"
    assert response.headers["Grpc-Metadata-X-Cache-Key"] == lines[-1]["result"]["cacheKey"]
    assert [line["result"]["delta"] for line in lines[:-1]] == ["line", " by", " line"]
    last = lines[-1]["result"]
    assert last["usage"] == {"promptTokens": 1, "completionTokens": 3, "totalTokens": 4}
    assert last["model"] == "tokenflow-sim-1"
    assert last["delta"] == ""


async def test_gateway_stream_sse(
    start_upstream: Any, start_with_upstream: Any, start_gateway_for: Any
) -> None:
    fake = await start_upstream(Reply(deltas=["server", " sent"], usage=(1, 2, 3)))
    running = await start_with_upstream(fake)
    gateway = await start_gateway_for(running.address)

    response, text = await post_stream(
        gateway, {"prompt": "sse", "cacheTtl": "60s"}, {"Accept": "text/event-stream"}
    )
    events = [block for block in text.split("\n\n") if block.strip()]
    data = [json.loads(block.removeprefix("data: ")) for block in events]

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert all(block.startswith("data: ") for block in events)
    assert [item["delta"] for item in data[:-1]] == ["server", " sent"]
    assert data[-1]["usage"]["totalTokens"] == 3
    ttl = await running.core.redis.ttl(running.core.keys.cache(data[-1]["cacheKey"]))
    assert 0 < ttl <= 60


async def test_gateway_stream_error_status(
    start_upstream: Any, start_with_upstream: Any, start_gateway_for: Any
) -> None:
    fake = await start_upstream()
    running = await start_with_upstream(fake, cache_ttl=100, max_cache_ttl=100)
    gateway = await start_gateway_for(running.address)

    response, text = await post_stream(gateway, {"prompt": "bad", "cacheTtl": "101s"})

    assert response.status == 400
    assert json.loads(text)["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_gateway_stream_fails_before_text_with_status(
    start_upstream: Any, start_with_upstream: Any, start_gateway_for: Any, accept: str
) -> None:
    fake = await start_upstream(Reply(status=503))
    running = await start_with_upstream(fake, upstream_retries=0)
    gateway = await start_gateway_for(running.address)

    response, text = await post_stream(gateway, {"prompt": "no text"}, {"Accept": accept})

    assert response.status == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(text)["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert response.headers["X-RateLimit-Limit"] == "100"
    assert response.headers["X-RateLimit-Remaining"] == "99"


async def test_gateway_stream_deadline_before_text_is_504(
    start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    running = await start_server(valkey_url, generator=CountingGenerator(latency=2.0))
    gateway = await start_gateway_for(running.address)

    response, text = await post_stream(gateway, {"prompt": "slow"}, {"Grpc-Timeout": "100m"})

    assert response.status == 504
    assert json.loads(text)["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_upstream_error_text_masks_keys() -> None:
    """Some upstreams echo the key they were sent; clients and logs must not see it."""
    from tokenflow_grpc.upstream import _error_message

    message_text = "Incorrect API key provided: Bearer sk-live-123456 (sk-abc_9876)"
    body = ('{"error": {"message": "' + message_text + '"}}').encode()

    message = _error_message(body)

    assert "123456" not in message
    assert "9876" not in message
    assert message.startswith("Incorrect API key provided: ***")
