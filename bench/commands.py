"""Valkey commands and round trips per Generate call, read from Valkey's own counters.

Method, for N calls sent one at a time (one call in flight):

1. CONFIG RESETSTAT, so Valkey's counters start from zero.
2. The N calls, from a bench.load process.
3. INFO stats commandstats, in one command.

- Commands: the calls of every command in commandstats. Valkey counts the
  commands that a script runs there too, so a script counts once as EVALSHA
  and once for each command it runs.
- Scripts: the calls of EVALSHA and EVAL.
- Round trips: total_reads_processed, the number of reads Valkey made from
  client sockets. With one call in flight, each request that TokenFlow
  writes is read once, and a pipeline of several commands sent in one write
  is one read, so reads count the requests sent as separate writes.

The figures leave out what the benchmark and TokenFlow send outside
Generate: the INFO that reads the counters (one read, not in its own
commandstats), and the commands in NOT_GENERATE. TokenFlow's health check
sends a PING every second, and a new connection sends its handshake. Each
of these is one read and one command, and the report shows how many there
were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Commands that are not part of a Generate call: the benchmark's own, the
# health check's PING, and the handshake of a new connection.
NOT_GENERATE = frozenset(
    {"config|resetstat", "info", "ping", "hello", "client|setinfo", "select", "auth"}
)
SCRIPT_COMMANDS = frozenset({"evalsha", "eval"})
# The read of the INFO command that reads the counters, counted before it runs.
OWN_READS = 1


@dataclass(frozen=True)
class CommandCounts:
    """Valkey's counts for `calls` Generate calls of one kind (cache hit or miss)."""

    kind: str
    calls: int
    commands: int
    scripts: int
    round_trips: int
    background: int
    by_command: dict[str, int]

    def per_call(self, count: int) -> float:
        return count / self.calls if self.calls else 0.0


def reset(client: Any) -> None:
    """Zero Valkey's command and read counters (CONFIG RESETSTAT)."""
    client.config_resetstat()


def read_counts(client: Any, kind: str, calls: int) -> CommandCounts:
    """Read the counters after `calls` Generate calls and split off the background."""
    info = client.execute_command("INFO", "stats", "commandstats")
    by_command = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in info.items()
        if name.startswith("cmdstat_")
    }
    generate = {name: n for name, n in by_command.items() if name not in NOT_GENERATE}
    background = sum(
        n for name, n in by_command.items() if name in NOT_GENERATE and name != "config|resetstat"
    )
    # Every background command except INFO, which is not counted yet, took one read.
    reads = int(info["total_reads_processed"]) - OWN_READS - background
    return CommandCounts(
        kind=kind,
        calls=calls,
        commands=sum(generate.values()),
        scripts=sum(n for name, n in generate.items() if name in SCRIPT_COMMANDS),
        round_trips=reads,
        background=background,
        by_command=dict(sorted(generate.items())),
    )
