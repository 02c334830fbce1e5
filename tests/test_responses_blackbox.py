"""Regressions from a black-box run of the Responses API through a real stack: tools a
provider reads that policies did not see (namespaces, tools declared in input items, a
tool named twice), Responses input items whose text went out unscanned, placeholders of
a conversation the provider holds, and a request that takes its input from a stored
prompt."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from atp_extproc import config
from atp_extproc.exchange import Exchange
from tests.conftest import numbered
from tests.test_exchange import (
    ALICE,
    BOB,
    EXAMPLE,
    assert_error,
    forwarded,
    immediate,
    resp_body,
    resp_headers,
    send_body,
)

RESPONSES = "/v1/responses"


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    return config.load(EXAMPLE)


def _fn(name: str) -> dict:
    return {"type": "function", "name": name, "parameters": {"type": "object"}}


def _send(snap, key: str = ALICE, **body):
    return send_body(snap, {"model": "gpt-4o-mini", "input": "hi", **body}, RESPONSES,
                     key=key)[1]


def _sent(resp) -> dict:
    return json.loads(forwarded(resp)[1])


def _denied_by(resp) -> str:
    status, body, _ = immediate(resp)
    assert (status, body["error"]["code"]) == (403, "policy_denied")
    return body["error"]["policy_id"]


# -- tools ----------------------------------------------------------------------------


def test_a_denied_tool_in_a_namespace_is_denied(snap) -> None:
    ops = {"type": "namespace", "name": "ops", "description": "ops", "tools": [_fn("shell")]}
    assert _denied_by(_send(snap, tools=[ops])) == "tools.no_code_execution"


def test_a_namespace_loses_the_tools_policy_strips_and_keeps_the_others(snap) -> None:
    # bob may offer get_weather and search_docs only (examples/policies/tools.yaml).
    tools = [{"type": "namespace", "name": "get_weather", "description": "d",
              "tools": [_fn("send_email"), _fn("search_docs")]},
             {"type": "namespace", "name": "search_docs", "description": "d",
              "tools": [_fn("send_email")]}]
    sent = _sent(_send(snap, BOB, tools=tools))
    assert sent["tools"] == [{**tools[0], "tools": [_fn("search_docs")]}]


@pytest.mark.parametrize("item", [
    {"type": "additional_tools", "role": "developer", "tools": [_fn("shell")]},
    {"type": "tool_search_output", "call_id": "t1", "execution": "client",
     "status": "completed", "tools": [_fn("shell")]},
])
def test_a_denied_tool_declared_in_an_input_item_is_denied(snap, item) -> None:
    resp = _send(snap, input=[item, {"role": "user", "content": "hi"}])
    assert _denied_by(resp) == "tools.no_code_execution"


def test_a_tool_to_strip_declared_in_an_input_item_refuses_the_request(snap) -> None:
    item = {"type": "additional_tools", "role": "developer", "tools": [_fn("send_email")]}
    resp = _send(snap, BOB, input=[item, {"role": "user", "content": "hi"}])
    assert assert_error(resp, 403, "tool_not_allowed")["param"] == "input[0].tools"


@pytest.mark.parametrize("tool", [
    {"type": "function", "name": "shell", "function": {"strict": True}},
    {"type": "function", "name": "shell", "function": {"name": None}},
    {"type": "custom", "name": "shell", "custom": {"description": "x"}},
])
def test_a_tool_named_at_the_top_is_read_by_that_name(snap, tool) -> None:
    assert _denied_by(_send(snap, tools=[tool])) == "tools.no_code_execution"


def test_a_namespace_in_a_namespace_loses_the_tools_policy_strips(snap) -> None:
    inner = {"type": "namespace", "name": "search_docs", "description": "d",
             "tools": [_fn("deploy"), _fn("search_docs")]}
    outer = {"type": "namespace", "name": "get_weather", "description": "d",
             "tools": [_fn("get_weather"), inner]}
    sent = _sent(_send(snap, BOB, tools=[outer]))
    assert sent["tools"] == [{**outer, "tools": [_fn("get_weather"),
                                                 {**inner, "tools": [_fn("search_docs")]}]}]


@pytest.mark.parametrize("tool", [{"type": "file_search", "name": "get_weather"},
                                  {"type": "web_search", "name": "search_docs"},
                                  {"type": "shell", "name": "get_weather"}])
def test_a_built_in_tool_that_carries_a_name_is_refused(snap, tool) -> None:
    # Policies read a built-in tool by its type, a provider that ignores `type` (Ollama)
    # by the name: bob's allow list and alice's deny list would each see the wrong tool.
    for key in (ALICE, BOB):
        assert assert_error(_send(snap, key, tools=[tool]), 400, "invalid_value")[
            "param"] == "tools[0].type"


@pytest.mark.parametrize("tool", [
    {"type": "function", "name": "shell", "function": {"name": "get_weather"}},
    {"type": "custom", "name": "shell", "custom": {"name": "get_weather"}},
    {"type": "function", "function": {"name": "shell"}, "custom": {"name": "get_weather"}},
])
def test_a_tool_with_two_names_is_refused(snap, tool) -> None:
    # Policies read one name, a provider may read the other: neither may be trusted.
    assert assert_error(_send(snap, BOB, tools=[tool]), 400, "invalid_value")["param"] == \
        "tools[0]"


@pytest.mark.parametrize(("field", "value"), [
    ("tools", {"type": "function", "name": "shell"}), ("tools", ["shell"]),
    ("tool_choice", 5),
])
def test_tool_fields_of_another_shape_are_refused(snap, field, value) -> None:
    assert assert_error(_send(snap, **{field: value}), 400, "invalid_type")["param"] == field


# -- input items read whole -----------------------------------------------------------

EMAIL = "alice.owner@example.org"


@pytest.mark.parametrize("item", [
    {"type": "program", "id": "p1", "code": f"send('{EMAIL}')"},
    {"type": "program_output", "id": "p1", "result": f"sent to {EMAIL}"},
    {"type": "tool_search_call", "call_id": "t1", "arguments": {"query": EMAIL}},
    {"type": "mcp_approval_response", "approval_request_id": "a1", "approve": False,
     "reason": f"ask {EMAIL} first"},
    {"type": "computer_call_output", "call_id": "c1",
     "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA"},
     "acknowledged_safety_checks": [{"id": "s1", "code": "x", "message": f"mail {EMAIL}"}]},
    {"role": "user", "content": {"text": EMAIL}},
    {"role": "user", "content": [{"type": "input_text", "text": {"value": EMAIL}}]},
    {"type": "function_call", "call_id": "f1", "name": "lookup",
     "arguments": {"who": EMAIL}},
    {"type": "an_item_of_tomorrow", "note": EMAIL},
    {"type": "web_search_call", "id": "w1", "status": "completed",
     "action": {"type": "find", "Pattern": EMAIL, "url": f"https://x.test/?to={EMAIL}"}},
    {"type": "image_generation_call", "id": "i1", "status": "completed", "result": "AAAA",
     "revised_prompt": f"a portrait of {EMAIL}"},
    # (local_shell_call is a code execution tool the example policies refuse.)
    {"type": "future_runner_call", "call_id": "l1", "action": {
        "type": "exec", "command": ["ls"], "env": {"data": EMAIL, "name": EMAIL}}},
    {"type": "tool_search_call", "call_id": "t1", "arguments": {EMAIL: "who"}},
    {"role": "assistant", "content": [{"type": "output_text", "text": "see", "annotations": [
        {"type": "url_citation", "title": f"about {EMAIL}", "url": "https://x.test"}]}]},
])
def test_text_anywhere_in_an_input_item_is_redacted(snap, item) -> None:
    raw = forwarded(_send(snap, input=[item]))[1]
    assert raw is not None and EMAIL.encode() not in raw
    assert "[EMAIL_1]" in numbered(raw.decode())


@pytest.mark.parametrize("item", [
    {"type": "function_call_output", "call_id": "c",
     "output": {"type": "input_text", "text": f"mail {EMAIL}"}},
    {"type": "custom_tool_call_output", "call_id": "c", "output": {"text": f"mail {EMAIL}"}},
    {"type": "computer_call_output", "call_id": "c", "output": {
        "type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA",
        "note": EMAIL}},
    {"type": "tool_search_call", "call_id": "t1", "arguments": {
        "file_data": EMAIL, "image_url": {"nested": EMAIL}, "encrypted_content": EMAIL}},
    {"role": "user", "content": [{"text": "see", "annotations": [{"title": EMAIL}]}]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no",
                                       "reason": EMAIL}]},
])
def test_text_in_an_output_object_or_under_a_binary_sounding_key_is_redacted(snap,
                                                                             item) -> None:
    raw = forwarded(_send(snap, input=[item]))[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_long_base64_deep_down_is_left_as_it_is(snap) -> None:
    blob = "QUJD" * 100 + "NDExMTExMTExMTExMTExMQ=="
    item = {"type": "tool_search_call", "call_id": "t1", "arguments": {"attachment": blob}}
    assert _sent(_send(snap, input=[item]))["input"][0]["arguments"]["attachment"] == blob


@pytest.mark.parametrize("args", ['{"card_number": 4.111111111111111e15}',
                                  '{"phone": 4.155552671E9}'])
def test_a_number_in_exponent_form_under_a_classed_key_is_redacted(snap, args) -> None:
    item = {"type": "function_call", "call_id": "c", "name": "pay", "arguments": args}
    sent = _sent(_send(snap, input=[item]))
    value = next(iter(json.loads(sent["input"][0]["arguments"]).values()))
    assert isinstance(value, str) and value.startswith(("[CARD:", "[PHONE:"))


def test_two_keys_of_a_json_text_that_mask_alike_are_refused(snap) -> None:
    output = json.dumps({EMAIL: "Alice, VIP", EMAIL.upper(): "Alice (old)"})
    item = {"type": "function_call_output", "call_id": "c", "output": output}
    assert_error(_send(snap, input=[item]), 400, "sensitive_data_refused")


def test_a_key_repeated_in_many_maps_is_renamed_in_each(snap) -> None:
    rows = [{EMAIL: i, "n": i} for i in range(3)]
    item = {"type": "tool_search_call", "call_id": "t1", "arguments": {"rows": rows}}
    sent = numbered(_sent(_send(snap, input=[item])))
    assert sent["input"][0]["arguments"]["rows"] == [{"[EMAIL_1]": i, "n": i}
                                                     for i in range(3)]


def test_a_number_under_a_card_key_of_an_object_is_redacted(snap) -> None:
    item = {"type": "tool_search_call", "call_id": "t1",
            "arguments": {"card_number": 4111111111111111, "limit": 4111111111111111}}
    sent = numbered(_sent(_send(snap, input=[item])))
    assert sent["input"][0]["arguments"] == {"card_number": "[CARD_1]",
                                             "limit": 4111111111111111}


def test_binary_data_and_names_pass_unchanged(snap) -> None:
    image = "data:image/png;base64," + "MTExMTExMTExMTExMTExMQ==" * 4
    items = [{"role": "user", "content": [
        {"type": "input_image", "image_url": image, "detail": "auto"},
        {"type": "input_file", "filename": f"{EMAIL} cv.pdf", "file_data": image}]},
        {"type": "function_call", "call_id": "f1", "name": "lookup", "arguments": "{}"}]
    sent = numbered(_sent(_send(snap, input=items)))
    image_part, file_part = sent["input"][0]["content"]
    assert image_part["image_url"] == image and file_part["file_data"] == image
    assert file_part["filename"] == "[EMAIL_1] cv.pdf"
    assert sent["input"][1]["name"] == "lookup"


# -- a stored prompt --------------------------------------------------------------------


def test_a_request_may_take_its_input_from_a_stored_prompt(snap) -> None:
    body = {"model": "gpt-4o-mini",
            "prompt": {"id": "pmpt_1", "variables": {"who": f"write to {EMAIL}"}}}
    sent = numbered(_sent(send_body(snap, body, RESPONSES)[1]))
    assert sent["prompt"]["variables"]["who"] == "write to [EMAIL_1]"


def test_a_stored_prompts_file_variable_is_read_and_its_data_kept(snap) -> None:
    data = "data:application/pdf;base64,JVBERi0x"
    body = {"model": "gpt-4o-mini", "prompt": {"id": "pmpt_1", "variables": {"doc": {
        "type": "input_file", "filename": f"{EMAIL} cv.pdf", "file_data": data}}}}
    sent = numbered(_sent(send_body(snap, body, RESPONSES)[1]))
    assert sent["prompt"]["variables"]["doc"]["filename"] == "[EMAIL_1] cv.pdf"
    assert sent["prompt"]["variables"]["doc"]["file_data"] == data


@pytest.mark.parametrize("prompt", [f"write to {EMAIL}", {"id": "p", "variables": [EMAIL]},
                                    {"id": "p", "variables": {"who": [EMAIL]}}])
def test_a_stored_prompt_of_another_shape_is_refused(snap, prompt) -> None:
    resp = send_body(snap, {"model": "gpt-4o-mini", "prompt": prompt}, RESPONSES)[1]
    assert assert_error(resp, 400, "invalid_type")["param"] == "prompt"


@pytest.mark.parametrize("body", [{}, {"prompt": None}])
def test_a_request_without_input_or_prompt_is_refused(snap, body) -> None:
    resp = send_body(snap, {"model": "gpt-4o-mini", **body}, RESPONSES)[1]
    assert assert_error(resp, 400, "missing_required_parameter")["param"] == "input"


# -- a conversation the provider holds ----------------------------------------------------


def _turn(snap, text: str, previous: str | None) -> tuple[Exchange, str]:
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    snap = dataclasses.replace(snap, routes=routes)
    body = {"model": "gpt-4o-mini", "input": text}
    if previous is not None:
        body["previous_response_id"] = previous
    ex, resp = send_body(snap, body, RESPONSES)
    return ex, _sent(resp)["input"]


@pytest.mark.parametrize("previous", [None, "resp_0"])
def test_each_value_keeps_one_placeholder_in_every_responses_request(snap, previous) -> None:
    # Stored responses, item references and conversations let a provider put values of
    # several requests side by side: numbered per request, two would both be [EMAIL_1].
    _, first = _turn(snap, f"My email is {EMAIL}", None)
    other = "mallory.other@example.net"
    ex, second = _turn(snap, f"Forward it to {other}, not {EMAIL}", previous)
    token = re.fullmatch(r"My email is (\[EMAIL:[0-9a-f]{16}\])", first)
    assert token is not None
    again = re.fullmatch(r"Forward it to (\[EMAIL:[0-9a-f]{16}\]), not (\S+)", second)
    assert again is not None and again.group(2) == token.group(1) != again.group(1)
    # The model's reference to each is answered with its own value.
    ex.handle(resp_headers(200, "application/json"))
    answer = {"output": [{"type": "message", "content": [{"type": "output_text", "text":
              f"{again.group(1)} gets what {token.group(1)} sent"}]}]}
    out = ex.handle(resp_body(json.dumps(answer).encode()))
    text = json.loads(out.response_body.response.body_mutation.body)
    assert text["output"][0]["content"][0]["text"] == f"{other} gets what {EMAIL} sent"


def test_keyed_placeholders_outlive_a_reload(snap) -> None:
    again = config.load(EXAMPLE)
    assert _turn(snap, EMAIL, None)[1] == _turn(again, EMAIL, None)[1]


def test_chat_placeholders_are_numbered_per_request(snap) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": EMAIL}]}
    assert _sent(send_body(snap, body)[1])["messages"][0]["content"] == "[EMAIL_1]"


# -- tool-call arguments ------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["chat", "responses"])
def test_a_key_twice_in_a_tool_calls_arguments_is_refused(snap, operation) -> None:
    # tools.search_max_results reads max_results: 500 is denied; with a second key it
    # read 5 while the provider may read 500.
    arguments = '{"max_results": 500, "max_results": 5}'
    if operation == "chat":
        body = {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "find"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "search_docs", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
        resp = send_body(snap, body)[1]
    else:
        resp = _send(snap, input=[{"type": "function_call", "call_id": "c1",
                                   "name": "search_docs", "arguments": arguments}])
    assert_error(resp, 400, "duplicate_key")


def test_a_chat_file_parts_name_is_redacted_and_its_data_kept(snap) -> None:
    data = "data:application/pdf;base64," + "NDExMTExMTExMTExMTExMQ==" * 4
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see file"},
        {"type": "file", "file": {"filename": f"{EMAIL} cv.pdf", "file_data": data}},
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]}
    parts = _sent(send_body(snap, body)[1])["messages"][0]["content"]
    assert parts[1]["file"] == {"filename": "[EMAIL_1] cv.pdf", "file_data": data}
    assert parts[2]["input_audio"]["data"] == data


# -- shapes no provider takes: refused or read, never a crash ----------------------------


@pytest.mark.parametrize("body", [
    {"model": "gpt-4o-mini", "input": [{"type": ["message"], "role": "user", "content": "hi"}]},
    {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [
        {"type": {"t": "input_text"}, "text": EMAIL}]}]},
    {"model": "gpt-4o-mini", "input": [{"type": "function_call_output", "call_id": "c",
                                        "output": {"type": ["input_text"], "text": EMAIL}}]},
])
def test_a_type_that_is_no_string_is_read_not_a_crash(snap, body) -> None:
    raw = forwarded(send_body(snap, body, RESPONSES)[1])[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_a_chat_part_type_that_is_no_string_is_read_not_a_crash(snap) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": ["text"], "text": EMAIL}]}]}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is not None and EMAIL.encode() not in raw


@pytest.mark.parametrize("where", ["metadata", "tool", "arguments"])
def test_a_lone_surrogate_where_policies_read_is_no_crash(snap, where) -> None:
    # Refused as invalid Unicode, in the body itself and inside tool arguments (a JSON
    # text in a string), rather than read as U+FFFD.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if where == "metadata":
        body["metadata"] = {"k\ud800": "v\udfff"}
    elif where == "tool":
        body["tools"] = [{"type": "function", "function": {"name": "f\ud800"}}]
    else:
        body["messages"] += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function",
             "function": {"name": "search_docs", "arguments": '{"q": "\\ud800"}'}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as an escape
    assert send_body(snap, raw)[1].immediate_response.status.code == 400


@pytest.mark.parametrize("output", [
    [{"type": "input_text", "text": '{"card_number": 4.111111111111111e15}'}],
    {"type": "input_text", "text": '{"card_number": 4.111111111111111e15}'},
])
def test_a_json_tool_result_in_parts_is_read_as_json(snap, output) -> None:
    item = {"type": "function_call_output", "call_id": "c", "output": output}
    raw = forwarded(_send(snap, input=[item]))[1]
    assert raw is not None and b"4.111111111111111e15" not in raw


def test_a_chat_tool_result_in_parts_is_read_as_json(snap) -> None:
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "pay"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "pay", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": [
            {"type": "text", "text": '{"phone": 4.155552671E9}'}]}]}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is not None and b"4.155552671E9" not in raw


def test_numbers_joined_without_letters_are_no_base64(snap) -> None:
    numbers = "/".join(["+1-415-555-2671"] * 20)
    item = {"type": "custom_tool_call", "call_id": "c", "name": "dial", "input": numbers}
    raw = forwarded(_send(snap, input=[item]))[1]
    assert raw is not None and b"555-2671" not in raw


def test_a_chat_turns_reasoning_is_read(snap) -> None:
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok", "reasoning_content": f"user is {EMAIL}"},
        {"role": "user", "content": "go on"}]}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is not None and EMAIL.encode() not in raw


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages[1].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": {"who": EMAIL}}}]}, "messages[1].tool_calls[0].function"),
    ({"role": "assistant", "function_call": {"name": "f", "arguments": {"who": EMAIL}}},
     "messages[1].function_call"),
    ({"role": "user", "content": [[EMAIL]]}, "messages[1].content"),
])
def test_chat_shapes_redaction_cannot_read_are_refused(snap, message, param) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}, message]}
    assert assert_error(send_body(snap, body)[1], 400, "invalid_type")["param"] == param


@pytest.mark.parametrize("item", [
    {"role": "user", "content": [[f"mail {EMAIL}"]]},
    {"type": "message", "role": {"said": EMAIL}, "content": "hi"},
    {"type": "x_new", EMAIL: "a key of the item itself"},
])
def test_odd_shapes_of_an_input_item_are_read(snap, item) -> None:
    raw = forwarded(_send(snap, input=[item]))[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_a_chat_image_url_is_left_as_it_is(snap) -> None:
    url = ("http://10.0.12.34:8080/avatar/alice.owner@example.org.png"
           "?X-Amz-Credential=AKIAIOSFODNN7QWERTYU")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is None or url.encode() in raw


@pytest.mark.parametrize("shape", ["chat", "responses"])
def test_a_value_split_over_a_tool_results_text_parts_is_found(snap, shape) -> None:
    parts = [{"type": "text" if shape == "chat" else "input_text", "text": t}
             for t in ("contact alice.owner@exa", "mple.org now")]
    if shape == "chat":
        body = {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "who?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": parts}]}
        raw = forwarded(send_body(snap, body)[1])[1]
    else:
        raw = forwarded(_send(snap, input=[{"type": "function_call_output", "call_id": "c",
                                            "output": parts}]))[1]
    assert raw is not None and b"alice.owner@exa" not in raw


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "hi", "name": [EMAIL]},
    {"role": "assistant", "content": "no", "refusal": [EMAIL]},
    {"role": "tool", "content": "ok", "tool_call_id": {"who": EMAIL}},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": {"who": EMAIL}, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "content": None, "function_call": {"name": [EMAIL], "arguments": "{}"}},
    {"role": "assistant", "content": None,
     "function_call": {"name": "f", "arguments": "{}", "note": EMAIL}},
])
def test_chat_fields_of_an_odd_shape_are_read(snap, message) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}, message]}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is not None and EMAIL.encode() not in raw


@pytest.mark.parametrize("fields", [
    # Fields beside a call's own went out unread where the call had no arguments text, or
    # was a custom tool's.
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "note": EMAIL}}]}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "custom", "custom": {"name": "f", "input": "x", "note": EMAIL}}]}]},
    # A tool choice's and a prediction's other fields.
    {"tool_choice": EMAIL}, {"function_call": EMAIL},
    {"tool_choice": {"type": "function", "function": {"name": "f"}, "note": EMAIL}},
    {"prediction": {"type": "content", "content": "x", "note": EMAIL}},
])
def test_chat_fields_beside_what_is_known_are_read(snap, fields) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}
    raw = forwarded(send_body(snap, body)[1])[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_a_stored_prompts_fields_are_read(snap) -> None:
    raw = forwarded(_send(snap, input="hi", prompt={
        "id": "pmpt_1", "version": EMAIL, "note": EMAIL, "variables": {"who": "x"}}))[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_keys_in_a_list_in_a_list_are_read(snap) -> None:
    raw = forwarded(_send(snap, input=[{"role": "user", "content": [[{EMAIL: "vip"}]]}]))[1]
    assert raw is not None and EMAIL.encode() not in raw


def test_an_mcp_list_tools_item_declares_no_tools(snap) -> None:
    # The tools an MCP server lists are the server's (one tool, `mcp`): read as tools
    # the request declared, bob's tool scope refused the whole conversation.
    listing = {"type": "mcp_list_tools", "id": "l", "server_label": "ops",
               "tools": [{"name": "deploy", "input_schema": {"type": "object"}}]}
    sent = _sent(_send(snap, BOB, input=[{"role": "user", "content": "hi"}, listing]))
    assert sent["input"][1] == listing
