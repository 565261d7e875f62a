"""The activity stream: events in a capped Valkey stream, read by one reader
per process and fanned out to watchers through bounded queues.

Each event's stream id is "<ms>-<n>", where n numbers the stream's events
from 1 (record_event in scripts/_common.lua). A gap in the numbers is the
count of events trimmed from the stream before they were read: by a watch
that resumes with a since_id older than every event kept, or by the reader
while it reconnects or falls behind. A watcher receives that count, plus the
events its full queue lost, as the `dropped` of its next event.

NOTE: when Valkey loses the stream's newest entries (a restart without
persistence, a failover that lost writes), the numbering goes on from the
newest entry left, so events lost across that point are not counted, or only
in part.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from tokenflow_grpc.errors import (
    BackendUnavailableError,
    FieldViolation,
    InvalidArgumentError,
    quoted,
)
from tokenflow_grpc.logs import RepeatLimiter
from tokenflow_grpc.metrics import EVENTS_DROPPED, OPERATION_STREAM_READ, valkey_timer
from tokenflow_grpc.tasks import stop_task
from tokenflow_grpc.valkey import ping

logger = logging.getLogger(__name__)

# Event types as stored in the stream's "type" field.
TYPE_REQUEST = "request"
TYPE_CACHE_HIT = "cache_hit"
TYPE_CACHE_MISS = "cache_miss"
TYPE_RATE_LIMITED = "rate_limited"
EVENT_TYPES = (TYPE_REQUEST, TYPE_CACHE_HIT, TYPE_CACHE_MISS, TYPE_RATE_LIMITED)

PROMPT_EXCERPT_CHARS = 50
STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
MAX_STREAM_ID_PART = 2**64 - 1

_READ_COUNT = 500
# How far ahead of the server's clock a since_id's time may be. Servers'
# clocks differ a little. A stream that lost its newest events (a failover,
# a restore) also leaves clients holding ids a little ahead of it, and such
# a watch waits until new events pass the id.
SINCE_ID_AHEAD_MS = 60_000
_RETRY_MIN_SECONDS = 0.05
_RETRY_MAX_SECONDS = 2.0


def parse_stream_id(text: str) -> tuple[int, int]:
    """Split a stream id "ms-seq" (or "ms") into numbers; raise ValueError when malformed."""
    if not STREAM_ID.fullmatch(text):
        raise ValueError(f"invalid stream id {quoted(text)}: expected MILLISECONDS-SEQUENCE")
    ms, _, sequence = text.partition("-")
    parts = int(ms), int(sequence or 0)
    if max(parts) > MAX_STREAM_ID_PART:
        raise ValueError(f"invalid stream id {quoted(text)}: each part must fit in 64 bits")
    return parts


def events_between(before: int, after: int) -> int:
    """Return how many events were numbered between the sequence numbers before
    and after; 0 when after is not greater, because the numbering started again."""
    return max(after - before - 1, 0)


@dataclass(frozen=True)
class ActivityEvent:
    id: str
    type: str
    client: str
    prompt: str
    model: str
    cached: bool
    blocked: bool

    @property
    def time_ms(self) -> int:
        return parse_stream_id(self.id)[0]

    @property
    def order(self) -> tuple[int, int]:
        return parse_stream_id(self.id)

    @property
    def sequence(self) -> int:
        """The event's number in the stream, counted from 1."""
        return parse_stream_id(self.id)[1]

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> ActivityEvent:
        return cls(
            id=entry_id,
            type=fields.get("type", ""),
            client=fields.get("client", ""),
            prompt=fields.get("prompt", ""),
            model=fields.get("model", ""),
            cached=fields.get("cached") == "1",
            blocked=fields.get("blocked") == "1",
        )


@dataclass(frozen=True)
class Replay:
    """The events after since_id that are still in the stream, oldest first.

    counted_from is the sequence number from which the watch counts missed
    events: that of the newest event at or before since_id that is still in
    the stream. Without one, every event between since_id and the first one
    replayed was trimmed, and counted_from is since_id's own.
    """

    since_id: str
    events: list[ActivityEvent]
    counted_from: int


