"""Checks of request fields, before any I/O. Each failure names the field and
the value in a google.rpc.BadRequest field violation."""

from __future__ import annotations

import math

from tokenflow_grpc.activity import EVENT_TYPES, parse_stream_id
from tokenflow_grpc.apikeys import KEY_ID, ApiKey
from tokenflow_grpc.cache import DEFAULT_CACHE_NAMESPACE
from tokenflow_grpc.errors import (
    FieldViolation,
    InvalidArgumentError,
    PermissionDeniedError,
    quoted,
)
from tokenflow_grpc.generator import GenerationRequest
from tokenflow_grpc.settings import Settings
from tokenflow_grpc.v1 import tokenflow_pb2 as pb

TEMPERATURE_RANGE = (0.0, 2.0)
MAX_TOKENS_RANGE = (1, 8192)
DEFAULT_ACTIVITY_LIMIT = 20
MAX_ACTIVITY_LIMIT = 100
DEFAULT_SIMULATE_COUNT = 50

# ActivityType enum values and the stream's type names, both ways.
ACTIVITY_TYPE_NAMES = {
    pb.ACTIVITY_TYPE_REQUEST: EVENT_TYPES[0],
    pb.ACTIVITY_TYPE_CACHE_HIT: EVENT_TYPES[1],
    pb.ACTIVITY_TYPE_CACHE_MISS: EVENT_TYPES[2],
    pb.ACTIVITY_TYPE_RATE_LIMITED: EVENT_TYPES[3],
}
ACTIVITY_TYPES_BY_NAME = {name: value for value, name in ACTIVITY_TYPE_NAMES.items()}


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgumentError(violations)


# Generate and GenerateStream take messages with the same fields.
AnyGenerateRequest = pb.GenerateRequest | pb.GenerateStreamRequest


def generation_request(message: AnyGenerateRequest, settings: Settings) -> GenerationRequest:
    """Validate a GenerateRequest and resolve its model."""
    violations = []
    prompt_bytes = len(message.prompt.encode("utf-8"))
    if not message.prompt.strip():
        violations.append(FieldViolation("prompt", "must not be empty or only whitespace"))
    elif prompt_bytes > settings.max_prompt_bytes:
        violations.append(
            FieldViolation(
                "prompt",
                f"is {prompt_bytes} bytes of UTF-8; the maximum is {settings.max_prompt_bytes} "
                "(--max-prompt-bytes)",
            )
        )

    model = message.model if message.HasField("model") else settings.default_model
    if model not in settings.models:
        violations.append(
            FieldViolation(
                "model",
                f"unknown model {quoted(model)}; expected one of {', '.join(settings.models)}",
            )
        )

    temperature = message.temperature if message.HasField("temperature") else None
    low, high = TEMPERATURE_RANGE
    if temperature is not None and not (math.isfinite(temperature) and low <= temperature <= high):
        violations.append(
            FieldViolation(
                "temperature", f"must be between {low:g} and {high:g}, got {temperature}"
            )
        )

    max_tokens = message.max_tokens if message.HasField("max_tokens") else None
    low_tokens, high_tokens = MAX_TOKENS_RANGE
    if max_tokens is not None and not low_tokens <= max_tokens <= high_tokens:
        violations.append(
            FieldViolation(
                "max_tokens", f"must be between {low_tokens} and {high_tokens}, got {max_tokens}"
            )
        )

    _raise_if(violations)
    if temperature == 0:
        # -0.0 would otherwise get its own cache key and response.
        temperature = 0.0
    return GenerationRequest(message.prompt, model, temperature, max_tokens)


def cache_ttl(message: AnyGenerateRequest, settings: Settings) -> int | None:
    """Return the requested cache lifetime in whole seconds, rounded up, or None when unset."""
    if not message.HasField("cache_ttl"):
        return None
    seconds = message.cache_ttl.seconds + message.cache_ttl.nanos / 1e9
    if not 0 < seconds <= settings.max_cache_ttl:
        _raise_if(
            [
                FieldViolation(
                    "cache_ttl",
                    f"must be more than 0 s and at most {settings.max_cache_ttl} s "
                    f"(--max-cache-ttl), got {seconds:g} s",
                )
            ]
        )
    return math.ceil(seconds)


def cache_namespace(message: AnyGenerateRequest, key: ApiKey | None) -> str:
    """Return the cache namespace of a call made with key (None: no authentication).

    Each key has its own namespace, its id, so tenants never share cached
    responses. Raises PermissionDeniedError when a key without the admin role
    names another namespace.
    """
    requested = message.cache_namespace
    if requested and not KEY_ID.fullmatch(requested):
        _raise_if(
            [
                FieldViolation(
                    "cache_namespace",
                    f"invalid namespace {quoted(requested)}: expected 1 to 64 characters of "
                    "A-Z, a-z, 0-9, '.', '_' and '-'",
                )
            ]
        )
    if key is None:
        return requested or DEFAULT_CACHE_NAMESPACE
    if not requested or requested == key.id:
        return key.id
    if not key.is_admin:
        raise PermissionDeniedError(
            f"cache_namespace {quoted(requested)} belongs to another tenant; key {key.id!r} "
            f"may use only its own namespace {key.id!r} (leave the field empty for it) "
            "unless it has the admin role"
        )
    return requested


def activity_limit(message: pb.GetStatsRequest) -> int:
    """Return the number of events to show: 0 means the default."""
    limit = message.activity_limit
    if not 0 <= limit <= MAX_ACTIVITY_LIMIT:
        _raise_if(
            [
                FieldViolation(
                    "activity_limit", f"must be between 0 and {MAX_ACTIVITY_LIMIT}, got {limit}"
                )
            ]
        )
    return limit or DEFAULT_ACTIVITY_LIMIT


def simulate_count(message: pb.SimulateRequest, settings: Settings) -> int:
    """Return the burst size: 0 means the default, or --simulate-max-count when that is smaller."""
    count = message.count
    if not 0 <= count <= settings.simulate_max_count:
        _raise_if(
            [
                FieldViolation(
                    "count",
                    f"must be between 0 and {settings.simulate_max_count} "
                    f"(--simulate-max-count), got {count}",
                )
            ]
        )
    return count or min(DEFAULT_SIMULATE_COUNT, settings.simulate_max_count)


def watch_filter(message: pb.WatchActivityRequest) -> tuple[str, list[str]]:
    """Return (since_id, stream type names) of a WatchActivityRequest."""
    violations = []
    if message.since_id:
        try:
            parse_stream_id(message.since_id)
        except ValueError as error:
            violations.append(FieldViolation("since_id", str(error)))

    names = []
    for index, value in enumerate(message.types):
        name = ACTIVITY_TYPE_NAMES.get(value)
        if name is None:
            violations.append(
                FieldViolation(
                    f"types[{index}]",
                    f"unknown activity type {value}; expected one of "
                    f"{', '.join(pb.ActivityType.Name(v) for v in ACTIVITY_TYPE_NAMES)}",
                )
            )
        else:
            names.append(name)

    _raise_if(violations)
    return message.since_id, names
