"""`check --envoy` refuses Envoy configs that let requests past ATP unchecked in ways the
filter's plain `failure_mode_allow: true` does not show: observability mode, bools and
enums in their other proto-JSON forms, per-route configs under the filter's name (and
only there) at every level down to weighted clusters, and upgrade filter chains. Each
config is envoy/front-proxy.yaml with one change, and Envoy 1.40 must accept it."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from atp_extproc.llm_api import OPERATIONS
from atp_extproc.policy.cli import check
from atp_extproc.policy.envoy_lint import PER_ROUTE_TYPE, fail_open_problems
from atp_extproc.policy.settings import Problem
from atp_extproc.stack import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
FRONT = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
EXT_PROC = "envoy.filters.http.ext_proc"
PER_ROUTE = f"type.googleapis.com/{PER_ROUTE_TYPE}"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
# The front listener's two routes to a model (the third answers directly).
R1 = "virtual host models route #1 (prefix=/ with headers x-atp-cluster, x-atp-shadow-cluster)"
R2 = "virtual host models route #2 (prefix=/ with headers x-atp-cluster)"


def front() -> dict[str, Any]:
    return copy.deepcopy(FRONT)


def listener(doc: dict[str, Any], name: str = "front") -> dict[str, Any]:
    (found,) = [item for item in doc["static_resources"]["listeners"] if item["name"] == name]
    return found


def manager(doc: dict[str, Any], name: str = "front") -> dict[str, Any]:
    return listener(doc, name)["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc(doc: dict[str, Any], name: str = "front") -> dict[str, Any]:
    (found,) = [f for f in manager(doc, name)["http_filters"] if f["name"] == EXT_PROC]
    return found


def vhost(doc: dict[str, Any]) -> dict[str, Any]:
    return manager(doc)["route_config"]["virtual_hosts"][0]


def without_host_entry(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` without the virtual host's ext_proc entry (the answers' modes), which would
    turn a filter disabled by default back on."""
    del vhost(doc)["typed_per_filter_config"][EXT_PROC]
    return doc


def route(doc: dict[str, Any], index: int = 1) -> dict[str, Any]:
    return vhost(doc)["routes"][index]


def per_route(**fields: Any) -> dict[str, Any]:
    return {"@type": PER_ROUTE, **fields}


def validated(doc: dict[str, Any], tmp_path: Path) -> tuple[Path, str]:
    """`doc` written to a file, and its text; Envoy must accept it as it is."""
    path = tmp_path / "envoy.yaml"
    text = yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--log-level", "error"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path, text


def lint(doc: dict[str, Any], tmp_path: Path,
         clusters: set[str] | None = None) -> tuple[list[Problem], list[str]]:
    """The problems for `doc` and its text's lines."""
    path, text = validated(doc, tmp_path)
    return fail_open_problems(str(path), text, ["deny policies"], clusters), \
        text.splitlines()


def found(problems: list[Problem], lines: list[str]) -> list[tuple[str, str]]:
    """Each problem's path and the key on its line (which says where it is)."""
    assert all(p.severity == "error" and p.reason.endswith(" while deny policies")
               for p in problems)
    return [(p.path, lines[p.line - 1].strip().split(":")[0].strip("'\"- "))
            for p in problems]


# ---------------------------------------------------------------- observability mode

@pytest.mark.parametrize("value", [True, "true"])
def test_an_ext_proc_filter_in_observability_mode_checks_nothing(tmp_path, value):
    doc = front()
    ext_proc(doc)["typed_config"]["observability_mode"] = value
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("ext_proc", "observability_mode")]
    assert "does not wait for ATP's answer" in problems[0].reason


def test_an_observer_beside_the_checking_filter_is_no_bypass(tmp_path):
    # README: ATP supports a second filter in observability mode; it never blocks, so its
    # own fail-open does not matter while the checking filter holds.
    doc = front()
    observer = copy.deepcopy(ext_proc(doc))
    observer["name"] = "atp.observer"
    observer["typed_config"].update(observability_mode=True, failure_mode_allow=True)
    observer["typed_config"]["processing_mode"] = {
        "request_header_mode": "SKIP", "response_header_mode": "SEND"}
    filters = manager(doc)["http_filters"]
    filters.insert(filters.index(ext_proc(doc)) + 1, observer)
    assert lint(doc, tmp_path)[0] == []


