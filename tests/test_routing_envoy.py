"""Learned routing through a real Envoy: mirrored and decision-only shadow, breakers,
and the savings ledger checked to the cent against what the fake upstreams reported."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from atp_extproc.routing.router import SHARE_BATCH
from atp_extproc.stack import EXAMPLE_CONFIG, Stack, copy_example, wait_until
from tests.conftest import BOB, Upstreams, http, post

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
PRICES = {"small": (Decimal("0.00015"), Decimal("0.0006")),
          "large": (Decimal("0.0025"), Decimal("0.01"))}
EXTRA_ROUTES = [
    {"name": "mirrored", "match": {"paths": [CHAT]},
     "aliases": {"mirrored": ["small", "large"]},
     "objective": {"champion": "small",
                   "shadow": {"mode": "mirror", "challenger": "large", "share": 1.0}}},
    # Both internal: policy keeps requests with personal data off external models, and
    # that holds for mirrored copies too.
    {"name": "mirrored-internal", "match": {"paths": [CHAT]},
     "aliases": {"mirrored-internal": ["small", "embed"]},
     "objective": {"champion": "small",
                   "shadow": {"mode": "mirror", "challenger": "embed", "share": 1.0}}},
    {"name": "decided", "match": {"paths": [CHAT]},
     "aliases": {"decided": ["large", "small"]},
     "objective": {"champion": "large", "shadow": {"mode": "decision"}}},
    {"name": "pooled", "match": {"paths": [CHAT]}, "aliases": {"pooled": ["pooled"]}},
    {"name": "sticky", "match": {"paths": [CHAT]},
     "aliases": {"sticky": ["small", "large"]},
     # Exploration unbounded: without stickiness users would hop between candidates.
     "objective": {"champion": "small", "challengers": ["large"], "sticky": "user",
                   "exploration": 1.0}},
    {"name": "learned", "match": {"paths": [CHAT]},
     "aliases": {"learned": ["small", "large"]},
     # Errors weigh nothing in the objective, so only the breaker moves traffic off small.
     "objective": {"champion": "small", "challengers": ["large"],
                   "weights": {"cost": 1.0, "latency": 0.0, "quality": 0.0, "error": 0.0},
                   "breaker": {"min_requests": 10, "confidence": 0.0, "open_s": 300}}},
    # As "learned", but the breaker probes again after a second.
    {"name": "recovering", "match": {"paths": [CHAT]},
     "aliases": {"recovering": ["small", "large"]},
     "objective": {"champion": "small", "challengers": ["large"], "exploration": 0.0,
                   "weights": {"cost": 1.0, "latency": 0.0, "quality": 0.0, "error": 0.0},
                   "breaker": {"min_requests": 10, "confidence": 0.0, "open_s": 1.0,
                               "half_open_probes": 2}}},
]


def write_config(tmp_path: Path) -> Path:
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    doc["routes"] = EXTRA_ROUTES + doc["routes"]
    # demo_pool (envoy/front-proxy.yaml) is demo_a with demo_b as fallback.
    doc["models"].append({"name": "pooled", "cluster": "demo_pool",
                          "upstream_model": "demo-small-2026", "egress": "internal",
                          "price": {"input_per_1k": 0.00015, "output_per_1k": 0.0006}})
    doc["ledger"] = {"path": "ledger.sqlite3", "baseline": "large", "flush_interval_s": 0.2}
    return copy_example(tmp_path, yaml.safe_dump(doc, sort_keys=False))


def start(tmp_path: Path, demo_a_args: tuple[str, ...] = (),
          demo_b_args: tuple[str, ...] = ()) -> Stack:
    stack = Stack.on_free_ports(config_path=write_config(tmp_path), workdir=tmp_path)
    try:
        stack.start_upstream("demo_a", *demo_a_args)
        stack.start_upstream("demo_b", *demo_b_args)
        stack.start_atp()
        stack.start_envoy()
    except Exception:
        stack.stop_all()
        raise
    return stack


@pytest.fixture
def stack(tmp_path: Path):
    s = start(tmp_path)
    yield s
    s.stop_all()


def chat(stack: Stack, alias: str, text: str):
    return post(stack, CHAT, {"model": alias, "messages": [{"role": "user", "content": text}]})


def ledger_rows(stack: Stack) -> list[sqlite3.Row]:
    conn = sqlite3.connect(stack.config_path.parent / "ledger.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM ledger").fetchall()
    finally:
        conn.close()


def ledger_requests(stack: Stack) -> int:
    try:
        return sum(r["requests"] for r in ledger_rows(stack))
    except sqlite3.OperationalError:
        return 0


def route_records(stack: Stack, route: str, count: int) -> list[dict]:
    """The exchange records of `route`, once `count` are written (each at its stream's end,
    which can come just after the client has its answer)."""
    def records() -> list[dict]:
        return [json.loads(line) for line in stack.log("atp").splitlines()
                if f'"route":"{route}"' in line]
    wait_until(lambda: len(records()) >= count, f"{count} records of {route}", timeout=10)
    return records()


def usage_of(request: dict, model_name: str) -> tuple[int, int]:
    """The demo upstream's deterministic usage for a request it recorded."""
    body = json.loads(request["body"])
    text = body["messages"][-1]["content"]
    prompt = sum(-(-len(m["content"].encode()) // 4) + 3 for m in body["messages"])
    reply = f"[{model_name}] you said: {text}"
    return prompt, -(-len(reply.encode()) // 4)


def cost(model: str, tokens: tuple[int, int]) -> Decimal:
    pin, pout = PRICES[model]
    return (tokens[0] * pin + tokens[1] * pout) / 1000


def test_mirror_shadow_ledger_and_report(stack: Stack) -> None:
    upstreams = Upstreams(stack)
    texts = [f"mirror me {i} " + "x" * i for i in range(12)]
    for text in texts:
        reply = chat(stack, "mirrored", text)
        # The client only ever sees the champion's answer.
        assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_a"
        assert reply.json()["choices"][0]["message"]["content"] == f"[demo_a] you said: {text}"
    wait_until(lambda: len(upstreams.requests("demo_b")) == len(texts), "mirrored copies")
    primary, shadow = upstreams.requests("demo_a"), upstreams.requests("demo_b")
    for copy in shadow:
        body = json.loads(copy["body"])
        assert body["model"] == "demo-large-2026"       # rewritten to the challenger
        assert "-shadow" in copy["headers"]["host"]
        assert "authorization" not in copy["headers"]
    # ATP's headers (cluster, mirror, route, tenant, challenger) reach no model upstream,
    # neither with the primary request nor with the mirrored copy.
    for seen in primary + shadow:
        assert not [h for h in seen["headers"] if h.startswith("x-atp-")], seen["headers"]
    assert {json.loads(c["body"])["messages"][0]["content"] for c in shadow} == set(texts)

    wait_until(lambda: ledger_requests(stack) == 2 * len(texts), "ledger rows", timeout=15)
    # The shadow exchanges' records: each is logged just after its ledger row, and log
    # lines reach the file when ATP's buffer is flushed (every 0.25 s).
    wait_until(lambda: '"auth_method":"shadow"' in stack.log("atp"), "shadow records")
    rows = ledger_rows(stack)
    tenant = [r for r in rows if not r["shadow"]]
    mirrored = [r for r in rows if r["shadow"]]
    assert {r["model"] for r in tenant} == {"small"} and {r["model"] for r in mirrored} == {
        "large"}
    # To the cent (exactly, in fact): actual, baseline (large) and savings.
    actual = sum(cost("small", usage_of(r, "demo_a")) for r in primary)
    baseline = sum(cost("large", usage_of(r, "demo_a")) for r in primary)
    shadow_cost = sum(cost("large", usage_of(r, "demo_b")) for r in shadow)
    pico = Decimal(10) ** 12
    assert sum(r["cost_pico"] for r in tenant) == actual * pico
    assert sum(r["baseline_pico"] for r in tenant) == baseline * pico
    assert sum(r["savings_pico"] for r in tenant) == (baseline - actual) * pico
    assert sum(r["cost_pico"] for r in mirrored) == shadow_cost * pico
    assert sum(r["savings_pico"] for r in mirrored) == 0

    report = subprocess.run(
        [sys.executable, "-m", "atp_extproc", "report", "savings", "--config",
         str(stack.config_path), "--bucket", "total", "--by", "tenant,route"],
        capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "mirrored" in report.stdout and "alice" in report.stdout
    assert f"{baseline - actual:.4f}" in report.stdout.replace(",", "")


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from /proc: its socket fds, LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def test_no_client_can_reach_the_shadow_listener(stack: Stack) -> None:
    """ATP trusts the x-atp-* headers of a shadow exchange (no key, no redaction, no
    policy), so only Envoy's own mirror may start one: the shadow listener is an internal
    listener with no socket, and the headers a mirrored copy carries do nothing on the
    client listener."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs /proc")
    upstreams = Upstreams(stack)
    upstreams.clear()
    admin = f"http://127.0.0.1:{stack.ports['admin']}"
    statuses = {item["name"]: item["local_address"]
                for item in http(f"{admin}/listeners?format=json").json()["listener_statuses"]}
    assert statuses["shadow"] == {"envoy_internal_address": {"server_listener_name": "shadow"}}
    ports = _listening_tcp_ports(stack.procs["envoy"].pid)
    assert ports == {stack.ports["envoy"], stack.ports["admin"]}, ports

    body = json.dumps({"model": "anything", "messages": [
        {"role": "user", "content": "mail me at victim@example.com"}]}).encode()
    shadow_headers = {"content-type": "application/json", "x-atp-route": "chat-premium",
                      "x-atp-shadow-model": "large", "x-atp-tenant": "alice",
                      "x-atp-cluster": "demo_b", "x-atp-shadow-cluster": "atp_shadow"}
    for port in ports:
        reply = http(f"http://127.0.0.1:{port}{CHAT}", "POST", body, shadow_headers)
        assert reply.status != 200, (port, reply.body[:200])
    assert upstreams.total() == 0
    # Read once the client listener's exchange is in the log, so it is not read unflushed.
    wait_until(lambda: '"msg":"exchange"' in stack.log("atp"), "the exchange record")
    assert '"auth_method":"shadow"' not in stack.log("atp")


def test_decision_shadow_serves_the_champion_and_records_the_proposal(stack: Stack) -> None:
    for i in range(15):
        reply = chat(stack, "decided", f"decide {i}")
        assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_b"
    records = route_records(stack, "decided", 15)
    assert len(records) == 15
    assert all(r["model"] == "large" for r in records)
    # The learner proposes the cheaper model and predicts what that would save.
    assert any(r["proposed_model"] == "small" for r in records)
    assert all(r["candidate_set"] for r in records)
    assert any((r["predicted_savings_usd"] or 0) > 0 for r in records)


def test_breaker_moves_traffic_off_a_failing_candidate(tmp_path: Path) -> None:
    stack = start(tmp_path, ("--error-rate", "1.0"))
    try:
        statuses = [chat(stack, "learned", f"try {i}").status for i in range(60)]
        served = route_records(stack, "learned", 60)
        opened = next(i for i, r in enumerate(served)
                      if "small:breaker_open" in r["routing_excluded"])
        assert 10 <= opened <= 25
        assert statuses[:opened].count(503) >= 10
        # Once the breaker is open the healthy candidate serves everything.
        assert statuses[opened:] == [200] * (60 - opened)
        assert {r["model"] for r in served[opened:]} == {"large"}
    finally:
        stack.stop_all()


def test_mirrored_copy_carries_only_redacted_text(stack: Stack) -> None:
    upstreams = Upstreams(stack)
    secret = "card 4111 1111 1111 1111, mail jane.roe@example.org"
    # The external challenger of "mirrored" never gets a copy of personal data...
    assert chat(stack, "mirrored", secret).status == 200
    # ...an internal one does, redacted like the primary.
    reply = chat(stack, "mirrored-internal", secret)
    assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_a"
    wait_until(lambda: len(upstreams.requests("demo_a")) == 3, "the mirrored copy")
    bodies = [r["body"] for r in upstreams.requests("demo_a")]
    copies = [r for r in upstreams.requests("demo_a") if "-shadow" in r["headers"]["host"]]
    assert [json.loads(c["body"])["model"] for c in copies] == ["demo-embed-2026"]
    assert upstreams.requests("demo_b") == []
    for body in bodies:
        assert "4111" not in body and "jane.roe" not in body
        assert "[CARD_1]" in body and "[EMAIL_1]" in body


def test_fallback_answers_when_the_primary_returns_503(tmp_path: Path) -> None:
    stack = start(tmp_path, ("--error-rate", "1.0"))
    try:
        upstreams = Upstreams(stack)
        for i in range(3):
            reply = chat(stack, "pooled", f"fall back {i}")
            assert reply.status == 200, reply.body[:200]
            assert reply.headers["x-upstream-name"] == "demo_b"
            assert reply.json()["choices"][0]["message"]["content"].endswith(f"fall back {i}")
        # Each request failed on demo_a first, with the same (rewritten) body.
        tried = [json.loads(r["body"])["model"] for r in upstreams.requests("demo_a")]
        assert tried[-3:] == ["demo-small-2026"] * 3
        records = route_records(stack, "pooled", 3)
        assert [r["attempts"] for r in records] == [2, 2, 2]
        assert all(r["status"] == 200 for r in records)
    finally:
        stack.stop_all()


def test_fallback_holds_when_many_requests_fail_over_at_once(tmp_path: Path) -> None:
    # Envoy allows 3 concurrent retries per cluster unless told otherwise: past that a
    # failed attempt is not retried and the client gets the primary's 503.
    stack = start(tmp_path, ("--error-rate", "1.0"), ("--latency-ms", "400"))
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            replies = list(pool.map(lambda i: chat(stack, "pooled", f"burst {i}"), range(12)))
        assert [r.status for r in replies] == [200] * 12
        assert {r.headers["x-upstream-name"] for r in replies} == {"demo_b"}
    finally:
        stack.stop_all()


def test_feedback_scores_the_tenants_own_recent_requests(stack: Stack) -> None:
    upstreams = Upstreams(stack)
    reply = chat(stack, "learned", "rate me")
    assert reply.status == 200
    # A client learns the id from the response, as any client can (Envoy sets it).
    request_id = reply.headers["x-request-id"]
    served_by = upstreams.requests(reply.headers["x-upstream-name"])
    assert served_by[-1]["headers"]["x-request-id"] == request_id
    route_records(stack, "learned", 1)
    # Another tenant cannot score it; a bad score is a 400; the owner's is accepted once.
    other = post(stack, "/v1/feedback", {"request_id": request_id, "score": 1.0}, key=BOB)
    assert other.status == 404 and other.json()["error"]["code"] == "feedback_not_found"
    bad = post(stack, "/v1/feedback", {"request_id": request_id, "score": 7})
    assert bad.status == 400
    assert post(stack, "/v1/feedback", {"request_id": request_id, "score": 0.9}).status == 204
    assert post(stack, "/v1/feedback", {"request_id": request_id, "score": 0.9}).status == 404


def test_breaker_probes_half_open_and_closes_when_the_provider_recovers(
        tmp_path: Path) -> None:
    stack = start(tmp_path, ("--error-rate", "1.0"))
    try:
        for i in range(20):
            chat(stack, "recovering", f"fail {i}")
        records = route_records(stack, "recovering", 20)
        assert any("small:breaker_open" in r["routing_excluded"] for r in records)
        # The provider comes back (same port, healthy), and the breaker's half-open
        # probes find it: traffic returns to the cheaper model.
        stack.stop("demo_a")
        stack.start_upstream("demo_a")

        polls: list[int] = []

        def back_on_small() -> bool:
            polls.append(1)
            reply = chat(stack, "recovering", "are you back?")
            return reply.status == 200 and reply.headers["x-upstream-name"] == "demo_a"

        wait_until(back_on_small, "traffic back on the recovered model", timeout=30)
        tail = [chat(stack, "recovering", f"after {i}") for i in range(10)]
        assert all(r.status == 200 for r in tail)
        assert [r.headers["x-upstream-name"] for r in tail] == ["demo_a"] * 10
        # The half-open breaker's trial requests say so (they read as served by a model
        # the record excluded, breaker_half_open).
        # (Every request's record: ATP writes its log in batches.)
        probes = [r for r in route_records(stack, "recovering", 20 + len(polls) + 10)
                  if r["routing_probe"]]
        assert probes and {r["model"] for r in probes} == {"small"}
    finally:
        stack.stop_all()


def test_sticky_assignment_keeps_each_user_on_one_model(stack: Stack) -> None:
    served: dict[str, set[str]] = {}
    # Fewer decisions than one share batch (router.SHARE_BATCH): the learned shares move
    # after one, and a key at their boundary may then move (sticky keeps *most* turns).
    assert 3 * 8 < SHARE_BATCH
    for i in range(3 * 8):
        user = f"user-{i % 8}"
        reply = post(stack, CHAT, {"model": "sticky", "user": user,
                                   "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status == 200
        served.setdefault(user, set()).add(reply.headers["x-upstream-name"])
    assert all(len(models) == 1 for models in served.values()), served
    assert any(r["routing_sticky"] for r in route_records(stack, "sticky", 3 * 8))
    # Not one model for everybody: users are spread, and each stays where it landed.
    assert set().union(*served.values()) == {"demo_a", "demo_b"}
