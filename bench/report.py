"""BENCHMARKS.md: machine, method, all runs, ratios against the bars, observation choice."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from atp_extproc.stack import envoy_binary
from bench.session import MAX_OTHER_CORES, ROLES, WARMUP_FIRST_S, WARMUP_S, Measurement
from bench.wrk import THREADS, wrk_binary

# The bars ATP must meet on a 2-core machine (the acceptance criteria).
MIN_THROUGHPUT_RATIO = 0.85
MAX_ADDED_P50_MS = 2.0
MAX_ADDED_P99_MS = 6.0
# A paced run that completed less than this share of its target rate was saturated.
PACED_KEPT_UP = 0.95


@dataclass(frozen=True)
class Verdict:
    what: str
    value: str
    bar: str
    ok: bool
    # Why the figure may not be trusted (shared machine, a paced run that fell behind).
    caveats: tuple[str, ...] = ()

    def line(self) -> str:
        text = f"{'PASS' if self.ok else 'FAIL'}  {self.what}: {self.value} (bar: {self.bar})"
        if self.caveats:
            text += f" [UNRELIABLE: {'; '.join(self.caveats)}]"
        return text


def caveats(runs: list[Measurement]) -> tuple[str, ...]:
    out = []
    shared = max(m.other_cores for m in runs)
    if shared > MAX_OTHER_CORES:
        # Other jobs hurt (b), which uses both cores, more than (c), which is bound by
        # ATP's one Python thread: sharing can flatter (c)/(b) as well as hurt it.
        out.append(f"runs shared the machine with up to {shared:.2f} cores of other work")
    for m in runs:
        if m.load.rate is not None and m.result.rps < PACED_KEPT_UP * m.load.rate:
            out.append(f"({m.scenario.key}) fell behind the paced rate "
                       f"({m.result.rps:.0f} of {m.load.rate:.0f} req/s): saturated")
    return tuple(out)


def find(results: list[Measurement], key: str, load: str) -> Measurement:
    for m in results:
        if m.scenario.key == key and m.load.name == load:
            return m
    raise KeyError(f"no run {key}/{load}")


def _throughput_ratio(results: list[Measurement], load: str, key: str = "c",
                      base: str = "b") -> float:
    """(`key`)/(`base`) req/s under `load`: (c)/(b) unless told."""
    return find(results, key, load).result.rps / find(results, base, load).result.rps


def _added_ms(results: list[Measurement], key: str) -> tuple[float, float]:
    """p50 and p99 that scenario `key` adds over Envoy alone (a) at the paced rate."""
    m, a = find(results, key, "paced").result, find(results, "a", "paced").result
    return m.p50_ms - a.p50_ms, m.p99_ms - a.p99_ms


def verdicts(results: list[Measurement]) -> list[Verdict]:
    out = []
    for load, conns in (("closed16", 16), ("closed64", 64)):
        ratio = _throughput_ratio(results, load)
        out.append(Verdict(f"(c)/(b) throughput at {conns} conns", f"{ratio:.2f}",
                           f">= {MIN_THROUGHPUT_RATIO}", ratio >= MIN_THROUGHPUT_RATIO,
                           caveats([find(results, "c", load), find(results, "b", load)])))
    shared = caveats([find(results, "c", "paced"), find(results, "a", "paced")])
    p50, p99 = _added_ms(results, "c")
    for name, added, bar in (("p50", p50, MAX_ADDED_P50_MS), ("p99", p99, MAX_ADDED_P99_MS)):
        out.append(Verdict(f"(c)-(a) added {name} latency at the paced rate",
                           f"{added:.2f} ms", f"<= {bar:g} ms", added <= bar, shared))
    return out


def sharing_note(results: list[Measurement]) -> str:
    shared = [m for m in results if m.other_cores > MAX_OTHER_CORES]
    if not shared:
        return ("Every run had the machine to itself (other work <= "
                f"{MAX_OTHER_CORES:g} cores).")
    worst = max(m.other_cores for m in shared)
    return (f"**Warning: {len(shared)} of {len(results)} runs shared the machine with other "
            f"jobs (up to {worst:.2f} of {os.cpu_count()} cores; column \"other cores\").** "
            "Their figures are lower and noisier than on an idle machine; rerun the bench "
            "when the machine is quiet before trusting a verdict marked UNRELIABLE.")


def verdict_lines(results: list[Measurement], indent: str = "") -> str:
    return "\n".join(indent + v.line() for v in verdicts(results))


# -- machine -----------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _envoy_version(line: str) -> str:
    """'envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL' → '1.40.0 (<sha12>, RELEASE)'."""
    parts = line.split("version:")[-1].strip().split("/")
    if len(parts) < 4:
        return line
    return f"{parts[1]} ({parts[0][:12]}, {parts[3]})"


def machine() -> list[tuple[str, str]]:
    envoy = _first_line([envoy_binary(), "--version"])
    return [
        ("nproc", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu_model()),
        ("kernel", platform.release()),
        ("Python", sys.version.split()[0]),
        ("grpcio", grpc.__version__),
        ("Envoy", _envoy_version(envoy)),
        ("wrk", _first_line([wrk_binary(), "-v"])),
    ]


# -- tables ------------------------------------------------------------------------------


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _row(m: Measurement) -> str:
    r = m.result
    cpu = " | ".join(_cpu(m.cpu_us_per_req[role]) for role in ROLES)
    msgs = "-" if m.ext_proc_msgs_per_req is None else f"{m.ext_proc_msgs_per_req:.1f}"
    return (f"| {m.scenario.key} | {m.scenario.title} | {m.load.label()} | {r.rps:.0f} | "
            f"{r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | {cpu} | {msgs} | "
            f"{m.non_2xx} | {m.other_cores:.2f} |")


TABLE_HEAD = (
    "| | scenario | load | req/s | p50 ms | p95 ms | p99 ms | Envoy µs/req | "
    "ext_proc µs/req | upstream µs/req | wrk µs/req | ext_proc msgs/req | non-2xx | "
    "other cores |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table(rows: list[Measurement]) -> str:
    return "\n".join([TABLE_HEAD, *(_row(m) for m in rows)])


# -- sections ----------------------------------------------------------------------------


def _method(rate: float, paced_conns: int, body_bytes: int, duration_s: float) -> str:
    return f"""\