def test_disable_immediate_response_lets_denied_requests_through(tmp_path):
    doc = front()
    ext_proc(doc)["typed_config"]["disable_immediate_response"] = "True"
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("ext_proc", "disable_immediate_response")]


# ------------------------------------------------------------ proto-JSON bools, enums

@pytest.mark.parametrize("value", ["true", "True", "yes", "y", "1"])
def test_a_quoted_true_failure_mode_allow_fails_open(tmp_path, value):
    doc = front()
    ext_proc(doc)["typed_config"]["failure_mode_allow"] = value
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, "failure_mode_allow"), (R2, "failure_mode_allow")]
    assert all("fails open" in p.reason for p in problems)


@pytest.mark.parametrize("word", ["on", "yes", "Y"])
def test_an_unquoted_yaml_1_1_true_fails_open(tmp_path, word):
    # Envoy's YAML reads these as true; atp.yaml's loader (YAML 1.2 booleans) does not,
    # and must not lend the Envoy lint its reading.
    doc = front()
    ext_proc(doc)["typed_config"]["failure_mode_allow"] = True
    text = yaml.safe_dump(doc, sort_keys=False).replace(
        "failure_mode_allow: true", f"failure_mode_allow: {word}")
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--log-level", "error"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    problems = fail_open_problems(str(path), text, ["deny policies"], None)
    assert problems and all("fails open" in p.reason for p in problems)


@pytest.mark.parametrize("value", ["false", "False", "no", "0"])
def test_a_quoted_false_is_fail_closed(tmp_path, value):
    doc = front()
    ext_proc(doc)["typed_config"]["failure_mode_allow"] = value
    assert lint(doc, tmp_path)[0] == []


def test_a_quoted_failure_mode_allow_override_on_a_route_fails_open(tmp_path):
    doc = front()
    route(doc)["typed_per_filter_config"] = {
        EXT_PROC: per_route(overrides={"failure_mode_allow": "true"})}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R2, EXT_PROC)]


@pytest.mark.parametrize("where", ["filter", "per_route", "filter_config"])
def test_a_quoted_disabled_turns_ext_proc_off(tmp_path, where):
    doc = front()
    if where == "filter":
        without_host_entry(doc)
        ext_proc(doc)["disabled"] = "true"
        expected = [(R1, "disabled"), (R2, "disabled")]
    else:
        entry = per_route(disabled="yes") if where == "per_route" else \
            {"@type": FILTER_CONFIG, "disabled": "True"}
        route(doc)["typed_per_filter_config"] = {EXT_PROC: entry}
        expected = [(R2, EXT_PROC)]
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == expected
    assert all("disabled on this route" in p.reason for p in problems)


@pytest.mark.parametrize(("key", "value", "withheld"), [
    ("request_body_mode", 0, "request_body_mode: NONE"),
    ("request_body_mode", "none", "request_body_mode: NONE"),
    ("request_body_mode", "0", "request_body_mode: NONE"),
    ("request_header_mode", 2, "request_header_mode: SKIP"),
    ("request_header_mode", "skip", "request_header_mode: SKIP"),
    ("request_body_mode", "buffered", None),
    ("request_body_mode", 2, None),
    # Not bypassed but broken: a body in pieces is ATP's 500 (atp_partial_body).
    ("request_body_mode", "STREAMED", "request_body_mode: STREAMED"),
    ("request_body_mode", 3, "request_body_mode: BUFFERED_PARTIAL"),
])
def test_processing_modes_by_number_or_in_lower_case(tmp_path, key, value, withheld):
    doc = front()
    ext_proc(doc)["typed_config"]["processing_mode"][key] = value
    problems, lines = lint(doc, tmp_path)
    if withheld is None:
        assert problems == []
    else:
        assert found(problems, lines) == [("ext_proc", "processing_mode")]
        assert withheld in problems[0].reason


