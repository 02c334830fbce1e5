"""`atp-extproc check` and `policy test`: shapes the lint missed, and misleading reports."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.policy import PolicySet, build_attributes, testing
from atp_extproc.policy.cli import check
from atp_extproc.policy.settings import load_text
from tests.conftest import MINIMAL_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def reasons(expression: str, effect: str = "deny") -> list[str]:
    """The lint's problems for one policy, without their "(expression line …)" tail."""
    _, problems = PolicySet.lint([{"id": "t.x", "effect": effect, "expression": expression,
                                   **({"tool_action": "deny"} if effect == "tools" else {})}])
    return [p.reason.split(" (")[0] for p in problems]


# -- constant expressions -------------------------------------------------------------


@pytest.mark.parametrize(("expression", "value"), [
    ("subject.tenant != 'a' || subject.tenant != 'b'", "true"),
    ("'a' != subject.tenant || subject.tenant != 'b'", "true"),
    ("subject.tenant == 'a' || subject.tenant != 'a'", "true"),
    ("subject.tenant != 'a' && 'a' == subject.tenant", "false"),
    ("request.max_tokens >= request.max_tokens", "true"),
    ("request.max_tokens <= request.max_tokens", "true"),
    ("request.max_tokens < request.max_tokens", "false"),
    ("subject.tenant > subject.tenant", "false"),
    ("context.time <= context.time", "true"),
    ("request.tools != request.tools", "false"),
    ("subject.tenant.startsWith('')", "true"),
    ("request.alias.endsWith('')", "true"),
    ("subject.user.contains('') || request.stream", "true"),
])
def test_constant_shapes_are_found(expression, value):
    assert reasons(expression) == [f"expression is constant: always {value}"]


@pytest.mark.parametrize(("expression", "effect"), [
    ("subject.tenant != 'a' || subject.tenant != 'a'", "deny"),
    ("subject.tenant != 'a' && subject.tenant != 'b'", "deny"),
    ("subject.tenant != 'a' || subject.user != 'b'", "deny"),
    ("subject.tenant.startsWith('a') || subject.tenant.contains(subject.user)", "deny"),
    # A double or a dyn (a claim, a JSON number) can be NaN, which equals nothing.
    ("resource.input_per_1k >= resource.input_per_1k", "restrict"),
    ("has(subject.claims.n) && subject.claims.n == subject.claims.n", "deny"),
    ("has(subject.claims.n) && subject.claims.n in [subject.claims.n]", "deny"),
])
def test_shapes_that_may_differ_are_not_constant(expression, effect):
    assert reasons(expression, effect) == []


def test_shipped_policies_and_atp_yaml_still_lint_clean():
    out = io.StringIO()
    paths = [ROOT / "examples" / "atp.yaml",
             *sorted((ROOT / "examples" / "policies").glob("*.yaml"))]
    assert check([str(p) for p in paths], out=out) == 0, out.getvalue()
    assert "0 error(s), 0 warning(s)" in out.getvalue()


# -- comprehensions in tools policies -------------------------------------------------


def test_a_comprehension_in_a_tools_policy_is_costly():
    # It runs once per tool: over the request's tools it is a loop inside a loop.
    expression = "tool.name == 'x' && request.tools.exists(t, t == 'y')"
    assert reasons(expression, "tools") == ["costly shape: a comprehension over a list or "
                                            "map in a tools policy, which runs once per tool "
                                            "of the request"]
    assert reasons("request.tools.exists(t, t == 'y')") == []
    # Bounded (64 tools at most): a warning, so a config that loaded before still loads.
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "tools", "expression": expression,
                                   "tool_action": "deny"}])
    assert [p.severity for p in problems] == ["warning"]


@pytest.mark.parametrize("expression", [
    "tool.arguments.exists(k, k.startsWith('x'))",  # the tool's own: adds up, per tool
    "['a', 'b'].exists(n, tool.name == n)",          # a literal's size is the policy's
    "tool.name in request.tools",
])
def test_per_tool_shapes_that_are_not_costly(expression):
    assert reasons(expression, "tools") == []


def test_a_comprehension_inside_one_over_the_tools_own_fields_is_costly():
    # Per tool, its arguments times the request's tools: the inner loop is named.
    expression = "tool.arguments.exists(k, request.tools.exists(t, t == k))"
    assert reasons(expression, "tools") == [
        "costly shape: a comprehension over a list or map nested inside another one"]


# -- cel.bind and unknown functions ---------------------------------------------------


