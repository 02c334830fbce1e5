"""The embedded store: one SQLite file in WAL mode.

Tables
- ledger: one row per (hour, tenant, route, model, shadow, price_version,
  baseline_model, baseline_version) with summed requests, tokens and picodollars. Writes
  add to the row (UPSERT), so several processes can share the file and counters merge.
- price_snapshots: the prices behind each version id; rows never change, so a later
  price edit gets a new version and cannot rewrite history.
- shadow_pairs: a mirrored request's primary and shadow halves joined by request id.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from atp_extproc.store.money import PriceSnapshot

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS price_snapshots (
    version TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    input_per_1k TEXT NOT NULL,
    output_per_1k TEXT NOT NULL,
    input_pico_per_token INTEGER NOT NULL,
    output_pico_per_token INTEGER NOT NULL,
    first_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    hour INTEGER NOT NULL,            -- unix time of the hour's start (UTC)
    tenant TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    shadow INTEGER NOT NULL,          -- 1: mirrored copy, never tenant spend or savings
    price_version TEXT NOT NULL,
    baseline_model TEXT NOT NULL,     -- '' when no baseline (savings 0) or shadow
    baseline_version TEXT NOT NULL,
    requests INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    estimated INTEGER NOT NULL,       -- requests whose usage was estimated, not reported
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL,
    baseline_pico INTEGER NOT NULL,
    savings_pico INTEGER NOT NULL,
    PRIMARY KEY (hour, tenant, route, model, shadow, price_version,
                 baseline_model, baseline_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shadow_pairs (
    request_id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    primary_model TEXT, primary_status INTEGER, primary_latency_ms REAL,
    primary_cost_pico INTEGER,
    shadow_model TEXT, shadow_status INTEGER, shadow_latency_ms REAL,
    shadow_cost_pico INTEGER
);
"""

_UPSERT_LEDGER = """
INSERT INTO ledger (hour, tenant, route, model, shadow, price_version, baseline_model,
    baseline_version, requests, failed, estimated, input_tokens, output_tokens, cost_pico,
    baseline_pico, savings_pico)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO UPDATE SET
    requests = requests + excluded.requests,
    failed = failed + excluded.failed,
    estimated = estimated + excluded.estimated,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    cost_pico = cost_pico + excluded.cost_pico,
    baseline_pico = baseline_pico + excluded.baseline_pico,
    savings_pico = savings_pico + excluded.savings_pico
"""

_INSERT_PRICE = """
INSERT OR IGNORE INTO price_snapshots (version, model, input_per_1k, output_per_1k,
    input_pico_per_token, output_pico_per_token, first_seen) VALUES (?, ?, ?, ?, ?, ?, ?)
"""

_SIDES = {"primary", "shadow"}


@dataclass(frozen=True, slots=True)
class ShadowHalf:
    """One side of a mirrored request, joined with the other by request id."""

    request_id: str
    side: str          # "primary" | "shadow"
    route: str
    model: str
    status: int
    latency_ms: float | None
    cost_pico: int | None
    ts: int

    def __post_init__(self) -> None:
        if self.side not in _SIDES:
            raise ValueError(f"side must be one of {sorted(_SIDES)}")


# (hour, tenant, route, model, shadow, price_version, baseline_model, baseline_version)
LedgerKey = tuple[int, str, str, str, int, str, str, str]
# requests, failed, estimated, input_tokens, output_tokens, cost_pico, baseline_pico
LedgerSums = list[int]


# SQLite's INTEGER range: a larger Python int cannot be bound (OverflowError).
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _fits(*values: int | None) -> bool:
    return all(v is None or INT64_MIN <= v <= INT64_MAX for v in values)


def row_fits(sums: LedgerSums) -> bool:
    """Whether SQLite can store the row (its savings, baseline - cost, fits when both do:
    they are never negative)."""
    return _fits(*sums)


def price_fits(price: PriceSnapshot) -> bool:
    return _fits(price.input_pico, price.output_pico)


def half_fits(half: ShadowHalf) -> bool:
    return _fits(half.status, half.cost_pico, half.ts)


class LedgerSchemaError(sqlite3.DatabaseError):
    """The file is SQLite but not a ledger this ATP writes: the message says why. A
    DatabaseError, so it is refused and reported as a file that is no database is."""


_MOVE_IT = "move it aside or point ledger.path elsewhere"


