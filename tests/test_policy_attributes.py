"""The attribute document: caps, truncation, typos, reading an OpenAI body."""

from __future__ import annotations

import gc
import json
import pickle
import time
from datetime import UTC, datetime

import pytest

from atp_extproc.policy import (
    MAX_LIST,
    MAX_MAP,
    MAX_STRING,
    CandidateInfo,
    PolicySet,
    build_attributes,
    request_from_body,
)
from atp_extproc.policy.attributes import MAX_HISTORY_SCAN, AttributeError_, safe_name
from atp_extproc.policy.gen.atp import policy_pb2 as pb


def test_lists_maps_and_strings_are_capped_and_named():
    huge = [f"tool_{i}" for i in range(10_000)]
    attrs = build_attributes(
        subject={"tenant": "t" * 5000, "groups": [f"g{i}" for i in range(500)],
                 "claims": {"k": list(range(1000)), "deep": {"a": {"b": {"c": {"d": 1}}}}}},
        request={"tools": huge, "tool_details": [{"name": n} for n in huge],
                 "metadata": {f"k{i}": "v" for i in range(1000)},
                 "data_classes": {f"c{i}": i for i in range(1000)}})
    r, s = attrs.request, attrs.subject
    assert len(r.tools) == MAX_LIST and len(r.tool_details) == MAX_LIST
    assert r.tool_count == 10_000  # the true count stays visible
    assert len(r.metadata) == MAX_MAP and len(r.data_classes) == MAX_MAP
    assert len(s.tenant) == MAX_STRING and len(s.groups) == MAX_LIST
    assert len(s.claims["k"]) == MAX_LIST
    assert set(attrs.truncated) >= {"request.tools", "request.tool_details",
                                    "request.metadata", "request.data_classes",
                                    "subject.tenant", "subject.groups", "subject.claims"}


def test_building_costs_the_cap_not_the_input():
    def timed(n: int) -> float:
        tools = [{"name": f"t{i}"} for i in range(n)]
        names = [t["name"] for t in tools]
        gc.collect()  # the input's own allocation is not the builder's cost
        start = time.perf_counter()
        for _ in range(20):
            build_attributes(request={"tool_details": tools, "tools": names})
        return time.perf_counter() - start
    small, big = timed(MAX_LIST), timed(200_000)
    assert big < small * 5, (small, big)


def test_a_policy_can_refuse_a_truncated_document():
    ps = PolicySet.compile([{"id": "l.cut", "effect": "deny",
                             "expression": "size(context.truncated) > 0"}])
    attrs = build_attributes(request={"tools": ["x"] * 10_000})
    out = ps.evaluate(attrs, [])
    assert out.denied is not None and out.denied.policy_id == "l.cut"
    assert ps.evaluate(build_attributes(request={"tools": ["x"]}), []).denied is None


def test_claims_from_envoy_struct_are_bounded():
    from google.protobuf import struct_pb2
    claims = struct_pb2.Struct()
    claims.update({"sub": "a@example.com", "groups": ["g"] * 500, "level": 3,
                   "nested": {"a": {"b": {"c": {"d": 1}}}},
                   **{f"x{i:03d}": i for i in range(200)}})
    attrs = build_attributes(subject={"claims": claims})
    got = attrs.subject.claims
    assert got["sub"] == "a@example.com" and got["level"] == 3
    assert len(got["groups"]) == MAX_LIST and len(got) == MAX_MAP
    assert "subject.claims" in attrs.truncated
    ps = PolicySet.compile([{"id": "c.sub", "effect": "deny",
                             "expression": "subject.claims.sub == 'a@example.com'"}])
    assert ps.evaluate(attrs, []).denied is not None


@pytest.mark.parametrize("as_struct", [False, True])
def test_a_keycloak_token_is_read_whole_and_an_empty_deep_list_is_no_cut(as_struct):
    from google.protobuf import struct_pb2
    plain = {"tenant": "alice", "resource_access": {"account": {"roles": ["view"]}},
             "realm_access": {"roles": []}, "empty": {"a": {"b": {"c": [], "d": {}}}}}
    claims: object = plain
    if as_struct:
        claims = struct_pb2.Struct()
        claims.update(plain)
    attrs = build_attributes(subject={"claims": claims})
    assert list(attrs.subject.claims["resource_access"]["account"]["roles"]) == ["view"]
    assert list(attrs.truncated) == []


