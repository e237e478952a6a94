"""The kubelet's resident memory and CPU time, read from /proc/<pid>/status and /stat."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One reading of a process."""

    at: float
    """time.monotonic() of the reading."""
    rss_kb: int
    """VmRSS."""
    hwm_kb: int
    """VmHWM: the peak resident size so far."""
    threads: int
    """Threads."""
    cpu_s: float
    """utime + stime of the process itself."""
    children_cpu_s: float
    """cutime + cstime: the children it has waited for (Slurm's commands, mostly)."""


def parse_status(text: str) -> dict[str, int]:
    """VmRSS and VmHWM (kB) and Threads from /proc/<pid>/status."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            found[key] = int(value.split()[0])
    return found


def parse_stat(text: str, ticks: int = _TICKS) -> tuple[float, float]:
    """(own CPU seconds, waited-for children's CPU seconds) from /proc/<pid>/stat.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from
    the last ")".
    """
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime) / ticks, (cutime + cstime) / ticks


def sample(pid: int, proc: Path = Path("/proc")) -> Sample:
    status = parse_status((proc / str(pid) / "status").read_text())
    own, children = parse_stat((proc / str(pid) / "stat").read_text())
    return Sample(
        at=time.monotonic(),
        rss_kb=status.get("VmRSS", 0),
        hwm_kb=status.get("VmHWM", 0),
        threads=status.get("Threads", 0),
        cpu_s=own,
        children_cpu_s=children,
    )


def cpu_share(first: Sample, last: Sample, *, children: bool = False) -> float:
    """CPU seconds per wall second between two samples (1.0 is one core, busy)."""
    wall = last.at - first.at
    if wall <= 0:
        raise ValueError("the samples must be apart in time")
    used = last.cpu_s - first.cpu_s
    if children:
        used += last.children_cpu_s - first.children_cpu_s
    return used / wall


def wait_idle(
    pid: int, *, below: float = 0.15, span_s: float = 3.0, timeout_s: float = 180.0
) -> float:
    """Wait until the process used less than `below` of a core over `span_s`; returns the
    seconds waited. Gives up quietly after `timeout_s` (the caller records what it finds)."""
    began = time.monotonic()
    previous = sample(pid)
    while time.monotonic() - began < timeout_s:
        time.sleep(span_s)
        current = sample(pid)
        if cpu_share(previous, current, children=True) < below:
            break
        previous = current
    return time.monotonic() - began
