"""Machine load: cores used by this benchmark and by other processes while something was measured."""

from __future__ import annotations

import os
import resource
import time


class CpuUsage:
    """Cores used by this process (and its finished children) and by everything else since construction.

    From getrusage and /proc/stat deltas: ``others_cores`` = machine busy cores - ours. Only meaningful on
    Linux; on a GPU run it still says how busy the host was.
    """

    def __init__(self) -> None:
        self.wall, self.ours, self.machine = time.perf_counter(), _own_cpu_seconds(), _machine_jiffies()

    def summary(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        ours = (_own_cpu_seconds() - self.ours) / wall
        machine = _machine_jiffies()
        busy = None
        if machine and self.machine:
            total = machine[0] - self.machine[0]
            if total > 0:
                busy = (machine[1] - self.machine[1]) / total * (os.cpu_count() or 1)
        return {"wall_s": round(wall, 2), "ours_cores": round(ours, 2),
                "others_cores": None if busy is None else round(max(busy - ours, 0.0), 2),
                "load_1min_at_end": round(os.getloadavg()[0], 2)}


def _own_cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _machine_jiffies() -> tuple[int, int] | None:
    """(total, busy) jiffies over all CPUs from /proc/stat; busy excludes idle and iowait."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total, total - fields[3] - fields[4]