def test_unknown_keys_and_wrong_types_raise():
    with pytest.raises(AttributeError_, match="unknown request attribute"):
        build_attributes(request={"max_token": 5})
    with pytest.raises(AttributeError_, match="must be a string"):
        build_attributes(subject={"tenant": 5})
    with pytest.raises(AttributeError_, match="must be a number"):
        build_attributes(request={"max_tokens": "5"})
    with pytest.raises(AttributeError_, match="must be a list"):
        build_attributes(request={"tools": "shell"})
    # An unknown key is named even when a value before it is also wrong.
    with pytest.raises(AttributeError_, match=r"unknown request attribute.*max_token;"):
        build_attributes(request={"max_tokens": "5", "max_token": 5})
    with pytest.raises(AttributeError_, match="unknown tool attribute"):
        build_attributes(request={"tool_details": [{"name": "a", "nme": "b"}]})


def test_errors_and_cuts_name_the_full_path():
    cases = [({"subject": {"tenant": 5}}, "subject.tenant must be a string, not int"),
             ({"request": {"max_tokens": "5"}}, "request.max_tokens must be a number, not str"),
             ({"context": {"route": 5}}, "context.route must be a string, not int"),
             ({"request": {"tool_details": [{"name": 5}]}},
              "request.tool_details.name must be a string, not int"),
             ({"request": {"tool_details": [{"called": "yes"}]}},
              "request.tool_details.called must be a boolean")]
    for kwargs, message in cases:
        with pytest.raises(AttributeError_) as info:
            build_attributes(**kwargs)
        assert str(info.value) == message
    attrs = build_attributes(request={"tool_details": [
        {"name": "t", "parameters": [f"p{i}" for i in range(MAX_LIST + 1)]}]})
    assert attrs.truncated == ("request.tool_details.parameters",)


def test_tool_details_from_names_messages_and_mappings():
    from types import MappingProxyType
    attrs = build_attributes(request={"tool_details": [
        "by_name", pb.Tool(name="from_proto", called=True),
        MappingProxyType({"name": "from_mapping", "declared": False}),
        {"name": "from_dict"}]})
    got = [(t.name, t.declared, t.called) for t in attrs.request.tool_details]
    # A pb.Tool keeps its own `declared`, unset here.
    assert got == [("by_name", True, False), ("from_proto", False, True),
                   ("from_mapping", False, False), ("from_dict", True, False)]
    with pytest.raises(AttributeError_, match="must be a mapping or a name"):
        build_attributes(request={"tool_details": [5]})


def test_tool_key_is_the_name_llm_api_reads_else_the_type():
    from atp_extproc.llm_api import tool_name
    from atp_extproc.policy.attributes import tool_key
    tools = [{"type": "function", "function": {"name": "chat_style"}},
             {"type": "function", "name": "responses_style"},
             {"function": {"strict": True}, "name": "top_name", "type": "function"},
             {"type": "shell", "name": "get_weather"},  # built in: run by its type
             {"function": "x", "name": "top_level"},
             {"type": "file_search"}, {"type": 5}, {}]
    for tool in tools:
        name = tool_name(tool)
        if name is not None:
            assert tool_key(tool) == name
    assert [tool_key(t) for t in tools] == ["chat_style", "responses_style", "top_name",
                                            "shell", "top_level", "file_search", "function",
                                            "function"]


def test_numbers_are_clamped_to_int64_and_time_forms():
    attrs = build_attributes(request={"max_tokens": 10**30, "token_estimate": 3.9},
                             context={"time": datetime(2026, 1, 2, 3, 4, 5,
                                                       tzinfo=UTC)})
    assert attrs.request.max_tokens == 2**63 - 1
    assert attrs.request.token_estimate == 3
    assert attrs.context.time.ToJsonString() == "2026-01-02T03:04:05Z"
    assert build_attributes(context={"time": "2026-01-02T03:04:05Z"}).context.time.seconds \
        == attrs.context.time.seconds
    now = build_attributes().context.time.seconds
    assert abs(now - time.time()) < 5


