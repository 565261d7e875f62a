"""The worker processes of `tokenflow serve --workers N`.

The parent process runs a WorkerPool: it reserves the gRPC port, starts N
workers with `python -m tokenflow_grpc.workers`, restarts each one that
exits, and stops them all together with SIGTERM. Each worker is a whole
TokenFlow server with its own event loop, Valkey connection pool and
activity reader, bound to the shared port with SO_REUSEPORT, so the kernel
spreads new connections over the workers. All limits and counters live in
the one Valkey that every worker uses, so they stay exact across processes.

A worker reads its settings as one JSON line on stdin and keeps stdin open.
End of file there, or the SIGTERM that Linux sends when the parent dies
(PR_SET_PDEATHSIG), means that the parent is gone, so the worker drains and
stops as on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable

from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.logformat import configure_logging
from tokenflow_grpc.metrics import MultiprocessMetrics
from tokenflow_grpc.processes import child_preexec, relay_output
from tokenflow_grpc.settings import Settings, parse_address, settings_from, settings_values
from tokenflow_grpc.signals import SHUTDOWN_GRACE_SECONDS, SignalCounter, handle_reload

logger = logging.getLogger(__name__)

READY_LINE = re.compile(r"^TokenFlow worker (\d+) is serving gRPC on port (\d+)$")
START_TIMEOUT_SECONDS = 30.0
# A worker drains its calls for up to SHUTDOWN_GRACE_SECONDS after SIGTERM,
# and the parent kills a worker still running this long after that.
STOP_MARGIN_SECONDS = 5.0
# Restart delays double after each exit, up to the maximum, so a worker that
# fails at start does not spin. A worker that ran STABLE_SECONDS before it
# exited starts again from the first delay.
FIRST_RESTART_DELAY_SECONDS = 0.5
MAX_RESTART_DELAY_SECONDS = 30.0
STABLE_SECONDS = 30.0


def reserve_port(grpc_address: str) -> socket.socket:
    """Bind a socket with SO_REUSEPORT to grpc_address and return it, not listening.

    Port 0 becomes a free port that the kernel picks. The workers bind the
    same port next to this socket, which keeps the port reserved while they
    restart.
    It never listens, so it receives no connections. Raises OSError when
    another process listens on the port, a TokenFlow worker included.
    """
    host, port = parse_address(grpc_address, "--grpc-address")
    family, kind, protocol, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    # This bind lacks SO_REUSEPORT, so it fails on a port where any socket
    # listens. SO_REUSEADDR lets it pass connections left in TIME_WAIT.
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]

    reserved = socket.socket(family, kind, protocol)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((address[0], port, *address[2:]))
    except OSError:
        reserved.close()
        raise
    return reserved


def describe_exit(returncode: int) -> str:
    """Return how a child ended, from an asyncio returncode (negative: killed by that signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class WorkerProcess:
    """One worker: starts it, restarts it whenever it exits, and stops it."""

    def __init__(
        self,
        index: int,
        settings_line: bytes,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """index is 1 to N and stays the same across restarts. settings_line is
        the JSON line sent on stdin. on_exit is called with the pid of each
        process of this worker that exits while supervised."""
        self.index = index
        self.settings_line = settings_line
        self.on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._last_error_line = ""
        self._supervisor: asyncio.Task[None] | None = None
        self._relays: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        """Start the worker and return once it serves, then restart it whenever it exits.

        Raises OSError with the worker's last error line when it exits at start.
        """
        await self._spawn()
        logger.info("worker %d started as pid %d", self.index, self.pid)
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"tokenflow-worker-{self.index}"
        )

    async def stop_supervising(self) -> None:
        """Stop restarting the worker. A restart in progress is stopped by send_signal."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    def send_signal(self, signum: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def wait_stopped(self, timeout: float) -> None:
        """Wait up to timeout seconds for the worker to exit, then kill it."""
        process = self.process
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            logger.warning(
                "worker %d (pid %d) did not stop in %g s; killing it",
                self.index,
                process.pid,
                timeout,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        for relay in self._relays:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay, 1.0)

    async def _spawn(self) -> None:
        """Start a worker process and return once it reports that it serves."""
        self._last_error_line = ""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokenflow_grpc.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own session keeps a Ctrl-C in the terminal away from the
            # worker, so that the parent decides when workers stop.
            start_new_session=True,
            preexec_fn=child_preexec(),
        )
        self.process = process
        self._started_at = time.monotonic()
        self._relays = [
            asyncio.create_task(
                self._relay_errors(process.stderr), name=f"tokenflow-worker-{self.index}-stderr"
            )
        ]
        assert process.stdin is not None
        # The parent never writes again, but keeps stdin open until it exits.
        process.stdin.write(self.settings_line)
        try:
            await process.stdin.drain()
            await asyncio.wait_for(self._read_ready(process), START_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise OSError(
                f"worker {self.index} start timed out after {START_TIMEOUT_SECONDS:g} s"
            ) from None
        except ConnectionError:
            # The worker exited before it read its settings.
            await self._raise_exit(process)
        self._relays.append(
            asyncio.create_task(
                relay_output(process.stdout), name=f"tokenflow-worker-{self.index}-stdout"
            )
        )

    async def _read_ready(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            if READY_LINE.match(line.decode(errors="replace").strip()):
                return
        await self._raise_exit(process)

    async def _raise_exit(self, process: asyncio.subprocess.Process) -> None:
        returncode = await process.wait()
        # The stderr relay ends at end of file, after the worker's last line.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._relays), 5.0)
        reason = f": {self._last_error_line}" if self._last_error_line else ""
        raise OSError(f"worker {self.index} {describe_exit(returncode)} at start{reason}")

    async def _relay_errors(self, stream: asyncio.StreamReader | None) -> None:
        """Copy the worker's stderr to the parent's, keeping the last line for errors."""
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode(errors="replace")
            if text.strip():
                self._last_error_line = text.strip()
            sys.stderr.write(text)

    async def _supervise(self) -> None:
        delay = FIRST_RESTART_DELAY_SECONDS
        while True:
            assert self.process is not None
            returncode = await self.process.wait()
            if self.on_exit is not None:
                self.on_exit(self.process.pid)
            ran = time.monotonic() - self._started_at
            if ran >= STABLE_SECONDS:
                delay = FIRST_RESTART_DELAY_SECONDS
            logger.warning(
                "worker %d (pid %d) %s after %.1f s; restarting it in %g s",
                self.index,
                self.process.pid,
                describe_exit(returncode),
                ran,
                delay,
            )
            while True:
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RESTART_DELAY_SECONDS)
                try:
                    await self._spawn()
                    break
                except OSError as error:
                    logger.error(
                        "worker %d restart failed: %s; trying again in %g s",
                        self.index,
                        error,
                        delay,
                    )
            self.restarts += 1
            logger.warning("worker %d restarted as pid %d", self.index, self.process.pid)


class WorkerPool:
    """The workers of `tokenflow serve --workers N` and the gRPC port they share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self.workers: list[WorkerProcess] = []
        self._reserved: socket.socket | None = None
        self._stopped = False
        # The parent's /metrics, with the sum of the workers' figures.
        self.metrics: MultiprocessMetrics | None = None

    async def start(self) -> int:
        """Reserve the port, start every worker, and return the port once all serve.

        Raises OSError when the port is taken or a worker fails at start; the
        workers already started are stopped first.
        """
        try:
            self._reserved = reserve_port(self.settings.grpc_address)
        except OSError as error:
            raise OSError(
                f"cannot listen on the gRPC address {self.settings.grpc_address}: {error}; "
                "pass another --grpc-address"
            ) from error
        self.port = self._reserved.getsockname()[1]
        host = self.settings.grpc_address.rsplit(":", 1)[0]
        worker_settings = dataclasses.replace(
            self.settings,
            grpc_address=f"{host}:{self.port}",
            workers=1,
            no_gateway=True,
            metrics_address="",
        )
        if self.settings.metrics_address:
            # Before the workers start, so that they inherit its directory.
            self.metrics = MultiprocessMetrics(self.settings.metrics_address)
            self.metrics.start()
        values = settings_values(worker_settings)
        self.workers = [
            WorkerProcess(index, _settings_line(index, values), self._worker_exited)
            for index in range(1, self.settings.workers + 1)
        ]

        results = await asyncio.gather(
            *(worker.start() for worker in self.workers), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            await self.stop(0.0)
            raise failures[0]
        return self.port

    def send_signal(self, signum: int) -> None:
        for worker in self.workers:
            worker.send_signal(signum)

    def _worker_exited(self, pid: int) -> None:
        if self.metrics is not None:
            self.metrics.worker_exited(pid)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop every worker at once with SIGTERM, and kill those still running
        after grace plus STOP_MARGIN_SECONDS. Then release the port."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(worker.stop_supervising() for worker in self.workers))
        self.send_signal(signal.SIGTERM)
        await asyncio.gather(
            *(worker.wait_stopped(grace + STOP_MARGIN_SECONDS) for worker in self.workers)
        )
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self.metrics is not None:
            self.metrics.stop()
        if self.workers:
            logger.info("all %d workers stopped", len(self.workers))


def _settings_line(index: int, values: dict[str, str]) -> bytes:
    return (json.dumps({"index": index, "settings": values}) + "\n").encode()


async def run_worker(settings: Settings, index: int) -> None:
    """Serve on the shared port until SIGTERM, SIGINT or the parent's exit, then drain and stop."""
    from tokenflow_grpc.server import TokenFlowServer

    signals = SignalCounter("draining calls; send it again to stop at once")
    server = TokenFlowServer(settings, reuse_port=True, worker_id=str(os.getpid()))
    handle_reload(server.reload_policies)
    waits: list[asyncio.Task[object]] = []
    grace = 0.0  # Until the server runs, stopping needs no drain.
    try:
        port = await server.start()
        print(f"TokenFlow worker {index} is serving gRPC on port {port}", flush=True)
        waits = [
            asyncio.create_task(signals.first.wait(), name="tokenflow-signal"),
            asyncio.create_task(_wait_for_parent_exit(), name="tokenflow-parent"),
        ]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if waits[1] in done:
            logger.warning("the parent process exited: draining calls")
        grace = SHUTDOWN_GRACE_SECONDS
        signals.on_second(lambda: asyncio.ensure_future(server.server.stop(0)))
    finally:
        for wait in waits:
            wait.cancel()
        await server.stop(grace)


async def _wait_for_parent_exit() -> None:
    """Return at end of file on stdin, which comes when the parent exits, however it ends."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


def _read_settings() -> tuple[int, Settings]:
    """Read the worker's index and settings from the JSON line on stdin."""
    line = sys.stdin.readline()
    if not line:
        raise ConfigurationError(
            "no settings on stdin; workers are started by `tokenflow serve --workers N`"
        )
    try:
        message = json.loads(line)
        index = int(message["index"])
        values = message["settings"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(f"invalid settings line on stdin: {error}") from error
    settings: Settings = settings_from(argparse.Namespace(**values), environ={})
    return index, settings


def main() -> int:
    """Run one worker with the settings its parent sends on stdin."""
    # A SIGHUP that the parent forwards while this worker starts would end
    # it; run_worker handles SIGHUP once its policies are loaded.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Errors go to stderr as bare messages: the parent relays them and repeats
    # the last one in its own message when a worker fails at start.
    try:
        index, settings = _read_settings()
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, worker=index)
    try:
        asyncio.run(run_worker(settings, index))
    except (ConfigurationError, OSError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
