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

from bench.cpu import Background

README = Path(__file__).with_name("README.md")
SECTION_START = "<!-- bench:results:start -->"
SECTION_END = "<!-- bench:results:end -->"
TARGET_RATIO = 0.5


@dataclass(frozen=True)
class Level:
    """Every round of direct gRPC and gateway HTTP load at one concurrency.

    Round i of each protocol ran back to back, so their ratio compares the
    two under the same background load.
    """

    concurrency: int
    grpc_rounds: list[dict[str, Any]]
    http_rounds: list[dict[str, Any]]

    @property
    def grpc(self) -> dict[str, Any]:
        """The gRPC round with the median requests/s."""
        return _median_round(self.grpc_rounds)

    @property
    def http(self) -> dict[str, Any]:
        """The gateway round with the median requests/s."""
        return _median_round(self.http_rounds)

    @property
    def ratio(self) -> float:
        """The median over the rounds of gateway requests/s divided by gRPC requests/s."""
        return statistics.median(self.round_ratios())

    def round_ratios(self) -> list[float]:
        """Return the gateway/gRPC ratio of each round."""
        pairs = zip(self.grpc_rounds, self.http_rounds, strict=True)
        return [_ratio(http, grpc) for grpc, http in pairs]


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the median requests/s, the lower one of an even count."""
    ordered = sorted(rounds, key=lambda result: float(result["requests_per_second"]))
    return ordered[(len(ordered) - 1) // 2]


def _ratio(http: dict[str, Any], grpc: dict[str, Any]) -> float:
    direct = float(grpc["requests_per_second"])
    return float(http["requests_per_second"]) / direct if direct else 0.0


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


def results_table(levels: list[Level]) -> list[str]:
    """Return the Markdown table of median throughput, latency and ratio per concurrency."""
    lines = [
        "| In flight | gRPC req/s (range) | gRPC p50 ms | gRPC p99 ms "
        "| Gateway req/s (range) | Gateway p50 ms | Gateway p99 ms | Ratio (range) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        grpc, http = level.grpc, level.http
        grpc_range = _spread([r["requests_per_second"] for r in level.grpc_rounds], 0)
        http_range = _spread([r["requests_per_second"] for r in level.http_rounds], 0)
        lines.append(
            f"| {level.concurrency} "
            f"| {grpc['requests_per_second']:,.0f} ({grpc_range}) "
            f"| {grpc['p50_ms']:.2f} | {grpc['p99_ms']:.2f} "
            f"| {http['requests_per_second']:,.0f} ({http_range}) "
            f"| {http['p50_ms']:.2f} | {http['p99_ms']:.2f} "
            f"| {level.ratio:.2f} ({_spread(level.round_ratios(), 2)}) |"
        )
    return lines


def cpu_table(levels: list[Level]) -> list[str]:
    """Return the Markdown table of CPU time per request and load generator CPU, median rounds."""
    lines = [
        "| In flight | Protocol | Requests | TokenFlow CPU µs/request | Valkey CPU µs/request "
        "| Load generator CPU % | Not cache hits |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        for name, result in (("gRPC", level.grpc), ("Gateway", level.http)):
            requests = result["requests"] or 1
            client_percent = 100 * result["client_cpu_seconds"] / (result["seconds"] or 1)
            lines.append(
                f"| {level.concurrency} | {name} | {result['requests']:,} "
                f"| {1e6 * result['tokenflow_cpu_seconds'] / requests:.0f} "
                f"| {1e6 * result['valkey_cpu_seconds'] / requests:.0f} "
                f"| {client_percent:.0f} | {result['misses'] + result['errors']} |"
            )
    return lines


def results_section(
    levels: list[Level], command: str, machine: list[str], when: datetime.datetime
) -> str:
    """Return the README section: command, date, machine, both tables and the target check."""
    lowest = min(level.ratio for level in levels)
    verdict = "met" if lowest >= TARGET_RATIO else "not met"
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
        *results_table(levels),
        "",
        f"Lowest median ratio: {lowest:.3f}, so the target of at least {TARGET_RATIO} is "
        f"{verdict}.",
        "",
        *cpu_table(levels),
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
