"""API key authentication over real gRPC and HTTP: missing, wrong and valid
keys in both metadata forms, admin-only Simulate, prompts redacted for user
keys, per-key limits and the key id as the client identity."""

from __future__ import annotations

import asyncio
import io
import tomllib
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Running, RunningGateway, make_settings
from tokenflow_grpc.apikeys import ApiKey, KeyStore, entry_toml, hash_secret, new_secret
from tokenflow_grpc.auth import PROMPT_REDACTED, presented_secret
from tokenflow_grpc.cli import main
from tokenflow_grpc.errors import ConfigurationError, UnauthenticatedError
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

SERVER_LIMIT = 10
USER_LIMIT = 3
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
WATCH_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Keys:
    """The secrets of the test server's three keys and the TOML that configures them."""

    admin: str
    user: str
    limited: str
    toml: str


@pytest.fixture(scope="module")
def keys() -> Keys:
    admin, user, limited = new_secret(), new_secret(), new_secret()
    toml = "".join(
        entry_toml(key)
        for key in (
            ApiKey("ops", hash_secret(admin), "admin"),
            ApiKey("web", hash_secret(user), "user"),
            ApiKey("batch", hash_secret(limited), "user", USER_LIMIT),
        )
    )
    return Keys(admin, user, limited, toml)


@pytest.fixture
async def secured(start_server: Any, valkey_url: str, keys: Keys) -> Running:
    """A server on the embedded Valkey that requires API keys."""
    running: Running = await start_server(valkey_url, api_keys=keys.toml, rate_limit=SERVER_LIMIT)
    return running


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def api_key(secret: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", secret),)


def stub(running: Running) -> pb_grpc.TokenFlowServiceStub:
    return pb_grpc.TokenFlowServiceStub(running.channel())


async def status_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# Key store and metadata parsing.


def test_key_store_finds_matching_secret(keys: Keys) -> None:
    store = KeyStore.from_toml(keys.toml, "test", SERVER_LIMIT)

    found = store.find(keys.limited)

    assert found is not None
    assert found.id == "batch"
    assert found.limit == USER_LIMIT
    assert store.find(keys.limited + "x") is None
    assert store.find("") is None


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("keys = [", "invalid TOML"),
        ("", "has no .* tables"),
        ("keys = []", "empty"),
        ("other = 1\nkeys = []", "unknown top-level"),
        ('[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\nrloe = "admin"', "unknown fields"),
        ('[[keys]]\nid = "a b"\nsha256 = "' + "0" * 64 + '"', "id must be"),
        ('[[keys]]\nid = "a"\nsha256 = "tfk_secret"', "sha256 must be 64 hex"),
        ('[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\nrole = "root"', "role must be"),
        ('[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\nlimit = 0', "limit must be"),
        ('[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\nlimit = true', "limit must be"),
        (
            '[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\n'
            '[[keys]]\nid = "a"\nsha256 = "' + "1" * 64 + '"',
            "appears twice",
        ),
        (
            '[[keys]]\nid = "a"\nsha256 = "' + "0" * 64 + '"\n'
            '[[keys]]\nid = "b"\nsha256 = "' + "0" * 64 + '"',
            "same sha256",
        ),
    ],
)
def test_key_store_rejects_invalid_toml(toml: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KeyStore.from_toml(toml, "test", SERVER_LIMIT)


def test_key_file_unreadable_names_path(tmp_path: Any) -> None:
    missing = tmp_path / "missing.toml"

    with pytest.raises(ConfigurationError, match="missing.toml"):
        KeyStore.from_file(str(missing), SERVER_LIMIT)


def test_settings_reject_both_key_sources(keys: Keys, tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="both set"):
        make_settings("memory://x", api_keys=keys.toml, api_keys_file=str(tmp_path / "k.toml"))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-api-key", "abc"),), "abc"),
        ((("authorization", "Bearer abc"), ("x-api-key", "abc")), "abc"),
    ],
)
def test_presented_secret_accepts(metadata: Any, expected: str) -> None:
    assert presented_secret(metadata) == expected


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing API key"),
        ((("x-api-key", ""),), "missing API key"),
        ((("authorization", "Basic YTpi"),), "Bearer KEY"),
        ((("authorization", "Bearer"),), "Bearer KEY"),
        ((("authorization", "Bearer abc"), ("x-api-key", "def")), "more than one"),
    ],
)
def test_presented_secret_rejects(metadata: Any, message: str) -> None:
    with pytest.raises(UnauthenticatedError, match=message):
        presented_secret(metadata)


