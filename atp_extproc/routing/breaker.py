"""Per-candidate circuit breaker: closed → open → half-open → closed.

Closed: results go into a rolling time window (10 buckets). When the window holds at
least `min_requests` results and the error rate passes `error_rate` (optionally its
Wilson lower bound at `confidence`), the breaker opens.
Open: the candidate gets no traffic for `open_s` (doubled after each failed probe, up to
`max_open_s`), then turns half-open.
Half-open: one probe request at a time; `half_open_probes` consecutive successes close
it, any failure reopens it; results of requests sent before it turned half-open count
for nothing. A probe whose result never comes back frees its slot after
`open_s`.

Time comes in as `now` (monotonic seconds) from the caller, or from the injected clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import StrEnum
from statistics import NormalDist

from atp_extproc.routing.settings import Breaker as BreakerSettings

_BUCKETS = 10


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN


def wilson_lower(failures: float, total: float, z: float) -> float:
    if total <= 0:
        return 0.0
    p = failures / total
    if z <= 0:
        return p
    z2 = z * z
    centre = p + z2 / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return (centre - margin) / (1 + z2 / total)


class CircuitBreaker:
    __slots__ = (
        "_bucket_width", "_epoch", "_errors", "_results", "_z", "clock", "open_for",
        "open_until", "opened_count", "probe_since", "probe_successes", "probing",
        "settings", "state", "window_errors", "window_results",
    )

    def __init__(self, settings: BreakerSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.state = CLOSED
        self.open_until = 0.0
        self.opened_count = 0
        self.probing = False
        self.probe_since = 0.0
        self.probe_successes = 0
        self._bucket_width = 0.0  # configure() starts the window
        self.configure(settings)
        self.open_for = settings.open_s

    def configure(self, settings: BreakerSettings) -> None:
        """Apply new settings (config reload); the window is kept unless its width
        changes (its buckets and epoch are counted in the old width: kept, they would
        pin every result into one bucket for as long as the process had run)."""
        self.settings = settings
        width = settings.window_s / _BUCKETS
        if width != self._bucket_width:  # window_s > 0: always so the first time
            self._errors = [0] * _BUCKETS
            self._results = [0] * _BUCKETS
            self.window_errors = self.window_results = 0
            self._epoch = 0
        self._bucket_width = width
        self._z = NormalDist().inv_cdf(settings.confidence) if settings.confidence > 0.5 \
            else 0.0

    # -- queries -----------------------------------------------------------------------

    def poll(self, now: float | None = None) -> State:
        """The state now; an open breaker whose time is up turns half-open."""
        if self.state is OPEN:
            if now is None:
                now = self.clock()
            if now >= self.open_until:
                self.state = HALF_OPEN
                self.probing = False
                self.probe_successes = 0
        return self.state

    def try_probe(self, now: float | None = None) -> bool:
        """Half-open: claim the single probe slot (True) if it is free."""
        if self.poll(now) is not HALF_OPEN:
            return False
        if now is None:
            now = self.clock()
        if self.probing and now - self.probe_since < self.settings.open_s:
            return False
        self.probing = True
        self.probe_since = now
        return True

    def error_rate(self) -> float:
        return self.window_errors / self.window_results if self.window_results else 0.0

    # -- results -----------------------------------------------------------------------

    def record(self, ok: bool, now: float | None = None, sent: float | None = None) -> None:
        """One result; `sent`: when its request left (None: unknown)."""
        if now is None:
            now = self.clock()
        state = self.state
        if state is HALF_OPEN and sent is not None and sent < self.open_until:
            # Sent before the probes could be: a late answer to a request of before the
            # breaker opened neither closes it (3 of them did, the probe still out) nor
            # reopens it, nor frees the probe's slot.
            return
        if state is CLOSED:
            self._add(ok, now)
            s = self.settings
            if (not ok and self.window_results >= s.min_requests
                    and wilson_lower(self.window_errors, self.window_results, self._z)
                    > s.error_rate):
                self._trip(now, backoff=False)
        elif state is HALF_OPEN:
            self.probing = False
            if ok:
                self.probe_successes += 1
                if self.probe_successes >= self.settings.half_open_probes:
                    self._close()
            else:
                self._trip(now, backoff=True)
        # OPEN: results of requests sent before it opened change nothing.

    def _add(self, ok: bool, now: float) -> None:
        epoch = int(now / self._bucket_width)
        if epoch < self._epoch:   # a clock that stepped back: stay in the current bucket
            epoch = self._epoch
        if epoch != self._epoch:
            steps = min(epoch - self._epoch, _BUCKETS)
            for k in range(1, steps + 1):
                i = (self._epoch + k) % _BUCKETS
                self.window_errors -= self._errors[i]
                self.window_results -= self._results[i]
                self._errors[i] = 0
                self._results[i] = 0
            self._epoch = epoch
        i = epoch % _BUCKETS
        self._results[i] += 1
        self.window_results += 1
        if not ok:
            self._errors[i] += 1
            self.window_errors += 1

    def _trip(self, now: float, backoff: bool) -> None:
        s = self.settings
        self.open_for = min(self.open_for * 2.0, s.max_open_s) if backoff else s.open_s
        self.state = OPEN
        self.open_until = now + self.open_for
        self.opened_count += 1
        self.probing = False
        self.probe_successes = 0

    def _close(self) -> None:
        self.state = CLOSED
        self.open_for = self.settings.open_s
        self.probing = False
        self.probe_successes = 0
        self._errors = [0] * _BUCKETS
        self._results = [0] * _BUCKETS
        self.window_errors = 0
        self.window_results = 0

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        state = self.poll(now)
        return {
            "state": state.value,
            "window_results": self.window_results,
            "window_errors": self.window_errors,
            "window_error_rate": self.error_rate(),
            "open_until": self.open_until if state is OPEN else None,
            "opened_count": self.opened_count,
            "probe_successes": self.probe_successes,
        }
