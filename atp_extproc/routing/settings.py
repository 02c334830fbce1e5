"""Config blocks for learned routing and the savings ledger.

`RouteObjective` is a route's `objective:` block; `LedgerSettings` is the document's
top-level `ledger:` block. Both are frozen pydantic models that refuse unknown keys.
Names that must exist elsewhere in the document (champion, challengers, baselines) are
checked by `check_references`, which `config.parse` calls after shape validation.

This module must not import `atp_extproc.config` (config imports it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from atp_extproc.settings_types import Flag, Frozen, Items

# Model and route names travel in headers: a safe alphabet (config.TOKEN is built from it).
TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$"
Name = Annotated[str, Field(pattern=TOKEN_PATTERN)]

DEFAULT_FINISH_REASON_SCORES: dict[str, float] = {
    "stop": 1.0,
    "tool_calls": 1.0,
    "function_call": 1.0,
    "length": 0.5,
    "content_filter": 0.0,
}


class Weights(Frozen):
    """How much each term weighs in the route's objective (higher objective is better).

    objective = quality·q - cost·(c / cost_scale) - latency·(L / latency_scale) - error·e
    with q the mean quality score in [0, 1], c the mean cost per request, L the mean
    latency and e the error rate.
    """

    cost: float = Field(default=1.0, ge=0, le=1000)
    latency: float = Field(default=1.0, ge=0, le=1000)
    quality: float = Field(default=1.0, ge=0, le=1000)
    error: float = Field(default=1.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _some_weight(self) -> Weights:
        if self.cost + self.latency + self.quality + self.error <= 0:
            raise ValueError("at least one weight must be positive")
        return self


class Limits(Frozen):
    """Hard limits: a candidate outside any of them is not chosen (see router docs)."""

    p95_latency_ms: float | None = Field(default=None, gt=0)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    min_quality: float | None = Field(default=None, ge=0, le=1)
    # Compared with the candidate's blended price per 1K tokens:
    # input_per_1k·input_share + output_per_1k·(1 - input_share).
    max_price_per_1k: float | None = Field(default=None, ge=0)
    input_share: float = Field(default=0.75, ge=0, le=1)
    # Learned limits (latency, errors, quality) apply once a candidate has this many
    # (decayed) observations; before that nothing is known, so nothing is excluded.
    min_samples: float = Field(default=20, ge=0, le=100_000)


class Scale(Frozen):
    """Reference values that turn cost and latency into objective units.

    Unset means automatic: the largest posterior mean among the decision's candidates,
    so each term lies in [0, weight]. Fixed values make objective units (and regret)
    comparable across time and candidate sets.
    """

    cost_usd: float | None = Field(default=None, gt=0)
    latency_ms: float | None = Field(default=None, gt=0)


class Shadow(Frozen):
    # off: no shadow. decision: serve the champion, record what ATP would have chosen and
    # the savings it predicts. mirror: serve normally and have Envoy mirror `share` of
    # requests to `challenger` through the shadow listener; the challenger is then
    # measured on the copies only and never serves a client.
    mode: Literal["off", "decision", "mirror"] = "off"
    challenger: Name | None = None
    share: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> Shadow:
        if self.mode == "mirror":
            if self.challenger is None:
                raise ValueError("mode mirror needs a challenger")
            if self.share <= 0:
                raise ValueError("mode mirror needs a share above 0")
        elif self.challenger is not None or self.share:
            raise ValueError(f"challenger and share only apply to mode mirror, "
                             f"not {self.mode!r}")
        return self


class Breaker(Frozen):
    """Per-candidate circuit breaker."""

    # Opens when the error rate over the rolling window passes this ...
    error_rate: float = Field(default=0.05, gt=0, le=1)
    window_s: float = Field(default=30.0, gt=0, le=3600)
    # ... with at least this many results in the window.
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    # Optional one-sided confidence: 0 compares the raw rate; 0.9 opens only when the
    # Wilson lower bound of the rate passes the threshold (fewer trips on low traffic).
    confidence: float = Field(default=0.9, ge=0, lt=1)
    open_s: float = Field(default=30.0, gt=0, le=3600)
    # Each failed half-open probe doubles the open time, up to this.
    max_open_s: float = Field(default=300.0, gt=0, le=86_400)
    # Consecutive successful probes (one in flight at a time) that close it again.
    half_open_probes: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _open_times(self) -> Breaker:
        if self.max_open_s < self.open_s:
            raise ValueError("max_open_s must be at least open_s")
        return self


class Learning(Frozen):
    # Estimates remember about 1.44·half_life observations of a candidate while nothing
    # changes ...
    half_life: float = Field(default=3000.0, ge=1, le=1_000_000)
    # ... and restart from the last ~change_half_life observations when those differ from
    # the long memory by more than change_z standard errors (a degradation or recovery).
    change_half_life: float = Field(default=25.0, ge=2, le=100_000)
    change_z: float = Field(default=5.0, ge=2, le=50)
    # An estimate not refreshed for this long counts half as many observations, so a
    # candidate that is never chosen regains uncertainty and is tried again.
    stale_half_life_s: float = Field(default=600.0, gt=0, le=10_000_000)


class Quality(Frozen):
    # Prior mean quality for a candidate nobody has scored yet.
    prior: float = Field(default=0.7, ge=0, le=1)
    # When no feedback arrives within feedback_window_s, use this proxy (or nothing).
    proxy: Literal["finish_reason", "none"] = "finish_reason"
    finish_reason_scores: Mapping[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_FINISH_REASON_SCORES))
    feedback_window_s: float = Field(default=300.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _scores_in_range(self) -> Quality:
        for reason, score in self.finish_reason_scores.items():
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"finish_reason_scores[{reason!r}] must be in [0, 1]")
        return self


class Restrict(Frozen):
    """Static candidate filter by model attributes (a policy may restrict further)."""

    egress: Literal["any", "internal"] = "any"
    regions: Items[str] = ()


class RouteObjective(Frozen):
    # The production baseline: served in shadow mode "decision", preferred when no
    # candidate meets the hard limits. Unset: the alias's first candidate.
    champion: Name | None = None
    # Non-empty: the learner chooses among champion + challengers only.
    challengers: Items[Name] = ()
    weights: Weights = Weights()
    limits: Limits = Limits()
    scale: Scale = Scale()
    sticky: Literal["none", "tenant", "user"] = "none"
    # Largest share of decisions that may differ from the current best estimate.
    exploration: float = Field(default=0.1, ge=0, le=1)
    shadow: Shadow = Shadow()
    breaker: Breaker = Breaker()
    learning: Learning = Learning()
    quality: Quality = Quality()
    restrict: Restrict = Restrict()
    # Savings baseline for this route; unset: the ledger's baseline.
    baseline: Name | None = None

    @model_validator(mode="after")
    def _roles(self) -> RouteObjective:
        if len(set(self.challengers)) != len(self.challengers):
            raise ValueError("challengers lists a model twice")
        if self.champion is not None and self.champion in self.challengers:
            raise ValueError(f"the champion {self.champion!r} is also a challenger")
        if self.shadow.challenger is not None and self.shadow.challenger == self.champion:
            raise ValueError("the shadow challenger is the champion")
        if self.shadow.challenger is not None and self.shadow.challenger in self.challengers:
            # A mirror challenger is measured on copies only and never serves a client.
            raise ValueError(f"the shadow challenger {self.shadow.challenger!r} is also a "
                             "challenger; it never serves, so name another model")
        if self.shadow.mode == "decision" and self.sticky != "none":
            # Decision shadow always serves the champion; stickiness would be ignored.
            raise ValueError("sticky has no effect with shadow mode decision")
        return self


class LedgerSettings(Frozen):
    enabled: Flag = True
    path: str = Field(default=".run/atp-ledger.sqlite3", min_length=1)
    # Model whose prices define "what it would have cost"; unset: no savings are claimed
    # (baseline cost = actual cost) unless a route sets objective.baseline.
    baseline: Name | None = None
    # Rows are aggregated in memory and written by a background thread this often; a
    # crash loses at most this much.
    flush_interval_s: float = Field(default=1.0, gt=0, le=300)

    @field_validator("path")
    @classmethod
    def _openable(cls, path: str) -> str:
        if "\x00" in path:  # no OS opens it: said here, not as a traceback at start
            raise ValueError("a path cannot hold a NUL character")
        return path


DEFAULT_OBJECTIVE = RouteObjective()


def route_candidates(route: Any) -> list[str]:
    """Every model any alias of `route` can resolve to, first-seen order."""
    seen: dict[str, None] = {}
    for names in route.aliases.values():
        seen.update(dict.fromkeys(names))
    return list(seen)


def baseline_for(route: Any, ledger: LedgerSettings | None,
                 operation: str = "chat") -> str | None:
    """The model savings are counted against: the route objective's, else the ledger's.
    The ledger's is a text model's: embeddings are not counted against it."""
    objective: RouteObjective | None = getattr(route, "objective", None)
    if objective is not None and objective.baseline is not None:
        return objective.baseline
    if ledger is None or operation == "embeddings":
        return None
    return ledger.baseline


def restricted_by(restrict: Restrict, model: Any) -> str | None:
    """Why `restrict` keeps `model` (a config.Model or a CandidateModel: `.egress`,
    `.region`) from a route, or None. The router and `check` both ask this."""
    if restrict.egress == "internal" and model.egress != "internal":
        return f"its egress is {model.egress}"
    if restrict.regions and model.region not in restrict.regions:
        return f"its region {model.region!r} is not one of restrict.regions"
    return None


def _default_champion_problems(path: str, champion: str, objective: RouteObjective,
                               mirror: str | None, out: set[str]) -> list[tuple[str, str]]:
    """An alias not listing objective.champion has its first candidate as champion:
    held to the rules a champion named is (a mirror challenger never serves, and the
    learner then leaves out every candidate but the challengers; one restrict excludes
    has decision mode fall back on every request)."""
    why = ("the mirror challenger, which never serves a client" if champion == mirror else
           "excluded by objective.restrict" if champion in out else None)
    if why is None:
        return []
    return [(path, f"its first candidate {champion!r} is its champion (objective.champion "
                   f"is not among its candidates), and is {why}: list another model "
                   "first, or name a champion it lists")]


def check_references(models: Iterable[str] | Mapping[str, Any], routes: Iterable[Any],
                     ledger: LedgerSettings | None = None) -> list[tuple[str, str]]:
    """Problems (path, reason) with names the objective and ledger blocks refer to.

    `routes` are config.Route-like objects: `.aliases` (alias → model names) and an
    optional `.objective`. Paths are in config's format (`routes[2].objective.champion`).
    `models` given as name → config.Model also checks what `objective.restrict` leaves.
    """
    known = set(models)
    placed = models if isinstance(models, Mapping) else {}
    problems: list[tuple[str, str]] = []
    for i, route in enumerate(routes):
        objective: RouteObjective | None = getattr(route, "objective", None)
        if objective is None:
            continue
        candidates = set(route_candidates(route))
        base = f"routes[{i}].objective"
        named = [("champion", objective.champion),
                 *((f"challengers[{j}]", name) for j, name in enumerate(objective.challengers)),
                 ("shadow.challenger", objective.shadow.challenger)]
        for field, name in named:
            if name is not None and name not in candidates:
                problems.append((f"{base}.{field}", f"{name!r} is not a candidate of this route"))
            elif name is not None and name in placed:
                why = restricted_by(objective.restrict, placed[name])
                if why is not None:
                    # A mirrored copy is the request itself, and a champion restrict
                    # excludes would leave decision mode falling back on every request.
                    problems.append((f"{base}.{field}", f"objective.restrict excludes "
                                     f"{name!r}: {why}"))
        if objective.baseline is not None and objective.baseline not in known:
            problems.append((f"{base}.baseline", f"unknown model {objective.baseline!r}"))
        mirror = objective.shadow.challenger if objective.shadow.mode == "mirror" else None
        out = {n for n in candidates & placed.keys()
               if restricted_by(objective.restrict, placed[n]) is not None}
        for alias, names in route.aliases.items():
            if mirror is not None and set(names) <= {mirror}:
                problems.append((f"routes[{i}].aliases.{alias}", (
                    f"only {mirror!r}, the mirror challenger, which never serves a "
                    "client: no request to this alias could be served")))
            elif set(names) <= out | {mirror}:
                problems.append((f"routes[{i}].aliases.{alias}", (
                    "objective.restrict excludes every model that could serve it: no "
                    "request to this alias could be served")))
            elif names and objective.champion not in names and (
                    objective.champion is None or objective.champion in candidates):
                problems += _default_champion_problems(
                    f"routes[{i}].aliases.{alias}", names[0], objective, mirror, out)
    if ledger is not None and ledger.baseline is not None and ledger.baseline not in known:
        problems.append(("ledger.baseline", f"unknown model {ledger.baseline!r}"))
    return problems
