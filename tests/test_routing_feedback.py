"""Quality feedback keyed by request id, with the finish_reason proxy as fallback."""

from __future__ import annotations

import pytest

from atp_extproc.routing.feedback import FeedbackBook, finish_reason_score
from atp_extproc.routing.router import Router


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(capacity: int = 100, window_s: float = 60.0):
    got: list[tuple[str, str, float]] = []
    clock = Clock()
    book = FeedbackBook(lambda r, m, s: got.append((r, m, s)), capacity, window_s, clock)
    return book, got, clock


def test_explicit_feedback_counts_once_and_beats_the_proxy():
    book, got, _ = make()
    book.record_decision("req-1", "chat", "small")
    book.set_proxy("req-1", finish_reason_score("length"))
    assert book.feedback("req-1", 0.9)
    assert got == [("chat", "small", 0.9)]
    assert not book.feedback("req-1", 0.1)      # already scored
    assert book.expire() == 0 and got == [("chat", "small", 0.9)]


def test_proxy_is_used_when_no_feedback_arrives():
    book, got, clock = make()
    book.record_decision("a", "chat", "small")
    book.set_proxy("a", finish_reason_score("stop"))
    book.record_decision("b", "chat", "large")           # no proxy: nothing to learn
    clock.t = 61.0
    assert book.expire() == 2
    assert got == [("chat", "small", 1.0)]
    assert (book.proxied, book.unscored) == (1, 1)
    assert not book.feedback("a", 1.0)                    # too late


def test_proxy_given_with_the_decision_is_the_same_as_set_proxy():
    book, got, clock = make()
    book.record_decision("a", "chat", "small", proxy=finish_reason_score("length"))
    book.record_decision("b", "chat", "small", None, "alice", proxy=1.5)    # clamped
    book.record_decision("c", "chat", "small", proxy=-0.2)
    book.record_decision("d", "chat", "large", proxy=None)                  # no proxy
    for request_id, score in [("e", finish_reason_score("length")), ("f", 1.5),
                              ("g", -0.2), ("h", None)]:
        book.record_decision(request_id, "chat", "set")
        book.set_proxy(request_id, score)
    clock.t = 61.0
    assert book.expire() == 8
    assert got == [("chat", "small", 0.5), ("chat", "small", 1.0), ("chat", "small", 0.0),
                   ("chat", "set", 0.5), ("chat", "set", 1.0), ("chat", "set", 0.0)]
    assert (book.proxied, book.unscored) == (6, 2)


def test_late_feedback_is_refused_even_before_cleanup():
    book, got, clock = make()
    book.record_decision("a", "chat", "small")
    book.set_proxy("a", 0.5)
    clock.t = 100.0
    assert not book.feedback("a", 1.0)
    assert got == [("chat", "small", 0.5)]


def test_bounded_memory_evicts_oldest_with_their_proxy():
    book, got, _ = make(capacity=3)
    for i in range(5):
        book.record_decision(f"r{i}", "chat", "m")
        book.set_proxy(f"r{i}", 0.25)
    assert len(book) == 3
    assert got == [("chat", "m", 0.25), ("chat", "m", 0.25)]
    assert not book.feedback("r0", 1.0) and book.feedback("r4", 1.0)


def test_cleanup_is_amortised_on_record_decision():
    book, _, clock = make(capacity=10_000, window_s=1.0)
    for i in range(100):
        book.record_decision(f"r{i}", "chat", "m")
    clock.t = 5.0
    book.record_decision("new", "chat", "m")
    assert len(book) == 101 - 4


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_scores_must_be_in_unit_interval(bad):
    book, _, _ = make()
    book.record_decision("a", "chat", "m")
    with pytest.raises(ValueError):
        book.feedback("a", bad)


def test_finish_reason_proxy_mapping():
    assert finish_reason_score("stop") == 1.0
    assert finish_reason_score("length") == 0.5
    assert finish_reason_score("content_filter") == 0.0
    assert finish_reason_score("something_new") is None
    assert finish_reason_score(None) is None
    assert finish_reason_score("stop", {"stop": 0.7}) == 0.7


def test_feedback_reaches_the_router_estimate():
    router = Router(seed=1)
    router.observe("chat", "small", ok=True, latency_ms=100.0)
    book = FeedbackBook(router.observe_quality)
    for i in range(200):
        book.record_decision(f"r{i}", "chat", "small")
        book.feedback(f"r{i}", 0.1)
    assert router.snapshot()["chat"]["small"]["quality"] < 0.2
    book.record_decision("", "chat", "small")             # no request id: ignored
    assert len(book) == 0


def test_only_the_requesting_tenant_may_score():
    book, got, _ = make()
    book.record_decision("req-9", "chat", "small", tenant="alice")
    assert not book.feedback("req-9", 0.0, tenant="mallory")
    assert not book.feedback("req-9", 0.0)
    assert book.feedback("req-9", 0.8, tenant="alice")
    assert got == [("chat", "small", 0.8)]


def test_two_tenants_with_one_request_id_keep_their_own_feedback() -> None:
    # An app's own x-request-id (a trace id, which Istio keeps) sent by two tenants:
    # bob's request took alice's place, and her feedback was refused.
    scores: list[tuple[str, str, float]] = []
    book = FeedbackBook(lambda route, model, score: scores.append((route, model, score)))
    book.record_decision("trace-1", "chat", "small", tenant="alice")
    book.record_decision("trace-1", "chat", "large", tenant="bob")
    assert book.feedback("trace-1", 1.0, tenant="alice")
    assert not book.feedback("trace-1", 1.0, tenant="carol")
    assert book.feedback("trace-1", 0.0, tenant="bob")
    assert scores == [("chat", "small", 1.0), ("chat", "large", 0.0)]


def test_a_short_window_ends_on_time_behind_a_longer_one():
    # In one queue, a route's 1 s window waited behind another route's 600 s one: its
    # proxy scores were learned ten minutes late.
    book, got, clock = make()
    book.record_decision("long", "slow-feedback", "m", 600.0, proxy=0.5)
    book.record_decision("short", "chat", "m", 1.0, proxy=0.0)
    clock.t = 2.0
    assert book.expire() == 1 and got == [("chat", "m", 0.0)]
    assert book.feedback("long", 1.0) and len(book) == 0


def test_eviction_takes_the_oldest_of_every_window():
    book, got, clock = make(capacity=2)
    book.record_decision("a", "r", "m", 600.0, proxy=0.1)
    clock.t = 1.0
    book.record_decision("b", "r", "m", 1.0, proxy=0.2)
    book.record_decision("c", "r", "m", 1.0, proxy=0.3)
    assert got == [("r", "m", 0.1)] and len(book) == 2
    # ... when the oldest is not in the queue made first either.
    book, got, clock = make(capacity=2)
    book.record_decision("a", "r", "m", 600.0, proxy=0.1)
    book.record_decision("b", "r", "m", 1000.0, proxy=0.2)
    assert book.feedback("a", 1.0)  # the 600 s queue now empty
    clock.t = 1.0
    book.record_decision("c", "r", "m", 600.0, proxy=0.3)
    book.record_decision("d", "r", "m", 5.0, proxy=0.4)
    assert got == [("r", "m", 1.0), ("r", "m", 0.2)] and len(book) == 2
