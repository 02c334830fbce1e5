"""The ledger file under operations: deleted or replaced while ATP runs, or not openable
at start (named with its path and the OS's reason, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    (tmp_path / "ledger").mkdir()
    config = tmp_path / "atp.yaml"
    config.write_text(CONFIG + "ledger: {path: ledger}\n")
    result = subprocess.run([sys.executable, "-m", "atp_extproc", "serve", "--config",
                             str(config), "--listen", "unix:" + str(tmp_path / "atp.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"atp-extproc: not starting: cannot open the ledger "
                             f"{tmp_path / 'ledger'}: Is a directory\n")
