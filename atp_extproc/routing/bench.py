"""Decision-time benchmark: `run()` → p50/p99 of one decision over 10 candidates.

Called by `make bench`; also `python -m atp_extproc.routing.bench`.
"""

from __future__ import annotations

import gc
import json
import math
import time

import numpy as np

from atp_extproc.routing.router import Router
from atp_extproc.routing.selection import CandidateModel
from atp_extproc.routing.settings import Limits, RouteObjective

CANDIDATES = 10
WARMUP_OBSERVATIONS = 5_000
DECISIONS = 20_000
ROUNDS = 5


def _setup(sticky: bool) -> tuple[Router, RouteObjective, list[CandidateModel]]:
    rng = np.random.default_rng(7)
    router = Router(seed=7)
    objective = RouteObjective(
        limits=Limits(p95_latency_ms=4000, max_error_rate=0.2, min_quality=0.3),
        sticky="tenant" if sticky else "none")
    candidates = [CandidateModel(f"model-{i}", 0.0001 * (i + 1), 0.0004 * (i + 1))
                  for i in range(CANDIDATES)]
    router.choose("bench", objective, candidates)
    for _ in range(WARMUP_OBSERVATIONS):
        i = int(rng.integers(CANDIDATES))
        router.observe("bench", f"model-{i}", ok=bool(rng.random() > 0.02 * (i % 3)),
                       latency_ms=float(200 * (1 + i % 4) * math.exp(0.4 * rng.standard_normal())),
                       cost=0.0001 * (i + 1), quality=float(rng.random() < 0.6 + 0.03 * i),
                       input_tokens=800, output_tokens=200)
    return router, objective, candidates


def _time_decisions(router: Router, objective: RouteObjective,
                    candidates: list[CandidateModel], keys: list[str | None],
                    n: int) -> np.ndarray:
    out = np.empty(n)
    clock = time.perf_counter_ns
    choose = router.choose
    for i in range(n):
        key = keys[i % len(keys)]
        t0 = clock()
        choose("bench", objective, candidates, key)
        out[i] = (clock() - t0) / 1000.0
    return out


def _rounds(sticky: bool) -> tuple[float, float, float]:
    """Median over rounds of the round's p50 and p99, and the worst round's p99.

    Rounds make the figure robust to a noisy neighbour on a shared machine: one
    preempted round moves the worst p99, not the median."""
    router, objective, candidates = _setup(sticky)
    keys: list[str | None] = [f"tenant-{i}" for i in range(1000)] if sticky else [None]
    # Warm-up: first sight of each sticky key hashes it once per candidate (BLAKE2b).
    _time_decisions(router, objective, candidates, keys, 2 * len(keys))
    p50s, p99s = [], []
    for _ in range(ROUNDS):
        gc.collect()
        t = _time_decisions(router, objective, candidates, keys, DECISIONS // ROUNDS)
        p50s.append(float(np.percentile(t, 50)))
        p99s.append(float(np.percentile(t, 99)))
    return (round(float(np.median(p50s)), 2), round(float(np.median(p99s)), 2),
            round(max(p99s), 2))


def run() -> dict[str, float | int]:
    """Decision time in µs (wall clock around `Router.choose`, GC enabled)."""
    results: dict[str, float | int] = {"candidates": CANDIDATES, "decisions": DECISIONS,
                                       "rounds": ROUNDS}
    (results["decision_us_p50"], results["decision_us_p99"],
     results["decision_us_p99_worst_round"]) = _rounds(sticky=False)
    (results["sticky_decision_us_p50"], results["sticky_decision_us_p99"],
     results["sticky_decision_us_p99_worst_round"]) = _rounds(sticky=True)

    router, _, candidates = _setup(sticky=False)
    t = np.empty(DECISIONS)
    for n in range(DECISIONS):
        t0 = time.perf_counter_ns()
        router.observe("bench", candidates[n % CANDIDATES].name, ok=True, latency_ms=300.0,
                       cost=0.0002, quality=None, input_tokens=800, output_tokens=200)
        t[n] = (time.perf_counter_ns() - t0) / 1000.0
    results["observe_us_p50"] = round(float(np.percentile(t, 50)), 2)
    results["observe_us_p99"] = round(float(np.percentile(t, 99)), 2)
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
