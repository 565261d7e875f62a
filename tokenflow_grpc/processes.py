"""Helpers for the child processes TokenFlow starts (Valkey, the gateway, workers)."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_preexec() -> Callable[[], None] | None:
    """Return the preexec_fn that ties a child's life to TokenFlow's, where the OS allows it."""
    return _die_with_parent if sys.platform == "linux" else None


async def relay_output(stream: asyncio.StreamReader | None) -> None:
    """Copy a child's output, line by line, to this process's stderr, where the logs go."""
    if stream is None:
        return
    while line := await stream.readline():
        sys.stderr.write(line.decode(errors="replace"))