def test_candidate_resource_and_cost():
    cand = CandidateInfo("large", "openai", "us", "external", 0.0025, 0.01, "demo_b")
    attrs = build_attributes(request={"token_estimate": 1000, "max_tokens": 500})
    res = cand.resource(attrs.request)
    assert res.model == "large" and res.egress == "external"
    assert res.estimated_cost_usd == pytest.approx(0.0025 + 0.005)
    assert res == pb.Resource(model="large", provider="openai", region="us",
                              egress="external", input_per_1k=0.0025, output_per_1k=0.01,
                              estimated_cost_usd=res.estimated_cost_usd, cluster="demo_b")
    # Each request gets its own copy of the prebuilt Resource, costed for that request.
    other = cand.resource(build_attributes(request={"token_estimate": 2000}).request)
    assert other.estimated_cost_usd == pytest.approx(0.005)
    assert res.estimated_cost_usd == pytest.approx(0.0075)
    twin = CandidateInfo("large", "openai", "us", "external", 0.0025, 0.01, "demo_b")
    assert twin == cand and hash(twin) == hash(cand)
    assert pickle.loads(pickle.dumps(cand)) == cand


def test_candidate_from_config_model():
    from atp_extproc import config
    snap = config.load("examples/atp.yaml")
    cand = CandidateInfo.from_model(snap.models["large"])
    assert (cand.model, cand.provider, cand.egress, cand.region) == (
        "large", "demo_b", "external", "local")


@pytest.mark.parametrize(("choice", "seen"), [
    ({"type": "function", "function": {"name": "a"}}, "a"),
    ({"type": "function", "name": "a"}, "a"),
    # A chat custom tool goes by custom.name, as in tools and as stripping matches it.
    ({"type": "custom", "custom": {"name": "z"}}, "z"),
    ({"type": "web_search_preview"}, "web_search_preview"),
    ("required", "required"),
    # allowed_tools of mode required over one tool forces it (Chat and Responses forms).
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "w"}}]}}, "w"),
    ({"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "function", "name": "w"}]}, "w"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "function", "name": "w"}]}, "allowed_tools"),
    # ... a built-in tool by its type, as forced directly: it read "allowed_tools".
    ({"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "web_search_preview"}]}, "web_search_preview"),
    ({"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "mcp", "server_label": "ops"}]}, "mcp"),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function"}]},
     "allowed_tools"),
])
def test_tool_choice_is_seen_by_the_name_of_the_tool_it_forces(choice, seen):
    fields, _ = request_from_body("chat", {"messages": [], "tool_choice": choice})
    assert fields["tool_choice"] == seen


def test_a_null_tool_choice_leaves_the_legacy_function_call_seen():
    fields, _ = request_from_body("chat", {"messages": [], "tool_choice": None,
                                           "function_call": {"name": "w"}})
    assert fields["tool_choice"] == "w"


def test_request_from_chat_body():
    doc = {
        "model": "gpt-4o", "max_completion_tokens": 300, "metadata": {"app": "crm"},
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {}, "unit": {}}}}},
            {"type": "function", "function": {"name": "search"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {
                    "name": "search", "arguments": json.dumps({"q": "a", "limit": 5})}}]},
            {"role": "assistant", "tool_calls": [
                {"id": "2", "type": "function", "function": {
                    "name": "search", "arguments": json.dumps({"q": "b", "limit": 99})}},
                {"id": "3", "type": "function", "function": {
                    "name": "undeclared", "arguments": "not json"}}]},
        ],
    }
    fields, cut = request_from_body("chat", doc)
    assert cut == []
    assert fields["max_tokens"] == 300
    assert fields["tool_choice"] == "get_weather"
    assert fields["message_count"] == 3
    attrs = build_attributes(request=fields)
    tools = {t.name: t for t in attrs.request.tool_details}
    assert list(attrs.request.tools) == ["get_weather", "search", "undeclared"]
    assert list(tools["get_weather"].parameters) == ["city", "unit"]
    assert tools["search"].declared and tools["search"].called
    assert dict(tools["search"].arguments) == {"q": "b", "limit": "99"}  # the latest call
    assert tools["undeclared"].called and not tools["undeclared"].declared


