"""The live terminal dashboard, built on textual: figure tiles, the
requests-per-minute trend, top consumers, keys by kind and the activity
feed, refreshed every interval. `s` sends a Simulate burst and `q` quits."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal
from textual.widgets import Footer, Header, Sparkline, Static
from textual.worker import Worker

from tokenflow_grpc.dashboard.model import (
    TILES,
    UNKNOWN,
    ConnectionState,
    DashboardModel,
    DashboardOptions,
    Tile,
    connection_text,
    consumer_lines,
    distribution_lines,
    feed_lines,
    feed_title,
    figures,
    simulate_text,
    trend_caption,
)
from tokenflow_grpc.dashboard.sources import Connection, follow_activity, poll_stats, run_simulate

CONNECTION_TILE = Tile("connection", "Connection")


class TileView(Static):
    """One figure, with its label in the top border."""

    DEFAULT_CSS = """
    TileView {
        height: 3;
        border: round $primary;
        content-align: center middle;
        text-style: bold;
    }
    TileView.disconnected {
        border: round $error;
        color: $error;
    }
    """

    def __init__(self, tile: Tile) -> None:
        super().__init__(UNKNOWN, id=tile.key, markup=False)
        self.border_title = tile.label


class DashboardApp(App[None]):
    """The live dashboard of one TokenFlow server."""

    TITLE = "TokenFlow dashboard"
    CSS = """
    #tiles {
        layout: grid;
        grid-size: 5;
        height: auto;
    }
    #connection {
        column-span: 2;
    }
    #status {
        height: auto;
        max-height: 3;
        padding: 0 1;
    }
    #simulate {
        height: 1;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    #trend {
        height: 4;
        border: round $secondary;
    }
    #panels {
        height: 1fr;
    }
    .panel {
        height: 1fr;
        border: round $secondary;
        text-wrap: nowrap;
        text-overflow: ellipsis;
        overflow: hidden;
    }
    #top-consumers {
        width: 27;
    }
    #key-distribution {
        width: 24;
    }
    #activity {
        width: 1fr;
    }
    """
    BINDINGS = [
        Binding("s", "simulate", "Simulate burst"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, options: DashboardOptions) -> None:
        super().__init__()
        self.options = options
        self.model = DashboardModel(options.target)
        # Opened in on_mount: a grpc.aio channel belongs to the event loop
        # it was created on, and App.run() starts a new loop.
        self.connection: Connection | None = None
        self._simulate_worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Container(id="tiles"):
            for tile in TILES[:3]:
                yield TileView(tile)
            yield TileView(CONNECTION_TILE)
            for tile in TILES[3:]:
                yield TileView(tile)
        yield Static(id="status", markup=False)
        yield Sparkline([], id="trend")
        yield Static(id="simulate", markup=False)
        with Horizontal(id="panels"):
            yield _panel("top-consumers", "Top consumers")
            yield _panel("key-distribution", "Keys by kind")
            yield _panel("activity", "Activity, newest first")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.options.target
        self.redraw()
        self.connection = Connection(
            self.options.target, self.options.timeout, self.options.client_options
        )
        interval = self.options.interval
        self.run_worker(
            poll_stats(self.connection, self.model, interval, self.redraw), name="poll-stats"
        )
        self.run_worker(
            follow_activity(self.connection, self.model, interval, self.redraw),
            name="follow-activity",
        )

    async def on_unmount(self) -> None:
        # Closing the connection cancels the watch call, and a watch worker not
        # cancelled itself takes that for a reconnect and redraws widgets that
        # the shutdown has already removed. So the workers stop first.
        self.workers.cancel_all()
        if self.connection is not None:
            await self.connection.close()

    def action_simulate(self) -> None:
        """Send a Simulate burst, unless the previous one is still running."""
        if self._simulate_worker is not None and not self._simulate_worker.is_finished:
            self.notify("A Simulate burst is already running.")
            return
        burst = run_simulate(
            self.options.target,
            self.options.timeout,
            self.options.simulate_count,
            self.model,
            self.redraw,
            self.options.client_options,
        )
        self._simulate_worker = self.run_worker(burst, name="simulate")

    def redraw(self) -> None:
        """Show the model's current state in every widget."""
        stats = self.model.stats
        disconnected = self.model.state is ConnectionState.DISCONNECTED
        values = figures(stats)
        for tile in TILES:
            self._static(tile.key).update(values[tile.key])
        connection = self._static(CONNECTION_TILE.key)
        connection.update(self.model.state.value)
        connection.set_class(disconnected, "disconnected")
        self._static("status").update(connection_text(self.model))

        trend = self.query_one("#trend", Sparkline)
        trend.data = list(self.model.trend)
        trend.border_title = trend_caption(self.model, self.options.interval)
        self._static("simulate").update(simulate_text(self.model, self.options.simulate_count))

        self._static("top-consumers").update("\n".join(consumer_lines(stats)))
        self._static("key-distribution").update("\n".join(distribution_lines(stats)))
        self._redraw_feed()

    def _redraw_feed(self) -> None:
        activity = self._static("activity")
        activity.border_title = feed_title(self.model)
        activity.update("\n".join(feed_lines(self.model.feed.newest_first())))

    def _static(self, widget_id: str) -> Static:
        return self.query_one(f"#{widget_id}", Static)


def _panel(widget_id: str, title: str) -> Static:
    panel = Static(id=widget_id, classes="panel", markup=False)
    panel.border_title = title
    return panel


def run_app(options: DashboardOptions) -> int:
    """Run the dashboard until the user quits, and return the app's exit status."""
    app = DashboardApp(options)
    app.run()
    return app.return_code or 0
