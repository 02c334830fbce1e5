"""Process-wide state that exchanges share: the learned router, quality feedback, the
cost ledger. Lives as long as the server; survives config reloads (keyed by names)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from atp_extproc.config import Snapshot
from atp_extproc.routing.feedback import FeedbackBook
from atp_extproc.routing.router import Router
from atp_extproc.store.ledger import AsyncLedger
from atp_extproc.store.money import PriceBook

_FEEDBACK_EXPIRY_S = 1.0


@dataclass
class Services:
    router: Router
    feedback: FeedbackBook
    prices: PriceBook
    ledger: AsyncLedger | None

    @classmethod
    def start(cls, snapshot: Snapshot) -> Services:
        router = Router()
        settings = snapshot.ledger
        ledger = (AsyncLedger(settings.path, settings.flush_interval_s)
                  if settings.enabled else None)
        return cls(router, FeedbackBook(router.observe_quality), PriceBook(), ledger)

    async def run_expiry(self) -> None:
        # Requests nobody scored fall back to their proxy score once their window ends.
        while True:
            await asyncio.sleep(_FEEDBACK_EXPIRY_S)
            self.feedback.expire()

    async def close(self) -> None:
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                await self.ledger.aclose()
