"""`atp-extproc policy test DIR`: report, failures, exact coverage counts."""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

from atp_extproc.policy import cli, testing

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "policy_cases" / "runner"
EXAMPLE_TESTS = ROOT / "examples" / "policies" / "tests"


def test_report_counts_failures_and_coverage_exactly():
    report = testing.run(RUNNER)
    assert (report.passed, report.failed) == (2, 2)
    failures = {name: errs for _, name, errs in report.failures}
    assert failures["this expectation is wrong on purpose"] == [
        "denied: expected not denied, got r.deny_big",
        "decisions.r.deny_big: expected allow, got deny (too big)"]
    assert "bad attributes: unknown request attribute(s): max_token" in \
        failures["a typo in the attributes"][0]
    cov = report.coverage
    # Three cases were evaluated (the typo case never reached the engine).
    assert {pid: (c.evaluated, c.matched, c.not_matched, c.errors, c.not_applicable,
                  c.asserted) for pid, c in cov.items()} == {
        "r.deny_big": (3, 1, 2, 0, 0, 2),
        "r.allow_alice": (3, 2, 1, 0, 0, 2),
        "r.no_external": (3, 1, 0, 0, 2, 1),
        "r.redact": (3, 1, 2, 0, 0, 1),
        "r.strip": (3, 1, 0, 0, 2, 1),
        "r.never_hit": (3, 0, 3, 0, 0, 0),
    }
    out = io.StringIO()
    testing.print_report(report, out)
    text = out.getvalue()
    assert "FAIL  " in text and "this expectation is wrong on purpose" in text
    assert "policies matched: 5/6; both outcomes: 3/6; asserted: 5/6" in text
    assert "deny 1/2 (1 matches)" in text and "tools 1/1 (1 matches)" in text
    assert text.rstrip().endswith("policy tests: 2 passed, 2 failed")


def test_cli_exit_codes(tmp_path):
    out = io.StringIO()
    assert cli.test(str(RUNNER), out=out) == 1
    assert cli.test(str(tmp_path), out=io.StringIO()) == 2  # no cases at all
    (tmp_path / "broken_test.yaml").write_text("policies: [nothing.yaml]\ncases: []\n")
    assert cli.test(str(tmp_path), out=io.StringIO()) == 2


def test_example_cases_pass_and_cover_every_policy_and_effect():
    out = io.StringIO()
    assert cli.test(str(EXAMPLE_TESTS), out=out) == 0, out.getvalue()
    report = testing.run(EXAMPLE_TESTS)
    assert report.failed == 0 and report.passed >= 30
    assert len(report.coverage) >= 20
    uncovered = [pid for pid, c in report.coverage.items()
                 if not (c.matched and c.not_matched and c.asserted)]
    assert uncovered == []
    effects = {c.effect for c in report.coverage.values() if c.matched}
    assert effects == {"deny", "allow", "restrict", "redact", "tools"}


def test_settings_in_a_case_file_keep_the_policies_atp_yaml_includes(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "atp.yaml").write_text(
        "policy:\n  mode: dry_run\n  include: [policies/*.yaml]\n")
    (tmp_path / "policies" / "limits.yaml").write_text(
        "policies:\n  - id: limits.max_tokens\n    effect: deny\n"
        "    expression: request.max_tokens > 4096\n")
    # `settings:` overrides the mode; the included policy is still tested.
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../atp.yaml]\nsettings: {mode: enforce}\ncases:\n"
        "  - request: {operation: chat, max_tokens: 8000}\n"
        "    expect: {denied: limits.max_tokens}\n")
    report = testing.run(tmp_path / "tests")
    assert (report.passed, report.failed, report.load_errors) == (1, 0, [])
    assert list(report.coverage) == ["limits.max_tokens"]
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../atp.yaml]\nsettings: {include: [x.yaml]}\ncases: []\n")
    assert [p.path for p in testing.run(tmp_path / "tests").load_errors] == \
        ["settings.include"]


