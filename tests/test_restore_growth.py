"""Restore's growth is bounded: an answer repeating a long value's placeholder (a JWT,
put back hundreds of times) once grew a 5 KB answer to 400 MB, past Envoy's buffer and
ATP's gRPC limit, on the event loop. And a stream's output estimate counts the text the
provider wrote, not the restored one it never billed."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from atp_extproc import config
from atp_extproc.config import envoy_buffer_limit
from atp_extproc.exchange import Exchange
from atp_extproc.llm_api import estimate_tokens
from atp_extproc.redact import Restorer
from atp_extproc.redact.redactor import PlaceholderMap
from atp_extproc.redact.restore import STREAM_COPIES
from tests.test_exchange import (
    EXAMPLE,
    chat,
    forwarded,
    resp_body,
    resp_headers,
    send_body,
    sse_chunk,
)

# A 27 KB token: put back 600 times it would add 16 MB to the answer.
_JWT = ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (
    b'{"alg":"HS256","typ":"JWT"}', json.dumps({"sub": "x" * 20_000}).encode(),
    b"s" * 32))
_EMAIL = "jane.doe@example.com"
_REPEATS = 600


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    snap = config.load(EXAMPLE)
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    return dataclasses.replace(snap, routes=routes)


def _budget(snap: config.Snapshot) -> int:
    max_body = snap.server.max_body_bytes
    return envoy_buffer_limit(max_body) - max_body


def _exchange(snap: config.Snapshot, text: str, stream: bool = False) -> tuple[Exchange, str]:
    """An exchange whose request held `text`, and the placeholder its first value became."""
    ex, resp = send_body(snap, chat("fast", stream=stream, messages=[
        {"role": "user", "content": text}]))
    _, body, _ = forwarded(resp)
    assert body is not None and ex.restorer is not None
    sent = json.loads(body)["messages"][0]["content"]
    placeholder = sent[sent.index("["):sent.index("]") + 1]
    return ex, placeholder


def _json_answer(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()


def _buffered(ex: Exchange, answer: bytes) -> bytes:
    ex.handle(resp_headers(200, extra={"content-length": str(len(answer))}))
    common = ex.handle(resp_body(answer)).response_body.response
    return common.body_mutation.body if common.HasField("body_mutation") else answer


def test_a_json_answer_repeating_a_long_value_keeps_its_placeholders(snap) -> None:
    ex, placeholder = _exchange(snap, f"token {_JWT} ok")
    answer = _json_answer(f"{placeholder} " * _REPEATS)
    out = _buffered(ex, answer)
    # Within Envoy's buffer, so the client gets the model's answer as it came.
    assert len(out) <= len(answer) + _budget(snap)
    assert len(out) <= envoy_buffer_limit(snap.server.max_body_bytes)
    assert json.loads(out)["choices"][0]["message"]["content"].count(placeholder) == _REPEATS
    assert _JWT.encode() not in out
    rec = ex.finish()
    assert (rec.status, rec.error_code) == (200, "")
    assert rec.restore_limited is True and rec.restored is False


def test_a_stream_repeating_a_long_value_grows_by_the_budget_at_most(snap) -> None:
    # A stream's budget is STREAM_COPIES times a body's (Responses repeats its texts).
    budget = _budget(snap) * STREAM_COPIES
    repeats = 2 * budget // len(_JWT)
    ex, placeholder = _exchange(snap, f"token {_JWT} ok", stream=True)
    ex.handle(resp_headers(200, "text/event-stream"))
    events = [sse_chunk([{"index": 0, "delta": {"content": f"{placeholder} "}}])
              for _ in range(repeats)]
    events.append(sse_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(b"data: [DONE]\n\n")
    sent = b"".join(events)
    out = b""
    for i in range(0, len(events), 50):
        chunk = b"".join(events[i:i + 50])
        common = ex.handle(resp_body(chunk, end=i + 50 >= len(events))).response_body.response
        out += common.body_mutation.body if common.HasField("body_mutation") else chunk
    assert len(out) <= len(sent) + budget
    restored, kept = out.count(_JWT.encode()), out.count(placeholder.encode())
    # Restored until the budget, whole values only; the rest kept as the model wrote them.
    assert restored == budget // (len(_JWT) - len(placeholder))
    assert restored + kept == repeats
    rec = ex.finish()
    assert (rec.status, rec.error_code) == (200, "")
    assert rec.restored is True and rec.restore_limited is True


def test_a_normal_restore_is_unchanged(snap) -> None:
    ex, placeholder = _exchange(snap, f"write to {_EMAIL}")
    out = _buffered(ex, _json_answer(f"Sent to {placeholder}, again {placeholder}."))
    content = json.loads(out)["choices"][0]["message"]["content"]
    assert content == f"Sent to {_EMAIL}, again {_EMAIL}."
    rec = ex.finish()
    assert rec.restored is True and rec.restore_limited is False


def test_past_the_budget_later_texts_keep_their_placeholders() -> None:
    restorer = Restorer(PlaceholderMap({"[EMAIL_1]": _EMAIL}), budget=3 * (len(_EMAIL) - 9))
    assert restorer.restore_text("[EMAIL_1] [EMAIL_1]") == f"{_EMAIL} {_EMAIL}"
    # Two more would pass the budget: neither goes back, nor one after them.
    assert restorer.restore_text("[EMAIL_1] [EMAIL_1]") == "[EMAIL_1] [EMAIL_1]"
    assert restorer.restore_text("[EMAIL_1]") == "[EMAIL_1]"
    assert restorer.restored and restorer.limited


def test_a_stream_without_usage_is_estimated_from_the_text_the_provider_wrote(snap) -> None:
    email = "a" * 60 + "@" + "b" * 120 + ".example.com"
    ex, placeholder = _exchange(snap, f"write to {email}", stream=True)
    ex.handle(resp_headers(200, "text/event-stream"))
    text = f"Write to {placeholder} today. "
    stream = b"".join(sse_chunk([{"index": 0, "delta": {"content": text}}])
                      for _ in range(100))
    stream += sse_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    out = ex.handle(resp_body(stream + b"data: [DONE]\n\n")).response_body.response
    assert email.encode() in out.body_mutation.body
    rec = ex.finish()
    assert rec.usage_estimated is True
    assert rec.output_tokens == estimate_tokens(100 * len(text))


def test_a_value_escaped_twice_is_counted_escaped_twice() -> None:
    # Inside JSON text held in a string (tool-call arguments) a value that needs escaping
    # is written escaped twice: counted once, it grew an answer by twice the budget.
    value = '"\\' * 1000
    once = len(json.dumps(value)) - 2 - len("[EMAIL_1]")
    restorer = Restorer(PlaceholderMap({"[EMAIL_1]": value}), budget=once * 3 // 2)
    arguments = json.dumps({"path": "[EMAIL_1]"})
    body = json.dumps({"choices": [{"message": {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "f", "arguments": arguments}}]}}]}).encode()
    out = restorer.restore_json(body)
    assert len(out or body) - len(body) <= once * 3 // 2
