"""What the bench reads around each run: process CPU time and Envoy's response counters."""

from __future__ import annotations

import json
import os
import resource
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS_PER_S


def children_cpu_seconds() -> float:
    """CPU of reaped children: the delta around one wrk run is wrk's own CPU, because the
    stack's processes are still running and so never reaped in between."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """user + nice + system time of all CPUs. irq/softirq are left out: loopback traffic
    of the bench itself lands there, and it is not in any process's stime either."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    return sum(int(v) for v in fields[1:4]) / _TICKS_PER_S


def wait_for_quiet(max_cores: float, max_wait_s: float, window_s: float = 0.5) -> None:
    """Wait (at most `max_wait_s`) for a window in which the whole machine is busy less
    than `max_cores`, i.e. other jobs have paused.
    The sleep is the measuring window, not a guess at readiness."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy_before, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(window_s)
        busy = (machine_busy_seconds() - busy_before) / (time.monotonic() - t0)
        if busy <= max_cores or time.monotonic() >= deadline:
            return


@dataclass(frozen=True)
class CpuSample:
    by_role: dict[str, float]
    load_generator: float
    machine_busy: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSample:
        return cls({role: cpu_seconds(pid) for role, pid in pids.items()},
                   children_cpu_seconds(), machine_busy_seconds())

    def minus(self, earlier: CpuSample) -> dict[str, float]:
        """CPU seconds spent since `earlier`, by role; "other" is everything on the
        machine that is not the measured processes or wrk (other jobs, idle stacks)."""
        spent = {role: s - earlier.by_role[role] for role, s in self.by_role.items()}
        spent["wrk"] = self.load_generator - earlier.load_generator
        ours = sum(spent.values())
        spent["other"] = max(0.0, self.machine_busy - earlier.machine_busy - ours)
        return spent


def envoy_stats(admin_port: int, pattern: str) -> list[dict]:
    query = urllib.parse.urlencode({"format": "json", "filter": pattern})
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?{query}",
                                timeout=5) as resp:
        return list(json.load(resp)["stats"])


def envoy_response_codes(admin_port: int) -> dict[str, int]:
    """Envoy's downstream response counters by status class on the front listener."""
    stats = envoy_stats(admin_port, r"^http\.front\.downstream_rq_[1-5]xx$")
    values = {s["name"].rsplit("_", 1)[1]: int(s["value"]) for s in stats if "value" in s}
    return {cls: values.get(cls, 0) for cls in _CODE_CLASSES}
