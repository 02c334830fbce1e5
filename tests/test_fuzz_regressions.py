"""Regressions from fuzzing the exchange in process: inputs that raised out of
`Exchange.handle` (which Envoy turns into a 500 for the client) or took quadratic time."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from atp_extproc.llm_api import EVENT_END, SseStream
from atp_extproc.redact import PlaceholderMap, Restorer
from atp_extproc.routing.feedback import FeedbackBook
from tests.test_exchange import chat, forwarded, resp_body, send_body
from tests.test_responses_blackbox import snap  # noqa: F401 - the example config

EMAIL = "jane@example.com"


def restorer() -> Restorer:
    return Restorer(PlaceholderMap({"[EMAIL_1]": EMAIL}))


@pytest.mark.parametrize("score", [10**400, -(10**400), float("nan"), float("inf")],
                         ids=["huge", "-huge", "nan", "inf"])
def test_a_feedback_score_no_float_can_hold_is_refused(score) -> None:
    with pytest.raises(ValueError, match="score must be a number"):
        FeedbackBook(lambda *observed: None).feedback("req-1", score)


def test_a_streamed_event_whose_type_is_no_string_is_read_as_any_other() -> None:
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(b'data: {"type": []}\n\ndata: {"type": {"a": 1}}\n\n', end=True) is None


@pytest.mark.parametrize("event", [
    {"type": "response.output_text.delta", "item_id": ["m"], "output_index": {"i": 0},
     "content_index": 0, "delta": "hi [EMA"},
    {"choices": [{"index": ["x"], "delta": {"content": "hi [EMA"}, "finish_reason": None}]},
    {"choices": [{"index": ["x"], "delta": {}, "finish_reason": "stop"}]},
])
def test_a_stream_position_that_is_no_scalar_is_no_crash(event) -> None:
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    assert restorer().feed(data, True).startswith(b"data: ")


def test_text_that_is_json_deeper_than_the_walk_is_restored_as_text() -> None:
    text = "[" * 900 + '"[EMAIL_1]"' + "]" * 900
    event = {"type": "response.output_text.done", "item_id": "m", "output_index": 0,
             "content_index": 0, "text": text}
    out = restorer().feed(b"data: " + json.dumps(event).encode() + b"\n\n", True)
    assert json.loads(out[6:])["text"] == text.replace("[EMAIL_1]", EMAIL)


def test_a_long_event_in_small_chunks_is_scanned_once(monkeypatch) -> None:
    # Rescanning what is held for every chunk took seconds for one 4 MiB event.
    from atp_extproc.redact import restore

    scanned: list[int] = []

    class Counting:
        def finditer(self, data, pos=0):
            scanned.append(len(data) - pos)
            return EVENT_END.finditer(data, pos)

    monkeypatch.setattr(restore, "EVENT_END", Counting())
    event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {
        "content": "x" * (1 << 20) + " [EMAIL_1]"}}]}).encode() + b"\n\n"
    r = restorer()
    chunks = [event[i:i + 4096] for i in range(0, len(event), 4096)]
    out = b"".join(r.feed(c, i == len(chunks) - 1) for i, c in enumerate(chunks))
    assert EMAIL.encode() in out
    assert sum(scanned) < 2 * len(event)


def test_response_headers_with_digits_of_another_script_are_no_crash(snap) -> None:  # noqa: F811
    ex, resp = send_body(snap, chat("gpt-4o-mini"))
    forwarded(resp)
    headers = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
        base_pb2.HeaderValue(key="content-length", raw_value=b"\xb2"),
        base_pb2.HeaderValue(key="x-envoy-attempt-count", raw_value=b"\xb2")])
    ex.handle(ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=headers)))
    ex.handle(resp_body(b'{"choices": []}'))
    assert ex.finish().attempts == 1


def test_an_event_nested_deeper_than_restore_walks_passes_unchanged() -> None:
    # Parse and walk each spend a level of recursion per level of nesting: some depth
    # near the limit always parsed and then failed in the walk.
    for depth in range(900, 1000):
        event = b"data: " + b"[" * depth + b'"[EMAIL_1]"' + b"]" * depth + b"\n\n"
        assert restorer().feed(event, True).startswith(b"data: "), depth


def test_a_json_answer_nested_deeper_than_restore_walks_is_restored_as_text() -> None:
    r = Restorer(PlaceholderMap({"[Q_1]": 'say "hi"'}))  # an original that needs escaping
    for depth in range(480, 1000, 20):
        body = b"[" * depth + b'"[Q_1]"' + b"]" * depth
        out = r.restore_json(body)
        assert out is not None and b'say \\"hi\\"' in out, depth
