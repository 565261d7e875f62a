"""Connections to Valkey: a server by URL, or the in-process fakeredis backend
(memory://)."""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenflow_grpc.errors import ConfigurationError

logger = logging.getLogger(__name__)

MEMORY_SCHEME = "memory"
SUPPORTED_SCHEMES = ("redis", "rediss", "unix", MEMORY_SCHEME)

# One quick retry after a connection error (a pooled connection that Valkey
# closed, for example), then the error surfaces. A timeout is not retried: the
# command may have run, and running a Generate script twice would count the
# request twice.
_RETRY_ATTEMPTS = 1
# Connections per client. A command that finds them all busy waits for one,
# up to the command timeout. redis-py's default pool (redis-py 8.2) raises
# MaxConnectionsError there instead, which Generate would take for an
# unreachable Valkey and answer without a limit.
MAX_CONNECTIONS = 100


def redact(url: str) -> str:
    """Return url with any password replaced by ***, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def connect(
    url: str,
    timeout: float,
    read_timeout: float | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> Any:
    """Return an asyncio client for url; no connection is made until first use.

    timeout bounds connecting, waiting for a free connection of the pool and
    each reply; read_timeout, when given, replaces it for replies (for
    blocking reads).
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigurationError(
            f"unsupported Valkey URL {redact(url)!r}: the scheme must be one of "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
        )
    if scheme == MEMORY_SCHEME:
        return memory_backend(url)

    pool = redis_asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=read_timeout if read_timeout is not None else timeout,
        retry=Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            _RETRY_ATTEMPTS,
            supported_errors=(RedisConnectionError,),
        ),
        health_check_interval=30,
    )
    return redis_asyncio.Redis.from_pool(pool)


_memory_servers: dict[str, Any] = {}


def memory_backend(url: str) -> Any:
    """Return a fakeredis client; clients of the same memory:// URL share data."""
    import fakeredis

    server = _memory_servers.setdefault(url, fakeredis.FakeServer())
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)


def is_memory(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == MEMORY_SCHEME
