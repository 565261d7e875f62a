"""Limit policies: which rate limit and token budget apply to a call, read
from a TOML file (`--policies-file`) and matched per client and per model.

A policy file lists one table per policy:

    [[policies]]
    name = "batch"                 # unique; reported in RateLimit.policy
    keys = ["batch-jobs"]          # API key ids; optional
    clients = ["10.0.0.7"]         # client identities (addresses); optional
    models = ["tokenflow-sim-2"]   # optional
    algorithm = "token_bucket"     # sliding_log (default), sliding_window, token_bucket
    requests = 10                  # per window; a token bucket refills this many per window
    window = "1m"                  # 500ms, 90s, 1h, 1h30m, 2d; at most 30 days
    capacity = 30                  # token_bucket only: burst size, default `requests`
    tokens = 50000                 # optional token budget per window
    tokens_per_model = true        # one budget per model instead of one per client
    default_max_tokens = 256       # completion tokens assumed when a request sets no max_tokens
    shadow = true                  # count and report, never reject

A call gets the most specific policy that matches it: client and model,
then client, then model, then the entry with no match fields (the default).
Without a default entry, the --rate-limit / --rate-window sliding log applies.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenflow_grpc.apikeys import KEY_ID
from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.settings import MAX_RATE_LIMIT, MAX_WINDOW_SECONDS, Settings

logger = logging.getLogger(__name__)

SLIDING_LOG = "sliding_log"
SLIDING_WINDOW = "sliding_window"
TOKEN_BUCKET = "token_bucket"
ALGORITHMS = (SLIDING_LOG, SLIDING_WINDOW, TOKEN_BUCKET)
# The name of the policy built from --rate-limit and --rate-window.
DEFAULT_POLICY_NAME = "default"
POLICY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENTRY_FIELDS = frozenset(
    {
        "name",
        "keys",
        "clients",
        "models",
        "algorithm",
        "requests",
        "window",
        "capacity",
        "tokens",
        "tokens_per_model",
        "default_max_tokens",
        "shadow",
    }
)
# Budgets above this lose precision in the Lua scripts, whose numbers are
# doubles that Valkey stores as text with 14 significant digits.
MAX_TOKENS = 10**12
DEFAULT_MAX_TOKENS = 256
MAX_WINDOW_MS = int(MAX_WINDOW_SECONDS * 1000)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclass(frozen=True)
class Policy:
    """One limit policy.

    requests and window_ms: requests per window; a token bucket refills
    `requests` requests per window up to `capacity`. tokens is the token
    budget per window, None for no budget.
    """

    name: str
    algorithm: str = SLIDING_LOG
    requests: int = 10
    window_ms: int = 60_000
    capacity: int = 10
    tokens: int | None = None
    tokens_per_model: bool = False
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    shadow: bool = False
    clients: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()

    @property
    def specificity(self) -> int:
        """2 for a client match plus 1 for a model match: the more, the earlier it applies."""
        return 2 * bool(self.clients) + bool(self.models)

    def with_requests(self, requests: int) -> Policy:
        """Return this policy with another request limit (an API key's own limit).

        A token bucket whose capacity followed `requests` keeps following it.
        """
        capacity = requests if self.capacity == self.requests else self.capacity
        return dataclasses.replace(self, requests=requests, capacity=capacity)


class PolicySet:
    """The policies in force, looked up by client and model in constant time."""

    def __init__(self, policies: Iterable[Policy], default: Policy, source: str = "") -> None:
        """source: the file the policies came from, empty for the flags' default alone."""
        self.policies = tuple(policies)
        self.default = default
        self.source = source
        self._by_client_model: dict[tuple[str, str], Policy] = {}
        self._by_client: dict[str, Policy] = {}
        self._by_model: dict[str, Policy] = {}
        for policy in self.policies:
            self._index(policy)

    def match(self, client: str, model: str, key_limit: int | None = None) -> Policy:
        """Return the policy of a call from client for model.

        key_limit, an API key's own limit, replaces the matched policy's
        `requests`, unless that policy names the client in `keys` or `clients`.
        """
        policy = (
            self._by_client_model.get((client, model))
            or self._by_client.get(client)
            or self._by_model.get(model)
        )
        if policy is not None and client in policy.clients:
            return policy
        policy = policy or self.default
        if key_limit is not None and key_limit != policy.requests:
            return policy.with_requests(key_limit)
        return policy

    def _index(self, policy: Policy) -> None:
        pairs: list[tuple[dict[Any, Policy], Any]] = []
        if policy.clients and policy.models:
            table: dict[Any, Policy] = self._by_client_model
            pairs = [(table, (c, m)) for c in policy.clients for m in policy.models]
        elif policy.clients:
            pairs = [(self._by_client, c) for c in policy.clients]
        elif policy.models:
            pairs = [(self._by_model, m) for m in policy.models]
        for table, match in pairs:
            other = table.get(match)
            if other is not None:
                raise ConfigurationError(
                    f"policies {other.name!r} and {policy.name!r} both match {_describe(match)}; "
                    "narrow one of them so each call has one policy"
                )
            table[match] = policy


def flags_policy(settings: Settings) -> Policy:
    """Return the sliding-log policy of --rate-limit and --rate-window."""
    return Policy(
        name=DEFAULT_POLICY_NAME,
        requests=settings.rate_limit,
        window_ms=settings.rate_window_ms,
        capacity=settings.rate_limit,
    )


def load_policies(settings: Settings) -> PolicySet:
    """Return the policies of --policies-file, or the flags' default alone when it is unset.

    Raises ConfigurationError naming the file, the entry and the field of the first error.
    """
    if not settings.policies_file:
        return PolicySet((), flags_policy(settings))
    path = settings.policies_file
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read the policy file {path!r}: {error}") from error
    return parse_policies(text, f"policy file {path!r}", settings)


def parse_policies(text: str, source: str, settings: Settings) -> PolicySet:
    """Parse a policy document; source names it (a path) in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"invalid TOML in {source}: {error}") from error
    unknown = set(document) - {"policies"}
    if unknown:
        raise ConfigurationError(
            f"unknown top-level entries {sorted(unknown)} in {source}; "
            "the file holds only [[policies]] tables"
        )
    entries = document.get("policies")
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(
            f"{source} has no [[policies]] tables; each policy needs a name, requests and a window"
        )

    policies = [_parse_entry(entry, index, source, settings) for index, entry in enumerate(entries)]
    _check_unique_names(policies, source)
    defaults = [policy for policy in policies if policy.specificity == 0]
    if len(defaults) > 1:
        names = ", ".join(repr(policy.name) for policy in defaults)
        raise ConfigurationError(
            f"{source} has more than one default policy (no keys, clients or models): {names}; "
            "keep one"
        )
    default = defaults[0] if defaults else flags_policy(settings)
    specific = [policy for policy in policies if policy.specificity > 0]
    try:
        return PolicySet(specific, default, source)
    except ConfigurationError as error:
        raise ConfigurationError(f"{source}: {error}") from error


def parse_duration(text: str) -> int:
    """Return a duration such as "90s", "1h30m" or "250ms" in milliseconds.

    Raises ValueError for any other text.
    """
    compact = text.strip().replace(" ", "")
    position = 0
    total = 0.0
    for part in _DURATION_PART.finditer(compact):
        if part.start() != position:
            break
        total += float(part.group(1)) * _UNIT_MS[part.group(2)]
        position = part.end()
    if not compact or position != len(compact):
        raise ValueError(f"expected a duration such as 500ms, 90s, 15m, 1h30m or 2d, got {text!r}")
    return round(total)


def _describe(match: Any) -> str:
    if isinstance(match, tuple):
        return f"client {match[0]!r} with model {match[1]!r}"
    return repr(match)


def _check_unique_names(policies: list[Policy], source: str) -> None:
    seen: set[str] = set()
    for policy in policies:
        if policy.name in seen:
            raise ConfigurationError(f"the policy name {policy.name!r} appears twice in {source}")
        seen.add(policy.name)


def _whole(entry: dict[str, Any], name: str, where: str, low: int, high: int) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"{where}: {name} must be a whole number from {low} to {high}, got {value!r}"
        )
    return value


def _flag(entry: dict[str, Any], name: str, where: str) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _names(entry: dict[str, Any], name: str, where: str) -> list[str]:
    value = entry.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{where}: {name} must be a list of non-empty strings")
    return value


def _parse_match(
    entry: dict[str, Any], where: str, settings: Settings
) -> tuple[set[str], set[str]]:
    clients = set(_names(entry, "clients", where))
    for client in clients:
        if "/" in client or any(c.isspace() for c in client):
            raise ConfigurationError(
                f"{where}: clients lists {client!r}, which is not one client identity; "
                "list each address (or key:ID) on its own, networks are not supported"
            )
    for key_id in _names(entry, "keys", where):
        if not KEY_ID.fullmatch(key_id):
            raise ConfigurationError(
                f"{where}: keys lists {key_id!r}, which is not an API key id "
                "(1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-')"
            )
        clients.add(f"key:{key_id}")
    models = set(_names(entry, "models", where))
    unknown_models = models - set(settings.models)
    if unknown_models:
        raise ConfigurationError(
            f"{where}: models {sorted(unknown_models)} are not in --models {list(settings.models)}"
        )
    return clients, models


def _parse_window(entry: dict[str, Any], where: str) -> int:
    raw = entry.get("window")
    if raw is None:
        raise ConfigurationError(f'{where}: window is missing; set a duration such as "60s"')
    try:
        window_ms = parse_duration(raw) if isinstance(raw, str) else -1
    except ValueError as error:
        raise ConfigurationError(f"{where}: window: {error}") from error
    if not 1 <= window_ms <= MAX_WINDOW_MS:
        raise ConfigurationError(
            f'{where}: window must be a duration string from "1ms" to "30d", got {raw!r}'
        )
    return window_ms


def _parse_entry(entry: Any, index: int, source: str, settings: Settings) -> Policy:
    where = f"policy {index + 1} in {source}"
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where} must be a table with name, requests and window")
    unknown = set(entry) - ENTRY_FIELDS
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown fields {sorted(unknown)}; allowed: {sorted(ENTRY_FIELDS)}"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not POLICY_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{where}: name must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', "
            f"got {name!r}"
        )
    where = f"policy {name!r} in {source}"

    algorithm = entry.get("algorithm", SLIDING_LOG)
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(
            f"{where}: algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}"
        )
    requests = _whole(entry, "requests", where, 1, MAX_RATE_LIMIT)
    if requests is None:
        raise ConfigurationError(f"{where}: requests is missing; set the requests per window")
    window_ms = _parse_window(entry, where)
    capacity = _whole(entry, "capacity", where, 1, MAX_RATE_LIMIT)
    if capacity is not None and algorithm != TOKEN_BUCKET:
        raise ConfigurationError(
            f"{where}: capacity applies only to algorithm = {TOKEN_BUCKET!r}; remove it or "
            "change the algorithm"
        )
    tokens = _whole(entry, "tokens", where, 1, MAX_TOKENS)
    default_max_tokens = _whole(entry, "default_max_tokens", where, 1, MAX_TOKENS)
    tokens_per_model = _flag(entry, "tokens_per_model", where)
    if tokens is None and (tokens_per_model or default_max_tokens is not None):
        raise ConfigurationError(
            f"{where}: tokens_per_model and default_max_tokens need a token budget; set tokens"
        )
    if tokens is not None and (default_max_tokens or DEFAULT_MAX_TOKENS) >= tokens:
        raise ConfigurationError(
            f"{where}: default_max_tokens ({default_max_tokens or DEFAULT_MAX_TOKENS}) must be "
            f"below tokens ({tokens}), or no request without max_tokens could ever fit the budget"
        )
    clients, models = _parse_match(entry, where, settings)
    return Policy(
        name=name,
        algorithm=algorithm,
        requests=requests,
        window_ms=window_ms,
        capacity=capacity or requests,
        tokens=tokens,
        tokens_per_model=tokens_per_model,
        default_max_tokens=default_max_tokens or DEFAULT_MAX_TOKENS,
        shadow=_flag(entry, "shadow", where),
        clients=frozenset(clients),
        models=frozenset(models),
    )
