"""Costs past SQLite's 64-bit integers: a request's row keeps it and its other requests.

Usage counts up to 10^9 and prices up to config.MAX_PRICE_PER_1K are valid, so one
request can cost 2e21 picodollars: more than a 64-bit row holds.
"""

from __future__ import annotations

import logging

import pytest

from atp_extproc.config import MAX_PRICE_PER_1K
from atp_extproc.llm_api import MAX_USAGE_TOKENS
from atp_extproc.routing.report import savings_report
from atp_extproc.store import AsyncLedger, LedgerEntry, PriceSnapshot, connect, savings
from atp_extproc.store import sqlite as db

T0 = 1_767_225_600            # 2026-01-01 00:00 UTC
PRICEY = PriceSnapshot.of("pricey", 10, 10)          # 1e10 picodollars per token
CHEAP = PriceSnapshot.of("cheap", 0.0025, 0.01)
TOP = PriceSnapshot.of("top", MAX_PRICE_PER_1K, MAX_PRICE_PER_1K)


def entry(tin: int, tout: int, price: PriceSnapshot = PRICEY,
          baseline: PriceSnapshot | None = CHEAP, ts: float = T0 + 10) -> LedgerEntry:
    return LedgerEntry(ts=ts, tenant="alice", route="chat", model=price.model, price=price,
                       baseline=baseline, input_tokens=tin, output_tokens=tout)


@pytest.fixture
def ledger(tmp_path):
    lg = AsyncLedger(tmp_path / "ledger.sqlite3", start=False)
    yield lg
    lg.close()


def total(path) -> db.SavingsRow:
    conn = connect(path, readonly=True)
    try:
        (row,) = savings(conn, ("tenant",), None)
    finally:
        conn.close()
    return row


def test_a_usage_of_a_billion_tokens_keeps_its_row_and_the_other_requests(ledger, caplog):
    # The upstream reports the largest count ATP accepts, between two ordinary requests.
    with caplog.at_level(logging.WARNING, logger="atp.ledger"):
        for tin in (11, MAX_USAGE_TOKENS, 11):
            ledger.record(entry(tin, 7 if tin == 11 else 0))
        assert ledger.flush() == 1
    assert not caplog.records and ledger.flush_errors == 0
    row = total(ledger.path)
    cost = 10 ** 19 + 2 * 18 * 10 ** 10          # $10M and two requests of $0.18
    baseline = CHEAP.cost_pico(MAX_USAGE_TOKENS + 22, 14)
    assert row.requests == 3
    # Exact: $10,000,000.36 is a whole number of 2048-picodollar steps of a double.
    assert (row.cost_pico, row.baseline_pico) == (cost, baseline)
    assert row.savings_pico == pytest.approx(baseline - cost, rel=1e-15)
    report = savings_report(ledger.path, by=("tenant",), bucket="total")
    assert "$10,000,000.3600" in report and "no ledger rows" not in report


def test_requests_each_within_64_bits_keep_a_row_whose_sum_is_not(ledger):
    half = 5 * 10 ** 8                            # $5M each: $10M in one row
    for _ in range(2):
        ledger.record(entry(half, 0))
    ledger.record(entry(11, 7))
    assert ledger.flush() == 1 and ledger.flush_errors == 0
    row = total(ledger.path)
    assert (row.requests, row.cost_pico) == (3, 10 ** 19 + 18 * 10 ** 10)


def test_the_dearest_valid_request_is_kept_and_flushes_go_on(ledger):
    most = MAX_USAGE_TOKENS
    ledger.record(entry(most, most, price=TOP, baseline=None))   # 2e21 picodollars
    ledger.record(entry(11, 7, price=TOP, baseline=None))
    assert ledger.flush() == 1
    ledger.record(entry(11, 7, price=TOP, baseline=None))
    assert ledger.flush() == 1 and ledger.flush_errors == 0
    row = total(ledger.path)
    assert row.requests == 3
    assert row.cost_pico == pytest.approx(2 * 10 ** 21 + 2 * 18 * 10 ** 12, rel=1e-15)
    assert row.savings_pico == 0


def test_two_atps_sharing_the_file_add_their_rows_past_64_bits(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    a, b = AsyncLedger(path, start=False), AsyncLedger(path, start=False)
    try:
        a.record(entry(11, 7))
        assert a.flush() == 1                     # the row starts as an INTEGER
        b.record(entry(MAX_USAGE_TOKENS, 0))
        b.record(entry(11, 7))
        assert b.flush() == 1
        a.record(entry(MAX_USAGE_TOKENS, 0))
        assert a.flush() == 1
    finally:
        a.close()
        b.close()
    row = total(path)
    assert row.requests == 4
    assert row.cost_pico == pytest.approx(2 * 10 ** 19 + 2 * 18 * 10 ** 10, rel=1e-15)