# --------------------------------------------------- per-route config: name and level

def test_a_fail_closed_override_under_another_name_does_not_apply(tmp_path):
    # Envoy looks a filter's per-route config up by the filter's name: this override,
    # under the default name of a filter called otherwise, never applies.
    doc = front()
    ext_proc(doc)["typed_config"]["failure_mode_allow"] = True
    ext_proc(doc)["name"] = "atp.ext_proc"
    route(doc)["typed_per_filter_config"] = {
        EXT_PROC: per_route(overrides={"failure_mode_allow": False})}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, "failure_mode_allow"), (R2, "failure_mode_allow")]
    # Under the filter's own name it does.
    route(doc)["typed_per_filter_config"] = {
        "atp.ext_proc": per_route(overrides={"failure_mode_allow": False})}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, "failure_mode_allow")]


def test_an_entry_under_another_name_does_not_turn_a_disabled_filter_on(tmp_path):
    doc = without_host_entry(front())
    ext_proc(doc)["disabled"] = True
    route(doc)["typed_per_filter_config"] = {
        "some.other.filter": per_route(overrides={"failure_mode_allow": False})}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, "disabled"), (R2, "disabled")]


def test_disabled_under_another_name_is_ignored_by_envoy(tmp_path):
    doc = front()
    route(doc)["typed_per_filter_config"] = {"some.other.filter": per_route(disabled=True)}
    assert lint(doc, tmp_path)[0] == []


@pytest.mark.parametrize("level", ["virtual_host", "route_config"])
def test_disabled_at_a_wider_level_holds_unless_a_route_turns_it_on(tmp_path, level):
    doc = without_host_entry(front())
    holder = vhost(doc) if level == "virtual_host" else manager(doc)["route_config"]
    holder["typed_per_filter_config"] = {EXT_PROC: per_route(disabled=True)}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, EXT_PROC), (R2, EXT_PROC)]
    # The most specific entry decides: this route turns ext_proc back on.
    route(doc)["typed_per_filter_config"] = {
        EXT_PROC: per_route(overrides={"failure_mode_allow": False})}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, EXT_PROC)]


# --------------------------------------------------------------- weighted clusters

def weighted(doc: dict[str, Any], demo_a: dict[str, Any] | None) -> None:
    """Route #2 splits between demo_a (with `demo_a` as its per-filter config) and demo_b."""
    action = route(doc)["route"]
    del action["cluster_header"]
    action["weighted_clusters"] = {"clusters": [
        {"name": "demo_a", "weight": 50,
         **({"typed_per_filter_config": {EXT_PROC: demo_a}} if demo_a else {})},
        {"name": "demo_b", "weight": 50}]}


@pytest.mark.parametrize(("entry", "reason"), [
    (per_route(disabled=True), "disabled on this route"),
    ({"@type": FILTER_CONFIG, "disabled": True}, "disabled on this route"),
    (per_route(overrides={"failure_mode_allow": True}), "fails open"),
])
def test_a_weighted_cluster_that_skips_atp_is_refused(tmp_path, entry, reason):
    doc = front()
    weighted(doc, entry)
    problems, lines = lint(doc, tmp_path, {"demo_a", "demo_b"})
    assert found(problems, lines) == [(f"{R2} weighted cluster demo_a", EXT_PROC)]
    assert reason in problems[0].reason
    # A cluster that is no model's may skip ATP.
    assert lint(doc, tmp_path, {"demo_b"})[0] == []


def test_a_weighted_cluster_entry_turns_ext_proc_on_for_that_cluster_only(tmp_path):
    doc = front()
    weighted(doc, per_route(overrides={"failure_mode_allow": False}))
    route(doc)["typed_per_filter_config"] = {EXT_PROC: per_route(disabled=True)}
    problems, lines = lint(doc, tmp_path, {"demo_a", "demo_b"})
    assert found(problems, lines) == [(R2, EXT_PROC)]  # demo_b, by the route's entry


