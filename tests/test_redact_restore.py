"""Restore: originals back into JSON bodies and SSE streams (chunk and event splits)."""

from __future__ import annotations

import json

import pytest

from atp_extproc.redact import PlaceholderMap, RedactionSettings, Redactor, Restorer
from tests.test_redact import VALID

PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"
MAPPING = {"[EMAIL_1]": "jane@example.com", "[CARD_1]": "4111 1111 1111 1111",
           "[PRIVATE_KEY_1]": PEM, "[QUOTE_1]": 'say "hi" \\ bye',
           "[EMAIL:0123456789abcdef]": "bob@example.org"}


def restorer() -> Restorer:
    return Restorer(PlaceholderMap(MAPPING))


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def delta(text: str | None, finish: str | None = None, index: int = 0) -> dict:
    d = {} if text is None else {"content": text}
    return {"id": "c", "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": d, "finish_reason": finish}]}


def run(r: Restorer, chunks: list[bytes]) -> bytes:
    return b"".join(r.feed(c, i == len(chunks) - 1) for i, c in enumerate(chunks))


def events(stream: bytes) -> list:
    out = []
    for block in stream.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def content_of(stream: bytes) -> str:
    return "".join(c["delta"].get("content") or "" for e in events(stream)
                   for c in e.get("choices", []))


# -- JSON bodies ----------------------------------------------------------------------------

def test_restore_json_fast_path_keeps_bytes():
    body = b'{"choices": [{"message": {"content": "Mail [EMAIL_1], card [CARD_1]."}}]}'
    out = restorer().restore_json(body)
    assert out == (b'{"choices": [{"message": {"content": "Mail jane@example.com, card '
                   b'4111 1111 1111 1111."}}]}')


def test_restore_json_none_when_nothing_to_do():
    r = restorer()
    assert r.restore_json(b'{"a": "nothing here"}') is None
    assert r.restore_json(b'{"a": "unknown [EMAIL_9] and [1, 2]"}') is None
    assert Restorer(PlaceholderMap()).restore_json(b'{"a": "[EMAIL_1]"}') is None


def test_restore_json_escapes_originals_at_every_depth():
    args = json.dumps({"key": "[PRIVATE_KEY_1]", "q": "[QUOTE_1]", "to": "[EMAIL_1]"})
    body = json.dumps({"choices": [{"message": {
        "content": "key [PRIVATE_KEY_1]",
        "tool_calls": [{"function": {"name": "f", "arguments": args}}]}}]}).encode()
    out = json.loads(restorer().restore_json(body))
    msg = out["choices"][0]["message"]
    assert msg["content"] == f"key {PEM}"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {
        "key": PEM, "q": MAPPING["[QUOTE_1]"], "to": "jane@example.com"}


def test_restore_hash_tokens():
    out = restorer().restore_json(b'{"t": "[EMAIL:0123456789abcdef]"}')
    assert json.loads(out) == {"t": "bob@example.org"}


def test_round_trip_with_redactor():
    r = Redactor(RedactionSettings())
    doc = {"model": "m", "messages": [{"role": "user", "content":
                                       "Write to ana@example.com about card 5555555555554444"}]}
    red = r.redact("chat", doc, "t")
    sent = red.fields["messages"][0]["content"]
    assert "ana@" not in sent and "5555" not in sent
    reply = json.dumps({"choices": [{"message": {"content": f"Echo: {sent}"}}]}).encode()
    out = json.loads(Restorer(red.mapping).restore_json(reply))
    assert out["choices"][0]["message"]["content"] == "Echo: " + doc["messages"][0]["content"]


