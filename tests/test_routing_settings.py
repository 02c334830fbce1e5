"""Objective and ledger config blocks: shapes, ranges and cross-references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from atp_extproc.routing.settings import (
    Breaker,
    LedgerSettings,
    Restrict,
    RouteObjective,
    Shadow,
    Weights,
    baseline_for,
    check_references,
    route_candidates,
)


def route(aliases, objective=None):
    return SimpleNamespace(aliases=aliases, objective=objective)


def test_defaults_are_the_documented_ones():
    o = RouteObjective()
    assert o.breaker.error_rate == 0.05
    assert o.breaker.min_requests == 20
    assert o.shadow.mode == "off"
    assert o.sticky == "none"
    assert 0 < o.exploration <= 0.2
    assert LedgerSettings().path == ".run/atp-ledger.sqlite3"


def test_unknown_keys_and_bad_ranges_are_refused():
    with pytest.raises(ValidationError):
        RouteObjective.model_validate({"weigths": {}})
    with pytest.raises(ValidationError):
        RouteObjective.model_validate({"limits": {"max_error_rate": 1.5}})
    with pytest.raises(ValidationError):
        RouteObjective.model_validate({"sticky": "session"})
    with pytest.raises(ValidationError):
        Weights(cost=0, latency=0, quality=0, error=0)
    with pytest.raises(ValidationError):
        Breaker(open_s=60, max_open_s=30)


def test_objective_is_frozen():
    o = RouteObjective()
    with pytest.raises(ValidationError):
        o.exploration = 0.5  # type: ignore[misc]


def test_shadow_modes_are_consistent():
    Shadow(mode="mirror", challenger="b", share=0.1)
    Shadow(mode="decision")
    with pytest.raises(ValidationError, match="challenger"):
        Shadow(mode="mirror", share=0.1)
    with pytest.raises(ValidationError, match="share"):
        Shadow(mode="mirror", challenger="b")
    with pytest.raises(ValidationError, match="only apply to mode mirror"):
        Shadow(mode="decision", challenger="b")


def test_roles_cannot_overlap():
    with pytest.raises(ValidationError, match="also a challenger"):
        RouteObjective(champion="a", challengers=("a", "b"))
    with pytest.raises(ValidationError, match="twice"):
        RouteObjective(challengers=("b", "b"))
    with pytest.raises(ValidationError, match="is the champion"):
        RouteObjective(champion="a", shadow=Shadow(mode="mirror", challenger="a", share=0.1))
    # The mirror challenger never serves: as a serving challenger it would never serve.
    with pytest.raises(ValidationError, match="also a challenger"):
        RouteObjective(champion="a", challengers=("b",),
                       shadow=Shadow(mode="mirror", challenger="b", share=0.1))


def test_an_alias_of_only_the_mirror_challenger_is_refused():
    objective = RouteObjective(champion="large",
                               shadow=Shadow(mode="mirror", challenger="small", share=1.0))
    routes = [route({"auto": ("large",), "cheap": ("small",)}, objective)]
    (problem,) = check_references({"small", "large"}, routes)
    assert problem[0] == "routes[0].aliases.cheap" and "never serves" in problem[1]
    routes = [route({"auto": ("large", "small")}, objective)]
    assert check_references({"small", "large"}, routes) == []


def test_check_references_names_path_and_reason():
    objective = RouteObjective(
        champion="ghost", challengers=("small", "nope"),
        shadow=Shadow(mode="mirror", challenger="large", share=0.2), baseline="missing")
    routes = [route({"x": ("small",)}),
              route({"chat": ("small",), "fast": ("small", "medium")}, objective)]
    problems = check_references({"small", "medium", "large"}, routes,
                                LedgerSettings(baseline="gone"))
    assert ("routes[1].objective.champion",
            "'ghost' is not a candidate of this route") in problems
    assert ("routes[1].objective.challengers[1]",
            "'nope' is not a candidate of this route") in problems
    assert ("routes[1].objective.shadow.challenger",
            "'large' is not a candidate of this route") in problems
    assert ("routes[1].objective.baseline", "unknown model 'missing'") in problems
    assert ("ledger.baseline", "unknown model 'gone'") in problems
    assert len(problems) == 5


@pytest.mark.parametrize(("champion", "aliases"), [
    ("large", {"auto": ("large", "small", "tiny"), "mini": ("tiny", "small")}),
    (None, {"auto": ("tiny", "large", "small")})])
def test_a_default_champion_is_held_to_a_champions_rules(champion, aliases):
    # An alias not listing the champion has its first candidate as champion: here the
    # mirror challenger, so every request to it was refused no_eligible_model (or the
    # others never served), though check said OK.
    objective = RouteObjective(champion=champion, challengers=("small",),
                               shadow=Shadow(mode="mirror", challenger="tiny", share=0.5))
    problems = check_references({"small", "large", "tiny"}, [route(aliases, objective)])
    ((path, reason),) = problems
    assert path == f"routes[0].aliases.{'mini' if champion else 'auto'}"
    assert "'tiny' is its champion" in reason and "the mirror challenger" in reason


def test_a_default_champion_restrict_excludes_is_refused():
    models = {"large": SimpleNamespace(egress="external", region="us"),
              "small": SimpleNamespace(egress="internal", region="eu")}
    objective = RouteObjective(restrict=Restrict(egress="internal"),
                               shadow=Shadow(mode="decision"))
    ((path, reason),) = check_references(models, [route({"a": ("large", "small")},
                                                          objective)])
    assert path == "routes[0].aliases.a" and "excluded by objective.restrict" in reason


def test_check_references_accepts_a_valid_document():
    objective = RouteObjective(champion="medium", challengers=("small",), baseline="large")
    routes = [route({"chat": ("medium", "small")}, objective)]
    assert check_references({"small", "medium", "large"}, routes,
                            LedgerSettings(baseline="large")) == []


def test_candidates_and_baseline_resolution():
    r = route({"a": ("m1", "m2"), "b": ("m2", "m3")}, RouteObjective(baseline="m9"))
    assert route_candidates(r) == ["m1", "m2", "m3"]
    assert baseline_for(r, LedgerSettings(baseline="m1")) == "m9"
    assert baseline_for(route({"a": ("m1",)}), LedgerSettings(baseline="m1")) == "m1"
    assert baseline_for(route({"a": ("m1",)}), None) is None
    # A chat model's prices say nothing about what an embedding would have cost.
    assert baseline_for(route({"a": ("m1",)}), LedgerSettings(baseline="m1"),
                        "embeddings") is None
    assert baseline_for(r, LedgerSettings(baseline="m1"), "embeddings") == "m9"


def test_what_objective_restrict_excludes_is_named():
    """A mirror restrict excludes would still get copies of the requests; a champion it
    excludes leaves decision mode falling back every time; an alias it empties serves
    nobody."""
    from types import SimpleNamespace

    models = {"small": SimpleNamespace(egress="internal", region="eu"),
              "large": SimpleNamespace(egress="external", region="us")}
    internal = Restrict(egress="internal")
    objective = RouteObjective(champion="small", restrict=internal,
                               shadow=Shadow(mode="mirror", challenger="large", share=0.5))
    (problem,) = check_references(models, [route({"auto": ("small", "large")}, objective)])
    assert problem[0] == "routes[0].objective.shadow.challenger"
    assert "restrict excludes 'large'" in problem[1] and "egress is external" in problem[1]

    objective = RouteObjective(champion="large", restrict=Restrict(regions=("eu",)))
    problems = check_references(models, [route({"auto": ("small", "large"),
                                                "big": ("large",)}, objective)])
    assert [p for p, _ in problems] == ["routes[0].objective.champion",
                                       "routes[0].aliases.big"]
    assert "region 'us'" in problems[0][1] and "no request" in problems[1][1]
    assert check_references(models, [route({"auto": ("small",)}, RouteObjective(
        restrict=internal))]) == []
