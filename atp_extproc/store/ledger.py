"""The cost and savings ledger: rows buffered in memory, written by a background thread.

`AsyncLedger.record` runs on the event loop: it only adds integers into an in-memory
aggregate (one dict entry per tenant/route/model/hour/price version), under a lock held
for microseconds. A daemon thread writes the aggregate to SQLite every
`flush_interval_s` and on `close`; a failed write keeps the batch for the next try. A
ledger file deleted or replaced while ATP runs is noticed at the next flush, which opens
a new database at the path. Its directory is made at start only: one gone later is an
error each flush (the rows wait), not a new directory quietly put in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atp_extproc.store import sqlite as db
from atp_extproc.store.money import PICO_PER_USD, PriceSnapshot

log = logging.getLogger("atp.ledger")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One request's cost facts. Tokens are what the provider billed (or ATP estimated)."""

    ts: float                      # unix seconds
    tenant: str
    route: str
    model: str
    price: PriceSnapshot           # the served model's prices in force
    baseline: PriceSnapshot | None  # None: no savings claimed (baseline = actual)
    input_tokens: int
    output_tokens: int
    ok: bool = True
    estimated: bool = False
    shadow: bool = False           # a mirrored copy: apart from tenant spend and savings

    def cost_pico(self) -> int:
        return self.price.cost_pico(self.input_tokens, self.output_tokens)

    def baseline_pico(self) -> int:
        if self.shadow:
            return 0
        if self.baseline is None:
            return self.cost_pico()
        return self.baseline.cost_pico(self.input_tokens, self.output_tokens)

    def key(self) -> db.LedgerKey:
        base = self.baseline if (self.baseline is not None and not self.shadow) else None
        return (int(self.ts) // 3600 * 3600, self.tenant, self.route, self.model,
                int(self.shadow), self.price.version,
                base.model if base else "", base.version if base else "")


class LedgerUnavailable(OSError):
    """The ledger file cannot be opened for writing; the message names it and says why."""


def said_whole(exc: BaseException) -> bool:
    """Whether the error's message says all there is (the file gone, the disk full): a
    traceback beside it would bury it. Others are bugs, whose traceback tells where."""
    # (An OperationalError is the file's or the disk's; sqlite's other errors, misuse of
    # the API or a constraint, are bugs.)
    return isinstance(exc, LedgerUnavailable | sqlite3.OperationalError) or \
        type(exc) is sqlite3.DatabaseError


FileId = tuple[int, int]   # device, inode
# The files SQLite keeps beside a database in WAL mode.
_SIDE_SUFFIXES = ("-wal", "-shm")


def _bindable(rows: dict[db.LedgerKey, db.LedgerSums],
              ) -> dict[db.LedgerKey, list[int | float]]:
    """The rows as SQLite can bind them: a sum past 64-bit integers as a REAL (a double's
    53 bits: 2 nano-USD steps at $10M), as SQLite itself stores a row whose additions pass
    64 bits (one ATP's flushes, or two sharing the file) and the report sums with TOTAL.
    A copy, so a failed write requeues the exact integers."""
    return {key: sums if db.row_fits(sums)
            else [v if db.INT64_MIN <= v <= db.INT64_MAX else float(v) for v in sums]
            for key, sums in rows.items()}


