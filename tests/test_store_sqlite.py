"""The embedded SQLite store: schema, WAL, shadow pair joins, read-only opening."""

from __future__ import annotations

import sqlite3

import pytest

from atp_extproc.store import AsyncLedger, ShadowHalf, connect
from atp_extproc.store.sqlite import SCHEMA_VERSION, LedgerSchemaError


def test_connect_creates_the_schema_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "dir" / "atp.sqlite3"      # parents are created
    conn = connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"ledger", "price_snapshots", "shadow_pairs", "meta"} <= tables
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),)
    conn.close()
    connect(path).close()                               # idempotent


def test_readonly_open_needs_an_existing_file_and_cannot_write(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect(tmp_path / "nope.sqlite3", readonly=True)
    connect(tmp_path / "db.sqlite3").close()
    ro = connect(tmp_path / "db.sqlite3", readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.execute("DELETE FROM ledger")
    ro.close()


@pytest.mark.parametrize("order", [("primary", "shadow"), ("shadow", "primary")])
def test_shadow_halves_join_by_request_id_in_either_order(tmp_path, order):
    halves = {
        "primary": ShadowHalf("req-1", "primary", "chat", "small", 200, 120.0, 750_000, 1),
        "shadow": ShadowHalf("req-1", "shadow", "chat", "large", 503, 40.0, None, 2),
    }
    lg = AsyncLedger(tmp_path / "l.sqlite3", start=False)
    for side in order:
        lg.record_shadow_half(halves[side])
        lg.flush()
    lg.close()
    conn = sqlite3.connect(tmp_path / "l.sqlite3")
    row = conn.execute("SELECT request_id, route, primary_model, primary_status, "
                       "primary_cost_pico, shadow_model, shadow_status, shadow_latency_ms "
                       "FROM shadow_pairs").fetchall()
    conn.close()
    assert row == [("req-1", "chat", "small", 200, 750_000, "large", 503, 40.0)]


def test_shadow_half_side_is_validated():
    with pytest.raises(ValueError):
        ShadowHalf("r", "primary; DROP TABLE ledger", "chat", "m", 200, 1.0, 0, 0)


# -- a file of another schema --------------------------------------------------------

OLD_LEDGER = """CREATE TABLE ledger (hour INTEGER, tenant TEXT, route TEXT, model TEXT,
    price_version TEXT, requests INTEGER, failed INTEGER, input_tokens INTEGER,
    output_tokens INTEGER, cost_pico INTEGER, baseline_pico INTEGER, savings_pico INTEGER);
INSERT INTO ledger VALUES (0, 'alice', 'chat', 'small', 'v', 1, 0, 10, 1, 5, 9, 4);"""
MISSING_SHADOW = ("table ledger lacks column shadow (an older ATP's ledger?): move it "
                  "aside or point ledger.path elsewhere")
NEWER = ("it has schema version 2; this ATP reads version 1 (a newer ATP's ledger?): "
         "move it aside or point ledger.path elsewhere")


def make_old(path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(OLD_LEDGER)
    conn.close()


def make_newer(path) -> None:
    connect(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()


def dump(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize(("make", "reason"), [(make_old, MISSING_SHADOW),
                                              (make_newer, NEWER)])
def test_a_file_of_another_schema_is_refused_and_left_as_it_was(tmp_path, readonly, make,
                                                                reason):
    path = tmp_path / "ledger.sqlite3"
    make(path)
    before = dump(path)
    with pytest.raises(LedgerSchemaError) as raised:
        connect(path, readonly=readonly)
    assert str(raised.value) == reason
    assert isinstance(raised.value, sqlite3.DatabaseError)   # refused as "not a database"
    assert dump(path) == before                                # no table, row or version


def test_a_sqlite_file_of_another_program_is_refused(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('x');")
    conn.close()
    with pytest.raises(LedgerSchemaError, match=r"^it has tables \(users\) but no "
                                                r"schema_version \(not an ATP ledger\?\)"):
        connect(path)
    assert dump(path)[1:] == ['CREATE TABLE users (name TEXT);',
                              "INSERT INTO \"users\" VALUES('x');", 'COMMIT;']


def test_an_empty_file_gets_the_schema(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    path.touch()
    connect(path).close()
    conn = connect(path, readonly=True)                 # and is a ledger from then on
    assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
    conn.close()


def test_a_batch_sqlite_rolled_back_itself_fails_with_its_own_cause(tmp_path):
    # On a full disk SQLite ends the transaction itself: the ROLLBACK after it raised
    # "cannot rollback - no transaction is active", and every flush logged that.
    from atp_extproc.store.sqlite import write_batch

    conn = connect(tmp_path / "l.sqlite3")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # full, as a disk can be
    halves = [ShadowHalf(f"req-{i:04d}" + "x" * 200, "primary", "chat", "small", 200, 1.0,
                         1, 1) for i in range(500)]
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        write_batch(conn, {}, [], halves, 1)
    assert not conn.in_transaction
    conn.close()


def test_a_flush_failing_alike_again_is_one_line_each_and_its_recovery_said(tmp_path,
                                                                           caplog):
    # A full disk logged a full traceback at every flush (225 lines in 40 s), each
    # ending on the wrong cause.
    from atp_extproc.stack import wait_until

    lg = AsyncLedger(tmp_path / "l.sqlite3", flush_interval_s=0.01, start=False)
    pages = lg._conn.execute("PRAGMA page_count").fetchone()[0]
    lg._conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(300):
        lg.record_shadow_half(ShadowHalf(f"req-{i:04d}" + "x" * 200, "primary", "chat",
                                         "small", 200, 1.0, 1, 1))
    with caplog.at_level("INFO", logger="atp.ledger"):
        lg.start()
        wait_until(lambda: lg.flush_errors >= 4, "failed flushes", timeout=10)
        lg._conn.execute("PRAGMA max_page_count = 1000000")
        wait_until(lambda: lg.flushes >= 1, "a flush once there is room", timeout=10)
        lg.close()
    failed = [r for r in caplog.records if "flush failed" in r.getMessage()]
    assert [bool(r.exc_info) for r in failed[:2]] == [False, False]
    assert "database or disk is full" in failed[0].getMessage()
    assert "database or disk is full" in failed[1].getMessage()
    assert "300 shadow half(s) unwritten" in failed[1].getMessage()
    assert any("succeeded again" in r.getMessage() for r in caplog.records)
