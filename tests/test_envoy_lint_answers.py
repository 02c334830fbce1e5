"""`check --envoy` warns where answers go astray: a route to a model whose processing mode
keeps its answers from ATP (no usage or cost, no placeholders restored, ATP's usage chunk
reaches clients), and an ext_proc filter whose own mode sends answers to ATP, which in
Envoy 1.40 leaves a request its HTTP/1 codec refuses without any answer. Each config is
envoy/front-proxy.yaml with one change, and Envoy 1.40 must accept it."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from atp_extproc.policy.cli import check
from atp_extproc.policy.envoy_lint import answer_problems, fail_open_problems
from atp_extproc.policy.settings import Problem
from tests.test_envoy_lint_bypasses import (
    EXT_PROC,
    FRONT,
    PER_ROUTE,
    R1,
    R2,
    ROOT,
    ext_proc,
    listener,
    route,
    validated,
    vhost,
)

UNSEEN = "ATP never sees this route's answers (response_header_mode: SKIP"


def host_mode(doc: dict[str, Any]) -> dict[str, Any]:
    """The processing mode the virtual host's ext_proc entry gives every route, apart
    from the shadow listener's (the same YAML alias)."""
    overrides = vhost(doc)["typed_per_filter_config"][EXT_PROC]["overrides"]
    overrides["processing_mode"] = copy.deepcopy(overrides["processing_mode"])
    return overrides["processing_mode"]


def lint(doc: dict[str, Any], tmp_path: Path,
         clusters: set[str] | None = None) -> tuple[list[Problem], list[str]]:
    """The answer warnings for `doc` and its text's lines."""
    path, text = validated(doc, tmp_path)
    return answer_problems(str(path), text, clusters), text.splitlines()


def found(problems: list[Problem], lines: list[str]) -> list[tuple[str, str]]:
    """Each warning's path and the key on its line (which says where it is)."""
    assert all(p.severity == "warning" for p in problems)
    return [(p.path, lines[p.line - 1].strip().split(":")[0].strip("'\"- "))
            for p in problems]


@pytest.mark.parametrize("name", ["front-proxy", "sidecar-uds", "egress-tls"])
def test_the_shipped_configs_have_no_answer_warning(name):
    path = ROOT / "envoy" / f"{name}.yaml"
    assert answer_problems(str(path), path.read_text()) == []


# ----------------------------------------------------------- answers ATP never sees

def test_without_the_host_override_the_filters_skip_hides_every_routes_answers(tmp_path):
    doc = copy.deepcopy(FRONT)
    del vhost(doc)["typed_per_filter_config"][EXT_PROC]
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, "processing_mode"), (R2, "processing_mode")]
    assert all(UNSEEN in p.reason and "filter's own processing_mode" in p.reason
               and "usage chunk" in p.reason for p in problems)
    # The requests still reach ATP: nothing fails open.
    text = "\n".join(lines)
    assert fail_open_problems("envoy.yaml", text, ["deny policies"]) == []


@pytest.mark.parametrize("value", ["SKIP", "skip", 2])
def test_a_host_override_that_skips_answers_hides_every_routes_answers(tmp_path, value):
    doc = copy.deepcopy(FRONT)
    host_mode(doc)["response_header_mode"] = value
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, EXT_PROC), (R2, EXT_PROC)]
    assert all(UNSEEN in p.reason and "override" in p.reason for p in problems)


def test_the_most_specific_override_decides(tmp_path):
    # Envoy takes the most specific processing_mode whole: the route's SEND wins over the
    # virtual host's SKIP, and a weighted cluster's SKIP over the route's SEND.
    doc = copy.deepcopy(FRONT)
    sending = copy.deepcopy(host_mode(doc))
    host_mode(doc)["response_header_mode"] = "SKIP"
    route(doc)["typed_per_filter_config"] = {
        EXT_PROC: {"@type": PER_ROUTE, "overrides": {"processing_mode": sending}}}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, EXT_PROC)]
    action = route(doc)["route"]
    del action["cluster_header"]
    action["weighted_clusters"] = {"clusters": [
        {"name": "demo_a", "weight": 50, "typed_per_filter_config": {EXT_PROC: {
            "@type": PER_ROUTE, "overrides": {"processing_mode": {
                **sending, "response_header_mode": "SKIP"}}}}},
        {"name": "demo_b", "weight": 50}]}
    problems, lines = lint(doc, tmp_path, {"demo_a", "demo_b"})
    assert found(problems, lines) == [(R1, EXT_PROC), (f"{R2} weighted cluster demo_a",
                                                       EXT_PROC)]
    # A cluster that is no model's may keep its answers from ATP.
    assert found(*lint(doc, tmp_path, {"demo_b"})) == [(R1, EXT_PROC)]