def test_an_unknown_data_class_fails_as_serve_refuses_it(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "atp.yaml").write_text(
        "redaction:\n  custom_detectors: [{name: employee_id, pattern: 'EMP-[0-9]{6}'}]\n"
        "policy:\n  include: [pol.yaml]\n")
    (tmp_path / "pol.yaml").write_text(
        "policies:\n  - id: p.redact\n    effect: redact\n"
        "    data_classes: [employee_id, emial]\n"
        "    expression: \"'email' in request.data_classes\"\n")
    case = ("cases:\n  - request: {operation: chat, data_classes: {email: 1}}\n"
            "    expect: {denied: false}\n")
    (tmp_path / "tests" / "t.yaml").write_text("policies: [../atp.yaml]\n" + case)
    report = testing.run(tmp_path / "tests")
    assert report.passed == 0
    assert [(Path(p.file).name, p.line, p.path) for p in report.load_errors] == \
        [("pol.yaml", 4, "p.redact")]
    assert "unknown data class 'emial'" in report.load_errors[0].reason
    # The policy file listed alone: the atp.yaml `models:` names is the config run.
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../pol.yaml]\nmodels: ../atp.yaml\n" + case)
    assert [p.path for p in testing.run(tmp_path / "tests").load_errors] == ["p.redact"]
    # A custom detector's class is known: the typo fixed, the case runs.
    (tmp_path / "pol.yaml").write_text(
        (tmp_path / "pol.yaml").read_text().replace("emial", "email"))
    report = testing.run(tmp_path / "tests")
    assert (report.passed, report.load_errors) == (1, [])


def test_a_policy_file_alone_is_warned_of_a_class_not_built_in(tmp_path, capsys):
    # With no atp.yaml to say what custom detectors there are, the typo passed unsaid
    # (check warns of it).
    (tmp_path / "pol.yaml").write_text(
        "policies:\n  - id: p.redact\n    effect: redact\n    data_classes: [emial]\n"
        "    expression: \"resource.egress == 'external'\"\n")
    (tmp_path / "t.yaml").write_text(
        "policies: [pol.yaml]\ncases:\n  - request: {operation: chat}\n"
        "    candidates: [{model: big, egress: external}]\n"
        "    expect: {required_redactions: [emial]}\n")
    report = testing.run(tmp_path / "t.yaml")
    assert (report.passed, report.load_errors) == (1, [])
    ((line, path, reason),) = [(w.line, w.path, w.reason) for w in report.warnings]
    assert (line, path) == (4, "p.redact") and "'emial' is not a built-in" in reason
    testing.print_report(report, sys.stdout)
    assert "warning: p.redact: 'emial' is not a built-in" in capsys.readouterr().out


def test_a_case_may_say_not_denied_as_yaml_1_1_did(tmp_path):
    # YAML 1.2 reads `denied: no` as a word: it was taken for a policy id, and the case
    # failed as "expected no, got not denied".
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        policies:
          - {id: a.deny_bob, effect: deny, expression: "subject.tenant == 'bob'"}
        """))
    suite = tmp_path / "t_test.yaml"
    suite.write_text(textwrap.dedent("""\
        policies: [p.yaml]
        cases:
          - name: alice passes
            subject: {tenant: alice, auth_method: api_key}
            request: {operation: chat, alias: m}
            expect: {denied: no, would_deny: off}
        """))
    out = io.StringIO()
    assert cli.test(str(suite), out=out) == 0, out.getvalue()


def test_a_candidate_key_no_candidate_has_is_named(tmp_path):
    # It failed with CandidateInfo.__init__()'s TypeError, a class no case author knows.
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - id: t.nostream\n    effect: deny\n"
        "    expression: request.stream\n")
    (tmp_path / "c_test.yaml").write_text(textwrap.dedent("""\
        policies: [p.yaml]
        cases:
          - name: a colour
            request: {stream: true}
            candidates: [{model: m, colour: red}]
            expect: {denied: t.nostream}
        """))
    report = testing.run(tmp_path)
    ((_, name, errors),) = report.failures
    assert name == "a colour"
    assert "a candidate has no 'colour': it takes model, provider" in errors[0]


_STRIPS = "policies:\n" + "".join(f"""  - id: t.{name}
    effect: tools
    tool_action: strip
    mode: {mode}
    expression: tool.name == '{name}'
