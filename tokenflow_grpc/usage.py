"""Token estimates for token budgets: the tokens a call is admitted with. Once
its response is known, the call is charged the usage its generator reported."""

from __future__ import annotations

import math

from tokenflow_grpc.generator import GenerationRequest

# English text averages about four characters per token with the BPE
# tokenizers of current models; an estimate, not a tokenizer.
CHARS_PER_TOKEN = 4


def estimate_text_tokens(text: str) -> int:
    """Return an estimate of the tokens in text: one per CHARS_PER_TOKEN characters, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def admission_tokens(request: GenerationRequest, default_max_tokens: int) -> int:
    """Return the tokens a call must fit in its budget to be admitted: the
    prompt's estimate plus max_tokens, or default_max_tokens when it is unset."""
    completion = request.max_tokens if request.max_tokens is not None else default_max_tokens
    return estimate_text_tokens(request.prompt) + completion
