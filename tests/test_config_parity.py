"""What check says and what serve and reloads do, kept in step: a ledger path or Unix
socket serve could not use, a key given twice, and values of the wrong type."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.config import ConfigError
from atp_extproc.server import ConfigHolder, ServeOptions, StartupError, check_listen
from atp_extproc.store import sqlite as ledger_db

pytestmark = pytest.mark.usefixtures("keep_root_log_level")

# server: is line 1, ledger: line 6, routes: line 7.
CONFIG = """server: {listen: 127.0.0.1:50051}
auth: {anonymous_tenant: anon}
models:
  - {name: small, cluster: c, upstream_model: u, price: {input_per_1k: 0.001, output_per_1k: 0}}
  - {name: large, cluster: c, upstream_model: v, price: {input_per_1k: 0.01, output_per_1k: 0}}
ledger: {path: ledger.sqlite3}
routes:
  - name: chat
    aliases:
      gpt-4o-mini: [small, large]
    default: gpt-4o-mini
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    return path


def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, list[str]]:
    code = cli.main(["check", str(path)])
    return code, capsys.readouterr().out.splitlines()


# -- 1. a ledger or socket path serve could not use -------------------------------------


def with_ledger(ledger: Path | str) -> str:
    return CONFIG.replace("ledger: {path: ledger.sqlite3}", f"ledger: {{path: '{ledger}'}}")


def with_listen(listen: str) -> str:
    return CONFIG.replace("listen: 127.0.0.1:50051", f"listen: '{listen}'")


@pytest.mark.parametrize("below", ["l.sqlite3", "deeper/still/l.sqlite3"])
def test_check_refuses_a_ledger_below_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             below: str) -> None:
    (tmp_path / "afile").write_text("")
    ledger = tmp_path / "afile" / below
    path = write(tmp_path, with_ledger(ledger))
    assert check(capsys, path) == (1, [
        f"{path}:6: ledger.path: cannot open the ledger {ledger}: {tmp_path / 'afile'} is "
        "not a directory", "1 error(s), 0 warning(s)"])


def test_check_refuses_a_ledger_that_is_no_regular_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /dev/null read as an empty database: check said OK, serve failed (disk I/O error).
    path = write(tmp_path, with_ledger(os.devnull))
    assert check(capsys, path) == (1, [
        f"{path}:6: ledger.path: cannot open the ledger {os.devnull}: not a regular file "
        "(a device or a pipe)", "1 error(s), 0 warning(s)"])


def test_check_refuses_a_ledger_serve_could_not_open(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A file that is no database, or another program's: check said OK, serve refused.
    (tmp_path / "text.sqlite3").write_text("not a database " * 100)
    other = sqlite3.connect(tmp_path / "other.sqlite3")
    other.execute("CREATE TABLE foo (x)")
    other.close()
    for name, reason in (("text.sqlite3", "file is not a database"),
                         ("other.sqlite3", "but no schema_version")):
        path = write(tmp_path, with_ledger(tmp_path / name))
        code, lines = check(capsys, path)
        assert code == 1 and reason in lines[0], lines
    # A ledger ATP wrote passes.
    ledger_db.connect(tmp_path / "ours.sqlite3").close()
    assert check(capsys, write(tmp_path, with_ledger(tmp_path / "ours.sqlite3")))[0] == 0


def test_check_leaves_a_ledger_directory_the_writer_will_make(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_ledger(tmp_path / "new" / "dirs" / "l.sqlite3"))
    code, lines = check(capsys, path)
    assert code == 0, lines
    assert not (tmp_path / "new").exists()   # check makes nothing


def test_a_ledger_behind_a_link_to_a_directory_not_made_yet_is_made_there(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An image's /etc/atp/run -> /var/lib/atp before the volume has it: check said OK and
    # serve failed, as mkdir of the link itself does.
    (tmp_path / "run").symlink_to(tmp_path / "var" / "lib" / "atp")
    (tmp_path / "file-link").symlink_to(tmp_path / "missing" / "l.sqlite3")
    for ledger in (tmp_path / "run" / "l.sqlite3", tmp_path / "file-link"):
        assert check(capsys, write(tmp_path, with_ledger(ledger)))[0] == 0
        ledger_db.connect(ledger).close()
    assert (tmp_path / "var" / "lib" / "atp" / "l.sqlite3").is_file()
    assert (tmp_path / "missing" / "l.sqlite3").is_file()
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad").symlink_to(tmp_path / "afile" / "sub")
    code, lines = check(capsys, write(tmp_path, with_ledger(tmp_path / "bad" / "l.sqlite3")))
    assert code == 1 and f"{tmp_path / 'afile'} is not a directory" in lines[0]


@pytest.mark.parametrize("below", ["", "l.sqlite3"])
def test_check_refuses_a_ledger_behind_a_loop_of_links(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], below: str) -> None:
    # check said OK; serve's start failed on "Too many levels of symbolic links".
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    ledger = tmp_path / "a" / below
    path = write(tmp_path, with_ledger(ledger))
    assert check(capsys, path) == (1, [
        f"{path}:6: ledger.path: cannot open the ledger {ledger}: its links lead round in "
        "a loop", "1 error(s), 0 warning(s)"])


@pytest.mark.parametrize(("name", "problem"), [
    ("", "{tmp} exists and is not a socket"),
    ("afile", "{tmp}/afile exists and is not a socket"),
    ("nodir/atp.sock", "the directory {tmp}/nodir does not exist"),
    ("afile/atp.sock", "Not a directory"),
])
def test_check_names_the_socket_serve_could_not_make_as_serve_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, problem: str) -> None:
    (tmp_path / "afile").write_text("")
    listen = f"unix:{tmp_path / name}" if name else f"unix:{tmp_path}"
    reason = f"cannot listen on {listen}: " + problem.format(tmp=tmp_path)
    path = write(tmp_path, with_listen(listen))
    assert check(capsys, path) == (1, [f"{path}:1: server.listen: {reason}",
                                       "1 error(s), 0 warning(s)"])
    with pytest.raises(StartupError) as raised:   # what serve does before it binds
        check_listen(listen)
    assert str(raised.value) == reason


