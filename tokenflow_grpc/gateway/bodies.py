"""Request bodies: the Content-Encoding codings that the gateway decodes.

The gateway runs aiohttp with auto_decompress=False and decodes bodies here,
so that every coding it cannot decode gets 415 with a google.rpc.Status body.
aiohttp's own decoding (checked with 3.14.5) rejects br and zstd with a
text/plain 400 when their optional packages are missing, reads an unknown
coding as an unencoded body, and accepts a truncated gzip stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

from tokenflow_grpc.gateway.transcode import TranscodeError

SUPPORTED_CODINGS = ("gzip", "deflate")
# RFC 9110, section 8.4.1.3: a recipient should treat x-gzip as gzip.
CODING_ALIASES = {"x-gzip": "gzip"}
GZIP_WBITS = 16 + zlib.MAX_WBITS


class UnsupportedEncodingError(ValueError):
    """A request's Content-Encoding names a coding that the gateway cannot decode."""


class BodyTooLargeError(ValueError):
    """A decoded body exceeds the maximum size."""


def content_codings(values: Iterable[str]) -> list[str]:
    """Return the codings of Content-Encoding header values in the order they
    were applied, without identity.

    Raises UnsupportedEncodingError for a coding other than gzip and deflate.
    """
    codings = []
    for value in values:
        for item in value.split(","):
            coding = item.strip().lower()
            coding = CODING_ALIASES.get(coding, coding)
            if coding in ("", "identity"):
                continue
            if coding not in SUPPORTED_CODINGS:
                raise UnsupportedEncodingError(
                    f"unsupported Content-Encoding {item.strip()!r}: the gateway decodes only "
                    "gzip and deflate; send the body uncompressed or in one of those"
                )
            codings.append(coding)
    return codings


def decode_body(body: bytes, codings: Sequence[str], max_bytes: int) -> bytes:
    """Undo codings, the last applied first.

    Raises BodyTooLargeError when a decoded body exceeds max_bytes, and
    TranscodeError when the body is not valid in a coding.
    """
    for coding in reversed(codings):
        if not body:
            break
        body = _decompressed(body, coding, max_bytes)
    return body


def _decompressed(data: bytes, coding: str, max_bytes: int) -> bytes:
    if coding == "gzip":
        wbits = GZIP_WBITS
    elif data[0] & 0x0F == 8:
        wbits = zlib.MAX_WBITS  # The zlib format that RFC 9110 calls deflate.
    else:
        wbits = -zlib.MAX_WBITS  # Raw deflate, which some clients send instead.

    output = bytearray()
    remaining = data
    try:
        while remaining:
            decompressor = zlib.decompressobj(wbits)
            # Asking for one byte over the limit shows whether the body exceeds it
            # without inflating more of a compression bomb.
            output += decompressor.decompress(remaining, max_bytes + 1 - len(output))
            if len(output) > max_bytes:
                raise BodyTooLargeError(f"the decoded body exceeds {max_bytes} bytes")
            if not decompressor.eof:
                raise TranscodeError(
                    f"cannot decode the body with Content-Encoding {coding!r}: it ends early"
                )
            remaining = decompressor.unused_data
            if remaining and coding != "gzip":
                raise TranscodeError(
                    f"cannot decode the body with Content-Encoding {coding!r}: "
                    "it has data after the end of the stream"
                )
            # A gzip body may contain several members, one after another (RFC 1952).
    except zlib.error as error:
        raise TranscodeError(
            f"cannot decode the body with Content-Encoding {coding!r}: {error}"
        ) from error
    return bytes(output)
