"""The embedded Valkey: data directory lock, orphan cleanup, its own session,
restart after a crash, and one server per port."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import make_settings
from tokenflow_grpc.embedded import EmbeddedValkey, _answers_ping
from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.server import TokenFlowServer


@pytest.fixture
def embedded(tmp_path: pathlib.Path) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path)
    server.start()
    yield server
    server.stop()


def child_pid(server: EmbeddedValkey) -> int:
    process = server._process
    assert process is not None
    return process.pid


def test_embedded_answers_and_keeps_data(tmp_path: pathlib.Path) -> None:
    first = EmbeddedValkey(tmp_path)
    first.start()
    with socket.create_connection(("127.0.0.1", first.port)) as connection:
        connection.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nkept\r\n$3\r\nyes\r\n")
        assert connection.recv(16).startswith(b"+OK")
    first.stop()

    second = EmbeddedValkey(tmp_path)
    second.start()
    try:
        with socket.create_connection(("127.0.0.1", second.port)) as connection:
            connection.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\nkept\r\n")
            assert connection.recv(32) == b"$3\r\nyes\r\n"
    finally:
        second.stop()


def test_data_directory_used_once(embedded: EmbeddedValkey, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        EmbeddedValkey(tmp_path).start()

    assert "in use by another TokenFlow process" in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_child_runs_in_own_session(embedded: EmbeddedValkey) -> None:
    assert os.getsid(child_pid(embedded)) != os.getsid(0)


def test_orphan_is_stopped_at_start(tmp_path: pathlib.Path) -> None:
    orphaned = EmbeddedValkey(tmp_path)
    orphaned.start()
    orphan_pid = child_pid(orphaned)
    # Forget the child without stopping it, as a killed TokenFlow would.
    assert orphaned._lock_file is not None
    orphaned._lock_file.close()
    orphaned._lock_file = None
    orphaned._process = None

    successor = EmbeddedValkey(tmp_path)
    successor.start()
    try:
        assert not pathlib.Path(f"/proc/{orphan_pid}").exists() or _is_zombie(orphan_pid)
        assert _answers_ping(successor.port)
    finally:
        successor.stop()


def _is_zombie(pid: int) -> bool:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" in status


def test_restarts_after_crash(embedded: EmbeddedValkey) -> None:
    port = embedded.port
    os.kill(child_pid(embedded), signal.SIGKILL)
    assert embedded._process is not None
    embedded._process.wait()

    assert embedded.ensure_running() is True
    assert embedded.port == port
    assert _answers_ping(port)
    assert embedded.ensure_running() is False


def test_unusable_data_directory_named(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(ConfigurationError) as caught:
        EmbeddedValkey(blocker).start()

    assert "cannot create the data directory" in str(caught.value)


async def test_second_server_on_port_fails(start_server: Any, valkey_url: str) -> None:
    first = await start_server(valkey_url)
    second = TokenFlowServer(make_settings(valkey_url, grpc_address=first.address))

    with pytest.raises(OSError) as caught:
        await second.start()

    assert "cannot listen on the gRPC address" in str(caught.value)
    await second.stop(0)