@pytest.mark.parametrize("action", ["mask", "hash"])
def test_every_class_placeholder_is_restored(action):
    custom = [{"name": "employee_id2", "pattern": "EMP-[0-9]{4}"}]
    values = {**{cls: vs[0] for cls, vs in VALID.items()}, "employee_id2": "EMP-1234"}
    r = Redactor(RedactionSettings(custom_detectors=custom,
                                   actions=dict.fromkeys(values, action)), hmac_key=b"k" * 32)
    for cls, value in values.items():
        doc = {"model": "m", "messages": [{"role": "user", "content": f"see {value} now"}]}
        red = r.redact("chat", doc, "t")
        sent = red.fields["messages"][0]["content"]
        assert sent.startswith(f"see [{cls.upper()}{'_' if action == 'mask' else ':'}")
        restorer_ = Restorer(red.mapping)
        assert restorer_.restore_text(sent) == doc["messages"][0]["content"]
        body = json.dumps({"content": sent}).encode()
        assert json.loads(restorer_.restore_json(body)) == {"content": f"see {value} now"}


# -- SSE ------------------------------------------------------------------------------------

STREAM = (event(delta("Mail [EMAIL_1] and key [PRIVATE_KEY_1]!"))
          + event(delta(None, "stop")) + b"data: [DONE]\n\n")


def test_sse_whole():
    out = run(restorer(), [STREAM])
    assert content_of(out) == f"Mail jane@example.com and key {PEM}!"
    assert out.endswith(b"data: [DONE]\n\n")


def test_sse_split_at_every_byte_across_two_chunks():
    expected = run(restorer(), [STREAM])
    for i in range(len(STREAM) + 1):
        assert run(restorer(), [STREAM[:i], STREAM[i:]]) == expected, i


@pytest.mark.parametrize("token", ["[EMAIL_1]", "[CARD_1]", "[EMAIL:0123456789abcdef]"])
def test_sse_placeholder_split_at_every_position_across_two_events(token):
    for cut in range(1, len(token)):
        stream = (event(delta(f"A {token[:cut]}")) + event(delta(f"{token[cut:]} B"))
                  + event(delta(None, "stop")) + b"data: [DONE]\n\n")
        out = run(restorer(), [stream])
        assert content_of(out) == f"A {MAPPING[token]} B", cut
        assert token[:cut] not in content_of(out)


def test_sse_placeholder_spread_over_many_events_and_chunks():
    pieces = ["Hi ", "[", "EMA", "IL", "_", "1", "]", ", card [CA", "RD_1].", ""]
    stream = b"".join(event(delta(p)) for p in pieces) + event(delta(None, "stop"))
    raw = stream + b"data: [DONE]\n\n"
    for size in (1, 7, 64):
        chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
        out = run(restorer(), chunks)
        assert content_of(out) == "Hi jane@example.com, card 4111 1111 1111 1111."


def test_sse_held_prefix_is_flushed_before_finish_and_at_end():
    # the model stopped in the middle of something that looked like a placeholder
    out = run(restorer(), [event(delta("cut [EMAIL_")) + event(delta(None, "length"))])
    assert content_of(out) == "cut [EMAIL_"
    evs = events(out)
    assert evs[-1]["choices"][0]["finish_reason"] == "length"
    out = run(restorer(), [event(delta("ends with ["))])  # no finish event at all
    assert content_of(out) == "ends with ["


