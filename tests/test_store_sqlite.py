"""The embedded SQLite store: schema, WAL, shadow pair joins, read-only opening."""

from __future__ import annotations

import sqlite3

import pytest

from atp_extproc.store import AsyncLedger, ShadowHalf, connect
from atp_extproc.store.sqlite import SCHEMA_VERSION


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
