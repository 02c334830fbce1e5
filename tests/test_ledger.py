"""The cost and savings ledger: exact money, price versions, shadow apart, durability."""

from __future__ import annotations

import sqlite3
import threading
import time
from decimal import Decimal

import numpy as np
import pytest

from atp_extproc.routing.report import parse_since, savings_report
from atp_extproc.store import (
    AsyncLedger,
    LedgerEntry,
    PriceBook,
    PriceSnapshot,
    cents,
    connect,
    savings,
    usd,
)
from atp_extproc.store import sqlite as db

# examples/atp.yaml prices (USD per 1K tokens).
SMALL = PriceSnapshot.of("small", 0.00015, 0.0006)
LARGE = PriceSnapshot.of("large", 0.0025, 0.01)
EMBED = PriceSnapshot.of("embed", 0.00002, 0.0)
T0 = 1_767_225_600            # 2026-01-01 00:00 UTC


def entry(model=SMALL, tenant="alice", route="chat", tin=1000, tout=100, ts=T0 + 10,
          baseline=LARGE, **kw) -> LedgerEntry:
    return LedgerEntry(ts=ts, tenant=tenant, route=route, model=model.model, price=model,
                       baseline=baseline, input_tokens=tin, output_tokens=tout, **kw)


@pytest.fixture
def ledger(tmp_path):
    lg = AsyncLedger(tmp_path / "ledger.sqlite3", start=False)
    yield lg
    lg.close()


def rows(path, by=("tenant", "route"), bucket_s=None):
    conn = connect(path, readonly=True)
    try:
        return savings(conn, by, bucket_s)
    finally:
        conn.close()


def test_prices_become_exact_picodollars_per_token():
    assert SMALL.input_pico == 150_000 and SMALL.output_pico == 600_000
    assert LARGE.cost_pico(1000, 1000) == 12_500_000_000          # $0.0125
    assert usd(LARGE.cost_pico(1000, 1000)) == Decimal("0.0125")
    assert PriceSnapshot.of("small", "0.00015", "0.0006").version == SMALL.version
    assert PriceSnapshot.of("small", 0.00015, 0.0007).version != SMALL.version
    assert PriceSnapshot.of("other", 0.00015, 0.0006).version != SMALL.version
    with pytest.raises(ValueError):
        PriceSnapshot.of("x", -1, 0)


def test_savings_match_a_hand_computation_to_the_cent(ledger):
    rng = np.random.default_rng(42)
    models = {"small": SMALL, "large": LARGE, "embed": EMBED}
    hand: dict[tuple[str, str], list[Decimal]] = {}
    for i in range(20_000):
        tenant = ("alice", "bob", "carol")[i % 3]
        route = ("chat", "embeddings")[int(rng.integers(2))]
        model = models[("small", "large", "embed")[int(rng.integers(3))]]
        tin, tout = int(rng.integers(1, 4000)), int(rng.integers(0, 1500))
        ledger.record(entry(model, tenant, route, tin, tout, ts=T0 + i))
        # By hand, in decimal dollars, straight from the configured prices.
        cost = (tin * Decimal("0.00015") + tout * Decimal("0.0006")) / 1000 \
            if model is SMALL else (
            (tin * Decimal("0.0025") + tout * Decimal("0.01")) / 1000 if model is LARGE
            else tin * Decimal("0.00002") / 1000)
        base = (tin * Decimal("0.0025") + tout * Decimal("0.01")) / 1000
        sums = hand.setdefault((tenant, route), [Decimal(0), Decimal(0)])
        sums[0] += cost
        sums[1] += base
    ledger.flush()
    got = {r.group: r for r in rows(ledger.path)}
    assert set(got) == set(hand)
    for key, (cost, base) in hand.items():
        r = got[key]
        assert usd(r.cost_pico) == cost                   # exact, not just to the cent
        assert usd(r.baseline_pico) == base
        assert cents(r.savings_pico) == (base - cost).quantize(Decimal("0.01"))
    assert sum(r.requests for r in got.values()) == 20_000


