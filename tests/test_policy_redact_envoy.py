"""Policies and redaction through a real Envoy, checked at the fake upstreams."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from atp_extproc.stack import EXAMPLE_CONFIG, Stack, copy_example, wait_until
from tests.conftest import ALICE, BOB, Upstreams, numbered, post, start_stack

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
PII = {
    "email": "jane.roe@example.org",
    "phone": "+44 20 7946 0958",
    "card": "5555 5555 5555 4444",
    "ssn": "536-22-1234",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ipv4": "203.0.113.77",
}
SENTENCE = ("Reach me at {email} or {phone}; card {card}, SSN {ssn}, IBAN {iban}, "
            "host {ipv4}.").format(**PII)


def records(stack: Stack) -> list[dict]:
    return [json.loads(line) for line in stack.log("atp").splitlines()
            if '"msg":"exchange"' in line]


def record_with(stack: Stack, needle: str) -> dict:
    """The record of the request whose upstream-visible request id `needle` names."""
    found: list[dict] = []

    def check() -> bool:
        found[:] = [r for r in records(stack) if r["request_id"] == needle]
        return bool(found)

    wait_until(check, "exchange record", timeout=10)
    return found[0]


def assert_clean(upstreams: Upstreams) -> list[str]:
    bodies = [r["body"] for name in ("demo_a", "demo_b") for r in upstreams.requests(name)]
    assert bodies, "nothing reached an upstream"
    for body in bodies:
        for cls, value in PII.items():
            assert value not in body, f"{cls} reached a provider"
    return bodies


# -- redaction: every field a provider sees --------------------------------------------

BODIES = [
    (CHAT, {"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": f"System note: {SENTENCE}"},
        {"role": "user", "name": "jane.roe@example.org", "content": [
            {"type": "text", "text": SENTENCE},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {
                "name": "lookup", "arguments": json.dumps({"who": PII["email"],
                                                            "card": PII["card"]})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": SENTENCE},
        {"role": "user", "content": SENTENCE}]}),
    ("/v1/completions", {"model": "fast", "prompt": [SENTENCE, "and " + SENTENCE]}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": [SENTENCE, "plain"]}),
    ("/v1/responses", {"model": "gpt-4o-mini", "instructions": SENTENCE,
                       "input": [{"role": "user", "content": SENTENCE}]}),
]


@pytest.mark.parametrize(("path", "body"), BODIES, ids=[b[0] for b in BODIES])
def test_no_seeded_pii_reaches_a_provider(stack: Stack, upstreams: Upstreams, path: str,
                                          body: dict) -> None:
    reply = post(stack, path, body)
    assert reply.status == 200, reply.body[:300]
    (seen,) = assert_clean(upstreams)
    seen = numbered(seen)
    for placeholder in ("[EMAIL_1]", "[PHONE_1]", "[CARD_1]", "[SSN_1]", "[IBAN_1]",
                        "[IPV4_1]"):
        assert placeholder in seen
    request_id = json.loads(json.dumps(upstreams.requests("demo_a")[-1]["headers"]))[
        "x-request-id"]
    rec = record_with(stack, request_id)
    assert rec["data_classes"]["email"] >= 1 and rec["data_classes"]["card"] >= 1
    if path == CHAT:
        assert rec["non_text_parts"] == 1
        args = json.loads(json.loads(seen)["messages"][2]["tool_calls"][0]["function"][
            "arguments"])
        assert args == {"who": "[EMAIL_1]", "card": "[CARD_1]"}
    # Counts only: no value in ATP's log.
    log = stack.log("atp")
    assert all(value not in log for value in PII.values())


def test_private_key_is_refused_and_goes_nowhere(stack: Stack, upstreams: Upstreams) -> None:
    key = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0t"
           "RgeLezV6ffAt0gunVTLw7onLRnrq0\n-----END RSA PRIVATE KEY-----")
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": key}]})
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == "sensitive_data_refused" and "private_key" in error["message"]
    assert "MIIE" not in reply.body.decode()
    assert upstreams.total() == 0


# -- policies --------------------------------------------------------------------------

def test_deny_is_403_with_the_policy_id(stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x",
                                           "stream": True})
    assert reply.status == 403
    error = reply.json()["error"]
    assert error["policy_id"] == "limits.embeddings_no_stream"
    assert error["type"] == "permission_error" and "(policy limits.embeddings_no_stream)" in \
        error["message"]
    assert upstreams.total() == 0


def test_dry_run_lets_the_request_pass_and_records_would_deny(
        stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "max_tokens": 4000,
                               "messages": [{"role": "user", "content": "long answer"}]},
                 key=BOB)
    assert reply.status == 200
    request_id = upstreams.requests("demo_a")[-1]["headers"]["x-request-id"]
    rec = record_with(stack, request_id)
    assert rec["policy_denied"] is None
    assert rec["policy_would_deny"] == "limits.bob_max_tokens"
    assert rec["policy_decisions"]["limits.bob_max_tokens"] == "would_deny"
    assert rec["policy_decisions"]["access.known_tenants"] == "allow"
    decisions = {d["policy_id"]: d for d in rec["policy_records"]}
    assert decisions["limits.bob_max_tokens"]["decision"] == "would_deny"
    assert decisions["limits.bob_max_tokens"]["mode"] == "dry_run"
    assert "subject.tenant" in decisions["limits.bob_max_tokens"]["attributes_used"]


def test_restrict_keeps_pii_on_internal_models(stack: Stack, upstreams: Upstreams) -> None:
    # "auto" may go to large (external) or small (internal); with PII only small may serve.
    for i in range(10):
        reply = post(stack, CHAT, {"model": "auto", "messages": [
            {"role": "user", "content": f"mail {i}: {PII['email']}"}]})
        assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_a"
    assert upstreams.requests("demo_b") == []
    assert_clean(upstreams)
    # The premium alias has only the external model: nothing is left, so 403 with reasons.
    reply = post(stack, CHAT, {"model": "gpt-4o", "messages": [
        {"role": "user", "content": f"mail: {PII['email']}"}]})
    assert reply.status == 403
    assert "pii.internal_only" in json.dumps(reply.json())
    assert upstreams.requests("demo_b") == []


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "send_email", "search_docs")]


def test_tool_scope_strips_and_denies(stack: Stack, upstreams: Upstreams) -> None:
    msg = [{"role": "user", "content": "weather?"}]
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": msg, "tools": TOOLS},
                 key=BOB)
    assert reply.status == 200
    seen = json.loads(upstreams.requests("demo_a")[-1]["body"])
    assert [t["function"]["name"] for t in seen["tools"]] == ["get_weather", "search_docs"]
    # alice may offer send_email: nothing stripped.
    post(stack, CHAT, {"model": "gpt-4o-mini", "messages": msg, "tools": TOOLS})
    seen = json.loads(upstreams.requests("demo_a")[-1]["body"])
    assert len(seen["tools"]) == 3
    # A code execution tool is denied for everyone.
    shell = [{"type": "function", "function": {"name": "shell"}}]
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": msg, "tools": shell})
    assert reply.status == 403
    assert reply.json()["error"]["policy_id"] == "tools.no_code_execution"
    assert len(upstreams.requests("demo_a")) == 2


def test_evaluation_error_denies(stack: Stack, upstreams: Upstreams) -> None:
    # tools.search_max_results runs int() on the argument: "lots" is an evaluation error.
    msg = [{"role": "user", "content": "search"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {
                   "name": "search_docs", "arguments": '{"max_results": "lots"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "none"}]
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": msg, "tools": TOOLS})
    assert reply.status == 403
    assert reply.json()["error"]["policy_id"] == "tools.search_max_results"
    assert upstreams.total() == 0


FLOODER = """
import sys, urllib.request, urllib.error
url, path, stop = sys.argv[1], sys.argv[2], sys.argv[3]
import os
body = open(path, "rb").read()
codes = []
while not os.path.exists(stop) and len(codes) < 2000:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "content-type": "application/json", "authorization": "Bearer sk-demo-alice"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            codes.append(r.status)
    except urllib.error.HTTPError as e:
        codes.append(e.code)
    print(codes[-1], flush=True)
