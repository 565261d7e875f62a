"""The dashboard's calls to a TokenFlow server: GetStats every interval, a
WatchActivity stream opened again whenever it ends, and Simulate bursts.
Each records its outcome in a DashboardModel and calls on_change, so drawing
stays with the caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import grpc

from tokenflow_grpc.client import AsyncTokenFlowClient
from tokenflow_grpc.dashboard.model import FEED_EVENTS, ConnectionState, DashboardModel

logger = logging.getLogger(__name__)


class Connection:
    """The client that GetStats and WatchActivity share, replaced by a new one
    when GetStats fails with UNAVAILABLE.

    A gRPC channel whose connection failed waits out a reconnect backoff that
    grows to 120 s (doc/connection-backoff.md in grpc/grpc) before it tries
    again. Measured with grpcio 1.85 on loopback, a channel kept through a
    45 s outage saw the server back 23 s late, and a new channel at once. The
    calls share one channel because channels to one target share their
    subchannels in gRPC, so a second channel would keep the failed
    subchannel, and its backoff, alive: a new channel opened beside one still
    in backoff was as late as the old one.
    """

    def __init__(
        self, target: str, timeout: float, client_options: Mapping[str, Any] | None = None
    ) -> None:
        """client_options: keyword arguments of AsyncTokenFlowClient (credentials, api_key)."""
        self.target = target
        self.timeout = timeout
        self.client_options = dict(client_options or {})
        self.client = AsyncTokenFlowClient(target, timeout, **self.client_options)

    async def replace(self) -> None:
        """Open a new client and close the old one, which cancels the calls still on it."""
        old = self.client
        self.client = AsyncTokenFlowClient(self.target, self.timeout, **self.client_options)
        await old.close()

    async def close(self) -> None:
        await self.client.close()


def describe_error(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


async def refresh_stats(connection: Connection, model: DashboardModel) -> None:
    """Call GetStats once and record its figures, or why there are none, in model."""
    before = (model.state, model.problem)
    try:
        stats = await connection.client.stats(FEED_EVENTS)
    except grpc.aio.AioRpcError as error:
        model.record_failure(f"GetStats failed: {describe_error(error)}")
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            await connection.replace()
    else:
        model.record_stats(stats)

    if (model.state, model.problem) == before:
        return
    if model.state is ConnectionState.CONNECTED:
        logger.info("dashboard connected to %s", model.target)
    else:
        logger.warning("dashboard has no figures from %s: %s", model.target, model.problem)


async def poll_stats(
    connection: Connection, model: DashboardModel, interval: float, on_change: Callable[[], None]
) -> NoReturn:
    """Call GetStats every interval seconds until cancelled, recording each outcome."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await refresh_stats(connection, model)
        on_change()
        await asyncio.sleep(max(0.0, started + interval - loop.time()))


async def follow_activity(
    connection: Connection,
    model: DashboardModel,
    retry_seconds: float,
    on_change: Callable[[], None],
) -> NoReturn:
    """Copy WatchActivity events into model.feed until cancelled.

    A stream that ends or fails is opened again after retry_seconds, on the
    connection's current client, from the newest event the feed has.
    """
    previous_problem = ""
    while True:
        problem = await _watch_once(connection, model, on_change)
        if problem and problem != previous_problem:
            logger.warning("dashboard activity feed from %s stopped: %s", model.target, problem)
        previous_problem = problem
        model.watch_problem = problem
        on_change()
        await asyncio.sleep(retry_seconds)


async def _watch_once(
    connection: Connection, model: DashboardModel, on_change: Callable[[], None]
) -> str:
    """Follow one WatchActivity stream and return why it stopped, or "" when
    Connection.replace() stopped it."""
    try:
        async for response in connection.client.watch(since_id=model.feed.newest_id):
            model.record_watch(response)
            on_change()
    except grpc.aio.AioRpcError as error:
        return f"WatchActivity failed: {describe_error(error)}"
    except grpc.aio.UsageError:
        return ""  # The client tried again on the channel that replace() had closed.
    except asyncio.CancelledError:
        # gRPC cancels the calls of a channel that replace() closes. Only a
        # cancellation of this task itself goes on up.
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        return ""
    return "the server ended the stream"


async def run_simulate(
    target: str,
    timeout: float,
    count: int,
    model: DashboardModel,
    on_change: Callable[[], None],
    client_options: Mapping[str, Any] | None = None,
) -> None:
    """Send one Simulate burst of count requests and record its summary, or the failure.

    The burst has a client of its own, so that Connection.replace() cannot
    cancel it halfway.
    """
    model.simulating = True
    model.simulate_problem = ""
    on_change()
    try:
        async with AsyncTokenFlowClient(target, timeout, **(client_options or {})) as client:
            response = await client.simulate(count)
    except grpc.aio.AioRpcError as error:
        model.simulate_problem = describe_error(error)
        logger.warning("Simulate of %d requests failed: %s", count, model.simulate_problem)
    else:
        model.simulate_summary = response.summary
    finally:
        model.simulating = False
    on_change()
