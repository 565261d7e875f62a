"""The sliding-window limiter against a reference model, with hypothesis.

The model keeps the list of admitted request times per client. A request at
time now is admitted when fewer than limit admitted times t satisfy
t > now - window. Requests run against the real Valkey with an injected
clock, one after another or in concurrent bursts at one instant, and the
limiter must agree with the model on every decision, every remaining count
and every retry delay.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ManualClock, make_settings
from tokenflow_grpc.core import GenerateOptions, TokenFlow
from tokenflow_grpc.errors import RateLimitedError
from tokenflow_grpc.generator import GenerationRequest, SimulatedGenerator
from tokenflow_grpc.limiter import Decision
from tokenflow_grpc.valkey import connect

CLOCK_START = 1_800_000_000.0
MAX_EXAMPLES = 200
MAX_STEPS = 20
MAX_BURST = 4
# The window key expires window_ms of real time after its last request, while
# the examples move a manual clock. One example takes a few milliseconds of
# real time, so with a window of 1 s or more the key expires in the middle of
# one only if the machine stalls for that long.
MIN_WINDOW_MS = 1000
MAX_WINDOW_MS = 5000


@dataclass
class ReferenceWindow:
    """The admitted request times of one client, in ms."""

    limit: int
    window_ms: int
    admitted: list[int] = field(default_factory=list)

    def in_window(self, now_ms: int) -> list[int]:
        return sorted(t for t in self.admitted if t > now_ms - self.window_ms)

    def admit_burst(self, now_ms: int, size: int) -> tuple[list[int], int | None]:
        """Apply size requests at now_ms and return the remaining counts of the
        admitted ones and the retry delay in ms of the rejected ones (None when
        none is rejected)."""
        count = len(self.in_window(now_ms))
        admitted = min(size, max(0, self.limit - count))
        remaining = [self.limit - count - 1 - n for n in range(admitted)]
        self.admitted += [now_ms] * admitted
        if admitted == size:
            return remaining, None
        window = self.in_window(now_ms)
        freeing = window[len(window) - self.limit]
        return remaining, max(freeing + self.window_ms - now_ms, 1)


class Harness:
    """One event loop and one Valkey client for every example of a test."""

    def __init__(self, valkey_url: str) -> None:
        self.valkey_url = valkey_url
        self.runner = asyncio.Runner()
        self.redis = self.runner.run(self._connect())

    async def _connect(self) -> Any:
        return connect(self.valkey_url, 5.0)

    def close(self) -> None:
        self.runner.run(self.redis.aclose())
        self.runner.close()


@pytest.fixture(scope="module")
def harness(valkey: Any) -> Iterator[Harness]:
    started = Harness(f"redis://127.0.0.1:{valkey.port}/0")
    yield started
    started.close()


async def decide(core: TokenFlow, client: str, prompt: str) -> Decision:
    """Send one Generate (cache skipped) and return its rate-limit decision."""
    request = GenerationRequest(prompt=prompt, model=core.settings.default_model)
    try:
        result = await core.generate(request, client, GenerateOptions(skip_cache=True))
    except RateLimitedError as error:
        assert isinstance(error.decision, Decision)
        return error.decision
    assert result.decision is not None
    return result.decision


async def run_steps(
    harness: Harness, limit: int, window_ms: int, steps: list[tuple[int, int]]
) -> None:
    clock = ManualClock(CLOCK_START)
    server_settings = make_settings(
        harness.valkey_url, rate_limit=limit, rate_window=window_ms / 1000
    )
    core = TokenFlow(harness.redis, server_settings, SimulatedGenerator(), clock=clock)
    client = f"model-{uuid.uuid4().hex[:12]}"
    reference = ReferenceWindow(limit, window_ms)
    admitted_times: list[int] = []

    for step, (gap_ms, burst) in enumerate(steps):
        clock.advance(gap_ms / 1000)
        now_ms = int(clock() * 1000)
        decisions = await asyncio.gather(
            *(decide(core, client, f"step {step} request {n}") for n in range(burst))
        )
        expected_remaining, expected_retry_ms = reference.admit_burst(now_ms, burst)

        admitted = [d for d in decisions if d.allowed]
        rejected = [d for d in decisions if not d.allowed]
        assert len(admitted) == len(expected_remaining), (step, now_ms)
        assert sorted(d.remaining for d in admitted) == sorted(expected_remaining), step
        for decision in rejected:
            assert decision.remaining == 0, step
            assert decision.retry_after_ms == expected_retry_ms, step
        admitted_times += [now_ms] * len(admitted)

    for t in admitted_times:
        assert sum(t - window_ms < other <= t for other in admitted_times) <= limit, t
    keys = [key async for key in harness.redis.scan_iter(match=f"{server_settings.key_prefix}*")]
    if keys:
        await harness.redis.delete(*keys)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int]]]:
    """Draw (limit, window_ms, steps), each step a (gap_ms, burst size) pair.

    Gaps of window_ms - 1, window_ms and window_ms + 1 are drawn often,
    because a request older than now - window_ms leaves the window exactly there.
    """
    limit = draw(st.integers(min_value=1, max_value=5))
    window_ms = draw(st.integers(min_value=MIN_WINDOW_MS, max_value=MAX_WINDOW_MS))
    gaps = st.integers(min_value=0, max_value=3000) | st.sampled_from(
        [0, 1, window_ms - 1, window_ms, window_ms + 1]
    )
    steps = draw(
        st.lists(st.tuples(gaps, st.integers(1, MAX_BURST)), min_size=1, max_size=MAX_STEPS)
    )
    return limit, window_ms, steps


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_limiter_matches_reference_model(
    harness: Harness, scenario: tuple[int, int, list[tuple[int, int]]]
) -> None:
    limit, window_ms, steps = scenario
    harness.runner.run(run_steps(harness, limit, window_ms, steps))
