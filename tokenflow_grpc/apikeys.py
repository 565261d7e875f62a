"""API keys: the key store read from TOML, key hashing and key generation.

A key file lists one table per key:

    [[keys]]
    id = "billing-service"   # the client identity becomes key:billing-service
    sha256 = "9f86d0..."     # SHA-256 of the secret, 64 hex digits
    role = "user"            # user (the default) or admin
    limit = 100              # optional: requests per window, instead of --rate-limit

Only hashes are stored, so the file contains no secret. Secrets made by
new_secret() carry 256 random bits, which is why an unsalted SHA-256 is
enough: a salt protects guessable passwords, and these cannot be guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenflow_grpc.errors import ConfigurationError

ROLE_USER = "user"
ROLE_ADMIN = "admin"
ROLES = (ROLE_USER, ROLE_ADMIN)
# Key ids become part of the client identity and of Valkey key names.
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SECRET_PREFIX = "tfk_"
SECRET_BYTES = 32
ENTRY_FIELDS = frozenset({"id", "sha256", "role", "limit"})


@dataclass(frozen=True)
class ApiKey:
    """One configured key; limit is None where the key uses the server's --rate-limit."""

    id: str
    sha256: str
    role: str = ROLE_USER
    limit: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    @property
    def client(self) -> str:
        """The client identity that the rate limiter and the activity stream use."""
        return f"key:{self.id}"


def hash_secret(secret: str) -> str:
    """Return the SHA-256 hex digest of secret, as a key file stores it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """Return a new random API key: the prefix and 256 random bits, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


class KeyStore:
    """The configured keys, looked up by secret in time independent of which key matches."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ConfigurationError(
                "the API key list is empty, so every call would be rejected; add a [[keys]] "
                "entry (tokenflow keys new prints one) or remove the API key setting"
            )
        _check_unique(self.keys)

    def find(self, secret: str) -> ApiKey | None:
        """Return the key whose hash matches secret, or None.

        Every entry is compared with hmac.compare_digest, without stopping at
        a match, so the time taken does not tell which entry matched.
        """
        digest = hash_secret(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    @classmethod
    def from_toml(cls, text: str, source: str, max_limit: int) -> KeyStore:
        """Parse a key document; source names it (a path or a variable) in errors."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigurationError(f"invalid TOML in {source}: {error}") from error
        entries = document.get("keys")
        unknown = set(document) - {"keys"}
        if unknown:
            raise ConfigurationError(
                f"unknown top-level entries {sorted(unknown)} in {source}; "
                "the file holds only [[keys]] tables"
            )
        if not isinstance(entries, list):
            raise ConfigurationError(
                f"{source} has no [[keys]] tables; each key needs an id and a sha256"
            )
        return cls(
            _parse_entry(entry, index, source, max_limit) for index, entry in enumerate(entries)
        )

    @classmethod
    def from_file(cls, path: str, max_limit: int) -> KeyStore:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigurationError(f"cannot read the API key file {path!r}: {error}") from error
        return cls.from_toml(text, f"API key file {path!r}", max_limit)


def _parse_entry(entry: Any, index: int, source: str, max_limit: int) -> ApiKey:
    where = f"key {index + 1} in {source}"
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where} must be a table with id and sha256")
    unknown = set(entry) - ENTRY_FIELDS
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown fields {sorted(unknown)}; allowed: {sorted(ENTRY_FIELDS)}"
        )

    key_id = entry.get("id")
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise ConfigurationError(
            f"{where}: id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', "
            f"got {key_id!r}"
        )
    where = f"key {key_id!r} in {source}"

    digest = entry.get("sha256")
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.lower()):
        raise ConfigurationError(
            f"{where}: sha256 must be 64 hex digits (`tokenflow keys new` prints one); "
            "never write the key itself in the file"
        )

    role = entry.get("role", ROLE_USER)
    if role not in ROLES:
        raise ConfigurationError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")

    limit = entry.get("limit")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit
    ):
        raise ConfigurationError(
            f"{where}: limit must be a whole number from 1 to {max_limit}, got {limit!r}"
        )
    return ApiKey(key_id, digest.lower(), role, limit)


def _check_unique(keys: tuple[ApiKey, ...]) -> None:
    ids: set[str] = set()
    digests: set[str] = set()
    for key in keys:
        if key.id in ids:
            raise ConfigurationError(f"the API key id {key.id!r} appears twice")
        if key.sha256 in digests:
            raise ConfigurationError(
                f"the API key {key.id!r} has the same sha256 as another key; "
                "give each client its own key"
            )
        ids.add(key.id)
        digests.add(key.sha256)


def entry_toml(key: ApiKey) -> str:
    """Return key as a [[keys]] table for a key file."""
    lines = ["[[keys]]", f'id = "{key.id}"', f'sha256 = "{key.sha256}"', f'role = "{key.role}"']
    if key.limit is not None:
        lines.append(f"limit = {key.limit}")
    return "\n".join(lines) + "\n"
