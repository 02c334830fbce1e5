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
_Key = tuple[str | None, str]                       # (tenant, request id)

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
    recorded: float
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
        # One queue per window length, so each queue's deadlines are in its order: in one
        # queue, a route's 1 s window waited behind another's 600 s one.
        self._queues: dict[float, OrderedDict[_Key, _Pending]] = {}
        self._queue_of: dict[_Key, OrderedDict[_Key, _Pending]] = {}
        self.explicit = 0
        self.proxied = 0
        self.unscored = 0

    def __len__(self) -> int:
        return len(self._queue_of)

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
        if key in self._queue_of:
            self._resolve(self._take(key), None)
        while len(self._queue_of) >= self._capacity:
            # The oldest entry is one of the queues' first: the one recorded first.
            queue = min((q for q in self._queues.values() if q),
                        key=lambda q: next(iter(q.values())).recorded)
            self._resolve(self._take(next(iter(queue))), None)
        window = window_s if window_s is not None else self._window_s
        queue = self._queues.get(window)
        if queue is None:
            queue = self._queues[window] = OrderedDict()
        queue[key] = _Pending(route, model, now, now + window,
                              None if proxy is None else _unit(proxy))
        self._queue_of[key] = queue

    def _take(self, key: _Key) -> _Pending:
        return self._queue_of.pop(key).pop(key)

    def set_proxy(self, request_id: str, score: float | None,
                  tenant: str | None = None) -> None:
        """The proxy score for a request (e.g. finish_reason_score), used if no feedback."""
        queue = self._queue_of.get((tenant, request_id))
        entry = queue.get((tenant, request_id)) if queue is not None else None
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
        if key not in self._queue_of:
            key = (None, request_id)  # recorded without a tenant: anyone's
            if key not in self._queue_of:
                return False
        entry = self._take(key)
        if self._clock() > entry.deadline:
            self._resolve(entry, None)
            return False
        self._resolve(entry, float(score))
        return True

    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Resolve entries whose window has ended (with their proxy); returns how many."""
        if now is None:
            now = self._clock()
        done = 0
        for window, queue in list(self._queues.items()):
            while queue and (limit is None or done < limit):
                key, entry = next(iter(queue.items()))
                if entry.deadline > now:
                    break
                self._resolve(self._take(key), None)
                done += 1
            if not queue:
                del self._queues[window]  # a window no route has since a reload
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
