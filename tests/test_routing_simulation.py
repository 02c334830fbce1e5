"""The simulation bars: regret far below random and round-robin, sublinear growth, and a
bounded switch away from a best candidate that degrades halfway."""

from __future__ import annotations

import numpy as np
import pytest

from atp_extproc.routing.simulate import (
    DEFAULT_ARMS,
    Degradation,
    moved_off,
    simulate,
    true_utility,
)

N = 20_000
SEEDS = (0, 1, 2)
# Requests after the degradation until a 50-request window in which the degraded
# candidate got at most 10% (5) of them; 50 is the smallest possible value.
MOVED_OFF_BOUND = 150


@pytest.fixture(scope="module")
def learned():
    return [simulate("thompson", n=N, seed=s) for s in SEEDS]


def test_the_world_has_a_clear_best():
    u = sorted((true_utility(a) for a in DEFAULT_ARMS), reverse=True)
    assert u[0] - u[1] > 0.05


def test_regret_far_below_random_and_round_robin(learned):
    for result, seed in zip(learned, SEEDS, strict=True):
        baseline = min(simulate("random", n=N, seed=seed).regret_at(N),
                       simulate("round_robin", n=N, seed=seed).regret_at(N))
        assert result.regret_at(N) < 0.3 * baseline
        # In fact by a factor of ~50.
        assert result.regret_at(N) < 0.05 * baseline


def test_regret_grows_sublinearly(learned):
    first = sum(r.regret_at(N // 2) for r in learned)
    second = sum(r.regret_at(N) - r.regret_at(N // 2) for r in learned)
    assert second < 0.5 * first
    for r in learned:
        assert np.all(np.diff(r.regret) >= 0)
        assert r.share(r.best_before, N // 2) > 0.9


@pytest.mark.parametrize("degradation", [Degradation(latency_factor=4.0),
                                         Degradation(latency_factor=1.0, error_rate=0.3)],
                         ids=["latency_x4", "errors_30pct"])
def test_moves_off_a_degraded_best_within_a_bound(degradation):
    r = simulate("thompson", n=N, seed=0, degrade_at=N // 2, degradation=degradation)
    assert r.best_after != r.best_before
    assert r.moved_off_after is not None and r.moved_off_after <= MOVED_OFF_BOUND
    # And settles on the new best.
    assert r.share(r.best_after, N // 2 + 2000) > 0.85


def test_moved_off_measure():
    choices = np.array([1] * 100 + [0] * 100)
    assert moved_off(choices, arm=1, start=0) == 100 + 45
    assert moved_off(np.ones(200, dtype=np.int64), arm=1, start=0) is None
