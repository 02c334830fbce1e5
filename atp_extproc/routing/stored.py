"""Which model served each stored Responses answer, so that a later turn naming it
(`previous_response_id`) reaches the provider that holds it: another provider cannot read
it and answers 404, which teaches the router nothing. Per process and bounded: a turn
that another replica (or an earlier run) answered is routed as any request is."""

from __future__ import annotations

# About 100 bytes an answer: 5 MB at most.
CAPACITY = 50_000


class StoredAnswers:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        # (tenant, id)'s hash → model name, oldest first. The hash, not the strings: the
        # ids are long, and a 64-bit collision among 50,000 is as good as impossible.
        self._homes: dict[int, str] = {}

    def note(self, tenant: str, response_id: str, model: str) -> None:
        key = hash((tenant, response_id))
        self._homes.pop(key, None)
        self._homes[key] = model
        if len(self._homes) > self._capacity:
            del self._homes[next(iter(self._homes))]

    def home(self, tenant: str, response_id: str) -> str | None:
        """The model that stored the tenant's answer `response_id`, if this process saw
        it."""
        return self._homes.get(hash((tenant, response_id)))
