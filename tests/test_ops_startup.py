"""`atp-extproc serve` starting up: where it cannot listen it says so in one line (no
traceback, no second ATP on a live socket), and signals during start-up end it cleanly
or, for SIGHUP, not at all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.server import StartupError, bind, check_listen
from atp_extproc.stack import free_port, grpc_serving, wait_until
from tests.conftest import MINIMAL_CONFIG

CONFIG = MINIMAL_CONFIG + "ledger: {enabled: false}\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "atp.yaml"
    path.write_text(CONFIG)
    return path


def serve(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "atp_extproc", "serve", "--config",
                             str(config), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def serve_briefly(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to refuse to start (the timeout fails the test if not)."""
    return subprocess.run([sys.executable, "-m", "atp_extproc", "serve", "--config",
                           str(config), *args], capture_output=True, text=True, timeout=60)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


@pytest.fixture
def listening_unix(tmp_path: Path) -> Iterator[Path]:
    """A socket path something accepts connections on."""
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        yield path


def stale_socket(path: Path) -> Path:
    """A socket file nothing accepts on any more, as a killed process leaves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    return path


# ------------------------------------------------------------ server.listen, validated


@pytest.mark.parametrize(("listen", "problem"), [
    ("nonsense", "give host:port, [IPv6]:port or unix:/path/to.sock"),
    ("127.0.0.1", "give host:port"),
    ("127.0.0.1:http", "the port 'http' is not a number from 1 to 65535"),
    ("127.0.0.1:0", "the port '0' is not a number from 1 to 65535"),
    ("127.0.0.1:65536", "the port '65536' is not a number from 1 to 65535"),
    ("[::1]", "no port after the IPv6 address: give [::1]:PORT (e.g. [::1]:50051)"),
    (":50051", "no host before the port"),
    ("::1:50051", "an IPv6 address goes in brackets"),
    # A URL's scheme was read as an IPv6 address without brackets.
    ("tcp://0.0.0.0:50051", "takes no scheme (tcp://)"),
    ("http://127.0.0.1:50051", "takes no scheme (http://)"),
    ("[::g]:50051", "[::g] is not an IPv6 address"),
    ("atp host:50051", "'atp host' is not a host name or IP address"),
    ("unix:", "no socket path after unix:"),
    ("unix://run/atp.sock", "unix:// takes an absolute path"),
    ("unix:/" + "a" * 107, "a Unix socket path holds at most 107"),
])
def test_check_refuses_a_listen_address_grpc_cannot_bind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str,
        problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        config_mod.Server(listen=listen)
    assert problem in str(raised.value)
    path = tmp_path / "atp.yaml"
    path.write_text(CONFIG + f"server: {{listen: '{listen}'}}\n")
    assert cli.main(["check", str(path)]) == 1
    line, tally = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{path}:7: server.listen: {listen!r}: ") and problem in line
    assert tally == "1 error(s), 0 warning(s)"


@pytest.mark.parametrize("listen", [
    "127.0.0.1:50051", "localhost:1", "atp-0.atp.svc.cluster.local:65535", "0.0.0.0:80",
    "[::]:50051", "[::1]:50051", "unix:/var/run/atp/atp.sock", "unix:atp.sock",
    "unix:///var/run/atp/atp.sock"])
def test_every_address_form_grpc_binds_is_accepted(listen: str) -> None:
    assert config_mod.Server(listen=listen).listen == listen


# --------------------------------------------------------------- where ATP cannot listen


def test_a_unix_socket_a_live_process_accepts_on_is_refused(listening_unix: Path) -> None:
    inode = listening_unix.stat().st_ino
    with pytest.raises(StartupError, match="already in use"):
        check_listen(f"unix:{listening_unix}")
    assert listening_unix.stat().st_ino == inode   # left alone


def test_a_stale_unix_socket_does_not_block_the_start(tmp_path: Path) -> None:
    check_listen(f"unix:{stale_socket(tmp_path / 'atp.sock')}")
    check_listen(f"unix://{tmp_path / 'atp.sock'}")


def test_a_stale_socket_atp_may_not_remove_is_said_so(tmp_path: Path, monkeypatch) -> None:
    # Another user's, in a sticky directory: gRPC said "Address already in use" in a
    # line of its own, and ATP's line no more.
    import os

    sock = stale_socket(tmp_path / "atp.sock")

    def refused(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(StartupError, match="a socket file a stopped process left is there, "
                                           "and ATP cannot remove it: Operation not permitted"):
        check_listen(f"unix:{sock}")


def test_a_dangling_link_at_the_socket_path_is_said_so(tmp_path: Path) -> None:
    link = tmp_path / "atp.sock"
    link.symlink_to(tmp_path / "gone" / "atp.sock")
    with pytest.raises(StartupError, match=r"is a symbolic link to .*gone/atp\.sock, which "
                                           "does not exist"):
        check_listen(f"unix:{link}")


@pytest.mark.parametrize(("name", "problem"), [
    ("nodir/atp.sock", "the directory {tmp}/nodir does not exist"),
    ("file", "{tmp}/file exists and is not a socket"),
    ("file/atp.sock", "Not a directory"),
])
def test_a_socket_path_that_cannot_be_bound_is_named(tmp_path: Path, name: str,
                                                     problem: str) -> None:
    (tmp_path / "file").write_text("")
    listen = f"unix:{tmp_path / name}"
    with pytest.raises(StartupError) as raised:
        check_listen(listen)
    assert str(raised.value) == f"cannot listen on {listen}: " + problem.format(tmp=tmp_path)


def test_a_directory_that_takes_no_socket_is_not_called_missing() -> None:
    with pytest.raises(StartupError) as raised:
        check_listen("unix:/proc/atp.sock")
    assert "does not exist" not in str(raised.value)


def test_a_free_socket_path_is_left_for_grpc(tmp_path: Path) -> None:
    check_listen(f"unix:{tmp_path / 'atp.sock'}")
    assert not (tmp_path / "atp.sock").exists()   # the probe's own file is gone


def test_a_tcp_port_in_use_is_named() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(StartupError) as raised:
            check_listen(listen)
    assert str(raised.value) == f"cannot listen on {listen}: Address already in use"


def test_a_host_that_does_not_resolve_is_named() -> None:
    with pytest.raises(StartupError, match=r"cannot listen on nowhere\.invalid:50051: "
                                           r"cannot resolve nowhere\.invalid"):
        check_listen("nowhere.invalid:50051")


class _RefusingServer:
    """What current grpcio does where it cannot bind: raise, where it once returned 0."""

    def add_insecure_port(self, address: str) -> int:
        raise RuntimeError(f"Failed to bind to address {address}")


def test_a_bind_grpc_refuses_after_the_check_is_a_startup_error() -> None:
    listen = f"127.0.0.1:{free_port()}"
    with pytest.raises(StartupError, match=f"cannot listen on {listen}: Failed to bind"):
        bind(_RefusingServer(), listen)  # type: ignore[arg-type]


# ------------------------------------------------------- the same, from `serve` itself


def test_a_second_atp_refuses_the_socket_a_live_one_listens_on(tmp_path: Path,
                                                               config: Path) -> None:
    sock = tmp_path / "atp.sock"
    first = serve(config, "--listen", f"unix:{sock}")
    try:
        wait_until(lambda: grpc_serving(f"unix:{sock}"), "the first ATP", proc=first)
        inode = sock.stat().st_ino
        second = serve_briefly(config, "--listen", f"unix:{sock}")
        assert second.returncode == 1
        assert second.stderr == (f"atp-extproc: not starting: cannot listen on unix:{sock}: "
                                 "already in use: another process accepts connections on "
                                 "this socket\n")
        assert sock.stat().st_ino == inode and grpc_serving(f"unix:{sock}")
    finally:
        assert stop(first)[0] == 0


def test_atp_starts_over_a_stale_socket(tmp_path: Path, config: Path) -> None:
    sock = stale_socket(tmp_path / "atp.sock")
    proc = serve(config, "--listen", f"unix:{sock}")
    try:
        wait_until(lambda: grpc_serving(f"unix:{sock}"), "ATP over a stale socket", proc=proc)
    finally:
        assert stop(proc)[0] == 0


def test_serve_names_a_port_in_use_in_one_line(config: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        result = serve_briefly(config, "--listen", listen)
    assert result.returncode == 1
    assert result.stderr == (f"atp-extproc: not starting: cannot listen on {listen}: "
                             "Address already in use\n")


def test_serve_names_a_missing_socket_directory_in_one_line(tmp_path: Path,
                                                            config: Path) -> None:
    listen = f"unix:{tmp_path / 'nodir' / 'atp.sock'}"
    result = serve_briefly(config, "--listen", listen)
    assert result.returncode == 1
    assert result.stderr == (f"atp-extproc: not starting: cannot listen on {listen}: the "
                             f"directory {tmp_path / 'nodir'} does not exist\n")


def test_serve_refuses_a_listen_option_that_is_no_address(config: Path) -> None:
    result = serve_briefly(config, "--listen", "nonsense")
    assert result.returncode == 2
    assert result.stderr == ("atp-extproc: --listen 'nonsense': give host:port, "
                             "[IPv6]:port or unix:/path/to.sock\n")


# --------------------------------------------------------- signals during start-up


def starting_up(proc: subprocess.Popen[str]) -> bool:
    """Whether ATP is loading its config modules (pydantic's extension is mapped): well
    into start-up, and long before the server's loop handles signals."""
    return "_pydantic_core" in Path(f"/proc/{proc.pid}/maps").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_is_a_clean_exit(config: Path,
                                                       sig: signal.Signals) -> None:
    proc = serve(config, "--listen", f"127.0.0.1:{free_port()}")
    wait_until(lambda: starting_up(proc), "start-up", proc=proc)
    proc.send_signal(sig)
    code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err and '"msg":"stopped"' in err.splitlines()[-1]


def test_sighup_during_start_up_does_not_end_atp(config: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    proc = serve(config, "--listen", listen)
    try:
        wait_until(lambda: starting_up(proc), "start-up", proc=proc)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: grpc_serving(listen), "ATP serving after SIGHUP", proc=proc)
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_a_config_broken_while_serve_starts_is_exit_2_in_one_message(
        config: Path, monkeypatch, capsys) -> None:
    # serve reads the file twice at start; an edit between the two was a traceback and
    # exit 1 rather than "invalid config", exit 2.
    from atp_extproc import config as config_mod
    from atp_extproc import logs

    # (Pointed at the test's stderr for the rest of the session, logs would outlive it.)
    monkeypatch.setattr(logs, "setup", lambda level: None)

    load = config_mod.load
    calls: list[Path] = []

    def load_then_break(path):
        calls.append(path)
        if len(calls) > 1:
            raise config_mod.ConfigError(str(path), [("", "invalid YAML")], [1])
        return load(path)

    monkeypatch.setattr(config_mod, "load", load_then_break)
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atp-extproc: invalid config, not starting:\n")
    assert "invalid YAML" in err and "Traceback" not in err


def test_once_stopped_serve_leaves_late_signals_ignored(config: Path) -> None:
    # The loop's close gave each signal its default action back: a SIGHUP (or a second
    # SIGTERM) in the last milliseconds before exit ended ATP by that signal, not with 0.
    import asyncio
    import os
    import threading

    from atp_extproc import logs
    from atp_extproc.server import ServeOptions
    from atp_extproc.server import serve as serve_in_process

    listen = f"127.0.0.1:{free_port()}"
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT,
                                                    signal.SIGHUP)}

    def stop_when_serving() -> None:
        wait_until(lambda: grpc_serving(listen), "ATP serving", timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_serving)
    try:
        stopper.start()
        with open(os.devnull, "wb") as sink, logs.redirected("ERROR", sink):
            code = asyncio.run(serve_in_process(config, ServeOptions(listen=listen)))
        assert code == 0
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in saved)
    finally:
        stopper.join(30)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_socket_atp_may_not_connect_to_is_not_taken_for_a_stale_one(
        tmp_path: Path, monkeypatch) -> None:
    # Another user's live socket answered EACCES: read as stale, ATP tried to remove it.
    sock = stale_socket(tmp_path / "atp.sock")

    def refused(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refused)
    import os

    with monkeypatch.context() as kept:
        kept.setattr(os, "unlink", lambda *a, **k: refused(None, None))
        with pytest.raises(StartupError, match="may neither connect to the socket there "
                                               "to see whether it is in use nor remove it"):
            check_listen(f"unix:{sock}")
    assert sock.exists()
    check_listen(f"unix:{sock}")  # ATP may remove it (its own directory): as gRPC would
    assert not sock.exists()
