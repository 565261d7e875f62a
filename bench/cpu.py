"""CPU time from /proc and getrusage (per process, and the machine's other
load), and the CPUs the benchmark's processes are pinned to."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """Return the CPU time of a process, all threads, user and system, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Counting from the state after the command name, utime and stime are
    # fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Background:
    """CPU use on the machine during the run that was not the benchmark's, in cores busy."""

    other_processes: float
    steal: float


@dataclass(frozen=True)
class CpuSnapshot:
    """The machine's busy and stolen CPU time, and this process tree's, at one moment."""

    wall: float
    machine_busy: float
    machine_steal: float
    own: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        # The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
        ticks = [
            int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
        own = 0.0
        # Children count once they have been waited for, as every process
        # the benchmark starts is by the time its run ends.
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return cls(
            wall=time.monotonic(),
            machine_busy=(user + nice + system + irq + softirq) / CLOCK_TICKS,
            machine_steal=steal / CLOCK_TICKS,
            own=own,
        )

    def background_since(self, before: CpuSnapshot) -> Background:
        """Return the average load between before and this snapshot that was not ours."""
        elapsed = self.wall - before.wall
        if elapsed <= 0:
            return Background(0.0, 0.0)
        other = (self.machine_busy - before.machine_busy) - (self.own - before.own)
        steal = self.machine_steal - before.machine_steal
        return Background(max(0.0, other) / elapsed, steal / elapsed)


@dataclass(frozen=True)
class CpuPlan:
    """The CPUs of the processes under test and of the load generators.

    None for both leaves every process free to run on any CPU.
    """

    servers: frozenset[int] | None
    load: frozenset[int] | None

    @classmethod
    def split(cls, pin: bool) -> CpuPlan:
        """Give the first half of this process's CPUs to the servers and the rest
        to the load generators and Valkey. With fewer than two CPUs, pin nothing."""
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        half = len(cpus) // 2
        return cls(frozenset(cpus[:half]), frozenset(cpus[half:]))

    def describe(self) -> str:
        if self.servers is None or self.load is None:
            return "not pinned: every process may run on any CPU"
        return (
            f"TokenFlow and the echo server on CPU {_cpu_list(self.servers)}; the load "
            f"generators and Valkey on CPU {_cpu_list(self.load)}"
        )


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


@contextmanager
def affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the block with this thread pinned to cpus, so that the processes it
    starts inherit them; restore the thread's CPUs afterwards."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
