"""Rate-limit decisions of the begin_generate and limit_generate scripts for
one call under its limit policy. Their limit_call function
(scripts/_common.lua) reads the client's state and token budget, and counts
the call only when both admit it, all in one atomic script."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The limit that rejected a call, or would have under a shadow policy.
REASON_NONE = ""
REASON_REQUESTS = "requests"
REASON_TOKENS = "tokens"
# The reason codes that limit_call returns.
REASONS = {0: REASON_NONE, 1: REASON_REQUESTS, 2: REASON_TOKENS}


@dataclass(frozen=True)
class TokenState:
    """One client's token budget after a call; times in ms since the Unix epoch."""

    limit: int
    remaining: int
    window_ms: int
    reset_at_ms: int


@dataclass(frozen=True)
class Decision:
    """One rate-limit decision for one client.

    Times are milliseconds since the Unix epoch; retry_after_ms is 0 when the
    request was admitted. reason names the limit that rejected the call, or would
    have under a shadow policy (shadow_rejected). tokens is None when the
    policy has no token budget.
    """

    allowed: bool
    limit: int
    remaining: int
    window_ms: int
    reset_at_ms: int
    retry_after_ms: int
    now_ms: int
    policy: str = "default"
    shadow: bool = False
    shadow_rejected: bool = False
    reason: str = REASON_NONE
    tokens: TokenState | None = None
    tokens_needed: int = 0

    @property
    def reset_seconds(self) -> int:
        """Whole seconds until the window frees a request, rounded up."""
        return max(0, math.ceil((self.reset_at_ms - self.now_ms) / 1000))

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds to wait before retrying, rounded up; 0 when admitted."""
        return math.ceil(self.retry_after_ms / 1000)

    def metadata(self) -> list[tuple[str, str]]:
        """The x-ratelimit-* metadata of a Generate response (retry-after when rejected).

        x-ratelimit-window is the window length in whole seconds, rounded up.
        The token pairs come only with a token budget, and
        x-ratelimit-shadow-rejected (the reason) only when a shadow policy
        would have rejected the call.
        """
        pairs = [
            ("x-ratelimit-limit", str(self.limit)),
            ("x-ratelimit-window", str(math.ceil(self.window_ms / 1000))),
            ("x-ratelimit-remaining", str(self.remaining)),
            ("x-ratelimit-reset", str(self.reset_seconds)),
            ("x-ratelimit-policy", self.policy),
        ]
        if self.tokens is not None:
            pairs += [
                ("x-ratelimit-limit-tokens", str(self.tokens.limit)),
                ("x-ratelimit-remaining-tokens", str(self.tokens.remaining)),
            ]
        if self.shadow_rejected:
            pairs.append(("x-ratelimit-shadow-rejected", self.reason))
        if not self.allowed:
            pairs.append(("retry-after", str(max(1, self.retry_after_seconds))))
        return pairs