def test_sse_with_cr_line_ends_is_restored_event_by_event():
    stream = (event(delta("hi [EMA")) + event(delta("IL_1] bye"))).replace(b"\n", b"\r")
    r = restorer()
    first = r.feed(stream[:len(stream) // 2 + 4], False)
    assert first  # the first event went on at once, not held to the end
    out = first + r.feed(stream[len(stream) // 2 + 4:], True)
    texts = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
             for line in out.split(b"\r") if line.startswith(b"data: ")]
    assert "".join(texts) == "hi jane@example.com bye"


def test_sse_held_text_after_a_last_event_without_its_blank_line_is_an_event_of_its_own():
    out = run(restorer(), [event(delta("write to [EMAIL_1"))[:-2]])
    assert content_of(out) == "write to [EMAIL_1"  # every event parses on its own


def test_sse_brackets_that_are_not_placeholders_pass():
    stream = event(delta("x = [1, 2]; y = [a")) + event(delta("bc]")) + event(delta(None, "stop"))
    out = run(restorer(), [stream])
    assert content_of(out) == "x = [1, 2]; y = [abc]"


def test_sse_tool_call_argument_deltas_are_json_escaped():
    def tc(args, finish=None):
        return {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": args}}]}, "finish_reason": finish}]}
    stream = (event(tc('{"key": "[PRIVATE_')) + event(tc('KEY_1]", "q": "[QUOTE_1]"}'))
              + event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    out = run(restorer(), [stream])
    args = "".join(c["delta"]["tool_calls"][0]["function"]["arguments"]
                   for e in events(out) for c in e["choices"] if c["delta"].get("tool_calls"))
    assert json.loads(args) == {"key": PEM, "q": MAPPING["[QUOTE_1]"]}


def test_sse_responses_api_events():
    stream = (event({"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
                     "content_index": 0, "delta": "to [EMAI"})
              + event({"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
                       "content_index": 0, "delta": "L_1] now"})
              + event({"type": "response.output_text.done", "item_id": "m1", "output_index": 0,
                       "content_index": 0, "text": "to [EMAIL_1] now"}))
    out = events(run(restorer(), [stream]))
    assert "".join(e.get("delta", "") for e in out) == "to jane@example.com now"
    assert out[-1]["text"] == "to jane@example.com now"


def test_sse_events_without_placeholders_are_untouched():
    stream = event(delta("plain text")) + event({"choices": [], "usage": {"prompt_tokens": 3}})
    r = restorer()
    assert run(r, [stream]) == stream


def test_crlf_events_and_non_json_data():
    stream = b"event: note\r\ndata: [EMAIL_1] raw\r\n\r\ndata: [DONE]\r\n\r\n"
    out = run(restorer(), [stream])
    assert out == b"event: note\r\ndata: jane@example.com raw\r\n\r\ndata: [DONE]\r\n\r\n"


def test_empty_mapping_passes_chunks_through():
    r = Restorer(PlaceholderMap())
    assert r.feed(b"data: [EMAIL_1]\n\n", False) == b"data: [EMAIL_1]\n\n"


def test_clear_forgets_originals():
    r = restorer()
    r.clear()
    assert r.restore_json(b'{"a": "[EMAIL_1]"}') is None


@pytest.mark.parametrize("inner", ['{"n": ' + "9" * 5000 + ', "q": "[QUOTE_1]"}',
                                   '{"big": 1e400, "q": "[QUOTE_1]"}',
                                   "[" * 1200 + '"[QUOTE_1]"' + "]" * 1200])
def test_json_text_python_cannot_read_gets_its_values_back_escaped(inner: str) -> None:
    # Tool-call arguments holding a number too long, or nesting too deep, for Python:
    # JSON all the same, so a value with a quote must go back escaped to stay JSON.
    body = json.dumps({"choices": [{"message": {"tool_calls": [
        {"function": {"name": "f", "arguments": inner}}]}}]}).encode()
    out = json.loads(restorer().restore_json(body))
    arguments = out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert arguments == inner.replace("[QUOTE_1]", 'say \\"hi\\" \\\\ bye')


def test_a_json_text_event_keeps_its_numbers_and_spacing():
    # A .done event's arguments were parsed and written again: 0.1000000000000000055…
    # became 0.1, and the deltas no longer added up to the .done text.
    args = '{"to":"[EMAIL_1]","amount":0.1000000000000000055511151231257827,"big":1E3}'
    out = events(run(restorer(), [event({
        "type": "response.function_call_arguments.done", "item_id": "fc", "output_index": 0,
        "arguments": args})]))
    assert out[0]["arguments"] == args.replace("[EMAIL_1]", MAPPING["[EMAIL_1]"])


def test_a_streamed_events_keys_are_restored_as_a_whole_answers_are():
    out = events(run(restorer(), [event({"type": "response.created", "response": {
        "id": "r", "metadata": {"[EMAIL_1]": "x"}}})]))
    assert out[0]["response"]["metadata"] == {MAPPING["[EMAIL_1]"]: "x"}


# -- citations point into the text restore lengthens ----------------------------------------

CITED_TEXT = "Mail [EMAIL_1] or [CARD_1]; see the docs."
DOCS = CITED_TEXT.index("the docs")  # where the provider's citation starts


def _cited(text: str) -> tuple[int, int]:
    start = text.index("the docs")
    return start, start + len("the docs")


def _citation(start: int, chat: bool = False) -> dict:
    span = {"start_index": start, "end_index": start + len("the docs"),
            "url": "https://example.com/docs", "title": "Docs"}
    return {"type": "url_citation", "url_citation": span} if chat else \
        {"type": "url_citation", **span}


def test_a_chat_answers_citations_move_with_what_restore_puts_back():
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": CITED_TEXT,
        "annotations": [_citation(DOCS, chat=True)]}}]}).encode()
    message = json.loads(restorer().restore_json(body))["choices"][0]["message"]
    span = message["annotations"][0]["url_citation"]
    assert (span["start_index"], span["end_index"]) == _cited(message["content"])


