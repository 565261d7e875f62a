"""Bad input: INVALID_ARGUMENT with google.rpc.BadRequest naming the field,
and no stored data touched."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import Running
from tests.test_limiter import rich_status
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    details = error_details_pb2.BadRequest()
    assert rich_status(error).details[0].Unpack(details)
    return details


GENERATE_CASES = [
    ("empty prompt", pb.GenerateRequest(prompt=""), "prompt", "must not be empty"),
    ("blank prompt", pb.GenerateRequest(prompt=" \n\t"), "prompt", "only whitespace"),
    ("prompt too large", pb.GenerateRequest(prompt="x" * (32 * 1024 + 1)), "prompt", "32768"),
    ("prompt too large in UTF-8", pb.GenerateRequest(prompt="é" * 16385), "prompt", "32770"),
    ("unknown model", pb.GenerateRequest(prompt="p", model="gpt-99"), "model", "gpt-99"),
    (
        "negative temperature",
        pb.GenerateRequest(prompt="p", temperature=-0.1),
        "temperature",
        "-0.1",
    ),
    ("temperature too high", pb.GenerateRequest(prompt="p", temperature=2.5), "temperature", "2.5"),
    (
        "temperature not a number",
        pb.GenerateRequest(prompt="p", temperature=float("nan")),
        "temperature",
        "nan",
    ),
    ("zero max tokens", pb.GenerateRequest(prompt="p", max_tokens=0), "max_tokens", "got 0"),
    ("too many max tokens", pb.GenerateRequest(prompt="p", max_tokens=9000), "max_tokens", "9000"),
]


@pytest.mark.parametrize(
    ("request_message", "field", "mentioned"),
    [case[1:] for case in GENERATE_CASES],
    ids=[case[0] for case in GENERATE_CASES],
)
async def test_generate_rejects_bad_input(
    running_valkey: Running, request_message: pb.GenerateRequest, field: str, mentioned: str
) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(request_message, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(caught.value).field_violations
    assert [v.field for v in violations] == [field]
    assert mentioned in violations[0].description
    assert mentioned in (caught.value.details() or "")


async def test_prompt_at_limit_is_accepted(running_valkey: Running) -> None:
    reply = await running_valkey.client.generate("x" * (32 * 1024))

    assert reply.response.response


async def test_several_bad_fields_reported_together(running_valkey: Running) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(prompt="", max_tokens=-1, model="nope"), timeout=5)

    fields = [v.field for v in bad_request(caught.value).field_violations]
    assert fields == ["prompt", "model", "max_tokens"]


async def test_bad_input_stores_nothing(running_valkey: Running) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    for request in [case[1] for case in GENERATE_CASES]:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(request, timeout=5)

    stats = await running_valkey.client.stats()
    assert stats.total_keys == 0
    assert stats.rate_limit.requests_total == 0


@pytest.mark.parametrize("count", [-1, 1001, 2**31 - 1], ids=["negative", "over cap", "huge"])
async def test_simulate_rejects_bad_count(running_valkey: Running, count: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running_valkey.client.simulate(count)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(caught.value).field_violations
    assert violations[0].field == "count"
    assert str(count) in violations[0].description


async def test_simulate_cap_is_a_setting(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, simulate_max_count=5)
    accepted = await running.client.simulate(5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.client.simulate(6)

    assert accepted.summary.total == 5
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_simulate_zero_means_fifty(running_valkey: Running) -> None:
    report = await running_valkey.client.simulate(0)

    assert report.summary.total == 50
    assert len(report.results) == 50


async def test_simulate_zero_stays_under_the_cap(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, simulate_max_count=30)

    report = await running.client.simulate(0)

    assert report.summary.total == 30


@pytest.mark.parametrize("limit", [-1, 101], ids=["negative", "over maximum"])
async def test_stats_rejects_bad_activity_limit(running_valkey: Running, limit: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running_valkey.client.stats(activity_limit=limit)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value).field_violations[0].field == "activity_limit"


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.WatchActivityRequest(since_id="yesterday"), "since_id"),
        (pb.WatchActivityRequest(since_id="1-2-3"), "since_id"),
        (pb.WatchActivityRequest(since_id="99999999999999999999-0"), "since_id"),
        (pb.WatchActivityRequest(since_id="1-99999999999999999999"), "since_id"),
        (pb.WatchActivityRequest(since_id="1-0\n"), "since_id"),
        (pb.WatchActivityRequest(types=[pb.ACTIVITY_TYPE_UNSPECIFIED]), "types[0]"),
        (pb.WatchActivityRequest(types=[pb.ACTIVITY_TYPE_CACHE_HIT, 99]), "types[1]"),
    ],
    ids=[
        "since_id word",
        "since_id three parts",
        "since_id time over 64 bits",
        "since_id sequence over 64 bits",
        "since_id trailing newline",
        "unspecified type",
        "unknown enum number",
    ],
)
async def test_watch_rejects_bad_filter(
    running_valkey: Running, request_message: pb.WatchActivityRequest, field: str
) -> None:
    stub = pb_grpc.TokenFlowServiceStub(running_valkey.channel())
    call = stub.WatchActivity(request_message, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value).field_violations[0].field == field


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x02\xff\xfe", b"\xff\xff\xff"],
    ids=["prompt-not-utf8", "not-protobuf"],
)
@pytest.mark.parametrize(
    ("method", "type_name"),
    [("Generate", "GenerateRequest"), ("WatchActivity", "WatchActivityRequest")],
)
async def test_undecodable_request_is_invalid_argument(
    running_valkey: Running, data: bytes, method: str, type_name: str
) -> None:
    channel = running_valkey.channel()
    path = f"/tokenflow.v1.TokenFlowService/{method}"
    # No serializer: the bytes go on the wire as they are.
    if method == "Generate":
        call: Any = channel.unary_unary(path)(data, timeout=5.0)
    else:
        call = channel.unary_stream(path)(data, timeout=5.0)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Generate":
            await call
        else:
            async for _ in call:
                pass

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the request is not a valid tokenflow.v1.{type_name}" in (caught.value.details() or "")
