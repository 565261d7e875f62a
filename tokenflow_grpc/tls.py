"""TLS credentials read from PEM files: the gRPC server's, a gRPC channel's and
the gateway's HTTPS listener's. Each loader raises ConfigurationError naming
the flag and the file it could not use."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from tokenflow_grpc.errors import ConfigurationError


def read_pem(path: str, flag: str) -> bytes:
    """Return the bytes of the PEM file at path; raise ConfigurationError naming flag."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read {flag} {path!r}: {error}") from error
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{flag} {path!r} is not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(cert_path: str, key_path: str) -> Any:
    """Return grpc.ssl_server_credentials for a certificate chain and its private key."""
    chain = read_pem(cert_path, "--tls-cert")
    key = read_pem(key_path, "--tls-key")
    check_key_pair(cert_path, key_path, "--tls-cert", "--tls-key")
    return grpc.ssl_server_credentials([(key, chain)])


def check_key_pair(cert_path: str, key_path: str, cert_flag: str, key_flag: str) -> None:
    """Raise ConfigurationError unless the key in key_path belongs to the first
    certificate in cert_path. gRPC would only fail to listen, naming the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as error:
        raise ConfigurationError(
            f"{key_flag} {key_path!r} is not the private key of {cert_flag} {cert_path!r}: "
            f"{error.reason or error}"
        ) from error


def channel_credentials(ca_path: str | None, flag: str = "--ca-cert") -> Any:
    """Return TLS channel credentials trusting the CA certificates in ca_path,
    or the system's CA certificates when ca_path is None; flag names ca_path in errors."""
    roots = read_pem(ca_path, flag) if ca_path else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def channel_options(server_name: str | None) -> list[tuple[str, Any]]:
    """Return the channel options that make TLS check server_name in the server's
    certificate instead of the target's host."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def https_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """Return the server-side SSLContext of an HTTPS listener, TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(
            f"cannot load --http-tls-cert {cert_path!r} with --http-tls-key {key_path!r}: {error}"
        ) from error
    return context
