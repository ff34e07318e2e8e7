"""CPU time and peak memory of process trees, from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime stime cutime cstime are fields 14-17 (1-based) of stat; here 11-14 after the comm
    return sum(int(v) for v in fields[11:15]) / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid))


def peak_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class CpuMeter:
    """CPU spent by named process trees between start() and stop()."""

    roots: dict[str, int]

    def start(self) -> None:
        self._before = {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}

    def stop(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) - self._before[name] for name, pid in self.roots.items()}