def test_a_price_edit_cannot_rewrite_history(ledger):
    ledger.record(entry(SMALL, tin=10_000, tout=0))
    ledger.flush()
    before = rows(ledger.path)[0].cost_pico
    repriced = PriceSnapshot.of("small", 0.0003, 0.0006)          # the price doubles
    ledger.record(entry(repriced, tin=10_000, tout=0, ts=T0 + 20))
    ledger.flush()
    conn = sqlite3.connect(ledger.path)
    versions = conn.execute(
        "SELECT price_version, cost_pico FROM ledger ORDER BY cost_pico").fetchall()
    snapshots = dict(conn.execute("SELECT version, input_per_1k FROM price_snapshots"))
    conn.close()
    assert versions == [(SMALL.version, before), (repriced.version, 2 * before)]
    assert snapshots[SMALL.version] == "0.00015"
    assert snapshots[repriced.version] == "0.0003"
    assert snapshots[LARGE.version] == "0.0025"                   # the baseline too


def test_shadow_traffic_is_kept_apart_from_spend_and_savings(ledger):
    ledger.record(entry(SMALL, tin=1000, tout=1000))
    ledger.record(entry(LARGE, tin=1000, tout=1000, shadow=True))
    ledger.record(entry(LARGE, tin=1000, tout=1000, shadow=True))
    ledger.flush()
    (r,) = rows(ledger.path)
    assert r.requests == 1 and r.shadow_requests == 2
    assert r.cost_pico == SMALL.cost_pico(1000, 1000)
    assert r.baseline_pico == LARGE.cost_pico(1000, 1000)
    assert r.savings_pico == r.baseline_pico - r.cost_pico
    assert r.shadow_cost_pico == 2 * LARGE.cost_pico(1000, 1000)
    text = savings_report(ledger.path, bucket="total")
    assert "$0.00075" in text and "$0.0125" in text and "$0.0118" in text
    assert "94.0%" in text and "$0.0250" in text


def test_no_baseline_claims_no_savings_and_failures_are_counted(ledger):
    ledger.record(entry(SMALL, baseline=None))
    ledger.record(entry(SMALL, tin=0, tout=0, ok=False))
    ledger.record(entry(SMALL, estimated=True))
    ledger.flush()
    conn = sqlite3.connect(ledger.path)
    got = conn.execute("SELECT baseline_model, requests, failed, estimated, savings_pico "
                       "FROM ledger ORDER BY baseline_model").fetchall()
    conn.close()
    assert got[0] == ("", 1, 0, 0, 0)
    assert got[1][:4] == ("large", 2, 1, 1)
    # The report says how many of the requests failed: it had the count and showed none.
    lines = savings_report(ledger.path, by=(), bucket="total").splitlines()
    assert lines[0].split()[1:3] == ["requests", "failed"]
    assert lines[-1].split()[1:3] == ["3", "1"]


def test_rows_are_per_hour_and_report_buckets(ledger):
    for h in range(30):                                           # 30 hours, 2 days
        ledger.record(entry(ts=T0 + h * 3600 + 5))
    ledger.flush()
    assert len(rows(ledger.path, bucket_s=3600)) == 30
    days = rows(ledger.path, bucket_s=86400)
    assert [r.requests for r in days] == [24, 6]
    text = savings_report(ledger.path, by=("tenant",), bucket="day")
    assert "2026-01-01" in text and "2026-01-02" in text and "TOTAL" in text
    hourly = savings_report(ledger.path, by=("model",), bucket="hour", since=T0 + 20 * 3600)
    assert "2026-01-01 20:00" in hourly and "2026-01-01 19:00" not in hourly
    assert "no ledger rows" in savings_report(ledger.path, since=T0 + 100 * 86400)


def test_costs_under_the_shown_decimals_keep_two_significant_digits(ledger):
    # 12 embeddings tokens at $0.00002 per 1K cost $0.00000024: it printed $0.0000, as
    # if nothing were spent.
    ledger.record(entry(model=EMBED, baseline=EMBED, tin=12, tout=0))
    ledger.flush()
    total = savings_report(ledger.path, by=(), bucket="total").splitlines()[-1].split()
    assert total[:5] == ["TOTAL", "1", "0", "$0.00000024", "$0.00000024"]
    assert total[5] == "$0.0000"  # no savings: zero is zero


