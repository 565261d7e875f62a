"""Mapping of TokenFlow's exceptions to gRPC statuses with google.rpc details,
in one place."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tokenflow_grpc.errors import (
    BackendUnavailableError,
    GeneratorError,
    GeneratorTimeoutError,
    InvalidArgumentError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    ServerStoppingError,
    TokenFlowError,
    UnauthenticatedError,
    UpstreamRefusedError,
    UpstreamRejectedError,
)
from tokenflow_grpc.limiter import REASON_TOKENS, Decision

DETAILS_METADATA_KEY = "grpc-status-details-bin"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _rate_limited(error: RateLimitedError) -> tuple[status_pb2.Status, list[tuple[str, str]]]:
    decision = error.decision
    assert isinstance(decision, Decision)
    retry_delay = duration_pb2.Duration()
    retry_delay.FromMilliseconds(decision.retry_after_ms)
    retry_info = error_details_pb2.RetryInfo(retry_delay=retry_delay)
    window = f"{decision.window_ms / 1000:g} s"
    retry = f"retry after {decision.retry_after_ms / 1000:.3f} s"
    if decision.reason == REASON_TOKENS and decision.tokens is not None:
        budget = decision.tokens.limit
        description = (
            f"token budget of {budget} tokens per {window} exceeded: the call needs an "
            f"estimated {decision.tokens_needed} tokens and {decision.tokens.remaining} "
            f"remain; {retry}"
        )
        message = (
            f"token budget of {budget} tokens per {window} exceeded for client "
            f"{error.client}; retry after {decision.retry_after_seconds} s"
        )
    else:
        description = f"{decision.limit} requests per {window} exceeded; {retry}"
        message = (
            f"rate limit of {decision.limit} requests per {window} exceeded for client "
            f"{error.client}; retry after {decision.retry_after_seconds} s"
        )
    quota_failure = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"client:{error.client}", description=description
            )
        ]
    )
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=message,
        details=[_pack(retry_info), _pack(quota_failure)],
    )
    return status, decision.metadata()


def _quota_exceeded(error: QuotaExceededError) -> tuple[status_pb2.Status, list[tuple[str, str]]]:
    quota_failure = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=error.subject, description=error.description
            )
        ]
    )
    details = [_pack(quota_failure)]
    metadata = []
    if error.retry_after_ms is not None:
        retry_delay = duration_pb2.Duration()
        retry_delay.FromMilliseconds(error.retry_after_ms)
        details.insert(0, _pack(error_details_pb2.RetryInfo(retry_delay=retry_delay)))
        metadata.append(("retry-after", str(max(1, math.ceil(error.retry_after_ms / 1000)))))
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message=str(error), details=details
    )
    return status, metadata


def _invalid_argument(error: InvalidArgumentError) -> status_pb2.Status:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[_pack(bad_request)]
    )


def _generator_failed(error: GeneratorError) -> tuple[status_pb2.Status, list[tuple[str, str]]]:
    """Map a generator failure: a timeout to DEADLINE_EXCEEDED, a request the
    upstream rejects to INVALID_ARGUMENT, a refusal of the server's own
    credentials to FAILED_PRECONDITION, and the rest (5xx, 429 after the
    retries, connection errors) to UNAVAILABLE, with RetryInfo when the
    upstream sent Retry-After.

    An upstream 429 is UNAVAILABLE, not RESOURCE_EXHAUSTED, because it is the
    quota of the server's upstream account, shared by every client, while
    RESOURCE_EXHAUSTED means that this client is over its own TokenFlow limit.
    """
    if isinstance(error, GeneratorTimeoutError):
        code = code_pb2.DEADLINE_EXCEEDED
    elif isinstance(error, UpstreamRejectedError):
        code = code_pb2.INVALID_ARGUMENT
    elif isinstance(error, UpstreamRefusedError):
        code = code_pb2.FAILED_PRECONDITION
    else:
        code = code_pb2.UNAVAILABLE

    details = []
    metadata = []
    if code == code_pb2.UNAVAILABLE and error.retry_after_ms is not None:
        retry_delay = duration_pb2.Duration()
        retry_delay.FromMilliseconds(error.retry_after_ms)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=retry_delay)))
        metadata.append(("retry-after", str(max(1, math.ceil(error.retry_after_ms / 1000)))))
    return status_pb2.Status(code=code, message=str(error), details=details), metadata


def to_status(error: TokenFlowError) -> tuple[grpc.StatusCode, str, list[tuple[str, str | bytes]]]:
    """Return (code, message, trailing metadata with grpc-status-details-bin) for error."""
    metadata: list[tuple[str, str | bytes]] = []
    if isinstance(error, RateLimitedError):
        status, rate_metadata = _rate_limited(error)
        metadata.extend(rate_metadata)
    elif isinstance(error, QuotaExceededError):
        status, quota_metadata = _quota_exceeded(error)
        metadata.extend(quota_metadata)
    elif isinstance(error, InvalidArgumentError):
        status = _invalid_argument(error)
    elif isinstance(error, (BackendUnavailableError, ServerStoppingError)):
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(error))
    elif isinstance(error, GeneratorError):
        status, generator_metadata = _generator_failed(error)
        metadata.extend(generator_metadata)
    elif isinstance(error, UnauthenticatedError):
        status = status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message=str(error))
    elif isinstance(error, PermissionDeniedError):
        status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=str(error))
    else:
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=str(error))

    metadata.append((DETAILS_METADATA_KEY, status.SerializeToString()))
    return _grpc_code(status.code), status.message, metadata


def _grpc_code(code: int) -> grpc.StatusCode:
    for status_code in grpc.StatusCode:
        if status_code.value[0] == code:
            return status_code
    return grpc.StatusCode.UNKNOWN
