"""The benchmark's report: the machine, a Markdown table, and its section of bench/README.md."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.commands import CommandCounts
from bench.cpu import Background
from bench.memory import WindowMemory
from bench.watch import FanOut

README = Path(__file__).with_name("README.md")
SECTION_START = "<!-- bench:results:start -->"
SECTION_END = "<!-- bench:results:end -->"
# Targets. The gateway keeps half of direct gRPC's throughput, and Generate
# keeps 0.65 of a bare gRPC server's at 64 calls in flight. A cache hit costs
# one round trip to Valkey and a miss two. WatchActivity delivers within 100 ms.
TARGET_GATEWAY_RATIO = 0.5
TARGET_ECHO_RATIO = 0.65
TARGET_ECHO_LEVEL = 64
TARGET_ROUND_TRIPS = {"cache hit": 1, "cache miss": 2}
TARGET_WATCH_P99_MS = 100
SERVERS = ("echo", "grpc", "http")
SERVER_NAMES = {"echo": "Echo", "grpc": "TokenFlow gRPC", "http": "Gateway"}


@dataclass(frozen=True)
class Results:
    """Everything one run measured."""

    levels: list[Level]
    connections_after_load: int
    commands: list[CommandCounts]
    fan_out: FanOut
    memory: list[WindowMemory]


@dataclass(frozen=True)
class Level:
    """Every round of load at one concurrency, for each server (echo, grpc, http).

    Round i of each server ran back to back, so their ratio compares them
    under the same background load.
    """

    concurrency: int
    rounds: dict[str, list[dict[str, Any]]]

    def median(self, server: str) -> dict[str, Any]:
        """Return the round of server with the median requests/s."""
        return _median_round(self.rounds[server])

    def ratio(self, server: str, reference: str) -> float:
        """Return the median over the rounds of server's requests/s divided by reference's."""
        return statistics.median(self.round_ratios(server, reference))

    def round_ratios(self, server: str, reference: str) -> list[float]:
        """Return server's requests/s over reference's, for each round."""
        pairs = zip(self.rounds[server], self.rounds[reference], strict=True)
        return [_ratio(measured, base) for measured, base in pairs]


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the median requests/s, the lower one of an even count."""
    ordered = sorted(rounds, key=lambda result: float(result["requests_per_second"]))
    return ordered[(len(ordered) - 1) // 2]


def _ratio(measured: dict[str, Any], reference: dict[str, Any]) -> float:
    base = float(reference["requests_per_second"])
    return float(measured["requests_per_second"]) / base if base else 0.0


def _spread(values: list[float], digits: int) -> str:
    """Format the smallest and largest of values as "low–high"."""
    return f"{min(values):,.{digits}f}–{max(values):,.{digits}f}"


def machine_description(root: Path, valkey_version: str, background: Background) -> list[str]:
    """Return Markdown list items for the code, cores, CPU, OS, Python, Valkey and other load."""
    return [
        f"- TokenFlow: {source_revision(root)}",
        f"- Cores (`os.cpu_count()`): {os.cpu_count()}",
        f"- CPU: {_cpu_model()}",
        f"- OS: {_os_name()}, kernel {platform.release()} ({platform.machine()})",
        f"- Python: {platform.python_version()} ({platform.python_implementation()})",
        f"- Valkey: {valkey_version} (from INFO server)",
        f"- Other load during the run, on average: {background.other_processes:.2f} cores busy "
        f"with other processes, {background.steal:.2f} cores stolen by the hypervisor",
    ]


def source_revision(root: Path) -> str:
    """Return the commit of the code under test, noting uncommitted changes to it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            # The benchmark rewrites bench/README.md itself, so that file does not count.
            ["git", "status", "--porcelain", "--", "tokenflow_grpc", "bench", ":!bench/README.md"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes" if changes else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        return platform.system()
    return release.get("PRETTY_NAME", platform.system())


def throughput_table(levels: list[Level]) -> list[str]:
    """Return the Markdown table of TokenFlow's gRPC Generate against the echo server."""
    lines = [
        "| In flight | Echo req/s (range) | Echo p50 ms | Echo p99 ms "
        "| TokenFlow req/s (range) | TokenFlow p50 ms | TokenFlow p99 ms | Ratio (range) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        lines.append(_ratio_row(level, "grpc", "echo"))
    return lines


def gateway_table(levels: list[Level]) -> list[str]:
    """Return the Markdown table of the gateway against direct gRPC."""
    lines = [
        "| In flight | gRPC req/s (range) | gRPC p50 ms | gRPC p99 ms "
        "| Gateway req/s (range) | Gateway p50 ms | Gateway p99 ms | Ratio (range) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        lines.append(_ratio_row(level, "http", "grpc"))
    return lines


def _ratio_row(level: Level, server: str, reference: str) -> str:
    base, measured = level.median(reference), level.median(server)
    base_range = _spread([r["requests_per_second"] for r in level.rounds[reference]], 0)
    measured_range = _spread([r["requests_per_second"] for r in level.rounds[server]], 0)
    ratios = _spread(level.round_ratios(server, reference), 2)
    return (
        f"| {level.concurrency} "
        f"| {base['requests_per_second']:,.0f} ({base_range}) "
        f"| {base['p50_ms']:.2f} | {base['p99_ms']:.2f} "
        f"| {measured['requests_per_second']:,.0f} ({measured_range}) "
        f"| {measured['p50_ms']:.2f} | {measured['p99_ms']:.2f} "
        f"| {level.ratio(server, reference):.2f} ({ratios}) |"
    )


def echo_verdict(levels: list[Level]) -> str:
    """Return the sentence that checks the ratio to the echo server at TARGET_ECHO_LEVEL."""
    at_target = [level for level in levels if level.concurrency == TARGET_ECHO_LEVEL]
    if not at_target:
        return (
            f"The target ({TARGET_ECHO_RATIO} of the echo server at {TARGET_ECHO_LEVEL} in "
            "flight) was not measured."
        )
    ratio = at_target[0].ratio("grpc", "echo")
    verdict = "met" if ratio >= TARGET_ECHO_RATIO else "not met"
    return (
        f"Median ratio at {TARGET_ECHO_LEVEL} in flight: {ratio:.2f}, so the target of at "
        f"least {TARGET_ECHO_RATIO} of the echo server is {verdict}."
    )


def gateway_verdict(levels: list[Level]) -> str:
    lowest = min(level.ratio("http", "grpc") for level in levels)
    verdict = "met" if lowest >= TARGET_GATEWAY_RATIO else "not met"
    return (
        f"Lowest median ratio: {lowest:.3f}, so the target of at least "
        f"{TARGET_GATEWAY_RATIO} is {verdict}."
    )


def cpu_table(levels: list[Level]) -> list[str]:
    """Return the Markdown table of CPU time per request and load generator CPU, median rounds."""
    lines = [
        "| In flight | Server | Requests | Server CPU µs/request | Valkey CPU µs/request "
        "| Load generator CPU % | Not cache hits |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        for server in SERVERS:
            if server not in level.rounds:
                continue
            result = level.median(server)
            requests = result["requests"] or 1
            client_percent = 100 * result["client_cpu_seconds"] / (result["seconds"] or 1)
            lines.append(
                f"| {level.concurrency} | {SERVER_NAMES[server]} | {result['requests']:,} "
                f"| {1e6 * result['server_cpu_seconds'] / requests:.0f} "
                f"| {1e6 * result['valkey_cpu_seconds'] / requests:.0f} "
                f"| {client_percent:.0f} | {result['misses'] + result['errors']} |"
            )
    return lines


def commands_table(counts: list[CommandCounts]) -> list[str]:
    """Return the Markdown table of Valkey commands and round trips per Generate call."""
    lines = [
        "| Generate | Calls | Round trips per call (target) | Scripts per call "
        "| Commands per call | Commands per call, by name |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for count in counts:
        by_name = ", ".join(
            f"{name} {count.per_call(calls):.2f}" for name, calls in count.by_command.items()
        )
        lines.append(
            f"| {count.kind} | {count.calls:,} "
            f"| {count.per_call(count.round_trips):.2f} ({TARGET_ROUND_TRIPS[count.kind]}) "
            f"| {count.per_call(count.scripts):.2f} | {count.per_call(count.commands):.2f} "
            f"| {by_name} |"
        )
    return lines


def fan_out_table(fan_out: FanOut) -> list[str]:
    """Return the Markdown table of WatchActivity delivery, one watcher against many."""
    lines = [
        "| Watchers | gRPC connections | Events | Deliveries | Dropped | Missing "
        "| Latency p50 ms | p99 ms | max ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in (fan_out.reference, fan_out.loaded):
        lines.append(
            f"| {result['watchers']:,} | {result['channels']} | {result['events']} "
            f"| {result['deliveries']:,} | {result['dropped']:,} | {result['missing']:,} "
            f"| {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | {result['max_ms']:.1f} |"
        )
    return lines


def fan_out_summary(fan_out: FanOut) -> str:
    p99 = fan_out.loaded["p99_ms"]
    verdict = "met" if p99 < TARGET_WATCH_P99_MS else "not met"
    readers = fan_out.readers_during
    reader_verdict = "met" if readers == 1 else "not met"
    watchers = int(fan_out.loaded["watchers"])
    per_event_ms = fan_out.cpu_per_delivery_us * watchers / 1000
    return (
        f"Events were sent at {fan_out.loaded['rate']:g} per second. The server used "
        f"{fan_out.cpu_per_delivery_us:.0f} µs of CPU per delivery, so one event to "
        f"{watchers:,} watchers cost it {per_event_ms:.0f} ms. Valkey connections of "
        f"`tokenflow serve` (CLIENT LIST, matched to the process's sockets): "
        f"{fan_out.connections_before} before any watcher, {fan_out.connections_during} "
        f"while {watchers:,} watchers received events, {readers} of them blocked in XREAD. "
        f"Target of one reader connection: {reader_verdict}. Target p99 under "
        f"{TARGET_WATCH_P99_MS} ms: {verdict}."
    )


def memory_table(memory: list[WindowMemory]) -> list[str]:
    """Return the Markdown table of the limiter's Valkey memory per tracked client."""
    lines = [
        "| Limit | Clients | Full windows | Bytes per full window (range) "
        "| Bytes per window of one request | Bytes per further request |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fill in memory:
        further = (fill.mean_usage - fill.reference_usage) / max(1, fill.limit - 1)
        lines.append(
            f"| {fill.limit:,} | {fill.clients:,} | {fill.full_windows:,} "
            f"| {fill.mean_usage:,.0f} ({_spread([float(u) for u in fill.usage], 0)}) "
            f"| {fill.reference_usage:,} | {further:,.1f} |"
        )
    return lines


def results_section(
    results: Results, command: str, machine: list[str], when: datetime.datetime
) -> str:
    """Return the README section: command, date, machine, every table and the target checks."""
    lines = [
        SECTION_START,
        f"Measured on {when:%Y-%m-%d %H:%M} UTC with:",
        "",
        "```sh",
        command,
        "```",
        "",
        *machine,
        "",
        "### Generate against a bare gRPC server (cache hits)",
        "",
        *throughput_table(results.levels),
        "",
        echo_verdict(results.levels),
        "",
        "### The gateway against direct gRPC (cache hits)",
        "",
        *gateway_table(results.levels),
        "",
        gateway_verdict(results.levels),
        "",
        "### CPU per request",
        "",
        *cpu_table(results.levels),
        "",
        f"Valkey connections held by `tokenflow serve` after these runs: "
        f"{results.connections_after_load}.",
        "",
        "### Valkey commands and round trips per Generate",
        "",
        *commands_table(results.commands),
        "",
        f"Left out as background: {sum(c.background for c in results.commands)} "
        "health-check PINGs and connection handshakes.",
        "",
        "### WatchActivity fan-out",
        "",
        *fan_out_table(results.fan_out),
        "",
        fan_out_summary(results.fan_out),
        "",
        "### Limiter memory per tracked client",
        "",
        *memory_table(results.memory),
        "",
        f"Window keys are named like `{results.memory[0].example_key}`.",
        "",
        "### Throughput with 1, 2 and 4 workers",
        "",
        "Measured by `python -m bench.workers`, the second part of `make bench`: see the",
        "[workers benchmark](#workers-benchmark).",
        SECTION_END,
    ]
    return "\n".join(lines)


def update_readme(
    section: str,
    readme: Path = README,
    start_marker: str = SECTION_START,
    end_marker: str = SECTION_END,
) -> None:
    """Replace the text between the section markers of readme with section."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(start_marker)
    end = text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {start_marker} ... {end_marker} section to update")
    updated = text[:start] + section + text[end + len(end_marker) :]
    readme.write_text(updated, encoding="utf-8")
