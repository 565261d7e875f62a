"""Sliding-window rate limiting: the decision returned by the begin_generate
script (scripts/begin_generate.lua), which trims the client's window, counts
it and adds the request only when it is admitted, all in one atomic call."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """One rate-limit decision for one client.

    Times are milliseconds since the Unix epoch; retry_after_ms is 0 when the
    request was admitted.
    """

    allowed: bool
    limit: int
    remaining: int
    window_ms: int
    reset_at_ms: int
    retry_after_ms: int
    now_ms: int

    @property
    def reset_seconds(self) -> int:
        """Whole seconds until the oldest request in the window expires, rounded up."""
        return max(0, math.ceil((self.reset_at_ms - self.now_ms) / 1000))

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds to wait before retrying, rounded up; 0 when admitted."""
        return math.ceil(self.retry_after_ms / 1000)

    def metadata(self) -> list[tuple[str, str]]:
        """The x-ratelimit-* metadata of a Generate response (retry-after when rejected).

        x-ratelimit-window is the window length in whole seconds, rounded up.
        """
        pairs = [
            ("x-ratelimit-limit", str(self.limit)),
            ("x-ratelimit-window", str(math.ceil(self.window_ms / 1000))),
            ("x-ratelimit-remaining", str(self.remaining)),
            ("x-ratelimit-reset", str(self.reset_seconds)),
        ]
        if not self.allowed:
            pairs.append(("retry-after", str(max(1, self.retry_after_seconds))))
        return pairs