def test_costs_under_the_last_decimal_are_not_rounded_up(ledger):
    # $0.00006135 printed as $0.0001, while smaller sums printed in full.
    ledger.record(entry(tin=409, tout=0))  # 409 small input tokens: $0.00006135
    ledger.flush()
    total = savings_report(ledger.path, by=(), bucket="total").splitlines()[-1].split()
    assert total[3] == "$0.000061"


def test_a_larger_sum_keeps_two_significant_digits_too(ledger):
    # $0.000142 printed as $0.0001, one digit, beside $0.000074 in full: a TOTAL row whose
    # savings read 68% of a baseline it printed at 47.8%.
    ledger.record(entry(tin=947, tout=0))  # $0.00014205
    ledger.flush()
    total = savings_report(ledger.path, by=(), bucket="total").splitlines()[-1].split()
    assert total[3] == "$0.00014"


def test_report_refuses_bad_input(tmp_path, ledger):
    with pytest.raises(FileNotFoundError):
        savings_report(tmp_path / "missing.sqlite3")
    ledger.record(entry())
    ledger.flush()
    with pytest.raises(ValueError, match="cannot group by"):
        savings_report(ledger.path, by=("tenant; DROP TABLE ledger",))
    with pytest.raises(ValueError, match="bucket"):
        savings_report(ledger.path, bucket="week")  # type: ignore[arg-type]


def test_parse_since():
    assert parse_since("24h", now=T0) == T0 - 86400
    assert parse_since("7d", now=T0) == T0 - 7 * 86400
    assert parse_since("2026-01-01") == T0
    assert parse_since("2026-01-01T01:00:00+01:00") == T0
    # Past what a float holds: before the epoch, not a traceback.
    assert parse_since("9" * 320 + "h", now=T0 + 0.5) == 0


def test_background_thread_flushes_periodically(tmp_path):
    lg = AsyncLedger(tmp_path / "l.sqlite3", flush_interval_s=0.05)
    try:
        lg.record(entry())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and lg.flushes == 0:
            time.sleep(0.01)
        assert rows(lg.path)[0].requests == 1
    finally:
        lg.close()


def test_close_writes_the_rest_and_refuses_more(tmp_path):
    lg = AsyncLedger(tmp_path / "l.sqlite3", flush_interval_s=60)
    lg.record(entry())
    lg.close()
    assert rows(lg.path)[0].requests == 1
    with pytest.raises(RuntimeError):
        lg.record(entry())
    lg.close()                                                    # idempotent


