"""Prometheus metrics of a TokenFlow server, served over HTTP with `--metrics-address`.

The metrics live in prometheus_client's default registry, so every module
updates them without plumbing. No label takes a client identity, a prompt or
any other value that a caller chooses: each label has a fixed, small set of
values.

With `serve --workers N` each worker is its own process. The parent points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before it starts the workers,
so prometheus_client stores each worker's values in files there, and the
parent's /metrics serves their sum (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from tokenflow_grpc.settings import parse_address

logger = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets in seconds, from a Valkey round trip on loopback (about 0.1 ms) to
# a blocking XREAD or a generator call of several seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# The names and labels of grpc_server_handled_total and
# grpc_server_handling_seconds follow go-grpc-prometheus, which most gRPC
# dashboards expect.
RPCS_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_DURATION = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC until its handler returned or failed, in seconds.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
LIMITER_DECISIONS = Counter(
    "tokenflow_limiter_decisions_total",
    "Rate-limit decisions of Generate and Simulate's requests, by decision.",
    ["decision"],
)
SHADOW_REJECTIONS = Counter(
    "tokenflow_shadow_rejections_total",
    "Generate calls that a shadow policy admitted but would have rejected, by policy and "
    "by the limit exceeded (requests or tokens).",
    ["policy", "reason"],
)
CACHE_HITS = Counter(
    "tokenflow_cache_hits_total",
    "Admitted requests answered from the cache, as the Valkey counters count them.",
)
CACHE_MISSES = Counter(
    "tokenflow_cache_misses_total",
    "Admitted requests answered by the generator (skip_cache included), as the Valkey "
    "counters count them.",
)
VALKEY_DURATION = Histogram(
    "tokenflow_valkey_command_duration_seconds",
    "Duration of Valkey commands, by operation, in seconds, failed commands included. "
    "stream_read includes the XREAD BLOCK wait of up to 1 s.",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
WATCHERS = Gauge(
    "tokenflow_watchers",
    "Open WatchActivity streams.",
    multiprocess_mode="livesum",
)
EVENTS_DROPPED = Counter(
    "tokenflow_events_dropped_total",
    "Activity events lost by watchers whose queue was full.",
)
VALKEY_UP = Gauge(
    "tokenflow_valkey_up",
    "1 when the last health check reached Valkey, else 0; with several workers, the "
    "lowest value among the running workers.",
    multiprocess_mode="livemin",
)

DECISION_ADMITTED = "admitted"
DECISION_REJECTED = "rejected"

# Values of the operation label of tokenflow_valkey_command_duration_seconds,
# besides the Lua scripts' names.
OPERATION_STATS = "stats"
OPERATION_PING = "ping"
OPERATION_STREAM_READ = "stream_read"
OPERATION_SIMULATE_LIMIT = "simulate_limit"


@contextlib.contextmanager
def valkey_timer(operation: str) -> Iterator[None]:
    """Record the time of the Valkey operation in the with-block, whether it fails or not."""
    start = time.perf_counter()
    try:
        yield
    finally:
        VALKEY_DURATION.labels(operation).observe(time.perf_counter() - start)


class MetricsServer:
    """The HTTP server of /metrics, in a thread of its own, so a busy event loop
    does not delay a scrape."""

    def __init__(self, address: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.address = address
        self.registry = registry
        self.port = 0
        self._server: WSGIServer | None = None

    def start(self) -> int:
        """Listen on HOST:PORT (port 0 picks a free one) and return the bound port."""
        host, port = parse_address(self.address, "--metrics-address")
        try:
            self._server, _thread = start_http_server(port, host.strip("[]"), self.registry)
        except OSError as error:
            raise OSError(
                f"cannot serve metrics on {self.address}: {error}; pass another --metrics-address"
            ) from error
        self.port = self._server.server_port
        logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class MultiprocessMetrics:
    """The metrics directory of `serve --workers N` and the parent's view of it.

    start() must run before the workers start: each worker inherits
    PROMETHEUS_MULTIPROC_DIR and writes its values to files there.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.directory = ""
        self.server: MetricsServer | None = None

    def start(self) -> int:
        """Create the directory, export it to the workers, serve the sum; return the port."""
        self.directory = tempfile.mkdtemp(prefix="tokenflow-metrics-")
        os.environ[MULTIPROC_DIR_ENV] = self.directory
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        self.server = MetricsServer(self.address, registry)
        try:
            return self.server.start()
        except OSError:
            self.stop()
            raise

    def worker_exited(self, pid: int) -> None:
        """Drop the gauges of a worker that exited; its counters stay in the sum."""
        if self.directory:
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.directory:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""