@cache
def _expected_columns() -> dict[str, tuple[str, ...]]:
    """Each table's columns as _SCHEMA makes them: one source of truth for the check."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return {table: tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
                for (table,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")}
    finally:
        conn.close()


def _check_schema(conn: sqlite3.Connection) -> None:
    """Refuse a file another schema wrote: CREATE TABLE IF NOT EXISTS keeps its tables
    as they are, and every write (or read) would then fail. No migration: its rows are
    not ours to rewrite. A file with no tables is new, and gets the schema."""
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return
    version: str | None = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = None if row is None else str(row[0])
    if version is not None and version != str(SCHEMA_VERSION):
        age = "a newer" if version.isdigit() and int(version) > SCHEMA_VERSION else "another"
        raise LedgerSchemaError(
            f"it has schema version {version}; this ATP reads version {SCHEMA_VERSION} "
            f"({age} ATP's ledger?): {_MOVE_IT}")
    for table, columns in _expected_columns().items():
        if table not in tables:
            continue   # made by the writer; the reader's query names it if it needs it
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing = [column for column in columns if column not in present]
        if missing:
            raise LedgerSchemaError(f"table {table} lacks column {missing[0]} (an older "
                                    f"ATP's ledger?): {_MOVE_IT}")
    if version is None:
        # Every ATP ledger has had its version in meta since the first; a file with
        # other tables and none is some other program's database.
        raise LedgerSchemaError(f"it has tables ({', '.join(sorted(tables))}) but no "
                                f"schema_version (not an ATP ledger?): {_MOVE_IT}")


def connect(path: str | Path, readonly: bool = False, *,
            create_parent: bool = True) -> sqlite3.Connection:
    """`create_parent`: make the file's missing directories (a writer's first start);
    without it a missing directory is an error, not a new one silently made. A file of
    another schema raises LedgerSchemaError."""
    path = Path(path)
    if readonly:
        return _connect_readonly(path)
    if create_parent:
        # Through links: a link to a directory not made yet (an image's /etc/atp/run ->
        # /var/lib/atp) is made where it points; mkdir of the link itself fails.
        path = Path(os.path.realpath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
    return _prepared(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000,
                                     check_same_thread=False, isolation_level=None),
                     readonly=False)


def _prepared(conn: sqlite3.Connection, readonly: bool) -> sqlite3.Connection:
    """`conn` with its schema checked (and, for a writer, made); closed if refused."""
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Checked before anything is written, so a file refused is left as it was.
        _check_schema(conn)
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            _create_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# What SQLite answers a WAL reader that may not create the -shm file beside the ledger.
_NO_SHM = frozenset({sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY_DIRECTORY})


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A reader of the ledger, also in a read-only directory or mount, or as another user
    after ATP stopped (and removed its -shm file): the file is then read as it stands,
    which is right only while no rows wait in its write-ahead log."""
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}")
    path = path.resolve()
    try:
        return _prepared(_open_uri(path, "mode=ro"), readonly=True)
    except sqlite3.OperationalError as exc:
        # A ledger this user may not read is SQLite's error, not the directory's.
        if getattr(exc, "sqlite_errorcode", None) not in _NO_SHM \
                or not os.access(path, os.R_OK):
            raise
        if _wal_pending(path):
            raise sqlite3.OperationalError(
                f"rows wait in its write-ahead log {path.name}-wal, which SQLite reads only "
                f"with a {path.name}-shm file it cannot create in {path.parent}: make the "
                "ledger's directory writable while the log is pending, or stop ATP "
                "cleanly (which moves the rows into the ledger)") from exc
    return _prepared(_open_uri(path, "mode=ro&immutable=1"), readonly=True)


def _wal_pending(path: Path) -> bool:
    try:
        return path.with_name(f"{path.name}-wal").stat().st_size > 0
    except FileNotFoundError:  # none, or removed by a clean stop meanwhile
        return False


def _open_uri(path: Path, query: str) -> sqlite3.Connection:
    # as_uri() percent-encodes the path: '?', '#' or '%' in it would otherwise be
    # read as the URI's query, fragment or an escape, and open another file.
    return sqlite3.connect(f"{path.as_uri()}?{query}", uri=True,
                           timeout=BUSY_TIMEOUT_MS / 1000)


