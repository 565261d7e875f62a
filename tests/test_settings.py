"""Settings from flags, environment variables and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.settings import Settings, add_arguments, settings_from, settings_values


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    settings = settings_from(parse(), environ={})

    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.rate_limit == 10
    assert settings.rate_window == 60.0
    assert settings.cache_ttl == 3600
    assert settings.valkey_url == ""
    assert settings.on_valkey_error == "allow"
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("seconds", "milliseconds"), [("1.001", 1001), ("0.29", 290), ("60", 60_000), ("0.001", 1)]
)
def test_rate_window_ms_exact(seconds: str, milliseconds: int) -> None:
    settings = settings_from(parse("--rate-window", seconds), environ={})

    assert settings.rate_window_ms == milliseconds


def test_environment_overrides_default() -> None:
    settings = settings_from(
        parse(), environ={"TOKENFLOW_RATE_LIMIT": "5", "TOKENFLOW_VALKEY_URL": "memory://"}
    )

    assert settings.rate_limit == 5
    assert settings.valkey_url == "memory://"


def test_workers_default_flag_and_environment() -> None:
    assert settings_from(parse(), environ={}).workers == 1
    assert settings_from(parse(), environ={"TOKENFLOW_WORKERS": "3"}).workers == 3
    assert settings_from(parse("--workers", "4"), environ={"TOKENFLOW_WORKERS": "3"}).workers == 4


@pytest.mark.parametrize(
    "argv",
    [
        [],
        [
            "--workers",
            "4",
            "--valkey-url",
            "redis://:secret@127.0.0.1:6379/2",
            "--rate-window",
            "0.125",
            "--trusted-proxies",
            "10.0.0.0/8,::1",
            "--gateway-trusted-proxies",
            "192.168.0.0/16",
            "--models",
            "a,b",
            "--default-model",
            "b",
            "--no-gateway",
            "--http-access-log",
            "--log-level",
            "DEBUG",
        ],
    ],
    ids=["defaults", "every kind of value"],
)
def test_settings_values_round_trip(argv: list[str]) -> None:
    settings = settings_from(parse(*argv), environ={})

    values = settings_values(settings)
    rebuilt = settings_from(argparse.Namespace(**values), environ={})

    assert rebuilt == settings
    assert all(isinstance(text, str) for text in values.values())


def test_flag_overrides_environment() -> None:
    settings = settings_from(parse("--rate-limit", "7"), environ={"TOKENFLOW_RATE_LIMIT": "5"})

    assert settings.rate_limit == 7


def test_trusted_proxies_parsed() -> None:
    settings = settings_from(parse("--trusted-proxies", "10.0.0.0/8, 192.168.1.1"), environ={})

    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "192.168.1.1/32"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rate-limit", "ten"], "--rate-limit"),
        (["--rate-limit", "0"], "--rate-limit"),
        (["--rate-window", "-1"], "--rate-window"),
        (["--cache-ttl", "0"], "--cache-ttl"),
        (["--trusted-proxies", "10.0.0.0/33"], "10.0.0.0/33"),
        (["--default-model", "missing"], "--default-model"),
        (["--key-prefix", "a{b}"], "--key-prefix"),
        (["--rate-window", "nan"], "--rate-window"),
        (["--rate-window", "inf"], "--rate-window"),
        (["--rate-window", "1e12"], "--rate-window"),
        (["--rate-limit", "3000000000"], "--rate-limit"),
        (["--generator-timeout", "nan"], "--generator-timeout"),
        (["--generator-latency", "inf"], "--generator-latency"),
        (["--valkey-timeout", "nan"], "--valkey-timeout"),
        (["--cache-ttl", "99999999999999999999"], "--cache-ttl"),
        (["--grpc-address", "127.0.0.1:99999"], "--grpc-address"),
        (["--grpc-address", "bogus"], "--grpc-address"),
        (["--grpc-address", ""], "--grpc-address"),
        (["--http-address", ":80"], "--http-address"),
        (["--workers", "0"], "--workers"),
        (["--workers", "-2"], "--workers"),
        (["--workers", "two"], "--workers"),
        (["--workers", "100000"], "--workers"),
        (["--workers", "2", "--valkey-url", "memory://"], "memory://"),
    ],
)
def test_invalid_setting_named(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(parse(*argv), environ={})

    assert named in str(caught.value)


def test_cluster_switch_from_flag_or_environment() -> None:
    url = "redis://127.0.0.1:7000/0"
    from_flag = settings_from(parse("--valkey-cluster", "--valkey-url", url), environ={})
    from_environment = settings_from(
        parse(), environ={"TOKENFLOW_VALKEY_CLUSTER": "true", "TOKENFLOW_VALKEY_URL": url}
    )
    default = settings_from(parse("--valkey-url", url), environ={})

    assert from_flag.valkey_cluster is True
    assert from_environment.valkey_cluster is True
    assert default.valkey_cluster is False


@pytest.mark.parametrize(
    ("url", "shown"),
    [("", "no URL"), ("memory://", "memory://"), ("unix:///tmp/valkey.sock", "unix://")],
)
def test_cluster_needs_node_url(url: str, shown: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(parse("--valkey-cluster", "--valkey-url", url), environ={})

    assert "--valkey-cluster" in str(caught.value)
    assert shown in str(caught.value)


def test_cluster_error_hides_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(
            parse("--valkey-cluster", "--valkey-url", "memory://user:secret@x"), environ={}
        )

    assert "secret" not in str(caught.value)


def test_invalid_environment_value_names_variable() -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(parse(), environ={"TOKENFLOW_RATE_LIMIT": "abc"})

    assert "TOKENFLOW_RATE_LIMIT" in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--valkey-url", "bogus://x"], "bogus://"),
        (["--data-dir", "/proc/version"], "/proc/version"),
    ],
    ids=["unsupported Valkey URL", "data directory is a file"],
)
def test_serve_start_error_is_one_line(argv: list[str], named: str) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenflow_grpc.cli",
            "serve",
            "--grpc-address",
            "127.0.0.1:0",
            "--no-gateway",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert named in completed.stderr.strip().splitlines()[-1]


def test_invalid_environment_choice_named() -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(parse(), environ={"TOKENFLOW_ON_VALKEY_ERROR": "maybe"})

    assert "--on-valkey-error" in str(caught.value)


def test_every_field_has_flag_env_and_help() -> None:
    for settings_field in dataclasses.fields(Settings):
        assert settings_field.metadata["flag"].startswith("--")
        assert settings_field.metadata["env"].startswith("TOKENFLOW_")
        assert settings_field.metadata["help"]


def test_serve_help_lists_flags() -> None:
    output = subprocess.run(
        [sys.executable, "-m", "tokenflow_grpc.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    for flag in (
        "--grpc-address",
        "--valkey-url",
        "--rate-limit",
        "--rate-window",
        "--cache-ttl",
        "--trusted-proxies",
        "--workers",
    ):
        assert flag in output
    assert "TOKENFLOW_VALKEY_URL" in output


def test_serve_rejects_bad_flag_value() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tokenflow_grpc.cli", "serve", "--rate-limit", "-3"],
        capture_output=True,
        text=True,
    )

    assert completed.returncode == 2
    assert "--rate-limit" in completed.stderr
