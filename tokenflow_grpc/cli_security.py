"""The command line's API key and TLS options: those of the client commands,
and those that `tokenflow serve` and `tokenflow gateway` hand to the gateway."""

from __future__ import annotations

import argparse
import os
from typing import Any

from tokenflow_grpc.settings import GatewaySettings, Settings
from tokenflow_grpc.tls import channel_credentials, channel_options, https_context

API_KEY_ENV = "TOKENFLOW_API_KEY"


def add_client_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"API key sent as `authorization: Bearer KEY`. Environment: {API_KEY_ENV}, "
        "which other users cannot read in the process list, unlike this flag.",
    )
    parser.add_argument(
        "--ca-cert",
        default=None,
        help="PEM CA certificates that sign the server's TLS certificate; set, the "
        "client connects over TLS.",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="Connect over TLS, checking the server's certificate against the system's "
        "CA certificates (implied by --ca-cert).",
    )
    parser.add_argument(
        "--server-name",
        default=None,
        help="Host name checked in the server's TLS certificate, when it differs from "
        "the --target host.",
    )


def client_options(arguments: argparse.Namespace) -> dict[str, Any]:
    """Return the AsyncTokenFlowClient keyword arguments for the client options.

    Raises ConfigurationError when --ca-cert cannot be read.
    """
    options: dict[str, Any] = {}
    api_key = arguments.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is not None:
        options["api_key"] = api_key
    if arguments.ca_cert or arguments.tls or arguments.server_name:
        options["credentials"] = channel_credentials(arguments.ca_cert)
        options["options"] = channel_options(arguments.server_name)
    return options


def gateway_tls_arguments(settings: Settings) -> list[str]:
    """Return the `tokenflow gateway` TLS options for the gateway child of `tokenflow serve`."""
    arguments: list[str] = []
    if settings.tls_cert:
        arguments += ["--target-ca-cert", settings.target_ca_cert or settings.tls_cert]
    if settings.target_server_name:
        arguments += ["--target-server-name", settings.target_server_name]
    if settings.http_tls_cert:
        arguments += ["--http-tls-cert", settings.http_tls_cert]
        arguments += ["--http-tls-key", settings.http_tls_key]
    return arguments


def gateway_tls_options(settings: GatewaySettings) -> dict[str, Any]:
    """Return the start_gateway keyword arguments for a gateway's TLS settings.

    Raises ConfigurationError when a certificate or key cannot be loaded.
    """
    options: dict[str, Any] = {}
    if settings.target_ca_cert:
        options["channel_credentials"] = channel_credentials(
            settings.target_ca_cert, "--target-ca-cert"
        )
        options["channel_options"] = channel_options(settings.target_server_name)
    if settings.http_tls_cert:
        options["ssl_context"] = https_context(settings.http_tls_cert, settings.http_tls_key)
    return options