def test_record_never_waits_for_the_database(tmp_path):
    lg = AsyncLedger(tmp_path / "l.sqlite3", flush_interval_s=0.01)
    blocker = sqlite3.connect(lg.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")            # the writer now waits on busy_timeout
    try:
        t0 = time.perf_counter()
        for i in range(5000):
            lg.record(entry(tenant=f"t{i % 50}"))
        assert time.perf_counter() - t0 < 1.0     # ~µs each, no I/O on this thread
    finally:
        blocker.rollback()
        blocker.close()
    lg.close()
    assert sum(r.requests for r in rows(lg.path)) == 5000


def test_a_failed_flush_keeps_the_rows(ledger, monkeypatch):
    real = db.write_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(db, "write_batch", flaky)
    ledger.record(entry())
    with pytest.raises(sqlite3.OperationalError):
        ledger.flush()
    ledger.record(entry())
    ledger.flush()
    assert rows(ledger.path)[0].requests == 2 and ledger.flush_errors == 1


def test_several_writers_share_one_file(tmp_path):
    path = tmp_path / "shared.sqlite3"
    writers = [AsyncLedger(path, flush_interval_s=0.01) for _ in range(3)]

    def work(lg: AsyncLedger) -> None:
        for _ in range(500):
            lg.record(entry())

    threads = [threading.Thread(target=work, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    (r,) = rows(path)
    assert r.requests == 1500
    assert r.cost_pico == 1500 * SMALL.cost_pico(1000, 100)


def test_price_book_snapshots_config_models_once():
    from types import SimpleNamespace

    model = SimpleNamespace(name="small", price=SimpleNamespace(input_per_1k=0.00015,
                                                               output_per_1k=0.0006))
    book = PriceBook()
    first = book.snapshot(model)
    assert first == SMALL and book.snapshot(model) is first
    model.price = SimpleNamespace(input_per_1k=0.0003, output_per_1k=0.0006)
    assert book.snapshot(model).version != first.version


def test_a_row_beyond_64_bits_is_kept_as_a_real_not_blocking_the_rest(ledger, caplog):
    ledger.record(entry(tenant="alice"))
    ledger.record(entry(tenant="bob", tin=10 ** 14))              # cost > int64 picodollars
    with caplog.at_level("ERROR", logger="atp.ledger"):
        assert ledger.flush() == 2
    assert not caplog.records
    ledger.record(entry(tenant="carol"))
    assert ledger.flush() == 1 and ledger.flush_errors == 0
    assert {r.group[0] for r in rows(ledger.path)} == {"alice", "bob", "carol"}


def test_a_price_beyond_64_bits_drops_its_rows_only(ledger, caplog):
    huge = PriceSnapshot.of("huge", 10 ** 10, 0)                  # 1e19 pico per token
    ledger.record(entry(model=huge, tenant="bob", tin=0, tout=0, baseline=None))
    ledger.record(entry(tenant="alice"))
    with caplog.at_level("ERROR", logger="atp.ledger"):
        assert ledger.flush() == 1
    assert any("dropped a price" in r.getMessage() for r in caplog.records)
    assert [r.group[0] for r in rows(ledger.path)] == ["alice"]
    conn = sqlite3.connect(ledger.path)
    versions = {v for (v,) in conn.execute("SELECT version FROM price_snapshots")}
    conn.close()
    assert versions == {SMALL.version, LARGE.version}


def test_report_opens_a_ledger_whose_path_has_uri_characters(tmp_path):
    for name in ("run#1", "a?b", "x%41y"):
        path = tmp_path / name / "ledger.sqlite3"
        lg = AsyncLedger(path, start=False)
        lg.record(entry())
        lg.close()
        assert rows(path)[0].requests == 1
        assert "TOTAL" in savings_report(str(path), bucket="total")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?b", "run#1", "x%41y"]


@pytest.mark.asyncio
async def test_services_close_logs_a_failed_final_flush(tmp_path, caplog, monkeypatch):
    from atp_extproc.services import Services

    lg = AsyncLedger(tmp_path / "l.sqlite3", start=False)
    services = Services(None, None, None, lg)  # type: ignore[arg-type]

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    lg.record(entry())
    monkeypatch.setattr(db, "write_batch", broken)
    with caplog.at_level("ERROR", logger="atp.services"):
        await services.close()
    # The error says all: a traceback beside it would bury it.
    (said,) = [r for r in caplog.records if "final flush failed" in r.getMessage()]
    assert "disk I/O error" in said.getMessage() and not said.exc_info


def test_the_report_sums_past_int64_without_failing(tmp_path) -> None:
    # Each hour's row fits 64 bits; their sum ($12M in picodollars) does not.
    conn = db.connect(tmp_path / "ledger.sqlite3")
    price = PriceSnapshot.of("m", 1000, 1000)
    big = 6 * 10**18
    for hour in (0, 3600):
        key = (hour, "t", "r", "m", 0, price.version, "m", price.version)
        db.write_batch(conn, {key: [1, 0, 0, 1, 1, big, big]}, [price], [], 0)
    (row,) = db.savings(conn, ["tenant"], None)
    assert row.cost_pico == pytest.approx(2 * big, rel=1e-12)


def test_parse_since_before_the_epoch_is_the_epoch():
    assert parse_since("99999999999999999999d", now=T0) == 0


def test_a_route_dearer_than_its_baseline_shows_a_loss_as_accounts_write_it(ledger):
    # Printed as $-0.0115; a minus sign goes before the currency sign.
    ledger.record(entry(model=LARGE, baseline=SMALL, tin=1000, tout=1000))
    ledger.flush()
    report = savings_report(str(ledger.path), by=("tenant",), bucket="total")
    assert "-$0.0118" in report and "$-" not in report  # 0.0125 - 0.00075 = 0.01175
