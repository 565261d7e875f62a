"""The `tokenflow` command: serve, gateway, generate, stats, watch, simulate, dashboard."""

from __future__ import annotations

import os

# `serve` forks its gateway and Valkey children after gRPC has started its
# threads; gRPC's fork handlers are not needed for a child that runs exec().
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from tokenflow_grpc.apikeys_command import add_keys_parser, run_keys
from tokenflow_grpc.cli_security import (
    add_client_security_arguments,
    client_options,
    gateway_tls_arguments,
    gateway_tls_options,
)
from tokenflow_grpc.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, AsyncTokenFlowClient
from tokenflow_grpc.dashboard.model import (
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_SIMULATE_COUNT,
    DashboardOptions,
)
from tokenflow_grpc.errors import ConfigurationError
from tokenflow_grpc.logformat import configure_logging
from tokenflow_grpc.settings import GatewaySettings, Settings, add_arguments, settings_from
from tokenflow_grpc.signals import SHUTDOWN_GRACE_SECONDS, SignalCounter, handle_reload
from tokenflow_grpc.v1 import tokenflow_pb2 as pb

if TYPE_CHECKING:
    from tokenflow_grpc.embedded import EmbeddedValkey
    from tokenflow_grpc.gateway.process import GatewayProcess
    from tokenflow_grpc.metrics import MetricsServer

logger = logging.getLogger("tokenflow")


