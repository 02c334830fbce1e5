"""The atp-extproc commands a platform team runs before deploying."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from atp_extproc import cli
from atp_extproc.stack import (
    DEFAULT_PORTS,
    EXAMPLE_CONFIG,
    FRONT_PROXY,
    copy_example,
    free_port,
    wait_until,
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atp_extproc", *args], capture_output=True,
                          text=True, timeout=120)


def test_check_passes_the_shipped_config_and_envoy() -> None:
    result = run("check", str(EXAMPLE_CONFIG), "--envoy", str(FRONT_PROXY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"OK \(version \w+, \d+ models, \d+ routes, \d+ policies\)", result.stdout)


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
    assert ": OK (version" not in result.stdout  # refused, so not OK


def test_check_names_file_and_line_of_a_mistyped_attribute(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    policy = tmp_path / "policies" / "access.yaml"
    text = policy.read_text()
    policy.write_text(text.replace("subject.tenant in ['alice', 'bob']",
                                   "subject.tennant in ['alice', 'bob']"))
    line = 1 + text[:text.index("subject.tenant in ['alice', 'bob']")].count("\n")
    result = run("check", str(config))
    assert result.returncode != 0
    (problem,) = [p for p in (result.stdout + result.stderr).splitlines() if "tennant" in p]
    assert problem.startswith(f"{policy}:{line}: ")  # named once, with file and line


def test_policy_test_runs_the_example_cases() -> None:
    result = run("policy", "test", str(EXAMPLE_CONFIG.parent / "policies" / "tests"))
    assert result.returncode == 0, result.stdout
    assert "0 failed" in result.stdout and "policies matched: 25/25" in result.stdout


# ------------------------------------------------------------------ atp-extproc stack

# `atp-extproc stack` as `make run PORTS='...'` runs it: every listener moved by --port to
# the free ports in argv[1].
STACK_DRIVER = """
import json, sys
from atp_extproc import cli
ports = json.loads(sys.argv[1])
sys.exit(cli.main(["stack", "--config", sys.argv[2], "--workdir", sys.argv[3],
                   *[f"--port={name}={port}" for name, port in ports.items()]]))
