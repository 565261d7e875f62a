"""Mapping between HTTP headers and gRPC metadata, both ways."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from tokenflow_grpc.settings import Network

METADATA_HEADER_PREFIX = "grpc-metadata-"
TRAILER_HEADER_PREFIX = "Grpc-Trailer-"
# Grpc-Timeout as in the gRPC over HTTP/2 protocol: up to 8 ASCII digits and a
# unit. [0-9], because \d also matches other scripts' digits, which int() reads.
TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

# Rate-limit metadata and the HTTP header each becomes.
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit": "X-RateLimit-Limit",
    "x-ratelimit-remaining": "X-RateLimit-Remaining",
    "x-ratelimit-reset": "X-RateLimit-Reset",
    "x-ratelimit-limit-tokens": "X-RateLimit-Limit-Tokens",
    "x-ratelimit-remaining-tokens": "X-RateLimit-Remaining-Tokens",
    "x-ratelimit-shadow-rejected": "X-RateLimit-Shadow-Rejected",
    "retry-after": "Retry-After",
}
# Rate-limit metadata that only shapes the IETF RateLimit fields.
RATE_LIMIT_FIELDS_ONLY = ("x-ratelimit-window", "x-ratelimit-policy")
# Metadata that HTTP/2 or gRPC itself owns, never copied to HTTP headers.
RESERVED_METADATA = {"content-type", "grpc-status", "grpc-message", "grpc-status-details-bin"}
# Metadata that a client must not set through Grpc-Metadata-*: gRPC's own
# keys and HTTP/2 connection headers. They are dropped.
FORBIDDEN_FORWARDED_KEYS = {
    "te",
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "user-agent",
    "x-forwarded-for",
}
# Forwarded metadata above this many bytes is rejected with 400, below gRPC's
# default limit of 8 KiB on received metadata.
MAX_FORWARDED_METADATA_BYTES = 4096
# Longer Grpc-Timeout values are cut to this: a deadline centuries away
# overflows gRPC's clock.
MAX_TIMEOUT_SECONDS = 30 * 86400.0
RATE_LIMIT_POLICY_NAME = "default"
# HTTP headers passed on as metadata under their own name. X-Request-Id is
# not among them, because request_ids.py checks it and sends the one id that
# the response returns.
FORWARDED_HEADERS = ("authorization", "x-api-key")
# Metadata that the gateway sets from an HTTP header of its own, and that
# header. A Grpc-Metadata- header for one of these keys is rejected with 400,
# because the server would otherwise receive a second, unchecked value.
SHADOWED_KEYS = {
    "authorization": "Authorization",
    "x-api-key": "X-API-Key",
    "x-request-id": "X-Request-Id",
}
# The challenge of a 401 response (RFC 6750, section 3).
AUTHENTICATE_CHALLENGE = 'Bearer realm="tokenflow"'
# Characters allowed in ASCII metadata keys and values (gRPC over HTTP/2 protocol).
METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
# Keys with this suffix carry bytes, sent over HTTP as base64.
BINARY_SUFFIX = "-bin"
# Base64 in the standard or the URL-safe alphabet, with or without padding.
BASE64_VALUE = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")

Metadata = list[tuple[str, str | bytes]]


class HeaderError(ValueError):
    """An HTTP header has an invalid value."""


def parse_timeout(value: str) -> float:
    """Return a Grpc-Timeout header ("100m", "5S") in seconds."""
    found = TIMEOUT.match(value.strip())
    if found is None:
        raise HeaderError(
            f"invalid Grpc-Timeout {value!r}: expected up to 8 digits and a unit "
            "(H, M, S, m, u or n), for example 500m"
        )
    return min(int(found.group(1)) * TIMEOUT_UNITS[found.group(2)], MAX_TIMEOUT_SECONDS)


def forwarded_for(
    peer: str | None, incoming: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """Return the x-forwarded-for value to send for an HTTP client at peer.

    The client's own X-Forwarded-For is kept only when the client is a
    trusted proxy of the gateway; otherwise only its address is sent, so a
    client cannot choose the identity the server rate limits. A peer that is
    not an IP address (None, or a Unix socket's "") gets None: the server
    then limits the request as the gateway itself.
    """
    if not peer:
        return None
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return None
    is_trusted = any(address.version == n.version and address in n for n in trusted)
    if is_trusted and incoming:
        return ", ".join([*incoming, peer])
    return peer


def _checked_key(name: str, key: str) -> str:
    if not METADATA_KEY.fullmatch(key):
        raise HeaderError(
            f"invalid header {name!r}: a metadata key may contain only 0-9, a-z, '_', '-' and '.'"
        )
    return key


def _checked(name: str, key: str, value: str) -> tuple[str, str]:
    """Return (key, value) as metadata, or raise HeaderError when gRPC would reject it."""
    _checked_key(name, key)
    if not METADATA_VALUE.fullmatch(value):
        raise HeaderError(
            f"invalid value of header {name!r}: metadata values must be printable ASCII"
        )
    return key, value


def _binary(name: str, key: str, value: str) -> tuple[str, bytes]:
    """Return (key, decoded bytes) for a -bin header, or raise HeaderError when
    the key is invalid or the value is not base64. grpc-go decodes -bin
    headers in the standard alphabet, padded or not; the gateway also accepts
    the URL-safe alphabet."""
    _checked_key(name, key)
    text = value.strip()
    unpadded = text.rstrip("=")
    if (
        not BASE64_VALUE.fullmatch(text)
        or len(unpadded) % 4 == 1
        or (text != unpadded and len(text) % 4 != 0)
    ):
        raise HeaderError(
            f"invalid value of header {name!r}: expected base64 in the standard or URL-safe "
            "alphabet, with or without padding"
        )
    standard = unpadded.replace("-", "+").replace("_", "/")
    try:
        return key, base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except binascii.Error as error:
        raise HeaderError(f"invalid value of header {name!r}: {error}") from error


def request_metadata(
    headers: Mapping[str, str] | Any, peer: str | None, trusted: Sequence[Network]
) -> Metadata:
    """Return the gRPC metadata for an HTTP request's headers, all but x-request-id.

    A Grpc-Metadata-KEY-Bin header's base64 value is sent as bytes. Raises
    HeaderError for a forwarded header that gRPC metadata cannot carry, and
    for a Grpc-Metadata- header of a key in SHADOWED_KEYS.
    """
    metadata: Metadata = []
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in FORWARDED_HEADERS:
            metadata.append(_checked(name, lowered, value))
        elif lowered.startswith(METADATA_HEADER_PREFIX) and len(lowered) > len(
            METADATA_HEADER_PREFIX
        ):
            key = lowered[len(METADATA_HEADER_PREFIX) :]
            if key in SHADOWED_KEYS:
                raise HeaderError(
                    f"header {name!r} is not allowed: send {SHADOWED_KEYS[key]!r} instead, "
                    "which the gateway checks and forwards"
                )
            if (
                key.startswith("grpc-")
                or key in RESERVED_METADATA
                or key in FORBIDDEN_FORWARDED_KEYS
            ):
                continue
            if key.endswith(BINARY_SUFFIX):
                metadata.append(_binary(name, key, value))
            else:
                metadata.append(_checked(name, key, value))

    size = sum(len(key) + len(value) for key, value in metadata)
    if size > MAX_FORWARDED_METADATA_BYTES:
        raise HeaderError(
            f"the forwarded headers (Authorization, X-API-Key, Grpc-Metadata-*) are "
            f"{size} bytes; the maximum is {MAX_FORWARDED_METADATA_BYTES}"
        )

    incoming = headers.getall("X-Forwarded-For", []) if hasattr(headers, "getall") else []
    forwarded = forwarded_for(peer, list(incoming), trusted)
    if forwarded:
        metadata.append(("x-forwarded-for", forwarded))
    return metadata


def challenge_headers(code: grpc.StatusCode) -> dict[str, str]:
    """Return the WWW-Authenticate header that an UNAUTHENTICATED error's 401 needs."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return {"WWW-Authenticate": AUTHENTICATE_CHALLENGE}
    return {}


def response_headers(
    initial: Iterable[tuple[str, Any]] | None, trailing: Iterable[tuple[str, Any]] | None
) -> dict[str, str]:
    """Return the HTTP headers for a call's initial and trailing metadata.

    Rate-limit metadata becomes X-RateLimit-*, Retry-After and the IETF
    RateLimit-Policy / RateLimit fields; other initial metadata becomes
    Grpc-Metadata-KEY and other trailing metadata Grpc-Trailer-KEY, with
    the bytes of a KEY-bin in standard, padded base64.
    """
    headers: dict[str, str] = {}
    rate: dict[str, str] = {}
    for pairs, prefix in ((initial, "Grpc-Metadata-"), (trailing, TRAILER_HEADER_PREFIX)):
        for key, value in pairs or ():
            if key in RESERVED_METADATA:
                continue
            if isinstance(value, bytes):
                if key.endswith(BINARY_SUFFIX):
                    headers[prefix + key] = base64.b64encode(value).decode("ascii")
                continue
            if not isinstance(value, str):
                continue
            if key == "x-request-id":
                continue  # The gateway sets X-Request-Id itself, from the same id.
            if key in RATE_LIMIT_HEADERS:
                headers[RATE_LIMIT_HEADERS[key]] = value
                rate[key] = value
            elif key in RATE_LIMIT_FIELDS_ONLY:
                rate[key] = value
            else:
                headers[prefix + key] = value

    name = rate.get("x-ratelimit-policy", RATE_LIMIT_POLICY_NAME)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        name = RATE_LIMIT_POLICY_NAME
    if "x-ratelimit-limit" in rate and "x-ratelimit-window" in rate:
        headers["RateLimit-Policy"] = (
            f'"{name}";q={rate["x-ratelimit-limit"]};w={rate["x-ratelimit-window"]}'
        )
    if "x-ratelimit-remaining" in rate and "x-ratelimit-reset" in rate:
        headers["RateLimit"] = (
            f'"{name}";r={rate["x-ratelimit-remaining"]};t={rate["x-ratelimit-reset"]}'
        )
    return headers