def _strict(data: bytes):
    def no_constant(name: str):
        raise ValueError(f"{name} is no JSON")
    return json.loads(data, parse_constant=no_constant)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 5000,
                                    b"1" + b"0" * 400 + b".0", b"1" + b"0" * 300 + b"e50"])
def test_a_number_python_cannot_hold_beside_a_citation_is_written_as_it_came(number):
    # 1e400 was read as inf and written back as Infinity, which strict JSON parsers refuse.
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": CITED_TEXT,
        "annotations": [_citation(DOCS, chat=True)]}}]}).encode()[:-1] + b', "x": ' + \
        number + b"}"
    out = restorer().restore_json(body)
    assert out.endswith(b'"x":' + number + b"}")
    message = _strict(out.replace(number, b"0"))["choices"][0]["message"]
    span = message["annotations"][0]["url_citation"]
    assert (span["start_index"], span["end_index"]) == _cited(message["content"])


def test_a_streamed_event_with_a_number_out_of_range_is_restored_as_json():
    # Values needing escaping, and placeholders split over events, restored as ever.
    r = restorer()
    out = r.feed(b'data: {"choices":[{"index":0,"delta":{"content":"q [QUOTE_1] [EM"}}],'
                 b'"x":1e400}\n\n', False)
    out += r.feed(b'data: {"choices":[{"index":0,"delta":{"content":"AIL_1] end"}}]}'
                  b'\n\n', True)
    events = [_strict(line[5:]) for line in out.split(b"\n") if line.startswith(b"data:")]
    text = "".join(e["choices"][0]["delta"]["content"] for e in events)
    assert text == f"q {MAPPING['[QUOTE_1]']} {MAPPING['[EMAIL_1]']} end"
    assert b'"x":1e400' in out


def test_a_responses_answers_citations_move_with_what_restore_puts_back():
    part = {"type": "output_text", "text": CITED_TEXT, "annotations": [_citation(DOCS)]}
    body = json.dumps({"output": [{"type": "message", "content": [part]}]}).encode()
    part = json.loads(restorer().restore_json(body))["output"][0]["content"][0]
    ann = part["annotations"][0]
    assert (ann["start_index"], ann["end_index"]) == _cited(part["text"])


