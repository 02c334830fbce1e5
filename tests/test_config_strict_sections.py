"""Every section of atp.yaml reads values as `server`, `models` and `routes` do: a number
must be a number, a list a list, and a boolean setting takes true/false or yes/no alone
(README, "Configuration reference"); each refusal says what the file gave."""

from __future__ import annotations

from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.config import ConfigError
from atp_extproc.policy.settings import load_text

# routes[0] ends the file: a case adds its keys to the route, or a section after it.
CONFIG = """auth: {anonymous_tenant: anon}
models:
  - {name: small, cluster: c, upstream_model: u, price: {input_per_1k: 0.001, output_per_1k: 0}}
  - {name: large, cluster: c, upstream_model: v, price: {input_per_1k: 0.01, output_per_1k: 0}}
routes:
  - name: chat
    aliases:
      gpt-4o-mini: [small, large]
"""


def problems(extra: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(CONFIG + extra, "atp.yaml", secrets=False)
    return raised.value.problems


@pytest.mark.parametrize(("extra", "where", "reason"), [
    ("    objective: {limits: {min_samples: 1_000}}\n",
     "routes[0].objective.limits.min_samples", "expected a number, got the string '1_000'"),
    ("    objective: {breaker: {min_requests: '20'}}\n",
     "routes[0].objective.breaker.min_requests", "expected an integer, got the string '20'"),
    ("    objective: {breaker: {half_open_probes: 3.0}}\n",
     "routes[0].objective.breaker.half_open_probes", "expected an integer, got the number 3.0"),
    ("    objective: {weights: {cost: true}}\n",
     "routes[0].objective.weights.cost", "expected a number, got true"),
    ("    objective: {quality: {finish_reason_scores: {stop: '1'}}}\n",
     "routes[0].objective.quality.finish_reason_scores.stop",
     "expected a number, got the string '1'"),
    ("ledger: {flush_interval_s: '1.0'}\n",
     "ledger.flush_interval_s", "expected a number, got the string '1.0'"),
], ids=["underscored-word", "quoted-integer", "float-for-integer", "boolean-weight",
        "quoted-score", "quoted-interval"])
def test_a_number_outside_server_models_and_routes_must_be_one_too(
        extra: str, where: str, reason: str) -> None:
    assert problems(extra) == [(where, reason)]


@pytest.mark.parametrize(("extra", "where", "given"), [
    ("ledger: {enabled: 'off'}\n", "ledger.enabled", "the string 'off'"),
    ("ledger: {enabled: 0}\n", "ledger.enabled", "the number 0"),
    ("redaction: {enabled: 'on'}\n", "redaction.enabled", "the string 'on'"),
    ("redaction: {restore: 't'}\n", "redaction.restore", "the string 't'"),
    ("redaction: {custom_detectors: [{name: emp, pattern: 'EMP-[0-9]+', "
     "case_insensitive: 1}]}\n",
     "redaction.custom_detectors[0].case_insensitive", "the number 1"),
    ("    restore: 'off'\n", "routes[0].restore", "the string 'off'"),
    ("    restore: '1'\n", "routes[0].restore", "the string '1'"),
], ids=["ledger-off", "ledger-0", "redaction-on", "redaction-t", "detector-1", "route-off",
        "route-quoted-1"])
def test_a_boolean_setting_refuses_what_readme_does_not_promise(
        extra: str, where: str, given: str) -> None:
    # README: `off` stays a word; a boolean setting takes yes/no beside true/false.
    assert problems(extra) == [(where, f"expected true or false, got {given}")]


@pytest.mark.parametrize(("extra", "where", "given"), [
    ("    objective: {challengers: large}\n", "routes[0].objective.challengers",
     "a list, got the string 'large'"),
    ("    objective: {restrict: {regions: eu}}\n", "routes[0].objective.restrict.regions",
     "a list, got the string 'eu'"),
    ("redaction: {phone_regions: US}\n", "redaction.phone_regions",
     "a list, got the string 'US'"),
    ("redaction: {actions: [mask]}\n", "redaction.actions", "a mapping, got a list"),
    ("    objective: fast\n", "routes[0].objective", "a mapping, got the string 'fast'"),
], ids=["challengers", "regions", "phone-regions", "actions", "objective"])
def test_a_list_or_mapping_of_the_wrong_shape_is_named_as_yaml_says_it(
        extra: str, where: str, given: str) -> None:
    assert problems(extra) == [(where, f"expected {given}")]


def test_yes_no_lists_and_integers_are_still_read_everywhere() -> None:
    snapshot = config_mod.parse(CONFIG + """    restore: YES
    objective:
      challengers: [large]
      limits: {min_samples: 1000}
      restrict: {regions: [unspecified]}
ledger: {enabled: no}
redaction:
  enabled: yes
  restore: No
  phone_regions: [US, NO]
  custom_detectors: [{name: emp, pattern: 'EMP-[0-9]+', case_insensitive: yes}]
policy: {include: []}
""", "atp.yaml", secrets=False)
    route = snapshot.routes[0]
    assert route.restore is True and route.objective is not None
    assert route.objective.challengers == ("large",)
    assert route.objective.limits.min_samples == 1000.0
    assert snapshot.ledger.enabled is False
    assert snapshot.policies is None


def test_the_policy_sections_word_a_wrong_type_as_the_rest_and_check_gives_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CONFIG + """policy:
  environment: 1
  include: policies/*.yaml
policies:
  - id: data.emails
    effect: redact
    expression: 'true'
    data_classes: email
"""
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    assert cli.main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:10: policy.environment: expected a string, got the number 1",
        f"{path}:11: policy.include: expected a list, got the string 'policies/*.yaml'",
        f"{path}:16: policies[0].data_classes: expected a list, got the string 'email'",
        "3 error(s), 0 warning(s)"]


def test_an_included_policy_file_is_read_as_atp_yaml_is() -> None:
    loaded = load_text("policies:\n  - id: a.b\n    effect: deny\n    expression: 'true'\n"
                       "    message: 403\n", "p.yaml")
    assert [(p.line, p.path, p.reason) for p in loaded.problems] == [
        (5, "policies[0].message", "expected a string, got the number 403")]
