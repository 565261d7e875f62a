"""Request ids: taken from the x-request-id metadata (or the gateway's
X-Request-Id header) when valid, else generated, and sent back with the
response so that a caller can find its request in the server's log."""

from __future__ import annotations

import contextvars
import re
import uuid

from tokenflow_grpc.errors import quoted

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
# Letters, digits and the punctuation of UUIDs, W3C trace ids and similar
# schemes; nothing that could split a log line or a header.
REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")

REQUEST_ID_RULE = (
    f"1 to {MAX_REQUEST_ID_LENGTH} characters from A-Z, a-z, 0-9, '.', '_', ':' and '-'"
)

# The id of the request the current task serves, for log records.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tokenflow_request_id", default=""
)


class InvalidRequestIdError(ValueError):
    """A caller's request id is too long or contains characters outside REQUEST_ID."""


def new_request_id() -> str:
    return uuid.uuid4().hex


def checked_request_id(value: str) -> str:
    """Return value when it is a valid request id, else raise InvalidRequestIdError."""
    if not REQUEST_ID.fullmatch(value):
        raise InvalidRequestIdError(
            f"invalid {REQUEST_ID_KEY} {quoted(value)}: expected {REQUEST_ID_RULE}"
        )
    return value
