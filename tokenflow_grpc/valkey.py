"""Connections to Valkey: a server or a Valkey Cluster by URL, or the
in-process fakeredis backend (memory://)."""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterDownError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenflow_grpc.errors import ConfigurationError

logger = logging.getLogger(__name__)

MEMORY_SCHEME = "memory"
SUPPORTED_SCHEMES = ("redis", "rediss", "unix", MEMORY_SCHEME)
CLUSTER_SCHEMES = ("redis", "rediss")

# One quick retry after a connection error (a pooled connection that Valkey
# closed, for example), then the error surfaces. A timeout is not retried: the
# command may have run, and running a Generate script twice would count the
# request twice.
_RETRY_ATTEMPTS = 1
# Connections per client. A command that finds them all busy waits for one,
# up to the command timeout. redis-py's default pool (redis-py 8.2) raises
# MaxConnectionsError there instead, which Generate would take for an
# unreachable Valkey and admit the call without a limit.
MAX_CONNECTIONS = 100
CLUSTER_MAX_CONNECTIONS_PER_NODE = 100_000


class ClusterClient(RedisCluster):
    """A RedisCluster client that retries a command once after a connection
    error or a CLUSTERDOWN reply, but never after a timeout.

    Before each retry it refreshes its map of slots to primaries, which is how
    a command finds the replica promoted after its primary failed. RedisCluster
    itself also retries timeouts, and a timed-out Generate script may have run,
    so running it again would count the request twice.
    """

    # NOTE: redis-py 8.2 reads this class attribute through the client's own
    # class to decide whether to retry a command. Its pipelines read the one of
    # RedisCluster, so a stats transaction is still retried after a timeout.
    # The base class types the attribute as its own four-error tuple.
    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        RedisConnectionError,
        ClusterDownError,
        SlotNotCoveredError,
    )


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
    cluster: bool = False,
    ca_cert: str = "",
) -> Any:
    """Return an asyncio client for url; no connection is made until first use.

    timeout bounds connecting, waiting for a free connection of the pool and
    each reply; read_timeout, when given, replaces it for replies (for
    blocking reads). cluster=True treats url as one node of a Valkey Cluster
    and returns a ClusterClient. ca_cert: a PEM file of the CA certificates
    that a rediss:// server's certificate is checked against, instead of the
    system's.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    allowed = CLUSTER_SCHEMES if cluster else SUPPORTED_SCHEMES
    if scheme not in allowed:
        kind = "Valkey Cluster URL" if cluster else "Valkey URL"
        raise ConfigurationError(
            f"unsupported {kind} {redact(url)!r}: the scheme must be one of "
            f"{', '.join(s + '://' for s in allowed)}"
        )
    if scheme == MEMORY_SCHEME:
        return memory_backend(url)

    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": timeout,
        "socket_timeout": read_timeout if read_timeout is not None else timeout,
        "retry": Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            _RETRY_ATTEMPTS,
            supported_errors=(RedisConnectionError,),
        ),
        "health_check_interval": 30,
    }
    if ca_cert:
        options["ssl_ca_certs"] = ca_cert
    if cluster:
        # Without full coverage the client keeps serving the other slots while
        # one has no primary, between a primary's failure and its replica's promotion.
        # NOTE: RedisCluster keeps its own connections per node and raises
        # MaxConnectionsError at its cap (100 by default in redis-py 8.2) instead of
        # waiting. Generate would take that for an outage and admit calls without a
        # limit, so the cap is set far above any number of calls in flight.
        first, *others = url.split(",")
        return ClusterClient.from_url(
            first,
            startup_nodes=[_cluster_node(other) for other in others],
            require_full_coverage=False,
            max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE,
            **options,
        )
    pool = redis_asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, **options
    )
    return redis_asyncio.Redis.from_pool(pool)


def _cluster_node(address: str) -> ClusterNode:
    """Return the startup node of one more cluster address: HOST:PORT or a URL."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"redis://{address}")
    if not parts.hostname:
        raise ConfigurationError(f"invalid Valkey Cluster node {address!r}: expected HOST:PORT")
    return ClusterNode(parts.hostname, parts.port or 6379)


async def ping(redis: Any) -> None:
    """Send PING to Valkey, or to every primary of a cluster; raise on failure."""
    if isinstance(redis, RedisCluster):
        await redis.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await redis.ping()


_memory_servers: dict[str, Any] = {}


def memory_backend(url: str) -> Any:
    """Return a fakeredis client; clients of the same memory:// URL share data."""
    import fakeredis

    server = _memory_servers.setdefault(url, fakeredis.FakeServer())
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)


def is_memory(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == MEMORY_SCHEME
