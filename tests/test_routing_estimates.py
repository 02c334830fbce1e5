"""Online estimates: weighted moments, change restarts, posteriors, the p95 sketch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atp_extproc.routing.estimates import ArmEstimates, Ew, Memory, Priors, Tracker, gamma_for
from atp_extproc.routing.sketch import LatencySketch

MEMORY = Memory.of(3000.0, 25.0, 5.0)


def test_gamma_halves_weight_after_half_life():
    g = gamma_for(100)
    assert g ** 100 == pytest.approx(0.5)


def test_ew_mean_and_variance_without_decay():
    ew = Ew()
    xs = [1.0, 2.0, 3.0, 4.0]
    for x in xs:
        ew.add(x, 1.0)
    assert ew.mean == pytest.approx(2.5)
    assert ew.var == pytest.approx(np.var(xs))
    assert ew.weight == 4


def test_ew_decay_caps_the_weight_and_follows_the_latest_values():
    ew = Ew()
    g = gamma_for(10)
    for _ in range(1000):
        ew.add(0.0, g)
    for _ in range(30):
        ew.add(1.0, g)
    assert ew.weight == pytest.approx(1 / (1 - g), rel=1e-3)
    # 30 observations = 3 half-lives: the old value keeps 1/8 of the weight.
    assert ew.mean == pytest.approx(1 - 0.125, abs=0.01)


def test_tracker_stays_put_on_stationary_noise():
    rng = np.random.default_rng(1)
    latency, errors = Tracker(), Tracker()
    for x in rng.normal(math.log(400), 0.4, 20_000):
        latency.add(float(x), MEMORY, 0.01)
    for failed in rng.random(20_000) < 0.02:
        errors.add(1.0 if failed else 0.0, MEMORY, 0.05 * 0.95)
    assert latency.restarts == 0
    assert errors.restarts == 0


def test_tracker_restarts_soon_after_a_step_change():
    rng = np.random.default_rng(2)
    t = Tracker()
    for x in rng.normal(0.0, 0.4, 5000):
        t.add(float(x), MEMORY, 0.01)
    after = rng.normal(math.log(4.0), 0.4, 60)
    first = next(k for k, x in enumerate(after) if t.add(float(x), MEMORY, 0.01))
    assert first < 20
    for x in after[first + 1:]:
        t.add(float(x), MEMORY, 0.01)
    # 60 observations after the change the estimate is mostly the new level; with the
    # long memory alone (half-life 3000) it would have moved by about 1%.
    assert t.slow.mean > 0.6 * math.log(4.0)


def _arm(memory: Memory = MEMORY) -> ArmEstimates:
    return ArmEstimates(0.001, 0.002, memory, 0.0, Priors())


def test_arm_estimates_converge_to_the_truth():
    rng = np.random.default_rng(3)
    arm = _arm()
    mu, sigma = math.log(500), 0.5
    for i in range(4000):
        ok = rng.random() >= 0.05
        arm.observe(ok, float(math.exp(rng.normal(mu, sigma))), 0.002 if ok else None,
                    float(i), Priors())
        if ok:
            arm.observe_quality(1.0 if rng.random() < 0.8 else 0.0, Priors())
    assert arm.err_mean == pytest.approx(0.05, abs=0.015)
    assert arm.latency_mean_ms == pytest.approx(math.exp(mu + sigma ** 2 / 2), rel=0.05)
    assert arm.p95_ms == pytest.approx(math.exp(mu + 1.6449 * sigma), rel=0.08)
    assert arm.cost_mean == pytest.approx(0.002, rel=0.01)
    assert arm.quality_mean == pytest.approx(0.8, abs=0.03)
    assert arm.latency_log_sd < 0.02


def test_priors_before_any_observation():
    priors = Priors(latency_log_mean=math.log(800), input_tokens=1000, output_tokens=500,
                    quality=0.6)
    arm = ArmEstimates(0.002, 0.004, MEMORY, 0.0, priors)
    assert arm.cost_mean == pytest.approx((0.002 * 1000 + 0.004 * 500) / 1000)
    assert arm.quality_mean == pytest.approx(0.6)
    assert arm.err_mean == pytest.approx(0.025)
    assert arm.p95_ms is None
    # Wide: nothing is known yet.
    assert arm.latency_log_sd > 0.5


def test_a_few_unlucky_quality_scores_do_not_condemn_a_candidate():
    arm = _arm()
    for _ in range(3):
        arm.observe_quality(0.0, Priors(quality=0.7))
    # Beta(2.8, 1.2 + 3): still plausible enough to be sampled above 0.7 now and then.
    assert arm.quality_mean == pytest.approx(0.4, abs=1e-3)
    assert arm.quality_mean + 2 * arm.quality_sd > 0.7


def test_degraded_latency_is_noticed_within_tens_of_observations():
    rng = np.random.default_rng(4)
    arm = _arm()
    for i in range(3000):
        arm.observe(True, float(math.exp(rng.normal(math.log(300), 0.3))), None, float(i),
                    Priors())
    before = arm.latency_mean_ms
    for i in range(40):
        arm.observe(True, float(math.exp(rng.normal(math.log(1200), 0.3))), None,
                    3000.0 + i, Priors())
    assert arm.latency_mean_ms > 2.5 * before
    assert arm.restarts["latency"] == 1
    assert arm.p95_ms is not None and arm.p95_ms > 1200


def test_error_spike_is_noticed_and_recorded_in_post():
    arm = _arm()
    for i in range(2000):
        arm.observe(i % 100 != 0, 300.0, None, float(i), Priors())
    assert arm.err_mean == pytest.approx(0.01, abs=0.005)
    for i in range(40):
        arm.observe(i % 3 != 0, 300.0, None, 2000.0 + i, Priors())
    assert arm.err_mean > 0.15
    assert arm.post[2] == arm.err_mean
    assert arm.post[13] == 2039.0  # last_t


def test_sketch_quantiles_within_bucket_error():
    rng = np.random.default_rng(5)
    sketch = LatencySketch()
    xs = np.exp(rng.normal(math.log(250), 0.6, 20_000))
    for x in xs:
        sketch.add(float(x), 1.0)
    for q in (0.5, 0.95, 0.99):
        assert sketch.quantile(q) == pytest.approx(float(np.quantile(xs, q)), rel=0.06)
    assert LatencySketch().quantile(0.95) is None


def test_sketch_decay_forgets_old_latencies():
    sketch = LatencySketch()
    g = gamma_for(50)
    for _ in range(2000):
        sketch.add(100.0, g)
    for _ in range(400):
        sketch.add(1000.0, g)
    assert sketch.quantile(0.5) == pytest.approx(1000.0, rel=0.1)
