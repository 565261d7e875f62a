"""`tokenflow keys`: make a new API key with its key file entry, or hash a key."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokenflow_grpc.apikeys import (
    KEY_ID,
    ROLE_USER,
    ROLES,
    ApiKey,
    entry_toml,
    hash_secret,
    new_secret,
)
from tokenflow_grpc.settings import MAX_RATE_LIMIT


def add_keys_parser(commands: Any) -> None:
    """Add `keys new` and `keys hash` to the subcommands of the `tokenflow` parser."""
    keys_parser = commands.add_parser(
        "keys", help="Create API keys and print their SHA-256 for a key file."
    )
    actions = keys_parser.add_subparsers(dest="keys_command", required=True)

    new_parser = actions.add_parser(
        "new",
        help="Print a new random API key on standard error and its [[keys]] entry for "
        "--api-keys-file on standard output. The entry holds only the key's SHA-256.",
    )
    new_parser.add_argument("--id", required=True, help="Key id; the client becomes key:ID.")
    new_parser.add_argument("--role", choices=ROLES, default=ROLE_USER, help="Role of the key.")
    new_parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Requests per window for this key (default: the server's --rate-limit).",
    )

    actions.add_parser(
        "hash", help="Read one API key from standard input and print its SHA-256 hex digest."
    )


def run_keys(arguments: argparse.Namespace) -> int:
    if arguments.keys_command == "hash":
        return _print_hash()
    return _print_new_key(arguments)


def _print_hash() -> int:
    secret = sys.stdin.readline().strip()
    if not secret:
        print("tokenflow keys hash: standard input has no key on its first line", file=sys.stderr)
        return 2
    print(hash_secret(secret))
    return 0


def _print_new_key(arguments: argparse.Namespace) -> int:
    if not KEY_ID.fullmatch(arguments.id):
        print(
            f"tokenflow keys new: --id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' "
            f"or '-', got {arguments.id!r}",
            file=sys.stderr,
        )
        return 2
    if arguments.limit is not None and not 1 <= arguments.limit <= MAX_RATE_LIMIT:
        print(
            f"tokenflow keys new: --limit must be from 1 to {MAX_RATE_LIMIT}, "
            f"got {arguments.limit}",
            file=sys.stderr,
        )
        return 2

    secret = new_secret()
    key = ApiKey(arguments.id, hash_secret(secret), arguments.role, arguments.limit)
    # The key goes to standard error, so `keys new >> keys.toml` writes only the hash.
    print(f"API key {key.id!r}, shown once because only its hash is kept:", file=sys.stderr)
    print(secret, file=sys.stderr)
    print(entry_toml(key), end="")
    return 0
