"""What reads ATP's files besides the server: a control character in a YAML file is a
problem with its file and line (no traceback); `report savings` reads a ledger in a
directory it may not write; `check` names an unreadable policy file once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.policy.settings import load_yaml
from atp_extproc.server import ConfigHolder, ServeOptions
from atp_extproc.store import AsyncLedger, LedgerEntry, PriceSnapshot
from tests.conftest import MINIMAL_CONFIG

CONFIG = MINIMAL_CONFIG + "ledger: {enabled: false}\npolicy:\n  include: [policies/*.yaml]\n"
CONFIG_LINES = CONFIG.count("\n")
POLICY = "policies:\n  - {id: team.deny_b, effect: deny, expression: 'subject.tenant == \"b\"'}\n"


def write_config(tmp_path: Path, config: str = CONFIG, policy: str = POLICY) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "p.yaml").write_text(policy)
    path = tmp_path / "atp.yaml"
    path.write_text(config)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


# -- a control character in a YAML file ---------------------------------------------

@pytest.mark.parametrize(("text", "line", "reason"), [
    ("a: 1\nb: x\x00\n", 2, "control character U+0000 at column 5"),
    ("a: 1\r\nb: x\x00\n", 2, "control character U+0000 at column 5"),
    # Python's blanks take in a form feed; YAML's do not: its own line is named.
    ("a: 1\n\x0c\n", 2, "control character U+000C at column 1"),
    ("a: \ufffe\n", 1, "character U+FFFE at column 4"),
])
def test_a_character_yaml_refuses_is_a_problem_with_line_and_column(
        text: str, line: int, reason: str) -> None:
    doc, problems = load_yaml(text, "f.yaml")
    assert doc is None
    assert [str(p) for p in problems] == [
        f"f.yaml:{line}: invalid YAML: {reason}; YAML allows none"]


def test_check_names_a_control_character_in_atp_yaml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, CONFIG + "# pasted \x1b[0m\n")
    assert run_cli(capsys, "check", str(path)) == (1, [
        f"{path}:{CONFIG_LINES + 1}: invalid YAML: control character U+001B at column 10; "
        "YAML allows none", "1 error(s), 0 warning(s)"])


def test_check_and_serve_name_a_nul_in_a_policy_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, policy="policies: []\n\x00")
    problem = (f"{tmp_path / 'policies' / 'p.yaml'}:2: invalid YAML: control character "
               "U+0000 at column 1; YAML allows none")
    assert run_cli(capsys, "check", str(path)) == (1, [problem, "1 error(s), 0 warning(s)"])
    assert run_cli(capsys, "serve", "--config", str(path)) == (2, [
        "atp-extproc: invalid config, not starting:", f"{path}: {problem}"])


def test_check_names_a_nul_in_an_envoy_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    envoy = tmp_path / "envoy.yaml"
    envoy.write_text("static_resources: {}\x00\n")
    assert run_cli(capsys, "check", str(path), "--envoy", str(envoy)) == (1, [
        f"{envoy}:1: invalid YAML: control character U+0000 at column 21; YAML allows none",
        "1 error(s), 0 warning(s)"])


def test_policy_test_names_a_nul_in_a_case_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = tmp_path / "a_test.yaml"
    case.write_text("cases: []\x00\n")
    assert run_cli(capsys, "policy", "test", str(tmp_path)) == (2, [
        f"ERROR {case}:1: invalid YAML: control character U+0000 at column 10; "
        "YAML allows none", "policy tests: 0 passed, 0 failed, 1 load errors"])


@pytest.mark.usefixtures("keep_root_log_level")
def test_a_reload_refuses_a_control_character_naming_the_policy_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    holder = ConfigHolder(path, config_mod.load(path), ServeOptions())
    running = holder.current.version
    (tmp_path / "policies" / "p.yaml").write_text(POLICY.replace("policies:", "policies:\x1b"))
    with caplog.at_level("ERROR", logger="atp.server"):
        assert not holder.reload("SIGHUP")
    assert holder.current.version == running
    (record,) = caplog.records
    assert record.exc_info is None  # a rejection, not a fault of the loader
    assert record.getMessage().endswith(
        f"{path}: {tmp_path / 'policies' / 'p.yaml'}:1: invalid YAML: control character "
        "U+001B at column 10; YAML allows none")


# -- report savings on a directory it may not write ----------------------------------

SMALL = PriceSnapshot.of("small", 0.00015, 0.0006)
LEDGER = "ledger.sqlite3"


def record(path: Path, tenant: str) -> AsyncLedger:
    """A writer with `tenant`'s request flushed: to the -wal, until the writer closes."""
    ledger = AsyncLedger(path, start=False)
    ledger.record(LedgerEntry(ts=1_767_225_600, tenant=tenant, route="chat", model="small",
                              price=SMALL, baseline=None, input_tokens=10, output_tokens=1))
    ledger.flush()
    return ledger


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A ledger's directory another user can reach (pytest's tmp_path is its user's
    alone)."""
    directory = Path(tempfile.mkdtemp(prefix="atp-ledger-"))
    yield directory
    directory.chmod(0o755)
    shutil.rmtree(directory)


def report_without_write_access(directory: Path) -> subprocess.CompletedProcess[str]:
    """`report savings` on the ledger in `directory`, by a user who may not write there
    (as on a read-only mount): mode 555 stops every user but root, who reads as nobody."""
    for child in directory.iterdir():
        child.chmod(0o644)
    directory.chmod(0o555)
    as_reader: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("run as root, and no setpriv to read as another user")
        as_reader = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(
        [*as_reader, sys.executable, "-m", "atp_extproc", "report", "savings", "--db",
         str(directory / LEDGER), "--by", "tenant", "--bucket", "total"],
        capture_output=True, text=True, timeout=60, cwd=directory, check=False)


@pytest.mark.parametrize("empty_wal", [False, True])
def test_report_reads_a_ledger_it_may_not_write_beside_once_atp_stopped(
        shared_dir: Path, empty_wal: bool) -> None:
    record(shared_dir / LEDGER, "alice").close()  # a clean stop: no -wal, no -shm
    if empty_wal:
        (shared_dir / f"{LEDGER}-wal").touch()  # left empty: nothing waits in it
    done = report_without_write_access(shared_dir)
    assert (done.returncode, done.stderr) == (0, "")
    assert "alice" in done.stdout


def test_report_refuses_a_ledger_whose_wal_it_cannot_read(shared_dir: Path,
                                                          tmp_path: Path) -> None:
    # ATP's files as a stop without a checkpoint leaves them (a kill, a copy taken while
    # it ran): rows in the -wal, no -shm, which the reader may not create.
    writer = record(tmp_path / LEDGER, "alice")
    try:
        for name in (LEDGER, f"{LEDGER}-wal"):
            shutil.copyfile(tmp_path / name, shared_dir / name)
    finally:
        writer.close()
    assert (shared_dir / f"{LEDGER}-wal").stat().st_size > 0
    done = report_without_write_access(shared_dir)
    assert (done.returncode, done.stdout) == (2, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"atp-extproc: {shared_dir / LEDGER} is not a readable ledger: "
                           f"rows wait in its write-ahead log {LEDGER}-wal")
    assert "make the ledger's directory writable" in line and "stop ATP cleanly" in line


# -- check and an included file it cannot read ---------------------------------------

@pytest.mark.parametrize("make_unreadable", [
    lambda path: path.write_bytes(b"policies: []\n# caf\xe9\n"),
    lambda path: (path.unlink(), path.symlink_to("nowhere")),
], ids=["latin-1", "dangling-symlink"])
def test_check_names_an_unreadable_policy_file_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make_unreadable) -> None:
    path = write_config(tmp_path)
    policy = tmp_path / "policies" / "p.yaml"
    make_unreadable(policy)
    code, lines = run_cli(capsys, "check", str(path))
    assert code == 1
    (problem, tally) = lines
    assert problem.startswith(f"{policy}: cannot read: ")
    assert tally == "1 error(s), 0 warning(s)"


# -- files an include glob matches that cannot be read as policy files -----------------


def test_a_pipe_an_include_glob_matches_is_refused_without_reading_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Read on the event loop, it blocked ATP for good: every request failed, and SIGTERM
    # could not stop it.
    path = write_config(tmp_path)
    holder = ConfigHolder.load(path)
    os.mkfifo(tmp_path / "policies" / "pipe.yaml")
    assert holder.reload("SIGHUP") is False
    code, lines = run_cli(capsys, "check", str(path))
    assert code == 1
    assert f"{tmp_path}/policies/pipe.yaml: not a regular file" in "\n".join(lines)


def test_a_file_name_no_utf8_encodes_is_a_problem_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    holder = ConfigHolder.load(path)
    (tmp_path / "policies" / os.fsdecode(b"bad\xff.yaml")).write_text("policies: []\n")
    assert holder.reload("SIGHUP") is False
    code, lines = run_cli(capsys, "check", str(path))
    assert code == 1
    assert "matches a file whose name is no UTF-8: " in "\n".join(lines)
    assert "bad\\udcff.yaml (rename it)" in "\n".join(lines)
