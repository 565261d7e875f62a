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
