"""Policy files: parsing, validation messages and matching."""

from __future__ import annotations

import pytest

from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.policies import (
    SLIDING_LOG,
    SLIDING_WINDOW,
    TOKEN_BUCKET,
    parse_duration,
    parse_policies,
)
from tokenflow_grpc.settings import Settings

SETTINGS = Settings(rate_limit=7, rate_window=30.0)
EXAMPLE = """
[[policies]]
name = "everyone"
requests = 60
window = "1m"
algorithm = "sliding_window"

[[policies]]
name = "batch"
keys = ["batch-jobs"]
algorithm = "token_bucket"
requests = 10
window = "1h"
capacity = 30
tokens = 100000

[[policies]]
name = "big-model"
models = ["tokenflow-sim-2"]
requests = 5
window = "90s"
tokens = 2000
tokens_per_model = true

[[policies]]
name = "batch-big-model"
keys = ["batch-jobs"]
models = ["tokenflow-sim-2"]
requests = 2
window = "10s"
shadow = true
"""


def parse(text: str) -> object:
    return parse_policies(text, "test.toml", SETTINGS)


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [("90s", 90_000), ("1h", 3_600_000), ("1h30m", 5_400_000), ("250ms", 250), ("1.5s", 1500)],
)
def test_duration_parses(text: str, expected_ms: int) -> None:
    assert parse_duration(text) == expected_ms


@pytest.mark.parametrize("text", ["", "90", "1 fortnight", "s", "1h-5m", "5x"])
def test_duration_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_example_file_matches_most_specific() -> None:
    policies = parse_policies(EXAMPLE, "test.toml", SETTINGS)

    assert policies.match("127.0.0.1", "tokenflow-sim-1").name == "everyone"
    assert policies.match("127.0.0.1", "tokenflow-sim-2").name == "big-model"
    assert policies.match("key:batch-jobs", "tokenflow-sim-1").name == "batch"
    assert policies.match("key:batch-jobs", "tokenflow-sim-2").name == "batch-big-model"


def test_example_file_fields() -> None:
    policies = parse_policies(EXAMPLE, "test.toml", SETTINGS)
    batch = policies.match("key:batch-jobs", "tokenflow-sim-1")
    big = policies.match("10.0.0.1", "tokenflow-sim-2")

    assert policies.default.algorithm == SLIDING_WINDOW
    assert batch.algorithm == TOKEN_BUCKET
    assert batch.capacity == 30
    assert batch.window_ms == 3_600_000
    assert batch.tokens == 100_000
    assert big.algorithm == SLIDING_LOG
    assert big.tokens_per_model
    assert policies.match("key:batch-jobs", "tokenflow-sim-2").shadow


def test_without_default_entry_flags_apply() -> None:
    policies = parse_policies(
        '[[policies]]\nname = "one"\nclients = ["10.0.0.9"]\nrequests = 1\nwindow = "1s"\n',
        "test.toml",
        SETTINGS,
    )
    fallback = policies.match("127.0.0.1", "tokenflow-sim-1")

    assert fallback.name == "default"
    assert fallback.algorithm == SLIDING_LOG
    assert fallback.requests == 7
    assert fallback.window_ms == 30_000


def test_key_limit_replaces_unnamed_policy_requests() -> None:
    policies = parse_policies(EXAMPLE, "test.toml", SETTINGS)

    assert policies.match("key:other", "tokenflow-sim-1", key_limit=3).requests == 3
    assert policies.match("key:batch-jobs", "tokenflow-sim-1", key_limit=3).requests == 10


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "a"\nwindow = "1s"', "policy 'a' in test.toml: requests is missing"),
        ('name = "a"\nrequests = 1', "policy 'a' in test.toml: window is missing"),
        ('name = "a"\nrequests = 1\nwindow = "soon"', "policy 'a' in test.toml: window: "),
        ('name = "a"\nrequests = 1\nwindow = "31d"', "window must be a duration string"),
        ('name = "a"\nrequests = 0\nwindow = "1s"', "requests must be a whole number"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\nalgorithm = "leaky"', "algorithm must be"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\ncapacity = 3', "capacity applies only"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\ntokens_per_model = true', "set tokens"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\nshadow = "yes"', "shadow must be true"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\nmodels = ["gpt-9"]', "not in --models"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\nkeys = ["no spaces"]', "not an API key id"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\nlimit = 4', "unknown fields ['limit']"),
        ('name = "a b"\nrequests = 1\nwindow = "1s"', "policy 1 in test.toml: name must be"),
        ('name = "a"\nrequests = 1\nwindow = "1s"\ntokens = 100', "must be below tokens (100)"),
        (
            'name = "a"\nrequests = 1\nwindow = "1s"\nclients = ["127.0.1.0/24"]',
            "networks are not supported",
        ),
    ],
)
def test_invalid_entry_names_entry_and_field(entry: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse(f"[[policies]]\n{entry}\n")

    assert message in str(caught.value)


def test_two_defaults_rejected() -> None:
    text = '[[policies]]\nname = "a"\nrequests = 1\nwindow = "1s"\n' * 1 + (
        '[[policies]]\nname = "b"\nrequests = 1\nwindow = "1s"\n'
    )
    with pytest.raises(ConfigurationError, match="more than one default policy"):
        parse(text)


def test_overlapping_policies_rejected() -> None:
    text = (
        '[[policies]]\nname = "a"\nclients = ["10.0.0.1"]\nrequests = 1\nwindow = "1s"\n'
        '[[policies]]\nname = "b"\nclients = ["10.0.0.1"]\nrequests = 2\nwindow = "1s"\n'
    )
    with pytest.raises(ConfigurationError, match="policies 'a' and 'b' both match '10.0.0.1'"):
        parse(text)


def test_duplicate_names_rejected() -> None:
    text = (
        '[[policies]]\nname = "a"\nclients = ["10.0.0.1"]\nrequests = 1\nwindow = "1s"\n'
        '[[policies]]\nname = "a"\nclients = ["10.0.0.2"]\nrequests = 2\nwindow = "1s"\n'
    )
    with pytest.raises(ConfigurationError, match="'a' appears twice"):
        parse(text)


def test_invalid_toml_names_source() -> None:
    with pytest.raises(ConfigurationError, match="invalid TOML in test.toml"):
        parse("[[policies]\n")
