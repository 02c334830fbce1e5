"""Redaction speed on realistic chat bodies: `run()` returns the figures for `make bench`.

Bodies are generated with a fixed seed: prose in several languages, code, numbers that are
not personal data (dates, versions, prices, order numbers), and a little PII (an e-mail
address, a phone number, a card or an IBAN every couple of KiB). Times cover
`Redactor.redact()` on the parsed document, which is what the request path adds.

    python -m atp_extproc.redact.bench
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from atp_extproc.redact.redactor import Redactor
from atp_extproc.redact.settings import RedactionSettings

_WORDS = (
    "the a of to and in is that for it as with was on be by this are or from at have an "
    "which but not can all were we when your there use each how about many then them these "
    "so some would make like into time has look two more write see number way could people "
    "than first water been call who oil its now find long down day did get come made may "
    "part request response model latency budget cluster deploy config review customer "
    "invoice schedule meeting summary draft analysis report quarter revenue growth forecast"
).split()
_OTHER = (
    "Der Bericht für das dritte Quartal ist fertig, bitte prüfen Sie die Zahlen.",
    "Merci de vérifier le document avant la réunion de vendredi à 10h.",
    "El informe incluye las cifras de ventas del último trimestre.",
    "会議は来週の火曜日に変更になりました。資料を確認してください。",
    "请在周五之前提交报告并确认所有数据都正确。",
)
_CODE = (
    "```python\ndef total(items):\n    return sum(i.price * i.qty for i in items)\n```",
    "```sql\nSELECT id, created_at FROM orders WHERE status = 'open' LIMIT 100;\n```",
    "```js\nconst res = await fetch('/api/v2/items?page=3');\n```",
)
_BENIGN = (
    "Version 2.14.3 shipped on 2024-05-17 10:32:00.", "Order #4829173 costs $1,299.99.",
    "See commit 3f5a9b1c2d4e6f7a8b9c0d1e2f3a4b5c6d7e8f90.",
    "uuid 550e8400-e29b-41d4-a716-446655440000",
    "It grew 12% to 48,200 units in Q3 2023.", "Invoice INV-2024-000123 is due 30/06/2024.",
)
_PII = (
    "Reach me at jane.doe@example.com.", "My phone is +44 20 7946 0958.",
    "Card 4111 1111 1111 1111 exp 12/27.", "IBAN DE89 3704 0044 0532 0130 00.",
    "Call (415) 555-2671 tomorrow.", "server 10.20.30.40 is down",
)


def _paragraph(rng: random.Random, size: int) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        r = rng.random()
        if r < 0.70:
            s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
        elif r < 0.80:
            s = rng.choice(_OTHER)
        elif r < 0.86:
            s = rng.choice(_CODE)
        elif r < 0.97:
            s = rng.choice(_BENIGN)
        else:
            s = rng.choice(_PII)
        out.append(s)
        n += len(s.encode()) + 1
    return " ".join(out)


def chat_body(size: int, seed: int = 0) -> dict[str, Any]:
    """A chat request of about `size` bytes of JSON."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are a helpful assistant for the sales "
                                              "operations team. Answer briefly."}]
    budget = max(0, size - 200)
    turns = max(1, min(12, budget // 700))
    per = max(40, budget // turns)
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        messages.append({"role": role, "content": _paragraph(rng, per)})
    return {"model": "gpt-4o-mini", "messages": messages, "temperature": 0.2}


def _timings(redactor: Redactor, doc: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        redactor.redact("chat", doc, "bench")
        out.append(time.perf_counter() - t0)
    return sorted(out)


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def run() -> dict[str, Any]:
    redactor = Redactor(RedactionSettings())
    out: dict[str, Any] = {}
    for kib, n in ((1, 3000), (4, 1500), (32, 300)):
        docs = [chat_body(kib * 1024, seed=s) for s in range(20)]
        size = sum(len(json.dumps(d).encode()) for d in docs) / len(docs) / 1024
        times: list[float] = []
        for d in docs:
            times.extend(_timings(redactor, d, max(1, n // len(docs))))
        times.sort()
        out[f"chat_{kib}k_p50_us"] = round(_pct(times, 0.50) * 1e6, 1)
        out[f"chat_{kib}k_p99_us"] = round(_pct(times, 0.99) * 1e6, 1)
        out[f"chat_{kib}k_p50_us_per_kib"] = round(_pct(times, 0.50) * 1e6 / size, 1)
        out[f"chat_{kib}k_p99_us_per_kib"] = round(_pct(times, 0.99) * 1e6 / size, 1)
    clean = {"model": "m", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": " ".join(random.Random(1).choice(_WORDS)
                                             for _ in range(170))}]}
    times = _timings(redactor, clean, 5000)
    out["clean_1k_p50_us"] = round(_pct(times, 0.5) * 1e6, 1)
    out["clean_1k_p99_us"] = round(_pct(times, 0.99) * 1e6, 1)
    big = chat_body(1 << 20, seed=99)
    times = _timings(redactor, big, 10)
    out["chat_1m_p50_ms"] = round(_pct(times, 0.5) * 1e3, 2)
    out["chat_1m_max_ms"] = round(times[-1] * 1e3, 2)
    out["limits"] = {"p99_us_per_kib": 1000.0, "chat_1m_p50_ms": 50.0}
    # The 1 MiB bar is judged on the median of 10 runs: a single run on a shared 2-core
    # machine is at the mercy of its neighbours; the max is reported alongside.
    out["ok"] = (all(out[f"chat_{k}k_p99_us_per_kib"] <= 1000.0 for k in (1, 4, 32))
                 and out["chat_1m_p50_ms"] < 50.0)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
