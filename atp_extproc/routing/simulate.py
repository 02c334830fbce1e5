"""A network-free simulation of one route: candidates of known latency, error rate,
price and quality, served by a selection policy; regret against the true best.

Regret here is pseudo-regret: the true objective of the best candidate minus that of the
chosen one, from the known parameters (not the noisy outcomes), summed over requests.

    python -m atp_extproc.routing.simulate     # the figures quoted in the report
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from atp_extproc.routing.router import Router
from atp_extproc.routing.selection import CandidateModel
from atp_extproc.routing.settings import RouteObjective, Scale, Weights

Policy = Literal["thompson", "random", "round_robin"]
ROUTE = "sim"
MEAN_INPUT_TOKENS = 800.0


@dataclass(frozen=True)
class SimArm:
    name: str
    latency_ms: float         # median; latency is log-normal
    latency_sigma: float      # sd of log latency
    error_rate: float
    price_in: float           # USD per 1K tokens
    price_out: float
    output_tokens: float      # mean completion length
    quality: float            # chance a success gets positive feedback (score 1, else 0)

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_ms * math.exp(self.latency_sigma ** 2 / 2)

    @property
    def mean_cost(self) -> float:
        return (self.price_in * MEAN_INPUT_TOKENS + self.price_out * self.output_tokens) / 1000


DEFAULT_ARMS: tuple[SimArm, ...] = (
    SimArm("large", 1200, 0.4, 0.010, 0.0025, 0.0100, 300, 0.92),
    SimArm("medium", 700, 0.4, 0.010, 0.0008, 0.0032, 250, 0.86),
    SimArm("small", 400, 0.4, 0.015, 0.00015, 0.0006, 200, 0.78),
    SimArm("open-8b", 650, 0.5, 0.030, 0.0001, 0.0001, 350, 0.70),
    SimArm("edge", 300, 0.3, 0.020, 0.0003, 0.0012, 150, 0.70),
)

# Fixed scales so that objective units, and so regret, mean the same all run long.
SIM_OBJECTIVE = RouteObjective(
    weights=Weights(quality=2.0, cost=1.0, latency=1.0, error=2.0),
    scale=Scale(cost_usd=0.005, latency_ms=1000.0),
)


@dataclass(frozen=True)
class Degradation:
    """What happens to the best candidate at `degrade_at`."""

    latency_factor: float = 4.0
    error_rate: float | None = None


def true_utility(arm: SimArm, objective: RouteObjective = SIM_OBJECTIVE) -> float:
    w, s = objective.weights, objective.scale
    assert s.cost_usd is not None and s.latency_ms is not None
    return (w.quality * arm.quality - w.cost * arm.mean_cost / s.cost_usd
            - w.latency * arm.mean_latency_ms / s.latency_ms - w.error * arm.error_rate)


@dataclass(frozen=True)
class SimResult:
    policy: str
    arms: tuple[str, ...]
    regret: np.ndarray           # cumulative regret after each request
    choices: np.ndarray          # index of the chosen arm per request
    best_before: str
    best_after: str | None       # after the degradation, if any
    degrade_at: int | None
    moved_off_after: int | None  # requests after the degradation until moved off it
    decision_us: np.ndarray | None

    def regret_at(self, k: int) -> float:
        return float(self.regret[k - 1])

    def share(self, name: str, start: int = 0, stop: int | None = None) -> float:
        picks = self.choices[start:stop]
        return float(np.mean(picks == self.arms.index(name))) if len(picks) else 0.0


def moved_off(choices: np.ndarray, arm: int, start: int, window: int = 50,
              max_share: float = 0.1) -> int | None:
    """Requests after `start` until a `window` in which `arm` got ≤ max_share of them."""
    hits = (choices[start:] == arm).astype(np.int64)
    if len(hits) < window:
        return None
    sums = np.convolve(hits, np.ones(window, dtype=np.int64), mode="valid")
    ok = np.flatnonzero(sums <= max_share * window)
    return int(ok[0] + window) if len(ok) else None


def simulate(policy: Policy = "thompson", n: int = 20_000, degrade_at: int | None = None,
             seed: int = 0, arms: tuple[SimArm, ...] = DEFAULT_ARMS,
             objective: RouteObjective = SIM_OBJECTIVE,
             degradation: Degradation = Degradation(), delay: int = 4,
             rps: float = 50.0) -> SimResult:
    """Serve n requests with `policy`; outcomes are reported `delay` requests later (the
    requests in flight) and quality feedback arrives with them."""
    k = len(arms)
    rng = np.random.default_rng(seed)
    latency_noise = rng.standard_normal((n, k))
    fail_draw = rng.random((n, k))
    quality_draw = rng.random((n, k))
    input_tokens = np.maximum(1, rng.lognormal(math.log(MEAN_INPUT_TOKENS) - 0.045, 0.3, n)
                              ).astype(np.int64)
    output_noise = rng.lognormal(-0.045, 0.3, (n, k))

    before = arms
    after = arms
    best = int(np.argmax([true_utility(a, objective) for a in arms]))
    if degrade_at is not None:
        a = arms[best]
        degraded = replace(a, latency_ms=a.latency_ms * degradation.latency_factor,
                           error_rate=degradation.error_rate if degradation.error_rate
                           is not None else a.error_rate)
        after = tuple(degraded if i == best else x for i, x in enumerate(arms))
    utilities = [np.array([true_utility(a, objective) for a in world])
                 for world in (before, after)]

    clock = [0.0]
    router = Router(clock=lambda: clock[0], seed=seed + 1)
    candidates = [CandidateModel(a.name, a.price_in, a.price_out) for a in arms]
    policy_rng = np.random.default_rng(seed + 2)
    random_picks = policy_rng.integers(0, k, n)
    index = {a.name: i for i, a in enumerate(arms)}

    choices = np.empty(n, dtype=np.int64)
    step_regret = np.empty(n)
    decision_us = np.empty(n) if policy == "thompson" else None
    in_flight: deque[tuple[int, int]] = deque()
    for t in range(n):
        clock[0] = t / rps
        world = after if degrade_at is not None and t >= degrade_at else before
        u = utilities[1] if world is after else utilities[0]
        if policy == "thompson":
            d = router.choose(ROUTE, objective, candidates)
            i = index[d.chosen]
            assert decision_us is not None
            decision_us[t] = d.decision_us
        elif policy == "random":
            i = int(random_picks[t])
        else:
            i = t % k
        choices[t] = i
        step_regret[t] = u.max() - u[i]
        if policy != "thompson":
            continue
        in_flight.append((t, i))
        while len(in_flight) > delay:
            s, j = in_flight.popleft()
            _report(router, world[j], j, s, latency_noise, fail_draw, quality_draw,
                    input_tokens, output_noise)
    regret = np.cumsum(step_regret)
    return SimResult(
        policy=policy, arms=tuple(a.name for a in arms), regret=regret, choices=choices,
        best_before=arms[best].name,
        best_after=(after[int(np.argmax(utilities[1]))].name
                    if degrade_at is not None else None),
        degrade_at=degrade_at,
        moved_off_after=(moved_off(choices, best, degrade_at)
                         if degrade_at is not None else None),
        decision_us=decision_us)


def _report(router: Router, arm: SimArm, j: int, s: int, latency_noise: np.ndarray,
            fail_draw: np.ndarray, quality_draw: np.ndarray, input_tokens: np.ndarray,
            output_noise: np.ndarray) -> None:
    ok = bool(fail_draw[s, j] >= arm.error_rate)
    latency = arm.latency_ms * math.exp(arm.latency_sigma * latency_noise[s, j])
    if not ok:
        router.observe(ROUTE, arm.name, ok=False, latency_ms=latency)
        return
    tin = int(input_tokens[s])
    tout = max(1, int(arm.output_tokens * output_noise[s, j]))
    cost = (arm.price_in * tin + arm.price_out * tout) / 1000
    quality = 1.0 if quality_draw[s, j] < arm.quality else 0.0
    router.observe(ROUTE, arm.name, ok=True, latency_ms=latency, cost=cost,
                   quality=quality, input_tokens=tin, output_tokens=tout)


def main(seeds: int = 10) -> None:
    n = 20_000
    marks = (5_000, 10_000, 20_000)
    print(f"regret (objective units), mean over seeds 0..{seeds - 1}; n={n}")
    print(f"{'policy':<12}" + "".join(f"{f'@{k // 1000}k':>10}" for k in marks)
          + f"{'2nd/1st half':>14}")
    for policy in ("thompson", "random", "round_robin"):
        runs = [simulate(policy, n=n, seed=s) for s in range(seeds)]
        at = [float(np.mean([r.regret_at(k) for r in runs])) for k in marks]
        halves = float(np.mean([(r.regret_at(n) - r.regret_at(n // 2)) / r.regret_at(n // 2)
                                for r in runs]))
        print(f"{policy:<12}" + "".join(f"{v:>10.1f}" for v in at) + f"{halves:>14.2f}")
    for name, deg in (("latency x4", Degradation(latency_factor=4.0)),
                      ("errors 30%", Degradation(latency_factor=1.0, error_rate=0.3))):
        runs = [simulate("thompson", n=n, seed=s, degrade_at=n // 2, degradation=deg)
                for s in range(seeds)]
        moved = [r.moved_off_after for r in runs]
        print(f"best ({runs[0].best_before}) degrades at {n // 2}, {name}: moved off after "
              f"{moved} requests (window metric, minimum 50); best after: "
              f"{runs[0].best_after}")
    r = simulate("thompson", n=n)
    assert r.decision_us is not None
    print(f"decision µs in simulation ({len(DEFAULT_ARMS)} candidates): "
          f"p50 {np.percentile(r.decision_us, 50):.1f} p99 {np.percentile(r.decision_us, 99):.1f}")


if __name__ == "__main__":
    main()
