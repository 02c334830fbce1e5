"""`atp-extproc check` for policies: every problem with file, line and reason; Envoy fail-open."""

from __future__ import annotations

import io
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from atp_extproc.policy import PolicyError, PolicySet, load_text
from atp_extproc.policy.cli import check
from atp_extproc.policy.envoy_lint import EXT_PROC_TYPE, TCP_PROXY_TYPE, fail_open_problems

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "policy_cases"
BAD = CASES / "bad_policies.yaml"
EXAMPLES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))


def run_check(paths, envoy=(), **kwargs) -> tuple[int, str]:
    out = io.StringIO()
    code = check([str(p) for p in paths], [str(e) for e in envoy], out=out, **kwargs)
    return code, out.getvalue()


def lines_for(output: str, file: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    pattern = re.compile(rf"^{re.escape(str(file))}:(\d+): (.*)$")
    for line in output.splitlines():
        m = pattern.match(line)
        if m:
            found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


@pytest.fixture(scope="module")
def bad_report() -> tuple[int, dict[int, list[str]]]:
    code, output = run_check([BAD.relative_to(ROOT)])
    return code, lines_for(output, BAD.relative_to(ROOT))


@pytest.mark.parametrize(("line", "parts"), [
    (5, ["team.typo", "unknown attribute subject.tennant", "did you mean subject.tenant"]),
    (8, ["team.unknown_root", "unknown attribute", "subjet.tenant", "did you mean subject"]),
    (11, ["team.type_error", "no matching overload", "(int, string)"]),
    (12, ["team.typo", "duplicate policy id", "bad_policies.yaml:3"]),
    (15, ["nonamespace", "must be namespaced"]),
    (20, ["team.always", "constant: always true"]),
    (23, ["team.never", "constant: always false"]),
    (28, ["team.nested", "costly shape", "nested"]),
    (33, ["team.multiline", "unknown attribute request.nope", "expression line 2"]),
    (36, ["team.not_bool", "must be a bool"]),
    (39, ["team.resource_in_deny", "cannot read resource"]),
    (42, ["team.bad_regex", "invalid regex"]),
    (45, ["team.pure_constant", "constant: always true"]),
    (46, ["atp.mine", "namespace is ATP's own"]),
    (49, ["effect", "Field required"]),
    (51, ["a redact policy must list data_classes"]),
])
def test_each_problem_has_file_line_and_reason(bad_report, line, parts):
    code, by_line = bad_report
    assert code == 1
    assert line in by_line, f"nothing reported at line {line}: {by_line}"
    joined = " | ".join(by_line[line])
    for part in parts:
        assert part in joined, f"{part!r} not in {joined!r}"


def test_examples_check_clean():
    code, output = run_check([p.relative_to(ROOT) for p in EXAMPLES])
    assert code == 0, output
    assert "0 error(s), 0 warning(s)" in output


def test_atp_yaml_with_include_checks_literals_against_the_config(tmp_path):
    atp = (ROOT / "examples" / "atp.yaml").read_text()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(textwrap.dedent("""\
        policies:
          - id: team.alias_typo
            effect: deny
            expression: request.alias == 'gpt-4-o'
          - id: team.model_typo
            effect: restrict
            expression: resource.model in ['large', 'lage']
          - id: team.scalar_has
            effect: deny
            expression: has(request.max_tokens)
        """))
    path = tmp_path / "atp.yaml"
    path.write_text(re.sub(r"include: \[policies/\*\.yaml\]", "include: [policies/a.yaml]",
                           atp))
    code, output = run_check([path])
    assert code == 0, output  # warnings only
    assert "request.alias is never 'gpt-4-o'" in output
    assert "resource.model is never 'lage'" in output
    assert "has(…max_tokens) on a scalar" in output
    assert "3 warning(s)" in output
    assert re.search(r"policies/a\.yaml:4: warning: team\.alias_typo", output), output


def test_include_that_matches_nothing_and_bad_yaml(tmp_path):
    path = tmp_path / "atp.yaml"
    path.write_text("policy:\n  include: [nothing/*.yaml]\npolicies:\n  - id: [unclosed\n")
    code, output = run_check([path])
    assert code == 1
    assert "invalid YAML" in output


@pytest.mark.parametrize(("text", "reason"), [
    ("policies: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("when: !!timestamp 2026-13-01\npolicies: []\n", "month must be in 1..12"),
    ("? [a, b]\n: 1\npolicies: []\n", "invalid YAML"),
])
def test_yaml_the_parser_chokes_on_is_a_reported_error(tmp_path, text, reason):
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    code, output = run_check([path])
    assert code == 1
    assert f"{path}" in output and reason in output


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies:\n  - id: team.a\n    effect: deny\n    expression: request.stream\n"
                    "    expression: request.alias == 'x'\n")
    code, output = run_check([path])
    assert code == 1
    assert f"{path}:5: expression: the key appears twice" in output


def test_unknown_data_class_when_known_classes_given(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies:\n  - id: team.r\n    effect: redact\n    data_classes: [emial]\n"
                    "    expression: \"'emial' in request.data_classes\"\n")
    code, output = run_check([path], known_data_classes=["email", "phone"])
    assert code == 1
    assert "unknown data class 'emial'" in output
    assert "request.data_classes{} is never 'emial'" in output


def test_compile_raises_policy_error_with_problems():
    loaded = load_text(BAD.read_text(), str(BAD))
    with pytest.raises(PolicyError) as info:
        PolicySet.compile(loaded.policies, loaded.settings, str(BAD))
    problems = info.value.problems
    assert all(len(p) == 4 for p in problems)
    assert (str(BAD), 5) in {(f, line) for f, line, _, _ in problems}
    # ConfigError-shaped too, for config.parse.
    assert any("bad_policies.yaml:5" in path for path, _ in info.value.config_problems())


def test_tool_attribute_only_in_tools_policies():
    with pytest.raises(PolicyError, match="only set while a tools policy runs"):
        PolicySet.compile([{"id": "t.x", "effect": "deny", "expression": "tool.name == 'x'"}])


def test_warnings_for_restrict_without_resource_and_tools_without_tool():
    ps = PolicySet.compile([
        {"id": "t.r", "effect": "restrict", "expression": "request.stream"},
        {"id": "t.t", "effect": "tools", "expression": "subject.tenant == 'bob'"}])
    reasons = [w.reason for w in ps.warnings]
    assert any("removes every candidate" in r for r in reasons)
    assert any("every tool of the request" in r for r in reasons)


def test_trailing_comment_in_expression_does_not_break_the_batch():
    ps = PolicySet.compile([
        {"id": "t.c", "effect": "deny", "expression": "request.stream // streaming is off"},
        {"id": "t.d", "effect": "deny", "expression": "request.max_tokens > 5"}])
    from atp_extproc.policy import build_attributes
    out = ps.evaluate(build_attributes(request={"stream": True}))
    assert out.denied is not None and out.denied.policy_id == "t.c"


# -- Envoy fail-open ------------------------------------------------------------------


def test_fail_open_envoy_is_refused_when_policies_deny():
    envoy = CASES / "fail_open_envoy.yaml"
    code, output = run_check([EXAMPLES[0]], [envoy])
    assert code == 1
    # The route that falls back on the filter-level fail-open is named, at the line of
    # failure_mode_allow; the route overridden to fail-closed and the direct response
    # are not.
    assert f"{envoy}:35: virtual host models route open: ext_proc fails open" in output
    assert "route closed" not in output
    assert "/health" not in output


def test_route_overrides_and_disabled_ext_proc():
    envoy = CASES / "route_override_envoy.yaml"
    problems = fail_open_problems(str(envoy), envoy.read_text(), ["deny policies"])
    found = {(p.line, p.path, p.severity) for p in problems}
    assert (21, "virtual host models route chat", "error") in found
    assert (29, "virtual host models route bypass", "error") in found
    assert not any("route rest" in p.path for p in problems)


def test_fail_open_is_only_a_warning_without_enforcing_policies(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies:\n  - id: team.a\n    effect: allow\n"
                    "    expression: subject.tenant == 'alice'\n")
    code, output = run_check([path], [CASES / "fail_open_envoy.yaml"])
    assert code == 0
    assert "warning:" in output


def test_fail_open_refused_when_redaction_enabled_without_policies():
    code, output = run_check([], [CASES / "fail_open_envoy.yaml"], redaction_enabled=True)
    assert code == 1
    assert "redaction is enabled" in output


def test_redaction_section_in_atp_yaml_counts_as_enabled(tmp_path):
    path = tmp_path / "atp.yaml"
    path.write_text("redaction:\n  detectors: [email]\n")
    code, output = run_check([path], [CASES / "fail_open_envoy.yaml"])
    assert code == 1 and "redaction is enabled" in output
    path.write_text("redaction:\n  enabled: false\n")
    code, output = run_check([path], [CASES / "fail_open_envoy.yaml"])
    assert code == 0


def test_atp_yaml_without_redaction_section_has_redaction_on(tmp_path):
    # RedactionSettings.enabled defaults to true: config.load builds a Redactor.
    path = tmp_path / "atp.yaml"
    path.write_text("models:\n  - {name: small, cluster: demo_a, upstream_model: m}\n")
    code, output = run_check([path], [CASES / "fail_open_envoy.yaml"])
    assert code == 1 and "redaction is enabled" in output
    path.write_text(path.read_text() + "redaction: {actions: {email: mask}}\n")
    code, output = run_check([path], [CASES / "fail_open_envoy.yaml"])
    assert code == 1 and "redaction is enabled" in output


ENVOY = """\
static_resources:
  listeners:
  - filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          route_config:
            virtual_hosts:
            - name: vh
              routes:
              - match: {{prefix: /}}
                route: {{cluster: up}}
{route}
          http_filters:
          - name: envoy.filters.http.ext_proc
{filter}
            typed_config:
              "@type": type.googleapis.com/{EXT_PROC_TYPE}
              failure_mode_allow: false
              processing_mode: {{request_body_mode: BUFFERED, request_trailer_mode: SEND}}
"""
WRAPPED = """\
                typed_per_filter_config:
                  envoy.filters.http.ext_proc:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
{}"""
PER_ROUTE = ('                      "@type": type.googleapis.com/'
             'envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute\n')


@pytest.mark.parametrize(("route", "filter_", "expected"), [
    # The filter is off by default and no route turns it on.
    ("", "            disabled: true", (16, "disabled")),
    # A FilterConfig that turns it off, or wraps an ExtProcPerRoute that does.
    (WRAPPED.format("                    disabled: true"), "", (14, "disabled")),
    (WRAPPED.format("                    config:\n" + PER_ROUTE
                    + "                      disabled: true"), "", (14, "disabled")),
    # A FilterConfig wrapping a fail-open override.
    (WRAPPED.format("                    config:\n" + PER_ROUTE
                    + "                      overrides: {failure_mode_allow: true}"), "",
     (14, "fails open")),
    # Off by default, turned on by the route, fail-closed: nothing to report.
    (WRAPPED.format("                    config:\n" + PER_ROUTE
                    + "                      overrides: {failure_mode_allow: false}"),
     "            disabled: true", None),
])
def test_disabled_filter_and_filter_config_wrapped_overrides(route, filter_, expected):
    text = ENVOY.format(route=route, filter=filter_, EXT_PROC_TYPE=EXT_PROC_TYPE)
    problems = fail_open_problems("envoy.yaml", text, ["deny policies"])
    found = [(p.line, "disabled" if "disabled" in p.reason else "fails open")
             for p in problems]
    assert found == ([expected] if expected else [])
    assert all(p.severity == "error" and p.path == "virtual host vh route #1 (prefix=/)"
               for p in problems)


@pytest.mark.parametrize("style, head, tail", [
    ("folded", "expression: >\n      ", ""), ("literal", "expression: |\n      ", ""),
    ("plain", "expression:\n      ", ""), ("single", "expression:\n      '", "'"),
    ("double", 'expression:\n      "', '"')])
def test_an_error_inside_a_multi_line_expression_names_its_own_line(tmp_path, style, head,
                                                                     tail):
    # A folded (`>`) block is one CEL line: its errors named the block's first line.
    path = tmp_path / "p.yaml"
    alias = '\\"x\\"' if style == "double" else '"x"'  # an escape in a quoted scalar
    path.write_text("policies:\n  - id: f.x\n    effect: deny\n    " + head +
                    "subject.tenant.size() > 1 &&\n"
                    f"      request.alias == {alias} &&\n"
                    "      request.nope == 1" + tail + "\n")
    code, output = run_check([path])
    assert code == 1
    assert f"{path}:7: f.x: unknown attribute request.nope" in output


@pytest.mark.parametrize("expression, reason", [
    ("context.time.getHours('Europe/Berln') == 3", "Invalid timezone"),
    ("context.time > timestamp('2026-13-01T00:00:00Z')", "Timestamp conversion failed"),
    ("request.max_tokens / 0 > 1", "division by zero"),
    ("request.max_tokens % 0 == 1", "division by zero"),
    ("request.alias == ['a', 'b'][2]", "index"),
    ("request.max_tokens > int('ten')", "cannot convert"),
    ("request.stream && duration('1x') > duration('0s')", "Duration conversion failed"),
    ("request.stream && 'a'.matches('(')", "invalid regex"),  # named once, as a regex
])
def test_a_part_that_fails_for_every_request_is_a_check_error(expression, reason):
    # Under on_error deny (the default) such a policy denies every request.
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert [p.severity for p in problems] == ["error"]
    assert reason.lower() in problems[0].reason.lower()


@pytest.mark.parametrize("expression", [
    "context.time.getHours('Europe/Berlin') == 3",
    "context.time > timestamp('2026-01-01T00:00:00Z')",
    "request.max_tokens / 2 > 1",
    "request.alias == 'a' + 'b'",
    "request.alias in ['a', 'b'] && size('abc') < request.max_tokens",
])
def test_parts_that_evaluate_are_no_problem(expression):
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert problems == []


@pytest.mark.parametrize("expression, value", [
    ("subject.tenant == 'a' && subject.tenant == 'b'", "false"),
    ("'a' == subject.tenant && subject.tenant == 'b'", "false"),
    ("request.stream || !request.stream", "true"),
    ("!request.stream && request.stream", "false"),
    ("size(request.tools) > -1", "true"),
    ("0 <= size(request.tools)", "true"),
    ("0 > size(request.tools)", "false"),
    ("subject.tenant in [subject.tenant, 'x']", "true"),
])
def test_constant_shapes_are_found(expression, value):
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert [p.reason.split(" (")[0] for p in problems] == [
        f"expression is constant: always {value}"]


@pytest.mark.parametrize("expression", [
    "subject.tenant == 'a' || subject.tenant == 'b'",
    "subject.tenant == 'a' && subject.user == 'b'",
    "subject.tenant == 'a' && subject.tenant == 'a' && request.stream",
    "size(request.tools) > 0",
    "1 <= size(request.tools)",
    "subject.tenant in [subject.user]",
    "request.stream || !request.tools.exists(t, t == 'x')",
])
def test_shapes_that_depend_on_the_request_are_not_constant(expression):
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert problems == []


@pytest.mark.parametrize("override, withheld", [
    ("{request_header_mode: SKIP}", "request_header_mode: SKIP"),
    ("{request_body_mode: NONE}", "request_body_mode: NONE"),
    # Envoy takes the override whole: unset, the body mode is NONE, not the filter's.
    ("{response_header_mode: SKIP}", "request_body_mode: NONE"),
])
def test_a_route_whose_processing_mode_keeps_the_request_from_atp_is_refused(
        override, withheld):
    # ATP never saw the request: no key check, no redaction, the credential passed on.
    text = ENVOY.format(route=WRAPPED.format(
        "                    config:\n" + PER_ROUTE
        + f"                      overrides: {{processing_mode: {override}}}"),
        filter="", EXT_PROC_TYPE=EXT_PROC_TYPE)
    problems = fail_open_problems("envoy.yaml", text, ["deny policies"])
    assert [(p.path, p.severity) for p in problems] == [
        ("virtual host vh route #1 (prefix=/)", "error")]
    assert withheld in problems[0].reason


@pytest.mark.parametrize("override", [
    "disabled: true", "overrides: {processing_mode: {request_body_mode: NONE}}"])
def test_a_route_to_no_models_cluster_may_skip_atp(override):
    # A status or health route to a backend of its own: nothing of a model's to guard.
    text = ENVOY.format(route=WRAPPED.format(
        "                    config:\n" + PER_ROUTE + f"                      {override}"),
        filter="", EXT_PROC_TYPE=EXT_PROC_TYPE)
    assert fail_open_problems("envoy.yaml", text, ["deny policies"],
                              model_clusters={"demo_a"}) == []
    assert fail_open_problems("envoy.yaml", text, ["deny policies"],
                              model_clusters={"up"}) != []


def test_a_filter_that_never_reads_the_body_is_refused():
    text = ENVOY.format(route="", filter="", EXT_PROC_TYPE=EXT_PROC_TYPE).replace(
        "              processing_mode: {request_body_mode: BUFFERED, "
        "request_trailer_mode: SEND}\n", "")
    (problem,) = fail_open_problems("envoy.yaml", text, ["deny policies"])
    assert problem.path == "ext_proc" and "request_body_mode: NONE" in problem.reason


def test_a_tcp_proxy_to_a_models_cluster_is_refused():
    doc = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    doc["static_resources"]["listeners"].append({
        "name": "raw", "address": {"socket_address": {"address": "127.0.0.1",
                                                       "port_value": 10099}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": f"type.googleapis.com/{TCP_PROXY_TYPE}",
                "stat_prefix": "raw", "cluster": "demo_b"}}]}]})
    problems = fail_open_problems("envoy.yaml", yaml.safe_dump(doc), ["deny policies"],
                                  model_clusters={"demo_a", "demo_b"})
    assert [p.path for p in problems] == ["tcp_proxy"]
    assert fail_open_problems("envoy.yaml", yaml.safe_dump(doc), ["deny policies"],
                              model_clusters={"demo_a"}) == []


