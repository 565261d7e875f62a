"""Logging helpers shared by the server's modules."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_INTERVAL_SECONDS = 5.0


class RepeatLimiter:
    """Logs each kind of repeated warning at most once per interval.

    While Valkey is down every call fails the same way; one line every few
    seconds, with the number of lines skipped, tells the operator as much.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        if skipped:
            self.logger.warning(message + " (%d more like this not logged)", *args, skipped)
        else:
            self.logger.warning(message, *args)
