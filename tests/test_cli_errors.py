"""Bad input to the CLI: one clear message naming the file and the problem, never a
traceback; exit 2 for unusable input (policy test files, report arguments), 1 for a file
`check` refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc.stack import ROOT
from atp_extproc.store import sqlite as db

POLICIES = """policies:
  - id: t.deny_bob
    effect: deny
    expression: subject.tenant == 'bob'
"""
MODELS = """models:
  - name: small
    provider: local
    price: {input_per_1k: 0.001, output_per_1k: 0.002}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The exit code and all output of `atp-extproc *argv` (an exception fails the test)."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ------------------------------------------------------------- atp-extproc policy test


def case_dir(tmp_path: Path, cases: str, head: str = "") -> Path:
    """tests/t.yaml with `cases`, testing ../policies.yaml, models from ../atp.yaml."""
    (tmp_path / "policies.yaml").write_text(POLICIES)
    (tmp_path / "atp.yaml").write_text(MODELS)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "t.yaml").write_text(
        f"policies: [../policies.yaml]\nmodels: ../atp.yaml\n{head}cases:{cases}")
    return tests


@pytest.mark.parametrize(("cases", "line", "problem"), [
    ("\n  - name: x\n    subject: bob\n", 5, "cases[0].subject: must be a mapping"),
    ("\n  - name: x\n    request: chat\n", 5, "cases[0].request: must be a mapping"),
    ("\n  - name: x\n    context: prod\n", 5, "cases[0].context: must be a mapping"),
    ("\n  - name: x\n    candidates: 5\n", 5, "cases[0].candidates: must be a list"),
    ("\n  - name: x\n    expect: denied\n", 5, "cases[0].expect: must be a mapping"),
    ("\n  - name: x\n    expect:\n      decisions: [t.deny_bob]\n", 6,
     "cases[0].expect.decisions: must be a mapping"),
    ("\n  - name: x\n    expect:\n      allowed_candidates: 5\n", 6,
     "cases[0].expect.allowed_candidates: must be a list"),
    ("\n  - just a string\n", 4, "cases[0]: a case must be a mapping"),
    (" 5\n", 3, "cases: must be a list of cases"),
])
def test_policy_test_refuses_a_case_of_the_wrong_shape(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cases: str, line: int,
        problem: str) -> None:
    tests = case_dir(tmp_path, cases)
    code, output = run(capsys, "policy", "test", str(tests))
    assert code == 2, output  # the test file is invalid: not 1, a failing case
    assert f"ERROR {tests / 't.yaml'}:{line}: {problem}\n" in output


def test_a_case_of_the_wrong_shape_does_not_stop_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = case_dir(tmp_path, "\n  - subject: bob\n  - subject: {tenant: bob}\n"
                               "    expect: {denied: t.deny_bob}\n")
    code, output = run(capsys, "policy", "test", str(tests))
    assert code == 2
    assert "cases[0].subject: must be a mapping" in output
    assert "policy tests: 1 passed, 0 failed, 1 load errors" in output


@pytest.mark.parametrize(("settings", "problem"), [
    ("{default: maybe}", "settings.default: Input should be 'allow' or 'deny', got the string "
                          "'maybe'"),
    ("{defualt: deny}", "settings.defualt: Extra inputs are not permitted"),
])
def test_policy_test_names_the_line_of_bad_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: str,
        problem: str) -> None:
    tests = case_dir(tmp_path, " []\n", head=f"settings: {settings}\n")
    code, output = run(capsys, "policy", "test", str(tests))
    assert code == 2
    assert f"ERROR {tests / 't.yaml'}:3: {problem}\n" in output
    assert "validation error" not in output  # pydantic's own multi-line dump


