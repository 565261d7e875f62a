"""The contract: buf lint, routes, and generated code that matches proto/."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest
from google.api import annotations_pb2

from tokenflow_grpc.v1 import tokenflow_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ROOT / "tokenflow_grpc" / "v1"
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())

    assert fresh == sorted(p.name for p in GENERATED.iterdir() if p.name.startswith("tokenflow_"))
    for name in fresh:
        assert (tmp_path / name).read_text() == (GENERATED / name).read_text(), (
            f"tokenflow_grpc/v1/{name} is stale: run `make proto` and commit the result"
        )


def test_buf_lint_passes() -> None:
    if not BUF.exists():
        pytest.fail("buf is missing: run the tests with `make test`, which installs it")
    if not (ROOT / "build" / "proto-deps" / "google" / "api" / "annotations.proto").exists():
        pytest.fail("build/proto-deps is missing: run the tests with `make test`")
    completed = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True)

    assert completed.returncode == 0, completed.stdout + completed.stderr


def http_rules(method: str) -> list[tuple[str, str, str]]:
    options = (
        pb.DESCRIPTOR.services_by_name["TokenFlowService"].methods_by_name[method].GetOptions()
    )
    rule = options.Extensions[annotations_pb2.http]
    rules = [rule, *rule.additional_bindings]
    return [
        (r.WhichOneof("pattern") or "", getattr(r, r.WhichOneof("pattern") or "get"), r.body)
        for r in rules
    ]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("Generate", [("post", "/v1/generate", "*"), ("post", "/api/generate", "*")]),
        ("GetStats", [("get", "/v1/stats", ""), ("get", "/api/stats", "")]),
        ("Simulate", [("post", "/v1/simulate", "*"), ("post", "/api/simulate", "*")]),
        ("WatchActivity", [("get", "/v1/activity:watch", "")]),
        ("GenerateStream", [("post", "/v1/generate:stream", "*")]),
    ],
)
def test_http_routes(method: str, expected: list[tuple[str, str, str]]) -> None:
    assert http_rules(method) == expected


def test_watch_is_server_streaming() -> None:
    method = pb.DESCRIPTOR.services_by_name["TokenFlowService"].methods_by_name["WatchActivity"]

    assert method.server_streaming is True
    assert method.client_streaming is False


def test_stream_request_matches_generate_request() -> None:
    def fields(message: Any) -> list[tuple[str, int, int]]:
        return [(f.name, f.number, f.type) for f in message.DESCRIPTOR.fields]

    assert fields(pb.GenerateStreamRequest) == fields(pb.GenerateRequest)
