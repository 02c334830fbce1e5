"""Quality signal: explicit feedback keyed by request id, with a proxy as the fallback.

Each served request is remembered (bounded, oldest first) as request id → (route, model,
proxy score). Feedback that arrives within the window is the request's quality
observation; when none does (the window ends or the entry is evicted), the proxy score
(e.g. from finish_reason) is used instead, if there is one. Each request therefore counts
once: never both the proxy and the feedback.

Explicit feedback must reach the process that served the request (entries are in memory);
feedback that finds no entry returns False and the caller answers 404.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from atp_extproc.routing.settings import DEFAULT_FINISH_REASON_SCORES

QualitySink = Callable[[str, str, float], None]   # (route, model, score)

DEFAULT_CAPACITY = 100_000
DEFAULT_WINDOW_S = 300.0
# Entries expired per record_decision call (amortised cleanup on the hot path).
_EXPIRE_PER_CALL = 4


def finish_reason_score(finish_reason: str | None,
                        scores: Mapping[str, float] = DEFAULT_FINISH_REASON_SCORES
                        ) -> float | None:
    """Proxy quality of a response from its finish_reason; None when it says nothing."""
    if finish_reason is None:
        return None
    return scores.get(finish_reason)


def _unit(score: float) -> float:
    return min(max(score, 0.0), 1.0)


@dataclass(slots=True)
class _Pending:
    route: str
    model: str
    deadline: float
    proxy: float | None = None


class FeedbackBook:
    def __init__(self, sink: QualitySink, capacity: int = DEFAULT_CAPACITY,
                 window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._sink = sink
        self._capacity = capacity
        self._window_s = window_s
        self._clock = clock
        # By (tenant, request id): an app's own x-request-id (a trace id, which Istio
        # keeps) may come from two tenants, and one's request then took the other's place.
        self._pending: OrderedDict[tuple[str | None, str], _Pending] = OrderedDict()
        self.explicit = 0
        self.proxied = 0
        self.unscored = 0

    def __len__(self) -> int:
        return len(self._pending)

    def record_decision(self, request_id: str, route: str, model: str,
                        window_s: float | None = None, tenant: str | None = None, *,
                        proxy: float | None = None) -> None:
        """Remember which (route, model) served `request_id` (call when it is served).
        With `tenant`, only feedback from that tenant is accepted for it; `proxy` is as
        for set_proxy."""
        if not request_id:
            return
        now = self._clock()
        self.expire(now, limit=_EXPIRE_PER_CALL)
        key = (tenant, request_id)
        if key in self._pending:
            self._resolve(self._pending.pop(key), None)
        while len(self._pending) >= self._capacity:
            _, oldest = self._pending.popitem(last=False)
            self._resolve(oldest, None)
        deadline = now + (window_s if window_s is not None else self._window_s)
        self._pending[key] = _Pending(
            route, model, deadline, None if proxy is None else _unit(proxy))

    def set_proxy(self, request_id: str, score: float | None,
                  tenant: str | None = None) -> None:
        """The proxy score for a request (e.g. finish_reason_score), used if no feedback."""
        entry = self._pending.get((tenant, request_id))
        if entry is not None and score is not None:
            entry.proxy = _unit(score)

    def feedback(self, request_id: str, score: float, tenant: str | None = None) -> bool:
        """Explicit quality in [0, 1] for a recent request; False if unknown, expired or
        (when the decision was recorded with a tenant) another tenant's request."""
        # 0 <= score <= 1 first: isfinite() of an int too big for a float raises.
        if not isinstance(score, (int, float)) or isinstance(score, bool) or \
                not 0 <= score <= 1 or not math.isfinite(score):
            raise ValueError("score must be a number in [0, 1]")
        key = (tenant, request_id)
        if key not in self._pending:
            key = (None, request_id)  # recorded without a tenant: anyone's
        entry = self._pending.pop(key, None)
        if entry is None:
            return False
        if self._clock() > entry.deadline:
            self._resolve(entry, None)
            return False
        self._resolve(entry, float(score))
        return True

    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Resolve entries whose window has ended (with their proxy); returns how many.

        Deadlines are in insertion order for one window length; with per-route windows
        an entry waits at most until the ones before it expire."""
        if now is None:
            now = self._clock()
        done = 0
        pending = self._pending
        while pending and (limit is None or done < limit):
            key, entry = next(iter(pending.items()))
            if entry.deadline > now:
                break
            del pending[key]
            self._resolve(entry, None)
            done += 1
        return done

    def _resolve(self, entry: _Pending, explicit: float | None) -> None:
        if explicit is not None:
            self.explicit += 1
            self._sink(entry.route, entry.model, explicit)
        elif entry.proxy is not None:
            self.proxied += 1
            self._sink(entry.route, entry.model, entry.proxy)
        else:
            self.unscored += 1
