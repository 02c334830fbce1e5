"""A tool `type` ATP read otherwise than a provider may: policies read any type but
function, custom and namespace as a built-in tool named after it, so `shell` declared
as "Function", "function " or "web_search" passed tools.no_code_execution
(examples/policies/tools.yaml) and reached providers that fold case, trim or ignore
`type`."""

from __future__ import annotations

import json

import pytest

from atp_extproc import config
from atp_extproc.llm_api import RequestError, read_request
from tests.test_exchange import ALICE, BOB, CHAT, EXAMPLE, forwarded, immediate, send_body

RESPONSES = "/v1/responses"
SHELL_PARAMS = {"type": "object", "properties": {"cmd": {"type": "string"}}}


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    return config.load(EXAMPLE)


def _chat(snap: config.Snapshot, key: str = ALICE, **body):
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return send_body(snap, doc, CHAT, key=key)[1]


def _responses(snap: config.Snapshot, key: str = ALICE, **body):
    return send_body(snap, {"model": "gpt-4o-mini", "input": "hi", **body}, RESPONSES,
                     key=key)[1]


def _refused(resp, param: str) -> None:
    status, body, _ = immediate(resp)  # an immediate answer: nothing went upstream
    assert status == 400, body
    assert {k: body["error"][k] for k in ("type", "code", "param")} == {
        "type": "invalid_request_error", "code": "invalid_value", "param": param}


def _denied_by(resp) -> str:
    status, body, _ = immediate(resp)
    assert (status, body["error"]["code"]) == (403, "policy_denied"), body
    return body["error"]["policy_id"]


@pytest.mark.parametrize("kind", ["Function", "FUNCTION", "function ", " function",
                                  "function\t", "", "web_search", "shell", "fn"])
def test_a_chat_tool_of_another_type_is_refused_not_sent_as_shell(snap, kind) -> None:
    function = {"name": "shell", "parameters": SHELL_PARAMS}
    _refused(_chat(snap, tools=[{"type": kind, "function": function}]), "tools[0].type")
    # Spelled as the API spells it, or without a type (legacy), it is the denied tool.
    for tool in ({"type": "function", "function": function}, {"function": function}):
        assert _denied_by(_chat(snap, tools=[tool])) == "tools.no_code_execution"


@pytest.mark.parametrize("tool", [
    {"type": "Function", "name": "shell", "parameters": SHELL_PARAMS},
    {"type": "CUSTOM", "name": "shell"},
    {"type": "function ", "name": "shell"},
    {"type": "", "name": "shell"},
    {"type": "web_search", "name": "shell"},
    {"type": "file_search", "name": "shell"},
])
def test_a_responses_tool_of_another_type_is_refused_not_sent_as_shell(snap, tool) -> None:
    _refused(_responses(snap, tools=[tool]), "tools[0].type")


@pytest.mark.parametrize("kind", ["SHELL", "Shell", "\u017fhell", "local_Shell",
                                  "Code_Interpreter"])
def test_a_built_in_denied_tool_in_another_case_is_refused(snap, kind) -> None:
    # Go's strings.EqualFold reads "\u017fhell" as "shell": policies read neither.
    _refused(_responses(snap, tools=[{"type": kind}]), "tools[0].type")


@pytest.mark.parametrize(("tool", "denied"), [
    ({"type": "web_search"}, None),
    ({"type": "web_search_preview_2025_03_11"}, None),
    ({"type": "file_search", "vector_store_ids": ["vs_1"]}, None),
    ({"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
      "environment": "browser"}, None),
    ({"type": "image_generation"}, None),
    ({"type": "mcp", "server_label": "ops", "server_url": "https://mcp.test"}, None),
    ({"type": "apply_patch"}, None),
    ({"type": "openrouter:web_search"}, None),  # a provider's own built-in
    ({"type": "code_interpreter", "container": {"type": "auto"}}, "tools.no_code_execution"),
    ({"type": "local_shell"}, "tools.no_code_execution"),
    ({"type": "shell"}, "tools.no_code_execution"),
])
def test_built_in_tools_sent_as_the_api_spells_them_still_work(snap, tool, denied) -> None:
    resp = _responses(snap, tools=[tool])
    if denied:
        assert _denied_by(resp) == denied
    else:
        assert json.loads(forwarded(resp)[1])["tools"] == [tool]
    _refused(_responses(snap, tools=[{**tool, "type": tool["type"].upper()}]),
             "tools[0].type")


