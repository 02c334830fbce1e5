"""Unit tests for atp_extproc.llm_api: parsing, checks, splice rewrite, usage, SSE."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from atp_extproc.llm_api import (
    MAX_MODEL_LENGTH,
    OPERATIONS,
    Limits,
    LlmRequest,
    RequestError,
    SseStream,
    Usage,
    check_depth,
    estimate_tokens,
    needs_usage_injection,
    parse_body,
    read_request,
    read_response,
    rewrite,
)

DEPTH = 64


def refused(raw: bytes, max_depth: int = DEPTH) -> RequestError:
    with pytest.raises(RequestError) as info:
        check_depth(parse_body(raw, max_depth), max_depth)
    return info.value


def _strict_loads(text: str | bytes):
    def reject(name: str):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=reject)


# -- parse_body: valid bodies ------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"{}", {}),
        (b"{ }", {}),
        (b" \t\r\n{\r\n}\n\t ", {}),
        (b'{"a":1}', {"a": 1}),
        (b'  {  "a"  :  1  ,  "b"  :  [ 1 , 2 ]  }  ', {"a": 1, "b": [1, 2]}),
        (b'{\n\t"a":\r\n"x"\n}', {"a": "x"}),
        (b'{"":0}', {"": 0}),
        (b'{"a":null,"b":true,"c":false,"d":-1.5e3,"e":{}}',
         {"a": None, "b": True, "c": False, "d": -1500.0, "e": {}}),
    ],
)
def test_parse_body_valid(raw: bytes, expected: dict) -> None:
    parsed = parse_body(raw, DEPTH)
    assert parsed.doc == expected
    assert parsed.text == raw.decode()
    assert parsed.text[parsed.open_brace] == "{"
    for key, (start, end) in parsed.spans.items():
        assert json.loads(parsed.text[start:end]) == expected[key]


def test_parse_body_unicode_and_escapes() -> None:
    raw = '{"content":"héllo 世界 🎉","esc":"\\u00e9\\n\\"q\\"","k\\u00e9y":1}'.encode()
    parsed = parse_body(raw, DEPTH)
    assert parsed.doc == {"content": "héllo 世界 🎉", "esc": 'é\n"q"', "kéy": 1}
    start, end = parsed.spans["content"]
    assert parsed.text[start:end] == '"héllo 世界 🎉"'


def test_parse_body_spans_are_exact_value_text() -> None:
    raw = b'{ "model" :  "gpt-4o"  , "messages":[ {"role":"user"} ] ,"n": 2 }'
    parsed = parse_body(raw, DEPTH)
    text = parsed.text
    assert text[slice(*parsed.spans["model"])] == '"gpt-4o"'
    assert text[slice(*parsed.spans["messages"])] == '[ {"role":"user"} ]'
    assert text[slice(*parsed.spans["n"])] == "2"
    assert list(parsed.spans) == ["model", "messages", "n"]


def test_parse_body_open_brace_after_leading_whitespace() -> None:
    parsed = parse_body(b'\n\n  {"a":1}', DEPTH)
    assert parsed.open_brace == 4


# -- parse_body: invalid bodies ----------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"{ ",
        b'{"a"',
        b'{"a" ',
        b'{"a":',
        b'{"a":}',
        b'{"a":1',
        b'{"a":1,',
        b'{"a":1,}',
        b"{,}",
        b"{a:1}",
        b"{'a':1}",
        b'{"a" 1}',
        b'{"a":1 "b":2}',
        b'{"a":[1,]}',
        b'{"a":"unterminated}',
        b'{"a":"ctl\x01char"}',
        b"nope",
        b"[1,",
        b'"unterminated',
    ],
)
def test_parse_body_invalid_json(raw: bytes) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_json")
    assert err.type == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [b'{"a":1}x', b'{"a":1}}', b'{"a":1} {"b":2}', b"{}[]", b'{"a":1},', b"{} null"],
)
def test_parse_body_trailing_garbage(raw: bytes) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_json")
    assert "extra data" in err.message


@pytest.mark.parametrize(
    "raw, where",
    [(b"\xff{}", 0), (b'{"a":"\xc3"}', 6), (b'{"a":"\xed\xa0\x80"}', 6), (b"{}\x80", 2)],
)
def test_parse_body_not_utf8(raw: bytes, where: int) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_json")
    assert f"not UTF-8 at byte {where}" in err.message


@pytest.mark.parametrize("raw, where", [(b"\x00{}", 0), (b" \xc2\xa0{}", 1)])
def test_a_character_no_json_allows_before_the_object_is_pointed_at(raw, where) -> None:
    err = refused(raw)
    assert err.code == "invalid_json"
    assert err.message.endswith(f"expected a JSON object at character {where}")


def test_parse_body_utf8_bom_is_not_json() -> None:
    err = refused("\ufeff{}".encode())
    assert err.code == "invalid_json" and "byte order mark" in err.message


@pytest.mark.parametrize("sign", ["", "-"])
def test_a_number_too_long_for_python_is_named_without_python_advice(sign: str) -> None:
    err = refused(b'{"max_tokens": ' + sign.encode() + b"9" * 5000 + b"}")
    assert err.code == "invalid_json" and "5000 digits is too long" in err.message
    assert "sys." not in err.message


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"[1,2]", b' [{"a":1}] ', b'"string"', b"1", b"-2.5", b"0", b"true",
     b"false", b"null", b'\n"x"\n'],
)
def test_parse_body_valid_json_but_not_object(raw: bytes) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_body")
    assert "must be a JSON object" in err.message


@pytest.mark.parametrize(
    "raw",
    [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":[1,NaN]}',
     b'{"a":{"b":Infinity}}'],
)
def test_parse_body_rejects_nan_and_infinity(raw: bytes) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_json")
    assert "not valid JSON" in err.message


@pytest.mark.parametrize(
    "raw, key",
    [
        (b'{"a":1,"a":2}', "a"),
        (b'{"model":"x","messages":[],"model":"y"}', "model"),
        (b'{"a":1,"b":2,"a":1}', "a"),
        (b'{"a":{"b":1,"b":2}}', "b"),
        (b'{"a":[{"x":1},{"y":1,"y":1}]}', "y"),
        (b'{"a":{"b":{"c":{"d":1,"d":1}}}}', "d"),
        (b'{"a":1,"\\u0061":2}', "a"),
    ],
)
def test_parse_body_duplicate_keys(raw: bytes, key: str) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "duplicate_key")
    assert repr(key) in err.message


@pytest.mark.parametrize(("doc", "key"), [
    # A field name in another letter case: Go's encoding/json (behind many OpenAI-
    # compatible servers) reads it as the field, which redaction and policies never saw.
    ({"Model": "x", "messages": []}, "Model"),
    ({"model": "x", "messages": [{"role": "user", "CONTENT": "x"}]}, "CONTENT"),
    ({"model": "x", "me\u017f\u017fages": []}, "me\u017f\u017fages"),
    ({"model": "x", "messages": [{"role": "user", "content": [
        {"type": "text", "Text": "x"}]}]}, "Text"),
    ({"model": "x", "messages": [], "Max_Tokens": 9}, "Max_Tokens"),
    ({"model": "x", "messages": [], "tools": [{"type": "function",
                                               "Function": {"name": "f"}}]}, "Function"),
    # Read by policies (cost of n choices), routing (stored turns) and mirroring.
    ({"model": "x", "messages": [], "N": 10}, "N"),
    ({"model": "x", "messages": [], "Best_Of": 5}, "Best_Of"),
    ({"model": "x", "messages": [], "Store": False}, "Store"),
])
def test_a_field_name_in_another_case_is_refused(doc, key) -> None:
    with pytest.raises(RequestError) as info:
        read_request("chat", doc)
    assert (info.value.status, info.value.code, info.value.param) == (
        400, "unknown_parameter", key)


@pytest.mark.parametrize("key", ["Conversation", "Previous_Response_Id"])
def test_a_responses_state_field_in_another_case_is_refused(key: str) -> None:
    # "Conversation" was mirrored: the copy's turn joined the client's conversation.
    with pytest.raises(RequestError) as info:
        read_request("responses", {"model": "x", "input": "hi", key: "conv_1"})
    assert (info.value.code, info.value.param) == ("unknown_parameter", key)


@pytest.mark.parametrize("key", ["Background", "BACKGROUND", "bac\u212aground"])
def test_background_in_another_case_is_refused(key: str) -> None:
    # Only `background` itself was refused: a Go provider would run these as background
    # responses, which ATP cannot fetch, restore or price.
    with pytest.raises(RequestError) as info:
        read_request("responses", {"model": "x", "input": "hi", key: True})
    assert (info.value.code, info.value.param) == ("unknown_parameter", key)


def test_keys_of_the_clients_own_maps_may_differ_only_in_case() -> None:
    schema = {"type": "object", "properties": {"id": {}, "ID": {}, "Content": {}}}
    doc = {"model": "x", "messages": [{"role": "user", "content": "hi"}],
           "metadata": {"Env": "a", "env": "b", "User": "c"},
           "response_format": {"type": "json_schema",
                               "json_schema": {"name": "s", "schema": schema}},
           "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
           "input_tokens": [[1, 2]], "Temperature": 0.2}
    assert read_request("chat", doc).model == "x"


def test_parse_body_same_key_in_sibling_objects_is_fine() -> None:
    parsed = parse_body(b'{"a":{"x":1},"b":{"x":2},"c":[{"x":1},{"X":1}]}', DEPTH)
    assert parsed.doc["c"] == [{"x": 1}, {"X": 1}]


def _nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    # A top-level object (depth 1) holding depth-1 nested containers.
    inner = depth - 1
    return ('{"a":' + open_ * inner + close * inner + "}").encode()


@pytest.mark.parametrize("limit", [2, 5, 64, 512])
def test_depth_at_bound_is_accepted(limit: int) -> None:
    parsed = parse_body(_nested(limit), limit)
    assert "a" in parsed.doc


@pytest.mark.parametrize("limit", [2, 5, 64, 512])
def test_depth_just_over_bound_is_refused(limit: int) -> None:
    err = refused(_nested(limit + 1), limit)
    assert (err.status, err.code) == (400, "json_too_deep")
    assert str(limit) in err.message


def test_depth_counts_objects_too() -> None:
    at = b'{"a":{"b":{"c":1}}}'  # depth 3
    assert parse_body(at, 3).doc == {"a": {"b": {"c": 1}}}
    assert refused(at, 2).code == "json_too_deep"


def test_depth_of_flat_object_is_one() -> None:
    assert parse_body(b'{"a":1,"b":"x"}', 1).doc == {"a": 1, "b": "x"}


def test_depth_checks_every_branch() -> None:
    raw = b'{"a":[1],"b":{"c":[1]},"d":[[[[1]]]]}'  # d branch: depth 5
    assert parse_body(raw, 5)
    assert refused(raw, 4).code == "json_too_deep"


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' + b"[" * 100_000,
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a":' + b'{"b":' * 100_000,
    ],
    ids=["bare-open", "bare-closed", "in-object-open", "in-object-closed", "objects"],
)
def test_extremely_deep_nesting_is_400_not_a_crash(raw: bytes) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (400, "json_too_deep")


def test_request_error_body_is_openai_shaped() -> None:
    err = RequestError(404, "no such model", "model_not_found", param="model")
    assert json.loads(err.body()) == {
        "error": {"message": "no such model", "type": "invalid_request_error",
                  "param": "model", "code": "model_not_found"}}
    assert str(err) == "no such model"


# -- read_request ------------------------------------------------------------------

CHAT = "chat"


def chat_doc(**extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra}


def request_refused(operation: str, doc: dict) -> RequestError:
    with pytest.raises(RequestError) as info:
        read_request(operation, doc)
    return info.value


def test_operations_table() -> None:
    assert OPERATIONS == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completions",
        "/v1/embeddings": "embeddings",
        "/v1/responses": "responses",
    }


def test_read_request_chat_string_content() -> None:
    req = read_request(CHAT, chat_doc())
    assert req == LlmRequest(operation="chat", model="gpt-4o", stream=False,
                             client_wants_usage=False, message_count=1, tool_names=())


def test_read_request_chat_multipart_and_null_content() -> None:
    doc = chat_doc(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    req = read_request(CHAT, doc)
    assert req.message_count == 4


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hello", "messages"),
        ({"role": "user"}, "messages"),
        (None, "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user", "content": "ok"}, {"role": 7, "content": "x"}], "messages[1]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
    ],
)
def test_read_request_bad_messages(messages, param: str) -> None:
    err = request_refused(CHAT, chat_doc(messages=messages))
    assert (err.status, err.code, err.param) == (400, "invalid_type", param)


def test_read_request_tool_names_chat_and_responses_style() -> None:
    doc = chat_doc(tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "name": "lookup_order", "parameters": {}},  # Responses API
        {"type": "web_search_preview"},  # built-in tool: no name
        {"type": "function", "function": {"name": 5}},
        {"type": "function", "function": "nope", "name": "fallback"},
    ])
    assert read_request(CHAT, doc).tool_names == ("get_weather", "lookup_order", "fallback")


def test_read_request_no_tools() -> None:
    assert read_request(CHAT, chat_doc(tools=None)).tool_names == ()


@pytest.mark.parametrize("tools", ["x", {"name": "f"}, 3, ["junk"], [None]])
def test_read_request_tools_not_a_list_of_objects(tools) -> None:
    # Policies would never see such tools, and a provider might read them.
    with pytest.raises(RequestError) as err:
        read_request(CHAT, chat_doc(tools=tools))
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_type", "tools")


@pytest.mark.parametrize("value, expected", [(True, True), (False, False)])
def test_read_request_stream_bool(value: bool, expected: bool) -> None:
    assert read_request(CHAT, chat_doc(stream=value)).stream is expected


def test_read_request_stream_default_false() -> None:
    assert read_request(CHAT, chat_doc()).stream is False


@pytest.mark.parametrize("value", ["true", 1, 0, [], {}, "false"])
def test_read_request_stream_wrong_type(value) -> None:
    err = request_refused(CHAT, chat_doc(stream=value))
    assert (err.status, err.code, err.param) == (400, "invalid_type", "stream")


def test_read_request_stream_null_means_false() -> None:
    assert read_request(CHAT, chat_doc(stream=None)).stream is False


@pytest.mark.parametrize(
    "operation, doc, param",
    [
        ("chat", {"model": "m"}, "messages"),
        ("completions", {"model": "m"}, "prompt"),
        ("embeddings", {"model": "m"}, "input"),
        ("responses", {"model": "m"}, "input"),
        ("completions", {"model": "m", "messages": []}, "prompt"),
        ("embeddings", {"model": "m", "prompt": "x"}, "input"),
    ],
)
def test_read_request_missing_required(operation: str, doc: dict, param: str) -> None:
    err = request_refused(operation, doc)
    assert (err.status, err.code, err.param) == (400, "missing_required_parameter", param)
    assert param in err.message


@pytest.mark.parametrize(
    "operation, doc",
    [
        ("completions", {"model": "m", "prompt": "once upon"}),
        ("completions", {"model": "m", "prompt": ["a", "b"]}),
        ("embeddings", {"model": "m", "input": "text"}),
        ("embeddings", {"model": "m", "input": [[1, 2, 3]]}),
        ("responses", {"model": "m", "input": "hi"}),
        ("responses", {"model": "m", "input": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_read_request_other_operations(operation: str, doc: dict) -> None:
    req = read_request(operation, doc)
    assert req.operation == operation
    assert req.model == "m"
    assert req.message_count == 0


def test_read_request_responses_tools() -> None:
    doc = {"model": "m", "input": "hi", "stream": True,
           "tools": [{"type": "function", "name": "f1"}, {"type": "file_search"}]}
    req = read_request("responses", doc)
    assert req.tool_names == ("f1",)
    assert req.stream is True


def test_read_request_model_absent_is_none() -> None:
    doc = chat_doc()
    del doc["model"]
    assert read_request(CHAT, doc).model is None
    assert read_request(CHAT, chat_doc(model=None)).model is None


@pytest.mark.parametrize("model", [1, 1.5, True, ["gpt-4o"], {"id": "gpt-4o"}])
def test_read_request_model_wrong_type(model) -> None:
    err = request_refused(CHAT, chat_doc(model=model))
    assert (err.status, err.code, err.param) == (400, "invalid_type", "model")


@pytest.mark.parametrize(
    "model",
    ["", "gpt\r\n4o", "gpt-4o\n", "\rgpt", "gpt 4o", " gpt-4o", "gpt\t4o", "gpt\x00",
     "gpt\x7f", "x" * (MAX_MODEL_LENGTH + 1), "gpt-4ö", "模型", "gpt\u200b4o"],
    ids=lambda m: repr(m)[:20],
)
def test_read_request_invalid_model_string(model: str) -> None:
    err = request_refused(CHAT, chat_doc(model=model))
    assert (err.status, err.code, err.param) == (400, "invalid_model", "model")


@pytest.mark.parametrize(
    "model", ["x" * MAX_MODEL_LENGTH, "a", "org/model:tag@v1", "gpt-4o-2024-08-06", "~!#$%^"])
def test_read_request_valid_model_strings(model: str) -> None:
    assert read_request(CHAT, chat_doc(model=model)).model == model


def test_max_model_length_is_256() -> None:
    assert MAX_MODEL_LENGTH == 256


@pytest.mark.parametrize(
    "options, wants",
    [
        (None, False),
        ({}, False),
        ({"include_usage": True}, True),
        ({"include_usage": False}, False),
        ({"include_usage": None}, False),
        ({"other": 1}, False),
    ],
)
def test_read_request_client_wants_usage(options, wants: bool) -> None:
    doc = chat_doc(stream=True)
    if options is not None:
        doc["stream_options"] = options
    assert read_request(CHAT, doc).client_wants_usage is wants


@pytest.mark.parametrize("value", ["true", 1, 0, [True]])
def test_include_usage_that_is_no_boolean_is_refused(value) -> None:
    # Read as "not asked", it was set to true and the client's usage chunk dropped.
    err = request_refused(CHAT, chat_doc(stream=True, stream_options={"include_usage": value}))
    assert (err.status, err.code, err.param) == \
        (400, "invalid_type", "stream_options.include_usage")


@pytest.mark.parametrize("options", ["include_usage", [True], 1, True])
def test_read_request_stream_options_not_object(options) -> None:
    err = request_refused(CHAT, chat_doc(stream=True, stream_options=options))
    assert (err.status, err.code, err.param) == (400, "invalid_type", "stream_options")


def test_read_request_model_checked_before_missing_messages() -> None:
    err = request_refused(CHAT, {"model": "bad model"})
    assert err.code == "invalid_model"


# -- needs_usage_injection ---------------------------------------------------------


def _req(operation: str, stream: bool, wants: bool) -> LlmRequest:
    return LlmRequest(operation, "m", stream, wants, 0, ())


@pytest.mark.parametrize(
    "operation, stream, wants, expected",
    [
        ("chat", True, False, True),
        ("completions", True, False, True),
        ("chat", True, True, False),
        ("completions", True, True, False),
        ("chat", False, False, False),
        ("completions", False, False, False),
        ("responses", True, False, False),
        ("embeddings", True, False, False),
        ("embeddings", False, False, False),
    ],
)
def test_needs_usage_injection(operation: str, stream: bool, wants: bool,
                               expected: bool) -> None:
    assert needs_usage_injection(_req(operation, stream, wants)) is expected


def test_needs_usage_injection_from_real_request() -> None:
    req = read_request(CHAT, chat_doc(stream=True, stream_options={"include_usage": False}))
    assert needs_usage_injection(req) is True


# -- rewrite -----------------------------------------------------------------------


def test_rewrite_model_preserves_every_other_byte() -> None:
    raw = ('{ "model" :  "gpt-4o"  ,\n  "messages": [ {"role": "user", '
           '"content": "héllo \\u00e9 \\"q\\" 世界"} ],\t"temperature": 0.70,'
           ' "x": 1.0e2 }\n').encode()
    out = rewrite(parse_body(raw, DEPTH), {"model": "demo-large-2026"})
    assert out == raw.replace(b'"gpt-4o"', b'"demo-large-2026"')


def test_rewrite_model_that_is_not_first_or_last() -> None:
    raw = b'{"a":[1,{"model":"keep"}],"model":"old","z":"model"}'
    out = rewrite(parse_body(raw, DEPTH), {"model": "new"})
    assert out == b'{"a":[1,{"model":"keep"}],"model":"new","z":"model"}'


def test_rewrite_same_length_and_shorter_and_longer() -> None:
    raw = b'{"model":"abc","n":1}'
    parsed = parse_body(raw, DEPTH)
    assert rewrite(parsed, {"model": "xyz"}) == b'{"model":"xyz","n":1}'
    assert rewrite(parsed, {"model": "x"}) == b'{"model":"x","n":1}'
    assert rewrite(parsed, {"model": "x" * 50}) == b'{"model":"' + b"x" * 50 + b'","n":1}'


def test_rewrite_nothing_returns_same_bytes() -> None:
    raw = b' {"a" : 1} '
    assert rewrite(parse_body(raw, DEPTH), {}) == raw


def test_rewrite_inserts_stream_options_when_absent() -> None:
    raw = (b'{\n  "model": "m",\n  "messages": [{"role":"user","content":"hi"}],\n'
           b'  "stream": true\n}')
    out = rewrite(parse_body(raw, DEPTH), {"stream_options": {"include_usage": True}})
    doc = _strict_loads(out)
    assert doc == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "stream": True, "stream_options": {"include_usage": True}}
    # The client's text is kept verbatim around the inserted member.
    inserted = b'"stream_options":{"include_usage":true}'
    assert out.count(inserted) == 1
    assert out.replace(inserted + b",", b"", 1) == raw


def test_rewrite_replaces_existing_stream_options_keeping_others() -> None:
    raw = (b'{"model":"m","stream":true,"stream_options": {"include_usage": false,'
           b' "continuous_usage_stats": true},"messages":[{"role":"user","content":"x"}]}')
    parsed = parse_body(raw, DEPTH)
    merged = {**parsed.doc["stream_options"], "include_usage": True}
    out = rewrite(parsed, {"model": "up", "stream_options": merged})
    doc = _strict_loads(out)
    assert doc["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert doc["model"] == "up"
    assert list(doc) == ["model", "stream", "stream_options", "messages"]
    assert out.endswith(b',"messages":[{"role":"user","content":"x"}]}')


def test_rewrite_replace_and_insert_together() -> None:
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"stream":true}'
    out = rewrite(parse_body(raw, DEPTH),
                  {"model": "demo-small-2026", "stream_options": {"include_usage": True}})
    assert _strict_loads(out) == {
        "model": "demo-small-2026", "messages": [{"role": "user", "content": "x"}],
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("raw", [b"{}", b"{ }", b"\n{\n}\n", b"  {\t}  "])
def test_rewrite_minimal_bodies(raw: bytes) -> None:
    parsed = parse_body(raw, DEPTH)
    one = rewrite(parsed, {"model": "m"})
    assert _strict_loads(one) == {"model": "m"}
    two = rewrite(parsed, {"model": "m", "stream_options": {"include_usage": True}})
    assert _strict_loads(two) == {"model": "m", "stream_options": {"include_usage": True}}


def test_rewrite_insert_into_single_member_body() -> None:
    out = rewrite(parse_body(b'{"a":1}', DEPTH), {"model": "m"})
    assert _strict_loads(out) == {"model": "m", "a": 1}


def test_rewrite_non_ascii_value_is_utf8() -> None:
    parsed = parse_body(b'{"model":"a","tag":"\xc3\xa9"}', DEPTH)
    out = rewrite(parsed, {"model": "mod\u00e8le"})
    # New values are UTF-8 as the client's own bytes (escapes would grow the body).
    assert out == b'{"model":"mod\xc3\xa8le","tag":"\xc3\xa9"}'
    assert json.loads(out) == {"model": "mod\u00e8le", "tag": "\u00e9"}


def test_rewrite_large_body_keeps_content_identical() -> None:
    content = ("lorem ipsum dolor sit amet é 世界 \"quoted\" \\ back\n" * 50_000)
    content = content[: 2 * 1024 * 1024]
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}],
                       "stream": True}, ensure_ascii=False).encode()
    assert len(body) > 2 * 1024 * 1024
    parsed = parse_body(body, DEPTH)
    out = rewrite(parsed, {"model": "demo-large-2026",
                           "stream_options": {"include_usage": True}})
    doc = _strict_loads(out)
    assert doc["messages"][0]["content"] == content
    assert doc["model"] == "demo-large-2026"
    assert doc["stream_options"] == {"include_usage": True}
    start, end = parsed.spans["messages"]
    assert body.decode()[start:end] in out.decode()


@pytest.mark.parametrize("where", [b'"stream_options":{"tag":"\\ud800"}',
                                   b'"metadata":{"k\\udfff":"v"}',
                                   b'"tags":["\\udc00"]'])
def test_a_lone_surrogate_escape_anywhere_is_invalid_json(where: bytes) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"x"}],' + where + b'}'
    with pytest.raises(RequestError) as info:
        parse_body(raw, DEPTH)
    assert info.value.status == 400 and "lone surrogate" in info.value.message


def test_rewrite_overflowing_number_never_becomes_infinity() -> None:
    raw = (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,'
           b'"stream_options":{"budget":1e400}}')
    try:
        parsed = parse_body(raw, DEPTH)
    except RequestError as err:  # refusing the body is an acceptable fix too
        assert err.status == 400
        return
    merged = {**parsed.doc["stream_options"], "include_usage": True}
    out = rewrite(parsed, {"stream_options": merged})
    _strict_loads(out)


# -- read_response -----------------------------------------------------------------


def test_usage_chat_completion() -> None:
    body = json.dumps({
        "id": "c1", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()
    assert read_response(body)[0] == Usage(12, 7)
    assert read_response(body)[0].estimated is False


@pytest.mark.parametrize("usage", [
    {"input_tokens": 1000, "output_tokens": 500, "completion_tokens": None},
    {"input_tokens": 1000, "output_tokens": 500, "prompt_tokens": None,
     "completion_tokens": None},
])
def test_a_null_count_leaves_the_other_apis_name_read(usage) -> None:
    # The null hid the real count: output 0, or the whole usage estimated.
    assert read_response(json.dumps({"usage": usage}).encode())[0] == Usage(1000, 500)


@pytest.mark.parametrize(("usage", "output"), [
    # xAI's reasoning is in total_tokens only, and billed as output: recorded 9 output
    # tokens for a bill of 103.
    ({"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 135,
      "completion_tokens_details": {"reasoning_tokens": 94}}, 103),
    # A total past the sum for another reason (Gemini's search results, billed as
    # input) is no output.
    ({"prompt_tokens": 1041, "completion_tokens": 902, "total_tokens": 381679}, 902),
    # OpenAI's completion_tokens hold the reasoning: the total is their sum.
    ({"prompt_tokens": 32, "completion_tokens": 103, "total_tokens": 135,
      "completion_tokens_details": {"reasoning_tokens": 94}}, 103),
    # A total short of the sum, or unreadable, says nothing more.
    ({"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 10}, 9),
    ({"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": "135"}, 9),
])
def test_reasoning_left_out_of_completion_tokens_is_output(usage, output):
    assert read_response(json.dumps({"usage": usage}).encode())[0] == Usage(
        usage["prompt_tokens"], output)


def test_usage_embeddings_has_no_completion_tokens() -> None:
    body = json.dumps({"object": "list", "data": [{"embedding": [0.1]}],
                       "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
    assert read_response(body)[0] == Usage(8, 0)


def test_usage_responses_api() -> None:
    body = json.dumps({"object": "response", "status": "completed",
                       "usage": {"input_tokens": 30, "output_tokens": 11,
                                 "total_tokens": 41}}).encode()
    assert read_response(body)[0] == Usage(30, 11)


def test_a_json_answer_after_a_byte_order_mark_is_read() -> None:
    # The SDKs read such an answer; taken for no answer, it was billed as an estimate
    # and counted failed.
    body = b'\xef\xbb\xbf{"choices":[{"finish_reason":"stop"}],' \
        b'"usage":{"prompt_tokens":100,"completion_tokens":50}}'
    assert read_response(body)[:2] == (Usage(100, 50), "stop")


def test_usage_zero_is_valid() -> None:
    assert read_response(b'{"usage":{"prompt_tokens":0,"completion_tokens":0}}')[0] == Usage(0, 0)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1,2]",
        b'"usage"',
        b"null",
        b"{}",
        b'{"usage":null}',
        b'{"usage":[1,2]}',
        b'{"usage":{}}',
        b'{"usage":{"completion_tokens":3}}',
        b'{"usage":{"prompt_tokens":"12","completion_tokens":3}}',
        b'{"usage":{"prompt_tokens":12.5,"completion_tokens":3}}',
        b'{"usage":{"prompt_tokens":-1,"completion_tokens":3}}',
        b'{"usage":{"prompt_tokens":1,"completion_tokens":-3}}',
        b'{"usage":{"input_tokens":1,"output_tokens":"2"}}',
        b"[" * 100_000,
    ],
    ids=lambda b: repr(b)[:40],
)
def test_usage_garbage_is_none(body: bytes) -> None:
    assert read_response(body)[0] is None


@pytest.mark.parametrize("body", [b'{"usage":{"prompt_tokens":11,"completion_tokens":null}}',
                                  b'{"usage":{"prompt_tokens":11}}'])
def test_a_missing_or_null_completion_count_is_zero_alike(body: bytes) -> None:
    # Embeddings report no output; a null must not throw away the prompt count.
    assert read_response(body)[0] == Usage(11, 0)


def test_usage_booleans_are_not_counts() -> None:
    assert read_response(b'{"usage":{"prompt_tokens":true,"completion_tokens":false}}')[0] is None


@pytest.mark.parametrize("n, tokens", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (400, 100),
                                       (401, 101)])
def test_estimate_tokens(n: int, tokens: int) -> None:
    assert estimate_tokens(n) == tokens


# -- SseStream ---------------------------------------------------------------------


def _chunk(choices, usage=None, with_null_usage=True) -> dict:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": "demo-small-2026", "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    elif with_null_usage:
        obj["usage"] = None
    return obj


def _event(obj, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + sep


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def chat_stream(sep: bytes = b"\n\n") -> tuple[bytes, bytes]:
    """A realistic include_usage chat stream, and the usage-only event inside it."""
    content = [
        _event(_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None}]), sep),
        _event(_chunk([{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]),
               sep),
        _event(_chunk([{"index": 0, "delta": {"content": " wörld"},
                        "finish_reason": None}]), sep),
        _event(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]), sep),
    ]
    usage_event = _event(_chunk([], usage=USAGE), sep)
    done = b"data: [DONE]" + sep
    return b"".join(content) + usage_event + done, usage_event


def feed_all(stream: SseStream, chunks: list[bytes]) -> bytes:
    out = []
    for i, chunk in enumerate(chunks):
        replacement = stream.feed(chunk, end=i == len(chunks) - 1)
        out.append(chunk if replacement is None else replacement)
    return b"".join(out)


def test_sse_usage_found_in_final_chunk_without_dropping() -> None:
    body, _ = chat_stream()
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(body, end=True) is None
    assert sse.usage == Usage(12, 3)
    # As UTF-8, as the prompt is counted: "ö" is 2 bytes.
    assert sse.output_chars == len("Hello") + len(" wörld".encode())
    assert sse.events == 6


def test_sse_usage_chunk_dropped_when_asked() -> None:
    body, usage_event = chat_stream()
    sse = SseStream(drop_usage_chunk=True)
    out = sse.feed(body, end=True)
    assert out == body.replace(usage_event, b"")
    assert b'"usage": {' not in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert sse.usage == Usage(12, 3)


def test_sse_drop_mode_passes_unchanged_when_nothing_to_drop() -> None:
    body, usage_event = chat_stream()
    without = body.replace(usage_event, b"")
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(without, end=True) is None
    assert sse.usage is None


def test_sse_usage_with_choices_is_not_dropped() -> None:
    # Some providers put usage on the last content chunk: nothing to drop there.
    event = _event(_chunk([{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
                          usage=USAGE))
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(event + b"data: [DONE]\n\n", end=True) is None
    assert sse.usage == Usage(12, 3)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("drop", [True, False])
def test_sse_every_single_split_point(sep: bytes, drop: bool) -> None:
    body, usage_event = chat_stream(sep)
    expected = body.replace(usage_event, b"") if drop else body
    for cut in range(len(body) + 1):
        sse = SseStream(drop_usage_chunk=drop)
        out = feed_all(sse, [body[:cut], body[cut:]])
        assert out == expected, f"split at {cut}"
        assert sse.usage == Usage(12, 3), f"split at {cut}"
        assert sse.output_chars == 12, f"split at {cut}"


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_sse_split_around_the_usage_event(sep: bytes) -> None:
    # Every pair of cut points in and around the usage event and its neighbours.
    body, usage_event = chat_stream(sep)
    start = body.index(usage_event)
    lo, hi = start - 12, start + len(usage_event) + 8
    expected = body.replace(usage_event, b"")
    for a in range(lo, hi):
        for b in range(a, hi):
            sse = SseStream(drop_usage_chunk=True)
            out = feed_all(sse, [body[:a], body[a:b], body[b:]])
            assert out == expected, f"cuts at {a}, {b}"
            assert sse.usage == Usage(12, 3)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_sse_byte_by_byte(sep: bytes) -> None:
    body, usage_event = chat_stream(sep)
    sse = SseStream(drop_usage_chunk=True)
    out = feed_all(sse, [body[i:i + 1] for i in range(len(body))])
    assert out == body.replace(usage_event, b"")
    assert sse.usage == Usage(12, 3)
    assert sse.output_chars == 12  # "ö" is 2 bytes


def test_sse_random_multi_splits() -> None:
    rng = random.Random(1234)
    for sep in (b"\n\n", b"\r\n\r\n"):
        body, usage_event = chat_stream(sep)
        expected = body.replace(usage_event, b"")
        for _ in range(300):
            cuts = sorted(rng.sample(range(len(body) + 1), rng.randint(1, 12)))
            bounds = [0, *cuts, len(body)]
            chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
            sse = SseStream(drop_usage_chunk=True)
            assert feed_all(sse, chunks) == expected, cuts
            assert sse.usage == Usage(12, 3)


def test_sse_empty_final_chunk_flushes_held_back_tail() -> None:
    body, usage_event = chat_stream()
    sse = SseStream(drop_usage_chunk=True)
    partial = body[:-3]
    first = sse.feed(partial, end=False)
    assert first is not None and len(first) < len(partial)  # tail held back
    last = sse.feed(b"", end=True)
    assert last is not None and last != b""
    assert first + last == partial.replace(usage_event, b"")
    assert sse.usage == Usage(12, 3)


def test_sse_crlf_separators() -> None:
    body, usage_event = chat_stream(b"\r\n\r\n")
    assert b"\n\n" not in body
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(body, end=True) == body.replace(usage_event, b"")
    assert sse.usage == Usage(12, 3)


def test_sse_done_marker_is_ignored_and_kept() -> None:
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(b"data: [DONE]\n\n", end=True) is None
    assert sse.usage is None
    assert sse.output_chars == 0
    assert sse.events == 1


def test_sse_comments_and_other_fields_pass_through() -> None:
    body = (b": keep-alive\n\nevent: ping\ndata: {}\n\nid: 7\nretry: 100\n\n"
            + _event(_chunk([], usage=USAGE)) + b"data: [DONE]\n\n")
    sse = SseStream(drop_usage_chunk=True)
    out = sse.feed(body, end=True)
    assert out == b": keep-alive\n\nevent: ping\ndata: {}\n\nid: 7\nretry: 100\n\ndata: [DONE]\n\n"
    assert sse.usage == Usage(12, 3)


def test_sse_data_without_space_after_colon() -> None:
    body = b'data:{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(body, end=True) == b""
    assert sse.usage == Usage(2, 1)


def test_sse_invalid_json_data_is_ignored() -> None:
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(b"data: {not json\n\ndata: {\"choices\":[]}\n\n", end=True) is None
    assert sse.usage is None


RESPONSES_STREAM = (
    b"event: response.created\n"
    b'data: {"type":"response.created","response":{"id":"r1","status":"in_progress",'
    b'"usage":null}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","item_id":"m1","delta":"Hi"}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","item_id":"m1","delta":" th\xc3\xa9re"}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","response":{"id":"r1","status":"completed",'
    b'"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}}\n\n'
)


@pytest.mark.parametrize("drop", [True, False])
def test_sse_responses_api_completed_usage(drop: bool) -> None:
    sse = SseStream(drop_usage_chunk=drop)
    assert sse.feed(RESPONSES_STREAM, end=True) is None  # response.completed is never dropped
    assert sse.usage == Usage(7, 3)
    assert sse.output_chars == len("Hi") + len(" thére".encode())


def test_sse_responses_api_every_split() -> None:
    for cut in range(len(RESPONSES_STREAM) + 1):
        sse = SseStream(drop_usage_chunk=True)
        out = feed_all(sse, [RESPONSES_STREAM[:cut], RESPONSES_STREAM[cut:]])
        assert out == RESPONSES_STREAM
        assert sse.usage == Usage(7, 3)


@pytest.mark.parametrize("payload", [b"null", b'"x"', b"[]"])
def test_sse_malformed_response_completed_does_not_crash(payload: bytes) -> None:
    sse = SseStream(drop_usage_chunk=False)
    event = b'data: {"type":"response.completed","response":' + payload + b"}\n\n"
    assert sse.feed(event, end=True) is None
    assert sse.usage is None


def test_sse_output_chars_text_completions() -> None:
    body = (b'data: {"choices":[{"index":0,"text":"abc"}]}\n\n'
            b'data: {"choices":[{"index":0,"text":"de"},{"index":1,"text":"f"}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":{"content":"xyz"}}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":{"content":null}},"junk"]}\n\n'
            b"data: [DONE]\n\n")
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(body, end=True)
    assert sse.output_chars == 3 + 2 + 1 + 3
    assert sse.usage is None
    assert sse.events == 5


def test_sse_output_chars_count_tool_call_arguments_and_refusals() -> None:
    # Without usage from the provider, a tool-calling answer is estimated from them.
    call = {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(_event(_chunk([{"index": 0, "delta": {"tool_calls": [call]}}]))
             + _event(_chunk([{"index": 0, "delta": {"refusal": "no"}}])), end=True)
    assert sse.output_chars == len('{"city": "Paris"}') + 2


def test_sse_output_counts_the_texts_utf8_not_its_json() -> None:
    # As the prompt is counted: by characters, Chinese output read a quarter of its
    # input's size. Not the JSON's escapes either.
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "\\u4e16\\u754c'
             b'\\ud83c\\udf89"}}]}\n\n', end=True)
    assert sse.output_chars == 3 + 3 + 4


def test_sse_last_event_without_trailing_separator() -> None:
    body = _event(_chunk([{"index": 0, "delta": {"content": "ab"}}])) + _event(
        _chunk([], usage=USAGE), b"")
    sse = SseStream(drop_usage_chunk=True)
    out = sse.feed(body, end=True)
    assert out == _event(_chunk([{"index": 0, "delta": {"content": "ab"}}]))
    assert sse.usage == Usage(12, 3)
    assert sse.output_chars == 2


def test_sse_extra_blank_lines_are_preserved() -> None:
    body = b"\n\ndata: [DONE]\n\n\n\n"
    sse = SseStream(drop_usage_chunk=True)
    out = sse.feed(body, end=True)
    assert out is None or out == body


def test_sse_not_dropping_always_returns_none() -> None:
    body, _ = chat_stream()
    sse = SseStream(drop_usage_chunk=False)
    for i in range(0, len(body), 17):
        assert sse.feed(body[i:i + 17], end=i + 17 >= len(body)) is None
    assert sse.usage == Usage(12, 3)


def test_counts_are_capped_before_any_per_item_work() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 11}
    with pytest.raises(RequestError) as info:
        read_request("chat", doc, Limits(max_messages=10, max_tools=2))
    assert (info.value.status, info.value.code, info.value.param) == (400, "too_many_items",
                                                                      "messages")
    tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(3)]
    with pytest.raises(RequestError):
        read_request("chat", {**doc, "messages": doc["messages"][:1], "tools": tools},
                     Limits(max_messages=10, max_tools=2))
    # A token array is one input, however long.
    assert read_request("embeddings", {"input": list(range(50))}, Limits(10, 2))


def test_read_response_gives_the_first_choices_finish_reason() -> None:
    body = json.dumps({"choices": [{"finish_reason": "length"}, {"finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert read_response(body)[:4] == (Usage(3, 4), "length", 0, False)
    assert read_response(b"not json")[:4] == (None, None, None, False)
    assert read_response(b"[1, 2]")[:4] == (None, None, None, False)


@pytest.mark.parametrize("status, details, reason", [
    ("completed", None, "stop"),
    ("incomplete", {"reason": "max_output_tokens"}, "length"),
    ("incomplete", {"reason": "content_filter"}, "content_filter"),
    ("incomplete", {"reason": "something_new"}, None),
    ("failed", None, None),
])
def test_a_responses_answers_status_is_its_finish_reason(status, details, reason) -> None:
    # Responses answers carry no finish_reason: the quality proxy never scored them, so
    # min_quality on a /v1/responses route learned only from explicit feedback.
    answer = {"object": "response", "status": status, "incomplete_details": details,
              "output": [], "usage": {"input_tokens": 3, "output_tokens": 4}}
    assert read_response(json.dumps(answer).encode())[1] == reason
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(f"data: {json.dumps({'type': f'response.{status}', 'response': answer})}\n\n"
             .encode(), end=True)
    assert sse.finish_reason == reason


@pytest.mark.parametrize("answer, chars", [
    ({"choices": [{"message": {"role": "assistant", "content": "x" * 400}}]}, 400),
    ({"choices": [{"message": {"content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "y" * 40}}]}}]}, 40),
    ({"choices": [{"text": "z" * 30}]}, 30),
    ({"output": [{"type": "message", "content": [{"type": "output_text", "text": "w" * 50}]},
                 {"type": "function_call", "name": "f", "arguments": "v" * 5}]}, 55),
    ({"data": [{"embedding": [0.1] * 8}]}, 0),
])
def test_an_answer_without_usage_gives_its_output_text_size(answer, chars) -> None:
    # The figure the output estimate is made from (it was 0 whatever the answer).
    assert read_response(json.dumps(answer).encode())[:4] == (None, None, chars, False)


def test_schemas_under_any_vendor_key_may_name_their_definitions_freely() -> None:
    schema = {"type": "object", "$defs": {"Action": {"type": "string"}},
              "definitions": {"Input": {}}, "properties": {"Content": {}}}
    doc = {"model": "x", "messages": [{"role": "user", "content": "hi"}],
           "guided_json": schema, "structured_outputs": {"json": schema},
           "response_format": {"type": "json_schema",
                               "json_schema": {"name": "s", "schema": schema}}}
    assert read_request("chat", doc).model == "x"


def test_vllms_argument_maps_may_use_any_key() -> None:
    # vLLM's own maps of extra arguments (a plugin's `N`, a processor's `Size`) are read
    # by exact key: not a field a Go server could fill from another case.
    doc = {"model": "x", "messages": [{"role": "user", "content": "hi"}],
           "vllm_xargs": {"N": 2}, "mm_processor_kwargs": {"Size": 4},
           "kv_transfer_params": {"Id": "a"}, "chat_template_kwargs": {"Tools": []}}
    assert read_request("chat", doc).model == "x"


def test_fields_redaction_scans_by_config_must_be_spelt_exactly() -> None:
    doc = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "Stop": ["x"]}
    assert read_request("chat", doc).model == "x"          # not scanned: no concern
    with pytest.raises(RequestError) as info:
        read_request("chat", doc, scanned=frozenset({"stop"}))
    assert (info.value.code, info.value.param) == ("unknown_parameter", "Stop")


@pytest.mark.parametrize(("key", "value"), [
    ("user", {"email": "a@b.c"}), ("safety_identifier", ["a@b.c"]),
    ("prompt_cache_key", 5), ("instructions", [{"role": "developer", "content": "x"}]),
    ("metadata", "a@b.c"), ("metadata", {"k": {"x": "a@b.c"}}), ("metadata", {"k": 1})])
def test_fields_redaction_reads_as_strings_must_be_strings(key, value) -> None:
    doc = {"model": "x", "messages": [{"role": "user", "content": "hi"}], key: value}
    with pytest.raises(RequestError) as info:
        read_request("chat", doc)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_type", key)
