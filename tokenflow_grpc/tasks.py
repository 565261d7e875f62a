"""Stopping background tasks whose cancellation a library may swallow."""

from __future__ import annotations

import asyncio
import time
from typing import Any

CANCEL_RETRY_SECONDS = 0.1


async def stop_task(task: asyncio.Task[Any] | None, timeout: float) -> bool:
    """Cancel task until it is done, for at most timeout seconds; return whether it is.

    redis-py can lose a cancellation that arrives while it reads a reply, and
    the task then goes on to its next command, so one cancel() is not enough.
    The caller's own cancellation still propagates.
    """
    if task is None:
        return True
    deadline = time.monotonic() + timeout
    while not task.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(CANCEL_RETRY_SECONDS, remaining))
    if not task.cancelled():
        # Read the exception, if any, so asyncio does not log it as never retrieved.
        task.exception()
    return True
