"""server.py without a stack: reload survives any fault, the include glob, gRPC limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atp_extproc import config as config_mod
from atp_extproc.server import ConfigHolder, grpc_server_options

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
auth: {anonymous_tenant: anon}
models:
  - {name: m, cluster: c, upstream_model: u, price: {input_per_1k: 0.001, output_per_1k: 0}}
routes:
  - {name: r, aliases: {a: [m]}}
server: {reload_poll_s: 0.05}
"""
UNHASHABLE_KEY = GOOD.replace("aliases: {a: [m]}", "aliases: {? [a, b] : [m]}")


def holder_for(tmp_path: Path, text: str = GOOD) -> ConfigHolder:
    path = tmp_path / "atp.yaml"
    path.write_text(text)
    return ConfigHolder(path, config_mod.load(path))


def test_reload_of_an_unhashable_key_keeps_the_old_snapshot(tmp_path: Path) -> None:
    holder = holder_for(tmp_path)
    old = holder.current
    holder.path.write_text(UNHASHABLE_KEY)
    assert holder.reload("SIGHUP") is False
    assert holder.current is old


def test_reload_survives_any_fault_of_the_loader(tmp_path: Path, monkeypatch,
                                                 caplog) -> None:
    holder = holder_for(tmp_path)
    old = holder.current

    def broken(path: object) -> config_mod.Snapshot:
        raise TypeError("a loader bug")

    monkeypatch.setattr(config_mod, "load", broken)
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("SIGHUP") is False
    assert holder.current is old
    assert any("keeping version" in r.getMessage() and r.exc_info for r in caplog.records)


async def _reloaded_to_anon2(holder: ConfigHolder) -> None:
    """The watch loads the edit that names anon2 within 5 s."""
    for _ in range(100):
        await asyncio.sleep(0.05)
        if holder.current.auth.anonymous_tenant == "anon2":
            break
    assert holder.current.auth.anonymous_tenant == "anon2"


@pytest.mark.asyncio
async def test_watch_outlives_a_bad_file_and_loads_the_fix(tmp_path: Path) -> None:
    holder = holder_for(tmp_path)
    watcher = asyncio.create_task(holder.watch())
    try:
        holder.path.write_text(UNHASHABLE_KEY)
        await asyncio.sleep(0.3)
        assert not watcher.done()
        holder.path.write_text(GOOD.replace("anon}", "anon2}"))
        await _reloaded_to_anon2(holder)
    finally:
        watcher.cancel()


