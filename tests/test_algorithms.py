"""Each rate-limit algorithm's scripts against its reference model
(tests/limit_models.py): for any sequence of request times on the injected
clock, the scripts admit, reject and count down exactly as the model does."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ManualClock, Running
from tests.limit_models import SlidingLogModel, SlidingWindowModel, TokenBucketModel
from tokenflow_grpc.core import GenerateOptions
from tokenflow_grpc.errors import RateLimitedError
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.limiter import Decision
from tokenflow_grpc.policies import (
    SLIDING_LOG,
    SLIDING_WINDOW,
    TOKEN_BUCKET,
    Policy,
    PolicySet,
)

START_MS = 1_800_000_000_000
# Windows of at least 10 s, because Valkey expires the keys in real time:
# a shorter window could expire a key that is still live on the test's clock.
WINDOWS_MS = st.integers(10_000, 120_000)
PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(params=["valkey", "memory", "cluster"])
async def clocked(
    request: pytest.FixtureRequest, start_server: Any, valkey_url: str
) -> tuple[Running, ManualClock]:
    """A server with a manual clock on the embedded Valkey, fakeredis and the cluster."""
    urls = {"valkey": valkey_url, "memory": f"memory://{uuid.uuid4().hex}"}
    if request.param == "cluster":
        urls["cluster"] = request.getfixturevalue("valkey_cluster").url
    clock = ManualClock()
    running: Running = await start_server(urls[request.param], clock=clock)
    return running, clock


async def decide(running: Running, clock: ManualClock, policy: Policy, offset_ms: int) -> Decision:
    """Make one call at START_MS + offset_ms under policy and return its decision."""
    clock.now = (START_MS + offset_ms) / 1000
    running.core.policies = PolicySet((), policy)
    request = GenerationRequest(prompt=f"call at {offset_ms}", model="tokenflow-sim-1")
    try:
        result = await running.core.generate(
            request, policy.name, GenerateOptions(skip_cache=True)
        )
    except RateLimitedError as error:
        assert isinstance(error.decision, Decision)
        return error.decision
    assert result.decision is not None
    return result.decision


def times(max_gap_ms: int) -> st.SearchStrategy[list[int]]:
    """Increasing request times in ms from 0, with gaps of up to max_gap_ms (0 included)."""
    return st.lists(st.integers(0, max_gap_ms), min_size=1, max_size=30).map(
        lambda gaps: [sum(gaps[: i + 1]) for i in range(len(gaps))]
    )


@PROPERTY_SETTINGS
@given(limit=st.integers(1, 6), window_ms=WINDOWS_MS, data=st.data())
async def test_sliding_log_equals_model(
    clocked: tuple[Running, ManualClock], limit: int, window_ms: int, data: st.DataObject
) -> None:
    running, clock = clocked
    policy = Policy(
        name=f"log-{uuid.uuid4().hex[:8]}",
        algorithm=SLIDING_LOG,
        requests=limit,
        window_ms=window_ms,
        capacity=limit,
    )
    model = SlidingLogModel(limit, window_ms)

    for offset in data.draw(times(window_ms // 2)):
        decision = await decide(running, clock, policy, offset)
        now = decision.now_ms
        expected = model.decide(now)
        assert decision.allowed == expected.allowed, f"at {now} ms"
        assert decision.remaining == expected.remaining, f"at {now} ms"
        assert decision.retry_after_ms == expected.retry_after_ms, f"at {now} ms"


@PROPERTY_SETTINGS
@given(limit=st.integers(1, 6), window_ms=WINDOWS_MS, data=st.data())
async def test_sliding_window_equals_model(
    clocked: tuple[Running, ManualClock], limit: int, window_ms: int, data: st.DataObject
) -> None:
    running, clock = clocked
    policy = Policy(
        name=f"counter-{uuid.uuid4().hex[:8]}",
        algorithm=SLIDING_WINDOW,
        requests=limit,
        window_ms=window_ms,
        capacity=limit,
    )
    model = SlidingWindowModel(limit, window_ms)

    for offset in data.draw(times(window_ms // 2)):
        decision = await decide(running, clock, policy, offset)
        now = decision.now_ms
        expected = model.decide(now)
        assert decision.allowed == expected.allowed, f"at {now} ms"
        assert decision.remaining == expected.remaining, f"at {now} ms"
        if not decision.allowed:
            retry = decision.retry_after_ms
            assert model.would_admit(now + retry), f"retry after {retry} ms at {now} ms"
            assert retry == 1 or not model.would_admit(now + retry - 1), f"at {now} ms"


@PROPERTY_SETTINGS
@given(
    capacity=st.integers(1, 6),
    rate=st.integers(1, 5),
    window_ms=st.integers(60_000, 120_000),
    data=st.data(),
)
async def test_token_bucket_equals_model(
    clocked: tuple[Running, ManualClock],
    capacity: int,
    rate: int,
    window_ms: int,
    data: st.DataObject,
) -> None:
    running, clock = clocked
    policy = Policy(
        name=f"bucket-{uuid.uuid4().hex[:8]}",
        algorithm=TOKEN_BUCKET,
        requests=rate,
        window_ms=window_ms,
        capacity=capacity,
    )
    model = TokenBucketModel(capacity, rate, window_ms)

    for offset in data.draw(times(window_ms // rate)):
        decision = await decide(running, clock, policy, offset)
        now = decision.now_ms
        expected = model.decide(now)
        assert decision.allowed == expected.allowed, f"at {now} ms"
        assert decision.remaining == expected.remaining, f"at {now} ms"
        assert decision.retry_after_ms == expected.retry_after_ms, f"at {now} ms"
        if not decision.allowed:
            assert model.would_admit(now + decision.retry_after_ms), f"at {now} ms"
