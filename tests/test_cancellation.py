"""Calls cancelled while their Valkey command is on the wire.

A command cancelled after it was sent and before its reply was read leaves
that reply on the connection. If the connection went back to the pool as it
was, the next command on it would read the cancelled command's reply. These
tests send every Valkey command through a proxy that delays replies, cancel
many calls in that gap, then check that each later reply belongs to its own
request.

redis-py (8.2.0 here) closes a connection whose read was cancelled, so the
pool never hands out a connection with a reply left on it. These tests fail
when that protection is switched off (read_response with
disconnect_on_error=False), which shows they reach the gap.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.conftest import Running
from tests.proxy import DelayingProxy
from tokenflow_grpc.cache import cache_key
from tokenflow_grpc.generator import GenerationRequest, SimulatedGenerator
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# Each Valkey reply arrives this many seconds after Valkey sent it.
REPLY_DELAY_SECONDS = 0.03
PROMPTS = [f"cancellation prompt {n}: {'word ' * n}" for n in range(16)]
WAVES = 12
# Calls per wave: cancelled ones, and checked ones that run at the same time
# and may be given a connection that a cancelled call just used.
CANCELLED_PER_WAVE = 30
CHECKED_CLIENTS = 12
# Each cancelled call is cancelled after a random delay up to this, which
# spans the proxy's reply delay (a cache hit has one round trip).
MAX_CANCEL_AFTER_SECONDS = 0.08
RATE_LIMIT = 100


def forwarded(client: str) -> tuple[tuple[str, str], ...]:
    """Metadata that makes the server rate limit client (loopback is a trusted proxy)."""
    return (("x-forwarded-for", client),)


async def expected_text(prompt: str, model: str) -> str:
    request = GenerationRequest(prompt=prompt, model=model)
    generation = await SimulatedGenerator().generate(request, time.monotonic() + 10.0)
    return generation.text


@pytest.fixture
async def proxy(valkey_url: str) -> AsyncIterator[DelayingProxy]:
    port = int(valkey_url.rsplit(":", 1)[1].split("/")[0])
    started = DelayingProxy(port, REPLY_DELAY_SECONDS)
    await started.start()
    yield started
    await started.stop()


async def cancel_after(call: Any, seconds: float) -> None:
    """Cancel call after seconds, then wait for it to end."""
    await asyncio.sleep(seconds)
    call.cancel()
    try:
        await call
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


async def test_cancelled_commands_leave_no_stale_replies(
    proxy: DelayingProxy, start_server: Any
) -> None:
    running: Running = await start_server(proxy.url, rate_limit=RATE_LIMIT, valkey_timeout=5.0)
    model = running.settings.default_model
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    for prompt in PROMPTS:
        await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=10.0)
    rng = random.Random(11)

    checked: list[tuple[str, int, str, Any]] = []
    stats: list[Any] = []
    for wave in range(WAVES):
        cancelled = []
        for n in range(CANCELLED_PER_WAVE):
            if n % 5 == 0:
                call = stub.GetStats(pb.GetStatsRequest(activity_limit=50), timeout=20.0)
            else:
                request = pb.GenerateRequest(prompt=rng.choice(PROMPTS))
                client = f"203.0.113.{n + 1}"
                call = stub.Generate(request, metadata=forwarded(client), timeout=20.0)
            cancelled.append(cancel_after(call, rng.uniform(0.0, MAX_CANCEL_AFTER_SECONDS)))
        checked_calls = []
        for n in range(CHECKED_CLIENTS):
            client, prompt = f"198.51.100.{n + 1}", rng.choice(PROMPTS)
            request = pb.GenerateRequest(prompt=prompt)
            checked.append((client, wave, prompt, request))
            checked_calls.append(stub.Generate(request, metadata=forwarded(client), timeout=20.0))
        checked_calls.append(stub.GetStats(pb.GetStatsRequest(), timeout=20.0))
        *_, wave_replies = await asyncio.gather(*cancelled, asyncio.gather(*checked_calls))
        stats.append(wave_replies.pop())
        checked = checked[: len(checked) - CHECKED_CLIENTS] + [
            (*entry[:3], reply)
            for entry, reply in zip(checked[-CHECKED_CLIENTS:], wave_replies, strict=True)
        ]
    final = await stub.GetStats(pb.GetStatsRequest(), timeout=20.0)

    cancelled_generates = WAVES * CANCELLED_PER_WAVE * 4 // 5
    reached_valkey = final.rate_limit.requests_total - len(PROMPTS) - len(checked)
    print(
        f"{cancelled_generates} Generate and {WAVES * CANCELLED_PER_WAVE - cancelled_generates} "
        f"GetStats calls cancelled through a {REPLY_DELAY_SECONDS * 1000:.0f} ms proxy; "
        f"{reached_valkey} of those Generate calls ran their script; the proxy accepted "
        f"{proxy.connections} Valkey connections"
    )

    expected = {prompt: await expected_text(prompt, model) for prompt in PROMPTS}
    for client, wave, prompt, reply in checked:
        request = GenerationRequest(prompt=prompt, model=model)
        assert reply.response == expected[prompt], (client, wave)
        assert reply.cache_key == cache_key(request), (client, wave)
        assert reply.cached is True, (client, wave)
        assert reply.rate_limit.limit == RATE_LIMIT, (client, wave)
        assert reply.rate_limit.remaining == RATE_LIMIT - 1 - wave, (client, wave)
    for snapshot in stats:
        assert snapshot.connected is True
        assert snapshot.rate_limit.limit == RATE_LIMIT
    # Every prompt was cached before the cancellations, so every call that
    # reached Valkey afterwards is a hit.
    assert final.cache.misses == len(PROMPTS)
    assert final.cache.hits + final.cache.misses == final.rate_limit.requests_total
    assert final.rate_limit.blocked_total == 0