def test_check_takes_a_socket_path_serve_can_bind(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A free path, and a socket left by a process that died (gRPC replaces it).
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(tmp_path / "stale.sock"))
    for name in ("free.sock", "stale.sock"):
        path = write(tmp_path, with_listen(f"unix:{tmp_path / name}"))
        code, lines = check(capsys, path)
        assert code == 0, lines


def test_check_leaves_a_socket_directory_it_may_not_read_to_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # check may run as another user than serve: "Permission denied" refused a valid file.
    path = write(tmp_path, with_listen("unix:/run/atp-private/atp.sock"))
    real_stat = config_mod.os.stat

    def stat(name, *args, **kwargs):
        if str(name).startswith("/run/atp-private"):
            raise PermissionError(13, "Permission denied", str(name))
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(config_mod.os, "stat", stat)
    code, lines = check(capsys, path)
    assert code == 0, lines


def test_a_reload_refuses_a_ledger_path_serve_could_not_open(tmp_path: Path,
                                                            caplog) -> None:
    path = write(tmp_path, CONFIG)
    holder = ConfigHolder(path, config_mod.load(path))
    old = holder.current
    (tmp_path / "afile").write_text("")
    ledger = tmp_path / "afile" / "l.sqlite3"
    path.write_text(with_ledger(ledger))
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("SIGHUP") is False
    assert holder.current is old
    assert (f"{path}: ledger.path: cannot open the ledger {ledger}: {tmp_path / 'afile'} "
            "is not a directory (line 6)") in caplog.text


def test_a_reload_refuses_a_socket_path_serve_could_not_make(tmp_path: Path,
                                                            caplog) -> None:
    path = write(tmp_path, CONFIG)
    holder = ConfigHolder(path, config_mod.load(path))
    path.write_text(with_listen(f"unix:{tmp_path}"))
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("SIGHUP") is False
    assert (f"{path}: server.listen: cannot listen on unix:{tmp_path}: {tmp_path} exists "
            "and is not a socket (line 1)") in caplog.text


def test_a_reload_under_listen_does_not_hold_the_files_listen_to_it(tmp_path: Path) -> None:
    # --listen wins over server.listen: ATP never binds the file's.
    path = write(tmp_path, CONFIG)
    options = ServeOptions(listen=f"unix:{tmp_path / 'atp.sock'}")
    holder = ConfigHolder(path, config_mod.load(path), options)
    path.write_text(with_listen(f"unix:{tmp_path}"))
    assert holder.reload("SIGHUP") is True


# -- 2. a key given twice: named by its path, by serve and reloads too ------------------


DUPLICATE_SERVER = CONFIG + "server:\n  listen: 127.0.0.1:50999\n"
DUPLICATE_ALIAS = CONFIG.replace("      gpt-4o-mini: [small, large]\n",
                                 "      gpt-4o-mini: [small, large]\n      gpt-4o-mini: [large]\n")


@pytest.mark.parametrize(("text", "key", "where"), [
    (DUPLICATE_SERVER, "server", "server"),
    (DUPLICATE_ALIAS, "gpt-4o-mini", "routes[0].aliases.gpt-4o-mini"),
], ids=["top-level", "nested"])
def test_serve_names_a_key_given_twice_by_its_path_as_check_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str,
        where: str) -> None:
    path = write(tmp_path, text)
    (line,) = [n for n, row in enumerate(text.splitlines(), 1) if row.strip().startswith(key)][1:]
    assert check(capsys, path) == (1, [
        f"{path}:{line}: {where}: the key appears twice in this mapping",
        "1 error(s), 0 warning(s)"])
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == ("atp-extproc: invalid config, not starting:\n"
                                       f"{path}: {where}: duplicate key '{key}' (line {line})\n")


