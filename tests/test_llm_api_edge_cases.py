"""Edge cases of OpenAI bodies and streams: request shapes, counts, usage bounds, key
removal in rewrite, and SSE framing (multi-line data, CR line ends, bounds, bad events)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from atp_extproc import llm_api
from atp_extproc.llm_api import (
    MAX_USAGE_TOKENS,
    Limits,
    RequestError,
    SseStream,
    Usage,
    parse_body,
    read_request,
    read_response,
    rewrite,
)
from tests.test_llm_api import feed_all

DEPTH = 64


DEFAULT_LIMITS = Limits()


def refused(operation: str, doc: dict, limits: Limits = DEFAULT_LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        read_request(operation, doc, limits)
    return info.value


# -- read_request: prompt / input shapes ---------------------------------------------

BAD_PROMPTS = [
    {"text": "card 4111 1111 1111 1111, me@example.com"},
    5,
    True,
    [["me@example.com"]],
    [{"text": "me@example.com"}],
    ["a", 1],
    [1, "me@example.com"],
    [1, [2]],
    ["a", ["b"]],
    [[1, 2], [3, "me@example.com"]],
    [[1], 2],
    [True, False],
    [1.5],
    [[1.0]],
    [None],
]


@pytest.mark.parametrize("operation, param", [("completions", "prompt"),
                                              ("embeddings", "input")])
@pytest.mark.parametrize("value", BAD_PROMPTS, ids=lambda v: repr(v)[:30])
def test_wrong_typed_prompt_or_input_is_refused(operation: str, param: str, value) -> None:
    err = refused(operation, {"model": "m", param: value})
    assert (err.status, err.code, err.param) == (400, "invalid_type", param)
    assert param in err.message


@pytest.mark.parametrize("operation, param", [("completions", "prompt"),
                                              ("embeddings", "input")])
@pytest.mark.parametrize("value", ["", "hi", [], ["a", "b"], [1, 2, 3], [[1, 2], [3]], [[]]],
                         ids=repr)
def test_provider_shapes_of_prompt_and_input_pass(operation: str, param: str, value) -> None:
    assert read_request(operation, {"model": "m", param: value}).operation == operation


def test_a_null_prompt_passes_and_a_null_input_does_not() -> None:
    # OpenAI reads a null completions prompt as the start of a document.
    assert read_request("completions", {"model": "m", "prompt": None}).operation == \
        "completions"
    err = refused("embeddings", {"model": "m", "input": None})
    assert (err.status, err.code, err.param) == (400, "invalid_type", "input")


@pytest.mark.parametrize(
    "value",
    [{"text": "me@example.com"}, {"role": "user", "content": "hi"}, 5, None, ["hi"],
     [["me@example.com"]], [{"role": "user", "content": "hi"}, "me@example.com"], [1, 2]],
    ids=lambda v: repr(v)[:30])
def test_wrong_typed_responses_input_is_refused(value) -> None:
    err = refused("responses", {"model": "m", "input": value})
    assert (err.status, err.code, err.param) == (400, "invalid_type", "input")


@pytest.mark.parametrize(
    "value",
    ["hi", [], [{"role": "user", "content": "hi"},
                {"type": "function_call_output", "call_id": "c1", "output": "{}"},
                {"type": "item_reference", "id": "msg_1"}]],
    ids=["text", "empty", "items"])
def test_responses_input_shapes_pass(value) -> None:
    assert read_request("responses", {"model": "m", "input": value}).operation == "responses"


# -- read_request: count limit on int-led lists --------------------------------------

LIMITS = Limits(max_messages=10, max_tools=2)


def _functions(n: int) -> list[dict]:
    return [{"type": "function", "name": f"f{i}", "parameters": {}} for i in range(n)]


@pytest.mark.parametrize(("doc", "param"), [
    ({"tools": [{"type": "namespace", "name": "ns", "tools": _functions(3)}]},
     "tools[0].tools"),
    ({"tools": _functions(1), "input": [{"type": "additional_tools", "tools": _functions(2)}]},
     "input[0].tools"),
    ({"tools": _functions(3)}, "tools"),
])
def test_the_tool_limit_counts_every_tool_the_request_declares(doc: dict, param: str) -> None:
    # Counted per top-level list, hundreds of tools in a namespace tool or an input item
    # were read and forwarded.
    err = refused("responses", {"model": "m", **doc}, LIMITS)
    assert (err.status, err.code, err.param) == (400, "too_many_items", param)
    ok = read_request("responses", {"model": "m", "tools": _functions(1), "input": [
        {"type": "additional_tools", "tools": _functions(1)}]}, LIMITS)
    assert ok.operation == "responses"


@pytest.mark.parametrize("operation, param", [("embeddings", "input"),
                                              ("completions", "prompt")])
@pytest.mark.parametrize(
    "value",
    [[0] + ["me@example.com"] * 10, [0] * 10 + [[1]], [0] * 10 + [True], ["a"] * 11,
     [[1]] * 11],
    ids=["int-then-strings", "ints-then-list", "ints-then-bool", "strings", "token-arrays"])
def test_count_limit_applies_unless_every_item_is_an_int(operation: str, param: str,
                                                          value: list) -> None:
    err = refused(operation, {"model": "m", param: value}, LIMITS)
    assert (err.status, err.code, err.param) == (400, "too_many_items", param)


@pytest.mark.parametrize("operation, param", [("embeddings", "input"),
                                              ("completions", "prompt")])
def test_one_long_token_array_is_one_input(operation: str, param: str) -> None:
    assert read_request(operation, {"model": "m", param: list(range(5000))}, LIMITS)


# -- usage bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [{"prompt_tokens": 10**12, "completion_tokens": 1},
     {"prompt_tokens": 1, "completion_tokens": 10**12},
     {"input_tokens": 2**63, "output_tokens": 1},
     {"prompt_tokens": MAX_USAGE_TOKENS + 1, "completion_tokens": 0},
     {"prompt_tokens": 10**30, "completion_tokens": 1}],
    ids=["prompt", "completion", "int64", "just-over", "float-sized"])
def test_usage_counts_past_the_bound_are_absent(usage: dict) -> None:
    body = json.dumps({"choices": [{"finish_reason": "stop"}], "usage": usage}).encode()
    assert read_response(body)[:4] == (None, "stop", 0, False)
    sse = SseStream(drop_usage_chunk=True)
    event = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    # Not read as usage, but it is the chunk ATP asked for: the client never sees it.
    assert sse.feed(event, end=True) == b""
    assert sse.usage is None


def test_json_orjson_refuses_but_rfc_8259_allows_is_read() -> None:
    # A lone surrogate escape (half an emoji) and a number past a double: orjson
    # refuses both, the openai SDKs read both. A whole answer was counted failed with
    # its usage lost, and the usage chunk ATP asked for reached the client.
    half_emoji = (b'{"choices": [{"message": {"content": "hi \\ud83d"}, '
                  b'"finish_reason": "stop"}], '
                  b'"usage": {"prompt_tokens": 12, "completion_tokens": 40}}')
    assert read_response(half_emoji)[:4] == (Usage(12, 40), "stop", 0, False)
    huge = b'{"choices": [], "usage": {"prompt_tokens": 1e400, "completion_tokens": 3}}'
    assert read_response(huge)[:4] == (None, None, 0, False)
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(b"data: " + huge + b"\n\n", end=False) == b""
    sse.feed(b"data: " + half_emoji + b"\n\n", end=False)
    assert sse.usage == Usage(12, 40)
    responses = SseStream(drop_usage_chunk=False)
    responses.feed(b'data: {"type": "response.completed", "response": {"output_text": '
                   b'"\\ud83d", "usage": {"input_tokens": 5, "output_tokens": 7}}}\n\n',
                   end=False)
    assert responses.ended and responses.usage == Usage(5, 7)


@pytest.mark.parametrize("literal", [b"NaN", b"-Infinity", b"Infinity"])
def test_an_answer_with_a_non_finite_literal_is_read(literal: bytes) -> None:
    # Python's json and the openai SDKs read NaN and Infinity (a logprob of -Infinity);
    # orjson refuses them, and the whole answer counted failed with its usage lost.
    body = (b'{"choices": [{"message": {"content": "Hello"}, "finish_reason": "stop", '
            b'"logprobs": {"content": [{"token": "Hello", "logprob": ' + literal + b'}]}}], '
            b'"usage": {"prompt_tokens": 9, "completion_tokens": 4}}')
    assert read_response(body)[:4] == (Usage(9, 4), "stop", 0, False)
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(b"data: " + body.replace(b'"message"', b'"delta"') + b"\n\n", end=False)
    assert (sse.usage, sse.finish_reason) == (Usage(9, 4), "stop")
    # A cut answer that names them is still no JSON.
    assert read_response(body[:-3])[:4] == (None, None, None, False)


def test_usage_count_at_the_bound_is_kept() -> None:
    body = json.dumps({"usage": {"prompt_tokens": MAX_USAGE_TOKENS,
                                 "completion_tokens": MAX_USAGE_TOKENS}}).encode()
    assert read_response(body)[0] == Usage(MAX_USAGE_TOKENS, MAX_USAGE_TOKENS)
    assert MAX_USAGE_TOKENS * 2**32 < 2**63  # billions of such rows still fit a ledger sum


# -- rewrite: dropping keys ------------------------------------------------------------

TOOLS_BODY = ('{ "model": "gpt-4o",\n "messages": [{"role": "user", "content": "héllo 世界 🎉"}],'
              ' "tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}},'
              ' "parallel_tool_calls": false, "temperature": 0.5 }').encode()
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")


def test_rewrite_drops_keys() -> None:
    parsed = parse_body(TOOLS_BODY, DEPTH)
    out = rewrite(parsed, {"model": "demo-small-2026"}, drop=TOOL_KEYS)
    doc = json.loads(out)
    assert doc == {"model": "demo-small-2026",
                   "messages": [{"role": "user", "content": "héllo 世界 🎉"}],
                   "temperature": 0.5}
    assert list(doc) == ["model", "messages", "temperature"]
    assert "héllo 世界 🎉".encode() in out  # client text stays UTF-8, not escapes


@pytest.mark.parametrize(
    "raw, drop, expected",
    [(b'{"tools":[1]}', ["tools"], {}),
     (b'{"tools":[1],"a":1}', ["tools"], {"a": 1}),
     (b'{"a":1,"tools":[1]}', ["tools"], {"a": 1}),
     (b'{"a":1,"tools":[1],"b":2}', ("tools",), {"a": 1, "b": 2}),
     (b' {\n"tools" : [1] ,\n"tool_choice":"auto"\n} ', {"tools", "tool_choice"}, {})],
    ids=["only", "first", "last", "middle", "all"])
def test_rewrite_drop_anywhere_gives_valid_json(raw: bytes, drop, expected: dict) -> None:
    assert json.loads(rewrite(parse_body(raw, DEPTH), {}, drop=drop)) == expected


def test_rewrite_drop_and_insert_together() -> None:
    raw = b'{"model":"m","messages":[],"stream":true,"tools":[]}'
    out = rewrite(parse_body(raw, DEPTH), {"stream_options": {"include_usage": True}},
                  drop=["tools"])
    assert json.loads(out) == {"model": "m", "messages": [], "stream": True,
                               "stream_options": {"include_usage": True}}


def test_rewrite_drop_of_absent_keys_keeps_the_splice_byte_exact() -> None:
    raw = b'{ "model" : "a" ,\n "messages": [ ], "x": 1.0e2 }'
    parsed = parse_body(raw, DEPTH)
    assert rewrite(parsed, {"model": "b"}, drop=TOOL_KEYS) == rewrite(parsed, {"model": "b"})
    assert rewrite(parsed, {"model": "b"}, drop=TOOL_KEYS) == raw.replace(b'"a"', b'"b"')
    assert rewrite(parsed, {}, drop=TOOL_KEYS) == raw


def test_rewrite_drop_keeps_escaped_backslashes_and_writes_utf8() -> None:
    raw = (b'{"model":"m","messages":[{"role":"user","content":"x\\ud83d\\ude00y \xc3\xa9"}],'
           b'"metadata":{"k":"\\\\ud800"},"tools":[]}')
    parsed = parse_body(raw, DEPTH)
    out = rewrite(parsed, {"model": "n"}, drop=["tools"])
    assert "x\U0001f600y \u00e9".encode() in out  # UTF-8, not escapes
    doc = json.loads(out)
    assert doc["metadata"] == {"k": "\\ud800"}  # an escaped backslash stays literal
    assert doc["model"] == "n" and "tools" not in doc


# -- SSE: data over several lines ------------------------------------------------------

USAGE_LINES = (b'data: {"id":"1","choices":[],\n'
               b'data:  "usage":{"prompt_tokens":1200,"completion_tokens":900}}\n\n')
CONTENT = (b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hello"},'
           b'"finish_reason":"stop"}]}\n\n')
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("drop", [True, False])
def test_sse_data_split_over_lines_is_one_payload(drop: bool) -> None:
    body = CONTENT + USAGE_LINES + DONE
    sse = SseStream(drop_usage_chunk=drop)
    out = feed_all(sse, [body])
    assert out == (CONTENT + DONE if drop else body)
    assert sse.usage == Usage(1200, 900)


def test_sse_multi_line_data_every_split() -> None:
    body = CONTENT + USAGE_LINES + DONE
    for cut in range(len(body) + 1):
        sse = SseStream(drop_usage_chunk=True)
        assert feed_all(sse, [body[:cut], body[cut:]]) == CONTENT + DONE, cut
        assert sse.usage == Usage(1200, 900)


def test_sse_data_lines_join_with_newline_not_nothing() -> None:
    # Joined without "\n" these two lines would read as the number 12.
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(b'data: {"usage":{"prompt_tokens":1\ndata: 2,"completion_tokens":0}}\n\n', True)
    assert sse.usage is None


def test_sse_responses_event_with_event_line_and_split_data() -> None:
    body = (b"event: response.completed\r\n"
            b'data: {"type":"response.completed",\r\n'
            b'data: "response":{"usage":{"input_tokens":5,"output_tokens":4}}}\r\n\r\n')
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(body, end=True) is None
    assert sse.usage == Usage(5, 4)


# -- SSE: usage together with choices --------------------------------------------------


@pytest.mark.parametrize("drop", [True, False])
def test_sse_usage_with_choices_keeps_finish_reason_and_text(drop: bool) -> None:
    body = (b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hello"},'
            b'"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
            b"\n\n" + DONE)
    sse = SseStream(drop_usage_chunk=drop)
    assert sse.feed(body, end=True) is None  # carries content: never dropped
    assert sse.usage == Usage(3, 2)
    assert sse.finish_reason == "length"
    assert sse.output_chars == 5


def test_sse_continuous_usage_keeps_the_last_figures() -> None:
    # vLLM's continuous_usage_stats: usage on every chunk, growing.
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"ab"},"finish_reason":%s}],'
              b'"usage":{"prompt_tokens":7,"completion_tokens":%d}}\n\n' % (reason, n)
              for n, reason in ((1, b"null"), (2, b'"stop"'))]
    sse = SseStream(drop_usage_chunk=False)
    feed_all(sse, events)
    assert (sse.usage, sse.finish_reason, sse.output_chars) == (Usage(7, 2), "stop", 4)


# -- SSE: CR line ends -------------------------------------------------------------------


def _usage_stream(line_end: bytes) -> tuple[bytes, bytes]:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}',
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}',
        b"data: [DONE]",
    ]
    parts = [e + line_end * 2 for e in events]
    return b"".join(parts), b"".join(parts[:2] + parts[3:])


@pytest.mark.parametrize("line_end", [b"\r", b"\n", b"\r\n"], ids=["cr", "lf", "crlf"])
def test_sse_every_pair_of_split_points(line_end: bytes) -> None:
    body, expected = _usage_stream(line_end)
    n = len(body)
    for a in range(n + 1):
        for b in range(a, n + 1, 5):
            sse = SseStream(drop_usage_chunk=True)
            assert feed_all(sse, [body[:a], body[a:b], body[b:]]) == expected, (a, b)
            assert sse.usage == Usage(9, 2), (a, b)
            assert (sse.finish_reason, sse.output_chars) == ("stop", 5)


def test_sse_cr_events_are_passed_on_as_they_arrive() -> None:
    body, _ = _usage_stream(b"\r")
    first = body[:body.index(b"\r\r") + 2]
    sse = SseStream(drop_usage_chunk=True)
    assert sse.feed(first, end=False) is None  # whole event out now, nothing held back
    assert sse.output_chars == 3


@pytest.mark.parametrize("drop", [True, False])
def test_sse_cr_then_lf_across_chunks_is_one_line_end(drop: bool) -> None:
    # "\n\r" ends the usage event; the "\n" in the next chunk completes its CRLF. It must
    # go with the dropped event, not become a stray blank line before [DONE].
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\r'
    chunks = [CONTENT, usage, b"\n" + DONE]
    sse = SseStream(drop_usage_chunk=drop)
    out = feed_all(sse, chunks)
    assert out == (CONTENT + DONE if drop else b"".join(chunks))
    assert sse.usage == Usage(1, 1)
    assert sse.events == 3


def _mixed_stream(rng: random.Random) -> tuple[bytes, bytes]:
    """A stream whose every line end is picked at random, and the same stream without
    its usage event."""
    line_ends = [b"\n", b"\r", b"\r\n"]
    events = [
        [b": keep-alive"],
        [b"event: x", b'data: {"choices":[{"index":0,', b'data: "delta":{"content":"abc"}}]}'],
        [b'data: {"choices":[],', b'data: "usage":{"prompt_tokens":4,"completion_tokens":3}}'],
        [b"data: [DONE]"],
    ]
    parts: list[bytes] = []
    for lines in events:
        part, previous = b"", b""
        for line in [*lines, b""]:
            # The empty line's end directly follows the last line's: a CR then an LF
            # there would be one CRLF, not the two line ends an event needs.
            ends = line_ends if line or previous != b"\r" else [b"\r", b"\r\n"]
            previous = rng.choice(ends)
            part += line + previous
        parts.append(part)
    return b"".join(parts), b"".join(parts[:2] + parts[3:])


def test_sse_random_line_ends_and_random_splits() -> None:
    rng = random.Random(7)
    for _ in range(400):
        body, expected = _mixed_stream(rng)
        cuts = sorted(rng.sample(range(len(body) + 1), rng.randint(1, 8)))
        chunks = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]
        sse = SseStream(drop_usage_chunk=True)
        assert feed_all(sse, chunks) == expected, (body, cuts)
        assert sse.usage == Usage(4, 3)
        assert sse.output_chars == 3


# -- SSE: bounded hold, linear time ----------------------------------------------------


def test_sse_event_over_the_bound_passes_through_and_the_stream_recovers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_api, "_MAX_EVENT", 1000)
    huge = b"data: " + b"x" * 5000
    sse = SseStream(drop_usage_chunk=True)
    out = []
    for i in range(0, len(huge), 100):
        chunk = huge[i:i + 100]
        replacement = sse.feed(chunk, end=False)
        out.append(chunk if replacement is None else replacement)
        assert len(sse._buf) <= 1000 + 100  # held bytes stay bounded
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    rest = b"\r\n\r\n" + usage + DONE
    replacement = sse.feed(rest, end=True)
    out.append(rest if replacement is None else replacement)
    assert b"".join(out) == huge + b"\r\n\r\n" + DONE
    assert sse.usage == Usage(2, 1)


def test_sse_event_over_the_bound_ending_at_stream_end() -> None:
    sse = SseStream(drop_usage_chunk=True)
    big = b"data: " + b"y" * (5 << 20)
    chunks = [big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)] + [b"tail"]
    assert feed_all(sse, chunks) == big + b"tail"


# -- SSE: a bad event never stops the stream -------------------------------------------


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize(
    "payload",
    [b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     b'{"a":' + b'{"b":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
     b'{"choices":5,"usage":{"prompt_tokens":1,"completion_tokens":1}}',
     b'{"choices":1.5}',
     b'{"type":"response.completed","response":7}',
     b'{"a":"\\ud800"}',
     b'{"a":NaN}',
     b"{\xff}"],
    ids=["deep-arrays", "deep-objects", "int-choices", "float-choices", "bad-response",
         "lone-surrogate", "nan", "not-utf8"])
def test_sse_unreadable_event_passes_unchanged(drop: bool, payload: bytes) -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":6,"completion_tokens":5}}\n\n'
    bad = b"data: " + payload + b"\n\n"
    sse = SseStream(drop_usage_chunk=drop)
    out = feed_all(sse, [bad, usage + DONE])
    assert out == (bad + DONE if drop else bad + usage + DONE)
    assert sse.usage == Usage(6, 5)


# -- SSE: /v1/responses terminal events ------------------------------------------------


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete",
                                      "response.failed"])
@pytest.mark.parametrize("drop", [True, False])
def test_sse_responses_every_terminal_event_carries_usage(terminal: str, drop: bool) -> None:
    status = terminal.split(".")[1]
    body = (b"event: response.output_text.delta\n"
            b'data: {"type":"response.output_text.delta","delta":"word word"}\n\n'
            + f"event: {terminal}\n".encode()
            + b"data: " + json.dumps({"type": terminal, "response": {
                "status": status, "usage": {"input_tokens": 5000, "output_tokens": 4000,
                                            "total_tokens": 9000}}}).encode() + b"\n\n")
    sse = SseStream(drop_usage_chunk=drop)
    assert sse.feed(body, end=True) is None
    assert sse.usage == Usage(5000, 4000)
    assert sse.output_chars == len("word word")


def test_sse_other_response_events_with_usage_are_not_final() -> None:
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(b'data: {"type":"response.in_progress","response":{"usage":'
             b'{"input_tokens":1,"output_tokens":1}}}\n\n', end=True)
    assert sse.usage is None


@pytest.mark.parametrize("custom_input", [{"email": "jane.roe@example.org"}, ["x"], 5])
def test_a_custom_tool_call_whose_input_is_no_string_is_refused(custom_input) -> None:
    # Redaction and policies read the input as text: any other shape would go unread.
    err = refused("chat", {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "f", "input": custom_input}}]}]})
    assert (err.status, err.code) == (400, "invalid_type")
    assert err.param == "messages[0].tool_calls[0].custom"


@pytest.mark.parametrize("message", [
    {"reasoning": "Let me think"},                                     # OpenRouter, Groq
    {"content": [{"type": "text", "text": "Let me think"}]},           # Mistral
    {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "Let me think"}]}]},
    {"function_call": {"name": "f", "arguments": "Let me think"}},     # legacy functions
    {"audio": {"id": "a", "transcript": "Let me think"}},
])
def test_every_shape_of_output_counts_as_output(message: dict) -> None:
    # Not read, a stream's first token waited for later text (its reasoning time was
    # learned as latency, or a role chunk's 1 ms), and an answer without usage was
    # estimated at no output.
    sse = SseStream(drop_usage_chunk=False)
    sse.feed(b"data: " + json.dumps({"choices": [{"index": 0, "delta": message}]}).encode()
             + b"\n\n", end=False)
    assert sse.output_chars == len("Let me think")
    body = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
    assert read_response(body)[2] == len("Let me think")


def test_reasoning_sent_under_both_names_counts_once() -> None:
    # vLLM sent the same text as `reasoning` and `reasoning_content` for a while.
    message = {"reasoning": "Let me think", "reasoning_content": "Let me think"}
    body = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
    assert read_response(body)[2] == len("Let me think")