def test_a_forced_mcp_tool_keeps_its_name_but_not_another_case(snap) -> None:
    mcp = {"type": "mcp", "server_label": "ops", "server_url": "https://mcp.test"}
    choice = {"type": "mcp", "server_label": "ops", "name": "ask_question"}
    sent = json.loads(forwarded(_responses(snap, tools=[mcp], tool_choice=choice))[1])
    assert sent["tool_choice"] == choice
    _refused(_responses(snap, tools=[mcp], tool_choice={**choice, "type": "MCP"}),
             "tool_choice.type")


@pytest.mark.parametrize(("body", "param"), [
    # Chat's legacy functions are read by name: a type there named another tool.
    ({"functions": [{"name": "shell", "type": "web_search"}]}, "functions[0].type"),
    ({"functions": [{"name": "shell", "type": "Function"}]}, "functions[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "get_weather"}}],
      "tool_choice": {"type": "Function", "function": {"name": "get_weather"}}},
     "tool_choice.type"),
    ({"functions": [{"name": "get_weather"}],
      "function_call": {"type": "FUNCTION", "name": "get_weather"}}, "function_call.type"),
])
def test_legacy_functions_and_tool_choice_types_are_checked(snap, body, param) -> None:
    _refused(_chat(snap, **body), param)


def test_tools_in_a_namespace_or_an_input_item_are_checked(snap) -> None:
    ops = {"type": "namespace", "name": "ops", "description": "ops",
           "tools": [{"type": "Function", "name": "shell"}]}
    _refused(_responses(snap, tools=[ops]), "tools[0].tools[0].type")
    item = {"type": "additional_tools", "role": "developer",
            "tools": [{"type": "web_search", "name": "shell"}]}
    _refused(_responses(snap, input=[item, {"role": "user", "content": "hi"}]),
             "input[0].tools[0].type")


def test_an_allow_list_sees_the_same_refusal(snap) -> None:
    # bob may offer get_weather only: a case variant is refused, not let through.
    tool = {"type": "Function", "function": {"name": "get_weather"}}
    _refused(_chat(snap, BOB, tools=[tool]), "tools[0].type")
    tool = {"type": "function", "function": {"name": "get_weather"}}
    assert json.loads(forwarded(_chat(snap, BOB, tools=[tool]))[1])["tools"] == [tool]


def test_read_request_refuses_a_type_in_another_case() -> None:
    with pytest.raises(RequestError) as err:
        read_request("chat", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "Function", "function": {"name": "x"}}]})
    assert (err.value.status, err.value.code, err.value.param) == (
        400, "invalid_value", "tools[0].type")
    # A type that is no string names nothing: the tool is read by its name, as before.
    doc = {"input": "hi", "tools": [{"type": 5, "name": "shell"}]}
    assert read_request("responses", doc).tool_names == ("shell",)


def test_a_built_in_a_provider_runs_by_its_name_is_read_by_that_name(snap) -> None:
    # Moonshot's Kimi: {"type": "builtin_function", "function": {"name": "$web_search"}}
    # was refused as a built-in carrying a name; it is the name the provider runs.
    kimi = {"type": "builtin_function", "function": {"name": "$web_search"}}
    assert json.loads(forwarded(_chat(snap, tools=[kimi]))[1])["tools"] == [kimi]
    shell = {"type": "builtin_function", "function": {"name": "shell"}}
    assert _denied_by(_chat(snap, tools=[shell])) == "tools.no_code_execution"