def _file_id(path: Path) -> FileId | None:
    """Which file `path` names now; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _side_files(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in _SIDE_SUFFIXES]


def _why_unopenable(path: Path, exc: Exception) -> str:
    """The OS's own reason: SQLite says only "unable to open database file", and mkdir
    "File exists" for a parent that is a file."""
    if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
        return f"{exc.strerror}: {exc.filename}"
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as probe:
        return probe.strerror or str(probe)
    return str(exc)


def _open(path: Path, create_parent: bool) -> tuple[sqlite3.Connection, list[FileId | None]]:
    """A connection to the database at `path`, and which files it and its side files are
    (connect has written to it, so they exist)."""
    try:
        conn = db.connect(path, create_parent=create_parent)
    except (OSError, sqlite3.Error) as exc:
        raise LedgerUnavailable(
            f"cannot open the ledger {path}: {_why_unopenable(path, exc)}") from None
    return conn, [_file_id(f) for f in (path, *_side_files(path))]


class AsyncLedger:
    def __init__(self, path: str | Path, flush_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time, start: bool = True) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self._clock = clock
        self._lock = threading.Lock()          # guards the buffers
        self._write_lock = threading.Lock()    # one writer at a time
        self._rows: dict[db.LedgerKey, db.LedgerSums] = {}
        self._prices: dict[str, PriceSnapshot] = {}
        self._halves: list[db.ShadowHalf] = []
        # Opened here, to fail at startup rather than at the first flush.
        self._conn, self._files = _open(self.path, create_parent=True)
        self._move_waits = False  # a moved file's checkpoint waits for a reader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.flushes = 0
        self.flush_errors = 0
        if start:
            self.start()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="atp-ledger",
                                            daemon=True)
            self._thread.start()

    # -- hot path ----------------------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Add one request; no I/O. Failed requests count with their (usually 0) tokens."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        key = entry.key()
        cost = entry.cost_pico()
        baseline = entry.baseline_pico()
        with self._lock:
            sums = self._rows.get(key)
            if sums is None:
                sums = self._rows[key] = [0, 0, 0, 0, 0, 0, 0]
            sums[0] += 1
            sums[1] += not entry.ok
            sums[2] += entry.estimated
            sums[3] += entry.input_tokens
            sums[4] += entry.output_tokens
            sums[5] += cost
            sums[6] += baseline
            prices = self._prices
            if entry.price.version not in prices:
                prices[entry.price.version] = entry.price
            if key[6] and entry.baseline is not None and entry.baseline.version not in prices:
                prices[entry.baseline.version] = entry.baseline

    def record_shadow_half(self, half: db.ShadowHalf) -> None:
        if self._closed:
            raise RuntimeError("ledger is closed")
        with self._lock:
            self._halves.append(half)

    # -- writer ------------------------------------------------------------------------

    def flush(self) -> int:
        """Write everything buffered now; returns the number of rows written."""
        with self._write_lock:
            with self._lock:
                rows, prices, halves = self._rows, self._prices, self._halves
                self._rows, self._prices, self._halves = {}, {}, []
            self._drop_unwritable(rows, prices, halves)
            if not rows and not halves and not prices:
                # Idle too: a file renamed away then had its last rows left in a -wal
                # under the old name, which the database made at the path next deleted.
                # (A reopen that fails waits for rows to say so: not once a second.)
                with contextlib.suppress(Exception):
                    self._reopen_if_replaced()
                return 0
            try:
                self._reopen_if_replaced()
                # LedgerSums says int; SQLite binds the REALs _bindable adds as well.
                db.write_batch(self._conn, _bindable(rows),  # type: ignore[arg-type]
                               prices.values(), halves, int(self._clock()))
            except Exception:
                self.flush_errors += 1
                self._requeue(rows, prices, halves)
                raise
            self.flushes += 1
            return len(rows) + len(halves)

    def _reopen_if_replaced(self, final: bool = False) -> None:
        """SQLite goes on writing to a deleted (or renamed) file's old inode, where no one
        will read the rows: open the database now at the path instead (`final`: ATP
        stops, and opens nothing)."""
        current = _file_id(self.path)
        if current is not None and current == self._files[0]:
            return
        # SQLite neither checkpoints a moved database on closing nor removes its -wal and
        # -shm, from which a new database at the path would read the old one's pages:
        # checkpoint (so a renamed file keeps every row), then remove them while they are
        # still the old ones. Where a reader holds the old -wal the checkpoint cannot
        # finish: removed then, it took rows with it and left the renamed file
        # malformed. So rows go on to the old file while nothing stands at the path;
        # once something does, or ATP stops, the old log is moved aside, whole.
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.ProgrammingError:
            busy = 0  # closed already: the last reopen failed, nothing is left to copy
        except sqlite3.Error:
            busy = 1
        if busy and current is None and not final:
            if not self._move_waits:
                log.warning("ledger: %s was deleted or renamed while ATP ran; a reader "
                            "holds its log, so rows still go to the old file until it "
                            "lets go", self.path)
            self._move_waits = True
            return
        self._move_waits = False
        self._conn.close()
        for side, old_id in zip(_side_files(self.path), self._files[1:], strict=True):
            if old_id is not None and _file_id(side) == old_id:
                if busy:
                    kept = side.with_name(side.name + ".orphaned")
                    side.rename(kept)
                    log.error("ledger: the log of %s, deleted or renamed while a reader "
                              "held it, is kept as %s: its last rows are there, not in "
                              "the renamed file", self.path, kept)
                else:
                    side.unlink(missing_ok=True)
        if final:
            return
        # Failing, the next flush tries again. A directory gone (a volume unmounted, a
        # path through a directory since replaced) is not made anew: rows written there
        # would be lost to whoever reads the ledger where it was.
        self._conn, self._files = _open(self.path, create_parent=False)
        log.error("ledger: %s was deleted or replaced while ATP ran; rows go to a new "
                  "database at that path from now on", self.path)

    @staticmethod
    def _drop_unwritable(rows: dict[db.LedgerKey, db.LedgerSums],
                         prices: dict[str, PriceSnapshot],
                         halves: list[db.ShadowHalf]) -> None:
        """Drop (and log) what SQLite cannot store: kept, it would fail this batch and,
        requeued, every later one, so nothing would ever be written again."""
        bad_prices = {v for v, p in prices.items() if not db.price_fits(p)}
        for version in bad_prices:
            p = prices.pop(version)
            log.error("ledger: dropped a price beyond 64-bit picodollars", extra={"record": {
                "model": p.model, "price_version": version, "input_per_1k": p.input_text,
                "output_per_1k": p.output_text}})
        for key in [k for k in rows if k[5] in bad_prices or k[7] in bad_prices]:
            sums = rows.pop(key)
            log.error("ledger: dropped a row without its price",
                      extra={"record": {
                          "hour": key[0], "tenant": key[1], "route": key[2],
                          "model": key[3], "shadow": bool(key[4]), "price_version": key[5],
                          "requests": sums[0], "input_tokens": sums[3],
                          "output_tokens": sums[4], "cost_pico": sums[5],
                          "baseline_pico": sums[6]}})
        kept = [h for h in halves if db.half_fits(h)]
        if len(kept) != len(halves):
            for h in halves:
                if not db.half_fits(h):
                    log.error("ledger: dropped a shadow half beyond 64-bit integers",
                              extra={"record": {"request_id": h.request_id, "side": h.side,
                                                "route": h.route, "model": h.model}})
            halves[:] = kept

    def _requeue(self, rows: dict[db.LedgerKey, db.LedgerSums],
                 prices: dict[str, PriceSnapshot], halves: list[db.ShadowHalf]) -> None:
        with self._lock:
            for key, sums in rows.items():
                current = self._rows.get(key)
                if current is None:
                    self._rows[key] = sums
                else:
                    for i, v in enumerate(sums):
                        current[i] += v
            for version, snapshot in prices.items():
                self._prices.setdefault(version, snapshot)
            self._halves[:0] = halves

    def _run(self) -> None:
        failing: str | None = None  # the last failure's cause, while they go on
        repeats = 0
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception as exc:
                cause = f"{type(exc).__name__}: {exc}"
                if cause != failing:
                    log.error("ledger flush failed (%s); keeping the rows for the next try",
                              cause, exc_info=not said_whole(exc))
                else:
                    # A full disk fails every flush alike: a traceback each time would
                    # bury the first, which says why.
                    repeats += 1
                    log.error("ledger flush failed again (%s); keeping %s", cause,
                              self.pending())
                failing = cause
                continue
            if failing is not None:
                log.info("ledger flush succeeded again after %d more failure(s)", repeats)
                failing, repeats = None, 0

    def pending(self) -> str:
        """What is buffered and not yet written, in words for a log line."""
        with self._lock:
            requests = sum(sums[0] for sums in self._rows.values())
            cost = sum(sums[5] for sums in self._rows.values())
            halves = len(self._halves)
        return (f"{requests} request(s) costing {cost / PICO_PER_USD:.6f} USD and "
                f"{halves} shadow half(s) unwritten")

    def close(self) -> None:
        """Stop the writer and write what is left (blocking: off the event loop)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        finally:
            if self._move_waits:
                with contextlib.suppress(Exception):
                    self._reopen_if_replaced(final=True)
            self._conn.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
