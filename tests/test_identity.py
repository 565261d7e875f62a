"""Client identity: the peer address, or x-forwarded-for from a trusted proxy."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest

from tokenflow_grpc.identity import client_identity, peer_address
from tokenflow_grpc.settings import parse_networks
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

LOOPBACK = parse_networks("127.0.0.0/8,::1/128")
PROXIES = parse_networks("127.0.0.0/8,10.0.0.0/8")


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[::ffff:192.0.2.7]:5000", "192.0.2.7"),
        ("ipv6:[fe80::1%eth0]:5000", "fe80::1"),
    ],
)
def test_peer_address_parses(peer: str, expected: str) -> None:
    assert str(peer_address(peer)) == expected


def test_peer_address_unix_is_none() -> None:
    assert peer_address("unix:/tmp/socket") is None


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("ipv4:203.0.113.9:1", ["198.51.100.1"], "203.0.113.9"),
        ("ipv4:127.0.0.1:1", [], "127.0.0.1"),
        ("ipv4:127.0.0.1:1", ["198.51.100.1"], "198.51.100.1"),
        ("ipv4:127.0.0.1:1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("ipv4:127.0.0.1:1", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
        ("ipv4:127.0.0.1:1", ["198.51.100.1", "10.1.2.3"], "198.51.100.1"),
        ("ipv4:127.0.0.1:1", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),
        ("ipv4:127.0.0.1:1", ["garbage, 198.51.100.1"], "198.51.100.1"),
        ("ipv4:127.0.0.1:1", ["198.51.100.1, garbage"], "127.0.0.1"),
        ("ipv4:127.0.0.1:1", [""], "127.0.0.1"),
    ],
    ids=[
        "untrusted peer ignores header",
        "trusted peer without header",
        "trusted peer with one hop",
        "rightmost untrusted hop wins",
        "trusted hops are skipped",
        "several header values",
        "all hops trusted",
        "garbage left of the client",
        "garbage right of the client",
        "empty header",
    ],
)
def test_client_identity(peer: str, forwarded: list[str], expected: str) -> None:
    assert client_identity(peer, forwarded, PROXIES) == expected


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (["2001:db8::7"], "2001:db8::7"),
        (["::ffff:198.51.100.1"], "198.51.100.1"),
        (["198.51.100.1:443"], "127.0.0.1"),
        (["[2001:db8::7]"], "127.0.0.1"),
        (["198.51.100.1 , 10.1.2.3 "], "198.51.100.1"),
        (["::ffff:10.1.2.3, 198.51.100.1"], "198.51.100.1"),
    ],
    ids=[
        "ipv6 hop",
        "ipv4-mapped hop",
        "hop with port is invalid",
        "bracketed hop is invalid",
        "spaces around hops",
        "mapped trusted hop left of client",
    ],
)
def test_client_identity_hop_forms(forwarded: list[str], expected: str) -> None:
    assert client_identity("ipv4:127.0.0.1:1", forwarded, PROXIES) == expected


def random_address(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


async def test_spoofed_header_from_untrusted_peer_is_limited(
    start_server: Any, valkey_url: str
) -> None:
    running = await start_server(valkey_url, trusted_proxies=parse_networks("10.0.0.0/8"))
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    rng = random.Random(7)
    calls = [
        stub.Generate(
            pb.GenerateRequest(prompt=f"spoof {n}"),
            metadata=(("x-forwarded-for", random_address(rng)),),
            timeout=5,
        )
        for n in range(20)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert sum(isinstance(o, pb.GenerateResponse) for o in outcomes) == 10
    stats = await running.client.stats()
    assert [c.client for c in stats.rate_limit.top_consumers] == ["127.0.0.1"]


async def test_trusted_proxy_header_sets_identity(start_server: Any, valkey_url: str) -> None:
    running = await start_server(valkey_url, rate_limit=1)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    for client in ("198.51.100.1", "198.51.100.2"):
        await stub.Generate(
            pb.GenerateRequest(prompt="via proxy"),
            metadata=(("x-forwarded-for", client),),
            timeout=5,
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(
            pb.GenerateRequest(prompt="via proxy"),
            metadata=(("x-forwarded-for", "198.51.100.1"),),
            timeout=5,
        )

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "198.51.100.1" in (caught.value.details() or "")


SPOOF_CALLS = 20
LIMIT = 10


def forged_hops(rng: random.Random, count: int) -> str:
    return ", ".join(random_address(rng) for _ in range(count))


async def generate_outcomes(
    stub: pb_grpc.TokenFlowServiceStub, metadata: list[tuple[tuple[str, str], ...]]
) -> list[Any]:
    calls = [
        stub.Generate(pb.GenerateRequest(prompt=f"spoof {n}"), metadata=pairs, timeout=5)
        for n, pairs in enumerate(metadata)
    ]
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_forged_left_hops_behind_trusted_proxy(start_server: Any, valkey_url: str) -> None:
    # Loopback is a trusted proxy by default. The proxy appends the address it
    # saw (198.51.100.7), and the client controls only the hops left of it.
    running = await start_server(valkey_url)
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    rng = random.Random(3)
    metadata = [
        (("x-forwarded-for", f"{forged_hops(rng, 1 + n % 3)}, 198.51.100.7"),)
        for n in range(SPOOF_CALLS)
    ]

    outcomes = await generate_outcomes(stub, metadata)

    stats = await running.client.stats()
    assert sum(isinstance(o, pb.GenerateResponse) for o in outcomes) == LIMIT
    assert [c.client for c in stats.rate_limit.top_consumers] == ["198.51.100.7"]


@pytest.mark.parametrize(
    "header",
    ["x-forwarded-for", "x-real-ip", "forwarded", "true-client-ip"],
)
async def test_untrusted_peer_headers_ignored(
    start_server: Any, valkey_url: str, header: str
) -> None:
    running = await start_server(valkey_url, trusted_proxies=())
    stub = pb_grpc.TokenFlowServiceStub(running.channel())
    rng = random.Random(header)
    metadata = []
    for _ in range(SPOOF_CALLS):
        value = random_address(rng)
        if header == "forwarded":
            value = f"for={value}"
        # Two values of the header, as a client may send.
        metadata.append(((header, value), (header, f"2001:db8::{rng.randint(1, 9999):x}")))

    outcomes = await generate_outcomes(stub, metadata)

    stats = await running.client.stats()
    assert sum(isinstance(o, pb.GenerateResponse) for o in outcomes) == LIMIT
    assert [c.client for c in stats.rate_limit.top_consumers] == ["127.0.0.1"]


async def post_generate(gateway: Any, headers: dict[str, str], prompt: str) -> int:
    async with gateway.session.post(
        gateway.url + "/v1/generate", json={"prompt": prompt}, headers=headers
    ) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize(
    "header",
    ["X-Forwarded-For", "X-Real-IP", "Forwarded", "Grpc-Metadata-X-Forwarded-For"],
)
async def test_gateway_untrusted_client_headers_ignored(
    start_server: Any, start_gateway_for: Any, valkey_url: str, header: str
) -> None:
    # The gateway trusts no HTTP client by default, so it sends the client's
    # own address, and the server trusts the gateway (loopback).
    running = await start_server(valkey_url)
    gateway = await start_gateway_for(running.address)
    rng = random.Random(header)

    statuses = [
        await post_generate(gateway, {header: random_address(rng)}, f"gateway spoof {n}")
        for n in range(SPOOF_CALLS)
    ]

    stats = await running.client.stats()
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == SPOOF_CALLS - LIMIT
    assert [c.client for c in stats.rate_limit.top_consumers] == ["127.0.0.1"]


async def test_gateway_trusted_client_forged_hops(
    start_server: Any, start_gateway_for: Any, valkey_url: str
) -> None:
    # A gateway that trusts its HTTP client (a proxy in front of it) keeps the
    # client's X-Forwarded-For and appends the client's address. The server
    # skips the trusted hops from the right and stops at 198.51.100.7, which
    # the proxy appended, so the hops forged left of it change nothing.
    running = await start_server(valkey_url)
    gateway = await start_gateway_for(
        running.address, trusted_proxies=parse_networks("127.0.0.0/8")
    )
    rng = random.Random(5)

    statuses = [
        await post_generate(
            gateway,
            {"X-Forwarded-For": f"{forged_hops(rng, 2)}, 198.51.100.7"},
            f"trusted gateway {n}",
        )
        for n in range(SPOOF_CALLS)
    ]

    stats = await running.client.stats()
    assert statuses.count(200) == LIMIT
    assert [c.client for c in stats.rate_limit.top_consumers] == ["198.51.100.7"]


async def test_server_not_trusting_gateway(
    start_server: Any, start_gateway_for: Any, valkey_url: str
) -> None:
    # Without the gateway in --trusted-proxies, the server ignores the
    # address the gateway sends, so every HTTP client shares the gateway's
    # identity (here 127.0.0.1) and its limit.
    running = await start_server(valkey_url, trusted_proxies=())
    gateway = await start_gateway_for(
        running.address, trusted_proxies=parse_networks("127.0.0.0/8")
    )

    statuses = [
        await post_generate(gateway, {"X-Forwarded-For": f"198.51.100.{n + 1}"}, f"shared {n}")
        for n in range(SPOOF_CALLS)
    ]

    stats = await running.client.stats()
    assert statuses.count(200) == LIMIT
    assert [c.client for c in stats.rate_limit.top_consumers] == ["127.0.0.1"]
