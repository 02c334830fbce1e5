"""One decision: Thompson sampling over the weighted objective within the hard limits.

For each eligible candidate the posterior gives a mean and a sampled value of quality q,
error rate e, cost c and mean latency L; the objective (higher is better) is

    U = w_q·q - w_c·c/C - w_l·L/Λ - w_e·e

with C and Λ the route's cost and latency scales. Two picks come out:

- greedy: the best posterior-mean U among candidates whose posterior means meet the hard
  limits (the champion, flagged, when none does);
- thompson: the best sampled U among candidates whose samples meet the limits.

Sampling the limits too means a candidate excluded on its estimate is retried now and
then, in proportion to the chance it is in fact within them, so a recovered provider can
come back. The p95 is sampled with the sd of a 95th percentile of the latencies its
histogram holds, which fade by half every stale_half_life_s: an excluded candidate's
sampled p95 spreads until it is retried, even one that sat far past the limit with no
spread (a steady latency twice the limit). Without exploration the p95 limit stops
applying once the candidate's observations, counting half per stale_half_life_s
without one, fall below min_samples: log2(n / min_samples) stale half-lives after its
last answer, n its (decayed) observations then. The router serves the Thompson pick
only while the route's exploration share stays under its cap, and the greedy pick
otherwise. This is Gaussian-posterior Thompson sampling (Agrawal & Goyal 2013:
O(√(KT ln K)) regret for bounded rewards) on the decomposed objective; decomposing keeps
the learned state valid when weights or scales change on reload, and lets hard limits
act on the metric they name.

Cost: one pass over the candidates in plain float arithmetic, four normal draws each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from atp_extproc.routing.estimates import PRIOR_WEIGHT, Memory
from atp_extproc.routing.settings import RouteObjective

_LN2 = math.log(2.0)
# Cap on how much staleness may widen a posterior (sd x 8).
_MAX_STALE_WIDEN = 8.0
_LN_MAX_STALE_WIDEN = math.log(_MAX_STALE_WIDEN)
# Below this widening (1%) staleness is ignored, which saves an exp() per candidate.
_FRESH = 0.01


@dataclass(frozen=True, slots=True)
class CandidateModel:
    """A model a decision may choose; prices in USD per 1K tokens."""

    name: str
    price_in: float
    price_out: float
    region: str = "unspecified"
    egress: str = "external"

    @classmethod
    def from_model(cls, model: object) -> CandidateModel:
        """From a config.Model (name, price.input_per_1k/output_per_1k, region, egress)."""
        price = model.price  # type: ignore[attr-defined]
        return cls(model.name, price.input_per_1k, price.output_per_1k,  # type: ignore[attr-defined]
                   model.region, model.egress)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    route: str
    # The model that gets the traffic.
    chosen: str
    # The learner's own pick; differs from `chosen` in shadow mode "decision" (chosen is
    # the champion) and on half-open probes.
    proposed: str
    # Candidates that were eligible (after policy restrict and breakers).
    candidate_set: tuple[str, ...]
    # (model, reason): policy, restrict, not_in_objective, shadow_only, breaker_open,
    # breaker_half_open, p95_latency, error_rate, quality, price.
    excluded: tuple[tuple[str, str], ...]
    decision_us: float
    # Posterior-mean objective of the best feasible candidate minus that of `chosen` (≥ 0,
    # objective units).
    regret_estimate: float
    # `chosen` is not the best posterior-mean candidate (exploration or stickiness).
    explored: bool
    sticky: bool
    # A half-open breaker's probe request.
    probe: bool
    # "" | no_feasible_candidate | champion_unavailable | all_breakers_open
    fallback_reason: str
    shadow_mode: str
    # Challenger to mirror this request to (shadow mode "mirror"), else None.
    mirror_to: str | None
    # Shadow mode "decision": E[cost(chosen)] - E[cost(proposed)] per request, USD.
    predicted_savings_usd: float | None
    # Other eligible candidates, best first: where a failed attempt could go next.
    alternates: tuple[str, ...]


class Compiled:
    """An objective turned into the floats a decision reads (built once per objective)."""

    __slots__ = (
        "capped_after",
        "champion",
        "cost_scale",
        "explore_cap",
        "fresh_for",
        "input_share",
        "latency_scale",
        "max_error",
        "max_price",
        "members",
        "memory",
        "min_quality",
        "min_samples",
        "mirror_share",
        "mirror_to",
        "objective",
        "p95_log",
        "quality_prior",
        "shadow_mode",
        "stale_rate",
        "sticky",
        "wc",
        "we",
        "wl",
        "wq",
    )

    def __init__(self, objective: RouteObjective) -> None:
        self.objective = objective
        w, lim = objective.weights, objective.limits
        self.wq, self.wc, self.wl, self.we = w.quality, w.cost, w.latency, w.error
        self.cost_scale = objective.scale.cost_usd
        self.latency_scale = objective.scale.latency_ms
        p95 = lim.p95_latency_ms
        self.p95_log = None if p95 is None else math.log(p95)
        self.max_error = lim.max_error_rate
        self.min_quality = lim.min_quality
        self.max_price = lim.max_price_per_1k
        self.input_share = lim.input_share
        self.min_samples = lim.min_samples
        learning = objective.learning
        self.memory = Memory.of(learning.half_life, learning.change_half_life,
                                learning.change_z, learning.stale_half_life_s)
        # sd multiplier for staleness: the effective count halves every stale_half_life_s,
        # so the sd grows by 2^(dt / (2·H)) = exp(dt · stale_rate).
        self.stale_rate = _LN2 / (2.0 * objective.learning.stale_half_life_s)
        # Below this age staleness is ignored; past this one the widening is capped (exp()
        # itself would overflow after ~2 weeks).
        self.fresh_for = _FRESH / self.stale_rate
        self.capped_after = _LN_MAX_STALE_WIDEN / self.stale_rate
        self.explore_cap = objective.exploration
        self.champion = objective.champion
        # With the champion (named, or the alias's first candidate: Router._prepare).
        self.members = frozenset(objective.challengers) if objective.challengers else None
        self.sticky = objective.sticky != "none"
        self.shadow_mode = objective.shadow.mode
        self.mirror_to = objective.shadow.challenger if self.shadow_mode == "mirror" else None
        self.mirror_share = objective.shadow.share
        self.quality_prior = objective.quality.prior

    def price_ok(self, c: CandidateModel) -> bool:
        if self.max_price is None:
            return True
        blended = c.price_in * self.input_share + c.price_out * (1.0 - self.input_share)
        # Within a rounding of the limit: 0.0004 * 0.75 + 0.0016 * 0.25 is
        # 0.0007000000000000001, and a model priced at the limit was left out.
        return blended <= self.max_price * (1.0 + 1e-9)


class Scores:
    """Per-candidate results of one scoring pass (lists aligned with the candidates)."""

    __slots__ = ("best_mean", "excluded", "feasible", "greedy", "mean_utility", "thompson")

    def __init__(self) -> None:
        self.mean_utility: list[float] = []
        self.feasible: list[bool] = []
        self.excluded: list[tuple[str, str]] = []
        self.greedy = -1
        self.thompson = -1
        self.best_mean = -math.inf


# ArmEstimates.post: (quality, quality_sd, error, error_sd, cost, cost_sd, latency_mean_ms,
# latency_log_sd, log p95_ms, its sd, latency_count, error_weight, quality_weight, last_t,
# the route's prior log latency, the observed mean log latency, half its variance)
Post = tuple[float, float, float, float, float, float, float, float, float | None, float,
             float, float, float, float, float, float, float]


def score(comp: Compiled, names: Sequence[str], posts: Sequence[Post],
          price_ok: Sequence[bool], now: float, normals: list[float], start: int) -> Scores:
    """Mean and sampled objective of each candidate; greedy and Thompson picks.

    `posts`: each candidate's ArmEstimates.post; `price_ok`: within max_price_per_1k."""
    out = Scores()
    cost_scale = comp.cost_scale
    latency_scale = comp.latency_scale
    if cost_scale is None:
        cost_scale = max(p[4] for p in posts) or 1.0
    if latency_scale is None:
        latency_scale = max(p[6] for p in posts) or 1.0
    wq, we = comp.wq, comp.we
    kc = comp.wc / cost_scale
    kl = comp.wl / latency_scale
    p95, max_error, min_quality = comp.p95_log, comp.max_error, comp.min_quality
    min_samples = comp.min_samples
    stale_rate = comp.stale_rate
    fresh_for, capped_after = comp.fresh_for, comp.capped_after
    limits = p95 is not None or max_error is not None or min_quality is not None
    add_utility, add_feasible = out.mean_utility.append, out.feasible.append
    best_mean = best_sample = -math.inf
    greedy = thompson = -1
    z = start
    # p95 and p95v are logs, and p95sd the sd of p95v: the p95 is sampled without an exp().
    for i, (q, qsd, e, esd, c, csd, lat, lsd, p95v, p95sd, lat_w, err_w, q_w, last,
            prior_log, seen_log, half_var) in enumerate(posts):
        dt = now - last
        # widen² = 2^(dt / stale_half_life_s): a count of observations as of `last` counts
        # that much less now.
        if dt < fresh_for:
            widen = 1.0
        else:
            if dt >= capped_after:
                widen = _MAX_STALE_WIDEN
                lat_w *= math.exp(-2.0 * dt * stale_rate)
            else:
                widen = math.exp(dt * stale_rate)
                lat_w /= widen * widen
            # The mean latency too is the route's prior but for what the faded count
            # holds: a candidate once slow is otherwise never chosen again for latency
            # (with exploration 0 nothing else brings it back to be measured).
            lat = math.exp((PRIOR_WEIGHT * prior_log + lat_w * seen_log)
                           / (PRIOR_WEIGHT + lat_w) + half_var)
        qs = q + qsd * widen * normals[z]
        qs = 0.0 if qs < 0.0 else (1.0 if qs > 1.0 else qs)
        es = e + esd * widen * normals[z + 1]
        es = 0.0 if es < 0.0 else (1.0 if es > 1.0 else es)
        cs = c + csd * widen * normals[z + 2]
        if cs < 0.0:
            cs = 0.0
        n3 = normals[z + 3]
        shift = math.exp(lsd * widen * n3)
        z += 4
        um = wq * q - kc * c - kl * lat - we * e
        us = wq * qs - kc * cs - kl * lat * shift - we * es
        add_utility(um)

        ok_mean = ok_sample = True
        if not price_ok[i]:
            ok_mean = ok_sample = False
            out.excluded.append((names[i], "price"))
        elif limits:
            reason = ""
            # lat_w is faded, err_w and q_w are not: error and quality samples spread
            # with staleness enough to be retried, a p95 far past the limit may not.
            if p95 is not None and p95v is not None and lat_w >= min_samples:
                # Excluded on the estimate once it is past the limit by more than its sd:
                # a p95 of the few latencies a quiet route's histogram holds is mostly
                # their largest, past the limit for a candidate within it.
                if p95v - p95sd * widen > p95:
                    ok_mean, reason = False, "p95_latency"
                if p95v + p95sd * widen * n3 > p95:
                    ok_sample = False
            if max_error is not None and err_w >= min_samples:
                if e > max_error:
                    ok_mean, reason = False, reason or "error_rate"
                if es > max_error:
                    ok_sample = False
            if min_quality is not None and q_w >= min_samples:
                if q < min_quality:
                    ok_mean, reason = False, reason or "quality"
                if qs < min_quality:
                    ok_sample = False
            if reason:
                out.excluded.append((names[i], reason))
        add_feasible(ok_mean)
        if ok_mean and um > best_mean:
            best_mean, greedy = um, i
        if ok_sample and us > best_sample:
            best_sample, thompson = us, i
    out.greedy, out.thompson, out.best_mean = greedy, thompson, best_mean
    return out