def test_cel_bind_is_supported_and_its_variable_is_no_attribute():
    policy_set, problems = PolicySet.lint([
        {"id": "t.bound", "effect": "deny",
         "expression": "cel.bind(r, request, r.alias == 'a' && r.stream)"},
        {"id": "t.tool", "effect": "tools", "tool_action": "deny",
         "expression": "cel.bind(n, tool.name, n == 'shell' || n == 'exec')"}],
        known_values={"request.alias": ["a", "b"]})
    assert problems == [] and policy_set is not None
    bound = policy_set.policies[0]
    assert {"request.alias", "request.stream"} <= set(bound.attributes_used)
    attrs = build_attributes(request={"alias": "a", "stream": True, "tools": ["exec"]})
    outcome = policy_set.evaluate(attrs)
    assert outcome.denied is not None and outcome.denied.policy_id == "t.bound"
    assert outcome.tools_denied == ("exec",)
    assert policy_set.raw_results(attrs, batch=False) == policy_set.raw_results(attrs)


def test_literals_compared_through_a_bound_variable_are_checked():
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny",
                                   "expression": "cel.bind(a, request.alias, a == 'zz')"}],
                                 known_values={"request.alias": ["a", "b"]})
    assert [(p.severity, p.reason.split(" (")[0]) for p in problems] == [
        ("warning", "request.alias is never 'zz' with this config")]


def test_an_unknown_namespaced_function_is_one_error():
    assert reasons("math.greatest(request.max_tokens, 5) > 3 && subject.tenant == 'a'") == [
        "unknown function math.greatest(): ATP's CEL has the standard functions and cel.bind"]


# -- policy test: globs that match case files -----------------------------------------


POLICY = ("policies:\n  - id: t.deny_big\n    effect: deny\n"
          "    expression: request.max_tokens > 100\n")


def _case_file(policies: str, max_tokens: int, denied: str) -> str:
    return (f"policies: {policies}\ncases:\n"
            f"  - request: {{operation: chat, max_tokens: {max_tokens}}}\n"
            f"    expect: {{denied: {denied}}}\n")


def test_a_glob_beside_the_cases_skips_the_other_case_files(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "a_test.yaml").write_text(_case_file("['*.yaml']", 800, "t.deny_big"))
    (tmp_path / "b_test.yaml").write_text(_case_file("[policy.yaml]", 8, "false"))
    report = testing.run(tmp_path)
    assert (report.passed, report.failed, report.load_errors) == (2, 0, [])


def test_a_pattern_that_matches_case_files_only_says_so(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "tests" / "a_test.yaml").write_text(
        _case_file("\n  - ../policy.yaml\n  - '*_test.yaml'\n  - nothing.yaml", 800,
                   "t.deny_big"))
    (tmp_path / "tests" / "b_test.yaml").write_text(_case_file("[../policy.yaml]", 8, "false"))
    report = testing.run(tmp_path / "tests")
    a_test, b_test = tmp_path / "tests" / "a_test.yaml", tmp_path / "tests" / "b_test.yaml"
    assert [(p.file, p.line, p.reason) for p in report.load_errors] == [
        (str(a_test), 3, f"'*_test.yaml' matches case files only ({b_test}): name the "
                         "policy files (or atp.yaml) the cases test"),
        (str(a_test), 4, "'nothing.yaml' matches no file")]


# -- lines: YAML errors at the end, a policies: scalar, each data class ------------------


@pytest.mark.parametrize(("text", "line"), [
    ("policies:\n  - [a\n", 2),                 # an unclosed [ : where it opened
    ("policies: [a, b\n", 1),
    ("policies:\n  - {id: a\n\n\n", 2),         # blank lines after it change nothing
    ("policies:\n  - id: 'a\n", 2),             # an unclosed quote
    ("policies: []\nx: [a", 2),                 # no newline at the end
])
def test_a_yaml_error_at_the_end_names_a_line_of_the_file(text, line):
    loaded = load_text(text, "p.yaml")
    assert [(p.line, p.reason.startswith("invalid YAML: ")) for p in loaded.problems] == [
        (line, True)]
    assert 1 <= loaded.problems[0].line <= len(text.rstrip().splitlines())


def test_a_yaml_error_inside_the_file_keeps_its_own_line():
    loaded = load_text("policies:\n  - id: a\n   bad: [\n  - id: b\n", "p.yaml")
    assert [p.line for p in loaded.problems] == [3]


def test_a_policies_scalar_names_its_line(tmp_path):
    assert [(p.line, p.path, p.reason) for p in
            load_text("policy: {mode: enforce}\npolicies: 5\n", "p.yaml").problems] == [
        (2, "policies", "must be a list of policies")]
    (tmp_path / "team.yaml").write_text("# a team's policies\npolicies: 5\n")
    loaded = load_text("policy: {include: [team.yaml]}\n", str(tmp_path / "atp.yaml"),
                       base_dir=tmp_path)
    assert [(p.line, p.path) for p in loaded.problems] == [(2, "policies")]