def test_request_from_responses_body_and_builtin_tools():
    doc = {"model": "x", "input": [{"type": "function_call", "name": "lookup",
                                    "arguments": "{\"id\": 7}"}],
           "tools": [{"type": "web_search"}, {"type": "function", "name": "lookup"}],
           "max_output_tokens": 64}
    fields, _ = request_from_body("responses", doc)
    attrs = build_attributes(request=fields)
    assert list(attrs.request.tools) == ["web_search", "lookup"]
    assert attrs.request.max_tokens == 64
    lookup = next(t for t in attrs.request.tool_details if t.name == "lookup")
    assert dict(lookup.arguments) == {"id": "7"} and lookup.called


@pytest.mark.parametrize("operation, doc", [
    ("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "shell", "input": "ls -la"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"}]}),
    ("responses", {"input": [
        {"type": "custom_tool_call", "call_id": "c1", "name": "shell", "input": "ls -la"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "a.txt"}]}),
])
def test_custom_tool_calls_in_the_history_are_seen(operation, doc):
    # A tools policy refused a history call to `shell` made as a function call, and let
    # the same call through as a custom tool call.
    fields, _ = request_from_body(operation, {"model": "x", **doc})
    attrs = build_attributes(request=fields)
    (shell,) = attrs.request.tool_details
    assert (shell.name, shell.type, shell.called, shell.declared) == \
        ("shell", "custom", True, False)
    assert dict(shell.arguments) == {}


@pytest.mark.parametrize("item, name", [
    ({"type": "shell_call", "call_id": "c", "action": {"commands": ["ls"]}}, "shell"),
    ({"type": "local_shell_call", "call_id": "c", "action": {"command": ["ls"]}},
     "local_shell"),
    ({"type": "mcp_call", "id": "m", "server_label": "ops", "name": "shell",
      "arguments": "{\"cmd\": \"ls\"}"}, "mcp"),
    ({"type": "computer_call", "call_id": "c", "action": {"type": "click"}},
     "computer_use_preview"),
    ({"type": "web_search_call", "id": "w", "status": "completed"}, "web_search"),
])
def test_builtin_tool_calls_in_the_history_are_seen(item, name):
    # A shell_call or local_shell_call got past a tools policy that refused a function
    # call to shell; an MCP server's call is the server's tool, `mcp`.
    fields, _ = request_from_body("responses", {"model": "x", "input": [item]})
    attrs = build_attributes(request=fields)
    (tool,) = attrs.request.tool_details
    assert (tool.name, tool.called, tool.declared) == (name, True, False)


@pytest.mark.parametrize("declared, item", [
    ({"type": "web_search_preview"}, {"type": "web_search_call", "id": "w"}),
    ({"type": "computer"}, {"type": "computer_call", "call_id": "c", "action": {}}),
    ({"type": "mcp", "server_label": "ops", "server_url": "https://mcp.test"},
     {"type": "mcp_call", "id": "m", "server_label": "ops", "name": "read_file"}),
])
def test_a_builtin_call_counts_toward_the_tool_declared_for_it(declared, item):
    # A replayed web_search_call was a second tool, `web_search`, that an allowlist of
    # web_search_preview refused.
    fields, _ = request_from_body("responses", {"model": "x", "tools": [declared],
                                                "input": [item]})
    attrs = build_attributes(request=fields)
    (tool,) = attrs.request.tool_details
    assert (tool.name, tool.declared, tool.called) == (declared["type"], True, True)
    assert attrs.request.tool_count == 1


def test_a_function_named_like_a_builtin_tool_takes_none_of_its_calls():
    # A shell_call counted toward a declared function `shell_status`: a policy refusing
    # `shell` passed the replayed call.
    fields, _ = request_from_body("responses", {"model": "x", "tools": [
        {"type": "function", "name": "shell_status"}],
        "input": [{"type": "shell_call", "call_id": "c", "action": {"commands": ["ls"]}}]})
    names = {t.name: (t.declared, t.called)
             for t in build_attributes(request=fields).request.tool_details}
    assert names == {"shell_status": (True, False), "shell": (False, True)}


