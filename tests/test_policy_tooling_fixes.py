"""Policy tooling that disagreed with serve or the runtime: `policy test` ignoring
policy.environment and running configs serve refuses, `check` missing a data class no
detector finds inside has(), and the cel-python oracle parting from the CEL spec on `in`,
string() and list indexes."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import pytest
from cel_expr_python import cel

from atp_extproc import config as config_mod
from atp_extproc.policy import PolicySet, build_attributes, cli, testing
from atp_extproc.policy.oracle import ERROR, Oracle
from atp_extproc.policy.runtime import attributes_for_request
from atp_extproc.redact import BUILTIN_CLASSES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example_config(tmp_path: Path, *, replace: tuple[str, str] = ("", ""),
                   before_policy: str = "") -> Path:
    """examples/atp.yaml and its policies (cases included) copied under tmp_path, with
    one text replaced and `before_policy` put in front of the `policy:` section."""
    shutil.copytree(EXAMPLES / "policies", tmp_path / "policies")
    text = (EXAMPLES / "atp.yaml").read_text().replace(*replace)
    assert "\npolicy:\n" in text
    path = tmp_path / "atp.yaml"
    path.write_text(text.replace("\npolicy:\n", f"\n{before_policy}policy:\n"))
    return path


# -- policy test: context.environment is policy.environment, as serve sets it ----------


ENV_POLICY = ("policies:\n  - id: env.prod_only_alice\n    effect: deny\n"
              "    expression: context.environment == 'prod' && subject.tenant != 'alice'\n")
BOB = ("  - subject: {tenant: bob, auth_method: api_key, key_id: bob-demo}\n"
       "    request: {path: /v1/chat/completions, operation: chat, alias: gpt-4o-mini}\n")


def test_policy_test_denies_what_serve_denies_in_the_configured_environment(tmp_path):
    path = example_config(tmp_path, replace=("environment: dev", "environment: prod"))
    (tmp_path / "policies" / "env.yaml").write_text(ENV_POLICY)
    shutil.rmtree(tmp_path / "policies" / "tests")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../atp.yaml]\nmodels: ../atp.yaml\ncases:\n" + BOB
        + "    candidates: [small]\n    expect: {denied: env.prod_only_alice}\n")
    # Serve's verdict: the exchange builds the attributes with policy.environment.
    policies = config_mod.load(path, secrets=False).policies
    assert policies is not None
    served = policies.evaluate(attributes_for_request(
        tenant="bob", auth_method="api_key", key_id="bob-demo", jwt_payload=None,
        path="/v1/chat/completions", operation="chat", alias="gpt-4o-mini",
        body_bytes=10, doc={"messages": []}, environment=policies.settings.environment))
    assert served.denied is not None and served.denied.policy_id == "env.prod_only_alice"
    report = testing.run(tmp_path / "tests")
    assert (report.passed, report.failed, report.load_errors) == (1, 0, []), report.failures


def test_a_policy_file_tested_against_an_atp_yaml_runs_with_its_policy_settings(tmp_path):
    # Listed alone (policies: [env.yaml], models: atp.yaml), the policy file ran with
    # default settings: environment "" and default allow, where serve has prod and deny.
    example_config(tmp_path, replace=("environment: dev", "environment: prod"))
    shutil.rmtree(tmp_path / "policies" / "tests")
    (tmp_path / "policies" / "env.yaml").write_text(ENV_POLICY)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text(
        "policies: [../policies/env.yaml]\nmodels: ../atp.yaml\ncases:\n" + BOB
        + "    candidates: [small]\n    expect: {denied: env.prod_only_alice}\n")
    report = testing.run(tmp_path / "tests")
    assert (report.passed, report.failed, report.load_errors) == (1, 0, []), report.failures


def test_a_suites_environment_setting_is_the_one_its_cases_run_in(tmp_path):
    (tmp_path / "env.yaml").write_text(ENV_POLICY)
    # A case's own context.environment still wins: it is the environment it is about.
    (tmp_path / "t.yaml").write_text(
        "policies: [env.yaml]\nsettings: {environment: prod}\ncases:\n"
        + BOB + "    expect: {denied: env.prod_only_alice}\n"
        + BOB + "    context: {environment: dev}\n    expect: {denied: false}\n")
    report = testing.run(tmp_path / "t.yaml")
    assert (report.passed, report.failed, report.load_errors) == (2, 0, []), report.failures


# -- policy test: a config serve refuses is refused ------------------------------------


@pytest.mark.parametrize("redaction", [
    "redaction:\n  disabled_classes: [card]\n",   # a redact policy requires card
    "redaction:\n  enabled: false\n",             # policies read request.data_classes
])
def test_policy_test_refuses_the_configs_serve_refuses(tmp_path, redaction):
    path = example_config(tmp_path, before_policy=redaction + "\n")
    with pytest.raises(config_mod.ConfigError) as refused:
        config_mod.load(path, secrets=False)
    report = testing.run(tmp_path / "policies" / "tests")
    assert report.passed == 0 and report.load_errors
    # Every case file runs against this atp.yaml: each says what serve says.
    assert {p.reason for p in report.load_errors} == {r for _, r in refused.value.problems}
    assert cli.test(str(tmp_path / "policies" / "tests"), out=io.StringIO()) == 2


def test_the_same_config_unchanged_still_runs(tmp_path):
    example_config(tmp_path)
    report = testing.run(tmp_path / "policies" / "tests")
    assert report.failed == 0 and report.load_errors == [] and report.passed >= 30


# -- check: has() on a data class no detector finds ------------------------------------


@pytest.mark.parametrize(("expression", "warned"), [
    ("has(request.data_classes.emial)", True),
    ("request.data_classes.emial > 0", True),
    ("'emial' in request.data_classes", True),       # as before
    ("has(request.data_classes.email)", False),
])
def test_a_data_class_no_detector_finds_is_named_in_has_too(expression, warned):
    _, problems = PolicySet.lint([{"id": "t.x", "effect": "deny", "expression": expression}],
                                 known_data_classes=BUILTIN_CLASSES)
    never = [p for p in problems if "is never 'emial' with this config" in p.reason]
    assert [p.severity for p in never] == (["warning"] if warned else [])


# -- the oracle follows the spec as the runtime does -----------------------------------


def engine_and_oracle(expression: str, attrs) -> tuple:
    ps = PolicySet.compile([{"id": "o.p", "effect": "deny", "expression": expression}])
    engine = ps.raw_results(attrs, batch=False)[0][0]
    return (engine if isinstance(engine, bool) else ERROR,
            Oracle().evaluate(expression, attrs.to_proto()))


@pytest.mark.parametrize(("expression", "expected"), [
    ("string(request.stream) == 'true'", True),
    ("string(subject.claims.quota) == '5'", True),
    ("string(subject.claims.rate) == '0.25'", True),
    ("string(subject.claims.scopes) == '[]'", ERROR),      # no string() of a list
    # `in` compares as == does: numbers by value, other types simply not equal.
    ("subject.claims.quota in [5, 6]", True),
    ("5 in subject.claims.scopes", False),
    ("5u in subject.claims.limits", True),
    ("subject.claims.quota in subject.claims.quota", ERROR),
    # A list index of any numeric type with an integral value.
    ("subject.claims.scopes[1.0] == 'chat'", True),
    ("subject.claims.scopes[1u] == 'chat'", True),
    ("subject.claims.scopes[subject.claims.rate] == 'chat'", ERROR),
    ("subject.claims.scopes[2.0] == 'chat'", ERROR),
    ("subject.claims.scopes[0][0] == 'r'", ERROR),          # a string has no index
])
def test_oracle_agrees_with_the_runtime_on_in_string_and_indexes(expression, expected):
    attrs = build_attributes(
        {"tenant": "alice", "auth_method": "jwt", "claims": {
            "quota": 5, "rate": 0.25, "scopes": ["read", "chat"], "limits": [5, 6]}},
        {"operation": "chat", "stream": True})
    assert engine_and_oracle(expression, attrs) == (expected, expected)


def test_oracle_writes_doubles_as_the_runtime_does():
    env = cel.NewEnv(variables={"x": cel.Type.DOUBLE})
    program = env.compile("string(x)")
    rng = random.Random(20260101)
    values = [5.0, -0.0, 100.0, 1e6, 999999.9, 1234567.0, 0.0001, 0.00001, 1e20, 2 / 3,
              1.5e-7, 5e-324, 1.7976931348623157e308, 9007199254740993.0]
    values += [rng.uniform(-1e7, 1e7) for _ in range(40)]
    values += [rng.randint(-10**6, 10**6) / 10**rng.randint(0, 9) for _ in range(40)]
    oracle = Oracle()
    for value in values:
        text = program.eval(env.Activation({"x": value})).plain_value()
        doc = build_attributes({"tenant": "a", "claims": {"x": value}}).to_proto()
        assert oracle.evaluate(f"string(subject.claims.x) == '{text}'", doc) is True, \
            (value, text)
