"""Loading of the Lua scripts under tokenflow_grpc/scripts/.

Scripts run by EVALSHA. On a plain TCP or Unix-socket connection they go
through one AutoPipeline per Valkey client, so the scripts of concurrent
calls share a connection and a socket write, and a NOSCRIPT reply (after
Valkey restarted, for example) makes the call go again as EVAL, which
caches the script. Other clients (TLS, fakeredis, Valkey Cluster) use
redis-py's registered scripts, which load the script again after NOSCRIPT.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from tokenflow_grpc.autopipeline import AutoPipeline, PipelinedScript

COMMON = "_common.lua"


class Script(Protocol):
    """A registered script: `await script(keys=[...], args=[...])` returns its reply."""

    def __call__(self, keys: list[Any], args: list[Any]) -> Awaitable[Any]: ...


def read_script(name: str, with_common: bool = True) -> str:
    """Return the source of one script, with the shared functions prepended."""
    folder = resources.files("tokenflow_grpc") / "scripts"
    source = (folder / name).read_text(encoding="utf-8")
    if with_common:
        source = (folder / COMMON).read_text(encoding="utf-8") + "\n" + source
    return source


@dataclass(frozen=True)
class Scripts:
    """The registered scripts of one Valkey client.

    pipeline is the AutoPipeline they share, or None when they use redis-py.
    """

    begin_generate: Script
    claim_generate: Script
    complete_generate: Script
    release_lock: Script
    extend_lock: Script
    pipeline: AutoPipeline | None = None

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        pipeline = AutoPipeline.for_client(redis)

        def script(name: str, with_common: bool = True) -> Script:
            source = read_script(name, with_common)
            if pipeline is None:
                registered: Script = redis.register_script(source)
                return registered
            return PipelinedScript(pipeline, source)

        return cls(
            begin_generate=script("begin_generate.lua"),
            claim_generate=script("claim_generate.lua"),
            complete_generate=script("complete_generate.lua", with_common=False),
            release_lock=script("release_lock.lua", with_common=False),
            extend_lock=script("extend_lock.lua", with_common=False),
            pipeline=pipeline,
        )

    async def close(self) -> None:
        """Close the pipeline's connection, if there is one."""
        if self.pipeline is not None:
            await self.pipeline.close()