@dataclass(frozen=True)
class Gap:
    """Events trimmed from the stream before the reader read them: those
    numbered after previous and before the entry at order."""

    previous: int
    order: tuple[int, int]


@dataclass(eq=False)
class Subscription:
    """One watcher's bounded queue and the events it lost.

    Until its watch starts (start_live), the reader cannot tell which events
    the watch's replay delivers, so it keeps the order of each event that a
    full queue lost, and the gaps, to count only those after the replay.
    """

    queue: asyncio.Queue[ActivityEvent | None]
    types: frozenset[str]
    # Events that a full queue lost, not yet reported to the watcher.
    dropped: int = 0
    gaps: collections.deque[Gap] = field(default_factory=collections.deque)
    # Set when the watch starts: it replayed every event up to this order.
    replayed_through: tuple[int, int] | None = None
    early_losses: list[tuple[int, int]] = field(default_factory=list)

    def offer(self, event: ActivityEvent, previous: int) -> None:
        """Queue event, the reader's next entry after the one numbered previous."""
        if self.replayed_through is not None and event.order <= self.replayed_through:
            return
        if events_between(previous, event.sequence):
            self.gaps.append(Gap(previous, event.order))
        if self.types and event.type not in self.types:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            if self.replayed_through is None:
                self.early_losses.append(event.order)
            else:
                self._lose(1)

    def start_live(self, replayed_through: tuple[int, int]) -> None:
        """Record that the watch replayed every event up to replayed_through,
        and count the events a full queue lost after it."""
        self.replayed_through = replayed_through
        self._lose(sum(order > replayed_through for order in self.early_losses))
        self.early_losses.clear()

    def take_trimmed(self, order: tuple[int, int], counted: int | None) -> int:
        """Return the number of events trimmed before the event at order, and
        forget their gaps. counted: the sequence number through which the
        watch has counted every event, or None when it has counted none."""
        trimmed = 0
        while self.gaps and self.gaps[0].order <= order:
            gap = self.gaps.popleft()
            if self.replayed_through is not None and gap.order <= self.replayed_through:
                continue
            sequence = gap.order[1]
            previous = gap.previous
            # A counted at or after the gap belongs to a numbering that started again.
            if counted is not None and counted < sequence:
                previous = max(previous, counted)
            trimmed += events_between(previous, sequence)
        return trimmed

    def end(self) -> None:
        """Make the watcher's stream finish after the events already queued."""
        if self.queue.full():
            self.queue.get_nowait()
            self._lose(1)
        self.queue.put_nowait(None)

    def _lose(self, count: int) -> None:
        self.dropped += count
        EVENTS_DROPPED.inc(count)


@dataclass
class _Reader:
    task: asyncio.Task[None]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Checked on every pass of the loop, so that a reader whose cancellation
    # was lost still ends within one blocking read.
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True
        self.task.cancel()


