"""The gateway as a child process of `tokenflow serve`.

Running the gateway in its own process lets it use another core than the
gRPC server, which roughly halves its cost per request on a busy server, and
keeps it a plain gRPC client of the server. The child is restarted when it
exits on its own, and stopped with SIGTERM when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys

from tokenflow_grpc.processes import child_preexec, relay_output

logger = logging.getLogger(__name__)

READY_LINE = re.compile(r"serving HTTPS? on https?://\S+:(\d+)")
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 15.0
RESTART_DELAY_SECONDS = 1.0


class GatewayProcess:
    """Runs and supervises `tokenflow gateway` for one server."""

    def __init__(self, arguments: list[str]) -> None:
        """arguments: the options of `tokenflow gateway`, --target included."""
        self.arguments = arguments
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._relays: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Start the child and return its HTTP port once it listens.

        Raises OSError with the child's message when it exits at start.
        """
        self.port = await self._spawn()
        # A restart must come back on the same port, also when port 0 was asked for.
        self.arguments = [
            re.sub(r":0$", f":{self.port}", argument) if previous == "--http-address" else argument
            for previous, argument in zip(["", *self.arguments[:-1]], self.arguments, strict=True)
        ]
        self._supervisor = asyncio.create_task(self._supervise(), name="tokenflow-gateway")
        return self.port

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            logger.warning("gateway did not stop in %g s; killing it", STOP_TIMEOUT_SECONDS)
            process.kill()
            await process.wait()

    async def _spawn(self) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokenflow_grpc.cli",
            "gateway",
            *self.arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_gateway_environment(),
            start_new_session=True,
            preexec_fn=child_preexec(),
        )
        self._process = process
        try:
            port = await asyncio.wait_for(self._read_port(process), START_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise OSError(f"the gateway did not start within {START_TIMEOUT_SECONDS:g} s") from None
        self._relays = [
            asyncio.create_task(relay_output(process.stdout), name="tokenflow-gateway-stdout"),
            asyncio.create_task(relay_output(process.stderr), name="tokenflow-gateway-stderr"),
        ]
        return port

    async def _read_port(self, process: asyncio.subprocess.Process) -> int:
        assert process.stdout is not None and process.stderr is not None
        while line := await process.stdout.readline():
            found = READY_LINE.search(line.decode(errors="replace"))
            if found:
                return int(found.group(1))
        errors = (await process.stderr.read()).decode(errors="replace").strip().splitlines()
        await process.wait()
        raise OSError(errors[-1] if errors else f"the gateway exited with {process.returncode}")

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            logger.warning("gateway exited with status %s; restarting it", code)
            await asyncio.sleep(RESTART_DELAY_SECONDS)
            try:
                self.port = await self._spawn()
            except OSError as error:
                logger.error("gateway restart failed: %s", error)


def _gateway_environment() -> dict[str, str]:
    """Return the server's environment without the metrics directory of
    `serve --workers N`. The gateway records no server metrics, so there it
    would only add its own samples (Valkey down) to the workers' sum."""
    return {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
