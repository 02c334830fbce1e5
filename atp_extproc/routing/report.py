"""`atp-extproc report savings`: spend against the baseline over time, as a text table.

Tenant spend and savings never include shadow (mirrored) traffic; its requests and cost
are shown in their own columns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Literal

from atp_extproc.store import sqlite as db
from atp_extproc.store.money import usd

Bucket = Literal["hour", "day", "total"]
_BUCKET_SECONDS: dict[str, int | None] = {"hour": 3600, "day": 86400, "total": None}


def parse_since(text: str, now: float | None = None) -> int:
    """'24h', '7d', '90m' (ago) or an ISO date/time (UTC unless it says otherwise)."""
    text = text.strip()
    units = {"m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        # Before the epoch is as far back as the ledger goes (and what SQLite can hold).
        # In integers: 10^309 hours is no float.
        return max(0, int(now if now is not None else time.time())
                   - int(text[:-1]) * units[text[-1]])
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _money(pico: int, decimals: int) -> str:
    exact = usd(pico)
    exponent = -decimals
    if pico and exact.adjusted() - 1 < -decimals:
        # Fewer than two significant digits at the decimals shown (a few embeddings, a
        # demo session's requests): two, not $0.0000 for $0.00006135, nor $0.0001 for
        # $0.000142, a smaller sum getting more digits than a larger one.
        exponent = exact.adjusted() - 1
    amount = exact.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_EVEN)
    # -$0.11, as accounts write a loss (a route dearer than its baseline), not $-0.11.
    return f"{'-' if amount < 0 else ''}${abs(amount):,f}"


def _percent(savings: int, baseline: int) -> str:
    if baseline == 0:
        return "-"
    return f"{Decimal(savings * 100) / Decimal(baseline):.1f}%"


def _when(bucket: int, bucket_s: int | None) -> str:
    if bucket_s is None:
        return "all"
    moment = datetime.fromtimestamp(bucket, UTC)
    return moment.strftime("%Y-%m-%d" if bucket_s >= 86400 else "%Y-%m-%d %H:00")


def savings_table(rows: Sequence[db.SavingsRow], by: Sequence[str], bucket: Bucket = "hour",
                  decimals: int = 4) -> str:
    bucket_s = _BUCKET_SECONDS[bucket]
    header = [bucket if bucket != "total" else "period", *by, "requests", "failed", "cost",
              "baseline", "savings", "savings %", "shadow req", "shadow cost"]

    def cells(label: str, r: db.SavingsRow) -> list[str]:
        return [label, *r.group, str(r.requests), str(r.failed), _money(r.cost_pico, decimals),
                _money(r.baseline_pico, decimals), _money(r.savings_pico, decimals),
                _percent(r.savings_pico, r.baseline_pico), str(r.shadow_requests),
                _money(r.shadow_cost_pico, decimals)]

    body = [cells(_when(r.bucket, bucket_s), r) for r in rows]
    total = db.SavingsRow(
        0, ("",) * len(by), sum(r.requests for r in rows), sum(r.failed for r in rows),
        sum(r.cost_pico for r in rows), sum(r.baseline_pico for r in rows),
        sum(r.savings_pico for r in rows), sum(r.shadow_requests for r in rows),
        sum(r.shadow_cost_pico for r in rows))
    footer = cells("TOTAL", total)
    table = [header, *body, footer]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text_cols = 1 + len(by)

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i < text_cols else cell.rjust(widths[i])
                         for i, cell in enumerate(row)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(r) for r in body), rule, line(footer)]
    return "\n".join(out) + "\n"


def savings_report(db_path: str | Path, by: Sequence[str] = ("tenant", "route"),
                   bucket: Bucket = "hour", since: int | str | None = None,
                   decimals: int = 4) -> str:
    """The savings table for a ledger file: absolute and % savings by bucket and `by`."""
    if bucket not in _BUCKET_SECONDS:
        raise ValueError(f"bucket must be one of {sorted(_BUCKET_SECONDS)}")
    if isinstance(since, str):
        since = parse_since(since)
    conn = db.connect(db_path, readonly=True)
    try:
        rows = db.savings(conn, by, _BUCKET_SECONDS[bucket], since)
    finally:
        conn.close()
    if not rows:
        return f"no ledger rows in {db_path}" + (" for that period" if since else "") + "\n"
    return savings_table(rows, by, bucket, decimals)
