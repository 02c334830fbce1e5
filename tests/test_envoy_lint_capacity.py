"""`check --envoy` warns of circuit breakers LLM traffic outgrows at Envoy's defaults:
ATP's ext_proc cluster, where each exchange holds one stream for its whole answer
(1,024 at once, then Envoy fails requests with a 500 while ATP idles), and a cluster a
model route retries onto (3 retries in flight, then the rest get the primary's error,
not the fallback's answer). Each config is a shipped one with one change, which Envoy
1.40 must accept."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from atp_extproc.policy.cli import check
from atp_extproc.policy.envoy_lint import capacity_problems
from atp_extproc.policy.settings import Problem
from tests.test_deployment import envoy_validate
from tests.test_envoy_lint_bypasses import FRONT, ROOT, route, validated, vhost

MODELS = {"demo_a", "demo_b", "demo_pool"}
EGRESS = yaml.safe_load((ROOT / "envoy" / "egress-tls.yaml").read_text())
PROVIDERS = {"openai", "anthropic", "gemini"}


def cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    return found


def capacity(doc: dict[str, Any], tmp_path: Path,
             models: set[str] | None = MODELS) -> tuple[list[Problem], list[str]]:
    """The capacity problems of `doc` (which Envoy must accept) and its text's lines."""
    _, text = validated(doc, tmp_path)
    return capacity_problems("e.yaml", text, models), text.splitlines()


def with_breakers(name: str, breakers: dict | None) -> dict:
    """The front proxy with cluster `name`'s circuit breakers replaced (None: Envoy's)."""
    doc = copy.deepcopy(FRONT)
    cluster(doc, name).pop("circuit_breakers")
    if breakers is not None:
        cluster(doc, name)["circuit_breakers"] = breakers
    return doc


@pytest.mark.parametrize(("name", "models"), [("front-proxy", MODELS),
                                              ("sidecar-uds", MODELS),
                                              ("egress-tls", PROVIDERS),
                                              ("front-proxy", None)])
def test_the_shipped_configs_have_no_capacity_warning(name, models):
    path = ROOT / "envoy" / f"{name}.yaml"
    assert capacity_problems(str(path), path.read_text(), models) == []


@pytest.mark.parametrize(("breakers", "said"), [
    (None, "has max_requests 1024 (Envoy's default) and max_pending_requests 1024 "
           "(Envoy's default)"),
    ({"thresholds": [{"max_requests": 1000, "max_pending_requests": 65536}]},
     "has max_requests 1000:"),
    ({"thresholds": [{"max_requests": "65536"}]},
     "has max_pending_requests 1024 (Envoy's default):"),
    # A threshold for HIGH priority leaves the DEFAULT one, which ext_proc's streams take.
    ({"thresholds": [{"priority": "HIGH", "max_requests": 65536,
                      "max_pending_requests": 65536}]}, "has max_requests 1024"),
    # Envoy reads a wrapper's value, a quoted or an exponent number as its number.
    ({"thresholds": [{"max_requests": {"value": 65536}, "max_pending_requests": "1e5"}]},
     None),
    ({"thresholds": [{"priority": "HIGH", "max_requests": 1},
                     {"max_requests": 65536, "max_pending_requests": 65536}]}, None),
])
def test_atps_cluster_at_envoys_default_is_warned_of(tmp_path, breakers, said):
    """Each exchange holds one ext_proc stream for its whole answer: past 1,024 at once
    Envoy failed requests with a 500 while ATP idled, and check said nothing."""
    problems, lines = capacity(with_breakers("atp", breakers), tmp_path)
    if said is None:
        assert problems == []
        return
    (problem,) = problems
    assert problem.severity == "warning" and problem.path.startswith("static_resources.clusters[")
    assert problem.reason.startswith(f"ATP's ext_proc cluster 'atp' {said}"), problem.reason
    assert "circuit_breakers.thresholds[].max_requests and max_pending_requests" \
        in problem.reason
    assert lines[problem.line - 1].strip().startswith(
        "circuit_breakers:" if breakers else "- name: atp")


