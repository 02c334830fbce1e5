"""The learned router: per-(route, model) estimates and breakers, and the decisions.

State is keyed by names, not by config objects, so it survives config reloads: pass the
route's current objective to every `choose`. One Router per process; it is not
thread-safe (the asyncio event loop is its only caller).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence

from atp_extproc.routing.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from atp_extproc.routing.estimates import ArmEstimates
from atp_extproc.routing.sampling import DrawPool
from atp_extproc.routing.selection import (
    CandidateModel,
    Compiled,
    Post,
    RoutingDecision,
    score,
)
from atp_extproc.routing.settings import DEFAULT_OBJECTIVE, RouteObjective, restricted_by
from atp_extproc.routing.state import Arm, Prepared, RouteState
from atp_extproc.routing.sticky import StickyHasher, stable_unit

# The exploration share is an average over about the last 1/EXPLORE_ALPHA decisions.
EXPLORE_ALPHA = 0.01
# Sticky weights: each candidate's share of the learner's last ~200 picks (smoothed so
# that keys move only when the policy does, not with every exploration), recomputed every
# SHARE_BATCH decisions; a key's pick is cached until then.
SHARE_ALPHA = 0.005
SHARE_BATCH = 32
# Cached picks stay until some share has moved this much (keys then move a little late).
SHARE_EPSILON = 0.01
_STICKY_CACHE_KEYS = 4096
_PREPARED_PER_ROUTE = 32


class NoCandidateError(Exception):
    """Policy, restrict or the objective left no candidate at all."""

    def __init__(self, route: str, excluded: Sequence[tuple[str, str]]):
        self.route = route
        self.excluded = tuple(excluded)
        reasons = ", ".join(f"{m} ({r})" for m, r in excluded) or "no candidates given"
        super().__init__(f"route {route!r}: no model may serve this request: {reasons}")


def classify_status(status: int) -> bool | None:
    """Provider outcome of an HTTP status: True ok, False failure, None don't learn.

    5xx, 429 and 408 are the provider's failures (0 = no response: connect failure or
    reset), and so are 401, 402 and 403: the credential and the account the provider
    refuses are the gateway's, never the client's (ATP removes the client's key and
    account headers). A candidate answering them drew its share of traffic for good.
    Other 4xx are the client's and say nothing about the provider: a 404 too, which
    OpenAI answers for an item id the client kept past its life, though a retired
    model answers it as well.
    """
    if 200 <= status < 300:
        return True
    if status == 0 or status >= 500 or status in _PROVIDERS_4XX:
        return False
    return None


_PROVIDERS_4XX = frozenset({401, 402, 403, 408, 429})


class Router:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 seed: int | None = None) -> None:
        self._clock = clock
        self._draws = DrawPool(seed)
        self._sticky = StickyHasher()
        self._routes: dict[str, RouteState] = {}

    # -- decisions -----------------------------------------------------------------

    def choose(self, route_name: str, objective: RouteObjective | None,
               candidates: Sequence[CandidateModel], key_for_sticky: str | None = None,
               *, restrict: Collection[str] | None = None,
               request_id: str | None = None, mirror: bool = True) -> RoutingDecision:
        """Pick the model for one request among `candidates` (the alias's models; the
        first is the champion unless the objective names one).

        `restrict`: the models policy allows (None = all). `key_for_sticky`: tenant or
        user id when objective.sticky asks for it. `request_id` makes the mirror share a
        stable function of the request; `mirror` False: no copy of this one (nor a claim
        on a half-open challenger's probe for it). Pass the same `candidates` object for the same
        (config snapshot, route, alias): what depends only on it is prepared once.
        Raises NoCandidateError when policy/restrict/objective leave nothing.
        """
        t0 = time.perf_counter_ns()
        now = self._clock()
        rs, comp, prep = self._prepared(route_name, objective, candidates, now)
        champion = prep.champion
        decision_mode = comp.shadow_mode == "decision"
        mirror_arm = prep.mirror_arm
        if mirror_arm is not None and (
                not mirror or mirror_arm.breaker.poll(now) is OPEN
                or (restrict is not None and comp.mirror_to not in restrict)):
            mirror_arm = None
        probe_name: str | None = None

        # The common case, nothing to filter per request: no policy restrict and every
        # breaker closed. Then the prepared lists are the eligible set (read-only).
        fast = restrict is None
        if fast:
            for arm in prep.arms:
                if arm.breaker.state is not CLOSED:
                    fast = False
                    break
        names: list[str]
        elig: list[Arm]
        price_ok: list[bool]
        broken: list[Arm] = []
        broken_names: list[str] = []
        excluded: list[tuple[str, str]] = []
        if fast:
            names, elig, price_ok = prep.names, prep.arms, prep.price_ok
        else:
            names, elig, price_ok = [], [], []
            half_open: list[str] = []
            for name, arm, within_price, static in prep.entries:
                if static is not None:
                    continue                    # in prep.excluded
                if restrict is not None and name not in restrict:
                    excluded.append((name, "policy"))
                    continue
                breaker = arm.breaker
                if breaker.state is not CLOSED:
                    state = breaker.poll(now)
                    if state is OPEN:
                        excluded.append((name, "breaker_open"))
                        broken.append(arm)
                        broken_names.append(name)
                        continue
                    if state is HALF_OPEN:
                        if decision_mode and name != champion:
                            # Decision mode: while the champion serves, a challenger
                            # serves nothing, so a half-open one is still scored for
                            # proposals (it would never get a result to close on
                            # otherwise); it serves only by holding the probe slot
                            # (below, when the champion cannot serve).
                            half_open.append(name)
                        elif probe_name is None and breaker.try_probe(now):
                            probe_name = name
                        else:
                            excluded.append((name, "breaker_half_open"))
                            broken.append(arm)
                            broken_names.append(name)
                            continue
                names.append(name)
                elig.append(arm)
                price_ok.append(within_price)
            if half_open and champion not in names:
                # The pick serves: a half-open challenger may serve only as the probe.
                for name in half_open:
                    i = names.index(name)
                    if probe_name is None and elig[i].breaker.try_probe(now):
                        probe_name = name
                        continue
                    excluded.append((name, "breaker_half_open"))
                    broken.append(elig[i])
                    broken_names.append(name)
                    del names[i], elig[i], price_ok[i]
        posts: list[Post] = [arm.est.post for arm in elig]

        if not names:
            if not broken:
                raise NoCandidateError(route_name, [*prep.excluded, *excluded])
            # Every allowed candidate is out of rotation: try the one whose breaker
            # opened longest ago rather than refuse the request.
            k = min(range(len(broken)), key=lambda j: broken[j].breaker.open_until)
            served = broken_names[k]
            return self._decision(
                t0, route_name, served, served, (served,),
                prep.excluded + tuple(e for e in excluded if e[0] != served),
                0.0, False, False, False,
                "all_breakers_open", comp, None, None, ())

        # The set itself, not the list's id, keys the sticky cache: a per-request list is
        # freed after the call and a later one may reuse its address.
        candidate_set = prep.names_t if fast else tuple(names)
        n = len(names)
        normals, start = self._draws.normals(4 * n)
        sc = score(comp, names, posts, price_ok, now, normals, start)
        if sc.excluded:
            excluded.extend(sc.excluded)
        excluded_t = prep.excluded + tuple(excluded) if excluded else prep.excluded
        utility = sc.mean_utility
        feasible = sc.feasible

        fallback_reason = ""
        greedy = sc.greedy
        best = sc.best_mean
        if greedy < 0:
            fallback_reason = "no_feasible_candidate"
            best = max(utility)
            greedy = names.index(champion) if champion in names else utility.index(best)
        pick = greedy
        explored = False
        ts = sc.thompson
        # The share explored so far, not the raw average: starting at 0, that let a fresh
        # route (every ATP start) explore about 11 decisions in a row. A decision-only
        # shadow proposes its best estimate: a draw there serves nothing and learns
        # nothing, and was recorded as the proposal, unexplored (predicted savings 0).
        if (not decision_mode and ts >= 0 and ts != greedy and comp.explore_cap > 0
                and rs.explore_ew <= comp.explore_cap * rs.explore_norm):
            pick, explored = ts, True
        rs.explore_ew += EXPLORE_ALPHA * ((1.0 if explored else 0.0) - rs.explore_ew)
        rs.explore_norm += EXPLORE_ALPHA * (1.0 - rs.explore_norm)

        sticky = False
        if comp.sticky:
            elig[pick].picks += 1
            rs.since_shares += 1
            if rs.since_shares >= SHARE_BATCH:
                self._update_shares(rs)
            if key_for_sticky is not None:
                pick = self._sticky_pick(rs, key_for_sticky, candidate_set, elig, feasible,
                                         greedy, comp.explore_cap)
                sticky = True
                explored = pick != greedy

        proposed = served = pick
        probe = False
        predicted_savings = None
        if decision_mode:
            if champion in names:
                served = names.index(champion)
                explored = False
            else:
                fallback_reason = fallback_reason or "champion_unavailable"
            predicted_savings = posts[served][4] - posts[proposed][4]
        if probe_name is not None:
            served = names.index(probe_name)
            probe = True

        regret = best - utility[served]
        if regret < 0.0:
            regret = 0.0

        mirror_to = None
        if mirror_arm is not None and comp.mirror_to != names[served]:
            u = stable_unit(request_id) if request_id else self._draws.uniform()
            if u < comp.mirror_share and (mirror_arm.breaker.state is not HALF_OPEN
                                          or mirror_arm.breaker.try_probe(now)):
                mirror_to = comp.mirror_to

        if n > 1:
            rank = [u if f else u - 1e12 for u, f in zip(utility, feasible, strict=True)]
            rank[served] = -math.inf
            alternates = tuple(names[i] for i in sorted(range(n), key=rank.__getitem__,
                                                        reverse=True)[:n - 1])
        else:
            alternates = ()
        return self._decision(
            t0, route_name, names[served], names[proposed], candidate_set, excluded_t, regret,
            explored, sticky, probe, fallback_reason, comp, mirror_to, predicted_savings,
            alternates)

    @staticmethod
    def _update_shares(rs: RouteState) -> None:
        n = rs.since_shares
        keep = (1.0 - SHARE_ALPHA) ** n
        moved = False
        for arm in rs.arms.values():
            arm.share = keep * arm.share + (1.0 - keep) * arm.picks / n
            arm.picks = 0
            moved = moved or abs(arm.share - arm.epoch_share) > SHARE_EPSILON
        rs.since_shares = 0
        if moved:             # cached sticky picks are recomputed with the new shares
            rs.share_epoch += 1
            for arm in rs.arms.values():
                arm.epoch_share = arm.share

    def _sticky_pick(self, rs: RouteState, key: str, names: tuple[str, ...],
                     elig: list[Arm], feasible: list[bool], greedy: int, cap: float) -> int:
        cached = rs.sticky_picks.get(key)
        if cached is not None and cached[0] == rs.share_epoch and (
                cached[1] is names or cached[1] == names):
            i = names.index(cached[2])
            if feasible[i]:
                return i
        weights = [a.share if f else 0.0 for a, f in zip(elig, feasible, strict=True)]
        if not any(weights):
            return greedy  # none feasible: the fallback every other request gets
        # A key lands off the current best with probability at most the exploration
        # bound: shares start even (1/n) and learn slowly, which alone would spread the
        # first keys over every candidate.
        others = sum(weights) - weights[greedy]
        room = cap / (1.0 - cap) * weights[greedy] if cap < 1.0 else others
        if others > room and weights[greedy] > 0.0:
            scale = room / others
            weights = [w if j == greedy else w * scale for j, w in enumerate(weights)]
        i = self._sticky.pick(key, names, weights)
        if cached is None and len(rs.sticky_picks) >= _STICKY_CACHE_KEYS:
            rs.sticky_picks.pop(next(iter(rs.sticky_picks)))
        rs.sticky_picks[key] = (rs.share_epoch, names, names[i])
        return i

    def servable(self, route_name: str, objective: RouteObjective | None,
                 candidates: Sequence[CandidateModel]) -> tuple[str, ...]:
        """The candidates the objective lets serve (not restricted, mirror-only or outside
        its members), policies and breakers aside."""
        return self._prepared(route_name, objective, candidates, self._clock())[2].names_t

    def _prepared(self, route_name: str, objective: RouteObjective | None,
                  candidates: Sequence[CandidateModel], now: float
                  ) -> tuple[RouteState, Compiled, Prepared]:
        rs = self._routes.get(route_name)
        if rs is None:
            rs = self._routes[route_name] = RouteState()
        comp = rs.compile(objective if objective is not None else DEFAULT_OBJECTIVE)
        prep = rs.prepared.get(id(candidates))
        if prep is None:        # compile() drops every entry when the objective changes
            prep = self._prepare(rs, comp, candidates, now)
        return rs, comp, prep

    def _prepare(self, rs: RouteState, comp: Compiled, candidates: Sequence[CandidateModel],
                 now: float) -> Prepared:
        prep = Prepared(candidates)
        excluded: list[tuple[str, str]] = []
        # A route's champion may be missing from some of its aliases: each of those
        # has its own first candidate as champion, as with no champion named.
        if comp.champion is not None and any(c.name == comp.champion for c in candidates):
            prep.champion = comp.champion
        elif candidates:
            prep.champion = candidates[0].name
        members = comp.members
        if members is not None and prep.champion is not None:
            members = members | {prep.champion}
        for c in candidates:
            arm = rs.arms.get(c.name)
            if arm is None:
                arm = self._add_arm(rs, c, now, len(candidates))
            elif arm.est.price_in != c.price_in or arm.est.price_out != c.price_out:
                arm.est.reprice(c.price_in, c.price_out, rs.priors)
            static: str | None = None
            # Restrict first: a copy of the request is the request, to a mirror too.
            if restricted_by(comp.objective.restrict, c) is not None:
                static = "restrict"
            elif c.name == comp.mirror_to:
                static = "shadow_only"
                prep.mirror_arm = arm
            elif members is not None and c.name not in members:
                static = "not_in_objective"
            within_price = comp.price_ok(c)
            prep.entries.append((c.name, arm, within_price, static))
            if static is None:
                prep.names.append(c.name)
                prep.arms.append(arm)
                prep.price_ok.append(within_price)
            else:
                excluded.append((c.name, static))
        prep.excluded = tuple(excluded)
        prep.names_t = tuple(prep.names)
        if len(rs.prepared) >= _PREPARED_PER_ROUTE:
            rs.prepared.pop(next(iter(rs.prepared)))
        rs.prepared[id(candidates)] = prep
        return prep

    @staticmethod
    def _decision(t0: int, route: str, chosen: str, proposed: str,
                  candidate_set: tuple[str, ...], excluded: tuple[tuple[str, str], ...],
                  regret: float, explored: bool, sticky: bool, probe: bool,
                  fallback_reason: str, comp: Compiled, mirror_to: str | None,
                  predicted_savings: float | None,
                  alternates: tuple[str, ...]) -> RoutingDecision:
        return RoutingDecision(
            route, chosen, proposed, candidate_set, excluded,
            (time.perf_counter_ns() - t0) / 1000.0, regret, explored, sticky, probe,
            fallback_reason, comp.shadow_mode, mirror_to, predicted_savings, alternates)

    def _add_arm(self, rs: RouteState, c: CandidateModel, now: float, n: int) -> Arm:
        comp = rs.comp
        est = ArmEstimates(c.price_in, c.price_out, comp.memory, now, rs.priors)
        arm = rs.arms[c.name] = Arm(est, CircuitBreaker(comp.objective.breaker, self._clock),
                                    1.0 / max(n, 1))
        return arm

    # -- learning ------------------------------------------------------------------

    def observe(self, route_name: str, model_name: str, *, ok: bool,
                latency_ms: float | None, cost: float | None = None,
                quality: float | None = None, input_tokens: int | None = None,
                output_tokens: int | None = None, sent_ms_ago: float | None = None) -> None:
        """One served (or mirrored) attempt's outcome. `latency_ms`: time to first byte
        for streamed responses, total duration otherwise; `cost`: priced usage in USD
        (None when unknown); `quality` in [0, 1] if known now (else FeedbackBook);
        `sent_ms_ago`: when the request left, for its breaker."""
        now = self._clock()
        rs = self._routes.get(route_name)
        if rs is None:
            rs = self._routes[route_name] = RouteState()
        arm = rs.arms.get(model_name)
        if arm is None:
            # Seen before any decision (e.g. a shadow copy): prices arrive with `choose`.
            arm = self._add_arm(rs, CandidateModel(model_name, 0.0, 0.0), now, 1)
        if ok:
            rs.learn_route(latency_ms, input_tokens, output_tokens)
        arm.est.observe(ok, latency_ms, cost, now, rs.priors)
        arm.breaker.record(ok, now, None if sent_ms_ago is None else now - sent_ms_ago / 1000)
        if quality is not None:
            arm.est.observe_quality(quality, rs.priors)

    def observe_quality(self, route_name: str, model_name: str, score: float) -> None:
        """A quality score in [0, 1] that arrived after the response (feedback/proxy)."""
        rs = self._routes.get(route_name)
        arm = rs.arms.get(model_name) if rs is not None else None
        if arm is not None:
            arm.est.observe_quality(score, rs.priors)  # type: ignore[union-attr]

    # -- introspection -------------------------------------------------------------

    def breaker_state(self, route_name: str, model_name: str) -> str | None:
        rs = self._routes.get(route_name)
        arm = rs.arms.get(model_name) if rs is not None else None
        return arm.breaker.poll(self._clock()).value if arm is not None else None

    def snapshot(self) -> dict[str, dict[str, dict[str, object]]]:
        """route → model → estimates and breaker state (for a debug endpoint / metrics)."""
        now = self._clock()
        return {
            route: {name: {**arm.est.summary(), "breaker": arm.breaker.snapshot(now)}
                    for name, arm in rs.arms.items()}
            for route, rs in self._routes.items()
        }