def test_a_policy_too_deep_for_the_joined_program_is_a_check_error(tmp_path):
    chain = "".join(f"request.alias == 'a{i}' ? {1000 + i} : " for i in range(25))
    path = tmp_path / "p.yaml"
    path.write_text(f"policies:\n  - id: limits.per_alias\n    effect: deny\n"
                    f"    expression: \"({chain}4096) < request.max_tokens\"\n")
    code, output = run_check([path])
    assert code == 1
    assert f"{path}:4: limits.per_alias: expression nests too deeply" in output


@pytest.mark.parametrize("expression", [
    "request.metadata.exists(k, request.tools.exists(t, t == k))",
    "has(subject.claims.groups) && "
    "subject.claims.groups.exists(g, request.tools.exists(t, t == g))",
    "request.tools.exists(t, request.data_classes.exists(c, c == t))",
])
def test_costly_shape_over_maps_and_dyn_lists(expression):
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert [p.reason.split(":")[0] for p in problems] == ["costly shape"]


def test_comprehensions_over_literals_are_not_costly():
    ps, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression":
                                    "['a', 'b'].exists(x, request.tools.exists(t, t == x))"}])
    assert ps is not None and problems == []


def test_shipped_envoy_config_is_fail_closed():
    code, output = run_check(EXAMPLES, [ROOT / "envoy" / "front-proxy.yaml"],
                             redaction_enabled=True)
    assert code == 0, output


