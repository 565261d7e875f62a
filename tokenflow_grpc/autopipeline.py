"""Auto-pipelining: the Valkey commands of concurrent calls share one
connection and one socket write per event-loop iteration.

redis-py's asyncio client runs each command as its own request: a pool
checkout, a write, and a task woken up for the reply. On a cache-hit
Generate that costs the server about as much CPU as the rest of the call.
AutoPipeline keeps one connection open and writes every command queued
during one iteration of the event loop in a single write, without waiting
for the replies of earlier writes. Valkey replies to the commands of one
connection in the order it received them, so replies are matched to
callers in that order. Valkey still runs each command on its own: a script
stays atomic, and no command waits for another's result.

Errors reach the caller as redis-py exceptions, as they would from redis-py:
- an error reply fails only its own command (NoScriptError for NOSCRIPT,
  ResponseError for the others);
- a command whose reply takes longer than the timeout fails with
  TimeoutError, and so does every other command waiting on that connection,
  which is then closed;
- a refused or lost connection fails the commands written to it (and those
  queued for it) with ConnectionError. The next command connects again.
A command is never sent twice: after a timeout or a lost connection nobody
knows whether Valkey ran it, and running a Generate script twice would
count the call twice.

Only plain TCP and Unix-socket connections are pipelined this way.
AutoPipeline.for_client() returns None for other clients (TLS, fakeredis,
Valkey Cluster), so they keep using redis-py's own command path.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis.asyncio as redis_asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

# hiredis.Reader.gets() returns this when no complete reply is buffered.
_NO_REPLY = object()


@dataclass(frozen=True)
class Endpoint:
    """The address of a Valkey server (a TCP host and port, or a Unix socket
    path) and the credentials and timeouts to use with it.

    Timeouts are in seconds, and None waits without limit.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    connect_timeout: float | None = None
    timeout: float | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"


class AutoPipeline:
    """One pipelined connection to Valkey, opened on first use."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        # Socket writes and the commands in them, for tests and benchmarks.
        self.writes = 0
        self.commands_written = 0
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def for_client(cls, client: Any) -> AutoPipeline | None:
        """Return an AutoPipeline to the server of a redis-py asyncio client,
        or None when its connections are not plain TCP or Unix sockets."""
        pool = getattr(client, "connection_pool", None)
        connection_class = getattr(pool, "connection_class", None)
        if connection_class not in (
            redis_asyncio.Connection,
            redis_asyncio.UnixDomainSocketConnection,
        ):
            return None
        assert pool is not None
        settings = pool.connection_kwargs
        timeout = settings.get("socket_timeout")
        return cls(
            Endpoint(
                host=settings.get("host", "127.0.0.1"),
                port=int(settings.get("port", 6379)),
                path=settings.get("path"),
                username=settings.get("username"),
                password=settings.get("password"),
                db=int(settings.get("db") or 0),
                connect_timeout=settings.get("socket_connect_timeout") or timeout,
                timeout=timeout,
            )
        )

    async def execute_command(self, *args: Any) -> Any:
        """Send one command with the others of this loop iteration and return its reply."""
        if self._closed:
            raise RedisConnectionError("the Valkey pipeline is closed; the server is stopping")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((hiredis.pack_command(args), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def close(self) -> None:
        """Close the connection. Commands still waiting fail with ConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        _fail(self._queue, lambda: RedisConnectionError("the Valkey pipeline was closed"))
        self._queue = []
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _flush(self) -> None:
        """Write the queued commands, or connect first when there is no connection."""
        self._flush_scheduled = False
        queued = [(packed, future) for packed, future in self._queue if not future.done()]
        self._queue = []
        if not queued:
            return
        connection = self._connection
        if connection is None or connection.lost:
            self._queue = queued
            if self._connecting is None and not self._closed:
                self._connecting = asyncio.get_running_loop().create_task(
                    self._connect_and_flush(), name="tokenflow-autopipeline-connect"
                )
            return
        connection.write(queued)
        self.writes += 1
        self.commands_written += len(queued)

    async def _connect_and_flush(self) -> None:
        try:
            connection = await _Connection.open(self.endpoint)
        except (RedisError, OSError) as error:
            self._connecting = None
            failed, self._queue = self._queue, []
            _fail(failed, functools.partial(_copy_error, error))
            return
        except Exception as error:
            # A bug here must not leave the queued callers waiting forever.
            logger.exception("connecting to Valkey at %s failed", self.endpoint.address)
            self._connecting = None
            failed, self._queue = self._queue, []
            message = f"could not connect to Valkey at {self.endpoint.address}: {error!r}"
            _fail(failed, functools.partial(RedisConnectionError, message))
            return
        except BaseException:
            self._connecting = None
            raise
        self._connecting = None
        if self._closed:
            connection.close()
            return
        self._connection = connection
        self._flush()


