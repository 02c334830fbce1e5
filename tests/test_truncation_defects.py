"""limits.truncated refuses what the caps hid, not ordinary traffic with long values.

Every string over 256 characters used to be noted in context.truncated, so the shipped
`limits.truncated` refused (403) a chat whose history held a write_file call with a
file's text, a Responses function_call with a long SQL query, an OpenAI-valid metadata
value of 300 characters, or a call with 17 arguments. Items past the caps must still be
refused, and a value cut short must not turn a deny into an allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from atp_extproc.policy import MAX_LIST, MAX_MAP, MAX_STRING, CandidateInfo, PolicySet, load_file
from atp_extproc.policy.attributes import Attributes, build_attributes
from atp_extproc.policy.engine import TOOL
from atp_extproc.policy.oracle import ERROR, Oracle
from atp_extproc.policy.runtime import attributes_for_request

ROOT = Path(__file__).resolve().parent.parent
SMALL = CandidateInfo("small", "demo_a", "local", "internal", 0.00015, 0.0006, "demo_a")


@pytest.fixture(scope="module")
def examples() -> PolicySet:
    # atp.yaml's own policy and every file it includes, as `make run` serves them.
    return PolicySet.compile(list(load_file(ROOT / "examples" / "atp.yaml").policies))


def attrs_for(operation: str, doc: dict[str, Any], jwt: dict[str, Any] | None = None
              ) -> Attributes:
    return attributes_for_request(
        tenant="alice", auth_method="jwt" if jwt else "api_key", key_id=None,
        jwt_payload=jwt, path="/v1/chat/completions", operation=operation,
        alias="gpt-4o-mini", body_bytes=1000, doc=doc)


def past_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": name}}], "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}]}


README = "# Project\n" + "Some documentation line.\n" * 12
SQL = ("SELECT count(*) FROM users u JOIN accounts a ON a.user_id = u.id WHERE a.created_at"
       " > now() - interval '30 days' AND a.status = 'active' AND u.deleted_at IS NULL AND "
       "u.email NOT LIKE '%@example.test' GROUP BY a.plan ORDER BY 1 DESC LIMIT 100 -- "
       "monthly active users report for the billing dashboard")

ORDINARY = {
    "a write_file call with a file's text": (
        "chat", past_call("write_file", {"path": "README.md", "content": README}), None),
    "a Responses function_call with a long query": (
        "responses", {"tools": [{"type": "function", "name": "run_sql", "parameters": {}}],
                      "input": [{"role": "user", "content": "count users"},
                                {"type": "function_call", "call_id": "c1", "name": "run_sql",
                                 "arguments": json.dumps({"query": SQL})},
                                {"type": "function_call_output", "call_id": "c1",
                                 "output": "42"}]}, None),
    "a metadata value of 512 characters (OpenAI's limit)": (
        "chat", {"messages": [{"role": "user", "content": "hi"}],
                 "metadata": {f"k{i}": "n" * 512 for i in range(16)}}, None),
    "a call with 17 scalar arguments": (
        "chat", past_call("lookup", {f"a{i}": i for i in range(17)}), None),
    "a token with a long scope claim": (
        "chat", {"messages": [{"role": "user", "content": "hi"}]},
        {"sub": "u1", "scope": " ".join(f"api://app/scope.{i}" for i in range(40))}),
}


@pytest.mark.parametrize("case", list(ORDINARY))
def test_ordinary_requests_pass_the_example_policies(examples, case):
    operation, doc, jwt = ORDINARY[case]
    attrs = attrs_for(operation, doc, jwt)
    assert attrs.truncated == ()
    out = examples.evaluate(attrs, [SMALL])
    assert out.denied is None and out.allowed_candidates == (SMALL,)


def test_a_long_value_is_its_first_characters_and_an_ellipsis():
    attrs = attrs_for("chat", past_call("write_file", {"content": README * 3}))
    content = attrs.request.tool_details[0].arguments["content"]
    assert content == README[:MAX_STRING] + "\u2026"
    metadata = build_attributes(request={"metadata": {"whole": "n" * 512, "cut": "n" * 600}})
    assert metadata.request.metadata["whole"] == "n" * 512
    assert metadata.request.metadata["cut"] == "n" * 512 + "\u2026"
    claims = build_attributes(subject={"claims": {"note": "c" * 300}}).subject.claims
    assert claims["note"] == "c" * MAX_STRING + "\u2026"


def hidden_tool(count: int) -> dict[str, Any]:
    return {"messages": [], "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                      for i in range(count)]}


HIDDEN = {
    # The 65th tool is one no tools policy reads.
    "request.tools": ("chat", hidden_tool(MAX_LIST + 1), None),
    "request.metadata": ("chat", {"messages": [],
                                  "metadata": {f"k{i}": "v" for i in range(MAX_MAP + 1)}}, None),
    # max_results past the cap would never reach tools.search_max_results.
    "request.tool_details.arguments": (
        "chat", past_call("search_docs", {**{f"a{i}": i for i in range(MAX_MAP)},
                                          "max_results": 500}), None),
    "request.tool_details.parameters": (
        "chat", {"messages": [], "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                f"p{i}": {} for i in range(MAX_LIST + 1)}}}}]}, None),
    "subject.claims": ("chat", {"messages": []},
                       {"sub": "u1", "groups": [f"g{i}" for i in range(MAX_LIST + 1)]}),
}


@pytest.mark.parametrize("path", list(HIDDEN))
def test_items_past_the_caps_are_still_refused(examples, path):
    operation, doc, jwt = HIDDEN[path]
    attrs = attrs_for(operation, doc, jwt)
    assert path in attrs.truncated
    assert examples.evaluate(attrs, [SMALL]).denied.policy_id == "limits.truncated"


def test_keys_alike_in_their_first_characters_are_a_cut():
    # Cut to 256 characters the two keys are one: an entry is hidden.
    attrs = build_attributes(request={"metadata": {"k" * 300 + "a": "1", "k" * 300 + "b": "2"}})
    assert attrs.truncated == ("request.metadata",)


def test_a_padded_number_is_no_smaller_number(examples):
    # The first 256 characters of "000...051" read as 0, under search_max_results' `> 50`:
    # a cut value converts to no number, so the policy's on_error (deny) applies.
    attrs = attrs_for("chat", past_call("search_docs", {"max_results": "0" * 300 + "51"}))
    assert attrs.truncated == ()
    assert examples.evaluate(attrs, [SMALL]).denied.policy_id == "tools.search_max_results"


def test_a_padded_claim_matches_no_region(examples):
    attrs = attrs_for("chat", {"messages": []}, {"sub": "u1", "residency": "local" * 60})
    out = examples.evaluate(attrs, [SMALL])
    assert out.allowed_candidates == () and out.denied.policy_id == "residency.token_region"


@pytest.mark.parametrize(("expression", "expected"), [
    ("int(tool.arguments['max_results']) > 50", ERROR),
    ("tool.arguments['max_results'].startsWith('000')", True),
    ("size(tool.arguments['max_results']) == 257", True),
    ("tool.arguments['max_results'] == '0'", False),
])
def test_engine_and_oracle_agree_on_a_cut_value(expression, expected):
    attrs = attrs_for("chat", past_call("search_docs", {"max_results": "0" * 300 + "51"}))
    ps = PolicySet.compile([{"id": "t.cut", "effect": "tools", "tool_action": "deny",
                             "expression": expression}])
    (tool,) = attrs.request.tool_details
    assert ps.policies[0].level == TOOL
    _, _, ((value,),) = ps.raw_results(attrs, [], batch=False)
    engine = value if isinstance(value, bool) else ERROR
    oracle = Oracle().evaluate(expression, attrs.to_proto(), tool=tool)
    assert engine == oracle == expected
