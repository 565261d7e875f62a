"""Text generators behind Generate: the interface and a deterministic simulated
generator. A real upstream implements the same interface."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """A validated Generate request, with the model already resolved."""

    prompt: str
    model: str
    temperature: float | None = None
    max_tokens: int | None = None


class Generator(Protocol):
    """Produces the response text for one request."""

    async def generate(self, request: GenerationRequest) -> str: ...


_OPENINGS = (
    "Here is a concise answer",
    "In short",
    "A useful way to think about it",
    "The key idea",
    "To summarise",
)


class SimulatedGenerator:
    """Deterministic stand-in for a model: the same request always gives the same text.

    latency: seconds to wait per call, to make cache hits visibly faster.
    """

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> str:
        self.calls += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)

        digest = hashlib.sha256(
            f"{request.model}\0{request.temperature}\0{request.max_tokens}\0{request.prompt}".encode()
        ).hexdigest()
        opening = _OPENINGS[int(digest[:8], 16) % len(_OPENINGS)]
        topic = " ".join(request.prompt.split()[:12])
        text = (
            f'{opening} ({request.model}): this simulated response addresses "{topic}". '
            f"Reference {digest[:12]}."
        )
        if request.max_tokens is not None:
            text = " ".join(text.split()[: request.max_tokens])
        return text
