"""Streams whose usage is not the plain usage-only chunk ATP asked for: an error event
carrying usage reaches the client, and an unreadable later usage supersedes an earlier
readable one (README, "Usage and cost")."""

from __future__ import annotations

import json

import pytest

from atp_extproc import config
from atp_extproc.llm_api import SseStream, Usage, estimate_tokens
from tests.test_exchange import EXAMPLE, chat, send_body, sse_chunk, stream_response
from tests.test_llm_api import feed_all

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


ERROR_EVENTS = {
    "openai-no-choices": {"error": {"message": "overloaded mid-stream",
                                    "type": "server_error"}, "usage": USAGE},
    "openai-empty-choices": {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                             "error": {"message": "overloaded mid-stream",
                                       "type": "server_error"}, "usage": USAGE},
    "tgi-text": {"error": "Input validation error: too long", "usage": USAGE},
    "other-truthy": {"choices": [], "error": ["overloaded"], "usage": USAGE},
}


@pytest.mark.parametrize("error_event", ERROR_EVENTS.values(), ids=ERROR_EVENTS.keys())
def test_sse_error_event_with_usage_is_not_dropped(error_event: dict) -> None:
    # The usage-only chunk, `error` null included, is still the one ATP asked for.
    usage_chunk = event({"choices": [], "error": None, "usage": USAGE})
    error = event(error_event)
    body = CONTENT + error + usage_chunk + DONE
    sse = SseStream(drop_usage_chunk=True)
    cut = len(CONTENT) + 5
    assert feed_all(sse, [body[:cut], body[cut:]]) == CONTENT + error + DONE
    assert sse.usage == Usage(11, 7)
    assert sse.failed  # passed on as an error, counted as one


@pytest.mark.parametrize("nothing", [False, "", 0, []])
def test_sse_an_error_field_that_says_nothing_neither_fails_nor_keeps_the_chunk(
        nothing: object) -> None:
    # `error: false` kept ATP's own usage chunk for a client that never asked for it,
    # yet did not count the stream failed: one rule for both now.
    usage_chunk = event({"choices": [], "error": nothing, "usage": USAGE})
    sse = SseStream(drop_usage_chunk=True)
    assert feed_all(sse, [CONTENT + usage_chunk + DONE]) == CONTENT + DONE
    assert not sse.failed


@pytest.mark.parametrize("final_usage", [
    {"prompt_tokens": 11, "completion_tokens": "900"},
    {"prompt_tokens": 11, "completion_tokens": 10**12},
    {"prompt_tokens": None, "completion_tokens": 3},
    {},
], ids=["text-count", "past-bound", "null-prompt", "empty"])
@pytest.mark.parametrize("drop", [True, False])
def test_sse_unreadable_later_usage_supersedes_an_earlier_one(final_usage: dict,
                                                              drop: bool) -> None:
    # Per-chunk usage, with include_usage's `"usage": null` chunks between, which say
    # nothing; then the final usage chunk, unreadable.
    counted = [event({"choices": [{"index": 0, "delta": {"content": text}}],
                      "usage": {"prompt_tokens": 11, "completion_tokens": n}})
               for n, text in ((1, "Hi"), (2, " there, a long answer"))]
    events = [counted[0], CONTENT, counted[1], CONTENT,
              event({"choices": [], "usage": final_usage}), DONE]
    sse = SseStream(drop_usage_chunk=drop)
    seen = []
    for i, chunk in enumerate(events):
        sse.feed(chunk, end=i == len(events) - 1)
        seen.append(sse.usage)
    assert seen == [Usage(11, 1), Usage(11, 1), Usage(11, 2), Usage(11, 2), None, None]
    assert sse.output_chars == len("HiHi there, a long answerHi")


def test_sse_responses_unreadable_terminal_usage_supersedes_an_earlier_one() -> None:
    body = (event({"type": "response.output_text.delta", "delta": "word word",
                   "usage": {"input_tokens": 5, "output_tokens": 1}})
            + event({"type": "response.completed", "response": {
                "status": "completed", "usage": {"input_tokens": 5,
                                                 "output_tokens": "900"}}}))
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(body, end=True) is None
    assert sse.usage is None


# -- through the exchange ---------------------------------------------------------------


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    return config.load(EXAMPLE)


def test_exchange_passes_the_error_event_and_counts_the_stream_failed(snap) -> None:
    ex, _ = send_body(snap, chat("fast", stream=True))
    assert ex.record.usage_injected
    body = CONTENT + event(ERROR_EVENTS["openai-no-choices"]) + DONE
    assert stream_response(ex, body) == body
    rec = ex.finish()
    assert (rec.error_code, rec.input_tokens, rec.output_tokens,
            rec.usage_estimated) == ("upstream_stream_error", 11, 7, False)


def test_exchange_estimates_when_the_final_usage_is_unreadable(snap) -> None:
    ex, _ = send_body(snap, chat("fast", stream=True))
    stream = (sse_chunk([{"index": 0, "delta": {"content": "Hello there!"}}],
                        {"prompt_tokens": 11, "completion_tokens": 2})
              + sse_chunk([], {"prompt_tokens": 11, "completion_tokens": "900"}) + DONE)
    stream_response(ex, stream)
    rec = ex.finish()
    assert rec.usage_estimated is True
    assert rec.output_tokens == estimate_tokens(len("Hello there!"))
