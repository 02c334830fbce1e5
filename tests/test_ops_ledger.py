"""The ledger file under operations: deleted or replaced while ATP runs, or not openable
at start (named with its path and the OS's reason, no traceback)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from atp_extproc import cli
from atp_extproc.store import AsyncLedger, LedgerEntry, PriceSnapshot, connect, savings
from atp_extproc.store.ledger import LedgerUnavailable
from tests.conftest import MINIMAL_CONFIG

SMALL = PriceSnapshot.of("small", 0.00015, 0.0006)
T0 = 1_767_225_600            # 2026-01-01 00:00 UTC
CONFIG = MINIMAL_CONFIG


def entry(tenant: str) -> LedgerEntry:
    return LedgerEntry(ts=T0, tenant=tenant, route="chat", model="small", price=SMALL,
                       baseline=None, input_tokens=10, output_tokens=1)


def tenants(path: Path) -> dict[str, int]:
    conn = connect(path, readonly=True)
    try:
        return {row.group[0]: row.requests for row in savings(conn, ("tenant",), None)}
    finally:
        conn.close()


def remove_database(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)


@pytest.fixture
def ledger(tmp_path: Path):
    lg = AsyncLedger(tmp_path / "ledger.sqlite3", start=False)
    yield lg
    lg.close()


def test_a_deleted_ledger_file_is_opened_anew_and_keeps_the_flush(
        ledger: AsyncLedger, caplog: pytest.LogCaptureFixture) -> None:
    ledger.record(entry("before"))
    ledger.flush()
    remove_database(ledger.path)
    ledger.record(entry("after"))
    with caplog.at_level("ERROR", logger="atp.ledger"):
        assert ledger.flush() == 1
    assert tenants(ledger.path) == {"after": 1}
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"{ledger.path} was deleted or replaced" in message


def test_a_ledger_file_replaced_by_another_is_written_there(
        tmp_path: Path, ledger: AsyncLedger) -> None:
    ledger.record(entry("before"))
    ledger.flush()
    other = tmp_path / "other.sqlite3"
    connect(other).close()
    os.replace(other, ledger.path)
    ledger.record(entry("after"))
    ledger.flush()
    assert tenants(ledger.path) == {"after": 1}


def test_a_ledger_file_renamed_away_keeps_its_rows(tmp_path: Path,
                                                   ledger: AsyncLedger) -> None:
    ledger.record(entry("before"))
    ledger.flush()   # into the -wal: SQLite checkpoints a moved database on no close
    kept = tmp_path / "ledger-2026-01.sqlite3"
    os.rename(ledger.path, kept)
    ledger.record(entry("after"))
    ledger.flush()
    assert tenants(kept) == {"before": 1}
    assert tenants(ledger.path) == {"after": 1}


def test_a_ledger_renamed_away_while_idle_keeps_its_rows(tmp_path: Path,
                                                        ledger: AsyncLedger) -> None:
    # No row came after the rename: the move went unnoticed, the last rows stayed in the
    # -wal under the old name, and the database made at the path deleted it.
    ledger.record(entry("before"))
    ledger.flush()
    kept = tmp_path / "ledger-2026-01.sqlite3"
    os.rename(ledger.path, kept)
    ledger.close()
    assert tenants(kept) == {"before": 1}


def _renamed_under_a_reader(ledger: AsyncLedger, to: Path) -> sqlite3.Connection:
    """Rows "first" and "second" written, the second while a reader holds a snapshot
    from before it; then the file renamed to `to`. Returns the reader, still holding."""
    ledger.record(entry("first"))
    ledger.flush()
    reader = sqlite3.connect(ledger.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM ledger").fetchone()
    ledger.record(entry("second"))
    ledger.flush()
    os.rename(ledger.path, to)
    return reader


def test_a_renamed_ledger_a_reader_holds_keeps_its_rows_until_the_reader_lets_go(
        tmp_path: Path, ledger: AsyncLedger) -> None:
    # The checkpoint could not finish under the reader's snapshot, the -wal was removed
    # all the same, and the renamed file was left malformed.
    kept = tmp_path / "ledger-2026-01.sqlite3"
    reader = _renamed_under_a_reader(ledger, kept)
    ledger.record(entry("third"))
    ledger.flush()  # the checkpoint waits: rows go on to the renamed file
    reader.execute("COMMIT")
    reader.close()
    ledger.flush()
    ledger.close()
    assert tenants(kept) == {"first": 1, "second": 1, "third": 1}


def test_stopping_while_a_reader_holds_a_renamed_ledgers_log_keeps_the_log(
        tmp_path: Path, ledger: AsyncLedger, caplog: pytest.LogCaptureFixture) -> None:
    # The next start deleted the log still under the old name, with the last rows.
    reader = _renamed_under_a_reader(ledger, tmp_path / "ledger-2026-01.sqlite3")
    try:
        with caplog.at_level("ERROR", logger="atp.ledger"):
            ledger.close()
    finally:
        reader.close()
    orphaned = ledger.path.with_name(ledger.path.name + "-wal.orphaned")
    assert orphaned.exists() and not ledger.path.with_name(ledger.path.name + "-wal").exists()
    assert any("is kept as" in r.getMessage() for r in caplog.records)


def test_rows_wait_while_the_ledger_cannot_be_opened_again(ledger: AsyncLedger) -> None:
    ledger.flush()
    remove_database(ledger.path)
    ledger.path.mkdir()   # what stands at the path now is no database
    ledger.record(entry("waiting"))
    with pytest.raises(LedgerUnavailable, match="Is a directory"):
        ledger.flush()
    assert ledger.flush_errors == 1
    ledger.path.rmdir()
    assert ledger.flush() == 1
    assert tenants(ledger.path) == {"waiting": 1}


def test_an_unchanged_ledger_file_stays_open(ledger: AsyncLedger,
                                             caplog: pytest.LogCaptureFixture) -> None:
    conn = ledger._conn
    with caplog.at_level("ERROR", logger="atp.ledger"):
        for tenant in ("a", "b"):
            ledger.record(entry(tenant))
            ledger.flush()
    assert ledger._conn is conn and not caplog.records
    assert tenants(ledger.path) == {"a": 1, "b": 1}


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: p.parent.rmdir() or p.parent.write_text(""), "Not a directory"),
])
def test_a_ledger_that_cannot_be_opened_is_named_with_the_reason(
        tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "dir" / "ledger.sqlite3"
    path.parent.mkdir()
    make(path)
    with pytest.raises(LedgerUnavailable) as raised:
        AsyncLedger(path, start=False)
    assert str(raised.value) == f"cannot open the ledger {path}: {reason}"


def test_serve_names_a_ledger_it_cannot_open_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "atp.yaml"
    config.write_text(CONFIG + "ledger: {path: afile/ledger.sqlite3}\n")
    result = subprocess.run([sys.executable, "-m", "atp_extproc", "serve", "--config",
                             str(config), "--listen", "unix:" + str(tmp_path / "atp.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"atp-extproc: not starting: cannot open the ledger "
                             f"{tmp_path / 'afile/ledger.sqlite3'}: Not a directory\n")
    # Nothing left behind: the socket file was made before the ledger was refused.
    assert not (tmp_path / "atp.sock").exists()


def test_a_ledger_path_that_is_a_directory_is_the_configs_mistake(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # check passed it; serve then refused to start.
    (tmp_path / "ledger").mkdir()
    config = tmp_path / "atp.yaml"
    config.write_text(CONFIG + "ledger: {path: ledger}\n")
    line = len(CONFIG.splitlines()) + 1
    assert cli.main(["check", str(config)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{config}:{line}: ledger.path: {tmp_path / 'ledger'} is a directory, not a ledger "
        "file")
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert (f"{config}: ledger.path: {tmp_path / 'ledger'} is a directory, not a ledger "
            f"file (line {line})") in capsys.readouterr().err


# -- a ledger of another schema: refused at start like one that is no database --------

OLD_LEDGER = """CREATE TABLE ledger (hour INTEGER, tenant TEXT, route TEXT, model TEXT,
    price_version TEXT, requests INTEGER, failed INTEGER, input_tokens INTEGER,
    output_tokens INTEGER, cost_pico INTEGER, baseline_pico INTEGER, savings_pico INTEGER);"""
MOVE_IT = "move it aside or point ledger.path elsewhere"
REASONS = {
    "old": f"table ledger lacks column shadow (an older ATP's ledger?): {MOVE_IT}",
    "newer": f"it has schema version 2; this ATP reads version 1 (a newer ATP's "
             f"ledger?): {MOVE_IT}",
}


def make_ledger(path: Path, kind: str) -> None:
    """An older ATP's ledger (no shadow column) or a newer one's (schema version 2)."""
    if kind == "old":
        conn = sqlite3.connect(path)
        conn.executescript(OLD_LEDGER)
    else:
        connect(path).close()
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_ledger_of_another_schema_is_not_opened(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    make_ledger(path, kind)
    with pytest.raises(LedgerUnavailable) as raised:
        AsyncLedger(path, start=False)
    assert str(raised.value) == f"cannot open the ledger {path}: {REASONS[kind]}"


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_serve_refuses_a_ledger_of_another_schema_in_one_line(tmp_path: Path,
                                                             kind: str) -> None:
    make_ledger(tmp_path / "ledger.sqlite3", kind)
    config = tmp_path / "atp.yaml"
    config.write_text(CONFIG + "ledger: {path: ledger.sqlite3}\n")
    result = subprocess.run([sys.executable, "-m", "atp_extproc", "serve", "--config",
                             str(config), "--listen", "unix:" + str(tmp_path / "atp.sock")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"atp-extproc: not starting: cannot open the ledger "
                             f"{tmp_path / 'ledger.sqlite3'}: {REASONS[kind]}\n")


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_report_refuses_a_ledger_of_another_schema_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    make_ledger(path, kind)
    assert cli.main(["report", "savings", "--db", str(path)]) != 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "", f"atp-extproc: {path} is not a readable ledger: {REASONS[kind]}\n")


def test_a_ledger_replaced_by_another_schema_is_left_alone_and_rows_wait(
        tmp_path: Path, ledger: AsyncLedger) -> None:
    other = tmp_path / "newer.sqlite3"
    make_ledger(other, "newer")
    os.replace(other, ledger.path)
    ledger.record(entry("waiting"))
    with pytest.raises(LedgerUnavailable, match="schema version 2"):
        ledger.flush()
    assert ledger.flush_errors == 1
    conn = sqlite3.connect(ledger.path)
    assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone() == (0,)
    conn.close()
    remove_database(ledger.path)            # moved aside: the rows go to a new ledger
    assert ledger.flush() == 1
    assert tenants(ledger.path) == {"waiting": 1}