# The keys command.


def test_keys_new_prints_matching_entry(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["keys", "new", "--id", "svc-1", "--role", "admin", "--limit", "7"])

    output = capsys.readouterr()
    secret = output.err.splitlines()[-1]
    entry = tomllib.loads(output.out)["keys"][0]
    assert code == 0
    assert secret.startswith("tfk_")
    assert entry == {"id": "svc-1", "sha256": hash_secret(secret), "role": "admin", "limit": 7}
    assert secret not in output.out


def test_keys_new_rejects_bad_id(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["keys", "new", "--id", "a b"])

    assert code == 2
    assert "--id must be" in capsys.readouterr().err


def test_keys_hash_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("tfk_example\n"))
    output = io.StringIO()
    with redirect_stdout(output):
        code = main(["keys", "hash"])

    assert code == 0
    assert output.getvalue().strip() == hash_secret("tfk_example")


# gRPC.


async def test_grpc_calls_without_key_unauthenticated(secured: Running) -> None:
    service = stub(secured)

    calls = {
        "Generate": service.Generate(pb.GenerateRequest(prompt="hi")),
        "GetStats": service.GetStats(pb.GetStatsRequest()),
        "Simulate": service.Simulate(pb.SimulateRequest(count=1)),
    }
    for name, call in calls.items():
        assert await status_of(call) == grpc.StatusCode.UNAUTHENTICATED, name

    watch = service.WatchActivity(pb.WatchActivityRequest(), timeout=WATCH_TIMEOUT_SECONDS)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch.read()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_grpc_wrong_key_unauthenticated(secured: Running, keys: Keys) -> None:
    wrong = keys.user[:-1] + ("A" if keys.user[-1] != "A" else "B")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(secured).Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer(wrong))

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert raised.value.details() == "invalid API key"
    assert wrong not in str(raised.value.trailing_metadata())


async def test_grpc_basic_scheme_unauthenticated(secured: Running, keys: Keys) -> None:
    call = stub(secured).Generate(
        pb.GenerateRequest(prompt="hi"), metadata=(("authorization", f"Basic {keys.user}"),)
    )

    assert await status_of(call) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("form", [bearer, api_key], ids=["bearer", "x-api-key"])
async def test_grpc_valid_key_admitted(secured: Running, keys: Keys, form: Any) -> None:
    response = await stub(secured).Generate(
        pb.GenerateRequest(prompt="valid key"), metadata=form(keys.user)
    )

    assert response.response
    assert response.rate_limit.limit == SERVER_LIMIT


async def test_health_and_reflection_stay_open(secured: Running) -> None:
    channel = secured.channel()

    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [
        service.name
        async for reply in reflection
        for service in reply.list_services_response.service
    ]

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "tokenflow.v1.TokenFlowService" in services


async def test_simulate_needs_admin(secured: Running, keys: Keys) -> None:
    service = stub(secured)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.Simulate(pb.SimulateRequest(count=2), metadata=bearer(keys.user))
    admitted = await service.Simulate(pb.SimulateRequest(count=2), metadata=bearer(keys.admin))

    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in (raised.value.details() or "")
    assert admitted.summary.total == 2