def _without_ext_proc(doc: dict, listeners: set[str]) -> dict:
    for listener in doc["static_resources"]["listeners"]:
        if listener["name"] not in listeners:
            continue
        for chain in listener["filter_chains"]:
            for network in chain["filters"]:
                network["typed_config"]["http_filters"] = [
                    f for f in network["typed_config"]["http_filters"]
                    if f["name"] != "envoy.filters.http.ext_proc"]
    return doc


def test_an_envoy_config_without_ext_proc_is_refused():
    doc = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    names = {listener["name"] for listener in doc["static_resources"]["listeners"]}
    text = yaml.safe_dump(_without_ext_proc(doc, names))
    problems = fail_open_problems("envoy.yaml", text, ["deny policies"])
    assert {(p.severity, p.path) for p in problems} == {("error", "http_filters")}
    assert len(problems) == len(names)
    assert all("no ext_proc filter" in p.reason for p in problems)
    assert fail_open_problems("envoy.yaml", text, [])[0].severity == "warning"


def test_a_listener_without_ext_proc_is_refused_whatever_the_others_have():
    # The shadow listener's ext_proc does not cover the front one: its requests go to
    # the model clusters unchecked.
    doc = _without_ext_proc(
        yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text()), {"front"})
    problems = fail_open_problems("envoy.yaml", yaml.safe_dump(doc), ["deny policies"],
                                  model_clusters={"demo_a", "demo_b"})
    assert [p.path for p in problems] == ["http_filters"]
    assert "connection manager (front)" in problems[0].reason