"""


class StackCommand:
    def __init__(self, tmp_path: Path, nohup: bool = False):
        self.ports = {name: free_port() for name in DEFAULT_PORTS}
        self.workdir = tmp_path / "run"
        self.out = tmp_path / "stack.out"
        self.err = tmp_path / "stack.err"
        config = copy_example(tmp_path)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", STACK_DRIVER, json.dumps(self.ports), str(config),
                 str(self.workdir)], stdout=out, stderr=err, start_new_session=True,
                # As nohup starts it: SIGHUP ignored.
                preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
                if nohup else None)

    def wait_up(self) -> None:
        wait_until(lambda: "ATP stack is up" in self.out.read_text(), "stack banner",
                   timeout=60, proc=self.proc)

    def children(self) -> list[int]:
        return _children(self.proc.pid)

    def wait(self, timeout: float = 40) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    wait_until(lambda: not any(_alive(p) for p in pids), f"children {pids} gone",
               timeout=timeout)


@pytest.fixture
def stack_command(tmp_path: Path) -> Iterator[StackCommand]:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    command = StackCommand(tmp_path)
    try:
        yield command
    finally:
        pids = command.children() if command.proc.poll() is None else []
        command.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.integration
def test_stack_prints_where_everything_listens(stack_command: StackCommand) -> None:
    # Aligning the table once read its rows away: make run printed none.
    wait_until(lambda: "Ctrl-C stops everything" in stack_command.out.read_text(),
               "the stack's table", timeout=60, proc=stack_command.proc)
    lines = stack_command.out.read_text().splitlines()
    table = lines[1:lines.index("Try:")]
    assert len(table) == 5, lines
    for port in stack_command.ports.values():
        assert any(f"127.0.0.1:{port}" in line for line in table), (port, table)
    starts = {len(line) - len(line.rsplit("  ", 1)[1]) for line in table}
    assert len(starts) == 1, table  # one column of addresses
    # The command to try names the port Envoy listens on (it named 10000 always).
    assert f"http://127.0.0.1:{stack_command.ports['envoy']}/v1/models" in \
        lines[lines.index("Try:") + 1]


@pytest.mark.parametrize(("ports", "says"), [
    (["envoi=10001"], "--port envoi=...: no such listener; the stack's are envoy, admin, atp"),
    # Envoy on the admin port: the stack started and then failed, or (two demo upstreams
    # on one port) said it was up while one of them had exited.
    (["envoy=9901"], "envoy and admin would listen on one port (9901)"),
    (["demo_a=21004", "demo_b=21004"], "demo_a and demo_b would listen on one port (21004)"),
    (["envoy=21005", "envoy=21006"], "--port envoy=... given twice"),
    (["envoy=\u0661\u0660\u0660\u0660\u0661"], "expected NAME=PORT, PORT 1-65535"),
])
def test_stack_refuses_ports_it_cannot_use(tmp_path: Path, ports: list[str],
                                           says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "atp_extproc", "stack", "--config", str(copy_example(tmp_path)),
         "--workdir", str(tmp_path / "run"), *[f"--port={p}" for p in ports]],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.integration
def test_stack_stops_every_child_on_sighup(stack_command: StackCommand) -> None:
    """Closing the terminal (SIGHUP) stops the stack like Ctrl-C: nothing is orphaned."""
    stack_command.wait_up()
    children = stack_command.children()
    assert len(children) == 4, children  # demo_a, demo_b, ATP, Envoy
    stack_command.proc.send_signal(signal.SIGHUP)
    assert stack_command.wait() == 0, stack_command.stderr()
    _wait_gone(children)


@pytest.mark.integration
def test_stack_under_nohup_keeps_sighup_ignored(tmp_path: Path) -> None:
    """`nohup make run &` must outlive its terminal: the stack takes over SIGINT and
    SIGTERM but leaves an ignored SIGHUP ignored."""
    command = StackCommand(tmp_path, nohup=True)
    try:
        command.wait_up()
        status = Path(f"/proc/{command.proc.pid}/status").read_text()
        ignored = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("SigIgn:")), 16)
        assert ignored & (1 << (signal.SIGHUP - 1))
        command.proc.send_signal(signal.SIGTERM)
        assert command.wait() == 0, command.stderr()
    finally:
        command.kill()


def test_a_stop_signal_is_not_swallowed_by_a_readiness_check() -> None:
    # The checks suppress Exception (a port not open yet); Ctrl-C during start-up must
    # still stop the stack.
    def check() -> bool:
        raise cli._StopSignal(signal.SIGINT)

    with pytest.raises(cli._StopSignal):
        wait_until(check, "a check interrupted by Ctrl-C", timeout=5)


@pytest.mark.integration
def test_stack_children_die_with_a_killed_stack(stack_command: StackCommand) -> None:
    """Even a SIGKILLed stack process (no handler runs) leaves no child behind."""
    stack_command.wait_up()
    children = stack_command.children()
    assert len(children) == 4, children
    stack_command.proc.kill()
    stack_command.proc.wait()
    _wait_gone(children)


@pytest.mark.integration
def test_stack_names_a_child_that_exits_and_fails(stack_command: StackCommand) -> None:
    stack_command.wait_up()
    children = stack_command.children()
    demo_b = next(pid for pid in children
                  if b"demo_b" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(demo_b, signal.SIGKILL)
    assert stack_command.wait() == 1
    assert "demo_b exited unexpectedly" in stack_command.stderr()
    _wait_gone(children)


def test_stack_shows_why_a_child_failed_to_start(tmp_path: Path) -> None:
    # It said only "atp: process exited with 2; logs in ...": the reason sat in atp.log.
    config = copy_example(tmp_path, EXAMPLE_CONFIG.read_text().replace(
        "input_per_1k: 0.0025", "input_per_1k: -1"))
    ports = {name: free_port() for name in DEFAULT_PORTS}
    # The log is kept across runs: an earlier run's lines were shown first.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "atp.log").write_text("an earlier run's line\n" * 5)
    proc = subprocess.run([sys.executable, "-c", STACK_DRIVER, json.dumps(ports), str(config),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "failed to start: atp: process exited with 2" in proc.stderr
    assert "  atp: " in proc.stderr and "models[1].price.input_per_1k" in proc.stderr
    assert "an earlier run's line" not in proc.stderr


def test_a_second_stop_signal_while_stopping_still_stops_every_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A SIGHUP while the handlers were being set aside raised out of the cleanup: the
    # children were never stopped (on Linux their parent's death did; on macOS nothing).
    from atp_extproc.stack import Stack

    def interrupted(self: Stack) -> None:
        raise cli._StopSignal(signal.SIGINT)

    stopped: list[bool] = []
    monkeypatch.setattr(Stack, "start_all", interrupted)
    monkeypatch.setattr(Stack, "stop_all", lambda self: stopped.append(True))
    real, seconds = signal.signal, []

    def a_second_comes(sig: int, handler):
        previous = real(sig, handler)
        if handler is signal.SIG_IGN and not seconds:
            seconds.append(sig)
            raise cli._StopSignal(signal.SIGHUP)
        return previous

    monkeypatch.setattr(cli.signal, "signal", a_second_comes)
    ports = [f"--port={name}={free_port()}" for name in DEFAULT_PORTS]
    code = cli.main(["stack", "--config", str(copy_example(tmp_path)), "--workdir",
                     str(tmp_path / "run"), *ports])
    assert (code, stopped, len(seconds)) == (0, [True], 1)


def test_stack_refuses_a_busy_port_and_starts_nothing(tmp_path: Path) -> None:
    """A stack still running (here: anything listening on Envoy's port) is named, and no
    second set of processes starts against it: no false "stack is up"."""
    config = copy_example(tmp_path)
    workdir = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {name: free_port() for name in DEFAULT_PORTS} | {"envoy": port}
        result = subprocess.run(
            [sys.executable, "-c", STACK_DRIVER, json.dumps(ports), str(config), str(workdir)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"envoy port {port}" in result.stderr
    assert "ATP stack is up" not in result.stdout
    assert not list(workdir.glob("*.log"))
