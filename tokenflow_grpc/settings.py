"""Server settings: each field has a command-line flag, an environment variable,
a default and help text, all declared once here."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokenflow_grpc.errors import ConfigurationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED_PROXIES = "127.0.0.0/8,::1/128"
SettingsType = TypeVar("SettingsType")

# Upper bounds of numeric settings: beyond them a value is a typo, or overflows
# a protobuf int32 or Duration, or the window's sorted set grows without use.
MAX_RATE_LIMIT = 1_000_000
MAX_WINDOW_SECONDS = 30 * 86400
MAX_CACHE_TTL_SECONDS = 10 * 365 * 86400
MAX_TIMEOUT_SECONDS = 3600
MAX_SIMULATE_COUNT = 100_000
MAX_ACTIVITY_EVENTS = 1_000_000
MAX_WATCH_QUEUE_SIZE = 1_000_000
MAX_WORKERS = 256
MAX_WATCHERS_PER_CLIENT = 1_000_000
MAX_UPSTREAM_RETRIES = 100
# gRPC keeps these sizes in a C int.
MAX_GRPC_SIZE_BYTES = 2**31 - 1
LOG_FORMATS = ("text", "json")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets); raise ConfigurationError naming flag."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(
            f"{flag} must be HOST:PORT with a port from 0 to 65535, got {text!r}"
        )
    return host, int(port_text)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Parse a comma-separated list of networks ("10.0.0.0/8,::1")."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as error:
            raise ConfigurationError(
                f"invalid network {item!r} in trusted proxies: {error}"
            ) from error
    return tuple(networks)


def parse_models(text: str) -> tuple[str, ...]:
    models = tuple(name.strip() for name in text.split(",") if name.strip())
    if not models:
        raise ConfigurationError("the model list is empty; name at least one model")
    return models


def parse_model_map(text: str) -> tuple[str, ...]:
    """Parse "NAME=UPSTREAM,..." into a tuple of "NAME=UPSTREAM" items."""
    items = []
    for item in text.split(","):
        name, separator, upstream = (part.strip() for part in item.partition("="))
        if not item.strip():
            continue
        if not separator or not name or not upstream:
            raise ConfigurationError(
                f"invalid model mapping {item.strip()!r}: expected NAME=UPSTREAM_NAME, "
                "for example tokenflow-sim-1=gpt-4o-mini"
            )
        items.append(f"{name}={upstream}")
    return tuple(items)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _option(
    flag: str,
    env: str,
    help: str,
    default: Any,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    switch: bool = False,
) -> Any:
    """Declare a settings field; switch=True makes a flag that takes no value."""
    metadata = {
        "flag": flag,
        "env": env,
        "help": help,
        "parse": parse_bool if switch else parse,
        "choices": choices,
        "switch": switch,
    }
    return field(default=default, metadata=metadata)


# Options shared by `tokenflow serve` and `tokenflow gateway`.
def _http_address() -> Any:
    return _option(
        "--http-address",
        "TOKENFLOW_HTTP_ADDRESS",
        "HTTP/JSON gateway listen address, HOST:PORT.",
        "127.0.0.1:8080",
    )


def _gateway_trusted_proxies() -> Any:
    return _option(
        "--gateway-trusted-proxies",
        "TOKENFLOW_GATEWAY_TRUSTED_PROXIES",
        "Comma-separated networks of HTTP proxies in front of the gateway whose "
        "X-Forwarded-For header it passes on; from other clients the header is dropped.",
        (),
        parse=parse_networks,
    )


def _http_max_body_bytes() -> Any:
    return _option(
        "--http-max-body-bytes",
        "TOKENFLOW_HTTP_MAX_BODY_BYTES",
        "Largest HTTP request body the gateway accepts, in bytes.",
        1024 * 1024,
        parse=int,
    )


def _http_access_log() -> Any:
    return _option(
        "--http-access-log",
        "TOKENFLOW_HTTP_ACCESS_LOG",
        "Log one line per HTTP request at INFO.",
        False,
        switch=True,
    )


def _no_web_dashboard() -> Any:
    return _option(
        "--no-web-dashboard",
        "TOKENFLOW_NO_WEB_DASHBOARD",
        "Do not serve the web dashboard page at / on the gateway.",
        False,
        switch=True,
    )


def _log_level() -> Any:
    return _option(
        "--log-level",
        "TOKENFLOW_LOG_LEVEL",
        "Logging level; DEBUG adds one line per request.",
        "INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )


def _http_tls_cert() -> Any:
    return _option(
        "--http-tls-cert",
        "TOKENFLOW_HTTP_TLS_CERT",
        "PEM certificate chain of the gateway's HTTPS listener; set with --http-tls-key, "
        "the gateway serves HTTPS instead of HTTP.",
        "",
    )


def _http_tls_key() -> Any:
    return _option(
        "--http-tls-key",
        "TOKENFLOW_HTTP_TLS_KEY",
        "PEM private key of --http-tls-cert.",
        "",
    )


def _target_server_name() -> Any:
    return _option(
        "--target-server-name",
        "TOKENFLOW_TARGET_SERVER_NAME",
        "Host name that the gateway checks in the gRPC server's TLS certificate, when it "
        "differs from the target's host. Empty: the target's host.",
        "",
    )


def _check_pairs(pairs: Sequence[tuple[str, str, str, str]]) -> None:
    """Raise ConfigurationError unless both or neither of each pair of flags are set."""
    for flag, value, other_flag, other_value in pairs:
        if bool(value) != bool(other_value):
            missing = other_flag if value else flag
            present = flag if value else other_flag
            raise ConfigurationError(f"{present} is set but {missing} is not; set both or neither")


def _log_format() -> Any:
    return _option(
        "--log-format",
        "TOKENFLOW_LOG_FORMAT",
        "Log line format: text, or json for one JSON object per line.",
        "text",
        choices=LOG_FORMATS,
    )


@dataclass(frozen=True)
class Settings:
    """Everything a TokenFlow server process can be configured with."""

    grpc_address: str = _option(
        "--grpc-address",
        "TOKENFLOW_GRPC_ADDRESS",
        "gRPC listen address, HOST:PORT.",
        "127.0.0.1:50051",
    )
    workers: int = _option(
        "--workers",
        "TOKENFLOW_WORKERS",
        "Number of server processes that share the gRPC port (SO_REUSEPORT), each with its "
        "own event loop and Valkey connections; above 1 a parent process supervises them.",
        1,
        parse=int,
    )
    valkey_url: str = _option(
        "--valkey-url",
        "TOKENFLOW_VALKEY_URL",
        "Valkey or Redis URL (redis://, rediss://, unix://), or memory:// for the "
        "in-process fakeredis backend. Empty starts an embedded Valkey server.",
        "",
    )
    valkey_cluster: bool = _option(
        "--valkey-cluster",
        "TOKENFLOW_VALKEY_CLUSTER",
        "Treat --valkey-url as one node of a Valkey Cluster (redis:// or rediss://) and "
        "spread the keys over the cluster's primaries.",
        False,
        switch=True,
    )
    data_dir: str = _option(
        "--data-dir",
        "TOKENFLOW_DATA_DIR",
        "Directory of the embedded Valkey server's data (kept across restarts).",
        ".tokenflow",
    )
    key_prefix: str = _option(
        "--key-prefix",
        "TOKENFLOW_KEY_PREFIX",
        "Prefix of every Valkey key, so that deployments can share one Valkey.",
        "tokenflow",
    )
    rate_limit: int = _option(
        "--rate-limit",
        "TOKENFLOW_RATE_LIMIT",
        "Requests admitted per client per window.",
        10,
        parse=int,
    )
    rate_window: float = _option(
        "--rate-window",
        "TOKENFLOW_RATE_WINDOW",
        "Rate-limit window length, in seconds.",
        60.0,
        parse=float,
    )
    cache_ttl: int = _option(
        "--cache-ttl",
        "TOKENFLOW_CACHE_TTL",
        "Lifetime of a cached response, in seconds.",
        3600,
        parse=int,
    )
    max_cache_ttl: int = _option(
        "--max-cache-ttl",
        "TOKENFLOW_MAX_CACHE_TTL",
        "Longest cache lifetime that a request may ask for in cache_ttl, in seconds.",
        86400,
        parse=int,
    )
    trusted_proxies: tuple[Network, ...] = _option(
        "--trusted-proxies",
        "TOKENFLOW_TRUSTED_PROXIES",
        "Comma-separated networks whose x-forwarded-for header is believed.",
        parse_networks(DEFAULT_TRUSTED_PROXIES),
        parse=parse_networks,
    )
    on_valkey_error: str = _option(
        "--on-valkey-error",
        "TOKENFLOW_ON_VALKEY_ERROR",
        "What Generate does when Valkey cannot be reached: allow (answer without limiting "
        "or caching) or deny (fail with UNAVAILABLE).",
        "allow",
        choices=("allow", "deny"),
    )
    default_model: str = _option(
        "--default-model",
        "TOKENFLOW_DEFAULT_MODEL",
        "Model used when a request names none.",
        "tokenflow-sim-1",
    )
    models: tuple[str, ...] = _option(
        "--models",
        "TOKENFLOW_MODELS",
        "Comma-separated models that requests may name.",
        ("tokenflow-sim-1", "tokenflow-sim-2"),
        parse=parse_models,
    )
    generator_latency: float = _option(
        "--generator-latency",
        "TOKENFLOW_GENERATOR_LATENCY",
        "Delay of the simulated generator per call, in seconds.",
        0.0,
        parse=float,
    )
    generator_timeout: float = _option(
        "--generator-timeout",
        "TOKENFLOW_GENERATOR_TIMEOUT",
        "Longest wait for the generator, in seconds; also bounds how long identical "
        "requests wait for the one generating.",
        30.0,
        parse=float,
    )
    upstream_url: str = _option(
        "--upstream-url",
        "TOKENFLOW_UPSTREAM_URL",
        "Base URL of an OpenAI-compatible API (the part before /chat/completions, for "
        "example https://api.openai.com/v1). Empty: the simulated generator.",
        "",
    )
    upstream_api_key_env: str = _option(
        "--upstream-api-key-env",
        "TOKENFLOW_UPSTREAM_API_KEY_ENV",
        "Name of the environment variable that holds the upstream API key, sent as "
        "`Authorization: Bearer KEY`. An unset or empty variable sends no key.",
        "OPENAI_API_KEY",
    )
    upstream_models: tuple[str, ...] = _option(
        "--upstream-models",
        "TOKENFLOW_UPSTREAM_MODELS",
        "Comma-separated NAME=UPSTREAM_NAME pairs that map a model of --models to the "
        "upstream's model name; a model without a pair keeps its name.",
        (),
        parse=parse_model_map,
    )
    upstream_timeout: float = _option(
        "--upstream-timeout",
        "TOKENFLOW_UPSTREAM_TIMEOUT",
        "Longest wait for one upstream attempt's response headers, and then for its body "
        "or for each chunk of a stream, in seconds. --generator-timeout and the call's "
        "deadline bound all attempts together.",
        30.0,
        parse=float,
    )
    upstream_retries: int = _option(
        "--upstream-retries",
        "TOKENFLOW_UPSTREAM_RETRIES",
        "Retries of an upstream request that failed with HTTP 408, 429 or 5xx or could "
        "not connect, within the call's deadline.",
        2,
        parse=int,
    )
    upstream_backoff: float = _option(
        "--upstream-backoff",
        "TOKENFLOW_UPSTREAM_BACKOFF",
        "Wait before the first retry, in seconds, doubled for each further retry; a "
        "Retry-After header from the upstream replaces it.",
        0.5,
        parse=float,
    )
    max_prompt_bytes: int = _option(
        "--max-prompt-bytes",
        "TOKENFLOW_MAX_PROMPT_BYTES",
        "Largest prompt accepted, in bytes of UTF-8.",
        32 * 1024,
        parse=int,
    )
    simulate_max_count: int = _option(
        "--simulate-max-count",
        "TOKENFLOW_SIMULATE_MAX_COUNT",
        "Largest Simulate burst accepted.",
        1000,
        parse=int,
    )
    simulate_per_minute: int = _option(
        "--simulate-per-minute",
        "TOKENFLOW_SIMULATE_PER_MINUTE",
        "Simulate calls admitted per client per minute.",
        10,
        parse=int,
    )
    max_message_bytes: int = _option(
        "--max-message-bytes",
        "TOKENFLOW_MAX_MESSAGE_BYTES",
        "Largest gRPC request message accepted, in bytes.",
        1024 * 1024,
        parse=int,
    )
    max_metadata_bytes: int = _option(
        "--max-metadata-bytes",
        "TOKENFLOW_MAX_METADATA_BYTES",
        "Largest request metadata (headers) accepted, in bytes as HTTP/2 counts them.",
        8 * 1024,
        parse=int,
    )
    max_watchers_per_client: int = _option(
        "--max-watchers-per-client",
        "TOKENFLOW_MAX_WATCHERS_PER_CLIENT",
        "Open WatchActivity streams allowed per client in one server process.",
        100,
        parse=int,
    )
    activity_max_events: int = _option(
        "--activity-max-events",
        "TOKENFLOW_ACTIVITY_MAX_EVENTS",
        "Approximate number of events kept in the activity stream (XADD MAXLEN ~).",
        100,
        parse=int,
    )
    key_count_interval: float = _option(
        "--key-count-interval",
        "TOKENFLOW_KEY_COUNT_INTERVAL",
        "Seconds for which GetStats reuses its count of keys per kind, which walks "
        "the keyspace with SCAN; 0 counts on every call.",
        5.0,
        parse=float,
    )
    watch_queue_size: int = _option(
        "--watch-queue-size",
        "TOKENFLOW_WATCH_QUEUE_SIZE",
        "Events buffered per watcher before it starts losing events.",
        256,
        parse=int,
    )
    valkey_timeout: float = _option(
        "--valkey-timeout",
        "TOKENFLOW_VALKEY_TIMEOUT",
        "Timeout of one Valkey connect or command, in seconds.",
        1.0,
        parse=float,
    )
    http_address: str = _http_address()
    no_gateway: bool = _option(
        "--no-gateway",
        "TOKENFLOW_NO_GATEWAY",
        "Do not start the HTTP/JSON gateway.",
        False,
        switch=True,
    )
    gateway_trusted_proxies: tuple[Network, ...] = _gateway_trusted_proxies()
    http_max_body_bytes: int = _http_max_body_bytes()
    http_access_log: bool = _http_access_log()
    no_web_dashboard: bool = _no_web_dashboard()
    api_keys_file: str = _option(
        "--api-keys-file",
        "TOKENFLOW_API_KEYS_FILE",
        "TOML file of API keys ([[keys]] tables with id, sha256, role and an optional limit). "
        "Set, every TokenFlowService call needs a key; health and reflection stay open. "
        "Empty (with --api-keys empty too): no authentication.",
        "",
    )
    api_keys: str = _option(
        "--api-keys",
        "TOKENFLOW_API_KEYS",
        "API keys as TOML text in the format of --api-keys-file, for deployments configured "
        "through the environment.",
        "",
    )
    policies_file: str = _option(
        "--policies-file",
        "TOKENFLOW_POLICIES_FILE",
        "TOML file of limit policies ([[policies]] tables), matched per client or API key "
        "and per model; reloaded on SIGHUP. Empty: the --rate-limit / --rate-window "
        "sliding log for every client.",
        "",
    )
    tls_cert: str = _option(
        "--tls-cert",
        "TOKENFLOW_TLS_CERT",
        "PEM certificate chain of the gRPC server; set with --tls-key, the server accepts "
        "only TLS.",
        "",
    )
    tls_key: str = _option(
        "--tls-key",
        "TOKENFLOW_TLS_KEY",
        "PEM private key of --tls-cert.",
        "",
    )
    target_ca_cert: str = _option(
        "--target-ca-cert",
        "TOKENFLOW_TARGET_CA_CERT",
        "PEM CA certificates that the built-in gateway checks the server's --tls-cert "
        "against. Empty: --tls-cert itself, which fits a self-signed certificate.",
        "",
    )
    target_server_name: str = _target_server_name()
    http_tls_cert: str = _http_tls_cert()
    http_tls_key: str = _http_tls_key()
    valkey_ca_cert: str = _option(
        "--valkey-ca-cert",
        "TOKENFLOW_VALKEY_CA_CERT",
        "PEM CA certificates that a rediss:// Valkey's certificate is checked against. "
        "Empty: the system's CA certificates.",
        "",
    )
    log_level: str = _log_level()
    log_format: str = _log_format()
    metrics_address: str = _option(
        "--metrics-address",
        "TOKENFLOW_METRICS_ADDRESS",
        "Serve Prometheus metrics over HTTP at /metrics on HOST:PORT. Empty turns them off; "
        "with --workers, the parent serves the sum of the workers' figures.",
        "",
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def rate_window_ms(self) -> int:
        # Rounded, because truncation turns 1.001 s (1000.9999999999999 ms) into 1000 ms.
        return round(self.rate_window * 1000)

    def validate(self) -> None:
        """Raise ConfigurationError naming the first invalid setting."""
        for flag, value, maximum in (
            ("--rate-limit", self.rate_limit, MAX_RATE_LIMIT),
            ("--rate-window", self.rate_window, MAX_WINDOW_SECONDS),
            ("--cache-ttl", self.cache_ttl, MAX_CACHE_TTL_SECONDS),
            ("--max-cache-ttl", self.max_cache_ttl, MAX_CACHE_TTL_SECONDS),
            ("--upstream-timeout", self.upstream_timeout, MAX_TIMEOUT_SECONDS),
            ("--upstream-retries", self.upstream_retries, MAX_UPSTREAM_RETRIES),
            ("--upstream-backoff", self.upstream_backoff, MAX_TIMEOUT_SECONDS),
            ("--generator-timeout", self.generator_timeout, MAX_TIMEOUT_SECONDS),
            ("--generator-latency", self.generator_latency, MAX_TIMEOUT_SECONDS),
            ("--key-count-interval", self.key_count_interval, MAX_TIMEOUT_SECONDS),
            ("--valkey-timeout", self.valkey_timeout, MAX_TIMEOUT_SECONDS),
            ("--simulate-max-count", self.simulate_max_count, MAX_SIMULATE_COUNT),
            ("--activity-max-events", self.activity_max_events, MAX_ACTIVITY_EVENTS),
            ("--watch-queue-size", self.watch_queue_size, MAX_WATCH_QUEUE_SIZE),
            ("--workers", self.workers, MAX_WORKERS),
            ("--simulate-per-minute", self.simulate_per_minute, MAX_RATE_LIMIT),
            ("--max-message-bytes", self.max_message_bytes, MAX_GRPC_SIZE_BYTES),
            ("--max-metadata-bytes", self.max_metadata_bytes, MAX_GRPC_SIZE_BYTES),
            ("--max-watchers-per-client", self.max_watchers_per_client, MAX_WATCHERS_PER_CLIENT),
        ):
            if not math.isfinite(value) or value > maximum:
                raise ConfigurationError(f"{flag} must be at most {maximum:g}, got {value}")
        parse_address(self.grpc_address, "--grpc-address")
        parse_address(self.http_address, "--http-address")
        if self.metrics_address:
            parse_address(self.metrics_address, "--metrics-address")
        positive = {
            "--rate-limit": self.rate_limit,
            "--rate-window": self.rate_window,
            "--cache-ttl": self.cache_ttl,
            "--max-cache-ttl": self.max_cache_ttl,
            "--upstream-timeout": self.upstream_timeout,
            "--generator-timeout": self.generator_timeout,
            "--max-prompt-bytes": self.max_prompt_bytes,
            "--simulate-max-count": self.simulate_max_count,
            "--activity-max-events": self.activity_max_events,
            "--watch-queue-size": self.watch_queue_size,
            "--valkey-timeout": self.valkey_timeout,
            "--http-max-body-bytes": self.http_max_body_bytes,
            "--workers": self.workers,
            "--simulate-per-minute": self.simulate_per_minute,
            "--max-message-bytes": self.max_message_bytes,
            "--max-metadata-bytes": self.max_metadata_bytes,
            "--max-watchers-per-client": self.max_watchers_per_client,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ConfigurationError(f"{flag} must be greater than 0, got {value}")
        if self.rate_window_ms < 1:
            raise ConfigurationError(
                f"--rate-window must be at least 0.001 s, got {self.rate_window}"
            )
        if self.generator_latency < 0:
            raise ConfigurationError(
                f"--generator-latency must not be negative, got {self.generator_latency}"
            )
        if self.key_count_interval < 0:
            raise ConfigurationError(
                f"--key-count-interval must not be negative, got {self.key_count_interval}"
            )
        if self.max_message_bytes <= self.max_prompt_bytes:
            raise ConfigurationError(
                f"--max-message-bytes {self.max_message_bytes} must be greater than "
                f"--max-prompt-bytes {self.max_prompt_bytes}, or no prompt of the maximum "
                "size could arrive"
            )
        if self.cache_ttl > self.max_cache_ttl:
            raise ConfigurationError(
                f"--cache-ttl {self.cache_ttl} is above --max-cache-ttl {self.max_cache_ttl}; "
                "raise --max-cache-ttl or lower --cache-ttl"
            )
        self._validate_upstream()
        if self.default_model not in self.models:
            raise ConfigurationError(
                f"--default-model {self.default_model!r} is not in --models {list(self.models)}"
            )
        if self.workers > 1 and urllib.parse.urlsplit(self.valkey_url).scheme == "memory":
            raise ConfigurationError(
                f"--workers {self.workers} needs a Valkey that the workers share, but "
                "memory:// keeps its data inside each process; pass a redis:// URL or "
                "no --valkey-url for the embedded Valkey"
            )
        cluster_scheme = urllib.parse.urlsplit(self.valkey_url).scheme
        if self.valkey_cluster and cluster_scheme not in ("redis", "rediss"):
            # Only the scheme is quoted, because the URL may contain a password.
            received = f"a {cluster_scheme}:// URL" if cluster_scheme else "no URL"
            raise ConfigurationError(
                "--valkey-cluster needs --valkey-url set to the redis:// or rediss:// URL of "
                f"one cluster node, got {received}"
            )
        self._validate_security()
        if not self.key_prefix or any(c in self.key_prefix for c in "{}*?[] "):
            raise ConfigurationError(
                f"--key-prefix {self.key_prefix!r} must be non-empty and contain none of {{}}*?[] "
                "or spaces"
            )

    def _validate_upstream(self) -> None:
        if self.upstream_retries < 0 or self.upstream_backoff < 0:
            raise ConfigurationError(
                "--upstream-retries and --upstream-backoff must not be negative, got "
                f"{self.upstream_retries} and {self.upstream_backoff}"
            )
        if self.upstream_url and urllib.parse.urlsplit(self.upstream_url).scheme not in (
            "http",
            "https",
        ):
            raise ConfigurationError(
                "--upstream-url must be an http:// or https:// URL, got one with the scheme "
                f"{urllib.parse.urlsplit(self.upstream_url).scheme or 'missing'}"
            )
        for name in self.upstream_model_map:
            if name not in self.models:
                raise ConfigurationError(
                    f"--upstream-models maps {name!r}, which is not in --models {list(self.models)}"
                )

    @property
    def upstream_model_map(self) -> dict[str, str]:
        """--upstream-models as a dict from TokenFlow model name to upstream model name."""
        pairs = (item.partition("=") for item in self.upstream_models)
        return {name: upstream for name, _, upstream in pairs}

    def _validate_security(self) -> None:
        if self.api_keys and self.api_keys_file:
            raise ConfigurationError(
                "--api-keys and --api-keys-file are both set; keep the keys in one of them"
            )
        _check_pairs(
            [
                ("--tls-cert", self.tls_cert, "--tls-key", self.tls_key),
                ("--http-tls-cert", self.http_tls_cert, "--http-tls-key", self.http_tls_key),
            ]
        )
        if self.valkey_ca_cert and urllib.parse.urlsplit(self.valkey_url).scheme != "rediss":
            raise ConfigurationError(
                "--valkey-ca-cert needs a rediss:// --valkey-url, because only rediss:// "
                "connects to Valkey over TLS"
            )


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of a gateway process started with `tokenflow gateway`."""

    target: str = _option(
        "--target",
        "TOKENFLOW_TARGET",
        "Address of the TokenFlow gRPC server, HOST:PORT.",
        "127.0.0.1:50051",
    )
    http_address: str = _http_address()
    gateway_trusted_proxies: tuple[Network, ...] = _gateway_trusted_proxies()
    http_max_body_bytes: int = _http_max_body_bytes()
    http_access_log: bool = _http_access_log()
    no_web_dashboard: bool = _no_web_dashboard()
    target_ca_cert: str = _option(
        "--target-ca-cert",
        "TOKENFLOW_TARGET_CA_CERT",
        "PEM CA certificates that sign the gRPC server's TLS certificate; set, the gateway "
        "connects to --target over TLS. Empty: plaintext.",
        "",
    )
    target_server_name: str = _target_server_name()
    http_tls_cert: str = _http_tls_cert()
    http_tls_key: str = _http_tls_key()
    log_level: str = _log_level()
    log_format: str = _log_format()

    def __post_init__(self) -> None:
        _check_pairs([("--http-tls-cert", self.http_tls_cert, "--http-tls-key", self.http_tls_key)])
        parse_address(self.target, "--target")
        parse_address(self.http_address, "--http-address")
        if self.http_max_body_bytes <= 0:
            raise ConfigurationError(
                f"--http-max-body-bytes must be greater than 0, got {self.http_max_body_bytes}"
            )


