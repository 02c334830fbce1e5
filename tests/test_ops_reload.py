"""What a reload applies and what it says needs a restart: the log level is applied; a
restart warning names only what differs from what the process runs with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from atp_extproc import config as config_mod
from atp_extproc.server import ConfigHolder, ServeOptions

pytestmark = pytest.mark.usefixtures("keep_root_log_level")

CONFIG = """
auth: {anonymous_tenant: anon}
models:
  - {name: m, cluster: c, upstream_model: u, price: {input_per_1k: 0.001, output_per_1k: 0}}
  - {name: n, cluster: c, upstream_model: v, price: {input_per_1k: 0.002, output_per_1k: 0}}
routes:
  - {name: r, aliases: {a: [m]}}
server: {listen: '127.0.0.1:50051', log_level: INFO}
ledger: {path: a.sqlite3, baseline: m}
"""




def holder_for(tmp_path: Path, options: ServeOptions | None = None) -> ConfigHolder:
    path = tmp_path / "atp.yaml"
    path.write_text(CONFIG)
    return ConfigHolder(path, config_mod.load(path), options or ServeOptions())


def reload_with(holder: ConfigHolder, caplog: pytest.LogCaptureFixture,
                *edits: tuple[str, str]) -> list[str]:
    """Reload CONFIG with `edits`; the warnings it logs."""
    text = CONFIG
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    holder.path.write_text(text)
    caplog.clear()
    with caplog.at_level("INFO", logger="atp.server"):
        assert holder.reload("SIGHUP")
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


BASELINE = ("baseline: m", "baseline: n")
LEDGER_PATH = ("path: a.sqlite3", "path: b.sqlite3")
LISTEN = ("50051", "50052")


def test_a_reload_applies_a_new_log_level(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    reload_with(holder, caplog, ("log_level: INFO", "log_level: ERROR"))
    assert logging.getLogger().level == logging.ERROR
    assert not logging.getLogger("atp.exchange").isEnabledFor(logging.INFO)
    assert "log level INFO → ERROR" in caplog.text
    reload_with(holder, caplog, ("log_level: INFO", "log_level: DEBUG"))
    assert logging.getLogger().level == logging.DEBUG


def test_a_more_verbose_level_is_said_in_the_log_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    reload_with(holder, caplog, ("log_level: INFO", "log_level: ERROR"))
    caplog.clear()
    holder.path.write_text(CONFIG)  # INFO again: the reload itself must be seen
    assert holder.reload("SIGHUP")
    assert "log level ERROR → INFO" in caplog.text and "config reloaded" in caplog.text


def test_log_level_given_on_the_command_line_wins_over_a_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path, ServeOptions(log_level="DEBUG"))
    logging.getLogger().setLevel(logging.DEBUG)
    reload_with(holder, caplog, ("log_level: INFO", "log_level: ERROR"))
    assert logging.getLogger().level == logging.DEBUG
    assert "server.log_level ERROR not applied: --log-level DEBUG wins" in caplog.text


def test_a_reload_that_changes_only_the_baseline_needs_no_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    assert reload_with(holder, caplog, BASELINE) == []
    assert holder.current.ledger.baseline == "n"   # applied, per request


def test_a_setting_put_back_as_it_started_needs_no_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    (warning,) = reload_with(holder, caplog, LEDGER_PATH)
    assert "ledger.path changed (the file says '" in warning and "b.sqlite3" in warning
    assert warning.endswith("these take effect when ATP restarts")
    assert reload_with(holder, caplog) == []


def test_a_reload_says_once_what_waits_for_a_restart_and_answers_every_sighup(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    (warning,) = reload_with(holder, caplog, LISTEN)
    assert "server.listen changed (the file says '127.0.0.1:50052'" in warning
    assert reload_with(holder, caplog, LISTEN) == []  # the same file: said already
    assert "config reloaded (SIGHUP): unchanged, version" in caplog.text


def test_the_restart_warning_names_what_differs_from_what_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    reload_with(holder, caplog, LEDGER_PATH)
    # The ledger path back as it started, the address changed: only the address waits.
    (warning,) = reload_with(holder, caplog, LISTEN)
    assert ": server.listen changed" in warning
    # Another edit while the address still differs from the one in use: still said.
    (warning,) = reload_with(holder, caplog, LISTEN, BASELINE)
    assert ": server.listen changed" in warning


def test_listen_given_on_the_command_line_makes_server_listen_no_restart_matter(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path, ServeOptions(listen="unix:/run/atp.sock"))
    assert reload_with(holder, caplog, LISTEN) == []


def test_turning_the_ledger_off_needs_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(tmp_path)
    (warning,) = reload_with(holder, caplog,
                             ("ledger: {path: a", "ledger: {enabled: false, path: b"))
    assert ": ledger.enabled changed" in warning
