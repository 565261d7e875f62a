"""TokenFlow's exceptions. The core raises these; the server maps them to gRPC
statuses in one place (tokenflow_grpc.status)."""

from __future__ import annotations

from dataclasses import dataclass

# Maximum length of a client's value quoted in an error message, because the
# whole message travels in gRPC trailers, which have a size limit.
MAX_QUOTED_CHARS = 64


def quoted(value: str) -> str:
    """Return repr(value), cut to MAX_QUOTED_CHARS characters with a note of the full length."""
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value)} characters)"


class TokenFlowError(Exception):
    """Root of every error TokenFlow raises on purpose."""


class ConfigurationError(TokenFlowError):
    """A setting is invalid; the message names the flag and the value."""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, in the shape of google.rpc.BadRequest.FieldViolation."""

    field: str
    description: str


class InvalidArgumentError(TokenFlowError):
    """The request has one or more invalid fields."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class RateLimitedError(TokenFlowError):
    """The client used up its limit for the current window."""

    def __init__(self, client: str, decision: object) -> None:
        self.client = client
        self.decision = decision
        super().__init__(f"rate limit exceeded for client {client}")


class QuotaExceededError(TokenFlowError):
    """A caller used up a server limit other than the rate limit, such as open
    watchers or Simulate calls; the message names the limit and its flag.

    subject and description fill google.rpc.QuotaFailure; retry_after_ms is
    None when waiting alone does not help (a watcher must close first).
    """

    def __init__(
        self, message: str, subject: str, description: str, retry_after_ms: int | None = None
    ) -> None:
        self.subject = subject
        self.description = description
        self.retry_after_ms = retry_after_ms
        super().__init__(message)


class BackendUnavailableError(TokenFlowError):
    """Valkey could not be reached and the policy is to fail closed."""


class ServerStoppingError(TokenFlowError):
    """The server's drain ran out, or a second signal came, before the call finished."""


class GeneratorError(TokenFlowError):
    """The generator failed; the call may succeed when retried later.

    retry_after_ms is the wait that the upstream asked for, or None.
    """

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        self.retry_after_ms = retry_after_ms
        super().__init__(message)


class GeneratorTimeoutError(GeneratorError):
    """The generator did not respond before the call's deadline or --generator-timeout."""


class UpstreamRejectedError(GeneratorError):
    """The upstream rejected the request as invalid (HTTP 400, 404, 413 or 422)."""


class UpstreamRefusedError(GeneratorError):
    """The upstream refused the server's own request for a reason that retrying
    cannot fix, such as a missing or invalid upstream API key (HTTP 401 or 403)."""


class UnauthenticatedError(TokenFlowError):
    """The call has no API key, or one that no configured key matches."""


class PermissionDeniedError(TokenFlowError):
    """The call's API key lacks the role that the method needs."""
