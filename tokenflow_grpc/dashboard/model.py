"""The dashboard's state and its text, kept apart from drawing: the latest
GetStats figures, the requests-per-minute trend, the activity feed and the
last Simulate burst. The terminal UI and the plain snapshot both print the
text made here."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from tokenflow_grpc.activity import parse_stream_id
from tokenflow_grpc.v1 import tokenflow_pb2 as pb

DEFAULT_INTERVAL_SECONDS = 2.0
DEFAULT_SIMULATE_COUNT = 50
# Printed in place of a figure the dashboard does not have.
UNKNOWN = "-"
# Requests-per-minute samples in the trend: two minutes at the default interval.
TREND_SAMPLES = 60
FEED_EVENTS = 50
# Width of the client column in an activity line. Simulated client names are
# 13 characters long and IPv4 addresses at most 15.
CLIENT_WIDTH = 15

EVENT_LABELS = {
    pb.ACTIVITY_TYPE_REQUEST: "request",
    pb.ACTIVITY_TYPE_CACHE_HIT: "hit",
    pb.ACTIVITY_TYPE_CACHE_MISS: "miss",
    pb.ACTIVITY_TYPE_RATE_LIMITED: "blocked",
}


@dataclass(frozen=True)
class DashboardOptions:
    """The dashboard's target, the deadline of each call and the refresh interval, in
    seconds, the number of requests in a Simulate burst, and the keyword arguments
    (TLS credentials, API key) of each AsyncTokenFlowClient it opens."""

    target: str
    timeout: float
    interval: float = DEFAULT_INTERVAL_SECONDS
    simulate_count: int = DEFAULT_SIMULATE_COUNT
    client_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tile:
    """A figure's widget id and its label."""

    key: str
    label: str


TILES = (
    Tile("requests-per-minute", "Requests / min"),
    Tile("blocked-last-minute", "Blocked, last min"),
    Tile("blocked-total", "Blocked, total"),
    Tile("cache-hits", "Cache hits"),
    Tile("cache-misses", "Cache misses"),
    Tile("hit-ratio", "Hit ratio"),
    Tile("cached-keys", "Cached keys"),
    Tile("total-keys", "Total keys"),
)


class ConnectionState(enum.Enum):
    """Whether the latest GetStats call returned figures."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class ActivityFeed:
    """The latest activity events, newest first, each event id once."""

    def __init__(self, max_events: int = FEED_EVENTS) -> None:
        self.max_events = max_events
        # Events the server reported as missed: this watcher fell behind, or
        # they were trimmed from the stream before they were read.
        self.dropped = 0
        self._events: dict[str, pb.ActivityEvent] = {}

    def add(self, events: Iterable[pb.ActivityEvent]) -> None:
        """Add the events not in the feed yet, then keep the newest max_events."""
        for event in events:
            self._events.setdefault(event.id, event)
        if len(self._events) > self.max_events:
            kept = self.newest_first()[: self.max_events]
            self._events = {event.id: event for event in kept}

    def newest_first(self) -> list[pb.ActivityEvent]:
        return sorted(self._events.values(), key=_event_order, reverse=True)

    @property
    def newest_id(self) -> str:
        """The id of the newest event, or "" while the feed is empty."""
        if not self._events:
            return ""
        return max(self._events.values(), key=_event_order).id


def _event_order(event: pb.ActivityEvent) -> tuple[int, int]:
    try:
        return parse_stream_id(event.id)
    except ValueError:
        return (0, 0)  # The server sends stream ids only, so anything else sorts oldest.


class DashboardModel:
    """The dashboard's state, changed by the GetStats poller, the activity
    watcher and Simulate bursts, and read by the views."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.state = ConnectionState.CONNECTING
        # Why the latest GetStats returned no figures, or "" while connected.
        self.problem = ""
        # The latest figures; None unless the latest GetStats call returned them.
        self.stats: pb.GetStatsResponse | None = None
        self.trend: deque[int] = deque(maxlen=TREND_SAMPLES)
        self.feed = ActivityFeed()
        # Why the latest WatchActivity stream failed, or "" once events flow again.
        self.watch_problem = ""
        self.simulating = False
        self.simulate_summary: pb.SimulateSummary | None = None
        self.simulate_problem = ""

    def record_stats(self, stats: pb.GetStatsResponse) -> None:
        """Keep a GetStats response's figures, or mark Valkey unreachable when it has none.

        While the feed is empty, GetStats's events fill it. After that only
        WatchActivity adds events, so a stalled stream shows as a stale feed.
        """
        if not stats.connected:
            self.record_failure("the server cannot reach Valkey (GetStats connected=false)")
            return
        self.state = ConnectionState.CONNECTED
        self.problem = ""
        self.stats = stats
        self.trend.append(stats.rate_limit.requests_per_minute)
        if not self.feed.newest_id:
            self.feed.add(stats.activity)

    def record_failure(self, problem: str) -> None:
        """Drop the figures: the dashboard shows none that the server did not just send."""
        self.state = ConnectionState.DISCONNECTED
        self.problem = problem
        self.stats = None

    def record_watch(self, response: pb.WatchActivityResponse) -> None:
        self.watch_problem = ""
        self.feed.dropped += response.dropped
        if response.HasField("event"):
            self.feed.add([response.event])


