"""The plain-text snapshot that `tokenflow dashboard` prints when stdout is
not a terminal: the live view's figures from one GetStats call, with no
escape codes."""

from __future__ import annotations

from datetime import UTC

from tokenflow_grpc.dashboard.model import (
    TILES,
    UNKNOWN,
    ConnectionState,
    DashboardModel,
    DashboardOptions,
    connection_text,
    consumer_lines,
    distribution_lines,
    feed_lines,
    figures,
)
from tokenflow_grpc.dashboard.sources import Connection, refresh_stats

SNAPSHOT_EVENTS = 10
LABEL_WIDTH = 20


async def take_snapshot(options: DashboardOptions) -> DashboardModel:
    """Call GetStats once and return the model holding its figures or its failure."""
    model = DashboardModel(options.target)
    connection = Connection(options.target, options.timeout, options.client_options)
    try:
        await refresh_stats(connection, model)
    finally:
        await connection.close()
    return model


def render_snapshot(model: DashboardModel) -> str:
    """Return the snapshot as lines of plain text, ending with a newline."""
    stats = model.stats
    lines = [f"TokenFlow dashboard: {connection_text(model)}"]
    if stats is not None:
        taken = stats.timestamp.ToDatetime(tzinfo=UTC).astimezone()
        lines.append(f"Figures as of {taken:%Y-%m-%d %H:%M:%S %z}")
    lines.append("")

    values = figures(stats)
    lines += [f"{tile.label:<{LABEL_WIDTH}} {values[tile.key]}" for tile in TILES]

    lines += ["", "Top consumers"] + _indent(consumer_lines(stats))
    lines += ["", "Keys by kind"] + _indent(distribution_lines(stats))
    if stats is None:
        events = [UNKNOWN]
    else:
        events = feed_lines(model.feed.newest_first()[:SNAPSHOT_EVENTS])
    lines += ["", "Latest activity, newest first"] + _indent(events)
    return "\n".join(lines) + "\n"


def _indent(lines: list[str]) -> list[str]:
    return [f"  {line}" for line in lines]


async def print_snapshot(options: DashboardOptions) -> int:
    """Print one snapshot and return the exit status: 0 with figures, 1 when the server or
    Valkey was unreachable."""
    model = await take_snapshot(options)
    print(render_snapshot(model), end="", flush=True)
    return 0 if model.state is ConnectionState.CONNECTED else 1
