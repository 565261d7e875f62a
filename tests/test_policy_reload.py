"""Policy reload on SIGHUP in a `tokenflow serve --workers 2` process under load."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import grpc

from tests.test_workers import start_pool  # noqa: F401 (a fixture)
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

OPEN_POLICY = """
[[policies]]
name = "open"
requests = 100000
window = "1m"
"""
# The open policy, and a strict one for two clients: the test polls with one
# until the reload applies and checks the limit with the other.
STRICT_POLICY = (
    OPEN_POLICY
    + """
[[policies]]
name = "strict"
clients = ["10.9.9.9", "10.9.9.8"]
requests = 2
window = "1m"
algorithm = "sliding_window"
"""
)
RELOADED_LINE = re.compile(r"reloaded 2 limit policies")
FAILED_LINE = re.compile(r"policy reload failed, keeping the policies in force: .*'strict'")


async def call_as(stub: pb_grpc.TokenFlowServiceStub, client: str, prompt: str) -> Any:
    return await stub.Generate(
        pb.GenerateRequest(prompt=prompt, skip_cache=True),
        metadata=(("x-forwarded-for", client),),
        timeout=30,
    )


async def load(stub: pb_grpc.TokenFlowServiceStub, stop: asyncio.Event) -> list[Any]:
    """Send calls from varied clients until stop is set; return every outcome."""
    outcomes: list[Any] = []
    number = 0
    while not stop.is_set():
        batch = [
            call_as(stub, f"10.1.0.{(number + n) % 200}", f"load {number + n}") for n in range(8)
        ]
        number += 8
        outcomes += await asyncio.gather(*batch, return_exceptions=True)
    return outcomes


async def policy_of(stub: pb_grpc.TokenFlowServiceStub, client: str, deadline: float) -> str:
    """Call as client until its policy is "strict" or the deadline passes; return the last name.

    Each worker reloads on its own, so calls may reach one that has not yet.
    """
    name = ""
    while time.monotonic() < deadline:
        try:
            reply = await call_as(stub, client, "which policy")
        except grpc.aio.AioRpcError:
            return "strict"  # Only the strict policy rejects this client.
        name = reply.rate_limit.policy
        if name == "strict":
            return name
        await asyncio.sleep(0.05)
    return name


async def test_sighup_reloads_under_load(
    start_pool: Any,  # noqa: F811
    valkey_url: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(OPEN_POLICY)
    pool = start_pool(
        "--workers", "2", "--no-gateway", "--valkey-url", valkey_url, "--policies-file", str(path)
    )
    async with grpc.aio.insecure_channel(pool.target) as channel:
        stub = pb_grpc.TokenFlowServiceStub(channel)
        stop = asyncio.Event()
        running_load = asyncio.create_task(load(stub, stop))
        await asyncio.sleep(0.3)

        path.write_text(STRICT_POLICY)
        pool.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(pool.wait_for_log, RELOADED_LINE)
        reached = await policy_of(stub, "10.9.9.9", time.monotonic() + 20)

        path.write_text(STRICT_POLICY.replace('requests = 2\n', "requests = -1\n"))
        pool.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(pool.wait_for_log, FAILED_LINE)
        await asyncio.sleep(0.3)
        stop.set()
        outcomes = await running_load

        after = [await call_as(stub, "10.9.9.10", f"after {n}") for n in range(3)]
        strict_codes = []
        for n in range(4):
            try:
                await call_as(stub, "10.9.9.8", f"strict {n}")
                strict_codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                strict_codes.append(error.code())

    failures = [o for o in outcomes if not isinstance(o, pb.GenerateResponse)]
    assert reached == "strict"
    assert len(outcomes) > 50
    assert failures == []
    assert {reply.rate_limit.policy for reply in after} == {"open"}
    assert strict_codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert pool.process.poll() is None