def test_a_route_that_skips_atp_altogether_is_said_once(tmp_path):
    # fail_open_problems refuses it ("disabled on this route"): no warning on top.
    doc = copy.deepcopy(FRONT)
    host_mode(doc)["response_header_mode"] = "SKIP"
    route(doc)["typed_per_filter_config"] = {EXT_PROC: {"@type": PER_ROUTE, "disabled": True}}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [(R1, EXT_PROC)]
    (refused,) = fail_open_problems("envoy.yaml", "\n".join(lines), ["deny policies"])
    assert refused.path == R2 and "disabled on this route" in refused.reason


# --------------------------------------------- a filter that sends answers by default

@pytest.mark.parametrize("value", ["SEND", None])
def test_a_filter_that_sends_answers_itself_is_warned_about(tmp_path, value):
    # The old front-proxy.yaml: SEND (or unset, the same) on the filter, no host override.
    doc = copy.deepcopy(FRONT)
    del vhost(doc)["typed_per_filter_config"][EXT_PROC]
    mode = ext_proc(doc)["typed_config"]["processing_mode"]
    if value is None:
        del mode["response_header_mode"]
    else:
        mode["response_header_mode"] = value
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("ext_proc", "processing_mode")]
    assert "closes the connection without an answer" in problems[0].reason
    assert "HTTP/1 codec" in problems[0].reason


def test_an_internal_listeners_filter_may_send_answers(tmp_path):
    # Only Envoy's own mirror reaches the shadow listener: no client, no codec error.
    doc = copy.deepcopy(FRONT)
    ext_proc(doc, "shadow")["typed_config"]["processing_mode"]["response_header_mode"] = "SEND"
    assert lint(doc, tmp_path)[0] == []
    del listener(doc, "shadow")["internal_listener"]
    listener(doc, "shadow")["address"] = {
        "socket_address": {"address": "127.0.0.1", "port_value": 10098}}
    problems, lines = lint(doc, tmp_path)
    assert found(problems, lines) == [("ext_proc", "processing_mode")]


# --------------------------------------------------------------------------- the CLI

def test_check_prints_the_warnings_and_passes(tmp_path):
    doc = copy.deepcopy(FRONT)
    host_mode(doc)["response_header_mode"] = "SKIP"
    path = tmp_path / "envoy.yaml"
    text = yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    out = io.StringIO()
    assert check([], [str(path)], out=out, redaction_enabled=True) == 0
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.strip() == f"{EXT_PROC}:")
    assert f"{path}:{line}: warning: {R1}: {UNSEEN}" in out.getvalue()
    assert out.getvalue().endswith("0 error(s), 2 warning(s)\n")


def test_a_mirroring_route_needs_an_envoy_config_that_mirrors(tmp_path):
    # atp.yaml mirrored to a challenger, the Envoy config (egress-tls.yaml) never copies:
    # records named mirror_to, no copy went, and the challenger never learned.
    from atp_extproc.policy.envoy_lint import mirror_problems

    egress = (ROOT / "envoy" / "egress-tls.yaml").read_text()
    (problem,) = mirror_problems("egress-tls.yaml", egress, ["chat-auto"])
    assert "chat-auto mirror to a challenger" in problem.reason
    assert problem.severity == "error"
    assert mirror_problems("front-proxy.yaml", (ROOT / "envoy" / "front-proxy.yaml")
                           .read_text(), ["chat-auto"]) == []
    # From check: atp.yaml's mirror route read, the problem named.
    doc = yaml.safe_load((ROOT / "examples" / "atp.yaml").read_text())
    routes = [r for r in doc["routes"] if r.get("objective")]
    routes[0]["objective"].update(challengers=[], shadow={
        "mode": "mirror", "challenger": "small", "share": 0.1})
    config = tmp_path / "atp.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = io.StringIO()
    check([str(config)], [str(ROOT / "envoy" / "egress-tls.yaml")], out=out)
    assert "mirror to a challenger" in out.getvalue()
