"""Metrics, request ids and request logs, against real servers on loopback:
scraped /metrics figures compared with the calls made, alone and with
`serve --workers 2`; request ids through gRPC and the gateway; JSON log lines."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import re
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Running, RunningGateway
from tests.helpers import ActivityWatch
from tests.test_activity import SLOW_CHANNEL_OPTIONS
from tests.test_workers import OWN_CONNECTION, Pool, start_pool  # noqa: F401
from tokenflow_grpc.logformat import JsonFormatter, RequestIdFilter
from tokenflow_grpc.request_id import REQUEST_ID_KEY
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

SERVICE = "tokenflow.v1.TokenFlowService"
METRICS_LINE = re.compile(r"Prometheus metrics: http://127\.0\.0\.1:(\d+)/metrics")
GENERATED_ID = re.compile(r"[0-9a-f]{32}")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Return every sample of /metrics, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str) -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_service=SERVICE,
        grpc_method=method,
        grpc_type="unary",
        grpc_code=code,
    )


def generate_figures(samples: Samples) -> dict[str, float]:
    """The figures one Generate burst changes."""
    return {
        "ok": handled(samples, "Generate", "OK"),
        "rejected_calls": handled(samples, "Generate", "RESOURCE_EXHAUSTED"),
        "timed": value(
            samples,
            "grpc_server_handling_seconds_count",
            grpc_service=SERVICE,
            grpc_method="Generate",
            grpc_type="unary",
        ),
        "admitted": value(samples, "tokenflow_limiter_decisions_total", decision="admitted"),
        "rejected": value(samples, "tokenflow_limiter_decisions_total", decision="rejected"),
        "hits": value(samples, "tokenflow_cache_hits_total"),
        "misses": value(samples, "tokenflow_cache_misses_total"),
        "scripts": value(
            samples,
            "tokenflow_valkey_command_duration_seconds_count",
            operation="begin_generate",
        ),
    }


async def send_generates(stub: Any, prompts: list[str]) -> collections.Counter[grpc.StatusCode]:
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    for prompt in prompts:
        try:
            await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=10.0)
            codes[grpc.StatusCode.OK] += 1
        except grpc.aio.AioRpcError as error:
            codes[error.code()] += 1
    return codes


async def test_metrics_match_calls(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, rate_limit=4, metrics_address="127.0.0.1:0")
    port = running.server.metrics.port
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    # The registry is shared by every server of this test process, so the
    # test compares the change in each figure.
    before = await asyncio.to_thread(scrape, port)

    # One miss, two hits of the same prompt, one miss of another, then two rejections.
    prompts = ["metrics a", "metrics a", "metrics a", "metrics b", "metrics a", "metrics c"]
    codes = await send_generates(stub, prompts)
    after = await asyncio.to_thread(scrape, port)

    old, new = generate_figures(before), generate_figures(after)
    change = {name: new[name] - old[name] for name in new}
    assert codes == {grpc.StatusCode.OK: 4, grpc.StatusCode.RESOURCE_EXHAUSTED: 2}
    assert change["ok"] == 4
    assert change["rejected_calls"] == 2
    assert change["timed"] == 6
    assert change["admitted"] == 4
    assert change["rejected"] == 2
    assert change["hits"] == 2
    assert change["misses"] == 2
    assert change["scripts"] == 6
    assert value(after, "tokenflow_valkey_up") == 1


async def test_metrics_count_watchers_and_drops(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(
        valkey_url, metrics_address="127.0.0.1:0", watch_queue_size=1, rate_limit=100
    )
    port = running.server.metrics.port
    before = await asyncio.to_thread(scrape, port)
    channel = grpc.aio.insecure_channel(running.address, options=SLOW_CHANNEL_OPTIONS)
    try:
        watch = await ActivityWatch.open(channel, read=False)
        opened = await asyncio.to_thread(scrape, port)
        # A queue of one event, a small flow-control window and an unread
        # stream: the burst loses events.
        await send_generates(
            pb_grpc.TokenFlowServiceStub(running.channel()), [f"drop {i}" for i in range(30)]
        )
        watch.start_reading()
        first = await watch.next()
        await watch.close()
    finally:
        await channel.close()
    after = await asyncio.to_thread(scrape, port)

    dropped = value(after, "tokenflow_events_dropped_total") - value(
        before, "tokenflow_events_dropped_total"
    )
    assert value(opened, "tokenflow_watchers") == value(before, "tokenflow_watchers") + 1
    assert first.event.id
    assert dropped >= 1
    assert value(after, "tokenflow_watchers") == value(before, "tokenflow_watchers")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Return the lines that are JSON objects; fail on a line that starts as one but is not.

    Lines of other programs (gRPC's C core writes a few to stderr) are skipped.
    """
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_workers_metrics_and_json_logs(start_pool: Any, valkey_url: str) -> None:  # noqa: F811
    limit, calls = 6, 20
    pool: Pool = await asyncio.to_thread(
        start_pool,
        "--workers",
        "2",
        "--valkey-url",
        valkey_url,
        "--key-prefix",
        f"test-{uuid.uuid4().hex[:12]}",
        "--rate-limit",
        str(limit),
        "--no-gateway",
        "--metrics-address",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    )
    port = int(pool.wait_for_output(METRICS_LINE, 10.0).group(1))

    outcomes = []
    request_ids = []
    for index in range(calls):
        request_id = f"workers-{index}"
        request_ids.append(request_id)
        async with grpc.aio.insecure_channel(pool.target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.TokenFlowServiceStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(prompt=f"workers {index % 2}"),
                metadata=((REQUEST_ID_KEY, request_id),),
                timeout=30.0,
                wait_for_ready=True,
            )
            try:
                await call
                outcomes.append((grpc.StatusCode.OK, await call.trailing_metadata()))
            except grpc.aio.AioRpcError as error:
                outcomes.append((error.code(), error.trailing_metadata()))
    samples = await asyncio.to_thread(scrape, port)
    figures = generate_figures(samples)

    codes = collections.Counter(code for code, _ in outcomes)
    workers = {dict(trailers)["x-tokenflow-worker"] for _, trailers in outcomes}
    assert codes == {grpc.StatusCode.OK: limit, grpc.StatusCode.RESOURCE_EXHAUSTED: calls - limit}
    assert [dict(trailers)[REQUEST_ID_KEY] for _, trailers in outcomes] == request_ids
    assert len(workers) == 2
    assert figures["ok"] == limit
    assert figures["rejected_calls"] == calls - limit
    assert figures["timed"] == calls
    assert figures["admitted"] == limit
    assert figures["rejected"] == calls - limit
    assert figures["hits"] == limit - 2
    assert figures["misses"] == 2
    assert value(samples, "tokenflow_valkey_up") == 1

    # Worker output reaches the log through the parent, a moment after the response.
    pool.wait_for_log(re.compile(f'"request_id": "{request_ids[-1]}"'))
    entries = json_lines(pool.log)
    requests = [entry for entry in entries if entry.get("method") == f"{SERVICE}/Generate"]
    assert {entry["request_id"] for entry in requests} == set(request_ids)
    assert all(
        {"time", "level", "logger", "message", "code", "duration_ms", "client", "worker"}
        <= entry.keys()
        for entry in requests
    )
    assert all(entry["level"] == "DEBUG" for entry in requests)
    assert not any("workers 0" in json.dumps(entry) for entry in entries)


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """Request log records of this process, as JSON lines in a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tokenflow_grpc.observability")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield buffer
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_request_id_round_trip(running_valkey: Running, captured_log: io.StringIO) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    call = stub.Generate(
        pb.GenerateRequest(prompt="secret prompt text"),
        metadata=((REQUEST_ID_KEY, "trace-7f:01"),),
        timeout=10.0,
    )
    await call
    given = dict(await call.trailing_metadata())
    generated_call = stub.GetStats(pb.GetStatsRequest(), timeout=10.0)
    await generated_call
    generated = dict(await generated_call.trailing_metadata())

    entries = json_lines(captured_log.getvalue())
    assert given[REQUEST_ID_KEY] == "trace-7f:01"
    assert GENERATED_ID.fullmatch(generated[REQUEST_ID_KEY])
    assert [entry["request_id"] for entry in entries] == [
        "trace-7f:01",
        generated[REQUEST_ID_KEY],
    ]
    assert entries[0]["code"] == "OK"
    assert entries[0]["client"] == "127.0.0.1"
    assert entries[0]["request_bytes"] > 0
    assert "secret prompt" not in captured_log.getvalue()


async def test_request_id_on_errors(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, rate_limit=1)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    await stub.Generate(pb.GenerateRequest(prompt="one"), timeout=10.0)

    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await stub.Generate(
            pb.GenerateRequest(prompt="two"), metadata=((REQUEST_ID_KEY, "over-limit"),)
        )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.Generate(
            pb.GenerateRequest(prompt="three"), metadata=((REQUEST_ID_KEY, "has space"),)
        )
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await stub.Generate(
            pb.GenerateRequest(prompt="four"), metadata=((REQUEST_ID_KEY, "a" * 129),)
        )

    assert rejected.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(rejected.value.trailing_metadata())[REQUEST_ID_KEY] == "over-limit"
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid x-request-id" in (invalid.value.details() or "")
    assert GENERATED_ID.fullmatch(dict(invalid.value.trailing_metadata())[REQUEST_ID_KEY])
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 128 characters" in (too_long.value.details() or "")


async def test_gateway_passes_request_id(gateway: RunningGateway) -> None:
    url = f"{gateway.url}/v1/generate"
    async with gateway.session.post(
        url, json={"prompt": "gateway id"}, headers={"X-Request-Id": "http-42"}
    ) as given:
        await given.read()
    async with gateway.session.post(url, json={"prompt": "gateway id"}) as generated:
        await generated.read()
    async with gateway.session.post(
        url, json={"prompt": "gateway id"}, headers={"X-Request-Id": "bad id"}
    ) as invalid:
        invalid_body = await invalid.json()
    async with gateway.session.get(f"{gateway.url}/v1/no-such-route") as not_found:
        await not_found.read()

    assert given.status == 200
    assert given.headers["X-Request-Id"] == "http-42"
    assert "Grpc-Trailer-x-request-id" not in given.headers
    assert GENERATED_ID.fullmatch(generated.headers["X-Request-Id"])
    assert invalid.status == 400
    assert "invalid header 'X-Request-Id'" in invalid_body["message"]
    assert GENERATED_ID.fullmatch(invalid.headers["X-Request-Id"])
    assert not_found.status == 404
    assert GENERATED_ID.fullmatch(not_found.headers["X-Request-Id"])


async def test_gateway_stream_has_request_id(gateway: RunningGateway) -> None:
    async with gateway.session.get(
        f"{gateway.url}/v1/activity:watch", headers={"X-Request-Id": "stream-1"}
    ) as response:
        status, request_id = response.status, response.headers["X-Request-Id"]

    assert status == 200
    assert request_id == "stream-1"


def test_gateway_child_gets_no_metrics_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway records no server metrics, so it must not add samples to the workers' sum."""
    from tokenflow_grpc.gateway.process import _gateway_environment

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/tokenflow-metrics-test")
    monkeypatch.setenv("TOKENFLOW_LOG_LEVEL", "DEBUG")

    environment = _gateway_environment()

    assert "PROMETHEUS_MULTIPROC_DIR" not in environment
    assert environment["TOKENFLOW_LOG_LEVEL"] == "DEBUG"
