"""The cost and savings ledger: rows buffered in memory, written by a background thread.

`AsyncLedger.record` runs on the event loop: it only adds integers into an in-memory
aggregate (one dict entry per tenant/route/model/hour/price version), under a lock held
for microseconds. A daemon thread writes the aggregate to SQLite every
`flush_interval_s` and on `close`; a failed write keeps the batch for the next try.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atp_extproc.store import sqlite as db
from atp_extproc.store.money import PriceSnapshot

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
        self._conn = db.connect(self.path)     # fail at startup, not at the first flush
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
            if not rows and not halves and not prices:
                return 0
            self._drop_unwritable(rows, prices, halves)
            try:
                db.write_batch(self._conn, rows, prices.values(), halves,
                               int(self._clock()))
            except Exception:
                self.flush_errors += 1
                self._requeue(rows, prices, halves)
                raise
            self.flushes += 1
            return len(rows) + len(halves)

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
        for key in [k for k, sums in rows.items()
                    if not db.row_fits(sums) or k[5] in bad_prices or k[7] in bad_prices]:
            sums = rows.pop(key)
            log.error("ledger: dropped a row beyond 64-bit integers or without its price",
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
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:
                log.exception("ledger flush failed; keeping the rows for the next try")

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
            self._conn.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