def test_a_file_citations_index_moves_with_what_restore_puts_back():
    # Its `index` (where the citation goes in the text) stayed: it landed inside a word,
    # or past the text's end.
    cite = {"type": "file_citation", "file_id": "f1", "filename": "docs.pdf", "index": DOCS}
    where = {"item_id": "m1", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": CITED_TEXT, "annotations": [cite]}
    body = json.dumps({"output": [{"type": "message", "content": [part]}]}).encode()
    whole = json.loads(restorer().restore_json(body))["output"][0]["content"][0]
    assert whole["annotations"][0]["index"] == _cited(whole["text"])[0]
    stream = event({"type": "response.output_text.delta", **where, "delta": CITED_TEXT})
    stream += event({"type": "response.output_text.annotation.added", **where,
                     "annotation_index": 0, "annotation": cite})
    out = events(run(restorer(), [stream]))
    assert out[-1]["annotation"]["index"] == _cited(out[0]["delta"])[0]


def test_a_restored_logprob_tokens_bytes_are_the_restored_tokens():
    # The token came back restored and its bytes still spelled the placeholder.
    def entry(token: str) -> dict:
        return {"token": token, "logprob": -0.1, "bytes": list(token.encode()),
                "top_logprobs": [{"token": token, "logprob": -0.1,
                                  "bytes": list(token.encode())}]}

    body = json.dumps({"choices": [{"index": 0, "message": {"content": "[EMAIL_1]"},
                                    "logprobs": {"content": [entry("[EMAIL_1]")]}}]})
    want = entry(MAPPING["[EMAIL_1]"])
    assert json.loads(restorer().restore_json(body.encode()))["choices"][0][
        "logprobs"]["content"] == [want]
    chunk = {"choices": [{"index": 0, "delta": {"content": "[EMAIL_1]"},
                          "logprobs": {"content": [entry("[EMAIL_1]")]}}]}
    out = events(run(restorer(), [event(chunk)]))
    assert out[0]["choices"][0]["logprobs"]["content"] == [want]


def test_text_held_under_a_restored_key_is_flushed_there():
    # The held text's place named the key as the provider wrote it, the event kept had it
    # restored: KeyError, and the client got 500 for the whole answer.
    stream = event({"type": "response.custom.delta", "item_id": "i", "output_index": 0,
                    "delta": {"[EMAIL_1]": "notes for [EM"}})
    stream += event({"type": "response.completed", "response": {"output": []}})
    out = [json.loads(line[5:]) for line in run(restorer(), [stream]).split(b"\n")
           if line.startswith(b"data:")]
    email = MAPPING["[EMAIL_1]"]
    assert "".join(e["delta"][email] for e in out if "delta" in e) == "notes for [EM"


@pytest.mark.parametrize("going_on", ["", "null"])
def test_a_chunk_marked_unfinished_by_an_empty_finish_reason_holds_its_placeholder(going_on):
    # SGLang and older Ollama send "" (KoboldCpp "null") until the last chunk: each chunk
    # read as the end, and "[EMA" + "IL_1]" went out unrestored.
    stream = (event(delta("Write to [EMA", going_on)) + event(delta("IL_1] today", going_on))
              + event(delta(None, "stop")) + b"data: [DONE]\n\n")
    assert content_of(run(restorer(), [stream])) == "Write to jane@example.com today"


def test_two_entries_of_one_choice_index_in_an_event_are_restored_as_one_text():
    # The second entry took the text the first held: KeyError, the client got nothing.
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "a [EM"}, "finish_reason": None},
        {"index": 0, "delta": {"content": "AIL_1] b"}, "finish_reason": None}]}
    out = run(restorer(), [event(chunk) + event(delta(None, "stop"))])
    assert content_of(out) == "a jane@example.com b"


def test_streamed_citations_move_with_what_restore_put_back_in_the_deltas():
    where = {"item_id": "m1", "output_index": 0, "content_index": 0}
    pieces = ["Mail [EMA", "IL_1] or [CARD_1]; ", "see the docs."]
    part = {"type": "output_text", "text": CITED_TEXT, "annotations": [_citation(DOCS)]}
    stream = b"".join(event({"type": "response.output_text.delta", **where, "delta": p})
                      for p in pieces)
    stream += event({"type": "response.output_text.annotation.added", **where,
                     "annotation_index": 0, "annotation": _citation(DOCS)})
    stream += event({"type": "response.content_part.done", **where, "part": part})
    stream += event({"type": "response.completed", "response": {"output": [
        {"type": "message", "id": "m1", "content": [part]}]}})
    out = events(run(restorer(), [stream]))
    text = "".join(e.get("delta", "") for e in out)
    assert text == ("Mail jane@example.com or 4111 1111 1111 1111; see the docs.")
    added, done, completed = out[-3:]
    for ann in (added["annotation"], done["part"]["annotations"][0],
                completed["response"]["output"][0]["content"][0]["annotations"][0]):
        assert (ann["start_index"], ann["end_index"]) == _cited(text)