def add_arguments(parser: argparse.ArgumentParser, cls: type = Settings) -> None:
    """Add one option per field of cls; each default comes from its environment variable."""
    for settings_field in dataclasses.fields(cls):
        meta = settings_field.metadata
        default = settings_field.default
        shown = ",".join(str(n) for n in default) if isinstance(default, tuple) else default
        if meta["switch"]:
            parser.add_argument(
                meta["flag"],
                dest=settings_field.name,
                action="store_const",
                const="true",
                default=None,
                help=f"{meta['help']} Environment: {meta['env']}=true.",
            )
            continue
        parser.add_argument(
            meta["flag"],
            dest=settings_field.name,
            default=None,
            choices=meta["choices"],
            metavar=None if meta["choices"] else settings_field.name.upper(),
            help=f"{meta['help']} Environment: {meta['env']}. Default: {shown!r}.",
        )


def settings_from(
    arguments: argparse.Namespace | None = None,
    environ: dict[str, str] | None = None,
    cls: type[SettingsType] = Settings,  # type: ignore[assignment]
) -> SettingsType:
    """Build cls from parsed flags, falling back to environment variables and defaults."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for settings_field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = settings_field.metadata
        raw = getattr(arguments, settings_field.name, None) if arguments else None
        if raw is None:
            raw = environ.get(meta["env"])
        if raw is None:
            continue
        if meta["choices"] and raw not in meta["choices"]:
            raise ConfigurationError(
                f"{meta['flag']} must be one of {list(meta['choices'])}, got {raw!r}"
            )
        parse = meta["parse"]
        try:
            values[settings_field.name] = parse(raw) if parse else raw
        except ValueError as error:
            raise ConfigurationError(
                f"invalid value {raw!r} for {meta['flag']} ({meta['env']}): {error}"
            ) from error
    return cls(**values)


def settings_values(settings: Any) -> dict[str, str]:
    """Return each field of settings as the text its flag takes.

    settings_from(argparse.Namespace(**values), environ={}) rebuilds equal
    settings, which is how `tokenflow serve --workers N` hands its settings
    to the worker processes.
    """
    values: dict[str, str] = {}
    for settings_field in dataclasses.fields(settings):
        value = getattr(settings, settings_field.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(str(item) for item in value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        values[settings_field.name] = text
    return values
