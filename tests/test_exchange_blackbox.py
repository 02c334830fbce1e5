"""Regressions from black-box runs through a real stack: request headers (content encoding,
credential headers, /v1/feedback), legacy `functions`, token-id embeddings, and answers
whose headers or ends are unusual (content-length on a stream, letter case in the media
type, no media type, a body cut off)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from atp_extproc import config
from atp_extproc.envoy_api import ProcessingMode
from atp_extproc.exchange import INCOMPLETE_RESPONSE, Exchange
from atp_extproc.routing.feedback import FeedbackBook
from atp_extproc.routing.router import Router
from atp_extproc.services import Services
from atp_extproc.store.money import PriceBook
from tests.test_exchange import (
    ALICE,
    BOB,
    CHAT,
    EXAMPLE,
    assert_error,
    chat,
    chat_sse,
    forwarded,
    immediate,
    req_body,
    req_headers,
    resp_body,
    resp_headers,
    send_body,
    start,
)


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    return config.load(EXAMPLE)


def _denied_by(resp) -> str:
    status, body, _ = immediate(resp)
    assert (status, body["error"]["code"]) == (403, "policy_denied")
    return body["error"]["policy_id"]


# -- request headers -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP ", "identity, gzip"])
def test_a_compressed_request_body_is_refused_with_415(snap, encoding) -> None:
    _, resp = start(snap, extra={"content-encoding": encoding})
    assert_error(resp, 415, "unsupported_content_encoding")


@pytest.mark.parametrize("encoding", ["identity", "Identity", "", "identity, identity"])
def test_an_identity_encoding_goes_on(snap, encoding) -> None:
    _, resp = start(snap, extra={"content-encoding": encoding})
    assert resp.WhichOneof("response") == "request_headers"


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-7", "application/json; charset=UTF_7",
    "text/plain;Charset=UTF-16", 'a/b; charset="ISO-2022-JP"', "a/b; charset=cp037",
    "application/json; charset=utf-8, application/json; charset=utf-32le",
    # Their aliases: csUTF7, UCS-2 by its ISO name, EBCDIC by code page, single quotes.
    "a/b; charset=csUTF7", "a/b; charset=ISO-10646-UCS-2", "a/b; charset=IBM273",
    "a/b; charset=cp1047", "a/b; charset='utf-16'"])
def test_a_charset_that_writes_ascii_otherwise_is_refused_with_415(snap, content_type) -> None:
    _, resp = start(snap, extra={"content-type": content_type})
    assert_error(resp, 415, "unsupported_charset")


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-8", 'application/json; charset="UTF8"', "text/plain",
    # ASCII in them is ASCII; a byte above is no UTF-8 text ATP would read (refused).
    "application/json; charset=ISO-8859-1", "application/json; charset=us-ascii",
    "application/json; charset=windows-1252", "a/b; charset=ISO_8859-1", "a/b; charset=l1",
    "a/b; charset=GBK", "a/b; charset=Shift_JIS", "a/b; charset=utf_8", "a/b; charset=",
    'application/json; x="a;charset=utf-7"'])
def test_the_body_goes_on_labelled_json(snap, content_type) -> None:
    _, resp = start(snap, extra={"content-type": content_type})
    assert [(h.header.key, h.header.raw_value) for h in
            resp.request_headers.response.header_mutation.set_headers] == [
        ("content-type", b"application/json")]


def test_what_an_error_repeats_of_the_request_is_bounded(snap) -> None:
    # A 10 KB Content-Encoding (or a key sent as one) came back whole in the 415.
    _, resp = start(snap, extra={"content-encoding": "x" * 10_000})
    message = assert_error(resp, 415, "unsupported_content_encoding")["message"]
    assert len(message) < 200 and "x" * 64 + "…" in message
    ex = Exchange(snap)
    message = assert_error(ex.handle(req_headers("POST", "/v1/" + "p" * 3000)), 404,
                           "unknown_url")["message"]
    assert "/v1/" + "p" * 60 + "…)" in message
    # ... and a 20 KB model id in /v1/models/{id}, asked for or deleted.
    for method, status, code in (("GET", 404, "model_not_found"),
                                 ("DELETE", 405, "method_not_allowed")):
        ex = Exchange(snap)
        message = assert_error(ex.handle(req_headers(method, "/v1/models/" + "m" * 20_000)),
                               status, code)["message"]
        # (Past what ATP serves, which a 405 lists.)
        assert len(message.partition(": ATP serves")[0]) < 200, method


def test_an_api_key_in_x_api_key_never_reaches_a_provider(snap) -> None:
    _, first = start(snap, extra={"x-api-key": ALICE})
    assert "x-api-key" in first.request_headers.response.header_mutation.remove_headers


def test_feedback_takes_post_with_a_body_only(snap) -> None:
    ex = Exchange(snap)
    assert_error(ex.handle(req_headers("GET", "/v1/feedback")), 405, "method_not_allowed")
    ex = Exchange(snap)
    assert_error(ex.handle(req_headers("POST", "/v1/feedback", end=True)), 400,
                 "missing_body")


@pytest.mark.parametrize("score, code", [
    ("0.5", "invalid_type"), (True, "invalid_type"), (None, "invalid_type"),
    (1.5, "invalid_value")])
def test_a_score_of_the_wrong_type_is_told_from_one_out_of_range(snap, score, code) -> None:
    # A string or a boolean score was invalid_value, where request_id's wrong type is
    # invalid_type.
    router = Router()
    ex = Exchange(snap, services=Services(router, FeedbackBook(router.observe_quality),
                                          PriceBook(), None))
    ex.handle(req_headers("POST", "/v1/feedback"))
    error = assert_error(ex.handle(req_body({"request_id": "req-1", "score": score})), 400, code)
    assert error["param"] == "score"


def test_feedback_is_held_to_max_json_depth(snap) -> None:
    # A feedback body nested 201 deep got 204; the same nesting on chat is a 400.
    deep: dict = {"request_id": "req-1", "score": 0.5}
    for _ in range(200):
        deep = {"x": deep}
    ex = Exchange(snap)
    ex.handle(req_headers("POST", "/v1/feedback"))
    assert_error(ex.handle(req_body({"request_id": "req-1", "score": 0.5, "n": deep})),
                 400, "json_too_deep")


@pytest.mark.parametrize("path", [CHAT, "/v1/feedback"])
def test_an_empty_body_after_headers_that_announced_one_is_missing(snap, path) -> None:
    # A chunked body of only its last chunk, or an HTTP/2 empty DATA frame: it got
    # invalid_json ("expected a JSON object").
    ex = Exchange(snap)
    ex.handle(req_headers("POST", path))
    response = ex.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"",
                                                                       end_of_stream=True)))
    assert_error(response, 400, "missing_body")


@pytest.mark.parametrize(("body", "param"), [({"score": 1.0}, "request_id"),
                                             ({"request_id": "req-1"}, "score")])
def test_feedback_without_a_field_names_it(snap, body, param) -> None:
    ex, _ = start(snap, "/v1/feedback")
    err = assert_error(ex.handle(req_body(body)), 400, "missing_required_parameter")
    assert err["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"request_id": "req-1", "score": 1, "Score": 0}, "Score"),
    ({"Request_Id": "req-1", "score": 1}, "Request_Id")])
def test_a_feedback_field_in_another_letter_case_is_refused(snap, body, param) -> None:
    # The first was taken with score 1 (204); the second was "missing request_id".
    ex, _ = start(snap, "/v1/feedback")
    err = assert_error(ex.handle(req_body(body)), 400, "unknown_parameter")
    assert err["param"] == param


# -- legacy `functions` ----------------------------------------------------------------


def _functions(snap, key: str, names: list[str], **extra):
    body = chat("gpt-4o-mini", functions=[{"name": n, "parameters": {"type": "object"}}
                                          for n in names], **extra)
    return send_body(snap, body, key=key)[1]


def test_a_denied_tool_declared_as_a_function_is_denied(snap) -> None:
    # examples/policies/tools.yaml: tools.no_code_execution denies a "shell" tool.
    assert _denied_by(_functions(snap, ALICE, ["shell"])) == "tools.no_code_execution"


def test_a_function_outside_the_scope_is_stripped_with_function_call(snap) -> None:
    # bob may call get_weather and search_docs only; others are stripped.
    sent = json.loads(forwarded(_functions(snap, BOB, ["send_email"],
                                           function_call="auto"))[1])
    assert not {"functions", "function_call"} & set(sent)
    sent = json.loads(forwarded(_functions(snap, BOB, ["send_email", "get_weather"],
                                           function_call="auto"))[1])
    assert [f["name"] for f in sent["functions"]] == ["get_weather"]
    assert sent["function_call"] == "auto"


def test_forcing_a_stripped_function_is_refused(snap) -> None:
    resp = _functions(snap, BOB, ["send_email", "get_weather"],
                      function_call={"name": "send_email"})
    assert assert_error(resp, 403, "tool_not_allowed")["param"] == "function_call"


def test_a_legacy_function_call_in_history_is_seen_by_policies(snap) -> None:
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None,
                "function_call": {"name": "shell", "arguments": "{}"}},
               {"role": "function", "name": "shell", "content": "ok"}]
    _, resp = send_body(snap, {"model": "gpt-4o-mini", "messages": history})
    assert _denied_by(resp) == "tools.no_code_execution"


# -- token-id embeddings ---------------------------------------------------------------


# -- answers -------------------------------------------------------------------------


def _stream_exchange(snap) -> Exchange:
    ex, _ = send_body(snap, chat("fast", stream=True))
    assert ex.record.usage_injected
    return ex


def test_a_stream_with_a_content_length_loses_it_with_the_usage_chunk(snap) -> None:
    ex = _stream_exchange(snap)
    stream, _ = chat_sse(10, 20)
    resp = ex.handle(resp_headers(200, "text/event-stream",
                                  extra={"content-length": str(len(stream))}))
    removed = resp.response_headers.response.header_mutation.remove_headers
    assert "content-length" in removed
    assert resp.mode_override.response_body_mode == ProcessingMode.STREAMED


@pytest.mark.parametrize("content_type", ["Text/Event-Stream", "TEXT/EVENT-STREAM; charset=utf-8",
                                          ""])
def test_a_stream_is_read_whatever_the_case_of_its_media_type_or_none(snap,
                                                                       content_type) -> None:
    ex = _stream_exchange(snap)
    stream, usage_event = chat_sse(10, 20)
    resp = ex.handle(resp_headers(200, content_type))
    assert resp.mode_override.response_body_mode == ProcessingMode.STREAMED
    out = ex.handle(resp_body(stream)).response_body.response.body_mutation.body
    assert out == stream.replace(usage_event, b"")
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (10, 20, False)


def test_a_json_answer_is_read_whatever_the_case_of_its_media_type(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    answer = json.dumps({"choices": [], "usage": {"prompt_tokens": 100,
                                                  "completion_tokens": 200}}).encode()
    resp = ex.handle(resp_headers(200, "Application/JSON",
                                  extra={"content-length": str(len(answer))}))
    assert resp.mode_override.response_body_mode == ProcessingMode.BUFFERED
    ex.handle(resp_body(answer))
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (100, 200, False)
    assert not rec.error_code


class _Ledger:
    def __init__(self) -> None:
        self.entries: list = []

    def record(self, entry) -> None:
        self.entries.append(entry)


class _Router(Router):
    def __init__(self) -> None:
        super().__init__()
        self.observed: list[bool] = []

    def observe(self, route_name, model_name, *, ok, **kwargs) -> None:
        self.observed.append(ok)
        super().observe(route_name, model_name, ok=ok, **kwargs)


def _learning(snap, stream: bool = False) -> tuple[Exchange, _Router, _Ledger]:
    """An exchange on the learned route, its request sent, with a spy router and ledger."""
    router, ledger = _Router(), _Ledger()
    services = Services(router, FeedbackBook(router.observe_quality), PriceBook(), ledger)
    ex = Exchange(snap, services=services)
    ex.handle(req_headers("POST", CHAT, ALICE))
    ex.handle(req_body(chat("auto", stream=stream)))
    return ex, router, ledger


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_cut_off_is_recorded_incomplete_and_failed(snap, stream) -> None:
    ex, router, ledger = _learning(snap, stream)
    body = chat_sse(10, 20)[0] if stream else b'{"choices": [], "usage": {}}'
    ex.handle(resp_headers(200, "text/event-stream" if stream else "application/json"))
    ex.handle(resp_body(body[:20], end=False))   # then the upstream resets
    rec = ex.finish()
    assert rec.status == 200 and rec.error_code == INCOMPLETE_RESPONSE
    (entry,) = ledger.entries
    assert entry.ok is False
    assert router.observed == []  # whose fault it was is unknown: nothing learnt


def test_a_buffered_answer_cut_off_is_recorded_as_the_502_the_client_got(snap) -> None:
    # Envoy holds a BUFFERED answer's headers until its body has come; when the upstream
    # resets first, the client gets Envoy's 502 (measured: upstream_unavailable), and
    # the record said 200.
    ex, _, ledger = _learning(snap)
    ex.handle(resp_headers(200, extra={"content-length": "1000"}))
    rec = ex.finish()
    assert rec.status == 502 and rec.error_code == INCOMPLETE_RESPONSE
    assert ledger.entries[0].ok is False


def test_a_request_left_before_any_answer_is_recorded_incomplete(snap) -> None:
    # The client gave up while the model was still working: the provider bills it.
    ex, router, ledger = _learning(snap)
    rec = ex.finish()
    assert rec.error_code == INCOMPLETE_RESPONSE and rec.usage_estimated
    (entry,) = ledger.entries
    assert entry.ok is False and entry.input_tokens > 0
    assert router.observed == []


def test_a_refused_request_is_not_incomplete(snap) -> None:
    ex, resp = send_body(snap, chat("no-such-model"))
    assert resp.WhichOneof("response") == "immediate_response"
    assert ex.finish().error_code == "model_not_found"


def test_a_json_answer_without_a_media_type_is_read_and_restored(snap) -> None:
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    snap = dataclasses.replace(snap, routes=routes)
    ex, _ = send_body(snap, chat("fast", messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}]))
    answer = json.dumps({"choices": [{"message": {"content": "to [EMAIL_1]"}}],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
    resp = ex.handle(resp_headers(200, "", extra={"content-length": str(len(answer))}))
    assert resp.mode_override.response_body_mode == ProcessingMode.BUFFERED
    out = ex.handle(resp_body(answer)).response_body.response.body_mutation.body
    assert b"jane.doe@example.com" in out
    rec = ex.finish()
    assert rec.restored and (rec.input_tokens, rec.output_tokens) == (7, 3)


def test_a_complete_answer_teaches_the_router(snap) -> None:
    ex, router, ledger = _learning(snap)
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"choices": [], "usage": {}}'))
    assert not ex.finish().error_code
    assert [e.ok for e in ledger.entries] == [True] and router.observed == [True]


def test_a_restored_stream_is_recorded_restored(snap) -> None:
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    snap = dataclasses.replace(snap, routes=routes)
    ex, _ = send_body(snap, chat("fast", stream=True, messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}]))
    ex.handle(resp_headers(200, "text/event-stream"))
    event = (b'data: {"choices":[{"index":0,"delta":{"content":"to [EMAIL_1]"}}]}\n\n'
             b"data: [DONE]\n\n")
    out = ex.handle(resp_body(event)).response_body.response.body_mutation.body
    assert b"jane.doe@example.com" in out
    assert ex.finish().restored is True


# -- token caps ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
@pytest.mark.parametrize("value", ["8000", 8000.0, 1e4, True, [8000]])
def test_a_token_cap_must_be_an_integer(snap, key, value) -> None:
    _, resp = send_body(snap, chat("gpt-4o-mini", **{key: value}))
    assert assert_error(resp, 400, "invalid_type")["param"] == key


def test_policies_see_the_largest_token_cap(snap) -> None:
    # examples/policies/limits.yaml: limits.max_tokens denies more than 4096.
    _, resp = send_body(snap, chat("gpt-4o-mini", max_tokens=10,
                                   max_completion_tokens=8000))
    assert _denied_by(resp) == "limits.max_tokens"
    _, resp = send_body(snap, chat("gpt-4o-mini", max_tokens=None, max_completion_tokens=100))
    assert resp.WhichOneof("response") == "request_body"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", CHAT, b"POST"), ("PUT", "/v1/feedback", b"POST"), ("POST", "/v1/models", b"GET, HEAD")])
def test_a_405_says_which_method_is_allowed(snap, method, path, allow) -> None:
    resp = Exchange(snap).handle(req_headers(method, path))
    assert_error(resp, 405, "method_not_allowed")
    assert immediate(resp)[2]["allow"] == allow


# -- identity and what the record logs ---------------------------------------------------


def test_a_header_sent_twice_is_read_as_both_values() -> None:
    from envoy.config.core.v3 import base_pb2

    from atp_extproc.envoy_api import headers_of

    header_map = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key="x-tenant-id", raw_value=b"bob"),
        base_pb2.HeaderValue(key="x-tenant-id", raw_value=b"alice")])
    assert headers_of(header_map) == {"x-tenant-id": "bob,alice"}


def test_the_trusted_tenant_header_is_the_hops_alone(snap) -> None:
    auth = snap.auth.model_copy(update={"trusted_tenant_header": "x-tenant-id"})
    snap = dataclasses.replace(snap, auth=auth)
    _, first = start(snap, key=None, extra={"x-tenant-id": "acme"})
    assert "x-tenant-id" in first.request_headers.response.header_mutation.remove_headers
    ex = Exchange(snap)
    message = req_headers("POST", CHAT, None, extra={"x-tenant-id": "bob"})
    message.request_headers.headers.headers.add(key="x-tenant-id", raw_value=b"alice")
    assert_error(ex.handle(message), 401, "invalid_api_key")


@pytest.mark.parametrize(("path", "logged"), [
    ("/v1/jo.doe@example.com/sk-live-123", "<other>"),
    ("/v1/models/jo.doe@example.com", "/v1/models/{id}"),
    ("/v1/chat/completions?key=sk-live-123", "/v1/chat/completions")])
def test_the_record_logs_no_path_the_client_made_up(snap, path, logged) -> None:
    ex = Exchange(snap)
    ex.handle(req_headers("GET", path))
    assert ex.finish().path == logged


def test_an_answer_to_a_request_atp_never_saw_leaves_no_record(snap, caplog) -> None:
    # jwt_authn (before ATP's filter) refused the request: ATP sees only the answer, and
    # logged an exchange with no request id, method or path.
    ex = Exchange(snap)
    with caplog.at_level("INFO", logger="atp.exchange"):
        assert ex.handle(resp_headers(401, "text/plain")).HasField("response_headers")
        ex.finish()
    assert not [r for r in caplog.records if r.getMessage() == "exchange"]


def test_a_method_of_the_clients_own_making_is_not_logged(snap) -> None:
    # HTTP/2 takes any token as a method: an AWS key sent as one was logged verbatim.
    ex = Exchange(snap)
    body = assert_error(ex.handle(req_headers("AKIAZ5XQWERTYUPLKJHG", CHAT)), 405,
                        "method_not_allowed")
    assert "AKIA" not in json.dumps(body)
    assert ex.finish().method == "<other>"


@pytest.mark.parametrize("extra, hazard", [
    ({}, None),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "mcp", "server_label": "ops", "server_url": "https://mcp.test",
                 "require_approval": "never"}]}, "mcp"),
])
def test_a_request_a_copy_would_repeat_at_the_provider_is_not_mirrored(extra, hazard):
    # The challenger's copy added its turn to the client's conversation, and ran the MCP
    # server's actions a second time.
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["routes"].insert(0, {
        "name": "mirr", "match": {"paths": ["/v1/responses"]},
        "aliases": {"mirr": ["small", "large"]},
        "objective": {"champion": "small",
                      "shadow": {"mode": "mirror", "challenger": "large", "share": 1.0}}})
    snap = config.parse(yaml.safe_dump(doc), str(EXAMPLE))
    router = Router()
    ex = Exchange(snap, services=Services(router, FeedbackBook(router.observe_quality),
                                          PriceBook(), None))
    ex.handle(req_headers("POST", "/v1/responses", ALICE))
    headers, _, _ = forwarded(ex.handle(req_body({"model": "mirr", "input": "hi", **extra})))
    assert ("x-atp-shadow-cluster" in headers) == (hazard is None)
    assert ex.record.mirror_to == ("large" if hazard is None else "")
    if hazard is not None:
        assert f"large:mirror_{hazard}" in ex.record.routing_excluded