def test_a_chat_streams_citations_move_with_its_restored_content():
    chunks = [delta("Mail [EMAIL_1] or [CA"), delta("RD_1]; see the docs.")]
    last = delta(None, finish="stop")
    last["choices"][0]["delta"]["annotations"] = [_citation(DOCS, chat=True)]
    out = events(run(restorer(), [b"".join(map(event, [*chunks, last]))]))
    span = out[-1]["choices"][0]["delta"]["annotations"][0]["url_citation"]
    assert (span["start_index"], span["end_index"]) == _cited(content_of(
        b"".join(map(event, out))))


def test_a_citation_without_placeholders_before_it_stays():
    body = json.dumps({"choices": [{"index": 0, "message": {
        "content": "see the docs, then mail [EMAIL_1]",
        "annotations": [_citation(4, chat=True)]}}]}).encode()
    message = json.loads(restorer().restore_json(body))["choices"][0]["message"]
    assert message["annotations"][0]["url_citation"]["start_index"] == 4


def test_events_added_to_a_numbered_stream_keep_its_numbers_unique_and_in_order():
    # The held text's event repeated the number of the delta it came from: a client
    # keeping events by number (resuming a stream, dropping repeats) lost the text.
    where = {"item_id": "m1", "output_index": 0, "content_index": 0}
    stream = (event({"type": "response.output_text.delta", "sequence_number": 4, **where,
                     "delta": "cut [EMAIL_"})
              + event({"type": "response.output_text.done", "sequence_number": 5, **where,
                       "text": "cut [EMAIL_"})
              + event({"type": "response.output_text.delta", "sequence_number": 6,
                       **{**where, "content_index": 1}, "delta": "then [CARD_"})
              + event({"type": "response.completed", "sequence_number": 7,
                       "response": {"output": []}}))
    def named(stream: bytes) -> list[dict]:  # added events carry their `event:` line
        return [json.loads(line[6:]) for line in stream.split(b"\n")
                if line.startswith(b"data: ")]

    for chunks in ([stream], [stream[:40], stream[40:]]):
        out = named(run(restorer(), chunks))
        assert [e["sequence_number"] for e in out] == [4, 5, 6, 7, 8, 9]
        assert [e["type"].rsplit(".", 1)[-1] for e in out] == [
            "delta", "delta", "done", "delta", "delta", "completed"]
        assert "".join(e.get("delta", "") for e in out) == "cut [EMAIL_then [CARD_"
    # Held to the very end, its event follows the last number.
    tail = event({"type": "response.output_text.delta", "sequence_number": 2, **where,
                  "delta": "ends ["})
    assert [e["sequence_number"] for e in named(run(restorer(), [tail]))] == [2, 3]


