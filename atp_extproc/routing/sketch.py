"""A decaying latency histogram with log-spaced buckets, for quantiles such as p95.

Buckets grow by 10% (relative quantile error ≤ 5%), from 1 ms to ~3 hours. Decay is
lazy: rather than every bucket being multiplied by a factor, later observations are
added with a weight divided by it, and the whole array is rescaled when the weights
grow large.
"""

from __future__ import annotations

import math

import numpy as np

_RATIO = 1.1
_LOG_RATIO = math.log(_RATIO)
_BUCKETS = 170
_RESCALE_AT = 1e100


def bucket(latency_ms: float) -> int:
    """The bucket a latency falls in."""
    if latency_ms <= 1.0:
        return 0
    return min(int(math.log(latency_ms) / _LOG_RATIO), _BUCKETS - 1)


class LatencySketch:
    __slots__ = ("_counts", "_increment", "total_weight")

    def __init__(self) -> None:
        self._counts = np.zeros(_BUCKETS)
        self._increment = 1.0
        self.total_weight = 0.0  # decayed number of observations

    def add(self, latency_ms: float, gamma: float) -> None:
        """Scale the mass held by `gamma`, then add one observation."""
        self.add_at(bucket(latency_ms), gamma)

    def add_at(self, index: int, gamma: float) -> None:
        """`add` of a latency whose bucket is known (one latency, several sketches)."""
        self.fade(gamma)
        self._counts[index] += self._increment
        self.total_weight += 1.0

    def fade(self, factor: float) -> None:
        """Scale the mass held by `factor` in [0, 1]; quantiles stay where they are."""
        self.total_weight *= factor
        if factor * _RESCALE_AT > self._increment:
            self._increment /= factor
        else:   # also factor 0 (a stale half-life passed a thousand times): all fades
            self._counts *= factor / self._increment
            self._increment = 1.0

    def copy(self) -> LatencySketch:
        other = LatencySketch.__new__(LatencySketch)
        other._counts = self._counts.copy()
        other._increment = self._increment
        other.total_weight = self.total_weight
        return other

    def quantile(self, q: float) -> float | None:
        """The q-quantile in ms (geometric interpolation inside a bucket); None if empty."""
        if self.total_weight <= 0.0:
            return None
        cumulative = np.cumsum(self._counts)
        target = q * cumulative[-1]
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, _BUCKETS - 1)
        below = float(cumulative[index - 1]) if index > 0 else 0.0
        inside = float(self._counts[index])
        fraction = (float(target) - below) / inside if inside > 0 else 1.0
        return _RATIO ** (index + min(max(fraction, 0.0), 1.0))   # a Python float
