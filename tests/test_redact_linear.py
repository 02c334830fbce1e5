"""Linear time on adversarial input: time for 4x the text stays near 4x.

Every pattern runs on RE2 (no backtracking); Python-side work is bounded per candidate,
and a per-request work budget stops a scan of pathological input early (the body is then
reported incomplete and refused). Times are compared side by side in one run, best of
several tries, with generous margins: linear growth is 4x, quadratic would be 16x.
"""

from __future__ import annotations

import random
import time

import pytest

from atp_extproc.redact import RedactionSettings, Redactor, detectors
from atp_extproc.redact.bench import chat_body

KIB = 1024
MIB = 1024 * KIB

ADVERSARIAL = {
    "word_run": "a",
    "digit_run": "7",
    "email_near": "a@",
    "email_dots": "a.b@",
    "digit_soup": "1 ",
    "card_near": "4111 1111 1111 111 ",
    "phone_near": "06 12 ",
    "iban_near": "DE89 3704 ",
    "aws_near": "AKIAAAAAAAAAAAAAAAA ",
    "sk_near": "sk-aaaaaaaaaaaaaaaaa ",
    "jwt_near": "eyJaaaaaaaaa.",
    "pem_open": "-----BEGIN PRIVATE KEY-----\n",
    "dotted": "1.1.1.",
    "colons": ":",
    "hex_colons": "ab:",
    "escape_near": "\\u00",
    "zero_width": "\u200b",
    "fullwidth": "\uff14",
    "mixed": "x\u200b1 ",
    "placeholder_near": "[EMAIL_",
}


def _doc(unit: str, size: int) -> dict:
    text = (unit * (size // len(unit) + 1))[:size]
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def _best(redactor: Redactor, doc: dict, tries: int) -> float:
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        redactor.redact("chat", doc, "t")
        best = min(best, time.perf_counter() - t0)
    return best


def _ratio_ok(small: float, big: float) -> bool:
    # 4x the input; allow 8x, plus a little absolute slack for millisecond timings.
    return big <= 8 * small + 0.03


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionSettings())


@pytest.mark.parametrize("kind", list(ADVERSARIAL))
def test_linear_growth_with_default_budget(redactor, kind):
    small, big = _doc(ADVERSARIAL[kind], 1 * MIB), _doc(ADVERSARIAL[kind], 4 * MIB)
    redactor.redact("chat", small, "t")  # warm caches
    t_small = _best(redactor, small, 2)
    t_big = _best(redactor, big, 2)
    assert _ratio_ok(t_small, t_big), (kind, t_small, t_big)


@pytest.mark.parametrize("kind", ["digit_soup", "card_near", "phone_near", "iban_near",
                                  "mixed", "escape_near", "dotted", "jwt_near"])
def test_linear_growth_without_budget(monkeypatch, kind):
    """The algorithms themselves are linear, not merely cut off by the budget."""
    monkeypatch.setattr(detectors.Budget, "for_text", classmethod(lambda cls, n: cls(10**12)))
    r = Redactor(RedactionSettings())
    small, big = _doc(ADVERSARIAL[kind], 32 * KIB), _doc(ADVERSARIAL[kind], 128 * KIB)
    r.redact("chat", small, "t")
    t_small = _best(r, small, 3)
    t_big = _best(r, big, 2)
    assert not r.redact("chat", big, "t").incomplete
    assert _ratio_ok(t_small, t_big), (kind, t_small, t_big)


def test_pathological_input_is_reported_and_refused(redactor):
    res = redactor.redact("chat", _doc("1 ", 1 * MIB), "t")
    assert res.incomplete and res.denied == ("scan_incomplete",)
    allow = Redactor(RedactionSettings(on_incomplete="allow"))
    res = allow.redact("chat", _doc("1 ", 1 * MIB), "t")
    assert res.incomplete and res.denied == ()


@pytest.mark.parametrize("size", [1 * KIB, 32 * KIB, 1 * MIB, 4 * MIB])
def test_realistic_bodies_stay_well_inside_the_budget(monkeypatch, size):
    used = []
    original = detectors.Budget.for_text.__func__

    def recording(cls, n):
        budget = original(cls, n)
        used.append((budget, budget.left))
        return budget

    monkeypatch.setattr(detectors.Budget, "for_text", classmethod(recording))
    r = Redactor(RedactionSettings())
    res = r.redact("chat", chat_body(size, seed=7), "t")
    assert not res.incomplete
    budget, start = used[0]
    assert start - budget.left < start / 4  # at least 4x headroom
    assert res.counts or size < 4 * KIB  # the bodies do carry some PII


def _app_log(lines: int, rng: random.Random) -> str:
    return "Why are requests slow?\n" + "\n".join(
        f"2024-05-{i % 28 + 1:02d} 09:{i % 60:02d}:{i * 7 % 60:02d} INFO request "
        f"{rng.randint(10**6, 10**7)} took {rng.randint(1, 999)} ms" for i in range(lines))


def _contacts_csv(rows: int, rng: random.Random) -> str:
    return "name,email,phone\n" + "\n".join(
        f"Customer {i},customer{i}@example.com,({rng.randint(201, 989)}) "
        f"{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}" for i in range(rows))


@pytest.mark.parametrize("make", [_app_log, _contacts_csv])
@pytest.mark.parametrize("lines", [2_000, 10_000])  # about 100 and 500 KB
def test_text_dense_with_numbers_is_scanned_whole(make, lines):
    # A pasted log or a contact list: 2,000 lines (100 KB) were refused as too costly
    # to scan, at about a tenth of a second of work.
    res = Redactor(RedactionSettings()).redact(
        "chat", {"model": "m", "messages": [{"role": "user",
                                              "content": make(lines, random.Random(2))}]},
        "t")
    assert not res.incomplete
