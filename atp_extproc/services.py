"""Process-wide state that exchanges share: the learned router, quality feedback, the
cost ledger. Lives as long as the server; survives config reloads (keyed by names)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from atp_extproc.config import Snapshot
from atp_extproc.routing.feedback import FeedbackBook
from atp_extproc.routing.router import Router
from atp_extproc.routing.stored import StoredAnswers
from atp_extproc.store.ledger import AsyncLedger, said_whole
from atp_extproc.store.money import PriceBook

_FEEDBACK_EXPIRY_S = 1.0

log = logging.getLogger("atp.services")


@dataclass
class Services:
    router: Router
    feedback: FeedbackBook
    prices: PriceBook
    ledger: AsyncLedger | None
    stored: StoredAnswers = field(default_factory=StoredAnswers)

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
            # Shutting down goes on either way, but rows the final flush could not write
            # are lost: say so.
            try:
                await self.ledger.aclose()
            except Exception as exc:
                log.error("ledger: the final flush failed (%s: %s); lost: %s",
                          type(exc).__name__, exc, self.ledger.pending(),
                          exc_info=not said_whole(exc))
