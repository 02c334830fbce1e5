"""Circuit breaker: closed → open → half-open → closed, on an injected clock."""

from __future__ import annotations

import pytest

from atp_extproc.routing.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    wilson_lower,
)
from atp_extproc.routing.settings import Breaker

RAW = Breaker(confidence=0.0)          # compare the raw error rate with 5%


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed(b: CircuitBreaker, n: int, errors: int) -> None:
    """n results spread over one second, `errors` of them failures (last ones)."""
    for i in range(n):
        b.record(i < n - errors)


def test_opens_when_error_rate_passes_five_percent_with_enough_requests():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 94, 0)
    feed(b, 6, 6)                      # 6 / 100 = 6% > 5%
    assert b.state is OPEN
    assert b.opened_count == 1


def test_stays_closed_at_or_below_the_threshold():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 100, 5)                    # exactly 5% does not pass 5%
    assert b.state is CLOSED
    assert b.error_rate() == pytest.approx(0.05)


def test_needs_min_requests_before_opening():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 19, 19)                    # 100% errors, but only 19 results
    assert b.state is CLOSED
    b.record(False)                    # the 20th
    assert b.state is OPEN


def test_default_confidence_needs_evidence_not_a_chance_cluster():
    b = CircuitBreaker(Breaker(), Clock())          # confidence 0.9
    feed(b, 20, 2)                     # 10% of 20: plausible for a 2% provider
    assert b.state is CLOSED
    b2 = CircuitBreaker(Breaker(), Clock())
    feed(b2, 40, 8)                    # 20% of 40: Wilson lower bound ≈ 12%
    assert b2.state is OPEN
    assert wilson_lower(2, 20, 1.2816) < 0.05 < wilson_lower(8, 40, 1.2816)


def test_old_results_leave_the_rolling_window():
    clock = Clock()
    b = CircuitBreaker(RAW, clock)
    feed(b, 100, 5)
    clock.t += RAW.window_s + 1        # all of it is now outside the window
    feed(b, 19, 2)
    assert b.window_results == 19
    assert b.state is CLOSED


def test_half_open_probe_then_close_on_recovery():
    clock = Clock()
    b = CircuitBreaker(RAW, clock)
    feed(b, 20, 20)
    assert b.poll() is OPEN
    clock.t += RAW.open_s - 0.1
    assert b.poll() is OPEN and not b.try_probe()
    clock.t += 0.2
    assert b.poll() is HALF_OPEN
    for _ in range(RAW.half_open_probes):
        assert b.try_probe()
        assert not b.try_probe()       # one probe in flight at a time
        b.record(True)
    assert b.state is CLOSED
    assert b.window_results == 0       # a fresh window after recovery


def test_failed_probe_reopens_with_backoff():
    clock = Clock()
    b = CircuitBreaker(RAW, clock)
    feed(b, 20, 20)
    clock.t += RAW.open_s
    assert b.try_probe()
    b.record(False)
    assert b.state is OPEN
    assert b.open_until == pytest.approx(clock.t + 2 * RAW.open_s)
    for _ in range(10):                # doubling stops at max_open_s
        clock.t = b.open_until
        assert b.try_probe()
        b.record(False)
    assert b.open_until - clock.t == pytest.approx(RAW.max_open_s)
    clock.t = b.open_until
    for _ in range(RAW.half_open_probes):
        assert b.try_probe()
        b.record(True)
    assert b.state is CLOSED and b.open_for == RAW.open_s


def test_a_lost_probe_frees_its_slot_after_open_s():
    clock = Clock()
    b = CircuitBreaker(RAW, clock)
    feed(b, 20, 20)
    clock.t += RAW.open_s
    assert b.try_probe()
    clock.t += RAW.open_s / 2
    assert not b.try_probe()
    clock.t += RAW.open_s
    assert b.try_probe()


def test_late_answers_to_requests_sent_before_it_opened_are_no_probes():
    # Long generations sent before it opened answered while the probe was still out:
    # three successes closed it, a failure reopened it with a doubled open time.
    clock = Clock()
    b = CircuitBreaker(RAW, clock)
    sent_early = clock.t
    feed(b, 20, 20)
    clock.t += RAW.open_s + 1
    assert b.try_probe()
    for ok in (True, True, True, False):
        b.record(ok, sent=sent_early)
    assert b.state is HALF_OPEN and not b.try_probe()  # the probe's slot still held
    assert b.probe_successes == 0
    b.record(True, sent=clock.t)       # the probe's own answer counts
    assert b.probe_successes == 1


def test_results_arriving_while_open_change_nothing():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 20, 20)
    until = b.open_until
    feed(b, 50, 0)
    assert b.state is OPEN and b.open_until == until


def test_reconfigure_keeps_the_window():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 50, 2)
    b.configure(Breaker(confidence=0.0, error_rate=0.03))
    assert b.window_results == 50
    b.record(False)                    # 3 / 51 = 5.9% > 3%
    assert b.state is OPEN


def test_snapshot_for_introspection():
    b = CircuitBreaker(RAW, Clock())
    feed(b, 20, 1)
    snap = b.snapshot()
    assert snap["state"] == "closed"
    assert snap["window_results"] == 20 and snap["window_errors"] == 1


def test_a_wider_window_on_reload_still_ages_old_results_out():
    # Long uptime: the epoch counted in the old width is far above the new width's, and
    # kept, it pinned every later result into one bucket (they never aged out).
    clock = Clock()
    clock.t = 1_000_000.0
    b = CircuitBreaker(Breaker(window_s=30, min_requests=20, error_rate=0.5,
                               confidence=0.0), clock)
    b.record(True)
    b.configure(Breaker(window_s=60, min_requests=20, error_rate=0.5, confidence=0.0))
    for _ in range(10):
        b.record(False)
    clock.t += 3600                    # an hour later: the 60 s window holds only what follows
    for _ in range(10):
        b.record(False)
    assert b.window_results == 10
    assert b.state is CLOSED           # 10 < min_requests
