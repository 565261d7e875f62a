"""Text generators behind Generate: the interface and a deterministic simulated
generator. tokenflow_grpc.upstream implements the same interface over an
OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """A validated Generate request, with the model already resolved."""

    prompt: str
    model: str
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Generation:
    """A complete generation: its text and token counts."""

    text: str
    usage: Usage


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed generation: a text delta, or the usage at the end."""

    text: str = ""
    usage: Usage | None = None


class Generator(Protocol):
    """Produces the answer to one request.

    deadline is the time.monotonic() value by which the answer is due; a
    generator that retries must not wait past it. stream() yields the text
    as it is generated and, when the generator reports them, the token counts
    in a last chunk with usage set.
    """

    async def generate(self, request: GenerationRequest, deadline: float) -> Generation: ...

    def stream(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]: ...


def estimate_usage(prompt: str, text: str) -> Usage:
    """Estimate token counts as one token per whitespace-separated word."""
    prompt_tokens = len(prompt.split())
    completion_tokens = len(text.split())
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


_OPENINGS = (
    "Here is a concise answer",
    "In short",
    "A useful way to think about it",
    "The key idea",
    "To summarise",
)


class SimulatedGenerator:
    """Deterministic stand-in for a model: the same request always gives the same text.

    latency: seconds to wait per call, to make cache hits visibly faster. A
    stream spreads the latency over its words. Usage is an estimate of one
    token per word.
    """

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.calls = 0

    async def generate(self, request: GenerationRequest, deadline: float) -> Generation:
        self.calls += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        text = self.text_for(request)
        return Generation(text, estimate_usage(request.prompt, text))

    async def stream(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        text = self.text_for(request)
        words = text.split(" ")
        for index, word in enumerate(words):
            if self.latency > 0:
                await asyncio.sleep(self.latency / len(words))
            yield Chunk(word if index == 0 else " " + word)
        yield Chunk(usage=estimate_usage(request.prompt, text))

    @staticmethod
    def text_for(request: GenerationRequest) -> str:
        """Return the simulated answer to request."""
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
