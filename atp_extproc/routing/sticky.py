"""Sticky assignment: the same tenant or user keeps the same candidate.

Weighted rendezvous hashing: each (key, candidate) pair gets a stable pseudo-random
u ∈ (0, 1) from BLAKE2b (not Python's salted hash, so every process and restart agrees),
and the key goes to the candidate maximising weight / -ln(u). A key lands on a candidate
with probability proportional to its weight; when one weight changes or a candidate
leaves, only keys moving to or from that candidate move.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_CACHE_KEYS = 4096


class StickyHasher:
    __slots__ = ("_cache",)

    def __init__(self) -> None:
        # key → {candidate: -ln(u)}; bounded, oldest keys dropped first.
        self._cache: dict[str, dict[str, float]] = {}

    def _per_key(self, key: str) -> dict[str, float]:
        per_key = self._cache.get(key)
        if per_key is None:
            if len(self._cache) >= _CACHE_KEYS:
                self._cache.pop(next(iter(self._cache)))
            per_key = self._cache[key] = {}
        return per_key

    def pick(self, key: str, names: Sequence[str], weights: Sequence[float]) -> int:
        """Index of the candidate `key` sticks to. Candidates with weight ≤ 0 are skipped
        unless every weight is ≤ 0 (then plain rendezvous over all of them)."""
        per_key = self._per_key(key)
        positive = any(w > 0.0 for w in weights)
        best = 0
        best_score = -1.0
        for i, name in enumerate(names):
            w = weights[i] if positive else 1.0
            if w <= 0.0:
                continue
            e = per_key.get(name)
            if e is None:
                e = per_key[name] = _exponential(key, name)
            s = w / e
            if s > best_score:
                best, best_score = i, s
        return best


def _exponential(key: str, name: str) -> float:
    digest = hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8).digest()
    return -math.log((int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64)


def stable_unit(key: str) -> float:
    """A stable u ∈ (0, 1) for a string (e.g. a request id for a mirror share)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64


def sticky_key(sticky: str, tenant: str | None, user: str | None) -> str | None:
    """The key a route's `sticky:` setting asks for (None: not sticky, or unknown user).

    The tenant is prefixed so that a user id equal to some tenant name cannot collide,
    and length-prefixed because tenant names may contain ':' (else tenant 'a:x' with user
    'b' and tenant 'a' with user 'x:b' would share a key). A user's key is a digest: the
    body's `user`, kept whole in the caches, let a caller hold megabytes per request
    (and an end user's address stayed in memory)."""
    if sticky == "tenant":
        return f"t:{tenant}" if tenant else None
    if sticky == "user":
        if not user:
            return None
        tenant = tenant or ""
        named = f"{len(tenant)}:{tenant}:{user}".encode("utf-8", "surrogatepass")
        return "u:" + hashlib.blake2b(named, digest_size=16).hexdigest()
    return None
