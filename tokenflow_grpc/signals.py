"""SIGTERM, SIGINT and SIGHUP handling shared by the long-running commands."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

logger = logging.getLogger("tokenflow")

# Seconds a server drains its calls in flight after the first SIGTERM or SIGINT.
SHUTDOWN_GRACE_SECONDS = 10.0


class SignalCounter:
    """Turns SIGTERM and SIGINT into a first event and an optional second action."""

    def __init__(self, first_message: str) -> None:
        """first_message: logged at the first signal, after the signal's name."""
        self.first_message = first_message
        self.first = asyncio.Event()
        self._second: Callable[[], object] | None = None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._received, signum)

    def on_second(self, action: Callable[[], object]) -> None:
        self._second = action

    def _received(self, signum: int) -> None:
        if not self.first.is_set():
            logger.info("received %s: %s", signal.Signals(signum).name, self.first_message)
            self.first.set()
        elif self._second is not None:
            logger.warning(
                "received %s again: cancelling the calls in flight", signal.Signals(signum).name
            )
            self._second()
            self._second = None


def handle_reload(action: Callable[[], object]) -> None:
    """Run action at each SIGHUP, the signal that requests a reload of the policy file."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, _reload, action)


def _reload(action: Callable[[], object]) -> None:
    logger.info("received SIGHUP: reloading the policy file")
    action()