def test_a_listener_that_reaches_no_model_needs_no_ext_proc():
    # A readiness probe listener that routes to Envoy's admin: nothing to check.
    text = (ROOT / "envoy" / "egress-tls.yaml").read_text()
    assert "stat_prefix: probe" in text
    assert fail_open_problems("envoy.yaml", text, ["deny policies"],
                              model_clusters={"demo_a", "demo_b"}) == []
    probe = [p for p in fail_open_problems("envoy.yaml", text, ["deny policies"])
             if "(probe)" in p.reason]
    assert len(probe) == 1  # models unknown: any upstream may be one


def test_routes_that_differ_in_header_matchers_are_named_apart():
    text = (ROOT / "envoy" / "front-proxy.yaml").read_text().replace(
        "failure_mode_allow: false", "failure_mode_allow: true", 1)
    problems = fail_open_problems("envoy.yaml", text, ["deny policies"])
    paths = [p.path for p in problems]
    assert len(paths) == len(set(paths)) >= 2
    assert "virtual host models route #1 (prefix=/ with headers x-atp-cluster, " \
        "x-atp-shadow-cluster)" in paths


@pytest.mark.parametrize("mode", ["", ", request_trailer_mode: SKIP"])
def test_a_filter_that_skips_request_trailers_is_refused(mode):
    # egress-tls.yaml skipped them: an ATP key in an HTTP/2 trailer reached the provider.
    text = ENVOY.format(route="", filter="", EXT_PROC_TYPE=EXT_PROC_TYPE).replace(
        "request_trailer_mode: SEND", mode.removeprefix(", ") or "request_header_mode: SEND")
    (problem,) = fail_open_problems("envoy.yaml", text, ["deny policies"])
    assert problem.path == "ext_proc" and "request_trailer_mode: SKIP" in problem.reason