def _create_schema(conn: sqlite3.Connection) -> None:
    """The tables and the version in one transaction: a crash or a second process
    never finds tables without the version (which _check_schema would refuse).
    executescript commits a transaction begun before it, so the script begins its own."""
    try:
        conn.executescript(
            f"BEGIN IMMEDIATE;{_SCHEMA}INSERT OR IGNORE INTO meta VALUES "
            f"('schema_version', '{SCHEMA_VERSION}');COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def write_batch(conn: sqlite3.Connection, rows: dict[LedgerKey, LedgerSums],
                prices: Iterable[PriceSnapshot], halves: Sequence[ShadowHalf],
                now: int) -> None:
    """Add one batch in a single transaction (all of it or nothing)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT_PRICE, [
            (p.version, p.model, p.input_text, p.output_text, p.input_pico, p.output_pico,
             now) for p in prices])
        conn.executemany(_UPSERT_LEDGER, [
            # key[4] is the shadow flag: a mirrored copy saves nothing and costs no tenant.
            (*key, *sums, 0 if key[4] else sums[6] - sums[5]) for key, sums in rows.items()])
        for half in halves:
            _upsert_half(conn, half)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back itself (a full disk, a file-size limit): a second
        # ROLLBACK would raise "no transaction is active" in place of that cause.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upsert_half(conn: sqlite3.Connection, h: ShadowHalf) -> None:
    side = h.side  # validated against _SIDES: safe to splice into the column names
    conn.execute(
        f"INSERT INTO shadow_pairs (request_id, route, first_seen, {side}_model, "
        f"{side}_status, {side}_latency_ms, {side}_cost_pico) VALUES (?, ?, ?, ?, ?, ?, ?) "
        f"ON CONFLICT (request_id) DO UPDATE SET {side}_model = excluded.{side}_model, "
        f"{side}_status = excluded.{side}_status, "
        f"{side}_latency_ms = excluded.{side}_latency_ms, "
        f"{side}_cost_pico = excluded.{side}_cost_pico",
        (h.request_id, h.route, h.ts, h.model, h.status, h.latency_ms, h.cost_pico))


# -- reads -------------------------------------------------------------------------

GROUP_COLUMNS = ("tenant", "route", "model")


@dataclass(frozen=True, slots=True)
class SavingsRow:
    bucket: int                      # unix time of the bucket start; 0 for "total"
    group: tuple[str, ...]           # values of the `by` columns
    requests: int
    failed: int
    cost_pico: int                   # tenant spend (shadow excluded)
    baseline_pico: int
    savings_pico: int
    shadow_requests: int
    shadow_cost_pico: int


def savings(conn: sqlite3.Connection, by: Sequence[str], bucket_s: int | None,
            since: int | None = None) -> list[SavingsRow]:
    """Savings grouped by time bucket (None: one total bucket) and `by` columns."""
    for column in by:
        if column not in GROUP_COLUMNS:
            raise ValueError(f"cannot group by {column!r}; choose from {GROUP_COLUMNS}")
    bucket_sql = f"(hour / {int(bucket_s)}) * {int(bucket_s)}" if bucket_s else "0"
    cols = "".join(f", {c}" for c in by)
    where_sql, params = "", []
    if since is not None:
        where_sql, params = "WHERE hour >= ?", [int(since) - int(since) % 3600]
    sql = f"""
        SELECT {bucket_sql} AS bucket{cols},
            TOTAL(CASE WHEN shadow = 0 THEN requests END),
            TOTAL(CASE WHEN shadow = 0 THEN failed END),
            TOTAL(CASE WHEN shadow = 0 THEN cost_pico END),
            TOTAL(CASE WHEN shadow = 0 THEN baseline_pico END),
            TOTAL(CASE WHEN shadow = 0 THEN savings_pico END),
            TOTAL(CASE WHEN shadow = 1 THEN requests END),
            TOTAL(CASE WHEN shadow = 1 THEN cost_pico END)
        FROM ledger {where_sql}
        GROUP BY bucket{cols} ORDER BY bucket{cols}"""
    n = len(by)
    # TOTAL (a float) rather than SUM: picodollars summed past $9.2M overflow SQLite's
    # int64 and the report would fail; a double is exact to 2 nano-USD even at $10M.
    return [
        SavingsRow(bucket=r[0], group=tuple(r[1:1 + n]), requests=int(r[1 + n]),
                   failed=int(r[2 + n]), cost_pico=round(r[3 + n]),
                   baseline_pico=round(r[4 + n]), savings_pico=round(r[5 + n]),
                   shadow_requests=int(r[6 + n]), shadow_cost_pico=round(r[7 + n]))
        for r in conn.execute(sql, params)
    ]
