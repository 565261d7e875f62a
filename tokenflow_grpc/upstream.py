"""A generator over any OpenAI-compatible chat-completions API, with aiohttp.

Each call sends the prompt as one user message to BASE_URL/chat/completions.
A request that fails with HTTP 408, 429 or 5xx, or cannot connect, is retried
up to `retries` times: after the upstream's Retry-After when it sends one,
else after `backoff` seconds doubled per retry. A wait that would pass the
call's deadline is not started, so the call fails at once with the last
error. A stream is retried only until its response headers arrive, because
its text goes to the caller as it comes.

Errors become GeneratorError subclasses, which tokenflow_grpc.status maps to
gRPC codes. An attempt or a deadline that runs out is GeneratorTimeoutError
(DEADLINE_EXCEEDED). HTTP 400, 404, 413 and 422 are UpstreamRejectedError
(INVALID_ARGUMENT), and 401, 403 and other 4xx UpstreamRefusedError
(FAILED_PRECONDITION). The rest is GeneratorError (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tokenflow_grpc.errors import (
    GeneratorError,
    GeneratorTimeoutError,
    UpstreamRefusedError,
    UpstreamRejectedError,
    quoted,
)
from tokenflow_grpc.generator import Chunk, Generation, GenerationRequest, Usage, estimate_usage
from tokenflow_grpc.settings import Settings

logger = logging.getLogger(__name__)

COMPLETIONS_PATH = "/chat/completions"
REJECTED_STATUSES = frozenset({400, 404, 413, 422})
RETRIED_STATUSES = frozenset({408, 429})
# The end of an OpenAI-style stream.
STREAM_DONE = "[DONE]"
# Bearer credentials and key-shaped words (sk-..., tfk_...) in upstream error text.
SECRET_LIKE = re.compile(r"(?i)\bbearer\s+\S+|\b(?:sk|rk|pk|tfk)[-_][A-Za-z0-9_\-]{4,}")
# Bytes of an error response body read for its message.
MAX_ERROR_BODY_BYTES = 4096


class UpstreamGenerator:
    """Generates text with an OpenAI-compatible chat-completions endpoint.

    base_url is the URL that /chat/completions is appended to. api_key is
    sent as a Bearer token when not empty, and never logged. model_map maps
    TokenFlow model names to upstream model names. attempt_timeout is the
    max wait in seconds for one attempt's headers, then for its body or for
    each chunk of a stream.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        model_map: Mapping[str, str] | None = None,
        attempt_timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.5,
    ) -> None:
        self.url = base_url.rstrip("/") + COMPLETIONS_PATH
        self.model_map = dict(model_map or {})
        self.attempt_timeout = attempt_timeout
        self.retries = retries
        self.backoff = backoff
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> UpstreamGenerator:
        """Build the generator of --upstream-url, with the key from --upstream-api-key-env."""
        environ = os.environ if environ is None else environ
        # A trailing newline (from `$(cat file)` or an env file) is not part of the key
        # and would make every request header invalid.
        api_key = environ.get(settings.upstream_api_key_env, "").strip()
        if not api_key:
            logger.info(
                "environment variable %s is unset or empty, so upstream requests carry no API key",
                settings.upstream_api_key_env,
            )
        return cls(
            settings.upstream_url,
            api_key,
            settings.upstream_model_map,
            settings.upstream_timeout,
            settings.upstream_retries,
            settings.upstream_backoff,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def payload(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        """Return the JSON body of a chat-completions request for request."""
        body: dict[str, Any] = {
            "model": self.model_map.get(request.model, request.model),
            "messages": [{"role": "user", "content": request.prompt}],
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, request: GenerationRequest, deadline: float) -> Generation:
        async with self._response(request, deadline, stream=False) as response:
            try:
                async with asyncio.timeout(self._attempt_time(deadline)):
                    data = await response.json(content_type=None)
            except TimeoutError as error:
                raise self._timeout_error(deadline) from error
            except (aiohttp.ClientError, ValueError) as error:
                message = f"the upstream sent an unreadable response: {error}"
                raise GeneratorError(message) from error

        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as error:
            message = "the upstream response has no choices[0].message.content"
            raise GeneratorError(message) from error
        usage = _usage(data.get("usage")) or estimate_usage(request.prompt, text)
        return Generation(str(text), usage)

    async def stream(
        self, request: GenerationRequest, deadline: float
    ) -> AsyncGenerator[Chunk, None]:
        async with self._response(request, deadline, stream=True) as response:
            chunks = 0
            try:
                async for data in self._events(response, deadline):
                    if data == STREAM_DONE:
                        return
                    for chunk in _stream_chunks(data):
                        chunks += 1
                        yield chunk
            except (aiohttp.ClientError, ValueError) as error:
                raise GeneratorError(
                    f"the upstream stream failed after {chunks} chunks: {error}"
                ) from error

    async def _events(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> AsyncIterator[str]:
        """Yield the data of each Server-Sent Event of response."""
        data: list[str] = []
        while True:
            try:
                async with asyncio.timeout(self._attempt_time(deadline)):
                    raw = await response.content.readline()
            except TimeoutError as error:
                raise self._timeout_error(deadline) from error
            if not raw:
                if data:
                    yield "\n".join(data)
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))

    @asynccontextmanager
    async def _response(
        self, request: GenerationRequest, deadline: float, stream: bool
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST request, retrying as the module describes, and yield the successful response."""
        payload = self.payload(request, stream)
        retry = 0
        while True:
            response, error = await self._attempt(payload, deadline)
            if response is not None:
                try:
                    yield response
                finally:
                    response.release()
                return

            assert error is not None
            wait = self._retry_wait(error, retry, deadline)
            if wait is None:
                logger.warning(
                    "upstream request for model %s failed after %d retries: %s",
                    payload["model"],
                    retry,
                    error,
                )
                raise error
            retry += 1
            logger.warning(
                "upstream request for model %s failed (%s); retry %d of %d in %.2f s",
                payload["model"],
                error,
                retry,
                self.retries,
                wait,
            )
            await asyncio.sleep(wait)

    async def _attempt(
        self, payload: dict[str, Any], deadline: float
    ) -> tuple[aiohttp.ClientResponse | None, GeneratorError | None]:
        """Send one request; return the response when it succeeded, else the error."""
        session = self._session_for_loop()
        try:
            async with asyncio.timeout(self._attempt_time(deadline)):
                response = await session.post(self.url, json=payload, headers=self._headers)
                if response.status < 300:
                    return response, None
                body = await response.content.read(MAX_ERROR_BODY_BYTES)
                response.release()
        except TimeoutError as error:
            raise self._timeout_error(deadline) from error
        except aiohttp.ClientError as error:
            return None, GeneratorError(f"could not reach the upstream: {error}")
        return None, _status_error(response.status, body, response.headers)

    def _retry_wait(self, error: GeneratorError, retry: int, deadline: float) -> float | None:
        """Return the wait before the next retry, or None when error is final."""
        final = isinstance(error, (UpstreamRejectedError, UpstreamRefusedError))
        if final or retry >= self.retries:
            return None
        if error.retry_after_ms is not None:
            wait = error.retry_after_ms / 1000
        else:
            wait = self.backoff * 2**retry
        if time.monotonic() + wait >= deadline:
            return None
        return wait

    def _attempt_time(self, deadline: float) -> float:
        return max(0.0, min(self.attempt_timeout, deadline - time.monotonic()))

    def _timeout_error(self, deadline: float) -> GeneratorTimeoutError:
        if time.monotonic() >= deadline - 0.001:
            return GeneratorTimeoutError("the upstream did not respond before the call's deadline")
        return GeneratorTimeoutError(
            f"the upstream did not respond within {self.attempt_timeout:g} s (--upstream-timeout)"
        )

    def _session_for_loop(self) -> aiohttp.ClientSession:
        """Return the HTTP session, created on first use inside the running event loop."""
        if self._session is None or self._session.closed:
            # No total timeout: the attempt and chunk timeouts above bound each
            # wait, and a stream may last longer than any fixed total.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.attempt_timeout)
            )
        return self._session


def _status_error(status: int, body: bytes, headers: Mapping[str, str]) -> GeneratorError:
    """Return the error for an upstream response with a non-2xx status."""
    message = f"the upstream returned HTTP {status}"
    detail = _error_message(body)
    if detail:
        message += f": {quoted(detail)}"
    if status in REJECTED_STATUSES:
        return UpstreamRejectedError(message)
    if 400 <= status < 500 and status not in RETRIED_STATUSES:
        return UpstreamRefusedError(message)
    return GeneratorError(message, retry_after_ms=_retry_after_ms(headers.get("Retry-After")))


def _error_message(body: bytes) -> str:
    """Return the message of an OpenAI-style error body, or its text, with
    anything that looks like a key masked: some upstreams echo the key they
    were sent, and this message goes to clients and logs."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return _mask_secrets(text)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return _mask_secrets(str(parsed["error"].get("message", "")))
    return _mask_secrets(text)


def _mask_secrets(text: str) -> str:
    return SECRET_LIKE.sub("***", text)


def _retry_after_ms(value: str | None) -> int | None:
    """Return a Retry-After header (seconds, or an HTTP date) in milliseconds, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0, math.ceil(seconds * 1000))


def _usage(value: Any) -> Usage | None:
    """Return an OpenAI usage object as Usage, or None when it is missing or malformed."""
    if not isinstance(value, dict):
        return None
    try:
        prompt = int(value.get("prompt_tokens") or 0)
        completion = int(value.get("completion_tokens") or 0)
        total = int(value.get("total_tokens") or prompt + completion)
    except (TypeError, ValueError):
        return None
    return Usage(prompt, completion, total)


def _stream_chunks(data: str) -> list[Chunk]:
    """Return the text delta and the usage of one chat.completion.chunk."""
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"expected a JSON object in the stream, got {quoted(data)}")
    chunks = []
    for choice in event.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            chunks.append(Chunk(str(content)))
    usage = _usage(event.get("usage"))
    if usage is not None:
        chunks.append(Chunk(usage=usage))
    return chunks