class _Connection(asyncio.Protocol):
    """A connection whose replies resolve the oldest waiting future."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.lost = False
        self._reader = hiredis.Reader(encoding="utf-8", notEnoughData=_NO_REPLY)
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, endpoint: Endpoint) -> _Connection:
        """Connect, authenticate and select the database.

        Raises redis-py's ConnectionError or TimeoutError when that fails.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(endpoint.connect_timeout):
                if endpoint.path:
                    _, connection = await loop.create_unix_connection(
                        lambda: cls(endpoint), endpoint.path
                    )
                else:
                    _, connection = await loop.create_connection(
                        lambda: cls(endpoint), endpoint.host, endpoint.port
                    )
        except TimeoutError as error:
            message = f"timed out connecting to Valkey at {endpoint.address}"
            raise RedisTimeoutError(message) from error
        except OSError as error:
            raise RedisConnectionError(
                f"could not connect to Valkey at {endpoint.address}: {error}"
            ) from error

        try:
            await connection._handshake()
        except BaseException:
            connection.close()
            raise
        return connection

    async def _handshake(self) -> None:
        commands: list[tuple[Any, ...]] = []
        if self.endpoint.password is not None:
            if self.endpoint.username:
                commands.append(("AUTH", self.endpoint.username, self.endpoint.password))
            else:
                commands.append(("AUTH", self.endpoint.password))
        if self.endpoint.db:
            commands.append(("SELECT", self.endpoint.db))
        if not commands:
            return
        futures: list[asyncio.Future[Any]] = [self._loop.create_future() for _ in commands]
        self.write([(hiredis.pack_command(c), f) for c, f in zip(commands, futures, strict=True)])
        await asyncio.gather(*futures)

    def write(self, commands: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        assert self._transport is not None
        now = self._loop.time()
        for _packed, future in commands:
            self._waiting.append((now, future))
        self._transport.write(b"".join(packed for packed, _future in commands))
        if self._timer is None and self.endpoint.timeout is not None:
            self._timer = self._loop.call_at(now + self.endpoint.timeout, self._check_timeout)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not _NO_REPLY:
                if not self._waiting:
                    raise hiredis.ProtocolError(f"reply without a command: {reply!r}")
                _sent, future = self._waiting.popleft()
                if future.done():
                    continue  # The caller was cancelled; the command ran all the same.
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(_response_error(str(reply)))
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as error:
            logger.warning("invalid reply from Valkey at %s: %s", self.endpoint.address, error)
            message = f"invalid reply from Valkey at {self.endpoint.address}: {error}"
            self._abort(functools.partial(RedisConnectionError, message))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = f": {exc}" if exc else ""
        message = f"lost the connection to Valkey at {self.endpoint.address}{reason}"
        waiting = list(self._waiting)
        self._waiting.clear()
        for _sent, future in waiting:
            if not future.done():
                future.set_exception(RedisConnectionError(message))

    def _check_timeout(self) -> None:
        """Fail everything waiting once the oldest command has waited the timeout."""
        self._timer = None
        if not self._waiting or self.endpoint.timeout is None:
            return
        deadline = self._waiting[0][0] + self.endpoint.timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
            return
        message = (
            f"Valkey at {self.endpoint.address} did not reply within {self.endpoint.timeout:g} s"
        )
        self._abort(lambda: RedisTimeoutError(message))

    def _abort(self, error: Callable[[], Exception]) -> None:
        """Fail every waiting command with a new error each and drop the connection."""
        waiting = list(self._waiting)
        self._waiting.clear()
        for _sent, future in waiting:
            if not future.done():
                future.set_exception(error())
        self.lost = True
        if self._transport is not None:
            self._transport.abort()


def _response_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


def _fail(
    queued: list[tuple[bytes, asyncio.Future[Any]]], error: Callable[[], BaseException]
) -> None:
    for _packed, future in queued:
        if not future.done():
            future.set_exception(error())


def _copy_error(error: Exception) -> Exception:
    """Return a new exception of error's type and message, caused by error, so
    that callers raising it concurrently do not share one traceback."""
    try:
        copied = type(error)(*error.args)
    except Exception:
        return error
    copied.__cause__ = error
    return copied


class PipelinedScript:
    """A Lua script run by EVALSHA through an AutoPipeline.

    Called like redis-py's registered scripts: `await script(keys=[...],
    args=[...])`. After a NOSCRIPT reply (Valkey restarted, or its script
    cache was flushed) the call is sent again as EVAL, which runs the
    script and caches it. That is safe because NOSCRIPT means the script
    did not run.
    """

    def __init__(self, pipeline: AutoPipeline, source: str) -> None:
        self.pipeline = pipeline
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await self.pipeline.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.pipeline.execute_command("EVAL", self.source, len(keys), *keys, *args)