def test_an_unknown_data_class_names_its_own_line():
    text = ("policies:\n  - id: t.r\n    effect: redact\n    data_classes:\n"
            "      - email\n      - bogus\n"
            "    expression: request.alias == 'a'\n"
            "  - id: t.s\n    effect: redact\n    data_classes: [email,\n      nope]\n"
            "    expression: request.alias == 'b'\n")
    loaded = load_text(text, "p.yaml")
    assert loaded.problems == ()
    _, problems = PolicySet.lint(loaded.policies, known_data_classes=["email", "phone"])
    assert [(p.line, p.path, p.reason.split(" (")[0]) for p in problems] == [
        (6, "t.r", "unknown data class 'bogus'"), (11, "t.s", "unknown data class 'nope'")]


# -- atp.yaml: a policy: or policies: of the wrong shape, named once ---------------------


ATP_YAML = MINIMAL_CONFIG + "ledger: {enabled: false}\n"


@pytest.mark.parametrize(("section", "line", "problem"), [
    ("policy: [a]\n", 7, "policy: must be a mapping"),
    ("policy: on\n", 7, "policy: must be a mapping"),
    ("policies: 5\n", 7, "policies: must be a list of policies"),
    ("policies: {id: t.x}\n", 7, "policies: must be a list of policies"),
])
def test_a_policy_section_of_the_wrong_shape_is_named_once(
        tmp_path, capsys, section, line, problem):
    path = tmp_path / "atp.yaml"
    path.write_text(ATP_YAML + section)
    assert len(ATP_YAML.splitlines()) == line - 1
    assert cli.main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}:{line}: {problem}",
                                                    "1 error(s), 0 warning(s)"]
    # serve refuses it too, with the file, line, path and reason.
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert f"{path}: {problem} (line {line})" in capsys.readouterr().err
    with pytest.raises(config_mod.ConfigError):
        config_mod.load(path)


@pytest.mark.parametrize("expression", [
    "(" * 40 + "request.stream" + ")" * 40,
    # A long `+` chain is refused by the parser, in words repeated over three lines
    # (check printed them twice and counted 4 errors).
    " + ".join(["request.max_tokens"] * 40) + " > 5",
])
def test_an_expression_nested_past_cels_limit_is_said_plainly(expression):
    (reason,) = reasons(expression)
    assert reason.startswith("expression: nests too deeply") and "CANCELLED" not in reason
    assert "\n" not in reason


def test_an_include_under_a_directory_atp_may_not_read_says_so(tmp_path, monkeypatch):
    # glob.glob matches nothing in a directory it may not read, and says nothing of it.
    import os

    from atp_extproc.policy import settings

    locked = tmp_path / "policies"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(settings.os, "access", lambda p, mode: real_access(p, mode)
                        and Path(p) != locked)
    loaded = settings.load_text("policy: {include: ['policies/*.yaml']}\n",
                                str(tmp_path / "atp.yaml"), base_dir=tmp_path)
    (problem,) = loaded.problems
    assert problem.reason == (f"'policies/*.yaml' matches no file ({locked} cannot be "
                              "read: permission denied)")


@pytest.mark.parametrize(("expression", "warned"), [
    ("request.data_classes['email'] > 3", ["request.data_classes['email']"]),
    ("subject.claims.level > 3", ["subject.claims['level']"]),
    ("'email' in request.data_classes && request.data_classes['email'] > 3", []),
    ("has(subject.claims.level) && subject.claims.level > 3", []),
    # Nested: each key read needs its own test; has() tests only its last key.
    ("has(subject.claims.org.suspended) && subject.claims.org.suspended == true",
     ["subject.claims['org']"]),
    ("subject.claims.org.name == 'x'", ["subject.claims.org['name']", "subject.claims['org']"]),
    ("subject.claims['org']['name'] == 'x'",
     ["subject.claims.org['name']", "subject.claims['org']"]),
    ("has(subject.claims.org) && subject.claims.org.name == 'x'",
     ["subject.claims.org['name']"]),
    ("has(subject.claims.org) && has(subject.claims.org.suspended) && "
     "subject.claims.org.suspended == true", []),
    ("'org' in subject.claims && 'name' in subject.claims.org && "
     "subject.claims.org.name == 'x'", []),
    ("has(subject.claims.orgs) && subject.claims.orgs[0].name == 'x'", []),
    ("subject.claims.orgs[0].name == 'x'", ["subject.claims['orgs']"]),
])
def test_a_map_read_by_a_key_never_tested_for_is_warned_of(expression, warned):
    # With on_error: deny it refused every request without the key ("hello" included).
    assert [r.split(" is an evaluation error")[0] for r in reasons(expression)
            if "evaluation error where the key is absent" in r] == warned