- One run of `python -m bench` (`make bench`). One fake upstream (`demo_upstream`,
  latency 0, a single aiohttp process) serves every scenario. Envoy runs with
  `--concurrency 1`, as `atp_extproc.stack` starts it. All scenarios' stacks run for
  the whole bench and their runs alternate load by load (c, b, b4, r, a for 16 and 64
  conns; c, b, a paced; then c2, c3, c3s for 64 conns and paced), so a burst of
  unrelated work on the machine hits the runs being compared alike.
- Request: `POST /v1/chat/completions`, {body_bytes}-byte non-streaming OpenAI chat body,
  model `gpt-4o-mini`, `Authorization: Bearer sk-demo-alice` (wrk + `bench/chat.lua`).
- Scenarios: **(a)** Envoy alone: `envoy/front-proxy.yaml` without the ext_proc and
  header_mutation filters, one route to `demo_a` (the unused `atp` cluster removed);
  **(b)** the shipped config with a no-op grpc.aio + uvloop ext_proc
  (`bench/noop_extproc.py`: prebuilt minimal answers, `x-atp-cluster` set in the
  request_body answer); **(b4)** as (b), but the no-op also asks for the response body
  (`--read-response-body`: BUFFERED, as ATP does for a JSON answer), so it takes ATP's
  four messages per request and does none of ATP's work; **(r)** as (b4), plus the
  least any gateway does (`--rewrite`): the request body parsed with `json`, its model
  rewritten and the new body sent back with its content-length, the answer's usage
  read; **(c)** the shipped config with ATP
  (`python -m atp_extproc serve` with a copy of `examples/atp.yaml` whose ledger is in the
  bench's own directory).
- Loads: wrk `-t{THREADS}`, closed loop at 16 and 64 connections, and a paced run of
  {paced_conns} connections at **{rate:.0f} req/s** (about half of (c)'s
  closed-loop peak; Lua `delay()` hands out send slots on a fixed schedule per thread).
  Each measured run lasts {duration_s:g} s and follows a warmup run of the same load
  ({WARMUP_FIRST_S:g} s for a scenario's first run, {WARMUP_S:g} s otherwise) that is
  not measured.
- CPU per request: `utime+stime` delta of each process from `/proc/<pid>/stat` over the
  measured run, divided by completed requests (wrk's own from `getrusage` of reaped
  children). At the paced rate fixed per-wakeup costs are spread over fewer requests,
  so CPU/request is higher there than in closed loop.
- "other cores": CPU busy (user+nice+system from `/proc/stat`) minus the measured
  processes and wrk, averaged over the run: other jobs on the machine. A run with more
  than {MAX_OTHER_CORES:g} cores is run once more (time permitting) and the quieter run kept.
- non-2xx: Envoy's `downstream_rq_<class>` counter deltas and wrk's status errors; any
  non-2xx or socket error aborts the bench. ext_proc msgs/req: Envoy's
  `stream_msgs_sent` delta over all ext_proc filters, per request.
- All processes share the machine's cores with wrk: the figures compare variants on
  the same box; they are not capacity numbers for a dedicated host.
"""


# Ways of observing the response, measured against c2 (no observation: the floor).
_OBSERVERS = (("c", "c1", "same filter, response phases"),
              ("c3", "c3", "observability-mode 2nd filter"),
              ("c3s", "c3s", "c3, streams closed after 200 ms"))


@dataclass(frozen=True)
class ObservationCost:
    label: str
    name: str
    added_p50_ms: float
    added_p99_ms: float
    throughput_vs_floor: float
    atp_us: float | None
    envoy_us: float | None


def observation_costs(results: list[Measurement]) -> list[ObservationCost]:
    floor_paced = find(results, "c2", "paced").result
    floor_peak = find(results, "c2", "closed64").result.rps
    costs = []
    for key, label, name in _OBSERVERS:
        paced = find(results, key, "paced").result
        peak = find(results, key, "closed64")
        costs.append(ObservationCost(
            label, name, paced.p50_ms - floor_paced.p50_ms, paced.p99_ms - floor_paced.p99_ms,
            peak.result.rps / floor_peak, peak.cpu_us_per_req["ext_proc"],
            peak.cpu_us_per_req["envoy"]))
    return costs


def _cost_table(costs: list[ObservationCost], rate: float) -> str:
    head = ("| way of observing | added p50 ms | added p99 ms | throughput vs c2 | "
            "ATP µs/req | Envoy µs/req |\n|---|---:|---:|---:|---:|---:|")
    rows = [f"| {c.label}: {c.name} | {c.added_p50_ms:+.2f} | {c.added_p99_ms:+.2f} | "
            f"{c.throughput_vs_floor:.2f}x | {_cpu(c.atp_us)} | {_cpu(c.envoy_us)} |"
            for c in costs]
    return "\n".join([f"Added latency over c2 at {rate:.0f} req/s; throughput and CPU "
                      "at 64 conns closed loop.", "", head, *rows])


# Differences smaller than these are within run-to-run noise on a 2-core box (clean
# runs of the same build differ by about this much), so they do not pick a winner.
THROUGHPUT_TIE = 0.05      # relative
P50_TIE_MS = 0.5
P99_TIE_MS = 3.0


def _winners(costs: list[ObservationCost], value, lower_is_better: bool,
             close_enough) -> list[ObservationCost]:
    best = (min if lower_is_better else max)(value(c) for c in costs)
    return [c for c in costs if close_enough(value(c), best)]


def cheapest(costs: list[ObservationCost]) -> str:
    """Per figure, every way within noise of the best; one overall winner only if it is
    among the best on all three figures and no other way is."""
    by_figure = {
        "least added p50": _winners(costs, lambda c: c.added_p50_ms, True,
                                    lambda v, b: v - b <= P50_TIE_MS),
        "least added p99": _winners(costs, lambda c: c.added_p99_ms, True,
                                    lambda v, b: v - b <= P99_TIE_MS),
        "highest throughput": _winners(costs, lambda c: c.throughput_vs_floor, False,
                                       lambda v, b: v >= b * (1 - THROUGHPUT_TIE)),
    }
    detail = "; ".join(f"{figure}: {', '.join(c.label for c in best)}"
                       for figure, best in by_figure.items())
    everywhere = [c for c in costs if all(c in best for best in by_figure.values())]
    if len(everywhere) == 1:
        verdict = f"**Cheapest way of observing responses in this run: {everywhere[0].label}**"
    elif everywhere:
        verdict = ("**No clear winner in this run: "
                   f"{' and '.join(c.label for c in everywhere)} are within noise**")
    else:
        verdict = "**No single cheapest way in this run**"
    return (f"{verdict} ({detail}; ties within {P50_TIE_MS:g} ms p50, {P99_TIE_MS:g} ms "
            f"p99, {THROUGHPUT_TIE:.0%} throughput).")


def _observation(results: list[Measurement], rate: float) -> str:
    rows = [find(results, key, load) for key in ("c", "c2", "c3", "c3s")
            for load in ("paced", "closed64")]
    costs = observation_costs(results)
    return "\n".join([
        "All with ATP. **c1** = the shipped config (the (c) runs above, a minute or two "
        "before the others: the ext_proc filter "
        "sends response headers, by the virtual host's per-route modes, and ATP overrides "
        "the response body to BUFFERED for JSON). **c2** = `response_header_mode: SKIP` in "
        "those modes: ATP never sees the response (the floor). **c3** = c2 plus a second "
        "ext_proc filter after the first, under a name of its own (the virtual host's "
        "modes are the first's), with `observability_mode: true`, "
        "`request_header_mode: SKIP`, `response_header_mode: SEND`, "
        "`response_body_mode: STREAMED`, on the same atp "
        "cluster. **c3s** = c3 with the observer's `deferred_close_timeout: 0.2s`.",
        "",
        "What c3 rests on: in observability mode Envoy keeps each "
        "side stream open after the request ends until the server closes it or "
        "`deferred_close_timeout` (5 s) passes. ATP closes an observer stream when the "
        "response's last message arrives, but streams whose end never reaches it would "
        "still pile up; at a few hundred req/s that is thousands of streams, past Envoy's "
        "default circuit breaker (1024 concurrent requests, whose overflow fails the *main* "
        "filter's streams with 500 `ext_proc_error_gRPC_error_14 ... overflow`) but within "
        "the 65,536 the shipped atp cluster allows. c3s lets Envoy reset held "
        "streams after 200 ms (in trials while building this bench, 50 ms lost ~45% of "
        "observations under load, 200 ms none).",
        "",
        table(rows),
        "",
        _cost_table(costs, rate),
        "",
        cheapest(costs),
        "",
        "This is one run: the observer variants' p99 depends on when Envoy resets held "
        "streams and moves from run to run, so rerun before acting on a close call.",
        "",
        "Caveat for c3/c3s: the observer's stream carries no request headers, so ATP "
        "cannot join the observed response to the request's exchange (no request id, "
        "model or price); a usable version needs `request_header_mode: SEND` on the "
        "observer (one more unanswered message) or a correlation header. Observability "
        "mode removes the wait, not the work: ATP still receives and parses every message.",
    ])


def _ratios(results: list[Measurement], rate: float) -> str:
    (c50, c99), (b50, b99) = _added_ms(results, "c"), _added_ms(results, "b")
    c16, c64 = (_throughput_ratio(results, load) for load in ("closed16", "closed64"))
    b16, b64 = (_throughput_ratio(results, load, "b4") for load in ("closed16", "closed64"))
    r16, r64 = (_throughput_ratio(results, load, "r") for load in ("closed16", "closed64"))
    cr16, cr64 = (_throughput_ratio(results, load, "c", "r")
                  for load in ("closed16", "closed64"))
    return (f"- (c)/(b) throughput: {c16:.2f} at 16 conns, {c64:.2f} at 64 conns.\n"
            f"- Ceiling, (b4)/(b): {b16:.2f} at 16 conns, {b64:.2f} at 64 conns. This is "
            "what ATP's four messages per request leave of (b)'s throughput before ATP "
            "does any work, so the room for ATP's own work under the 0.85 bar is "
            f"{b16 - MIN_THROUGHPUT_RATIO:+.2f} and {b64 - MIN_THROUGHPUT_RATIO:+.2f} "
            "of (b)'s throughput.\n"
            f"- The least gateway, (r)/(b): {r16:.2f} at 16 conns, {r64:.2f} at 64 conns; "
            f"ATP against it, (c)/(r): {cr16:.2f} and {cr64:.2f}."
            + (" Parsing the body and sending a rewritten one back already costs more "
               "than the bar leaves, before any policy, redaction or routing."
               if max(r16, r64) < MIN_THROUGHPUT_RATIO else "") + "\n"
            f"- Added latency at {rate:.0f} req/s: (c)-(a) {c50:.2f} ms p50, "
            f"{c99:.2f} ms p99; for reference the no-op floor (b)-(a) is "
            f"{b50:.2f} ms p50, {b99:.2f} ms p99.")


def render(results: list[Measurement], rate: float, body_bytes: int, duration_s: float,
           elapsed_s: float) -> str:
    main_rows = [m for key in ("a", "b", "b4", "r", "c") for m in results
                 if m.scenario.key == key]
    info = "\n".join(f"| {k} | {v} |" for k, v in machine())
    paced_conns = find(results, "c", "paced").load.connections
    return f"""\
# ATP benchmarks

Generated by `make bench` (`python -m bench`) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in
{elapsed_s:.0f} s. Do not edit by hand: rerun the bench.

## Machine

| | |
|---|---|
{info}

## Method

{_method(rate, paced_conns, body_bytes, duration_s)}
## Results

{sharing_note(results)}

{table(main_rows)}

## Ratios and bars

{_ratios(results, rate)}

{verdict_lines(results, indent="    ")}

## Response observation

{_observation(results, rate)}
"""
