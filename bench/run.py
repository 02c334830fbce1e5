"""The bench plan: which loads run against which scenario, in which order.

Order matters: the paced rate is half of ATP's closed-loop peak, so the closed loops run
first and every scenario is then paced at the rate (c) set.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from atp_extproc.stack import ROOT, Stack
from bench import components, probes, report, scenarios
from bench.session import MAX_OTHER_CORES, BenchFailure, Measurement, Session, open_session
from bench.wrk import Load

ALL_SCENARIOS = (scenarios.ATP, scenarios.NOOP, scenarios.NOOP_FOUR_MESSAGES,
                 scenarios.NOOP_REWRITE, scenarios.ENVOY_ALONE, scenarios.ATP_NO_RESPONSE,
                 scenarios.ATP_OBSERVER, scenarios.ATP_OBSERVER_PROMPT)
# (a), (b), (c) run every load; (b4) and (r) the closed loops, for the throughput
# ceilings; the observation variants only 64 conns and paced.
MAIN_KEYS = ("c", "b", "a")
CLOSED_KEYS = ("c", "b", "b4", "r", "a")
OBSERVATION_KEYS = ("c2", "c3", "c3s")

DURATION_S = 10.0
PACED_CONNECTIONS = 16
BODY_TARGET_BYTES = 1024
# The whole bench must end within 6 minutes: waits and retries only spend what is left
# of BUDGET_S after the runs still to do (RUN_COST_S each: warmup, run, probes).
BUDGET_S = 300.0
RUN_COST_S = 14.0
# Before a run: wait up to QUIET_WAIT_S for the machine (our idle stacks included) to
# be busy less than QUIET_CORES.
QUIET_CORES = 0.2
QUIET_WAIT_S = 15.0
OUTPUT = ROOT / "BENCHMARKS.md"

CLOSED_16 = Load("closed16", 16, DURATION_S)
CLOSED_64 = Load("closed64", 64, DURATION_S)


def chat_body(target: int = BODY_TARGET_BYTES) -> bytes:
    """A realistic non-streaming chat request of about `target` bytes."""
    doc = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a logistics "
                                          "team. Answer in plain English."},
            {"role": "user", "content": ""},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": False,
    }
    sentence = ("Summarise the delivery delays for the northern depots last week, "
                "grouped by carrier, and suggest one fix per carrier. ")
    text = ""
    while len(json.dumps(doc).encode()) < target:
        text += sentence
        doc["messages"][1]["content"] = text.strip()
    return json.dumps(doc).encode()


def paced(rate: float) -> Load:
    return Load("paced", PACED_CONNECTIONS, DURATION_S, rate)


def paced_rate(peak_rps: float) -> float:
    """Half of ATP's peak, rounded down to 50 req/s so the figure reads as a chosen rate.

    Down, not to nearest: ATP's CPU per request is higher at a low rate (fewer messages
    per wakeup), so "half the peak" already loads its core more than half.
    """
    return max(50.0, math.floor(peak_rps / 2 / 50) * 50)


def _progress(m: Measurement, note: str = "") -> None:
    r = m.result
    cpu = ", ".join(f"{role} {us:.0f}" for role, us in m.cpu_us_per_req.items()
                    if us is not None)
    print(f"  {m.scenario.key:3} {m.load.label():32} {r.rps:6.0f} req/s  "
          f"p50 {r.p50_ms:6.2f}  p95 {r.p95_ms:6.2f}  p99 {r.p99_ms:6.2f} ms  "
          f"CPU µs/req: {cpu}; other load {m.other_cores:.2f} cores{note}", flush=True)


class Plan:
    """Runs loads against the open sessions, within a time budget.

    The machine may be shared with other jobs, so before each run the plan waits for a
    quiet moment, and a run that still shared the machine is run once more, keeping the
    quieter of the two. Both only spend the slack: the budget minus the runs still to
    do, so the bench always ends in time.
    """

    def __init__(self, sessions: dict[str, Session], started: float, runs: int) -> None:
        self.sessions = sessions
        self.started = started
        self.runs_left = runs
        self.results: list[Measurement] = []

    def slack(self) -> float:
        elapsed = time.monotonic() - self.started
        return BUDGET_S - elapsed - self.runs_left * RUN_COST_S

    def run(self, keys: tuple[str, ...], load: Load) -> None:
        print(f"{load.label()}:", flush=True)
        self.results += [self._measure(self.sessions[key], load) for key in keys]

    def _measure(self, session: Session, load: Load) -> Measurement:
        first = self._measure_when_quiet(session, load)
        self.runs_left -= 1
        if first.other_cores <= MAX_OTHER_CORES or self.slack() < RUN_COST_S:
            _progress(first)
            return first
        _progress(first, "  -> shared machine, running again")
        second = self._measure_when_quiet(session, load)
        best = min(first, second, key=lambda m: m.other_cores)
        _progress(second, "  (kept)" if best is second else "  (first kept)")
        return best

    def _measure_when_quiet(self, session: Session, load: Load) -> Measurement:
        wait = min(QUIET_WAIT_S, max(0.0, self.slack()))
        probes.wait_for_quiet(QUIET_CORES, wait)
        return session.measure(load)


def run_all(workdir: Path, upstream: Stack, body_file: Path,
            started: float) -> tuple[list[Measurement], float]:
    with ExitStack() as stack:
        # Every stack runs for the whole bench, so runs of different scenarios can
        # alternate: a burst of other work on the machine then hits neighbours in a
        # comparison alike instead of one whole scenario.
        sessions = {}
        for scenario in ALL_SCENARIOS:
            print(f"starting {scenario.key}: {scenario.title}", flush=True)
            sessions[scenario.key] = stack.enter_context(
                open_session(scenario, workdir, upstream, body_file))
        plan = Plan(sessions, started,
                    runs=2 * len(CLOSED_KEYS) + len(MAIN_KEYS) + 2 * len(OBSERVATION_KEYS))
        # The runs the bars depend on go first: they get the slack for waits and retries.
        plan.run(CLOSED_KEYS, CLOSED_16)
        plan.run(CLOSED_KEYS, CLOSED_64)
        rate = paced_rate(max(report.find(plan.results, "c", load.name).result.rps
                              for load in (CLOSED_16, CLOSED_64)))
        plan.run(MAIN_KEYS, paced(rate))
        plan.run(OBSERVATION_KEYS, CLOSED_64)
        plan.run(OBSERVATION_KEYS, paced(rate))
        return plan.results, rate


def main() -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="atp-bench-"))
    body = chat_body()
    body_file = workdir / "chat.json"
    body_file.write_bytes(body)
    upstream_dir = workdir / "upstream"
    upstream_dir.mkdir()
    upstream = Stack.on_free_ports(workdir=upstream_dir)
    print(f"ATP bench: {len(body)}-byte chat body, {DURATION_S:g}s runs, "
          f"logs in {workdir}", flush=True)
    try:
        upstream.start_upstream("demo_a")
        results, rate = run_all(workdir, upstream, body_file, started)
    except BenchFailure as exc:
        print(f"\nBENCH FAILED: {exc}\nBENCHMARKS.md not written.", file=sys.stderr)
        return 1
    finally:
        upstream.stop_all()
    # After the load runs, on a machine they no longer share: ATP's parts in process.
    parts = components.run(body)
    elapsed = time.monotonic() - started
    atp_cpu = report.find(results, "c", "closed64").cpu_us_per_req["ext_proc"]
    parts_text = components.markdown(parts, atp_cpu)
    text = report.render(results, rate, len(body), DURATION_S, elapsed)
    OUTPUT.write_text(text.rstrip("\n") + "\n\n" + parts_text)
    print()
    print(report.verdict_lines(results))
    print(parts_text)
    print(f"\nwrote {OUTPUT} ({elapsed:.0f}s)")
    # The logs only matter when something went wrong; Envoy's access log alone is
    # tens of MB after a full run.
    shutil.rmtree(workdir, ignore_errors=True)
    return 0
