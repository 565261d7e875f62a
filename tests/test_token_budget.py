"""Token budgets and shadow policies through real gRPC calls and the gateway."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.conftest import CountingGenerator, ManualClock, Running
from tokenflow_grpc.generator import Generation, GenerationRequest, Usage
from tokenflow_grpc.usage import CHARS_PER_TOKEN, estimate_text_tokens
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


class ExactGenerator(CountingGenerator):
    """Generator that reports exactly the tokens a call is admitted with (the
    prompt's estimate plus max_tokens), so no charge changes after the call."""

    async def generate(self, request: GenerationRequest, deadline: float) -> Generation:
        self.requests.append(request)
        await asyncio.sleep(0.01)
        prompt_tokens = estimate_text_tokens(request.prompt)
        completion_tokens = request.max_tokens or 0
        text = "x" * (CHARS_PER_TOKEN * completion_tokens)
        usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        return Generation(text, usage)


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"policies-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(params=["valkey", "cluster"])
def shared_url(request: pytest.FixtureRequest, valkey_url: str) -> str:
    if request.param == "cluster":
        cluster_url: str = request.getfixturevalue("valkey_cluster").url
        return cluster_url
    return valkey_url


async def test_budget_exact_across_two_servers(
    start_server: Any, shared_url: str, tmp_path: Path
) -> None:
    budget, max_tokens = 1000, 48
    path = policy_file(
        tmp_path,
        f'[[policies]]\nname = "all"\nrequests = 1000\nwindow = "1h"\ntokens = {budget}\n',
    )
    clock = ManualClock()
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    servers: list[Running] = [
        await start_server(
            shared_url,
            generator=ExactGenerator(),
            clock=clock,
            key_prefix=prefix,
            policies_file=path,
        )
        for _ in range(2)
    ]
    stubs = [pb_grpc.TokenFlowServiceStub(server.channel()) for server in servers]
    # Prompts of 8 characters: 2 estimated tokens, so each call needs 50.
    calls = [
        stubs[n % 2].Generate(
            pb.GenerateRequest(prompt=f"burst {n:02d}", max_tokens=max_tokens, skip_cache=True),
            timeout=30,
        )
        for n in range(60)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    admitted = [o for o in outcomes if isinstance(o, pb.GenerateResponse)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == budget // 50
    assert len(rejected) == 60 - budget // 50
    assert {error.code() for error in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("token budget of 1000 tokens" in (error.details() or "") for error in rejected)
    assert min(response.token_budget.remaining for response in admitted) == 0
    last = dict(rejected[0].trailing_metadata() or ())
    assert last["x-ratelimit-limit-tokens"] == str(budget)
    assert last["x-ratelimit-remaining-tokens"] == "0"


async def test_usage_replaces_estimate(start_server: Any, valkey_url: str, tmp_path: Path) -> None:
    path = policy_file(
        tmp_path,
        '[[policies]]\nname = "all"\nrequests = 100\nwindow = "1h"\ntokens = 5000\n'
        "default_max_tokens = 1000\n",
    )
    running = await start_server(valkey_url, clock=ManualClock(), policies_file=path)
    first = await running.client.generate("a prompt of some length")
    request = running.generator.requests[0]
    used = first.response.usage.total_tokens
    assert used > 0

    assert first.response.token_budget.limit == 5000
    assert first.response.token_budget.remaining == 5000 - used
    assert first.response.token_budget.window.seconds == 3600
    assert estimate_text_tokens(request.prompt) + 1000 > used

    hit = await running.client.generate("a prompt of some length")
    assert hit.response.cached
    assert hit.response.token_budget.remaining == 5000 - used


async def test_budget_per_model_is_separate(
    start_server: Any, valkey_url: str, tmp_path: Path
) -> None:
    path = policy_file(
        tmp_path,
        '[[policies]]\nname = "all"\nrequests = 100\nwindow = "1h"\ntokens = 210\n'
        "tokens_per_model = true\ndefault_max_tokens = 200\n",
    )
    running = await start_server(valkey_url, clock=ManualClock(), policies_file=path)
    # Each call needs 201 tokens and uses more than 9 (the simulated generator
    # reports one token per word), so the second one of a model does not fit.
    await running.client.generate("one", model="tokenflow-sim-1", skip_cache=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("two", model="tokenflow-sim-1", skip_cache=True)
    other = await running.client.generate("three", model="tokenflow-sim-2", skip_cache=True)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert other.response.usage.total_tokens > 9
    assert other.response.token_budget.remaining == 210 - other.response.usage.total_tokens


async def test_gateway_maps_token_headers(
    start_server: Any, start_gateway_for: Any, valkey_url: str, tmp_path: Path
) -> None:
    path = policy_file(
        tmp_path,
        '[[policies]]\nname = "http-users"\nrequests = 5\nwindow = "1m"\n'
        'algorithm = "sliding_window"\ntokens = 4000\n',
    )
    running = await start_server(valkey_url, policies_file=path)
    gateway = await start_gateway_for(running.address)
    async with gateway.session.post(f"{gateway.url}/v1/generate", json={"prompt": "hi"}) as reply:
        body = await reply.json()
        headers = reply.headers

    assert reply.status == 200
    assert headers["X-RateLimit-Limit-Tokens"] == "4000"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) < 4000
    assert headers["RateLimit-Policy"] == '"http-users";q=5;w=60'
    assert body["rateLimit"]["policy"] == "http-users"
    assert body["tokenBudget"]["limit"] == "4000"


def shadow_count(policy: str) -> float:
    value = REGISTRY.get_sample_value(
        "tokenflow_shadow_rejections_total", {"policy": policy, "reason": "requests"}
    )
    return value or 0.0


async def test_shadow_policy_never_rejects(
    start_server: Any, valkey_url: str, tmp_path: Path
) -> None:
    name = f"shadow-{uuid.uuid4().hex[:8]}"
    path = policy_file(
        tmp_path,
        f'[[policies]]\nname = "{name}"\nrequests = 2\nwindow = "1m"\nshadow = true\n',
    )
    running = await start_server(valkey_url, clock=ManualClock(), policies_file=path)
    before = shadow_count(name)
    replies = [await running.client.generate(f"shadow {n}") for n in range(5)]
    stats = await running.client.stats()

    assert [r.response.rate_limit.shadow_rejected for r in replies] == [False, False] + [True] * 3
    assert all(r.response.rate_limit.shadow for r in replies)
    assert [r.response.rate_limit.remaining for r in replies] == [1, 0, 0, 0, 0]
    assert stats.rate_limit.blocked_total == 0
    assert shadow_count(name) - before == 3


async def test_request_larger_than_the_budget_is_invalid(
    start_server: Any, valkey_url: str, tmp_path: Path
) -> None:
    """A call that could never fit gets INVALID_ARGUMENT, not a 429 to retry forever."""
    path = policy_file(
        tmp_path, '[[policies]]\nname = "small"\nrequests = 100\nwindow = "1h"\ntokens = 300\n'
    )
    running = await start_server(valkey_url, clock=ManualClock(), policies_file=path)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.generate("a prompt", max_tokens=1000)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token budget of 300" in (caught.value.details() or "")


async def test_stream_charges_the_usage(
    start_server: Any, valkey_url: str, tmp_path: Path
) -> None:
    path = policy_file(
        tmp_path,
        '[[policies]]\nname = "all"\nrequests = 100\nwindow = "1h"\ntokens = 5000\n'
        "default_max_tokens = 1000\n",
    )
    running = await start_server(valkey_url, clock=ManualClock(), policies_file=path)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    request = pb.GenerateStreamRequest(prompt="a streamed prompt of some length")

    first = [message async for message in stub.GenerateStream(request, timeout=10.0)][-1]
    again = [message async for message in stub.GenerateStream(request, timeout=10.0)][-1]

    used = first.usage.total_tokens
    assert used > 0
    assert first.token_budget.remaining == 5000 - used
    assert again.cached
    assert again.token_budget.remaining == 5000 - used