@pytest.mark.parametrize(("expression", "warned"), [
    # check's own nesting advice suggests a lookup table: every tenant missing from it
    # was refused ("could not be evaluated") and check said nothing.
    ("request.max_tokens > {'alice': 4096, 'bob': 1024}[subject.tenant]", True),
    ("subject.tenant in ['alice', 'bob'] && "
     "request.max_tokens > {'alice': 4096, 'bob': 1024}[subject.tenant]", False),
    ("subject.tenant in {'alice': 1} ? {'alice': 4096}[subject.tenant] < 5 : false", False),
    ("{'alice': 4096}['alice'] > request.max_tokens", False),
    # Forms that cannot miss, or are guarded otherwise, were warned of.
    ("{true: 8192, false: 4096}[request.stream] < request.max_tokens", False),
    ("subject.tenant == 'alice' && {'alice': 4096}[subject.tenant] < 5", False),
    ("'alice' == subject.tenant && {'alice': 4096}[subject.tenant] < 5", False),
    # ...but a comparison with a value that is none of the map's keys guards nothing.
    ("subject.tenant == 'bob' && {'alice': 4096}[subject.tenant] < 5", True),
    ("subject.tenant == 'bob' || {'alice': 4096}[subject.tenant] < 5", True),
    ("subject.claims.org in {'acme': 1} && {'acme': 1}[subject.claims['org']] == 1",
     False),
])
def test_a_written_map_read_by_a_requests_key_is_warned_of(expression, warned):
    found = [r for r in reasons(expression) if "a map the expression writes" in r]
    assert found == (["a map the expression writes, read by subject.tenant, is an "
                      "evaluation error where subject.tenant is none of its keys, and "
                      "on_error then decides every such request: guard it"]
                     if warned else [])


@pytest.mark.parametrize(("expression", "guard"), [
    ("request.tool_details.exists(t, t.arguments['a'] == '5')", "('a' in t.arguments && ...)"),
    ("subject.claims['org']['name'] == 'x'", "('name' in subject.claims[\"org\"] && ...)"),
    ("request.metadata.team == 'x'", "('team' in request.metadata && ...)"),
])
def test_the_guard_a_map_read_is_told_to_take_is_cel_as_written(expression, guard):
    # Inside a comprehension it advised ('a' in request.tool_details[].arguments && ...),
    # which is no CEL: pasted, the policy no longer parsed.
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}])
    assert f"guard it {guard}" in problems[0].reason


def test_a_key_has_reads_past_is_named_with_its_line_and_policy() -> None:
    # has() on a missing intermediate key is an error, not false: with on_error deny it
    # refused every request without the claim.
    sp = load_text("policies:\n  - id: access.org_suspended\n    effect: deny\n"
                   "    expression: has(subject.claims.org.suspended)\n", "p.yaml").policies
    _, problems = PolicySet.lint(sp, source="p.yaml")
    assert [(p.file, p.line, p.path, p.severity) for p in problems] == [
        ("p.yaml", 4, "access.org_suspended", "warning")]
    assert problems[0].reason.startswith(
        "subject.claims['org'] is an evaluation error where the key is absent (has() tests "
        "only its last key)")


def test_a_class_redaction_does_not_look_for_is_warned_of() -> None:
    # 'ipv4' in request.data_classes with ipv4 disabled could never match, silently.
    from atp_extproc.policy.runtime import known_values

    known = known_values({"redaction": {"disabled_classes": ["ipv4"]}})
    _, problems = PolicySet.lint([{"id": "sec.no_ips", "effect": "deny",
                                   "expression": "'ipv4' in request.data_classes"}],
                                 known_values=known)
    assert [p.reason.split(" (known")[0] for p in problems] == [
        "request.data_classes{} is never 'ipv4' with this config"]



def _doubling(levels: int) -> str:
    expr = f"size(x{levels}) > 0"
    for i in range(levels, 0, -1):
        expr = f"cel.bind(x{i}, x{i - 1} + x{i - 1}, {expr})"
    return f"cel.bind(x0, request.tools, {expr})"


@pytest.mark.parametrize(("expression", "costly"), [
    # 18 levels: one request with 64 tools took 1 s and 1 GB, and check said nothing.
    (_doubling(18), True),
    (_doubling(11), True),
    (_doubling(10), False),
    ("cel.bind(t, request.tools, t + t + t).size() > 3", False),
    ("cel.bind(a, request.tools, cel.bind(b, a, cel.bind(c, b, size(c) > 0)))", False),
])
def test_bound_values_built_from_copies_of_each_other_are_a_costly_shape(expression, costly):
    found = [r for r in reasons(expression) if "cel.bind values built from copies" in r]
    assert bool(found) == costly, found
