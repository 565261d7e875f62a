"""Simulate: a burst of Generate requests through the core's own path, from ten
simulated clients whose rate-limit windows are kept in their own namespace."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tokenflow_grpc.core import GenerateOptions, TokenFlow
from tokenflow_grpc.errors import RateLimitedError, TokenFlowError
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.keys import NAMESPACE_SIMULATED

logger = logging.getLogger(__name__)

SIMULATED_CLIENTS = tuple(f"sim-client-{n:02d}" for n in range(1, 11))
PROMPTS = (
    "Explain rate limiting in one paragraph",
    "What is a sliding window counter?",
    "Summarise the benefits of response caching",
    "How does Valkey store sorted sets?",
    "Write a haiku about latency",
    "What is a cache stampede?",
    "Describe gRPC server streaming",
    "Why use hash tags in Valkey Cluster?",
)
RESULTS_KEPT = 50
CONCURRENCY = 16

OUTCOME_SUCCESS = "success"
OUTCOME_BLOCKED = "blocked"
OUTCOME_FAILED = "failed"


@dataclass(frozen=True)
class SimulatedRequest:
    prompt: str
    client: str
    outcome: str
    cached: bool = False
    error: str = ""


@dataclass(frozen=True)
class SimulationReport:
    total: int
    successful: int
    blocked: int
    cached: int
    failed: int
    results: list[SimulatedRequest]


async def run_simulation(core: TokenFlow, count: int) -> SimulationReport:
    """Send count requests, CONCURRENCY at a time, and summarise the outcomes."""
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def send(index: int) -> SimulatedRequest:
        client = SIMULATED_CLIENTS[index % len(SIMULATED_CLIENTS)]
        prompt = PROMPTS[(index * 3 + index // len(SIMULATED_CLIENTS)) % len(PROMPTS)]
        request = GenerationRequest(prompt=prompt, model=core.settings.default_model)
        async with semaphore:
            try:
                result = await core.generate(
                    request, client, GenerateOptions(namespace=NAMESPACE_SIMULATED)
                )
            except RateLimitedError:
                return SimulatedRequest(prompt, client, OUTCOME_BLOCKED)
            except TokenFlowError as error:
                return SimulatedRequest(prompt, client, OUTCOME_FAILED, error=str(error))
        return SimulatedRequest(prompt, client, OUTCOME_SUCCESS, cached=result.cached)

    results = await asyncio.gather(*(send(index) for index in range(count)))
    report = SimulationReport(
        total=len(results),
        successful=sum(r.outcome == OUTCOME_SUCCESS for r in results),
        blocked=sum(r.outcome == OUTCOME_BLOCKED for r in results),
        cached=sum(r.cached for r in results),
        failed=sum(r.outcome == OUTCOME_FAILED for r in results),
        results=results[:RESULTS_KEPT],
    )
    logger.info(
        "simulated %d requests: %d successful, %d blocked, %d cached, %d failed",
        report.total,
        report.successful,
        report.blocked,
        report.cached,
        report.failed,
    )
    return report