""" for name, mode in (("alpha", "enforce"), ("beta", "enforce"), ("gamma", "dry_run")))


def _forcing(name: str, choice: str, tools: list[str], denied: str, would: str) -> str:
    return f"""  - name: {name}
    request: {{tools: {tools}, tool_choice: {choice}}}
    expect: {{denied: {denied}, would_deny: {would}}}
"""


def test_a_stripped_tool_the_request_insists_on_is_refused_as_serve_refuses_it(tmp_path):
    # serve refuses (403 tool_not_allowed, naming the policy) a request whose tool_choice
    # forces a tool an enforced strip policy removes; policy test said it went through.
    (tmp_path / "strips.yaml").write_text(_STRIPS)
    (tmp_path / "strips_test.yaml").write_text(
        "policies: [strips.yaml]\ncases:\n"
        + _forcing("forces an enforced strip", "beta", ["alpha", "beta", "keep"],
                   "t.beta", "t.beta")
        + _forcing("forces a dry-run strip", "gamma", ["alpha", "gamma", "keep"],
                   "false", "t.gamma")
        + _forcing("requires a tool, none left", "required", ["beta", "alpha"],
                   "t.alpha", "t.alpha")
        + _forcing("requires a tool, one left", "required", ["alpha", "keep"],
                   "false", "false")
        + _forcing("lets the model choose", "auto", ["alpha", "beta"], "false", "false")
        + _forcing("forces a kept tool", "keep", ["alpha", "keep"], "false", "false")
        # A tool only called earlier is none the request declares: none is left.
        + """  - name: requires a tool, the one declared stripped
    request:
      tools: [alpha, history]
      tool_details: [{name: alpha}, {name: history, declared: false, called: true}]
      tool_choice: required
    expect: {denied: t.alpha}
""")
    report = testing.run(tmp_path)
    assert report.failures == [] and report.passed == 7


def test_cases_in_a_linked_directory_are_run_once(tmp_path):
    # rglob followed no linked directory: half a suite went unrun, and the run passed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "pol.yaml").write_text(
        "policies:\n  - id: t.deny_bob\n    effect: deny\n"
        "    expression: subject.tenant == 'bob'\n")
    (other / "t_test.yaml").write_text(
        "policies: [pol.yaml]\ncases:\n  - name: bob is denied\n"
        "    subject: {tenant: bob}\n    expect: {denied: t.deny_bob}\n")
    root = tmp_path / "suite"
    root.mkdir()
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # walked once, not forever
    report = testing.run(root)
    assert (report.passed, report.failed, report.load_errors) == (1, 0, [])


def test_check_and_policy_test_refuse_a_policy_file_serve_refuses_when_included(tmp_path):
    # Checked or tested alone, a file with `policy:` settings beside its policies, or
    # an empty `policies:`, passed; included by atp.yaml, serve refused it.
    (tmp_path / "policies").mkdir()
    (tmp_path / "tests").mkdir()
    team = tmp_path / "policies" / "team.yaml"
    team.write_text("policy: {default: deny}\npolicies:\n  - id: team.ok\n    effect: allow\n"
                    "    expression: subject.tenant == 'alice'\n")
    empty = tmp_path / "policies" / "empty.yaml"
    empty.write_text("policies:\n")
    for path, reason in ((team, "an included policy file holds only `policies:`"),
                         (empty, "policies: empty; `policies: []` says none")):
        out = io.StringIO()
        assert cli.check([str(path)], out=out) == 1
        assert reason in out.getvalue()
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../policies/team.yaml]\ncases:\n"
        "  - request: {operation: chat}\n    expect: {denied: default}\n")
    report = testing.run(tmp_path / "tests")
    assert [p.reason for p in report.load_errors] == [
        "an included policy file holds only `policies:`"]