# ------------------------------------------------------------------ upgrade filters

def upgrade(doc: dict[str, Any], with_ext_proc: bool, **fields: Any) -> None:
    filters = [copy.deepcopy(f) for f in manager(doc)["http_filters"]
               if with_ext_proc or f["name"] != EXT_PROC]
    manager(doc)["upgrade_configs"] = [{"upgrade_type": "websocket", "filters": filters,
                                        **fields}]


def test_upgrade_filters_without_ext_proc_are_refused(tmp_path):
    doc = front()
    upgrade(doc, with_ext_proc=False)
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("upgrade_configs[0]", "filters")]
    assert "websocket upgrade" in problems[0].reason
    assert "no ext_proc filter" in problems[0].reason


@pytest.mark.parametrize("fields", [{"filters": []}, {}])
def test_an_upgrade_without_filters_of_its_own_runs_http_filters(tmp_path, fields):
    doc = front()
    manager(doc)["upgrade_configs"] = [{"upgrade_type": "websocket", **fields}]
    assert lint(doc, tmp_path)[0] == []


def test_a_disabled_upgrade_counts_only_on_routes_that_turn_it_on(tmp_path):
    doc = front()
    upgrade(doc, with_ext_proc=False, enabled=False)
    assert lint(doc, tmp_path)[0] == []
    route(doc)["route"]["upgrade_configs"] = [{"upgrade_type": "WebSocket"}]
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("upgrade_configs[0]", "filters")]


def test_ext_proc_in_upgrade_filters_is_checked_like_http_filters(tmp_path):
    doc = front()
    upgrade(doc, with_ext_proc=True)
    (chain,) = manager(doc)["upgrade_configs"]
    chain["filters"][1]["typed_config"]["failure_mode_allow"] = "true"
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(f"{R1} (websocket upgrade)", "failure_mode_allow"),
                                      (f"{R2} (websocket upgrade)", "failure_mode_allow")]


# --------------------------------------------------------------------------- the CLI

def test_check_reports_file_line_path_and_reason(tmp_path):
    doc = front()
    weighted(doc, per_route(disabled=True))
    path = tmp_path / "envoy.yaml"
    text = yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    lines = text.splitlines()
    cluster = next(i for i, s in enumerate(lines) if s.strip() == "- name: demo_a")
    line = next(i for i, s in enumerate(lines[cluster:], cluster + 1)
                if s.strip() == f"{EXT_PROC}:")
    out = io.StringIO()
    assert check([], [str(path)], out=out, redaction_enabled=True) == 1
    assert (f"{path}:{line}: {R2} weighted cluster demo_a: ext_proc is disabled on this "
            "route: requests skip ATP while redaction is enabled") in out.getvalue()


# ---------------------------------------------------------------- model clusters