@pytest.mark.parametrize(("breakers", "said"), [
    (None, "has max_retries 3 (Envoy's default)"),
    ({"thresholds": [{"max_requests": 4096, "max_retries": 3}]}, "has max_retries 3"),
    ({"thresholds": [{"max_requests": 4096, "max_retries": 4}]}, None),
    # A retry budget replaces max_retries.
    ({"thresholds": [{"max_requests": 4096, "retry_budget": {}}]}, None),
])
def test_a_model_route_retrying_onto_envoys_default_is_warned_of(tmp_path, breakers, said):
    """Model routes retry 5xx, 429 and resets onto the fallback: with Envoy's 3 retries
    in flight, every request past the third failing over at once got the primary's
    error, and check said nothing."""
    doc = with_breakers("demo_a", breakers)
    problems, lines = capacity(doc, tmp_path)
    if said is None:
        assert problems == []
        return
    (problem,) = problems
    assert problem.severity == "warning"
    assert problem.reason.startswith(
        f"cluster 'demo_a' {said}, yet virtual host models route #1 (prefix=/ with headers "
        "x-atp-cluster, x-atp-shadow-cluster) retries onto it"), problem.reason
    assert "circuit_breakers.thresholds[].max_retries" in problem.reason
    assert lines[problem.line - 1].strip().startswith(
        "circuit_breakers:" if breakers else "- name: demo_a")
    # Unknown model clusters: a route by x-atp-cluster may retry onto any, or none.
    assert capacity(doc, tmp_path, None)[0] == []


def test_what_decides_whether_a_route_retries(tmp_path):
    doc = copy.deepcopy(FRONT)
    cluster(doc, "demo_b").pop("circuit_breakers")
    policy = route(doc, 0)["route"]["retry_policy"]
    assert len(capacity(doc, tmp_path)[0]) == 1
    # No retry at all: num_retries 0, or nothing to retry on, in either route.
    for holder in (route(doc, 0), route(doc, 1)):
        holder["route"]["retry_policy"] = {**policy, "num_retries": 0}
    assert capacity(doc, tmp_path)[0] == []
    # num_retries is 1 where unset; a virtual host's policy holds for a route without one.
    del route(doc, 0)["route"]["retry_policy"]
    vhost(doc)["retry_policy"] = {"retry_on": "5xx"}
    (problem,) = capacity(doc, tmp_path)[0]
    assert "route #1 (prefix=/ with headers x-atp-cluster, x-atp-shadow-cluster)" \
        in problem.reason
    # A route of HIGH priority takes the HIGH threshold, Envoy's default where unset.
    doc = copy.deepcopy(FRONT)
    route(doc, 1)["route"]["priority"] = "HIGH"
    (problem,) = capacity(doc, tmp_path, {"demo_a"})[0]
    assert problem.reason.startswith("cluster 'demo_a' has max_retries 3 (Envoy's "
                                     "default) for HIGH priority, yet virtual host models "
                                     "route #2"), problem.reason


def test_a_fixed_cluster_route_retrying_onto_envoys_default_is_warned_of(tmp_path):
    doc = copy.deepcopy(EGRESS)
    cluster(doc, "openai")["circuit_breakers"] = {"thresholds": [{"max_retries": 2}]}
    envoy_validate(doc, tmp_path, "egress.yaml")
    (problem,) = capacity_problems("e.yaml", yaml.safe_dump(doc), PROVIDERS)
    assert problem.reason.startswith("cluster 'openai' has max_retries 2,")
    assert "(prefix=/ with headers x-atp-cluster) retries onto it" in problem.reason


def test_check_prints_the_capacity_warnings_and_passes(tmp_path):
    doc = copy.deepcopy(FRONT)
    cluster(doc, "atp").pop("circuit_breakers")
    path, _ = validated(doc, tmp_path)
    out = io.StringIO()
    assert check([str(ROOT / "examples" / "atp.yaml")], [str(path)], out=out) == 0
    assert "warning: static_resources.clusters[1].circuit_breakers: ATP's ext_proc " \
           "cluster 'atp'" in out.getvalue()
    assert out.getvalue().endswith("0 error(s), 1 warning(s)\n")