@pytest.mark.parametrize(("models", "line", "problem"), [
    ("- a\n", 1, "must hold a mapping"),
    ("models: 5\n", 1, "models: must be a list"),
    ("models:\n  - name: small\n    price: 5\n", 3, "models[0].price: must be a mapping"),
    ("models:\n  - name: small\n    price: {input_per_1k: null}\n", 3,
     "models[0].price: float() argument"),
    ("models: [\n", 1, "invalid YAML"),
])
def test_policy_test_names_a_bad_models_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], models: str, line: int,
        problem: str) -> None:
    tests = case_dir(tmp_path, "\n  - name: x\n")
    (tmp_path / "atp.yaml").write_text(models)
    code, output = run(capsys, "policy", "test", str(tests))
    assert code == 2, output
    assert f"ERROR {tests / '../atp.yaml'}:{line}: " in output and problem in output


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("t.yaml", b"\xff\xfe\x00", "'utf-8' codec can't decode"),   # a file not UTF-8
    ("nowhere", None, "[Errno 2] No such file or directory"),     # no such directory
])
def test_policy_test_names_what_it_cannot_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name, content, reason) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    target = tmp_path / name if content is None else tmp_path
    code, output = run(capsys, "policy", "test", str(target))
    assert code == 2
    assert f"ERROR {tmp_path / name}: cannot read: {reason}" in output


# ---------------------------------------------------------- atp-extproc report savings


def test_report_savings_names_a_missing_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "atp.yaml"
    code, output = run(capsys, "report", "savings", "--config", str(missing))
    assert code == 2
    assert output.startswith("atp-extproc: no ledger path (give --db, or a valid --config): "
                             f"{missing}: <root>: cannot read: ")


def test_report_savings_names_an_invalid_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "atp.yaml"
    config.write_text("models: [\n")
    code, output = run(capsys, "report", "savings", "--config", str(config))
    assert code == 2
    assert f"{config}: line 1: invalid YAML" in output
    assert output.count("\n") == 1


@pytest.mark.parametrize(("content", "problem"), [
    (b"root:x:0:0:root:/root:/bin/bash\n", "is not a readable ledger: file is not a database"),
    (b"", "is not a readable ledger: no such table: ledger"),  # SQLite, but no ledger
])
def test_report_savings_names_a_file_that_is_no_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
        problem: str) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    code, output = run(capsys, "report", "savings", "--db", str(path))
    assert code == 2
    assert output == f"atp-extproc: {path} {problem}\n"


def test_report_savings_names_a_directory_given_as_the_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run(capsys, "report", "savings", "--db", str(tmp_path))
    assert code == 2
    assert output == f"atp-extproc: {tmp_path} is a directory, not a ledger file\n"


def test_report_savings_refuses_a_pipe_given_as_the_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # SQLite opened the pipe and waited for ever.
    import os

    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    code, output = run(capsys, "report", "savings", "--db", str(fifo))
    assert code == 2
    assert output == (f"atp-extproc: {fifo} is not a regular file (a device or a pipe), "
                      "not a ledger file\n")


@pytest.mark.parametrize(("option", "message"), [
    (("--since", "garbage"), "--since 'garbage': give 24h, 7d, 90m or an ISO date"),
    (("--since", "2026-13-01"), "--since '2026-13-01': give 24h, 7d, 90m or an ISO date"),
    (("--by", "tenant,region"),
     "--by: cannot group by 'region'; choose from tenant, route, model"),
    (("--by", "tenant,route,tenant"), "--by: 'tenant' is given twice"),
])
def test_report_savings_names_a_bad_argument(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: tuple[str, str],
        message: str) -> None:
    ledger = tmp_path / "ledger.db"
    db.connect(ledger).close()
    code, output = run(capsys, "report", "savings", "--db", str(ledger), *option)
    assert code == 2
    assert output == f"atp-extproc: {message}\n"


def test_report_savings_still_reads_a_good_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = tmp_path / "ledger.db"
    db.connect(ledger).close()
    code, output = run(capsys, "report", "savings", "--db", str(ledger), "--since", "7d")
    assert code == 0
    assert output == f"no ledger rows in {ledger} for that period\n\n"


# ----------------------------------------------------------------- atp-extproc check


@pytest.mark.parametrize(("content", "problem"), [
    ("", ": the file must hold a mapping (server:, models:, routes:, ...)"),
    ("# only a comment\n", ": the file must hold a mapping (server:, models:, routes:, ...)"),
    (POLICIES + "server: {}\n", ":1: routes: Field required"),  # more than policies
])
def test_check_does_not_call_a_file_that_is_no_config_ok(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
        problem: str) -> None:
    path = tmp_path / "atp.yaml"
    path.write_text(content)
    code, output = run(capsys, "check", str(path))
    assert code == 1
    assert f"{path}{problem}" in output
    assert "OK" not in output and "0 error(s)" not in output


