"""Durable state. The embedded default is one SQLite file (WAL); see store.sqlite."""

from atp_extproc.store.ledger import AsyncLedger, LedgerEntry
from atp_extproc.store.money import PriceBook, PriceSnapshot, cents, usd
from atp_extproc.store.sqlite import SavingsRow, ShadowHalf, connect, savings

__all__ = [
    "AsyncLedger",
    "LedgerEntry",
    "PriceBook",
    "PriceSnapshot",
    "SavingsRow",
    "ShadowHalf",
    "cents",
    "connect",
    "savings",
    "usd",
]