def test_a_model_cluster_envoy_does_not_have_is_an_error(tmp_path):
    """Requests ATP routes there would get Envoy's 503 cluster_not_found."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    text = (ROOT / "envoy" / "front-proxy.yaml").read_text()
    assert missing_cluster_problems("e.yaml", text, {"demo_a", "demo_b"}) == []
    (problem,) = missing_cluster_problems("e.yaml", text, {"demo_a", "nosuch"})
    assert problem.severity == "error" and "'nosuch'" in problem.reason
    assert text.splitlines()[problem.line - 1].strip() == "clusters:"
    # Clusters a control plane sends (CDS) cannot be checked here.
    dynamic = yaml.safe_load(text)
    dynamic["dynamic_resources"] = {"cds_config": {"ads": {}}}
    assert missing_cluster_problems("e.yaml", yaml.safe_dump(dynamic), {"nosuch"}) == []


def test_a_model_cluster_no_route_sends_requests_to_is_an_error():
    """egress-tls routes by exact x-atp-cluster values: a provider's route deleted (its
    cluster kept) had check say OK, and Envoy answer every request its fallback 503."""
    from atp_extproc.policy.envoy_lint import _walk, missing_cluster_problems

    doc = yaml.safe_load((ROOT / "envoy" / "egress-tls.yaml").read_text())
    assert missing_cluster_problems("e.yaml", yaml.safe_dump(doc), {"openai", "gemini"}) == []
    for node in _walk(doc):
        routes = node.get("routes")
        if isinstance(routes, list):
            routes[:] = [r for r in routes if r.get("route", {}).get("cluster") != "gemini"]
    (problem,) = missing_cluster_problems("e.yaml", yaml.safe_dump(doc), {"openai", "gemini"})
    assert "no route" in problem.reason and "'gemini'" in problem.reason


def test_routes_that_never_read_atps_cluster_header_are_an_error():
    """Routes by Host alone, as a mesh generates them, reach every model cluster, yet
    send each request where its Host says, whatever model ATP chose: check said OK."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    doc = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    listener = next(v for v in doc["static_resources"]["listeners"] if v["name"] == "front")
    doc["static_resources"]["listeners"] = [listener]  # (the shadow one reads the header)
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"]["virtual_hosts"] = [
        {"name": name, "domains": [name.replace("_", "-")],
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]}
        for name in ("demo_a", "demo_b")]
    (problem,) = missing_cluster_problems("e.yaml", yaml.safe_dump(doc),
                                          {"demo_a", "demo_b"})
    assert problem.severity == "error" and "reads x-atp-cluster" in problem.reason
    # One model cluster: there is no choice for a route to ignore.
    assert missing_cluster_problems("e.yaml", yaml.safe_dump(doc), {"demo_a"}) == []
    # A hash policy names the header without routing by it.
    for host in manager["route_config"]["virtual_hosts"]:
        host["routes"][0]["route"]["hash_policy"] = [{"header": {
            "header_name": "x-atp-cluster"}}]
    assert [p for p in missing_cluster_problems("e.yaml", yaml.safe_dump(doc),
                                                {"demo_a", "demo_b"})
            if "reads x-atp-cluster" in p.reason]
    # Envoy's matcher tree reading the header routes by it too.
    for host in manager["route_config"]["virtual_hosts"]:
        host["matcher"] = {"matcher_tree": {"input": {"name": "h", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": "x-atp-cluster"}}, "exact_match_map": {"map": {}}}}
    assert [p for p in missing_cluster_problems("e.yaml", yaml.safe_dump(doc),
                                                {"demo_a", "demo_b"})
            if "reads x-atp-cluster" in p.reason] == []


def test_a_route_that_sends_atps_choice_elsewhere_is_an_error():
    """Two exact x-atp-cluster matches swapped, or a static route ahead of the header
    routes: check said OK, and ATP's record named a model another cluster served."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    doc = yaml.safe_load((ROOT / "envoy" / "egress-tls.yaml").read_text())
    listener = next(v for v in doc["static_resources"]["listeners"] if v["name"] == "egress")
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"]
    openai = next(r for r in routes if r.get("route", {}).get("cluster") == "openai")
    openai["route"]["cluster"] = "gemini"
    reasons = [p.reason for p in missing_cluster_problems("e.yaml", yaml.safe_dump(doc),
                                                          {"openai", "gemini"})]
    assert any("x-atp-cluster: openai sends to cluster 'gemini'" in r for r in reasons)
    front = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    vhost(front)["routes"].insert(0, {"match": {"prefix": "/v1/"},
                                      "route": {"cluster": "demo_b"}})
    (problem,) = missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                          {"demo_a", "demo_b"})
    assert "comes before the routes reading x-atp-cluster" in problem.reason
    # Named by its own line and place, not the clusters' line.
    assert problem.path.endswith("route #0") and problem.line > 1


@pytest.mark.parametrize(("match", "found"), [
    # Ahead of the header routes, by a regex or whatever a path's case: check said OK.
    ({"safe_regex": {"regex": "/v1/.*"}}, "takes /v1/chat/completions"),
    ({"prefix": "/V1/", "case_sensitive": False}, "takes /v1/chat/completions"),
    ({"path_separated_prefix": "/v1/embeddings"}, "takes /v1/embeddings"),
    ({"safe_regex": {"regex": "/v2/.*"}}, None),
    ({"prefix": "/V1/"}, None),
    ({"path_separated_prefix": "/v1/embed"}, None),
    # A condition on the header's value other than exact: check said OK.
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "prefix": "demo_"}}]}, "x-atp-cluster (prefix 'demo_') sends to cluster 'demo_b': "
                               "a model ATP routes to 'demo_a' would be served by 'demo_b'"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "exact": "DEMO_A", "ignore_case": True}}]}, "routes to 'demo_a' would be served"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "safe_regex_match": {
        "regex": "demo_[ab]"}}]}, "x-atp-cluster (regex 'demo_[ab]')"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "present_match": True}]},
     "x-atp-cluster (present) sends"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "exact": "demo_b"}, "invert_match": True}]}, "x-atp-cluster (not: demo_b) sends"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "suffix": "_b"}}]}, None),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "exact": "DEMO_A"}}]}, None),
    # A number range never matches a name; RE2's POSIX class is no nested set; a query
    # takes only some requests.
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "range_match": {
        "start": 0, "end": 9}}]}, None),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "range_match": {
        "start": 0, "end": 9}, "invert_match": True}]}, "(not a number range) sends"),
    # A path ATP cannot read is taken to take the API's: a catch-all it is.
    ({"path_match_policy": {"name": "envoy.path.match.uri_template", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3"
                 ".UriTemplateMatchConfig", "path_template": "/v1/**"}},
      "headers": [{"name": "x-atp-cluster", "present_match": True}]}, "(present) sends"),
    ({"prefix": "/", "headers": [{"name": "x-atp-cluster", "string_match": {
        "safe_regex": {"regex": "demo_[[:alpha:]]"}}}]}, None),
    ({"prefix": "/v1/", "query_parameters": [{"name": "debug"}]}, None),
    # An empty list asks nothing of the query: the route was skipped as one that did.
    ({"prefix": "/v1/", "query_parameters": []}, "takes /v1/chat/completions"),
    ({"prefix": "/", "query_parameters": [], "headers": [{"name": "x-atp-cluster",
                                                          "present_match": True}]},
     "(present) sends"),
    # Every API request is a POST, and so meets this; none meets GET. An empty list
    # asks nothing. (Any header condition was taken to leave every request to the next.)
    ({"prefix": "/v1/", "headers": [{"name": ":method", "string_match": {
        "exact": "POST"}}]}, "takes /v1/chat/completions"),
    ({"prefix": "/", "headers": []}, "takes /v1/chat/completions"),
    ({"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
     None),
    ({"prefix": "/v2/", "headers": [{"name": "x-atp-cluster", "present_match": True}]},
     None),
])
def test_a_route_of_any_match_that_sends_atps_choice_elsewhere_is_an_error(match, found):
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    front = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    vhost(front)["routes"].insert(0, {"match": match, "route": {"cluster": "demo_b"}})
    problems = missing_cluster_problems("f.yaml", yaml.safe_dump(front), {"demo_a", "demo_b"})
    assert [(p.severity, found in p.reason) for p in problems] == \
        ([] if found is None else [("error", True)])


URI_TEMPLATE = {"name": "envoy.path.match.uri_template", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3"
             ".UriTemplateMatchConfig", "path_template": "/v1/**"}}


@pytest.mark.parametrize(("match", "found"), [
    # A client that sends the header reaches the route's cluster, not ATP's choice (nor
    # the model its policies allowed): check said OK.
    ({"prefix": "/", "headers": [{"name": "x-team", "string_match": {"exact": "a"}}]},
     "takes /v1/chat/completions with header x-team: a whatever ATP chose"),
    ({"prefix": "/v1/embeddings", "headers": [
        {"name": ":method", "string_match": {"exact": "POST"}},
        {"name": "X-Debug", "present_match": True}]},
     "takes /v1/embeddings with header X-Debug (present) whatever ATP chose"),
    # A path ATP cannot read may be the API's.
    ({"path_match_policy": URI_TEMPLATE}, "may take the API's paths (a path ATP cannot "
                                          "read) whatever ATP chose"),
    ({"safe_regex": {"regex": "/v1/[[:alpha:]]+"}}, "may take the API's paths"),
])
def test_a_route_ahead_that_may_take_api_requests_is_a_warning(tmp_path, match, found):
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    doc = front()
    vhost(doc)["routes"].insert(0, {"match": match, "route": {"cluster": "demo_b"}})
    _, text = validated(doc, tmp_path)
    (problem,) = missing_cluster_problems("f.yaml", text, {"demo_a", "demo_b"})
    assert problem.severity == "warning" and problem.path.endswith("route #0")
    assert f"a route to cluster 'demo_b' comes before the routes reading x-atp-cluster " \
           f"and {found}" in problem.reason, problem.reason
    assert text.splitlines()[problem.line - 1].lstrip(" -").startswith("match:")


def test_a_path_atp_cannot_read_routes_no_api_path_right():
    """A route with a path ATP cannot read counted as taking a model's requests on every
    API path to the right cluster, so a route after it that sent them elsewhere passed."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    doc = front()
    vhost(doc)["routes"][:0] = [
        {"match": {"path_match_policy": URI_TEMPLATE, "headers": [
            {"name": "x-atp-cluster", "string_match": {"exact": "demo_a"}}]},
         "route": {"cluster": "demo_a"}},
        {"match": {"prefix": "/", "headers": [{"name": "x-atp-cluster",
                                               "present_match": True}]},
         "route": {"cluster": "demo_b"}}]
    (problem,) = missing_cluster_problems("f.yaml", yaml.safe_dump(doc), {"demo_a", "demo_b"})
    assert problem.severity == "error" and problem.path.endswith("route #1")
    assert "a model ATP routes to 'demo_a' would be served by 'demo_b'" in problem.reason


def test_a_value_a_route_ahead_takes_is_not_said_of_a_route_after():
    """Only the first route whose condition a request meets takes it."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    front = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    routes = vhost(front)["routes"]
    routes[:0] = [{"match": {"prefix": "/", "headers": [{"name": "x-atp-cluster",
                                                         "string_match": {"exact": name}}]},
                   "route": {"cluster": name}} for name in ("demo_a", "demo_b")]
    routes.insert(2, {"match": {"prefix": "/", "headers": [{"name": "x-atp-cluster",
                                                            "present_match": True}]},
                      "route": {"cluster": "demo_b"}})
    assert missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                    {"demo_a", "demo_b"}) == []
    # Routes ahead that take a value path by path, or on one method, take it too.
    exact_a = routes.pop(0)
    routes[:0] = [{**exact_a, "match": {**exact_a["match"], "prefix": api}}
                  for api in OPERATIONS]
    assert missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                    {"demo_a", "demo_b"}) == []
    del routes[:len(OPERATIONS)]
    routes.insert(0, exact_a)
    exact_a["match"]["headers"].append({"name": ":method", "string_match": {
        "exact": "POST"}})
    assert missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                    {"demo_a", "demo_b"}) == []
    # On GET only, or a share of requests, it leaves the API's POSTs to the next.
    for extra in ({"headers": [*exact_a["match"]["headers"][:1], {
            "name": ":method", "string_match": {"exact": "GET"}}]},
                  {"runtime_fraction": {"default_value": {"numerator": 10}}}):
        routes[0] = {**exact_a, "match": {**exact_a["match"], **extra}}
        (problem,) = missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                              {"demo_a", "demo_b"})
        assert problem.path.endswith("route #2") and "routes to 'demo_a'" in problem.reason
    # A route asking for a query takes no request ATP routed: it sends the path alone.
    routes[0] = {**exact_a, "match": {**exact_a["match"], "query_parameters": [
        {"name": "api-version", "present_match": True}]}}
    routes.insert(0, {"match": {"prefix": "/", "query_parameters": [{"name": "x"}]},
                      "route": {"cluster": "demo_b"}})
    assert len(missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                        {"demo_a", "demo_b"})) == 1
    del routes[:2]
    routes.insert(0, exact_a)
    # A route ahead that takes a value on one path only leaves the others to the next.
    routes[0]["match"]["prefix"] = "/v1/embeddings"
    (problem,) = missing_cluster_problems("f.yaml", yaml.safe_dump(front),
                                          {"demo_a", "demo_b"})
    assert problem.path.endswith("route #2") and "routes to 'demo_a'" in problem.reason


@pytest.mark.parametrize("variant", ["default_filter_chain", "scoped_routes",
                                     "weighted_cluster_header", "aggregate"])
def test_routes_the_lint_cannot_follow_or_that_reach_a_cluster_pass(variant):
    """Valid configs Envoy accepts, which the route check first refused."""
    from atp_extproc.policy.envoy_lint import missing_cluster_problems

    doc = yaml.safe_load((ROOT / "envoy" / "egress-tls.yaml").read_text())
    listener = next(v for v in doc["static_resources"]["listeners"] if v["name"] == "egress")
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"]
    openai = next(r for r in routes if r.get("route", {}).get("cluster") == "openai")
    if variant == "default_filter_chain":
        listener["default_filter_chain"] = listener.pop("filter_chains")[0]
    elif variant == "scoped_routes":
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        del manager["route_config"]
        manager["scoped_routes"] = {"name": "s", "scope_key_builder": {"fragments": []},
                                    "rds_config_source": {"ads": {}}, "scoped_rds": {
                                        "scoped_rds_config_source": {"ads": {}}}}
    elif variant == "weighted_cluster_header":
        openai["route"] = {"weighted_clusters": {"clusters": [
            {"cluster_header": "x-atp-cluster", "weight": 100}]}}
    else:
        doc["static_resources"]["clusters"].append({
            "name": "failover", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3."
                         "ClusterConfig", "clusters": ["openai", "gemini"]}}})
        openai["route"]["cluster"] = "failover"
    assert missing_cluster_problems("e.yaml", yaml.safe_dump(doc), {"openai", "gemini"}) == []


@pytest.mark.parametrize(("rules", "said"), [
    ({"disallow_all": True}, "disallow_all: true"),
    ({"disallow_system": "true"}, "disallow_system: true"),
    ({"disallow_expression": {"regex": "^authorization$"}}, "with disallow_expression"),
])
def test_mutation_rules_that_drop_atps_header_changes(tmp_path, rules, said):
    doc = front()
    ext_proc(doc)["typed_config"]["mutation_rules"] = rules
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("ext_proc", "mutation_rules")]
    assert said in problems[0].reason and "API key" in problems[0].reason
    # Refused as an error instead (the request fails, nothing leaks): fine.
    ext_proc(doc)["typed_config"]["mutation_rules"] = {**rules, "disallow_is_error": True}
    assert lint(doc, tmp_path)[0] == []


@pytest.mark.parametrize(("path", "says"), [
    ("deploy/k8s/configmap.yaml", "a Kubernetes ConfigMap, no Envoy config: check the one "
                                  "in its data"),
    ("deploy/istio/envoyfilter-atp.yaml", "a Kubernetes EnvoyFilter, no Envoy config: "
                                          "--envoy takes an Envoy bootstrap"),
])
def test_a_kubernetes_object_is_named_as_such(path: str, says: str) -> None:
    # Read as a bootstrap, both said "no ext_proc filter" of files that hold one.
    result = subprocess.run(
        [sys.executable, "-m", "atp_extproc", "check", str(ROOT / "examples" / "atp.yaml"),
         "--envoy", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert says in result.stdout and "no ext_proc filter" not in result.stdout, result.stdout


@pytest.mark.parametrize("text", ["", "# rendered later\n", "null\n", "---\n...\n"])
def test_an_envoy_config_that_is_empty_is_refused(tmp_path, text):
    # A render or envsubst that failed left an empty file, which Envoy refuses: check
    # said OK.
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    out = io.StringIO()
    assert check([], [str(path)], out=out) == 1
    assert f"{path}:1: no Envoy config: the file is empty" in out.getvalue()