def test_every_key_given_twice_is_named_in_the_files_order(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    # The loader meets the top mapping's repeat first; the file gives the alias's first.
    text = DUPLICATE_ALIAS + "server:\n  listen: 127.0.0.1:50999\n"
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, "atp.yaml")
    assert (raised.value.problems, raised.value.lines) == (
        [("routes[0].aliases.gpt-4o-mini", "duplicate key 'gpt-4o-mini'"),
         ("server", "duplicate key 'server'")], [11, 13])
    path = write(tmp_path, text)
    _, lines = check(capsys, path)
    assert [line.split(": ")[0:2] for line in lines[:-1]] == [
        [f"{path}:11", "routes[0].aliases.gpt-4o-mini"], [f"{path}:13", "server"]]


def test_a_reload_names_a_key_given_twice_by_its_path(tmp_path: Path, caplog) -> None:
    path = write(tmp_path, CONFIG)
    holder = ConfigHolder(path, config_mod.load(path))
    path.write_text(DUPLICATE_ALIAS)
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("SIGHUP") is False
    assert (f"{path}: routes[0].aliases.gpt-4o-mini: duplicate key 'gpt-4o-mini' "
            "(line 11)") in caplog.text


# -- 3. a value of the wrong type is refused, not converted ----------------------------


@pytest.mark.parametrize(("old", "new", "where", "reason"), [
    ("listen: 127.0.0.1:50051}", "listen: 127.0.0.1:50051, max_body_bytes: '4194304'}",
     "server.max_body_bytes", "expected an integer, got the string '4194304'"),
    ("listen: 127.0.0.1:50051}", "listen: 127.0.0.1:50051, max_messages: 1_000}",
     "server.max_messages", "expected an integer, got the string '1_000'"),
    ("listen: 127.0.0.1:50051}", "listen: 127.0.0.1:50051, max_tools: true}",
     "server.max_tools", "expected an integer, got true"),
    ("listen: 127.0.0.1:50051}", "listen: 127.0.0.1:50051, grace_period_s: '10s'}",
     "server.grace_period_s", "expected a number, got the string '10s'"),
    ("input_per_1k: 0.001,", "input_per_1k: '0.1',",
     "models[0].price.input_per_1k", "expected a number, got the string '0.1'"),
], ids=["quoted-integer", "underscored-word", "boolean", "word", "quoted-price"])
def test_a_quoted_number_or_a_word_is_no_number(old: str, new: str, where: str,
                                                reason: str) -> None:
    assert old in CONFIG
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(CONFIG.replace(old, new, 1), "atp.yaml")
    assert raised.value.problems == [(where, reason)]


def test_an_integer_is_still_a_number_and_yes_still_a_boolean() -> None:
    text = CONFIG.replace("listen: 127.0.0.1:50051}", "listen: 127.0.0.1:50051, "
                          "grace_period_s: 5}").replace("input_per_1k: 0.001,",
                                                        "input_per_1k: 1,")
    snapshot = config_mod.parse(text + "    restore: yes\n", "atp.yaml")
    assert snapshot.server.grace_period_s == 5.0
    assert snapshot.models["small"].price.input_per_1k == 1.0
    assert snapshot.routes[0].restore is True


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty read-only tmpfs, where the machine lets the tests mount one."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_check_refuses_a_ledger_on_a_read_only_file_system(
        tmp_path: Path, read_only_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # check said OK; serve refused to start (Read-only file system).
    ledger = read_only_dir / "ledger.sqlite3"
    path = write(tmp_path, with_ledger(ledger))
    assert check(capsys, path) == (1, [
        f"{path}:6: ledger.path: cannot open the ledger {ledger}: {read_only_dir} is on a "
        "read-only file system", "1 error(s), 0 warning(s)"])


def test_a_reload_keeps_working_when_the_open_ledgers_volume_went_read_only(
        tmp_path: Path) -> None:
    # ext4 remounts read-only on a disk error: every reload was refused from then on,
    # an incident's new deny policy included, though the ledger in use needs no check.
    from atp_extproc.server import ConfigHolder
    from atp_extproc.store import connect

    mount = tmp_path / "vol"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        connect(mount / "ledger.sqlite3").close()
        path = write(tmp_path, with_ledger(mount / "ledger.sqlite3"))
        holder = ConfigHolder(path, config_mod.load(path))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        path.write_text(path.read_text() + "policies:\n  - {id: sec.block, effect: deny, "
                        "expression: \"subject.tenant == 'anon'\"}\n")
        assert holder.reload("SIGHUP") is True
        assert holder.current.policies is not None
    finally:
        subprocess.run(["umount", str(mount)], check=True)
