"""Which CPUs each benchmark process gets: upstream, server under test, load generator.

Pinned to separate *physical* cores, the three stop taking turns on one core, and a
single-threaded server cannot land beside a busy process on its hyperthread sibling
(which costs it a third or more of its speed, differently on each run: one cause of the
run-to-run spread the issue saw). The server under test (the floor proxy or the gateway,
never both at once) gets one logical CPU of a core whose siblings stay idle (the gateway's
SQLite writer thread shares it: "one core" means the whole process); the upstream two
cores; the load generator the rest. Needs at least 6 logical CPUs and 4 physical cores;
with fewer, nothing is pinned and the report says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIN_LOGICAL = 6
MIN_PHYSICAL = 4


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """The CPU sets (empty: not pinned) and a sentence for the report."""

    upstream: frozenset[int]
    server: frozenset[int]
    loadgen: frozenset[int]
    note: str

    @property
    def pinned(self) -> bool:
        """Whether the processes are pinned."""
        return bool(self.server)


def _core_of(cpu: int) -> tuple[str, str]:
    """(package, core) of a logical CPU, from sysfs; the CPU itself when unknown."""
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()
    except OSError:
        return "?", f"cpu{cpu}"


def physical_cores(cpus: set[int]) -> list[list[int]]:
    """``cpus`` grouped by physical core (hyperthread siblings together), in CPU order."""
    cores: dict[tuple[str, str], list[int]] = {}
    for cpu in sorted(cpus):
        cores.setdefault(_core_of(cpu), []).append(cpu)
    return sorted(cores.values())


def _fmt(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def plan_cpus(enabled: bool = True) -> CpuPlan:
    """The plan for this machine (within this process's own affinity mask)."""
    none: frozenset[int] = frozenset()
    if not enabled:
        return CpuPlan(none, none, none, "not pinned (--no-pin)")
    try:
        mine = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return CpuPlan(none, none, none, "not pinned: this OS has no sched_setaffinity")
    cores = physical_cores(mine)
    if len(mine) < MIN_LOGICAL or len(cores) < MIN_PHYSICAL:
        return CpuPlan(
            none,
            none,
            none,
            f"not pinned: {len(mine)} CPUs ({len(cores)} physical cores) are too few to give "
            "upstream, server and load generator their own cores; the three share them, so "
            "absolute numbers are a floor and only same-run ratios compare",
        )
    # From the top: CPU 0 tends to take the machine's housekeeping (interrupts, timers).
    server = frozenset(cores[-1][:1])  # one logical CPU; its siblings stay idle
    upstream = frozenset(cpu for core in cores[-3:-1] for cpu in core)
    loadgen = frozenset(cpu for core in cores[:-3] for cpu in core)
    note = (
        f"pinned (sched_setaffinity): server under test (floor proxy or gateway) on CPU {_fmt(server)} "
        f"(its core's siblings idle), upstream on CPUs {_fmt(upstream)}, load generator on CPUs "
        f"{_fmt(loadgen)}"
    )
    return CpuPlan(upstream, server, loadgen, note)