async def test_per_key_limit_exact(secured: Running, keys: Keys) -> None:
    service = stub(secured)

    calls = [
        service.Generate(pb.GenerateRequest(prompt=f"burst {i}"), metadata=bearer(keys.limited))
        for i in range(12)
    ]
    codes = await asyncio.gather(*(status_of(call) for call in calls))
    other = await service.Generate(
        pb.GenerateRequest(prompt="other key"), metadata=bearer(keys.user)
    )

    assert codes.count(grpc.StatusCode.OK) == USER_LIMIT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 12 - USER_LIMIT
    assert other.rate_limit.limit == SERVER_LIMIT


async def test_limit_metadata_is_key_limit(secured: Running, keys: Keys) -> None:
    call = stub(secured).Generate(
        pb.GenerateRequest(prompt="limit metadata"), metadata=bearer(keys.limited)
    )
    response = await call
    metadata = dict(await call.initial_metadata())

    assert response.rate_limit.limit == USER_LIMIT
    assert metadata["x-ratelimit-limit"] == str(USER_LIMIT)
    assert metadata["x-ratelimit-remaining"] == str(USER_LIMIT - 1)


async def test_identity_is_key_id_despite_xff(secured: Running, keys: Keys) -> None:
    # The default trusted proxies include loopback, so without a key each
    # x-forwarded-for value below would be a client of its own.
    service = stub(secured)
    codes = []
    for i in range(USER_LIMIT + 2):
        metadata = (*bearer(keys.limited), ("x-forwarded-for", f"203.0.113.{i + 1}"))
        codes.append(
            await status_of(
                service.Generate(pb.GenerateRequest(prompt=f"xff {i}"), metadata=metadata)
            )
        )

    stats = await service.GetStats(pb.GetStatsRequest(), metadata=bearer(keys.admin))
    consumers = {consumer.client: consumer.requests for consumer in stats.rate_limit.top_consumers}
    assert codes.count(grpc.StatusCode.OK) == USER_LIMIT
    assert consumers.get("key:batch") == USER_LIMIT + 2
    assert not any(client.startswith("203.0.113.") for client in consumers)


async def test_rejection_names_key_identity(secured: Running, keys: Keys) -> None:
    service = stub(secured)
    for i in range(USER_LIMIT):
        await service.Generate(
            pb.GenerateRequest(prompt=f"fill {i}"), metadata=bearer(keys.limited)
        )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.Generate(pb.GenerateRequest(prompt="over"), metadata=bearer(keys.limited))

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "key:batch" in (raised.value.details() or "")


async def test_stats_prompts_redacted_for_user(secured: Running, keys: Keys) -> None:
    service = stub(secured)
    await service.Generate(pb.GenerateRequest(prompt="secret prompt"), metadata=bearer(keys.user))

    as_user = await service.GetStats(pb.GetStatsRequest(), metadata=bearer(keys.user))
    as_admin = await service.GetStats(pb.GetStatsRequest(), metadata=bearer(keys.admin))

    assert [event.prompt for event in as_user.activity] == [PROMPT_REDACTED]
    assert [event.client for event in as_user.activity] == ["key:web"]
    assert [event.prompt for event in as_admin.activity] == ["secret prompt"]


async def open_watch(service: pb_grpc.TokenFlowServiceStub, secret: str) -> Any:
    call = service.WatchActivity(
        pb.WatchActivityRequest(), metadata=bearer(secret), timeout=WATCH_TIMEOUT_SECONDS
    )
    await call.initial_metadata()
    return call


async def test_watch_prompts_redacted_for_user(secured: Running, keys: Keys) -> None:
    service = stub(secured)
    user_watch = await open_watch(service, keys.user)
    admin_watch = await open_watch(service, keys.admin)

    await service.Generate(pb.GenerateRequest(prompt="watched prompt"), metadata=bearer(keys.user))
    seen_by_user = await asyncio.wait_for(user_watch.read(), 10.0)
    seen_by_admin = await asyncio.wait_for(admin_watch.read(), 10.0)
    user_watch.cancel()
    admin_watch.cancel()

    assert seen_by_user.event.prompt == PROMPT_REDACTED
    assert seen_by_user.event.client == "key:web"
    assert seen_by_admin.event.prompt == "watched prompt"