def test_check_still_names_the_line_of_a_policy_problem_in_a_file_that_is_no_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "atp.yaml"
    path.write_text(POLICIES.replace("subject.tenant", "subject.tennant") + "server: {}\n")
    code, output = run(capsys, "check", str(path))
    assert code == 1
    assert f"{path}:4: t.deny_bob: unknown attribute subject.tennant" in output
    assert "OK" not in output


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    # `atp-extproc check ... | head` ended in a BrokenPipeError traceback.
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "atp_extproc", "policy", "test",
         str(ROOT / "examples" / "policies" / "tests")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err



@pytest.mark.parametrize("command", ["check", "report"])
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(
        tmp_path: Path, command: str) -> None:
    # `> /dev/full` (a full disk) ended in an OSError traceback.
    import subprocess
    import sys

    from atp_extproc.store import AsyncLedger, LedgerEntry, PriceSnapshot

    argv = ["check", "examples/atp.yaml"]
    if command == "report":
        db = tmp_path / "ledger.sqlite3"
        ledger = AsyncLedger(db, start=False)
        ledger.record(LedgerEntry(ts=1_767_225_600, tenant="t", route="chat", model="m",
                                  price=PriceSnapshot.of("m", 0.001, 0.002), baseline=None,
                                  input_tokens=10, output_tokens=1))
        ledger.close()
        argv = ["report", "savings", "--db", str(db)]
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "atp_extproc", *argv], stdout=full,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.decode().strip() == \
        "atp-extproc: cannot write the output: No space left on device"


def test_an_envoy_config_that_is_no_yaml_is_reported_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # With auth.jwt set, the jwt_authn check reported the YAML error a second time.
    envoy = tmp_path / "envoy.yaml"
    envoy.write_text("server: [\n")
    code, output = run(capsys, "check", str(ROOT / "examples" / "atp.yaml"),
                       "--envoy", str(envoy))
    assert code == 1
    assert output.count("invalid YAML") == 1 and "1 error(s)" in output


def test_a_policy_file_checked_alone_warns_of_a_class_that_is_not_built_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Alone it passed silently, and failed the deploy once atp.yaml included it.
    path = tmp_path / "pol.yaml"
    path.write_text("policies:\n  - id: pii.redact_mail\n    owner: a@b.c\n"
                    "    effect: redact\n    data_classes: [emial]\n"
                    "    expression: resource.egress == 'external'\n")
    code, output = run(capsys, "check", str(path))
    assert code == 0
    assert (f"{path}:5: warning: pii.redact_mail: 'emial' is not a built-in data class"
            in output)


def test_serve_in_process_leaves_the_signal_handlers_as_it_found_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # It left SIGHUP ignored: every process started afterwards inherited that, and a
    # later test's stack then ignored the SIGHUP meant to stop it.
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM,
                                                      signal.SIGINT)}
    path = tmp_path / "atp.yaml"
    path.write_text("models: [\n")
    code, _ = run(capsys, "serve", "--config", str(path))
    assert code == 2
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_config_that_is_no_regular_file_is_refused_as_such(
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    # A pipe gave its text to the first of the reads (`check <(envsubst < atp.yaml)`):
    # the next found nothing and said "the file must hold a mapping", as a device does;
    # a FIFO without a writer blocked check for good.
    argv = [command, os.devnull] if command == "check" else [command, "--config", os.devnull]
    code, output = run(capsys, *argv)
    assert code == (1 if command == "check" else 2)
    assert f"{os.devnull}: " in output and "not a regular file (a pipe" in output


@pytest.mark.parametrize("argv", [
    ["check", "{long}"], ["serve", "--config", "{long}"],
    ["report", "savings", "--config", "{long}"], ["report", "savings", "--db", "{long}"],
    ["policy", "test", "{long}"]])
def test_a_path_that_cannot_be_looked_up_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]) -> None:
    # Path.exists() raises where a path cannot be looked up (a name too long, a
    # directory not ours to search): each of these printed a traceback.
    long = str(tmp_path / ("x" * 300 + ".yaml"))
    code, output = run(capsys, *[a.replace("{long}", long) for a in argv])
    assert code in (1, 2) and "Traceback" not in output
    assert "File name too long" in output and len(output.strip().splitlines()) <= 2


def test_a_stack_workdir_that_is_a_file_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    code, output = run(capsys, "stack", "--workdir", str(tmp_path / "afile"))
    assert code == 1 and output.strip() == f"atp-extproc: File exists: {tmp_path / 'afile'}"
