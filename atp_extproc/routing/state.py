"""Per-route router state: candidates (arms), route-level priors, prepared candidate lists.

Nothing here decides; router.Router reads and updates this state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atp_extproc.routing.breaker import CircuitBreaker
from atp_extproc.routing.estimates import ArmEstimates, Ew, Priors
from atp_extproc.routing.selection import CandidateModel, Compiled
from atp_extproc.routing.settings import DEFAULT_OBJECTIVE, RouteObjective

# Route-level priors (typical tokens, latency) are rebuilt every this many observations.
PRIOR_REFRESH_EVERY = 64


class Arm:
    __slots__ = ("breaker", "epoch_share", "est", "picks", "share")

    def __init__(self, est: ArmEstimates, breaker: CircuitBreaker, share: float) -> None:
        self.est = est
        self.breaker = breaker
        self.share = share
        self.epoch_share = share   # the share when the route's share epoch last moved
        self.picks = 0


class RouteState:
    __slots__ = ("_input", "_latency", "_output", "arms", "comp", "explore_ew", "explore_norm",
                 "observations", "prepared", "priors", "share_epoch", "since_shares",
                 "sticky_picks")

    def __init__(self) -> None:
        self.arms: dict[str, Arm] = {}
        self.comp = Compiled(DEFAULT_OBJECTIVE)
        self.explore_ew = 0.0
        # The same average of a constant 1: explore_ew / explore_norm is the share over
        # the decisions so far while they are fewer than the average's ~1/EXPLORE_ALPHA.
        self.explore_norm = 0.0
        self.observations = 0
        self.since_shares = 0
        self.share_epoch = 0
        # key → (share epoch, eligible names, model) for sticky keys.
        self.sticky_picks: dict[str, tuple[int, tuple[str, ...], str]] = {}
        self.priors = Priors(quality=self.comp.quality_prior)
        # id(candidates) → Prepared (which holds `candidates`, so the id stays unique).
        self.prepared: dict[int, Prepared] = {}
        self._latency = Ew()
        self._input = Ew()
        self._output = Ew()

    def compile(self, objective: RouteObjective) -> Compiled:
        comp = self.comp
        if comp.objective is objective:
            return comp
        comp = self.comp = Compiled(objective)
        self.prepared.clear()
        for arm in self.arms.values():
            arm.est.memory = comp.memory
            arm.breaker.configure(objective.breaker)
        if self.priors.quality != comp.quality_prior:
            self._rebuild_priors()
        return comp

    def learn_route(self, latency_ms: float | None, input_tokens: int | None,
                    output_tokens: int | None) -> None:
        g = self.comp.memory.slow
        if latency_ms is not None and latency_ms > 0:
            self._latency.add(math.log(latency_ms), g)
        if input_tokens is not None:
            self._input.add(float(input_tokens), g)
        if output_tokens is not None:
            self._output.add(float(output_tokens), g)
        self.observations += 1
        if self.observations % PRIOR_REFRESH_EVERY == 0 or self.observations < 8:
            self._rebuild_priors()

    def _rebuild_priors(self) -> None:
        default = Priors()
        self.priors = Priors(
            latency_log_mean=self._latency.mean if self._latency.weight else
            default.latency_log_mean,
            input_tokens=self._input.mean if self._input.weight else default.input_tokens,
            output_tokens=self._output.mean if self._output.weight else
            default.output_tokens,
            quality=self.comp.quality_prior,
        )
        for arm in self.arms.values():
            arm.est.refresh(self.priors)


class Prepared:
    """What a decision needs that depends only on the candidates and the objective."""

    __slots__ = ("arms", "candidates", "champion", "entries", "excluded", "mirror_arm",
                 "names", "names_t", "price_ok")

    def __init__(self, candidates: Sequence[CandidateModel]) -> None:
        # Held, not read: it keeps id(candidates), the key in RouteState.prepared, unique.
        self.candidates = candidates
        # (name, arm, within max price, static exclusion or None), in candidate order.
        self.entries: list[tuple[str, Arm, bool, str | None]] = []
        # The candidates without a static exclusion, for the fast path.
        self.names: list[str] = []
        self.names_t: tuple[str, ...] = ()
        self.arms: list[Arm] = []
        self.price_ok: list[bool] = []
        self.excluded: tuple[tuple[str, str], ...] = ()
        self.mirror_arm: Arm | None = None
        # The objective's champion, else the first candidate.
        self.champion: str | None = None