@pytest.mark.asyncio
async def test_a_file_written_without_pause_is_loaded_once_it_stops(tmp_path: Path,
                                                                   monkeypatch) -> None:
    # A file an include glob matches, rewritten every few milliseconds: every poll loaded
    # the config (three times over, as it never settled), on the event loop.
    (tmp_path / "policies").mkdir()
    data = tmp_path / "policies" / "data.yaml"
    data.write_text("policies: []\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    loads: list[object] = []
    load = config_mod.load
    monkeypatch.setattr(config_mod, "load", lambda path: loads.append(path) or load(path))
    watcher = asyncio.create_task(holder.watch())
    try:
        for i in range(40):  # written every 10 ms; polled every 50 ms
            data.write_text(f"policies: []\n# {i}\n")
            await asyncio.sleep(0.01)
        assert loads == []
        for _ in range(100):
            await asyncio.sleep(0.05)
            if holder._file_stamp() == holder._stamp:
                break
        assert holder._file_stamp() == holder._stamp and len(loads) == 1
    finally:
        watcher.cancel()


def test_a_new_file_matching_policy_include_is_a_reload(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(
        "policies:\n  - {id: a.x, effect: deny, expression: request.max_tokens > 9000}\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    before = holder._file_stamp()
    (tmp_path / "policies" / "b.yaml").write_text(
        "policies:\n  - {id: b.x, effect: deny, expression: request.stream}\n")
    assert holder._file_stamp() != before
    assert holder.reload("file changed")
    assert [p.id for p in holder.current.policies.policies] == ["a.x", "b.x"]


def test_the_fix_to_a_refused_new_policy_file_is_a_reload(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(
        "policies:\n  - {id: a.x, effect: deny, expression: request.max_tokens > 9000}\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    new = tmp_path / "policies" / "new.yaml"
    new.write_text("policies:\n  - {id: n.x, effect: deny, expression: request.strem}\n")
    assert holder._file_stamp() != holder._stamp
    assert holder.reload("file changed") is False  # a typo: refused, the old set stays
    assert holder._file_stamp() == holder._stamp
    new.write_text("policies:\n  - {id: n.x, effect: deny, expression: request.stream}\n")
    assert holder._file_stamp() != holder._stamp   # the fix is seen, and loads
    assert holder.reload("file changed")
    assert [p.id for p in holder.current.policies.policies] == ["a.x", "n.x"]


@pytest.mark.parametrize("caught", ["", "# tools\n"])
def test_an_included_file_caught_empty_mid_write_keeps_the_old_policies(
        tmp_path: Path, caught: str, caplog) -> None:
    # Editors and `>` redirections truncate a file before they fill it: read in between,
    # it must not load as "no policies" and let through what its denies refused.
    (tmp_path / "policies").mkdir()
    tools = tmp_path / "policies" / "tools.yaml"
    tools.write_text("policies:\n  - {id: t.x, effect: deny, expression: request.stream}\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    old = holder.current
    tools.write_text(caught)
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("file changed") is False
    assert holder.current is old
    assert any("tools.yaml:1: the file is empty" in r.getMessage() for r in caplog.records)
    tools.write_text("policies: []\n")  # no policies, said so
    assert holder.reload("file changed")
    assert holder.current.policies is None


def test_files_swapped_while_a_reload_reads_them_are_read_again(tmp_path: Path,
                                                                monkeypatch) -> None:
    # A Kubernetes ConfigMap update swaps atp.yaml and its policy files at once, through
    # the ..data link; a load reading atp.yaml before the swap and the policies after it
    # put in force a config neither version is (a route without its guard).
    versions = {}
    for name, policy in (("v1", "g.x"), ("v2", "g.y")):
        (tmp_path / name / "policies").mkdir(parents=True)
        (tmp_path / name / "atp.yaml").write_text(
            GOOD + f"policy: {{include: [policies/*.yaml]}}\n# {name}\n")
        (tmp_path / name / "policies" / "gate.yaml").write_text(
            f"policies:\n  - {{id: {policy}, effect: deny, expression: request.stream}}\n")
        versions[name] = tmp_path / name
    data = tmp_path / "..data"
    data.symlink_to(versions["v1"])
    (tmp_path / "atp.yaml").symlink_to("..data/atp.yaml")
    (tmp_path / "policies").symlink_to("..data/policies")
    holder = ConfigHolder.load(tmp_path / "atp.yaml")
    assert [p.id for p in holder.current.policies.policies] == ["g.x"]
    load = config_mod.load
    loads = []

    def load_during_a_swap(path: object) -> config_mod.Snapshot:
        snapshot = load(path)
        if not loads:
            swapped = tmp_path / "..data.new"
            swapped.symlink_to(versions["v2"])
            swapped.replace(data)
        loads.append(snapshot)
        return snapshot

    monkeypatch.setattr(config_mod, "load", load_during_a_swap)
    assert holder.reload("SIGHUP")
    assert len(loads) == 2  # the first read straddled the swap: read again
    assert [p.id for p in holder.current.policies.policies] == ["g.y"]
    assert holder._file_stamp() == holder._stamp  # settled: no further reload


def test_files_that_never_settle_keep_the_old_config_until_the_next_poll(
        tmp_path: Path, monkeypatch, caplog) -> None:
    (tmp_path / "policies").mkdir()
    gate = tmp_path / "policies" / "gate.yaml"
    gate.write_text("policies: []\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    old = holder.current
    load = config_mod.load

    def load_then_edit(path: object) -> config_mod.Snapshot:
        snapshot = load(path)
        gate.write_text(gate.read_text() + "#\n")
        return snapshot

    monkeypatch.setattr(config_mod, "load", load_then_edit)
    with caplog.at_level("ERROR", logger="atp.server"):
        assert holder.reload("file changed") is False
    assert holder.current is old
    # Named, with what follows: it said "atp.yaml: <root>: the files changed".
    assert any(f"atp.yaml: {gate}: changed while ATP read the config, 3 times in a row"
               in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(config_mod, "load", load)
    assert holder._file_stamp() != holder._stamp  # the next poll tries again
    assert holder.reload("file changed")


def test_grpc_takes_messages_well_past_any_envoy_buffer() -> None:
    # A limit just above Envoy's buffer cut answers it sent STREAMED in one message (what
    # it queued while ATP answered the response headers), and the client got a 413.
    options = dict(grpc_server_options())
    largest = config_mod.Server.model_fields["max_body_bytes"].metadata[-1].le
    for name in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        assert options[name] == 2 * config_mod.envoy_buffer_limit(largest) == 256 << 20


def test_a_reload_says_which_changes_need_a_restart(tmp_path: Path, caplog) -> None:
    holder = holder_for(tmp_path, GOOD + "ledger: {path: a.sqlite3}\n")
    holder.path.write_text(GOOD.replace("reload_poll_s: 0.05", "reload_poll_s: 0.05, "
                                        "listen: '127.0.0.1:50099'")
                           + "ledger: {path: b.sqlite3}\n")
    with caplog.at_level("WARNING", logger="atp.server"):
        assert holder.reload("SIGHUP")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "server.listen changed (the file says '127.0.0.1:50099', ATP runs with " \
        "'127.0.0.1:50051'); ledger.path changed" in warning and "restart" in warning


def test_an_edit_that_keeps_size_and_mtime_is_a_reload(tmp_path: Path) -> None:
    # `cp -p`, `touch -r` or an archive keep the mtime; the same length kept the size.
    import os

    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "a.yaml"
    policy.write_text(
        "policies:\n  - {id: a.x, effect: deny, expression: subject.tenant == 'bob'}\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    before, st = holder._file_stamp(), policy.stat()
    policy.write_text(policy.read_text().replace("'bob'", "'eve'"))
    os.utime(policy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert holder._file_stamp() != before


def test_a_file_two_include_globs_match_is_read_once(tmp_path: Path) -> None:
    # Read twice, its policies were refused as duplicates of themselves.
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "critical.yaml").write_text(
        "policies:\n  - {id: a.x, effect: deny, expression: request.stream}\n")
    path = tmp_path / "atp.yaml"
    path.write_text(GOOD + "policy: {include: [p/*.yaml, ./p/critical.yaml]}\n")
    assert [p.id for p in config_mod.load(path).policies.policies] == ["a.x"]


def test_a_reload_names_the_policies_it_removes_and_adds(tmp_path: Path, caplog) -> None:
    # A policy file deleted dropped its denies with only "version X → Y" in the log.
    (tmp_path / "policies").mkdir()
    gate = tmp_path / "policies" / "gate.yaml"
    gate.write_text("policies:\n  - {id: g.x, effect: deny, expression: request.stream}\n")
    holder = holder_for(tmp_path, GOOD + "policy: {include: [policies/*.yaml]}\n")
    gate.unlink()
    (tmp_path / "policies" / "new.yaml").write_text(
        "policies:\n  - {id: g.y, effect: deny, expression: request.stream}\n")
    with caplog.at_level("INFO", logger="atp.server"):
        assert holder.reload("file changed")
    (line,) = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert line.endswith("; policies removed: g.x; policies added: g.y")


def test_a_reload_leaves_the_event_loop_serving(tmp_path: Path) -> None:
    # Parsed on the event loop, an unchanged 550 KB config (5,000 models) held every
    # request for 6.6 s at each SIGHUP.
    models = "".join(f"  - {{name: m{i}, cluster: c{i}, upstream_model: u, price: "
                     f"{{input_per_1k: 0.001, output_per_1k: 0}}}}\n" for i in range(800))
    text = GOOD.replace("models:\n", "models:\n" + models)
    holder = holder_for(tmp_path, text)
    holder.path.write_text(text.replace("reload_poll_s: 0.05", "reload_poll_s: 0.06"))

    async def reload_while_ticking() -> tuple[int, int]:
        ticks = 0
        task = asyncio.create_task(holder.reload_off_loop("SIGHUP"))
        while not task.done():
            await asyncio.sleep(0)
            ticks += 1
        await task
        return ticks, holder.current.server.reload_poll_s

    # Run on the loop, the reload would be one step of the task: a tick or two.
    ticks, poll = asyncio.run(reload_while_ticking())
    assert poll == 0.06 and ticks > 20



def test_a_config_that_is_a_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Stamped before it was read, the FIFO blocked serve's start (and a reload's thread
    # for good once atp.yaml became one, and the exit with it).
    import os
    import threading

    fifo = tmp_path / "atp.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            ConfigHolder.load(fifo)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    assert outcome and isinstance(outcome[0], config_mod.ConfigError), outcome
    assert "not a regular file" in str(outcome[0])


@pytest.mark.asyncio
async def test_a_shorter_poll_interval_applies_at_its_reload(tmp_path: Path) -> None:
    # The watch slept out the old interval (120 s) before it looked again: an edit
    # after the reload that shortened it waited that long.
    holder = holder_for(tmp_path, GOOD.replace("reload_poll_s: 0.05", "reload_poll_s: 120"))
    watcher = asyncio.create_task(holder.watch())
    try:
        await asyncio.sleep(0.05)  # the watch is asleep in its first interval
        holder.path.write_text(GOOD)
        assert await holder.reload_off_loop("SIGHUP") is None
        assert holder.current.server.reload_poll_s == 0.05
        holder.path.write_text(GOOD.replace("anon}", "anon2}"))
        await _reloaded_to_anon2(holder)  # within 5 s, where the old interval was 120 s
    finally:
        watcher.cancel()


@pytest.mark.asyncio
async def test_reloads_still_queued_when_atp_stops_are_skipped(tmp_path: Path,
                                                             monkeypatch) -> None:
    # A burst of SIGHUPs ran every queued reload after SIGTERM: the exit and the
    # ledger's last flush waited for all of them.
    holder = holder_for(tmp_path)
    loads: list[object] = []
    load = config_mod.load
    monkeypatch.setattr(config_mod, "load", lambda path: loads.append(path) or load(path))
    holder.stopped = True
    await asyncio.gather(*(holder.reload_off_loop("SIGHUP") for _ in range(5)))
    assert loads == []
