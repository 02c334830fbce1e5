"""Online estimates for one (route, model): latency, error rate, cost and quality.

Each metric is tracked at two memory lengths. The long memory (half-life `half_life`
observations) is the estimate; the short one (`change_half_life`) only watches for
change. When the short-memory mean moves more than `change_z` standard errors away from
the long-memory mean, the long memory restarts from the short one: a provider that
degrades (or recovers) is noticed within tens of observations, yet in a steady state
estimates keep ~1.44·half_life observations and exploration dies down, so regret grows
sublinearly. Both memories decay, so no estimate ever becomes certain.

The posterior summaries a decision reads are recomputed on every observation and kept in
one tuple (`post`), so a decision only reads floats.

Models, per metric:
- error rate: Beta(a0 + decayed failures, b0 + decayed successes);
- latency: log-normal; normal posterior on the mean of log latency (successes only);
  mean latency = exp(μ + σ²/2); p95 from a log-bucket histogram (below);
- cost per request (successes with priced usage): normal posterior on the mean, prior
  centred on the model's prices times the route's typical token counts;
- quality in [0, 1] (feedback or proxy): Beta posterior, prior mean from config.

The p95 histogram is what the p95 limit judges a candidate by, and the limit keeps a
candidate it excludes from being observed. So the histogram's mass fades with time as
well as with observations, by half every stale_half_life_s (as README says a stale
estimate counts): the latencies that had a candidate excluded stop counting whether or
not it is retried, and its sampled p95 spreads as they fade, until exploration retries
it (selection.score). When the latency memory restarts, the histogram restarts from a
short-memory one (half-life change_half_life): the observations that showed the change
keep the limit applying, where an empty histogram switched it off for min_samples more.
min_samples counts latencies by observations only (`_latency_count`, as the other
limits count theirs), so a candidate observed rarely but steadily is still held to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atp_extproc.routing.sketch import LatencySketch, bucket

# Error-rate prior: mean 2.5%, worth two observations.
ERROR_PRIOR_A = 0.05
ERROR_PRIOR_B = 1.95
# Priors on the other means are worth one observation each.
PRIOR_WEIGHT = 1.0
LATENCY_PRIOR_LOG_VAR = 1.0   # a factor e≈2.7 either way
COST_PRIOR_CV = 0.5
# Quality scores are in [0, 1] and often 0/1: a Beta posterior (fractional scores count
# fractionally), whose variance m(1-m) is the largest any [0, 1] score with mean m can
# have. An empirical variance from a few identical scores would be overconfident, and a
# candidate with three unlucky 0s would never be tried again. Prior worth 4 scores.
QUALITY_PRIOR_STRENGTH = 4.0
P95_REFRESH_EVERY = 8
P95_EXACT_BELOW = 32
# Variance floors for the change test, so a metric that has been constant (zero
# variance) does not flag every wobble: per-observation sd 0.1 (log latency, quality),
# 5% of the mean (cost). Errors are rare events, for which the normal approximation
# flags chance clusters (3 failures in 30 requests at 1.5%): the test uses p(1-p) with
# p ≥ 5%, so a change must take the recent error rate ~13 points above the estimate;
# smaller rises are the breaker's job and the long memory's.
_LOG_LATENCY_VAR_FLOOR = 0.01
_ERROR_P_FLOOR = 0.05
_QUALITY_VAR_FLOOR = 0.01
_COST_REL_VAR_FLOOR = 0.05 ** 2


# Weight (in observations) the long memory restarts with after a change.
RESTART_WEIGHT = 8.0
# The sd of the 95th percentile of n draws of a normal (log latency) with sd s is
# √(0.95·0.05) / φ(1.645) · s/√n: 2.11 times that of their mean.
P95_SD_FACTOR = math.sqrt(0.95 * 0.05) / (math.exp(-1.6449 ** 2 / 2) / math.sqrt(2 * math.pi))


def gamma_for(half_life: float) -> float:
    return 0.5 ** (1.0 / half_life)


@dataclass(frozen=True, slots=True)
class Memory:
    """Decay factors and the change test, derived from config.Learning."""

    slow: float          # decay factor of the long memory (the estimate)
    fast: float          # decay factor of the short memory (the change detector)
    z2: float            # squared threshold in standard errors
    diff_factor: float   # Var(fast mean - slow mean) / per-observation variance
    min_obs: int         # observations since the last restart before testing
    fade_rate: float     # ln 2 / stale_half_life_s: the p95 histograms' decay per second

    @classmethod
    def of(cls, half_life: float, change_half_life: float, change_z: float,
           stale_half_life_s: float = math.inf) -> Memory:
        s, f = gamma_for(half_life), gamma_for(min(change_half_life, half_life))
        # Steady-state variances of exponentially weighted means of iid data, and their
        # covariance: (1-g)/(1+g) each (g the decay factor), (1-f)(1-s)/(1-f*s) shared.
        diff = (1 - f) / (1 + f) + (1 - s) / (1 + s) - 2 * (1 - f) * (1 - s) / (1 - f * s)
        return cls(s, f, change_z * change_z, max(diff, 1e-12),
                   max(4, math.ceil(change_half_life)), math.log(2.0) / stale_half_life_s)


class Ew:
    """Exponentially weighted mean and variance (West/Finch incremental form)."""

    __slots__ = ("mean", "var", "weight")

    def __init__(self) -> None:
        self.weight = 0.0
        self.mean = 0.0
        self.var = 0.0

    def add(self, x: float, gamma: float) -> None:
        weight = gamma * self.weight + 1.0
        alpha = 1.0 / weight
        delta = x - self.mean
        step = alpha * delta
        self.mean += step
        self.var = (1.0 - alpha) * (self.var + delta * step)
        self.weight = weight

    def copy_from(self, other: Ew) -> None:
        self.weight, self.mean, self.var = other.weight, other.mean, other.var

    def posterior(self, prior_mean: float, prior_var: float) -> tuple[float, float, float]:
        """(mean, sd of the mean, per-observation variance), prior worth PRIOR_WEIGHT."""
        total = PRIOR_WEIGHT + self.weight
        mean = (PRIOR_WEIGHT * prior_mean + self.weight * self.mean) / total
        var = (PRIOR_WEIGHT * prior_var + self.weight * self.var) / total
        return mean, math.sqrt(var / total), var


class Tracker:
    """One metric at two memory lengths; `add` returns True when it restarted."""

    __slots__ = ("fast", "restarts", "since_restart", "slow")

    def __init__(self) -> None:
        self.slow = Ew()
        self.fast = Ew()
        self.since_restart = 0
        self.restarts = 0

    def add(self, x: float, memory: Memory, var_floor: float) -> bool:
        slow, fast = self.slow, self.fast
        slow.add(x, memory.slow)
        fast.add(x, memory.fast)
        self.since_restart += 1
        if self.since_restart < memory.min_obs:
            return False
        d = fast.mean - slow.mean
        var = slow.var if slow.var > var_floor else var_floor
        if d * d <= memory.z2 * var * memory.diff_factor:
            return False
        slow.copy_from(fast)
        # The short memory still holds some of the old level (the change was caught part
        # way in), so it restarts light: the next observations pull it the rest of the way.
        if slow.weight > RESTART_WEIGHT:
            slow.weight = RESTART_WEIGHT
        self.since_restart = 0
        self.restarts += 1
        return True


@dataclass(frozen=True, slots=True)
class Priors:
    """What a route knows before a candidate has been observed."""

    latency_log_mean: float = math.log(1000.0)
    input_tokens: float = 1000.0
    output_tokens: float = 250.0
    quality: float = 0.7


class ArmEstimates:
    """Learned state for one (route, model); posterior summaries cached as floats."""

    __slots__ = (
        "_cost", "_errors", "_latency", "_latency_count", "_quality", "_recent", "_sketch",
        "cost_mean", "err_mean", "error_weight", "last_t", "latency_log_sd",
        "latency_mean_ms", "memory", "observations", "p95_ms", "post", "price_in",
        "price_out", "quality_mean", "quality_sd",
    )

    def __init__(self, price_in: float, price_out: float, memory: Memory, now: float,
                 priors: Priors) -> None:
        self.price_in = price_in
        self.price_out = price_out
        self.memory = memory
        self.last_t = now
        self.observations = 0
        self._errors = Tracker()     # 1 = failure, 0 = success
        self._latency = Tracker()    # log ms, successes only
        self._sketch = LatencySketch()   # the p95's: long memory, fading with time
        self._recent = LatencySketch()   # short memory: what a restart starts from
        # Latencies observed, decayed by observations as the other estimates' counts and
        # not restarted: what min_samples counts for the p95 limit.
        self._latency_count = 0.0
        self._cost = Tracker()
        self._quality = Tracker()
        self.p95_ms: float | None = None
        self.refresh(priors)

    # -- learning ----------------------------------------------------------------

    def observe(self, ok: bool, latency_ms: float | None, cost: float | None,
                now: float, priors: Priors) -> None:
        memory = self.memory
        self.observations += 1
        # The histograms fade with the time since the last observation of any kind.
        age = now - self.last_t
        fade = math.exp(-age * memory.fade_rate) if age > 0.0 else 1.0
        self.last_t = now
        p = self._errors.slow.mean
        p = _ERROR_P_FLOOR if p < _ERROR_P_FLOOR else p
        self._errors.add(0.0 if ok else 1.0, memory, p * (1.0 - p))
        if ok and latency_ms is not None and latency_ms > 0.0:
            index = bucket(latency_ms)
            self._recent.add_at(index, memory.fast * fade)
            restarted = self._latency.add(math.log(latency_ms), memory,
                                          _LOG_LATENCY_VAR_FLOOR)
            if restarted:
                self._sketch = self._recent.copy()
            else:
                self._sketch.add_at(index, memory.slow * fade)
            self._latency_count = memory.slow * self._latency_count + 1.0
            p95 = self.p95_ms
            # A latency above the p95 may move it far (a slowdown is excluded at once);
            # one below moves it by at most a 1/total_weight share.
            if (restarted or p95 is None or latency_ms > p95
                    or self._sketch.total_weight < P95_EXACT_BELOW
                    or self.observations % P95_REFRESH_EVERY == 0):
                self.p95_ms = self._sketch.quantile(0.95)
        elif fade < 1.0:
            self._sketch.fade(fade)
            self._recent.fade(fade)
        if ok:
            if cost is not None and cost >= 0.0:
                m = self._cost.slow.mean
                self._cost.add(cost, memory, _COST_REL_VAR_FLOOR * m * m + 1e-18)
        self.refresh(priors)

    def observe_quality(self, score: float, priors: Priors) -> None:
        self._quality.add(min(max(score, 0.0), 1.0), self.memory, _QUALITY_VAR_FLOOR)
        self.refresh(priors)

    def reprice(self, price_in: float, price_out: float, priors: Priors) -> None:
        """New prices (a reload): the costs learned were at the old ones, so they go, and
        the prior (the new prices times the route's learned request sizes) stands in
        until requests at the new prices are observed."""
        self.price_in, self.price_out = price_in, price_out
        self._cost = Tracker()
        self.refresh(priors)

    # -- posterior summaries -------------------------------------------------------

    def prior_cost(self, priors: Priors) -> float:
        return (self.price_in * priors.input_tokens
                + self.price_out * priors.output_tokens) / 1000.0

    def refresh(self, priors: Priors) -> None:
        errors = self._errors.slow
        failures = errors.weight * errors.mean
        a = ERROR_PRIOR_A + failures
        n = ERROR_PRIOR_A + ERROR_PRIOR_B + errors.weight
        self.error_weight = errors.weight
        self.err_mean = err_mean = a / n
        err_sd = math.sqrt(err_mean * (1.0 - err_mean) / (n + 1.0))

        latency = self._latency.slow
        mu, sd, var = latency.posterior(priors.latency_log_mean, LATENCY_PRIOR_LOG_VAR)
        self.latency_log_sd = sd
        self.latency_mean_ms = math.exp(mu + var / 2.0)
        # The p95's sd is that of the latencies the histogram holds, as faded by time.
        held = self._sketch.total_weight
        if self.p95_ms is None or held <= 0.0:
            p95_log: float | None = None
            p95_log_sd = 0.0
        else:
            p95_log = math.log(self.p95_ms)
            p95_log_sd = P95_SD_FACTOR * math.sqrt(var / held)

        prior_cost = self.prior_cost(priors)
        prior_var = (COST_PRIOR_CV * prior_cost) ** 2
        self.cost_mean, cost_sd, _ = self._cost.slow.posterior(prior_cost, prior_var)

        quality = self._quality.slow
        n = QUALITY_PRIOR_STRENGTH + quality.weight
        self.quality_mean = (QUALITY_PRIOR_STRENGTH * priors.quality
                             + quality.weight * quality.mean) / n
        self.quality_sd = math.sqrt(self.quality_mean * (1.0 - self.quality_mean) / (n + 1.0))
        # Everything a decision reads, in one tuple (one attribute load per candidate).
        # Counts and the p95 histogram are as of last_t; a decision fades them on.
        self.post = (self.quality_mean, self.quality_sd, err_mean, err_sd,
                     self.cost_mean, cost_sd, self.latency_mean_ms, sd,
                     p95_log, p95_log_sd, self._latency_count, self.error_weight,
                     quality.weight, self.last_t, priors.latency_log_mean,
                     latency.mean if latency.weight else priors.latency_log_mean, var / 2.0)

    @property
    def restarts(self) -> dict[str, int]:
        return {"error_rate": self._errors.restarts, "latency": self._latency.restarts,
                "cost": self._cost.restarts, "quality": self._quality.restarts}

    def summary(self) -> dict[str, object]:
        return {
            "observations": self.observations,
            "error_rate": self.err_mean,
            "latency_mean_ms": self.latency_mean_ms,
            "latency_p95_ms": self.p95_ms,
            "cost_per_request_usd": self.cost_mean,
            "quality": self.quality_mean,
            "effective_samples": self.error_weight,
            "restarts": self.restarts,
        }
