"""`atp-extproc check` on a file it refuses: each problem once, as file:line: path: reason
(file: path: reason where no line is known), the path in full."""

from __future__ import annotations

from pathlib import Path

import pytest

from atp_extproc import cli
from tests.conftest import MINIMAL_CONFIG

CONFIG = ("server:\n  max_json_depth: 64\n" + MINIMAL_CONFIG
          + "ledger: {enabled: false}\npolicy:\n  mode: per_policy\n")


def check(capsys: pytest.CaptureFixture[str], path: Path) -> list[str]:
    """The problems `check` prints for `path`, which it must refuse, less the tally line
    that ends them (checked here)."""
    assert cli.main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    *lines, tally = (captured.out + captured.err).splitlines()
    errors = sum(1 for line in lines if ": warning: " not in line)
    assert tally == f"{errors} error(s), {len(lines) - errors} warning(s)"
    return lines


def config(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    text = CONFIG
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    return path


def test_a_policy_setting_problem_is_named_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, ("mode: per_policy", "mode: enforced"))
    assert check(capsys, path) == [
        f"{path}:10: policy.mode: Input should be 'per_policy', 'dry_run' or 'enforce', "
        "got the string 'enforced'"]


@pytest.mark.parametrize(("edit", "problems"), [
    (("  max_json_depth: 64\n", "  max_json_depth: 64\n  max_json_depth: 32\n"),
     ["3: server.max_json_depth"]),
    (("{name: r, aliases: {a: [m]}}", "{name: r, name: s, aliases: {a: [m]}}"),
     ["7: routes[0].name"]),
    # A key repeated in a mapping within a mapping of the same key: each at its own depth.
    (("policy:\n  mode: per_policy\n",
      "policy:\n  mode: per_policy\n  x:\n    mode: a\n    mode: b\n  mode: enforce\n"),
     ["13: policy.x.mode", "14: policy.mode"]),
])
def test_a_key_given_twice_is_named_once_by_its_full_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str],
        problems: list[str]) -> None:
    path = config(tmp_path, edit)
    assert check(capsys, path) == [
        f"{path}:{where}: the key appears twice in this mapping" for where in problems]


def test_a_missing_file_is_named_once(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "atp.yaml"
    (line,) = check(capsys, path)
    assert line == f"{path}: cannot read: [Errno 2] No such file or directory: '{path}'"


def test_a_file_that_is_no_yaml_is_named_once_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, ("routes:\n", "routes: [\n"))
    (line,) = check(capsys, path)
    assert line.startswith(f"{path}:7: invalid YAML: ")


def test_policy_and_config_problems_are_each_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, ("mode: per_policy", "mode: enforced"),
                  ("max_json_depth: 64", "max_json_depth: 1"))
    assert check(capsys, path) == [
        f"{path}:10: policy.mode: Input should be 'per_policy', 'dry_run' or 'enforce', "
        "got the string 'enforced'",
        f"{path}:2: server.max_json_depth: Input should be greater than or equal to 2"]


@pytest.mark.parametrize("text", ["- a\n", "hello\n"])
def test_a_file_that_is_no_mapping_is_named_once(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 text: str) -> None:
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    assert check(capsys, path) == [
        f"{path}: the file must hold a mapping (server:, models:, routes:, ...)"]


def test_an_included_file_that_is_no_policies_mapping_is_named_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "list.yaml").write_text("- 1\n")
    path = config(tmp_path, ("mode: per_policy", "include: [policies/*.yaml]"))
    (line,) = check(capsys, path)
    assert line.endswith("list.yaml:1: an included policy file holds only `policies:`")


@pytest.mark.parametrize("classes, warned", [("", True), (
    "redaction:\n  custom_detectors:\n    - {name: emial, pattern: 'e-[0-9]{6}'}\n", False)])
def test_a_data_class_no_detector_finds_is_a_warning(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     classes: str, warned: bool) -> None:
    # The lint had the warning, but `check` never told it the config's classes.
    path = config(tmp_path)
    path.write_text(path.read_text() + classes + "policies:\n  - {id: pii.x, effect: deny, "
                    "expression: \"'emial' in request.data_classes\"}\n")
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("is never 'emial'" in out) is warned


def test_a_policy_file_is_checked_on_its_own(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # One team's file: it failed for want of an atp.yaml's models and routes.
    path = tmp_path / "tools.yaml"
    path.write_text("policies:\n  - {id: t.x, effect: deny, expression: request.stream}\n")
    assert cli.main(["check", str(path)]) == 0
    assert "1 policies (1 deny)" in capsys.readouterr().out
    path.write_text("policies:\n  - {id: t.x, effect: deny, expression: request.strem}\n")
    assert check(capsys, path)[0].startswith(f"{path}:2: t.x: unknown attribute request.strem")


def test_an_included_file_with_an_empty_policies_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `policies:` with nothing under it loaded silently as no policies.
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "tools.yaml").write_text("policies:\n")
    path = config(tmp_path, ("mode: per_policy", "include: [policies/*.yaml]"))
    (line,) = check(capsys, path)
    assert line.endswith("tools.yaml:1: policies: empty; `policies: []` says none")
