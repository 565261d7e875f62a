"""A TCP proxy on loopback that delays every byte Valkey sends back, so a test
can cancel commands after they were sent and before their replies arrive, and
that can cut its clients off from Valkey while Valkey keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import time

_CHUNK_BYTES = 65536


class DelayingProxy:
    """Forwards 127.0.0.1:port to an upstream TCP server.

    Requests go upstream at once. Each chunk of a reply is held for
    reply_delay seconds, in order, so replies arrive late but intact.
    """

    def __init__(self, upstream_port: int, reply_delay: float) -> None:
        self.upstream_port = upstream_port
        self.reply_delay = reply_delay
        self.port = 0
        self.connections = 0
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every connection in both directions."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        """Close every connection, and close each new one at once until restore()."""
        self.cut_off = True
        for writer in list(self._writers):
            writer.close()

    def restore(self) -> None:
        """Forward new connections again."""
        self.cut_off = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        self.connections += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._copy(reader, upstream_writer, 0.0),
                self._copy(upstream_reader, writer, self.reply_delay),
            )
        finally:
            for stream in (writer, upstream_writer):
                self._writers.discard(stream)
                stream.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await stream.wait_closed()

    @staticmethod
    async def _copy(
        source: asyncio.StreamReader, target: asyncio.StreamWriter, delay: float
    ) -> None:
        """Copy source to target until end of file, each chunk delay seconds after it arrived."""
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send_when_due() -> None:
            while True:
                due, data = await pending.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                target.write(data)
                await target.drain()
            if target.can_write_eof():
                target.write_eof()

        sender = asyncio.ensure_future(send_when_due())
        try:
            while True:
                try:
                    data = await source.read(_CHUNK_BYTES)
                except (OSError, ConnectionError):
                    data = b""
                pending.put_nowait((time.monotonic() + delay, data))
                if not data:
                    break
            with contextlib.suppress(OSError, ConnectionError):
                await sender
        finally:
            sender.cancel()
