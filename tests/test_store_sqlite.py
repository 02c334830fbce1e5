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
