"""The logger that the gateway hands to aiohttp's HTTP protocol.

aiohttp's parser rejects some requests before any handler or middleware runs:
a request line or header field over 8190 bytes, an unknown method, a
malformed request line. aiohttp (checked with 3.14.5) rejects them with a
text/plain 400 that the application cannot replace, and logs each at ERROR
with a traceback (an unknown method as the first request on a connection at
DEBUG). These are the client's errors, so this logger writes one WARNING line
without a traceback instead, rate-limited, and leaves every other record as
aiohttp sends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import log as aiohttp_log
from aiohttp.http_exceptions import HttpProcessingError

# At most one line per this many seconds; the next line counts the requests left out.
WARNING_INTERVAL_SECONDS = 10.0


class ProtocolLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, with parser errors as rate-limited WARNING lines."""

    def __init__(
        self,
        logger: logging.Logger = aiohttp_log.server_logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logger, {})
        self.clock = clock
        self.next_line_at = float("-inf")
        self.left_out = 0

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._parser_error(exc_info, args)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def _parser_error(self, error: HttpProcessingError, args: tuple[object, ...]) -> None:
        now = self.clock()
        if now < self.next_line_at:
            self.left_out += 1
            return
        self.next_line_at = now + WARNING_INTERVAL_SECONDS
        left_out, self.left_out = self.left_out, 0
        # aiohttp passes the client's address as the only argument. The error's
        # message is left out because it quotes the request, which may contain a secret.
        peer = args[0] if args else "an unknown address"
        message = "rejected a malformed HTTP request from %s with 400: %s"
        if left_out:
            message += f" ({left_out} more since the last such line)"
        self.warning(message, peer, type(error).__name__)