async def test_no_keys_leaves_calls_open(running_valkey: Running) -> None:
    await running_valkey.client.generate("open prompt")

    stats = await running_valkey.client.stats()

    assert [event.prompt for event in stats.activity] == ["open prompt"]


# HTTP through the gateway.


@pytest.fixture
async def secured_gateway(start_gateway_for: Any, secured: Running) -> RunningGateway:
    result: RunningGateway = await start_gateway_for(secured.address)
    return result


async def post(
    gateway: RunningGateway, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], Any]:
    async with gateway.session.post(
        gateway.url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT
    ) as response:
        return response.status, await response.json(), response.headers


async def test_http_without_key_401(secured_gateway: RunningGateway) -> None:
    status, body, headers = await post(secured_gateway, "/v1/generate", {"prompt": "hi"}, {})

    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_http_wrong_key_401(secured_gateway: RunningGateway) -> None:
    status, _, headers = await post(
        secured_gateway, "/v1/generate", {"prompt": "hi"}, {"Authorization": "Bearer nope"}
    )

    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_http_valid_key_200(secured_gateway: RunningGateway, keys: Keys, header: str) -> None:
    value = f"Bearer {keys.user}" if header == "Authorization" else keys.user

    status, body, headers = await post(
        secured_gateway, "/v1/generate", {"prompt": "http valid"}, {header: value}
    )

    assert status == 200
    assert body["response"]
    assert "WWW-Authenticate" not in headers


async def test_http_simulate_needs_admin(secured_gateway: RunningGateway, keys: Keys) -> None:
    as_user = await post(secured_gateway, "/v1/simulate", {"count": 1}, {"X-API-Key": keys.user})
    as_admin = await post(secured_gateway, "/v1/simulate", {"count": 1}, {"X-API-Key": keys.admin})

    assert as_user[0] == 403
    assert as_admin[0] == 200


async def test_http_watch_without_key_401(secured_gateway: RunningGateway) -> None:
    async with secured_gateway.session.get(
        secured_gateway.url + "/v1/activity:watch", timeout=HTTP_TIMEOUT
    ) as response:
        status = response.status
        headers = response.headers

    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_http_per_key_limit_ignores_xff(secured_gateway: RunningGateway, keys: Keys) -> None:
    statuses = []
    for i in range(USER_LIMIT + 2):
        status, _, _ = await post(
            secured_gateway,
            "/v1/generate",
            {"prompt": f"http xff {i}"},
            {"X-API-Key": keys.limited, "X-Forwarded-For": f"198.51.100.{i + 1}"},
        )
        statuses.append(status)

    assert statuses == [200] * USER_LIMIT + [429, 429]


async def test_http_stats_redacted_for_user(secured_gateway: RunningGateway, keys: Keys) -> None:
    await post(secured_gateway, "/v1/generate", {"prompt": "http secret"}, {"X-API-Key": keys.user})

    async with secured_gateway.session.get(
        secured_gateway.url + "/v1/stats", headers={"X-API-Key": keys.user}, timeout=HTTP_TIMEOUT
    ) as response:
        body = await response.json()

    assert response.status == 200
    assert [event["prompt"] for event in body["activity"]] == [PROMPT_REDACTED]


def test_key_list_inline_toml() -> None:
    # A key list passed through TOKENFLOW_API_KEYS fits on one line as inline tables.
    digest = hash_secret("tfk_inline")
    text = f'keys = [{{id = "ci", sha256 = "{digest}", role = "admin"}}]'

    store = KeyStore.from_toml(text, "TOKENFLOW_API_KEYS", SERVER_LIMIT)

    assert store.find("tfk_inline") == ApiKey("ci", digest, "admin", None)