def connection_text(model: DashboardModel) -> str:
    if model.state is ConnectionState.CONNECTED:
        return f"connected to {model.target}"
    if model.state is ConnectionState.CONNECTING:
        return f"connecting to {model.target}"
    return f"disconnected from {model.target}: {model.problem}"


def figures(stats: pb.GetStatsResponse | None) -> dict[str, str]:
    """Return each tile's text keyed by Tile.key, and UNKNOWN for every tile without stats."""
    if stats is None:
        return {tile.key: UNKNOWN for tile in TILES}
    rate_limit, cache = stats.rate_limit, stats.cache
    return {
        "requests-per-minute": str(rate_limit.requests_per_minute),
        "blocked-last-minute": str(rate_limit.blocked_requests),
        "blocked-total": str(rate_limit.blocked_total),
        "cache-hits": str(cache.hits),
        "cache-misses": str(cache.misses),
        "hit-ratio": f"{cache.hit_ratio:.1f} %",
        "cached-keys": str(cache.cached_keys),
        "total-keys": str(stats.total_keys),
    }


def consumer_lines(stats: pb.GetStatsResponse | None) -> list[str]:
    """Return one "client  requests" line per top consumer, most requests first."""
    if stats is None:
        return [UNKNOWN]
    if not stats.rate_limit.top_consumers:
        return ["no requests this minute or the previous one"]
    return [
        f"{consumer.client:<{CLIENT_WIDTH}} {consumer.requests:>8}"
        for consumer in stats.rate_limit.top_consumers
    ]


def distribution_lines(stats: pb.GetStatsResponse | None) -> list[str]:
    """Return one "kind  keys" line per kind of key, in name order."""
    if stats is None:
        return [UNKNOWN]
    return [f"{kind:<12} {count:>8}" for kind, count in sorted(stats.key_distribution.items())]


def event_line(event: pb.ActivityEvent) -> str:
    """Return an event as "HH:MM:SS type client model prompt", in local time."""
    moment = event.time.ToDatetime(tzinfo=UTC).astimezone()
    label = EVENT_LABELS.get(event.type, "unknown")
    prompt = " ".join(event.prompt.split())
    return f"{moment:%H:%M:%S} {label:<7} {event.client:<{CLIENT_WIDTH}} {event.model} {prompt}"


def feed_lines(events: Sequence[pb.ActivityEvent]) -> list[str]:
    if not events:
        return ["no events yet"]
    return [event_line(event) for event in events]


def trend_caption(model: DashboardModel, interval: float) -> str:
    trend = model.trend
    if not trend:
        caption = "Requests / min: no samples yet"
    else:
        caption = (
            f"Requests / min: {len(trend)} samples {interval:g} s apart, "
            f"min {min(trend)}, max {max(trend)}, latest {trend[-1]}"
        )
    if model.state is ConnectionState.DISCONNECTED:
        caption += ", paused while disconnected"
    return caption


def feed_title(model: DashboardModel) -> str:
    title = "Activity, newest first"
    if model.feed.dropped:
        title += f", {model.feed.dropped} events dropped by the server"
    if model.watch_problem:
        title += f", last stream failed: {model.watch_problem}"
    return title


def simulate_text(model: DashboardModel, count: int) -> str:
    if model.simulating:
        return f"Simulate: sending {count} requests..."
    if model.simulate_problem:
        return f"Simulate failed: {model.simulate_problem}"
    summary = model.simulate_summary
    if summary is None:
        return f"Press s to send a Simulate burst of {count} requests."
    return (
        f"Simulate: {summary.total} sent, {summary.successful} answered "
        f"({summary.cached} from the cache), {summary.blocked} blocked, {summary.failed} failed"
    )
