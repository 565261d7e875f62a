"""The gateway on unusual input: deep JSON, bad Content-Encoding, long
values, oversized metadata, extreme deadlines and header spellings."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from typing import Any

import pytest
from aiohttp.http_exceptions import LineTooLong

from tests.conftest import Running, RunningGateway
from tokenflow_grpc.gateway.protocol_log import WARNING_INTERVAL_SECONDS, ProtocolLogger


async def post_generate(gateway: RunningGateway, data: bytes, **headers: str) -> Any:
    async with gateway.session.post(
        f"{gateway.url}/v1/generate", data=data, headers=headers
    ) as response:
        return response.status, await response.json()


async def test_deeply_nested_json_is_400(gateway: RunningGateway) -> None:
    status, body = await post_generate(gateway, b"[" * 5000 + b"]" * 5000)

    assert status == 400
    assert "nested too deeply" in body["message"]


@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
async def test_undecodable_content_encoding_is_400(gateway: RunningGateway, encoding: str) -> None:
    status, body = await post_generate(
        gateway, b'{"prompt": "plain"}', **{"Content-Encoding": encoding}
    )

    assert status == 400
    assert body["code"] == 3
    assert encoding in body["message"] or "decode" in body["message"]


@pytest.mark.parametrize(
    ("header", "rejected"),
    [
        ("br", "br"),
        ("zstd", "zstd"),
        ("foo", "foo"),
        ("compress", "compress"),
        ("gzip, br", "br"),
    ],
)
async def test_unsupported_content_encoding_415(
    gateway: RunningGateway, running_valkey: Running, header: str, rejected: str
) -> None:
    async with gateway.session.post(
        f"{gateway.url}/v1/generate",
        data=b'{"prompt": "unsupported coding"}',
        headers={"Content-Encoding": header},
    ) as response:
        body = await response.json()

    assert response.status == 415
    assert response.headers["Accept-Encoding"] == "gzip, deflate"
    assert body["code"] == 3
    assert repr(rejected) in body["message"]
    assert running_valkey.generator.requests == []


@pytest.mark.parametrize(
    ("header", "encode"),
    [
        ("identity", lambda data: data),
        ("Identity", lambda data: data),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),
        ("deflate, gzip", lambda data: gzip.compress(zlib.compress(data))),
        ("gzip", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),
    ],
    ids=[
        "identity",
        "identity-capitalized",
        "x-gzip",
        "gzip-uppercase",
        "deflate-zlib",
        "deflate-raw",
        "deflate-then-gzip",
        "gzip-two-members",
    ],
)
async def test_supported_content_encoding(
    gateway: RunningGateway, header: str, encode: Any
) -> None:
    status, body = await post_generate(
        gateway, encode(b'{"prompt": "coded"}'), **{"Content-Encoding": header}
    )

    assert status == 200
    assert "coded" in body["response"]


async def test_gzip_body_over_limit_413(running_valkey: Running, start_gateway_for: Any) -> None:
    gateway = await start_gateway_for(running_valkey.address, max_body_bytes=1024)
    data = gzip.compress(b'{"prompt": "' + b" " * 100_000 + b'x"}')

    status, body = await post_generate(gateway, data, **{"Content-Encoding": "gzip"})

    assert len(data) < 1024
    assert status == 413
    assert "1024" in body["message"]
    assert running_valkey.generator.requests == []


async def test_truncated_gzip_body_400(gateway: RunningGateway) -> None:
    data = gzip.compress(b'{"prompt": "cut short"}')[:-6]

    status, body = await post_generate(gateway, data, **{"Content-Encoding": "gzip"})

    assert status == 400
    assert "'gzip'" in body["message"]


async def test_valid_gzip_body_accepted(gateway: RunningGateway) -> None:
    compressor = zlib.compressobj(wbits=31)
    data = compressor.compress(b'{"prompt": "zipped"}') + compressor.flush()
    status, body = await post_generate(gateway, data, **{"Content-Encoding": "gzip"})

    assert status == 200
    assert "zipped" in body["response"]


async def test_long_invalid_model_is_400(gateway: RunningGateway) -> None:
    status, body = await post_generate(
        gateway, b'{"prompt": "x", "model": "' + b"m" * 20000 + b'"}'
    )

    assert status == 400
    assert body["code"] == 3
    assert "20000 characters" in body["message"]
    assert len(body["message"]) < 500


async def test_long_since_id_is_400(gateway: RunningGateway) -> None:
    async with gateway.session.get(
        f"{gateway.url}/v1/activity:watch", params={"sinceId": "9" * 5000 + "-0"}
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert body["code"] == 3


async def test_non_ascii_last_event_id_is_400(gateway: RunningGateway) -> None:
    async with gateway.session.get(
        f"{gateway.url}/v1/activity:watch",
        headers={"Accept": "text/event-stream", "Last-Event-ID": "x\u00ff"},
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert "Last-Event-ID" in body["message"]


async def test_oversized_metadata_is_400(gateway: RunningGateway) -> None:
    headers = {f"Grpc-Metadata-Big-{n}": "v" * 2000 for n in range(3)}
    status, body = await post_generate(gateway, b'{"prompt": "big headers"}', **headers)

    assert status == 400
    assert "maximum is 4096" in body["message"]


async def test_huge_grpc_timeout_is_clamped(gateway: RunningGateway) -> None:
    status, body = await post_generate(
        gateway, b'{"prompt": "far deadline"}', **{"Grpc-Timeout": "99999999H"}
    )

    assert status == 200
    assert body["cached"] is False


async def test_reserved_metadata_not_forwarded(gateway: RunningGateway) -> None:
    status, _ = await post_generate(
        gateway, b'{"prompt": "no smuggled deadline"}', **{"Grpc-Metadata-Grpc-Timeout": "1n"}
    )

    assert status == 200


async def test_query_field_set_twice_is_400(gateway: RunningGateway) -> None:
    async with gateway.session.get(
        f"{gateway.url}/v1/stats", params={"activity_limit": "1", "activityLimit": "2"}
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert "set the same field" in body["message"]


async def test_accept_is_case_insensitive(gateway: RunningGateway) -> None:
    async with gateway.session.get(
        f"{gateway.url}/v1/activity:watch", headers={"Accept": "TEXT/EVENT-STREAM"}
    ) as response:
        content_type = response.headers["Content-Type"]

    assert content_type.startswith("text/event-stream")


# Requests that aiohttp's HTTP parser rejects before any gateway handler runs

PARSER_ERROR_SECONDS = 10.0


async def send_raw(port: int, *requests: bytes) -> list[bytes]:
    """Send each request on one connection after the previous response, and
    return the responses; the last is read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = []
    try:
        for request in requests[:-1]:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PARSER_ERROR_SECONDS)
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await asyncio.wait_for(reader.readexactly(length), PARSER_ERROR_SECONDS)
            responses.append(head + body)
        writer.write(requests[-1])
        responses.append(await asyncio.wait_for(reader.read(), PARSER_ERROR_SECONDS))
    finally:
        writer.close()
    return responses


