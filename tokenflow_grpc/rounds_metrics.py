"""Counting of Generate's outcomes in the Prometheus metrics, around the rounds.

The counts follow the Valkey counters that the scripts keep: a decision at
each begin, a hit or a miss where the begin or a later claim settles the
cache (a skipped cache counts as a miss), and nothing for a wait.
"""

from __future__ import annotations

from tokenflow_grpc.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    DECISION_ADMITTED,
    DECISION_REJECTED,
    LIMITER_DECISIONS,
)
from tokenflow_grpc.rounds import (
    OUTCOME_HIT,
    OUTCOME_MISS,
    OUTCOME_REJECTED,
    OUTCOME_SKIPPED,
    Begun,
    Call,
    Claimed,
    Rounds,
)


class CountedRounds:
    """Rounds that count each outcome before returning it."""

    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds

    async def begin(self, call: Call) -> Begun:
        begun = await self.rounds.begin(call)
        if begun.outcome == OUTCOME_REJECTED:
            LIMITER_DECISIONS.labels(DECISION_REJECTED).inc()
            return begun
        LIMITER_DECISIONS.labels(DECISION_ADMITTED).inc()
        _count_cache(begun.outcome)
        return begun

    async def claim(self, call: Call, waiting: bool = False) -> Claimed:
        claimed = await self.rounds.claim(call, waiting)
        _count_cache(claimed.outcome)
        return claimed


def _count_cache(outcome: int) -> None:
    if outcome == OUTCOME_HIT:
        CACHE_HITS.inc()
    elif outcome in (OUTCOME_MISS, OUTCOME_SKIPPED):
        CACHE_MISSES.inc()
