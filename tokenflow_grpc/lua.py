"""Loading of the Lua scripts under tokenflow_grpc/scripts/.

Each script runs with EVALSHA, and after a NOSCRIPT reply (a restarted
Valkey, a cluster node that never ran it, a promoted replica) once with EVAL,
which caches it on that server again. On a plain TCP or Unix-socket
connection to one Valkey, the scripts go through one AutoPipeline per client,
so the scripts of concurrent calls share a connection and a socket write.
Other clients (TLS, fakeredis, Valkey Cluster) send them through redis-py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from tokenflow_grpc.autopipeline import AutoPipeline
from tokenflow_grpc.metrics import valkey_timer

COMMON = "_common.lua"


def read_script(name: str, with_common: bool = True) -> str:
    """Return the source of one script, with the shared functions prepended."""
    folder = resources.files("tokenflow_grpc") / "scripts"
    source = (folder / name).read_text(encoding="utf-8")
    if with_common:
        source = (folder / COMMON).read_text(encoding="utf-8") + "\n" + source
    return source


class Script:
    """One Lua script, bound to a Valkey client.

    redis-py's own script object handles a NOSCRIPT reply by sending SCRIPT
    LOAD, which a cluster client sends to every primary, so the call fails
    while any primary is down. EVAL goes only to the node of the keys' slot.
    """

    def __init__(self, redis: Any, source: str, name: str) -> None:
        """redis: a redis-py client or an AutoPipeline; name: the operation label
        of the script's Valkey latency metric."""
        self.redis = redis
        self.source = source
        self.name = name
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        """Run the script and return its reply.

        A NOSCRIPT reply means the script did not run, so running it with
        EVAL cannot run it twice.
        """
        with valkey_timer(self.name):
            try:
                return await self.redis.execute_command(
                    "EVALSHA", self.sha, len(keys), *keys, *args
                )
            except NoScriptError:
                return await self.redis.execute_command(
                    "EVAL", self.source, len(keys), *keys, *args
                )


@dataclass(frozen=True)
class Scripts:
    """The registered scripts of one Valkey client.

    pipeline is the AutoPipeline they share, or None when they use redis-py.
    """

    begin_generate: Script
    limit_generate: Script
    claim_generate: Script
    complete_generate: Script
    release_lock: Script
    extend_lock: Script
    charge_tokens: Script
    record_event: Script
    pipeline: AutoPipeline | None = None

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Bind every script to redis; nothing is sent until a script first runs."""
        pipeline = AutoPipeline.for_client(redis)
        if pipeline is not None:
            redis = pipeline
        return cls(
            begin_generate=Script(redis, read_script("begin_generate.lua"), "begin_generate"),
            limit_generate=Script(redis, read_script("limit_generate.lua"), "limit_generate"),
            claim_generate=Script(redis, read_script("claim_generate.lua"), "claim_generate"),
            complete_generate=Script(
                redis, read_script("complete_generate.lua", with_common=False), "complete_generate"
            ),
            release_lock=Script(
                redis, read_script("release_lock.lua", with_common=False), "release_lock"
            ),
            extend_lock=Script(
                redis, read_script("extend_lock.lua", with_common=False), "extend_lock"
            ),
            charge_tokens=Script(
                redis, read_script("charge_tokens.lua", with_common=False), "charge_tokens"
            ),
            record_event=Script(redis, read_script("record_event.lua"), "record_event"),
            pipeline=pipeline,
        )

    async def close(self) -> None:
        """Close the pipeline's connection, if there is one."""
        if self.pipeline is not None:
            await self.pipeline.close()