def _print_message(message: Any) -> None:
    """Print message as proto3 JSON with every field, zero and false ones included."""
    text = json_format.MessageToJson(
        message, indent=None, always_print_fields_with_no_presence=True
    )
    print(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _print_rpc_error(error: grpc.aio.AioRpcError) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


def local_target(grpc_address: str, port: int) -> str:
    """Return the address a local client uses for a server bound to grpc_address."""
    host = grpc_address.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def gateway_arguments(settings: Settings, target: str) -> list[str]:
    """Return the `tokenflow gateway` options for a server's gateway child."""
    arguments = [
        "--target",
        target,
        "--http-address",
        settings.http_address,
        "--gateway-trusted-proxies",
        ",".join(str(network) for network in settings.gateway_trusted_proxies),
        "--http-max-body-bytes",
        str(settings.http_max_body_bytes),
        "--log-level",
        settings.log_level,
        "--log-format",
        settings.log_format,
    ]
    if settings.http_access_log:
        arguments.append("--http-access-log")
    if settings.no_web_dashboard:
        arguments.append("--no-web-dashboard")
    arguments += gateway_tls_arguments(settings)
    return arguments


async def serve(settings: Settings) -> None:
    """Run the server, or --workers server processes, and the gateway until
    SIGTERM or SIGINT, then drain and stop.

    A second signal cancels the calls still in flight instead of waiting for them.
    """
    from tokenflow_grpc.embedded import EmbeddedValkey

    embedded = None
    if not settings.valkey_url:
        embedded = EmbeddedValkey(settings.data_dir)
        settings = dataclasses.replace(settings, valkey_url=embedded.start())
    try:
        if settings.workers > 1:
            await _serve_workers(settings, embedded)
        else:
            await _serve_one(settings, embedded)
    finally:
        if embedded is not None:
            embedded.stop()


async def _serve_one(settings: Settings, embedded: EmbeddedValkey | None) -> None:
    """Serve in this process, whose health checks restart the embedded Valkey when it exits."""
    from tokenflow_grpc.server import TokenFlowServer

    on_valkey_down = None
    if embedded is not None:
        restart = embedded.ensure_running

        async def on_valkey_down() -> bool:
            return await asyncio.to_thread(restart)

    server = TokenFlowServer(settings, on_valkey_down=on_valkey_down)
    handle_reload(server.reload_policies)
    gateway: GatewayProcess | None = None
    signals = SignalCounter("draining calls; send it again to stop at once")
    grace = 0.0  # Until the server runs, stopping needs no drain.
    try:
        port = await server.start()
        target = local_target(settings.grpc_address, port)
        print(f"TokenFlow is serving gRPC on {target}", flush=True)
        _print_metrics_address(settings, server.metrics)
        gateway = await _start_gateway(settings, target)
        await signals.first.wait()
        grace = SHUTDOWN_GRACE_SECONDS
        signals.on_second(server.end_calls_now)
    finally:
        stopping = [server.stop(grace)]
        if gateway is not None:
            stopping.append(gateway.stop())
        await asyncio.gather(*stopping)


async def _serve_workers(settings: Settings, embedded: EmbeddedValkey | None) -> None:
    """Supervise settings.workers server processes on one port. At the first
    signal, stop them all, then the gateway."""
    from tokenflow_grpc.workers import WorkerPool

    pool = WorkerPool(settings)
    handle_reload(lambda: pool.send_signal(signal.SIGHUP))
    gateway: GatewayProcess | None = None
    watchdog = None
    if embedded is not None:
        watchdog = asyncio.create_task(_keep_running(embedded), name="tokenflow-valkey-watchdog")
    signals = SignalCounter(
        f"stopping {settings.workers} workers, which drain their calls; "
        "send it again to stop at once"
    )
    grace = 0.0  # Until the workers run, stopping needs no drain.
    try:
        port = await pool.start()
        target = local_target(settings.grpc_address, port)
        print(f"TokenFlow is serving gRPC on {target} with {settings.workers} workers", flush=True)
        _print_metrics_address(settings, pool.metrics.server if pool.metrics else None)
        # NOTE: the gateway's one gRPC connection reaches one worker, so HTTP/JSON
        # calls do not spread over the workers.
        gateway = await _start_gateway(settings, target)
        await signals.first.wait()
        grace = SHUTDOWN_GRACE_SECONDS
        # A worker cancels its calls in flight at its second SIGTERM.
        signals.on_second(lambda: pool.send_signal(signal.SIGTERM))
    finally:
        await pool.stop(grace)
        if gateway is not None:
            await gateway.stop()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


def _print_metrics_address(settings: Settings, metrics: MetricsServer | None) -> None:
    if metrics is not None:
        host = settings.metrics_address.rsplit(":", 1)[0]
        print(f"Prometheus metrics: http://{host}:{metrics.port}/metrics", flush=True)


async def _keep_running(embedded: EmbeddedValkey) -> None:
    """Restart the embedded Valkey whenever it exits. The workers reconnect by themselves."""
    from tokenflow_grpc.server import HEALTH_CHECK_SECONDS

    while True:
        await asyncio.sleep(HEALTH_CHECK_SECONDS)
        try:
            await asyncio.to_thread(embedded.ensure_running)
        except ConfigurationError as error:
            logger.error("embedded Valkey restart failed: %s", error)


async def _start_gateway(settings: Settings, target: str) -> GatewayProcess | None:
    """Start the gateway child in front of target and print its address, unless --no-gateway."""
    from tokenflow_grpc.gateway.process import GatewayProcess

    if settings.no_gateway:
        return None
    gateway = GatewayProcess(gateway_arguments(settings, target))
    try:
        gateway_port = await gateway.start()
    except OSError as error:
        raise OSError(
            f"the gateway could not start on {settings.http_address}: {error}; "
            "pass another --http-address or --no-gateway"
        ) from error
    http_host = settings.http_address.rsplit(":", 1)[0]
    scheme = "https" if settings.http_tls_cert else "http"
    print(
        f"TokenFlow gateway is serving {scheme.upper()} on {scheme}://{http_host}:{gateway_port}",
        flush=True,
    )
    if not settings.no_web_dashboard:
        print(f"Web dashboard: {scheme}://{http_host}:{gateway_port}/", flush=True)
    return gateway


async def run_gateway(settings: GatewaySettings) -> None:
    """Run a gateway in front of settings.target until SIGTERM or SIGINT."""
    from tokenflow_grpc.gateway import start_gateway

    signals = SignalCounter("gateway stopping")
    gateway = await start_gateway(
        settings.target,
        settings.http_address,
        settings.gateway_trusted_proxies,
        settings.http_max_body_bytes,
        settings.http_access_log,
        web_dashboard=not settings.no_web_dashboard,
        **gateway_tls_options(settings),
    )
    http_host = settings.http_address.rsplit(":", 1)[0]
    scheme = "https" if settings.http_tls_cert else "http"
    print(
        f"TokenFlow gateway is serving {scheme.upper()} on {scheme}://{http_host}:{gateway.port} "
        f"for {settings.target}",
        flush=True,
    )
    await signals.first.wait()
    await gateway.stop()


async def generate(arguments: argparse.Namespace) -> int:
    """Print the response as JSON; with --stream, each GenerateStream message
    as one JSON line as it arrives."""
    fields: dict[str, Any] = {
        "model": arguments.model,
        "temperature": arguments.temperature,
        "max_tokens": arguments.max_tokens,
        "skip_cache": arguments.skip_cache,
        "cache_ttl": arguments.cache_ttl,
        "cache_namespace": arguments.cache_namespace,
    }
    async with _client(arguments) as client:
        try:
            if arguments.stream:
                async for message in client.generate_stream(arguments.prompt, **fields):
                    _print_message(message)
                    sys.stdout.flush()
                return 0
            reply = await client.generate(arguments.prompt, **fields)
        except grpc.aio.AioRpcError as error:
            return _print_rpc_error(error)
    _print_message(reply.response)
    return 0


async def stats(arguments: argparse.Namespace) -> int:
    async with _client(arguments) as client:
        try:
            _print_message(await client.stats(arguments.activity_limit))
        except grpc.aio.AioRpcError as error:
            return _print_rpc_error(error)
    return 0


async def simulate(arguments: argparse.Namespace) -> int:
    async with _client(arguments) as client:
        try:
            _print_message(await client.simulate(arguments.count))
        except grpc.aio.AioRpcError as error:
            return _print_rpc_error(error)
    return 0


async def watch(arguments: argparse.Namespace) -> int:
    """Print one JSON event per line until interrupted or --count events."""
    types = [pb.ActivityType.Value(name) for name in arguments.type]
    printed = 0
    async with _client(arguments) as client:
        try:
            async for response in client.watch(arguments.since_id, types):
                _print_message(response)
                sys.stdout.flush()
                printed += 1
                if arguments.count and printed >= arguments.count:
                    break
        except grpc.aio.AioRpcError as error:
            return _print_rpc_error(error)
    return 0


def dashboard(arguments: argparse.Namespace) -> int:
    """Run the live dashboard, or print one snapshot when stdout is not a terminal."""
    options = DashboardOptions(
        arguments.target,
        arguments.timeout,
        arguments.interval,
        arguments.simulate_count,
        client_options(arguments),
    )
    if not sys.stdout.isatty():
        from tokenflow_grpc.dashboard.snapshot import print_snapshot

        # The snapshot itself reports why the server sent no figures, so the
        # warning logged for that would only repeat it.
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
        try:
            return asyncio.run(print_snapshot(options))
        except KeyboardInterrupt:
            return 130

    from textual.logging import TextualHandler

    from tokenflow_grpc.dashboard.app import run_app

    # textual draws on the terminal, so records go to its devtools console
    # (`textual console`) instead of stderr.
    logging.basicConfig(level=logging.INFO, handlers=[TextualHandler()])
    return run_app(options)


def _positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def _client(arguments: argparse.Namespace) -> AsyncTokenFlowClient:
    return AsyncTokenFlowClient(
        arguments.target, timeout=arguments.timeout, **client_options(arguments)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenflow",
        description="TokenFlow: rate limiter and response cache for AI APIs, over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser(
        "serve", help="Run the gRPC server (with an embedded Valkey unless --valkey-url is set)."
    )
    add_arguments(serve_parser)

    gateway_parser = commands.add_parser(
        "gateway", help="Run the HTTP/JSON gateway in front of a TokenFlow gRPC server."
    )
    add_arguments(gateway_parser, GatewaySettings)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help)
        command.add_argument(
            "--target",
            default=DEFAULT_TARGET,
            help=f"Server address, HOST:PORT (default {DEFAULT_TARGET}).",
        )
        command.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=DEFAULT_TIMEOUT,
            help=f"Deadline of each call, in seconds (default {DEFAULT_TIMEOUT:g}); "
            "watch follows its stream without a deadline until interrupted or --count events.",
        )
        add_client_security_arguments(command)
        return command

    generate_parser = client_command("generate", "Send one prompt and print the response as JSON.")
    generate_parser.add_argument("prompt")
    generate_parser.add_argument("--model", help="Model name (default: the server's).")
    generate_parser.add_argument("--temperature", type=float, help="Sampling temperature, 0 to 2.")
    generate_parser.add_argument("--max-tokens", type=int, help="Maximum tokens, 1 to 8192.")
    generate_parser.add_argument("--skip-cache", action="store_true", help="Bypass the cache.")
    generate_parser.add_argument(
        "--cache-ttl",
        type=_positive_seconds,
        help="Lifetime in seconds of the cache entry this call writes (default: the server's).",
    )
    generate_parser.add_argument(
        "--cache-namespace",
        default="",
        help="Share cached responses only within this namespace (default: the API key id, "
        'or "default" when the server has no keys).',
    )
    generate_parser.add_argument(
        "--stream",
        action="store_true",
        help="Call GenerateStream and print each message as a JSON line as it arrives.",
    )

    stats_parser = client_command("stats", "Print GetStats as JSON.")
    stats_parser.add_argument(
        "--activity-limit", type=int, default=0, help="Events to include (0: the server's 20)."
    )

    simulate_parser = client_command("simulate", "Run a Simulate burst and print its summary.")
    simulate_parser.add_argument(
        "--count", type=int, default=0, help="Requests in the burst (0: the server's 50)."
    )

    watch_parser = client_command("watch", "Print activity events as JSON lines.")
    watch_parser.add_argument("--since-id", default="", help="Resume after this event id.")
    watch_parser.add_argument(
        "--type",
        action="append",
        default=[],
        choices=[name for name in pb.ActivityType.keys() if not name.endswith("UNSPECIFIED")],
        help="Only this event type; repeat for several.",
    )
    watch_parser.add_argument(
        "--count", type=int, default=0, help="Stop after this many events (0: never)."
    )

    dashboard_parser = client_command(
        "dashboard",
        "Show live figures and activity in the terminal; print one plain snapshot "
        "when stdout is not a terminal.",
    )
    dashboard_parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=DEFAULT_INTERVAL_SECONDS,
        help=f"Seconds between GetStats calls (default {DEFAULT_INTERVAL_SECONDS:g}).",
    )
    dashboard_parser.add_argument(
        "--simulate-count",
        type=_positive_count,
        default=DEFAULT_SIMULATE_COUNT,
        help=f"Requests in the burst that the s key sends (default {DEFAULT_SIMULATE_COUNT}).",
    )
    add_keys_parser(commands)
    return parser


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory where uvloop is installed, else None (asyncio's own).

    The gateway spends much of each request in aiohttp's networking, which
    runs faster on uvloop (bench/README.md has the figures).
    """
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_service(
    arguments: argparse.Namespace,
    cls: type,
    run: Callable[[Any], Any],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Build the settings of a long-running command, set up logging, and run it."""
    try:
        settings: Any = settings_from(arguments, cls=cls)
    except ConfigurationError as error:
        print(f"tokenflow {arguments.command}: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(settings))
    except (ConfigurationError, OSError) as error:
        print(f"tokenflow {arguments.command}: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "serve":
        return _run_service(arguments, Settings, serve)
    if arguments.command == "gateway":
        return _run_service(arguments, GatewaySettings, run_gateway, _fast_loop_factory())

    if arguments.command == "keys":
        return run_keys(arguments)
    try:
        return _run_client(arguments)
    except ConfigurationError as error:
        print(f"tokenflow {arguments.command}: {error}", file=sys.stderr)
        return 2


def _run_client(arguments: argparse.Namespace) -> int:
    if arguments.command == "dashboard":
        return dashboard(arguments)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = {"generate": generate, "stats": stats, "simulate": simulate, "watch": watch}
    try:
        return asyncio.run(command[arguments.command](arguments))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, as Unix tools do,
        # and point stdout at /dev/null so that the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
