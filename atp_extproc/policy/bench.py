"""In-process cost of the example policy set per request: `run() -> dict` for `make bench`.

A "request" here is everything the exchange will pay per request: building the bounded
attribute document from plain values, and evaluating every example policy (one CEL
program: request-level, per candidate and per tool) including combining decisions and
counting them; materialising the decision records (which the exchange's log reads
after the request has gone on) is timed apart as `records`. Request shapes rotate
between a plain chat, a chat with tools and personal data over two candidates (one
restricted, one tool stripped, a dry-run restrict), a JWT embedding, and a denied
request.

    python -m atp_extproc.policy.bench
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

from atp_extproc.policy.attributes import CandidateInfo, build_attributes
from atp_extproc.policy.engine import PolicySet
from atp_extproc.policy.settings import PolicySettings, load_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "policies"

SMALL = CandidateInfo("small", "demo_a", "local", "internal", 0.00015, 0.0006, "demo_a")
LARGE = CandidateInfo("large", "demo_b", "local", "external", 0.0025, 0.01, "demo_b")
EMBED = CandidateInfo("embed", "demo_a", "local", "internal", 0.00002, 0.0, "demo_a")

SHAPES: list[tuple[dict[str, Any], dict[str, Any], list[CandidateInfo]]] = [
    ({"tenant": "alice", "auth_method": "api_key", "key_id": "alice-demo"},
     {"path": "/v1/chat/completions", "operation": "chat", "alias": "gpt-4o-mini",
      "token_estimate": 350, "message_count": 3, "max_tokens": 512, "body_bytes": 1400},
     [SMALL]),
    ({"tenant": "bob", "auth_method": "api_key", "key_id": "bob-demo"},
     {"path": "/v1/chat/completions", "operation": "chat", "alias": "gpt-4o-mini",
      "token_estimate": 1200, "message_count": 6, "max_tokens": 1024,
      "data_classes": {"email": 2, "phone": 1}, "metadata": {"app": "helpdesk"},
      "tool_details": [{"name": "get_weather", "parameters": ["city"]},
                       {"name": "calendar", "parameters": ["date", "title"]},
                       {"name": "search_docs", "called": True,
                        "arguments": {"query": "x", "max_results": "10"}}],
      "body_bytes": 6000},
     [LARGE, SMALL]),
    ({"tenant": "alice", "auth_method": "jwt", "user": "a@example.com",
      "groups": ["llm-users"], "claims": {"sub": "a@example.com", "residency": "local"}},
     {"path": "/v1/embeddings", "operation": "embeddings",
      "alias": "text-embedding-3-small", "token_estimate": 80, "body_bytes": 300},
     [EMBED]),
    ({"tenant": "bob", "auth_method": "api_key", "key_id": "bob-demo"},
     {"path": "/v1/chat/completions", "operation": "chat", "alias": "gpt-4o-mini",
      "token_estimate": 500, "message_count": 2, "max_tokens": 8000,
      "data_classes": {"api_key": 1}, "body_bytes": 2100},
     [SMALL]),
]


def example_policy_set() -> PolicySet:
    policies = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        loaded = load_file(path)
        policies += loaded.policies
    return PolicySet.compile(policies, PolicySettings(default="deny"), str(EXAMPLES))


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def run(iterations: int = 20000, warmup: int = 2000) -> dict[str, Any]:
    policy_set = example_policy_set()
    context = {"route": "chat", "environment": "prod", "request_id": "bench-1",
               "config_version": "abc123"}
    total: list[float] = []
    build: list[float] = []
    evaluate: list[float] = []
    cpu: list[float] = []
    records: list[float] = []
    by_shape: list[list[float]] = [[] for _ in SHAPES]
    clock = time.perf_counter_ns
    cpu_clock = time.thread_time_ns
    n_shapes = len(SHAPES)
    for i in range(warmup + iterations):
        subject, request, candidates = SHAPES[i % n_shapes]
        c0 = cpu_clock()
        t0 = clock()
        attrs = build_attributes(subject, request, context)
        t1 = clock()
        outcome = policy_set.evaluate(attrs, candidates)
        t2 = clock()
        c1 = cpu_clock()
        outcome.records  # noqa: B018 - what the exchange's log will read, timed apart
        t3 = clock()
        if i >= warmup:
            build.append((t1 - t0) / 1000.0)
            evaluate.append((t2 - t1) / 1000.0)
            total.append((t2 - t0) / 1000.0)
            cpu.append((c1 - c0) / 1000.0)
            records.append((t3 - t2) / 1000.0)
            by_shape[i % n_shapes].append((t2 - t0) / 1000.0)
        if i == warmup:
            # As the server does once it has started (server.py): start-up objects out of
            # the collector's way.
            gc.collect()
            gc.freeze()
    out: dict[str, Any] = {"policies": len(policy_set.policies),
                           "requests": iterations, "shapes": n_shapes}
    # request: wall time of build + evaluate; request_cpu: the same in thread CPU time,
    # which a busy shared machine inflates less; records: materialising the records.
    for name, values in (("request", total), ("request_cpu", cpu),
                         ("build_attributes", build), ("evaluate", evaluate),
                         ("records", records)):
        values.sort()
        out[f"{name}_p50_us"] = round(_percentile(values, 0.50), 1)
        out[f"{name}_p99_us"] = round(_percentile(values, 0.99), 1)
        out[f"{name}_mean_us"] = round(statistics.fmean(values), 1)
    # Per request shape (0 plain chat, 1 tools + PII + two candidates, 2 JWT embedding,
    # 3 denied): the mix's p99 is mostly shape 1's tail.
    for values in by_shape:
        values.sort()
    out["shape_p50_us"] = [round(_percentile(v, 0.50), 1) for v in by_shape]
    out["shape_p99_us"] = [round(_percentile(v, 0.99), 1) for v in by_shape]
    out["p50_us"] = out["request_p50_us"]
    out["p99_us"] = out["request_p99_us"]
    out["bar_p99_us"] = 100.0
    out["ok"] = out["p99_us"] <= out["bar_p99_us"]
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
