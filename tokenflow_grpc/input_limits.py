"""Limits on the input a server accepts, besides the checks of request fields
in validation: gRPC's message and metadata sizes, open WatchActivity streams
per client (per server process) and Simulate calls per client per minute (in
Valkey, so shared by every process). Each rejection names the limit and its
flag, except the size limits, whose messages gRPC writes itself."""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from tokenflow_grpc.errors import BackendUnavailableError, QuotaExceededError
from tokenflow_grpc.keys import KeySpace
from tokenflow_grpc.logs import RepeatLimiter
from tokenflow_grpc.lua import Script, read_script
from tokenflow_grpc.metrics import OPERATION_SIMULATE_LIMIT, WATCHERS
from tokenflow_grpc.settings import Settings

logger = logging.getLogger(__name__)

SIMULATE_WINDOW_MS = 60_000
# The rate-limit namespace of Simulate calls, apart from Generate's windows.
NAMESPACE_SIMULATE_CALLS = "simulate-calls"


def grpc_size_options(settings: Settings) -> list[tuple[str, int]]:
    """Return the gRPC server options for --max-message-bytes and --max-metadata-bytes.

    gRPC rejects a larger message with RESOURCE_EXHAUSTED. Metadata between
    max_metadata_size and absolute_max_metadata_size is rejected only some of
    the time, so both are set to the same size.
    """
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
    ]


class WatcherLimit:
    """Counts each client's open watchers in this process and rejects one too many."""

    def __init__(self, max_per_client: int) -> None:
        self.max_per_client = max_per_client
        self._open: Counter[str] = Counter()

    def open_count(self, client: str) -> int:
        return self._open[client]

    def acquire(self, client: str) -> None:
        """Count one more open watcher of client; release() must follow.

        Raises QuotaExceededError when the client already has max_per_client.
        """
        if self._open[client] >= self.max_per_client:
            raise QuotaExceededError(
                f"client {client} already has {self._open[client]} open WatchActivity "
                f"streams, the maximum per client (--max-watchers-per-client "
                f"{self.max_per_client}); close one first",
                subject=f"client:{client}",
                description=(
                    f"at most {self.max_per_client} open WatchActivity streams per client "
                    "(--max-watchers-per-client)"
                ),
            )
        self._open[client] += 1
        WATCHERS.inc()

    def release(self, client: str) -> None:
        WATCHERS.dec()
        self._open[client] -= 1
        if not self._open[client]:
            del self._open[client]


class SimulateLimit:
    """The sliding-window limit of --simulate-per-minute Simulate calls per client."""

    def __init__(
        self, redis: Any, keys: KeySpace, settings: Settings, now_ms: Callable[[], int]
    ) -> None:
        self.keys = keys
        self.settings = settings
        self.now_ms = now_ms
        self.script = Script(
            redis, read_script("limit_simulate.lua", with_common=False), OPERATION_SIMULATE_LIMIT
        )
        self._warnings = RepeatLimiter(logger)

    async def check(self, client: str) -> None:
        """Count one Simulate call of client, or raise QuotaExceededError when over the limit.

        When Valkey cannot be reached, the call passes under the allow policy
        and raises BackendUnavailableError under deny.
        """
        limit = self.settings.simulate_per_minute
        try:
            admitted, retry_after_ms = await self.script(
                keys=[self.keys.window(NAMESPACE_SIMULATE_CALLS, client)],
                args=[self.now_ms(), limit, SIMULATE_WINDOW_MS, uuid.uuid4().hex],
            )
        except (RedisError, OSError) as error:
            if self.settings.on_valkey_error == "deny":
                raise BackendUnavailableError(
                    "Valkey is unreachable and the server is set to fail closed "
                    "(--on-valkey-error deny); retry later"
                ) from error
            self._warnings.warning(
                "simulate", "Valkey unreachable, running Simulate without its limit: %s", error
            )
            return
        if int(admitted):
            return
        retry_seconds = math.ceil(int(retry_after_ms) / 1000)
        raise QuotaExceededError(
            f"Simulate limit of {limit} calls per minute exceeded for client {client} "
            f"(--simulate-per-minute); retry after {retry_seconds} s",
            subject=f"client:{client}",
            description=f"at most {limit} Simulate calls per minute (--simulate-per-minute)",
            retry_after_ms=int(retry_after_ms),
        )