def test_a_streamed_citation_counts_the_text_passed_on_unchanged_before_it():
    # Deltas without a placeholder went out unread, so restore's additions were placed
    # too early and the citation moved onto the wrong text.
    where = {"item_id": "m1", "output_index": 0, "content_index": 0}
    pieces = ["Intro text, then ", "see the docs", " and mail [EMAIL_1] today."]
    start = len(pieces[0]) + len("see ")
    cited = {"type": "url_citation", "start_index": start, "end_index": start + 8,
             "url": "https://example.com/docs", "title": "Docs"}
    stream = b"".join(event({"type": "response.output_text.delta", **where, "delta": p})
                      for p in pieces)
    stream += event({"type": "response.output_text.annotation.added", **where,
                     "annotation_index": 0, "annotation": cited})
    out = events(run(restorer(), [stream]))
    text = "".join(e.get("delta", "") for e in out)
    ann = out[-1]["annotation"]
    assert text[ann["start_index"]:ann["end_index"]] == "the docs"
    chunks = [delta(p) for p in pieces]
    last = delta(None, finish="stop")
    last["choices"][0]["delta"]["annotations"] = [
        {"type": "url_citation", "url_citation": {k: cited[k] for k in (
            "start_index", "end_index", "url", "title")}}]
    out = run(restorer(), [b"".join(map(event, [*chunks, last]))])
    span = events(out)[-1]["choices"][0]["delta"]["annotations"][0]["url_citation"]
    assert content_of(out)[span["start_index"]:span["end_index"]] == "the docs"


def test_after_an_event_too_big_to_hold_the_stream_is_read_event_by_event_again():
    # A streamed image's partial (over 4 MiB of base64) switched restore to raw bytes for
    # the rest of the stream: a placeholder split across later deltas came out as sent.
    big = event({"type": "response.image_generation_call.partial_image",
                 "partial_image_b64": "A" * (5 << 20)})
    stream = event(delta("Mail [EMA")) + big + event(delta("IL_1] now")) + \
        event(delta(None, "stop"))
    out = run(restorer(), [stream[i:i + (1 << 20)] for i in range(0, len(stream), 1 << 20)])
    assert content_of(out) == "Mail jane@example.com now"
    assert b'"partial_image_b64":"' + b"A" * 100 in out.replace(b": ", b":")
    # The big event's end split between chunks ("\n" | "\n", "\r\n\r" | "\n").
    for sep in (b"\n\n", b"\r\n\r\n"):
        crlf = stream.replace(b"\n\n", sep)
        cut = crlf.index(sep, len(event(delta("Mail [EMA"))) + (5 << 20)) + len(sep) - 1
        out = run(restorer(), [crlf[:cut], crlf[cut:]])
        assert content_of(out.replace(b"\r\n", b"\n")) == "Mail jane@example.com now"


def test_held_text_goes_before_an_event_the_stream_cut_off():
    # A blank line after the cut event had clients parse its half JSON (the SDK raised).
    cut = event(delta("rest"))[:20]
    out = run(restorer(), [event(delta("Mail [EMA")) + cut])
    assert out.endswith(cut) and not out.endswith(b"\n\n")
    assert content_of(out[:-len(cut)]) == "Mail [EMA"


def test_an_event_whose_json_spans_data_lines_is_restored_as_one():
    def multiline(obj: dict) -> bytes:
        return b"".join(b"data: " + line.encode() + b"\n"
                        for line in json.dumps(obj, indent=1).splitlines()) + b"\n"

    out = run(restorer(), [multiline(delta("Mail [EMA")) + multiline(delta("IL_1] now"))
                           + multiline(delta(None, "stop"))])
    blocks = [b"\n".join(line[6:] for line in block.split(b"\n") if line.startswith(b"data: "))
              for block in out.split(b"\n\n")]  # data lines joined, as clients do
    chunks = [json.loads(data) for data in blocks if data]
    assert "".join(c["delta"].get("content", "") for e in chunks for c in e["choices"]) == \
        "Mail jane@example.com now"


def test_text_held_before_an_event_too_big_to_hold_keeps_its_place():
    # The held "[EMA" came out after the 5 MB delta that went on raw: text reordered.
    stream = event(delta("Contact [EMA")) + event(delta("IL_1] " + "lorem " * (1 << 20))) + \
        event(delta(" again")) + event(delta(None, "stop"))
    out = run(restorer(), [stream[i:i + (1 << 20)] for i in range(0, len(stream), 1 << 20)])
    text = content_of(out)
    assert text.startswith("Contact [EMAIL_1] lorem") and text.endswith("lorem  again")