@pytest.mark.parametrize(
    ("requests", "error"),
    [
        (
            [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"],
            "LineTooLong",
        ),
        ([b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"], "LineTooLong"),
        (
            [
                b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
                b"FOO /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
            ],
            "BadHttpMethod",
        ),
    ],
    ids=["header-too-long", "url-too-long", "unknown-method"],
)
async def test_parser_error_one_warning(
    gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    requests: list[bytes],
    error: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")

    responses = await send_raw(gateway.server.port, *requests)

    head = responses[-1].split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.0 400 ")
    assert b"content-type: text/plain" in head
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert records[0].exc_info is None
    assert error in records[0].getMessage()
    assert "127.0.0.1" in records[0].getMessage()
    assert "aaaa" not in records[0].getMessage()


async def test_parser_error_warnings_limited(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiohttp.server")
    too_long = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"

    for _ in range(3):
        await send_raw(gateway.server.port, too_long)

    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1


def test_protocol_logger_counts_left_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiohttp.server")
    now = [0.0]
    protocol_logger = ProtocolLogger(clock=lambda: now[0])
    error = LineTooLong(b"X-Big: aaaa", 8190)

    for seconds in (0.0, 1.0, 2.0, WARNING_INTERVAL_SECONDS + 0.5):
        now[0] = seconds
        protocol_logger.exception("Error handling request from %s", "192.0.2.1", exc_info=error)

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0] == "rejected a malformed HTTP request from 192.0.2.1 with 400: LineTooLong"
    assert messages[1].endswith("(2 more since the last such line)")