@pytest.mark.parametrize("max_body, errors", [(4 << 20, 0), (5 << 20, 2), (16 << 20, 2)])
def test_an_envoy_buffer_smaller_than_atp_counts_on_is_refused(tmp_path: Path, max_body: int,
                                                               errors: int) -> None:
    # Accepted, answers between Envoy's buffer and max_body_bytes got a 500 (ATP asked
    # Envoy to buffer what it could not), and a body placeholders grew past the buffer
    # Envoy's 413 rather than ATP's.
    config = tmp_path / "atp.yaml"
    shutil.copytree(ROOT / "examples" / "policies", tmp_path / "policies")
    config.write_text((ROOT / "examples" / "atp.yaml").read_text().replace(
        "max_body_bytes: 4194304", f"max_body_bytes: {max_body}"))
    code, output = run_check([config], [ROOT / "envoy" / "front-proxy.yaml"])
    found = [line for line in output.splitlines() if "per_connection_buffer_limit_bytes" in line]
    assert len(found) == errors and code == (1 if errors else 0)
    assert all(f"ATP counts on {2 * max_body}" in line for line in found)


@pytest.mark.parametrize("limit", [65536, "65536"])
def test_a_quoted_envoy_buffer_limit_is_read_as_envoy_reads_it(limit) -> None:
    # Protobuf's JSON takes the number quoted, and Envoy with it: check said OK.
    from atp_extproc.policy.envoy_lint import buffer_problems

    doc = yaml.safe_load((ROOT / "envoy" / "front-proxy.yaml").read_text())
    for listener in doc["static_resources"]["listeners"]:
        listener["per_connection_buffer_limit_bytes"] = limit
    problems = buffer_problems("e.yaml", yaml.safe_dump(doc), 4 << 20)
    assert problems and all("Envoy buffers 65536 bytes" in p.reason for p in problems)
