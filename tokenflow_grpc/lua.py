"""Loading of the Lua scripts under tokenflow_grpc/scripts/.

Each script is registered once per connection; redis-py sends EVALSHA and
falls back to EVAL (which caches the script again) after a NOSCRIPT reply,
for example after Valkey restarted.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

COMMON = "_common.lua"


def read_script(name: str, with_common: bool = True) -> str:
    """Return the source of one script, with the shared functions prepended."""
    folder = resources.files("tokenflow_grpc") / "scripts"
    source = (folder / name).read_text(encoding="utf-8")
    if with_common:
        source = (folder / COMMON).read_text(encoding="utf-8") + "\n" + source
    return source


@dataclass(frozen=True)
class Scripts:
    """The registered scripts of one Valkey client."""

    begin_generate: Any
    limit_generate: Any
    claim_generate: Any
    complete_generate: Any
    release_lock: Any
    extend_lock: Any

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        return cls(
            begin_generate=redis.register_script(read_script("begin_generate.lua")),
            limit_generate=redis.register_script(read_script("limit_generate.lua")),
            claim_generate=redis.register_script(read_script("claim_generate.lua")),
            complete_generate=redis.register_script(
                read_script("complete_generate.lua", with_common=False)
            ),
            release_lock=redis.register_script(read_script("release_lock.lua", with_common=False)),
            extend_lock=redis.register_script(read_script("extend_lock.lua", with_common=False)),
        )
