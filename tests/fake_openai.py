"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for the
upstream tests: aiohttp over real HTTP, answering from a script of replies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass
class Reply:
    """One scripted answer.

    status: the HTTP status; headers: extra response headers; delay: seconds
    to wait before answering; text and usage: the completion of a 200 reply.
    A streamed 200 reply sends deltas, each its own SSE event, and waits for
    gate (when set) after the first gate_after of them.
    """

    status: int = 200
    text: str = "upstream answer"
    usage: tuple[int, int, int] = (3, 2, 5)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    deltas: Sequence[str] = ()
    gate: asyncio.Event | None = None
    gate_after: int = 0
    error_message: str = "scripted failure"


@dataclass
class Received:
    """One request the fake received, and when (time.monotonic())."""

    body: dict[str, Any]
    headers: dict[str, str]
    time: float


class FakeOpenAI:
    """Serves the scripted replies in order; after the last, repeats it."""

    def __init__(self, replies: Sequence[Reply]) -> None:
        self.replies = list(replies)
        self.received: list[Received] = []
        self.finished_streams = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(body, dict(request.headers), time.monotonic()))
        reply = self.replies[min(len(self.received), len(self.replies)) - 1]
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            error = {"error": {"message": reply.error_message, "type": "test"}}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        if body.get("stream"):
            return await self._stream(request, reply)
        prompt_tokens, completion_tokens, total_tokens = reply.usage
        return web.json_response(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": total_tokens,
                },
            }
        )

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, delta in enumerate(reply.deltas):
            if reply.gate is not None and index == reply.gate_after:
                await reply.gate.wait()
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": delta}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        prompt_tokens, completion_tokens, total_tokens = reply.usage
        usage = {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": total_tokens,
            },
        }
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        self.finished_streams += 1
        return response