"""


def test_adversarial_lists_do_not_stall_other_requests(stack: Stack, tmp_path: Path) -> None:
    """Normal requests beside a flood of huge-list bodies fare as they do beside a flood
    of benign bodies of the same size: the lists cost no more than their bytes.

    Floods come from another process, so the client's own GIL does not skew them."""
    normal = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    huge = {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}] * 20_000,
            "tools": [{"type": "function", "function": {"name": f"t{i}"}}
                      for i in range(5_000)],
            "metadata": {f"k{i}": "v" for i in range(16)}}
    size = len(json.dumps(huge))
    benign = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "lorem ipsum " * (size // 12 - 10)}]}

    def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert post(stack, CHAT, normal).status == 200
            out.append(time.perf_counter() - t0)
        return out

    def beside(name: str, body: dict) -> tuple[list[float], list[int]]:
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
        stop_file, out_path = tmp_path / f"{name}.stop", tmp_path / f"{name}.out"
        with out_path.open("w") as out:
            flooder = subprocess.Popen(
                [sys.executable, "-c", FLOODER, stack.base_url + CHAT,
                 str(tmp_path / f"{name}.json"), str(stop_file)], stdout=out)
            try:
                wait_until(lambda: out_path.read_text().count("\n") >= 1,
                           f"a {name} request answered", timeout=30)
                measured = latencies(80)
            finally:
                stop_file.touch()
                flooder.wait(30)
        return measured, [int(x) for x in out_path.read_text().split()]

    alone = latencies(80)
    with_benign, benign_codes = beside("benign", benign)
    with_huge, huge_codes = beside("huge", huge)
    # Huge lists are refused by the count limits with a clear 400; never a 5xx.
    assert set(huge_codes) == {400} and set(benign_codes) == {200}
    p99 = lambda xs: sorted(xs)[int(len(xs) * 0.99) - 1]  # noqa: E731
    print("normal requests p50/p99 ms: " + ", ".join(
        f"{label} {statistics.median(xs) * 1e3:.1f}/{p99(xs) * 1e3:.1f}"
        for label, xs in (("alone", alone), (f"beside {len(benign_codes)} benign", with_benign),
                          (f"beside {len(huge_codes)} huge-list", with_huge))))
    # A stall would hold normal requests behind a huge one's whole parse and evaluation.
    assert p99(with_huge) < max(1.5 * p99(with_benign), p99(with_benign) + 0.02)


# -- restore ---------------------------------------------------------------------------

@pytest.fixture
def restore_stack(tmp_path: Path):
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    for route in doc["routes"]:
        if route["name"] == "chat":
            route["restore"] = True
    stack = start_stack(tmp_path, copy_example(tmp_path, yaml.safe_dump(doc, sort_keys=False)))
    yield stack
    stack.stop_all()


def test_restore_gives_the_client_its_values(restore_stack: Stack) -> None:
    upstreams = Upstreams(restore_stack)
    client = openai.OpenAI(base_url=restore_stack.base_url + "/v1", api_key=ALICE,
                           max_retries=0)
    messages = [{"role": "user", "content": SENTENCE}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert reply.choices[0].message.content == f"[demo_a] you said: {SENTENCE}"
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"[demo_a] you said: {SENTENCE}"
    # ...while the provider only ever saw placeholders.
    assert len(assert_clean(upstreams)) == 2
    assert all("[EMAIL_1]" in r["body"] for r in upstreams.requests("demo_a"))
