"""The atp-extproc commands a platform team runs before deploying."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from atp_extproc.stack import EXAMPLE_CONFIG, FRONT_PROXY
from tests.conftest import copy_example


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atp_extproc", *args], capture_output=True,
                          text=True, timeout=120)


def test_check_passes_the_shipped_config_and_envoy() -> None:
    result = run("check", str(EXAMPLE_CONFIG), "--envoy", str(FRONT_PROXY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "25 policies" in result.stdout


def test_check_refuses_a_fail_open_envoy(tmp_path: Path) -> None:
    doc = yaml.safe_load(FRONT_PROXY.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = next(f for f in hcm["typed_config"]["http_filters"]
                    if f["name"] == "envoy.filters.http.ext_proc")
    ext_proc["typed_config"]["failure_mode_allow"] = True
    fail_open = tmp_path / "envoy.yaml"
    fail_open.write_text(yaml.safe_dump(doc))
    result = run("check", str(EXAMPLE_CONFIG), "--envoy", str(fail_open))
    assert result.returncode != 0
    assert "failure_mode_allow" in result.stdout + result.stderr


def test_check_names_file_and_line_of_a_mistyped_attribute(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    policy = tmp_path / "policies" / "access.yaml"
    text = policy.read_text()
    policy.write_text(text.replace("subject.tenant in ['alice', 'bob']",
                                   "subject.tennant in ['alice', 'bob']"))
    line = 1 + text[:text.index("subject.tenant in ['alice', 'bob']")].count("\n")
    result = run("check", str(config))
    assert result.returncode != 0
    assert f"{policy}:{line}" in result.stdout + result.stderr
    assert "tennant" in result.stdout + result.stderr


def test_policy_test_runs_the_example_cases() -> None:
    result = run("policy", "test", str(EXAMPLE_CONFIG.parent / "policies" / "tests"))
    assert result.returncode == 0, result.stdout
    assert "0 failed" in result.stdout and "policies matched: 25/25" in result.stdout
