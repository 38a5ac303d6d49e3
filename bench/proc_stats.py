"""What /proc says about a process and the machine: CPU seconds, memory, busy CPUs (Linux).

Shared by the benchmarks; every reader answers None (or zeros) rather than raise when the
process is gone or /proc cannot be read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_POOL_SUFFIX = re.compile(r"_\d+$")


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return _cpu_seconds(stat)


def _cpu_seconds(stat: str) -> float:
    """utime + stime of a /proc/.../stat line, in seconds (fields after the name in parentheses,
    which may itself hold spaces or parentheses)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of a process's threads, in seconds, summed by name: the name each thread
    carries in the OS (`monitoring.thread_names`) without its pool index (`dicom-file_3` counts
    as `dicom-file`); the main thread is `main`. Threads that ended are not counted."""
    totals: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return totals
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        name = "main" if task == str(pid) else _POOL_SUFFIX.sub("", comm)
        totals[name] = totals.get(name, 0.0) + _cpu_seconds(stat)
    return totals


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    values = [float(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)
