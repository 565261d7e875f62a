"""Reference models of the rate-limit algorithms, written from their
definitions with exact fractions, for the property tests to compare the Lua
scripts against. Times are integer milliseconds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class ModelDecision:
    allowed: bool
    remaining: int
    retry_after_ms: int


@dataclass
class SlidingLogModel:
    """Admit while fewer than limit requests were admitted in (now - window, now]."""

    limit: int
    window_ms: int
    admitted: list[int] = field(default_factory=list)

    def count(self, now: int) -> int:
        return sum(1 for t in self.admitted if t > now - self.window_ms)

    def would_admit(self, now: int) -> bool:
        return self.count(now) < self.limit

    def decide(self, now: int) -> ModelDecision:
        count = self.count(now)
        if count < self.limit:
            self.admitted.append(now)
            return ModelDecision(True, self.limit - count - 1, 0)
        inside = sorted(t for t in self.admitted if t > now - self.window_ms)
        freeing = inside[count - self.limit]
        return ModelDecision(False, 0, max(freeing + self.window_ms - now, 1))


@dataclass
class SlidingWindowModel:
    """Two fixed-window counters weighted by the overlap of the sliding window:
    estimate = previous * (window - elapsed) / window + current; admit while
    estimate + 1 <= limit."""

    limit: int
    window_ms: int
    counts: dict[int, int] = field(default_factory=dict)

    def estimate(self, now: int) -> Fraction:
        index = now // self.window_ms
        elapsed = now - index * self.window_ms
        previous = self.counts.get(index - 1, 0)
        current = self.counts.get(index, 0)
        return Fraction(previous * (self.window_ms - elapsed), self.window_ms) + current

    def would_admit(self, now: int) -> bool:
        return self.estimate(now) + 1 <= self.limit

    def decide(self, now: int) -> ModelDecision:
        """Decide at now; retry_after_ms is 0 here, because the tests check the
        script's retry delay with would_admit instead."""
        estimate = self.estimate(now)
        if estimate + 1 <= self.limit:
            index = now // self.window_ms
            self.counts[index] = self.counts.get(index, 0) + 1
            return ModelDecision(True, math.floor(self.limit - estimate - 1), 0)
        return ModelDecision(False, 0, 0)


@dataclass
class TokenBucketModel:
    """A bucket of capacity requests, refilled continuously at rate requests
    per window; a request takes one whole token."""

    capacity: int
    rate: int
    window_ms: int
    level: Fraction = Fraction(-1)
    updated_ms: int = 0

    def level_at(self, now: int) -> Fraction:
        if self.level < 0:
            return Fraction(self.capacity)
        elapsed = max(now - self.updated_ms, 0)
        refilled = Fraction(elapsed * self.rate, self.window_ms)
        return min(Fraction(self.capacity), self.level + refilled)

    def would_admit(self, now: int) -> bool:
        return self.level_at(now) >= 1

    def decide(self, now: int) -> ModelDecision:
        level = self.level_at(now)
        if level >= 1:
            self.level = level - 1
            self.updated_ms = now
            return ModelDecision(True, math.floor(self.level), 0)
        wait = math.ceil((1 - level) * self.window_ms / self.rate)
        return ModelDecision(False, 0, max(wait, 1))
