"""The standard grpc.health.v1 service, with Watch streams that end at shutdown.

grpcio-health-checking's Watch streams never end by themselves, so a server
draining its calls would wait its whole grace period for every open health
watch. Here each watch ends once it has sent NOT_SERVING at shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The statuses that can be a watch's last at shutdown: a known service's, or
# SERVICE_UNKNOWN for a service the server never registered.
FINAL_STATUSES = frozenset({NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN})


class HealthService(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc_health's asyncio servicer; enter_graceful_shutdown also ends the watches."""

    def __init__(self) -> None:
        super().__init__()
        self._shutting_down = False
        self._watches: set[_Watch] = set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watch = _Watch(context)
        self._watches.add(watch)
        streaming = asyncio.ensure_future(super().Watch(request, watch))
        ended = asyncio.ensure_future(watch.ended.wait())
        try:
            if self._shutting_down:
                watch.shutdown()
            await asyncio.wait({streaming, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._watches.discard(watch)
            for task in (streaming, ended):
                task.cancel()
            await asyncio.gather(streaming, ended, return_exceptions=True)

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service, then end each watch once it has sent it."""
        self._shutting_down = True
        await super().enter_graceful_shutdown()
        for watch in list(self._watches):
            watch.shutdown()


class _Watch:
    """The context of one Watch call, which notes the last status it sent."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._shutting_down = False
        self.last_status: int | None = None
        self.ended = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        self.last_status = message.status
        if self._shutting_down and message.status in FINAL_STATUSES:
            self.ended.set()

    def shutdown(self) -> None:
        """End the watch after its NOT_SERVING, at once when it has sent it already."""
        self._shutting_down = True
        if self.last_status in FINAL_STATUSES:
            self.ended.set()
