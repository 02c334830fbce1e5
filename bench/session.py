"""One scenario's processes (Envoy + ext_proc server) and the measured runs against them.

The fake upstream lives for the whole bench and is shared by every scenario, so all of
them proxy to the very same process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from atp_extproc.stack import ROOT, Stack, grpc_serving, render_envoy, wait_until
from bench import probes, wrk
from bench.scenarios import Scenario

API_KEY = "sk-demo-alice"
CHAT_PATH = "/v1/chat/completions"
# Excluded from every measurement: connection setup, first-use allocations, caches.
WARMUP_FIRST_S = 3.0
WARMUP_S = 2.0
# Every ext_proc filter's message counter on the front listener (main and observer).
_EXT_PROC_MSGS_SENT = r"^http\.front\.ext_proc\..*stream_msgs_sent$"
# Requests and ext_proc streams still open; after a run they must drain before the next.
_ACTIVE = r"^(http\.front\.downstream_rq_active|cluster\.atp\.upstream_rq_active)$"
QUIESCE_TIMEOUT_S = 20.0
# CPU per request is reported for these processes, in the report's column order.
ROLES = ("envoy", "ext_proc", "upstream", "wrk")
# Cores of other work during a run above which the run is not trusted as is.
MAX_OTHER_CORES = 0.25


class BenchFailure(RuntimeError):
    """The figures are not valid (errors or non-2xx replies): stop the bench."""


@dataclass(frozen=True)
class Measurement:
    scenario: Scenario
    load: wrk.Load
    result: wrk.WrkResult
    cpu_us_per_req: dict[str, float | None]
    codes: dict[str, int]
    ext_proc_msgs_per_req: float | None
    # Cores busy with anything else during the run (other jobs on the machine): a run
    # with a high figure shared its CPUs and is less trustworthy.
    other_cores: float

    @property
    def non_2xx(self) -> int:
        envoy = sum(n for cls, n in self.codes.items() if cls != "2xx")
        return max(envoy, self.result.errors["status"])


@dataclass
class Session:
    scenario: Scenario
    stack: Stack
    upstream_pid: int
    body_file: Path
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.stack.base_url + CHAT_PATH

    @property
    def admin_port(self) -> int:
        return self.stack.ports["admin"]

    def pids(self) -> dict[str, int]:
        pids = {"envoy": self.stack.procs["envoy"].pid, "upstream": self.upstream_pid}
        if "ext_proc" in self.stack.procs:
            pids["ext_proc"] = self.stack.procs["ext_proc"].pid
        return pids

    def _ext_proc_msgs(self) -> int:
        stats = probes.envoy_stats(self.admin_port, _EXT_PROC_MSGS_SENT)
        return sum(int(s.get("value", 0)) for s in stats)

    def measure(self, load: wrk.Load) -> Measurement:
        warmup = WARMUP_FIRST_S if not self.measurements else WARMUP_S
        wrk.run(load, self.url, self.body_file, API_KEY, duration_s=warmup)
        pids = self.pids()
        codes_before = probes.envoy_response_codes(self.admin_port)
        msgs_before = self._ext_proc_msgs()
        cpu_before = probes.CpuSample.take(pids)
        result = wrk.run(load, self.url, self.body_file, API_KEY)
        cpu = probes.CpuSample.take(pids).minus(cpu_before)
        msgs = self._ext_proc_msgs() - msgs_before
        codes_after = probes.envoy_response_codes(self.admin_port)
        codes = {cls: codes_after[cls] - codes_before[cls] for cls in codes_after}
        n = max(result.requests, 1)
        # None for a role this scenario lacks (no ext_proc in (a)), not 0.
        per_req: dict[str, float | None] = {
            role: cpu[role] * 1e6 / n if role in cpu else None for role in ROLES}
        measurement = Measurement(
            self.scenario, load, result, per_req, codes,
            msgs / n if self.scenario.ext_proc != "none" else None,
            cpu["other"] / result.duration_s)
        self._check(measurement)
        self.measurements.append(measurement)
        self.quiesce()
        return measurement

    def quiesce(self) -> None:
        """Wait until this stack holds no request or ext_proc stream, so its leftovers
        (c3 keeps observer streams open for seconds) do not load the next run."""
        def idle() -> bool:
            return all(int(s.get("value", 0)) == 0
                       for s in probes.envoy_stats(self.admin_port, _ACTIVE))
        wait_until(idle, f"{self.scenario.key}: drain after run", QUIESCE_TIMEOUT_S)

    def _check(self, m: Measurement) -> None:
        where = f"{self.scenario.key} ({self.scenario.title}), {m.load.label()}"
        if m.result.requests == 0:
            raise BenchFailure(f"{where}: no request completed")
        if m.non_2xx or m.result.socket_errors:
            raise BenchFailure(
                f"{where}: {m.non_2xx} non-2xx replies (Envoy by class {m.codes}), wrk "
                f"errors {m.result.errors}; logs in {self.stack.log_dir}")


def _start_noop(stack: Stack, options: tuple[str, ...]) -> None:
    listen = f"127.0.0.1:{stack.ports['atp']}"
    # `-m bench.noop_extproc` must resolve whatever the caller's working directory.
    stack.env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), stack.env.get("PYTHONPATH", "")) if p)
    proc = stack.spawn("ext_proc", [sys.executable, "-m", "bench.noop_extproc",
                                     "--listen", listen, "--cluster", "demo_a", *options])
    wait_until(lambda: grpc_serving(listen), "no-op ext_proc", proc=proc)


def _start_atp(stack: Stack) -> None:
    stack.start_atp()
    # Stack names ATP's process "atp"; the bench names the role, whichever server it is.
    stack.procs["ext_proc"] = stack.procs.pop("atp")


@contextmanager
def open_session(scenario: Scenario, workdir: Path, upstream: Stack,
                 body_file: Path) -> Iterator[Session]:
    scenario_dir = workdir / scenario.key
    scenario_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack.on_free_ports(workdir=scenario_dir)
    stack.ports["demo_a"] = upstream.ports["demo_a"]
    try:
        if scenario.ext_proc == "noop":
            _start_noop(stack, scenario.noop_options)
        elif scenario.ext_proc == "atp":
            _start_atp(stack)
        stack.start_envoy(render_envoy(stack.ports, edit=scenario.edit),
                          wait_for_atp=scenario.ext_proc != "none")
        yield Session(scenario, stack, upstream.procs["demo_a"].pid, body_file)
    finally:
        stack.stop_all()
