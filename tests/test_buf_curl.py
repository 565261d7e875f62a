"""buf curl against a live server, through server reflection only."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import Running
from tests.test_proto import BUF

REFLECT_PROTOCOLS = ["grpc-v1", "grpc-v1alpha"]


async def buf_curl(*arguments: str) -> tuple[int, str, str]:
    if not BUF.exists():
        pytest.fail("buf is missing: run the tests with `make test`, which installs it")
    process = await asyncio.create_subprocess_exec(
        str(BUF),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
async def test_list_methods(running_valkey: Running, protocol: str) -> None:
    code, stdout, stderr = await buf_curl(
        "--reflect-protocol", protocol, "--list-methods", f"http://{running_valkey.address}"
    )

    assert code == 0, stderr
    methods = stdout.split()
    for method in ("Generate", "GetStats", "Simulate", "WatchActivity"):
        assert f"tokenflow.v1.TokenFlowService/{method}" in methods


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
async def test_generate_through_reflection(running_valkey: Running, protocol: str) -> None:
    code, stdout, stderr = await buf_curl(
        "--reflect-protocol",
        protocol,
        "-d",
        json.dumps({"prompt": "hello from buf curl", "temperature": 0.5}),
        f"http://{running_valkey.address}/tokenflow.v1.TokenFlowService/Generate",
    )

    assert code == 0, stderr
    reply = json.loads(stdout)
    assert reply["model"] == "tokenflow-sim-1"
    assert reply["rateLimit"]["limit"] == 10
    assert "hello from buf curl" in reply["response"]