class ActivityHub:
    """Fans the activity stream out to this process's watchers.

    One reader task runs while at least one watcher is subscribed, so any
    number of watchers cost one Valkey connection. A watcher whose queue is
    full loses the event and receives the number it lost with its next event,
    together with the events trimmed before the reader could read them.
    """

    def __init__(
        self,
        redis: Any,
        stream_key: str,
        queue_size: int,
        block_ms: int | None = 1000,
        poll_seconds: float = 0.05,
    ) -> None:
        """block_ms: XREAD BLOCK time; None polls every poll_seconds instead
        (for backends without blocking reads)."""
        self.redis = redis
        self._stream_key = stream_key
        self._queue_size = queue_size
        self._block_ms = block_ms
        self._poll_seconds = poll_seconds
        # A stopped reader ends within one blocking read, or one retry wait.
        self._stop_seconds = (block_ms or 0) / 1000 + _RETRY_MAX_SECONDS + 1.0
        self._subscribers: set[Subscription] = set()
        self._reader: _Reader | None = None
        self._warnings = RepeatLimiter(logger)

    @property
    def watcher_count(self) -> int:
        return len(self._subscribers)

    @property
    def reader_running(self) -> bool:
        return self._reader is not None and not self._reader.task.done()

    async def recent(self, count: int) -> list[ActivityEvent]:
        """Return the latest count events, newest first."""
        entries = await self.redis.xrevrange(self._stream_key, count=count)
        return [ActivityEvent.from_entry(entry_id, fields) for entry_id, fields in entries]

    async def subscribe(self, types: Collection[str] = ()) -> Subscription:
        """Register a watcher; events added after this returns reach its queue."""
        subscription = Subscription(asyncio.Queue(self._queue_size), frozenset(types))
        self._subscribers.add(subscription)
        reader = self._ensure_reader()
        try:
            await reader.ready.wait()
        except BaseException:
            # Cancelled while Valkey is unreachable: leave no watcher behind.
            self.unsubscribe(subscription)
            raise
        return subscription

    @contextlib.asynccontextmanager
    async def subscription(self, types: Collection[str] = ()) -> AsyncIterator[Subscription]:
        """Subscribe for the duration of a with-block."""
        subscription = await self.subscribe(types)
        try:
            yield subscription
        finally:
            self.unsubscribe(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a watcher; the reader stops with the last one."""
        self._subscribers.discard(subscription)
        if not self._subscribers and self._reader is not None:
            self._reader.stop()
            self._reader = None

    async def check_readable(self, since_id: str) -> None:
        """Raise BackendUnavailableError when the stream cannot be read now.

        A watch without since_id waits for Valkey to return. One with it must
        read its replay first, so it fails at once, to be retried, instead of
        waiting in the subscription for as long as the outage lasts.
        """
        try:
            await ping(self.redis)
        except (RedisError, OSError) as error:
            raise _replay_unavailable(since_id, error) from error

    async def replay(self, since_id: str, now_ms: int) -> Replay:
        """Return the events after since_id that are still in the stream.

        Subscribe first, so that no event falls between these and the live
        ones. Raises InvalidArgumentError when since_id's time is more than
        SINCE_ID_AHEAD_MS after now_ms, so that no event would pass it for
        that long, and BackendUnavailableError when Valkey cannot be read.
        """
        after = parse_stream_id(since_id)
        ahead_ms = after[0] - now_ms
        if ahead_ms > SINCE_ID_AHEAD_MS:
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "since_id",
                        f"{quoted(since_id)} is {ahead_ms / 1000:.0f} s ahead of the server's "
                        "clock, and an event id holds the time its event was recorded",
                    )
                ]
            )
        try:
            # Read before the events, so that an event trimmed in between
            # shows as a gap in the numbers.
            anchor = await self.redis.xrevrange(
                self._stream_key, max=f"{after[0]}-{after[1]}", min="-", count=1
            )
            entries = await self.redis.xrange(self._stream_key, min=since_id, max="+")
        except (RedisError, OSError) as error:
            raise _replay_unavailable(since_id, error) from error
        events = (ActivityEvent.from_entry(entry_id, fields) for entry_id, fields in entries)
        counted_from = parse_stream_id(anchor[0][0])[1] if anchor else after[1]
        return Replay(since_id, [event for event in events if event.order > after], counted_from)

    async def watch(
        self, subscription: Subscription, replay: Replay | None = None
    ) -> AsyncIterator[tuple[ActivityEvent, int]]:
        """Yield (event, events missed before it) for a subscribed watcher:
        first the events of replay, then live events, each once and in stream order.

        The events missed are those the watcher's full queue lost, of its types
        only, and those trimmed from the stream before this watch or the reader
        read them, of every type, because a trimmed event's type is unknown.
        A watch without replay counts from the reader's position when it
        subscribed.
        """
        last = parse_stream_id(replay.since_id) if replay else (0, 0)
        replayed = replay.events if replay else []
        subscription.start_live(max(last, replayed[-1].order) if replayed else last)
        # The sequence number through which this watch has counted every event.
        counted = replay.counted_from if replay else None
        missed = 0
        for event in replayed:
            if event.order <= last:
                continue
            last = event.order
            if counted is not None:
                missed += events_between(counted, event.sequence)
            counted = event.sequence
            if subscription.types and event.type not in subscription.types:
                continue
            yield event, missed
            missed = 0

        while True:
            queued = await subscription.queue.get()
            if queued is None:
                return
            if queued.order <= last:
                continue
            last = queued.order
            missed += subscription.take_trimmed(queued.order, counted)
            counted = queued.sequence
            missed += subscription.dropped
            subscription.dropped = 0
            yield queued, missed
            missed = 0

    async def close(self) -> None:
        """End every watcher's stream and stop the reader."""
        for subscription in self._subscribers:
            subscription.end()
        self._subscribers.clear()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
            if not await stop_task(reader.task, self._stop_seconds):
                logger.warning("activity reader did not stop within %g s", self._stop_seconds)

    def _ensure_reader(self) -> _Reader:
        if self._reader is None or self._reader.task.done():
            ready = asyncio.Event()
            task = asyncio.create_task(self._read_loop(ready), name="tokenflow-activity-reader")
            self._reader = _Reader(task, ready)
        return self._reader

    def _stopped(self) -> bool:
        """Return True when the running reader task's reader was stopped."""
        current = asyncio.current_task()
        return self._reader is None or self._reader.task is not current or self._reader.stopped

    async def _read_loop(self, ready: asyncio.Event) -> None:
        last_id = await self._start_position()
        if last_id is None:
            return
        ready.set()
        delay = _RETRY_MIN_SECONDS
        while not self._stopped():
            try:
                with valkey_timer(OPERATION_STREAM_READ):
                    reply = await self._read_after(last_id)
            except (RedisError, OSError) as error:
                logger.warning("activity reader failed, retrying in %.2f s: %s", delay, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            if delay > _RETRY_MIN_SECONDS:
                logger.info("activity reader reconnected, resuming after %s", last_id)
            delay = _RETRY_MIN_SECONDS

            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    event = ActivityEvent.from_entry(entry_id, fields)
                    previous = parse_stream_id(last_id)[1]
                    self._log_gap(last_id, entry_id)
                    for subscription in list(self._subscribers):
                        subscription.offer(event, previous)
                    last_id = entry_id
            if not reply and self._block_ms is None:
                await asyncio.sleep(self._poll_seconds)

    def _log_gap(self, last_id: str, entry_id: str) -> None:
        """Log the events trimmed between two entries the reader read one after the other."""
        previous, sequence = parse_stream_id(last_id)[1], parse_stream_id(entry_id)[1]
        if sequence <= previous:
            self._warnings.warning(
                "numbering",
                "activity stream numbering went back from %s to %s, because Valkey lost "
                "its newest entries; events lost there are not counted in dropped",
                last_id,
                entry_id,
            )
        elif sequence > previous + 1:
            self._warnings.warning(
                "trimmed",
                "activity reader missed %d events trimmed from the stream between %s and %s; "
                "watchers receive the count in dropped",
                events_between(previous, sequence),
                last_id,
                entry_id,
            )

    async def _read_after(self, last_id: str) -> Any:
        if self._block_ms is None:
            return await self.redis.xread({self._stream_key: last_id}, count=_READ_COUNT)
        return await self.redis.xread(
            {self._stream_key: last_id}, count=_READ_COUNT, block=self._block_ms
        )

    async def _start_position(self) -> str | None:
        """Return the id of the newest entry, so reading starts with the next one;
        None when the reader was stopped first."""
        delay = _RETRY_MIN_SECONDS
        while not self._stopped():
            try:
                newest = await self.redis.xrevrange(self._stream_key, count=1)
                return newest[0][0] if newest else "0-0"
            except (RedisError, OSError) as error:
                logger.warning(
                    "activity reader cannot reach Valkey, retrying in %.2f s: %s", delay, error
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
        return None


def _replay_unavailable(since_id: str, error: Exception) -> BackendUnavailableError:
    """Return the error of a replay that Valkey could not serve."""
    return BackendUnavailableError(
        f"cannot read the activity stream after since_id {quoted(since_id)}: "
        f"Valkey is unreachable ({error}); retry with the same since_id"
    )