def test_request_from_body_is_bounded():
    messages = [{"role": "assistant", "tool_calls": [
        {"function": {"name": f"f{i}", "arguments": "{}"}}]} for i in range(5000)]
    fields, cut = request_from_body("chat", {"messages": messages,
                                             "tools": [{"type": "function", "function": {
                                                 "name": f"d{i}"}} for i in range(1000)]})
    assert "request.tools" in cut and "request.tool_details" in cut
    assert len(fields["tool_details"]) <= MAX_LIST
    assert fields["message_count"] == 5000
    assert MAX_HISTORY_SCAN < 5000
    attrs = build_attributes(request=fields, context={"truncated": cut})
    assert "request.tools" in attrs.truncated


@pytest.mark.parametrize("operation", ["embeddings", "completions"])
def test_a_big_batch_of_inputs_is_no_history_cut_short(operation):
    # A list of 2,049 token ids was read as a conversation's history: cut, and then
    # refused 403 by limits.truncated.
    _, cut = request_from_body(operation, {"input": list(range(MAX_HISTORY_SCAN + 1)),
                                           "prompt": ["x"] * (MAX_HISTORY_SCAN + 1)})
    assert "request.tool_details" not in cut


def test_token_ids_are_one_input_for_the_message_count():
    assert request_from_body("embeddings", {"input": list(range(201))})[0][
        "message_count"] == 1
    assert request_from_body("embeddings", {"input": [[1, 2]] * 201})[0][
        "message_count"] == 201


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize(("doc", "path"), [
    # The argument past the cap is not kept: a policy on it would see nothing.
    ({"messages": [{"role": "assistant", "tool_calls": [_call("search", json.dumps(
        {**{f"a{i}": i for i in range(MAX_MAP)}, "max_results": 500}))]}]},
     "request.tool_details.arguments"),
    # Nested too deep to parse.
    ({"messages": [{"role": "assistant", "tool_calls": [_call(
        "search", "[" * 5000 + "]" * 5000)]}]},
     "request.tool_details.arguments"),
    # A number Python cannot read hides every argument beside it.
    ({"messages": [{"role": "assistant", "tool_calls": [_call(
        "search", '{"max_results": 500, "n": ' + "9" * 5000 + "}")]}]},
     "request.tool_details.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [_call(
        "search", '{"max_results": 500, "n": 1e400}')]}]},
     "request.tool_details.arguments"),
    # The 65th call of one message is never read.
    ({"messages": [{"role": "assistant", "tool_calls": [
        *[_call("search", "{}") for _ in range(64)], _call("shell", "{}")]}]},
     "request.tool_details"),
    # Declared parameters past the 64th.
    ({"tools": [{"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {f"p{i}": {} for i in range(100)}}}}]},
     "request.tool_details.parameters"),
])
def test_every_cut_of_a_body_is_named(doc, path):
    fields, cut = request_from_body("chat", doc)
    assert cut == [path]
    attrs = build_attributes(request=fields, context={"truncated": cut})
    assert path in attrs.truncated


def test_arguments_that_are_not_json_are_no_cut():
    fields, cut = request_from_body("chat", {"messages": [{"role": "assistant",
                                                           "tool_calls": [_call("f", "{")]}]})
    assert cut == [] and fields["tool_details"][0]["arguments"] == {}


@pytest.mark.parametrize(("operation", "doc", "count"), [
    ("completions", {"prompt": ["a", "b", "c"]}, 3),
    ("completions", {"prompt": "a"}, 1),
    ("completions", {"prompt": [1, 2, 3]}, 1),           # token ids: one prompt
    ("responses", {"input": "hello"}, 1),
    ("responses", {"input": [{"role": "user", "content": "a"}] * 2}, 2),
    ("embeddings", {"input": ["a", "b"]}, 2),
])
def test_message_count_counts_what_each_api_sends(operation, doc, count):
    # A cap on request.message_count covered neither a completions batch nor a string.
    fields, _ = request_from_body(operation, doc)
    assert fields["message_count"] == count


@pytest.mark.parametrize("name, logged", [
    ("get_weather", "get_weather"), ("skip_this", "skip_this"), ("eyes", "eyes"),
    # Credentials as tool names went into records and decision targets as they came.
    ("AKIAZ5XQWERTYUPLKJHG", "<tool#4>"), ("sk-abcdefghijklmnopqrstuvwxyz012345", "<tool#4>"),
    ("ghp_16C7e42F292c6912E7710c838347Ae178B4a", "<tool#4>"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "<tool#4>"),
    # An IPv6 address, and keys with few digits, went into records as they came.
    ("fd12:abcd::1", "<tool#4>"), ("fe80:0:0:0:abcd:ef:1:2", "<tool#4>"),
    ("rk_live_4eC39HqLyjWDarjtT1zdp7dc", "<tool#4>"),
    ("my_sk_test_aBcDeFgHiJkLmNoPqRsTuV", "<tool#4>"),
    ("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZaBcDeFgH", "<tool#4>"),
    ("github:search_code", "github:search_code"), ("risk_score", "risk_score"),
])
def test_a_tool_name_shaped_like_a_credential_is_not_logged(name, logged):
    assert safe_name(name, 4) == logged


@pytest.mark.parametrize(("operation", "doc", "count"), [
    ("responses", {"input": [{"role": "user", "content": "x"}] * 250, "messages": []}, 250),
    ("completions", {"prompt": ["a", "b", "c"], "messages": None}, 3),
    ("embeddings", {"input": ["a", "b", "c"], "messages": ["x"]}, 3),
    ("chat", {"messages": [{"role": "user", "content": "x"}] * 2, "input": ["a"] * 9}, 2),
])
def test_message_count_reads_the_operations_own_field(operation, doc, count):
    # A stray `messages: []` beside a Responses request's 250 input items counted 0,
    # past limits.message_count (the provider served all 250).
    fields, _ = request_from_body(operation, doc)
    assert fields["message_count"] == count


def test_a_long_argument_is_content_not_a_cut():
    # A file's text in a past write_file call over 8 KB was a cut: limits.truncated
    # refused an ordinary agent loop.
    fields, cut = request_from_body("chat", {"messages": [{"role": "assistant", "tool_calls": [
        _call("write_file", json.dumps({"path": "a.py", "text": "x" * 20000}))]}]})
    assert not cut
    (tool,) = build_attributes(request=fields).request.tool_details
    assert tool.arguments["path"] == "a.py" and tool.arguments["text"].endswith("…")


def test_a_cases_non_scalar_arguments_are_read_as_a_bodys_are():
    # policy test read null, object and list arguments as "", serve leaves them out:
    # `int(tool.arguments.max_results)` failed in the case and passed in serve.
    args = {"max_results": None, "filter": {"a": 1}, "ids": [1, 2], "k": 5, "q": "x"}
    doc = {"messages": [{"role": "assistant", "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "search", "arguments": json.dumps(args)}}]}]}
    served, _ = request_from_body("chat", doc)
    from_body = build_attributes(request=served).doc.request.tool_details[0].arguments
    from_case = build_attributes(request={"tool_details": [
        {"name": "search", "called": True, "arguments": args}]}).doc.request.tool_details[0]
    assert dict(from_case.arguments) == dict(from_body) == {"k": "5", "q": "x"}


def _search_args(fields: dict) -> list[dict]:
    return [t["arguments"] for t in fields["tool_details"] if t["name"] == "search"]


def test_every_parallel_call_of_the_latest_turn_gives_its_arguments() -> None:
    # Read alone, the latest call let an earlier one of the same turn through: a call
    # with max_results 1 after one with 100 passed a policy capping it at 50.
    def call(n: int) -> dict:
        return {"id": f"c{n}", "type": "function",
                "function": {"name": "search", "arguments": json.dumps({"max_results": n})}}

    chat = {"messages": [
        {"role": "assistant", "tool_calls": [call(7)]},  # an older turn: not read
        {"role": "tool", "tool_call_id": "c7", "content": "ok"},
        {"role": "assistant", "tool_calls": [call(100), call(1)]},
        {"role": "tool", "tool_call_id": "c100", "content": "ok"},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    fields, _ = request_from_body("chat", chat)
    assert _search_args(fields) == [{"max_results": 1}, {"max_results": 100}]
    assert fields["tools"] == ["search"] and fields["tool_count"] == 1
    # A Responses turn is what came since the last message: its calls in a row, or each
    # beside its output.
    older = [{"type": "function_call", "call_id": "a", "name": "search",
              "arguments": json.dumps({"max_results": 7})},
             {"type": "function_call_output", "call_id": "a", "output": "ok"},
             {"role": "user", "content": "again"}]
    calls = [{"type": "function_call", "call_id": c, "name": "search",
              "arguments": json.dumps({"max_results": n})} for c, n in (("b", 100), ("c", 1))]
    outputs = [{"type": "function_call_output", "call_id": c, "output": "ok"}
               for c in ("b", "c")]
    for items in ([*calls, *outputs], [calls[0], outputs[0], calls[1], outputs[1]]):
        fields, _ = request_from_body("responses", {"input": [*older, *items]})
        assert _search_args(fields) == [{"max_results": 1}, {"max_results": 100}]


def test_a_negative_token_cap_is_none() -> None:
    # -1 passed `request.max_tokens > 4096` and lowered the cost estimate.
    for body in ({"messages": [], "max_tokens": -1},
                 {"messages": [], "max_tokens": -5000, "max_completion_tokens": 100}):
        fields, _ = request_from_body("chat", body)
        assert fields.get("max_tokens", 0) == (100 if "max_completion_tokens" in body else 0)
    attrs = build_attributes(request=request_from_body("chat", {"max_tokens": -5000})[0])
    assert attrs.request.max_tokens == 0


def test_a_long_responses_agent_loop_is_no_cut() -> None:
    # Call, output, call, output ...: one turn to the reader, whose 70 reads of a file
    # were a cut, and limits.truncated refused an ordinary agent loop.
    items = [{"role": "user", "content": "fix it"}]
    for n in range(70):
        items += [{"type": "function_call", "call_id": f"c{n}", "name": "read_file",
                   "arguments": json.dumps({"path": f"f{n}.py"})},
                  {"type": "function_call_output", "call_id": f"c{n}", "output": "ok"}]
    fields, cut = request_from_body("responses", {"input": items})
    assert not cut and fields["tools"] == ["read_file"]
    assert {"path": "f69.py"} in [t["arguments"] for t in fields["tool_details"]]


def test_past_the_cap_in_one_chat_message_the_calls_are_a_cut() -> None:
    calls = [_call("search", json.dumps({"q": str(n)})) for n in range(80)]
    _, cut = request_from_body("chat", {"messages": [{"role": "assistant",
                                                      "tool_calls": calls}]})
    assert "request.tool_details" in cut


def test_each_answer_asked_for_is_costed() -> None:
    # n=128 answers of 4096 tokens each were costed as one: a $5 request passed a policy
    # refusing any over $0.25.
    fields, _ = request_from_body("chat", {"messages": [], "n": 128, "max_tokens": 4096})
    assert fields["choices"] == 128
    assert request_from_body("completions", {"prompt": "x", "best_of": 3, "n": 2})[0][
        "choices"] == 3
    assert request_from_body("chat", {"messages": [], "n": True})[0]["choices"] == 1
    # As a lenient server reads a count; and each prompt of a completions batch.
    assert request_from_body("chat", {"messages": [], "n": 7.0})[0]["choices"] == 7
    assert request_from_body("chat", {"messages": [], "n": "7"})[0]["choices"] == 7
    assert request_from_body("completions", {"prompt": ["a"] * 100})[0]["choices"] == 100
    assert request_from_body("completions", {"prompt": [1, 2, 3], "n": 2})[0][
        "choices"] == 2
    cand = CandidateInfo("large", "openai", "us", "external", 0.0025, 0.01, "demo_b")
    res = cand.resource(build_attributes(request=fields).request)
    assert res.estimated_cost_usd == pytest.approx(128 * 4096 * 0.01 / 1000)


def test_a_repeated_parallel_call_adds_no_entry_and_choices_default_to_one() -> None:
    call = {"id": "c", "type": "function",
            "function": {"name": "search", "arguments": json.dumps({"max_results": 5})}}
    fields, cut = request_from_body("chat", {"messages": [
        {"role": "assistant", "tool_calls": [call] * 40}]})
    assert _search_args(fields) == [{"max_results": 5}] and not cut
    # A policy test's case that says nothing of n is one answer, as serve reads it.
    assert build_attributes(request={"operation": "chat"}).request.choices == 1
