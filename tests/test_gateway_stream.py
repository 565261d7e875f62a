"""GET /v1/activity:watch through the HTTP/JSON gateway: NDJSON and
Server-Sent Events, resuming, errors before and during a stream, and
cancellation of the gRPC stream when the HTTP client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import CountingGenerator, Running, RunningGateway
from tests.helpers import free_port, wait_until
from tests.test_gateway import fetch
from tokenflow_grpc.generator import Chunk, GenerationRequest
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

WATCH_PATH = "/v1/activity:watch"
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
SSE_HEADERS = {"Accept": EVENT_STREAM}
# A watch stream stays open, so it has no total timeout. Each read has its own bound.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
READ_SECONDS = 10.0
# The gRPC stream must end within this many seconds of the HTTP client leaving.
CANCEL_SECONDS = 2.0
# A gateway must stop within this many seconds, open watch streams or not.
STOP_SECONDS = 3.0
EVENT_FIELDS = {"id", "time", "type", "client", "prompt", "cached", "blocked", "model"}
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]


async def open_watch(
    gateway: RunningGateway, query: str = "", headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    """Open a watch stream. The gateway sends the response headers once the server
    has subscribed the watch."""
    return await gateway.session.get(
        gateway.url + WATCH_PATH + query, headers=headers or {}, timeout=STREAM_TIMEOUT
    )


async def read_line(response: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(response.content.readline(), READ_SECONDS)


async def read_json_line(response: aiohttp.ClientResponse) -> Any:
    return json.loads(await read_line(response))


async def read_rest(response: aiohttp.ClientResponse) -> bytes:
    """Read until the gateway ends the response."""
    return await asyncio.wait_for(response.content.read(), READ_SECONDS)


async def read_sse_event(response: aiohttp.ClientResponse) -> dict[str, str]:
    """Read one Server-Sent Event as a dict of its fields, skipping comment lines."""
    fields: dict[str, str] = {}
    while True:
        line = (await read_line(response)).decode()
        if line == "":
            raise AssertionError(f"the stream ended inside an event: {fields}")
        if line == "\n":
            if fields:
                return fields
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.rstrip("\n").partition(": ")
        fields[name] = fields[name] + "\n" + value if name in fields else value


async def read_event_ids(response: aiohttp.ClientResponse, sse: bool, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        if sse:
            ids.append(json.loads((await read_sse_event(response))["data"])["event"]["id"])
        else:
            ids.append((await read_json_line(response))["result"]["event"]["id"])
    return ids


async def generate(gateway: RunningGateway, prompt: str) -> None:
    reply = await fetch(
        gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": prompt}
    )
    assert reply.status == 200, reply.body


async def recorded_ids(gateway: RunningGateway, count: int) -> list[str]:
    """Return the ids of the latest count events, oldest first."""
    reply = await fetch(gateway.session, "GET", f"{gateway.url}/v1/stats?activityLimit={count}")
    return [event["id"] for event in reversed(reply.body["activity"])]


# NDJSON and Server-Sent Events


async def test_ndjson_stream(gateway: RunningGateway) -> None:
    async with await open_watch(gateway) as response:
        await generate(gateway, "first")
        await generate(gateway, "second")
        lines = [await read_line(response), await read_line(response)]

    assert response.status == 200
    assert response.headers["Content-Type"] == NDJSON
    assert response.headers["Grpc-Metadata-Tokenflow-Watch"] == "subscribed"
    assert [line[-1:] for line in lines] == [b"\n", b"\n"]
    parsed = [json.loads(line) for line in lines]
    assert [set(item) for item in parsed] == [{"result"}, {"result"}]
    results = [item["result"] for item in parsed]
    assert [result["dropped"] for result in results] == ["0", "0"]
    events = [result["event"] for result in results]
    assert [set(event) for event in events] == [EVENT_FIELDS, EVENT_FIELDS]
    assert [event["prompt"] for event in events] == ["first", "second"]
    assert [event["type"] for event in events] == ["ACTIVITY_TYPE_CACHE_MISS"] * 2
    assert [event["cached"] for event in events] == [False, False]
    assert [event["client"] for event in events] == ["127.0.0.1", "127.0.0.1"]


async def test_sse_stream(gateway: RunningGateway) -> None:
    async with await open_watch(gateway, headers=SSE_HEADERS) as response:
        await generate(gateway, "first")
        await generate(gateway, "first")
        events = [await read_sse_event(response), await read_sse_event(response)]

    assert response.status == 200
    assert response.headers["Content-Type"] == EVENT_STREAM
    assert response.headers["Cache-Control"] == "no-cache"
    assert [set(event) for event in events] == [{"id", "data"}, {"id", "data"}]
    data = [json.loads(event["data"]) for event in events]
    assert [event["id"] for event in events] == [item["event"]["id"] for item in data]
    assert [item["event"]["type"] for item in data] == [
        "ACTIVITY_TYPE_CACHE_MISS",
        "ACTIVITY_TYPE_CACHE_HIT",
    ]
    assert events[0]["id"] != events[1]["id"]


@pytest.mark.parametrize(
    ("sse", "resume"),
    [
        (True, lambda event_id: ("", {"Accept": EVENT_STREAM, "Last-Event-ID": event_id})),
        (False, lambda event_id: (f"?since_id={event_id}", {})),
        (False, lambda event_id: (f"?sinceId={event_id}", {})),
    ],
    ids=["sse-last-event-id", "ndjson-since_id", "ndjson-sinceId"],
)
async def test_resume(
    gateway: RunningGateway,
    sse: bool,
    resume: Callable[[str], tuple[str, dict[str, str]]],
) -> None:
    for prompt in ("one", "two", "three"):
        await generate(gateway, prompt)
    earlier = await recorded_ids(gateway, 3)
    query, headers = resume(earlier[0])

    async with await open_watch(gateway, query, headers) as response:
        replayed = await read_event_ids(response, sse, 2)
        await generate(gateway, "four")
        live = await read_event_ids(response, sse, 1)

    assert response.status == 200
    assert replayed == earlier[1:]
    assert live == (await recorded_ids(gateway, 1))


async def test_last_event_id_needs_sse(gateway: RunningGateway) -> None:
    await generate(gateway, "before")
    earlier = await recorded_ids(gateway, 1)

    async with await open_watch(gateway, headers={"Last-Event-ID": earlier[0]}) as response:
        await generate(gateway, "after")
        line = await read_json_line(response)

    assert line["result"]["event"]["prompt"] == "after"


async def test_types_filter(gateway: RunningGateway) -> None:
    async with await open_watch(gateway, "?types=ACTIVITY_TYPE_CACHE_HIT") as response:
        for prompt in ("a", "a", "b", "b"):
            await generate(gateway, prompt)
        events = [(await read_json_line(response))["result"]["event"] for _ in range(2)]

    assert [event["prompt"] for event in events] == ["a", "b"]
    assert [event["type"] for event in events] == ["ACTIVITY_TYPE_CACHE_HIT"] * 2


async def test_two_watchers(gateway: RunningGateway) -> None:
    async with (
        await open_watch(gateway) as ndjson,
        await open_watch(gateway, headers=SSE_HEADERS) as sse,
    ):
        await generate(gateway, "shared")
        ndjson_ids = await read_event_ids(ndjson, False, 1)
        sse_ids = await read_event_ids(sse, True, 1)

    assert ndjson_ids == sse_ids


async def test_head_ends_watch(gateway: RunningGateway, running_valkey: Running) -> None:
    hub = running_valkey.core.hub

    async with gateway.session.head(gateway.url + WATCH_PATH, timeout=STREAM_TIMEOUT) as response:
        body = await asyncio.wait_for(response.read(), READ_SECONDS)
    cancelled = await wait_until(lambda: hub.watcher_count == 0, timeout=CANCEL_SECONDS)

    assert response.status == 200
    assert response.headers["Content-Type"] == NDJSON
    assert response.headers["Grpc-Metadata-Tokenflow-Watch"] == "subscribed"
    assert body == b""
    assert cancelled


# Errors before the stream starts: a JSON google.rpc.Status, no stream


@pytest.mark.parametrize(
    ("query", "headers"),
    [("?since_id=bad", {}), ("", {"Accept": EVENT_STREAM, "Last-Event-ID": "bad"})],
    ids=["since_id", "last-event-id"],
)
async def test_invalid_since_id_400(
    gateway: RunningGateway, running_valkey: Running, query: str, headers: dict[str, str]
) -> None:
    # Repeated, because the status can race with the initial metadata.
    replies = [
        await fetch(gateway.session, "GET", gateway.url + WATCH_PATH + query, headers=headers)
        for _ in range(5)
    ]

    assert [reply.status for reply in replies] == [400] * 5
    for reply in replies:
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.body["code"] == INVALID_ARGUMENT
        violations = reply.body["details"][0]["fieldViolations"]
        assert [violation["field"] for violation in violations] == ["since_id"]
    assert running_valkey.core.hub.watcher_count == 0


async def test_invalid_type_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + WATCH_PATH + "?types=99")

    assert reply.status == 400
    violations = reply.body["details"][0]["fieldViolations"]
    assert [violation["field"] for violation in violations] == ["types[0]"]


async def test_unknown_query_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + WATCH_PATH + "?since=1-0")

    assert reply.status == 400
    assert "'since'" in reply.body["message"]


async def test_no_server_503(start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(f"127.0.0.1:{free_port()}")

    reply = await fetch(gateway.session, "GET", gateway.url + WATCH_PATH)

    assert reply.status == 503
    assert reply.body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]


# Errors during the stream: a last {"error": ...} line or an SSE error event


async def test_deadline_error_line(gateway: RunningGateway) -> None:
    started = time.monotonic()

    async with await open_watch(gateway, headers={"Grpc-Timeout": "300m"}) as response:
        rest = await read_rest(response)
    seconds = time.monotonic() - started

    lines = rest.splitlines()
    assert response.status == 200
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert set(error) == {"error"}
    assert error["error"]["code"] == DEADLINE_EXCEEDED
    assert seconds < READ_SECONDS


async def test_deadline_error_event(gateway: RunningGateway) -> None:
    async with await open_watch(
        gateway, headers={"Accept": EVENT_STREAM, "Grpc-Timeout": "300m"}
    ) as response:
        event = await read_sse_event(response)
        rest = await read_rest(response)

    assert event["event"] == "error"
    assert json.loads(event["data"])["code"] == DEADLINE_EXCEEDED
    assert rest == b""


class AbortingWatch(pb_grpc.TokenFlowServiceServicer):
    """A TokenFlowService whose WatchActivity sends one event and then fails
    with ABORTED and a google.rpc.ErrorInfo detail."""

    async def WatchActivity(
        self, request: pb.WatchActivityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchActivityResponse]:
        yield pb.WatchActivityResponse(event=pb.ActivityEvent(id="1-1", prompt="only"))
        detail = status_pb2.Status(code=ABORTED, message="the test server gave up")
        detail.details.add().Pack(error_details_pb2.ErrorInfo(reason="TEST_ABORT"))
        await context.abort(
            grpc.StatusCode.ABORTED,
            "the test server gave up",
            trailing_metadata=(("grpc-status-details-bin", detail.SerializeToString()),),
        )


@pytest.fixture
async def aborting_server() -> AsyncIterator[str]:
    """Start a server with AbortingWatch and yield its address."""
    server = grpc.aio.server()
    pb_grpc.add_TokenFlowServiceServicer_to_server(AbortingWatch(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


async def test_midstream_error_line(aborting_server: str, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(aborting_server)

    async with await open_watch(gateway) as response:
        rest = await read_rest(response)

    lines = [json.loads(line) for line in rest.splitlines()]
    assert response.status == 200
    assert len(lines) == 2
    assert lines[0]["result"]["event"]["id"] == "1-1"
    error = lines[1]["error"]
    assert error["code"] == ABORTED
    assert error["message"] == "the test server gave up"
    assert [detail["reason"] for detail in error["details"]] == ["TEST_ABORT"]


async def test_midstream_error_event(aborting_server: str, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(aborting_server)

    async with await open_watch(gateway, headers=SSE_HEADERS) as response:
        result = await read_sse_event(response)
        error = await read_sse_event(response)
        rest = await read_rest(response)

    assert result["id"] == "1-1"
    assert "event" not in result
    assert error["event"] == "error"
    assert json.loads(error["data"])["code"] == ABORTED
    assert rest == b""


async def test_server_stop_error_line(gateway: RunningGateway, running_valkey: Running) -> None:
    async with await open_watch(gateway) as response:
        await generate(gateway, "before the stop")
        first = await read_json_line(response)
        await running_valkey.server.stop(grace=0.1)
        rest = await read_rest(response)

    lines = [json.loads(line) for line in rest.splitlines()]
    assert first["result"]["event"]["prompt"] == "before the stop"
    assert len(lines) == 1
    assert lines[0]["error"]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "since_id" in lines[0]["error"]["message"]


# Client disconnect


@pytest.mark.parametrize("headers", [{}, SSE_HEADERS], ids=["ndjson", "sse"])
async def test_disconnect_cancels_watch(
    gateway: RunningGateway, running_valkey: Running, headers: dict[str, str]
) -> None:
    hub = running_valkey.core.hub
    response = await open_watch(gateway, headers=headers)
    subscribed = hub.watcher_count
    await generate(gateway, "seen")
    await read_line(response)

    response.close()
    cancelled = await wait_until(lambda: hub.watcher_count == 0, timeout=CANCEL_SECONDS)

    assert subscribed == 1
    assert cancelled
    assert not hub.reader_running


GENERATE_STREAM_PATH = "/v1/generate:stream"
# The slow stream waits this long before each chunk, so its 20 or so words take seconds.
WORD_SECONDS = 0.2


class SlowStream(CountingGenerator):
    """Streams one word every WORD_SECONDS and counts the streams that end
    before their last chunk. Generate itself returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.abandoned = 0

    async def stream(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        finished = False
        try:
            async for chunk in super().stream(request, deadline):
                await asyncio.sleep(WORD_SECONDS)
                yield chunk
            finished = True
        finally:
            if not finished:
                self.abandoned += 1


async def test_disconnect_cancels_generate_stream(
    start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    generator = SlowStream()
    running = await start_server(valkey_url, generator=generator)
    gateway = await start_gateway_for(running.address)
    response = await gateway.session.post(
        gateway.url + GENERATE_STREAM_PATH, json={"prompt": "cut off"}, timeout=STREAM_TIMEOUT
    )
    first = await read_json_line(response)

    response.close()
    cancelled = await wait_until(lambda: generator.abandoned == 1, timeout=CANCEL_SECONDS)
    later = await fetch(
        gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "cut off"}
    )

    assert response.status == 200
    assert first["result"]["delta"]
    assert cancelled
    assert later.status == 200
    assert later.body["cached"] is False
    assert [request.prompt for request in generator.requests] == ["cut off", "cut off"]


async def test_gateway_stop_with_open_stream(gateway: RunningGateway) -> None:
    response = await open_watch(gateway)
    stopping = asyncio.create_task(gateway.server.stop())
    try:
        done, _ = await asyncio.wait({stopping}, timeout=STOP_SECONDS)
    finally:
        # Closing the client ends the handler, so the stop finishes either way.
        response.close()
        await asyncio.wait_for(stopping, READ_SECONDS)

    assert stopping in done


async def test_gateway_stop_lets_generate_stream_finish(
    start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    generator = SlowStream()
    running = await start_server(valkey_url, generator=generator)
    gateway = await start_gateway_for(running.address)
    watch = await open_watch(gateway)
    response = await gateway.session.post(
        gateway.url + GENERATE_STREAM_PATH,
        json={"prompt": "finish me", "maxTokens": 5},
        timeout=STREAM_TIMEOUT,
    )
    first = await read_json_line(response)

    stopping = asyncio.create_task(gateway.server.stop())
    watch_rest = await read_rest(watch)
    rest = await read_rest(response)
    await asyncio.wait_for(stopping, READ_SECONDS)

    lines = [first, *(json.loads(line) for line in rest.splitlines())]
    assert all("result" in line for line in lines), lines
    assert lines[-1]["result"]["usage"]["completionTokens"] == 5
    assert len(lines) == 6
    assert generator.abandoned == 0
    # A watch can resume, so it ends at once, with an error line to resume by.
    watch_error = json.loads(watch_rest.splitlines()[-1])["error"]
    assert watch_error["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "resume from the last event id" in watch_error["message"]
