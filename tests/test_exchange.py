"""Unit tests for atp_extproc.exchange: the pipeline driven with real ext_proc protos."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from atp_extproc import config, llm_api
from atp_extproc.envoy_api import ProcessingMode, read_processing_request
from atp_extproc.exchange import _PART_CHARS, CLUSTER_HEADER, Exchange
from atp_extproc.llm_api import estimate_tokens
from atp_extproc.redact.redactor import Redactor
from atp_extproc.routing.estimates import Priors
from atp_extproc.routing.feedback import FeedbackBook
from atp_extproc.routing.router import Router
from atp_extproc.services import Services
from atp_extproc.store.money import PICO_PER_USD, PriceBook, PriceSnapshot

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "atp.yaml"
ALICE = "sk-demo-alice"
BOB = "sk-demo-bob"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def snap() -> config.Snapshot:
    return config.load(EXAMPLE)


# -- building requests -------------------------------------------------------------


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def req_headers(method: str, path: str, key: str | None = ALICE,
                extra: dict[str, str] | None = None, end: bool = False,
                jwt_claims: dict | None = None) -> ep.ProcessingRequest:
    headers = {":method": method, ":path": path, ":authority": "atp.local",
               ":scheme": "http", "content-type": "application/json",
               "x-request-id": "req-123"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    headers.update(extra or {})
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map(headers), end_of_stream=end))
    if jwt_claims is not None:
        meta = struct_pb2.Struct()
        meta.update({"jwt_payload": jwt_claims})
        msg.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(meta)
    return msg


def req_body(body: bytes | dict, end: bool = True) -> ep.ProcessingRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=end))


def resp_headers(status: int = 200, content_type: str = "application/json",
                 end: bool = False, extra: dict[str, str] | None = None
                 ) -> ep.ProcessingRequest:
    headers = {":status": str(status), "content-type": content_type, **(extra or {})}
    return ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(headers=header_map(headers), end_of_stream=end))


def resp_body(body: bytes, end: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end))


# -- reading responses -------------------------------------------------------------


def set_headers(mutation: ep.HeaderMutation) -> dict[str, bytes]:
    out = {}
    for option in mutation.set_headers:
        assert option.header.value == "", "header values must travel in raw_value"
        out[option.header.key] = option.header.raw_value
    return out


def immediate(resp: ep.ProcessingResponse) -> tuple[int, dict, dict[str, bytes]]:
    assert resp.WhichOneof("response") == "immediate_response", resp
    imm = resp.immediate_response
    return imm.status.code, json.loads(imm.body), set_headers(imm.headers)


def assert_error(resp: ep.ProcessingResponse, status: int, code: str) -> dict:
    got_status, body, headers = immediate(resp)
    assert (got_status, body["error"]["code"]) == (status, code)
    # A refusal a policy decided names it too.
    assert set(body["error"]) - {"policy_id"} == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert headers["content-type"] == b"application/json"
    assert resp.immediate_response.details == f"atp_{code}"
    return body["error"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def start(snap: config.Snapshot, path: str = CHAT, key: str | None = ALICE,
          **kwargs) -> tuple[Exchange, ep.ProcessingResponse]:
    ex = Exchange(snap)
    return ex, ex.handle(req_headers("POST", path, key, **kwargs))


def send_body(snap: config.Snapshot, body: bytes | dict, path: str = CHAT,
              key: str | None = ALICE, **kwargs) -> tuple[Exchange, ep.ProcessingResponse]:
    ex, first = start(snap, path, key, **kwargs)
    assert first.WhichOneof("response") == "request_headers", first
    return ex, ex.handle(req_body(body))


def usd(model: config.Model, input_tokens: int, output_tokens: int) -> float:
    return PriceSnapshot.from_model(model).cost_pico(input_tokens, output_tokens) / PICO_PER_USD


def chat(model: str | None = "gpt-4o", **extra) -> dict:
    doc = {"messages": [{"role": "user", "content": "Say hi"}], **extra}
    if model is not None:
        doc = {"model": model, **doc}
    return doc


def forwarded(resp: ep.ProcessingResponse) -> tuple[dict[str, bytes], bytes | None,
                                                     ep.CommonResponse]:
    assert resp.WhichOneof("response") == "request_body", resp
    common = resp.request_body.response
    body = common.body_mutation.body if common.HasField("body_mutation") else None
    return set_headers(common.header_mutation), body, common


# -- request phase -----------------------------------------------------------------


def test_a_message_whose_metadata_protobuf_cannot_read_is_refused_and_recorded(snap):
    # Claims 40 levels deep: gRPC's reader raised, and the stream ended in a 500 blaming
    # ATP, with no record. Read without its metadata, the request is refused with a valid
    # API key beside it too, as the identity may be in what was not read.
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    data = req_headers("POST", CHAT, jwt_claims={"tenant": "bob", "d": deep}
                       ).SerializeToString()
    with pytest.raises(DecodeError):
        ep.ProcessingRequest.FromString(data)
    ex = Exchange(snap)
    assert_error(ex.handle(read_processing_request(data)), 400, "metadata_unreadable")
    rec = ex.finish()
    assert (rec.request_id, rec.path, rec.error_code) == ("req-123", CHAT, "metadata_unreadable")


def test_chat_routed_to_cluster_with_model_rewritten(snap) -> None:
    raw = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "h\xc3\xa9llo"}],'
           b' "temperature": 0.2}')
    ex, first = start(snap)
    assert first.WhichOneof("response") == "request_headers"
    assert "authorization" in first.request_headers.response.header_mutation.remove_headers
    resp = ex.handle(req_body(raw))
    headers, body, common = forwarded(resp)
    assert headers[CLUSTER_HEADER] == b"demo_b"
    assert body == raw.replace(b'"gpt-4o"', b'"demo-large-2026"')
    assert headers["content-length"] == str(len(body)).encode()
    assert common.clear_route_cache is True
    assert json.loads(body)["model"] == "demo-large-2026"
    rec = ex.record
    assert (rec.tenant, rec.auth_method, rec.key_id) == ("alice", "api_key", "alice-demo")
    assert (rec.route, rec.alias, rec.model) == ("chat-premium", "gpt-4o", "large")
    assert (rec.cluster, rec.upstream_model) == ("demo_b", "demo-large-2026")
    assert rec.operation == "chat"
    assert rec.request_bytes == len(raw)
    assert rec.request_id == "req-123"
    assert rec.config_version == snap.version
    assert rec.usage_injected is False


def test_cluster_header_is_overwrite(snap) -> None:
    _, resp = send_body(snap, chat("gpt-4o-mini"))
    option = resp.request_body.response.header_mutation.set_headers[0]
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.mark.parametrize(
    "key, model, cluster, upstream, route",
    [
        (ALICE, "gpt-4o-mini", "demo_a", "demo-small-2026", "chat"),
        (ALICE, "fast", "demo_a", "demo-small-2026", "chat"),
        (BOB, "gpt-4o-mini", "demo_a", "demo-small-2026", "chat"),
        (BOB, "fast", "demo_a", "demo-small-2026", "chat"),
    ],
)
def test_aliases_route(snap, key, model, cluster, upstream, route) -> None:
    ex, resp = send_body(snap, chat(model), key=key)
    headers, body, _ = forwarded(resp)
    assert headers[CLUSTER_HEADER] == cluster.encode()
    assert json.loads(body)["model"] == upstream
    assert ex.record.route == route


def test_default_alias_when_model_absent(snap) -> None:
    ex, resp = send_body(snap, chat(model=None))
    headers, body, _ = forwarded(resp)
    assert headers[CLUSTER_HEADER] == b"demo_a"
    assert json.loads(body) == {"model": "demo-small-2026",
                                "messages": [{"role": "user", "content": "Say hi"}]}
    assert headers["content-length"] == str(len(body)).encode()
    assert (ex.record.alias, ex.record.model) == ("gpt-4o-mini", "small")


TENANT_ROUTE_YAML = """
auth: {anonymous_tenant: anon}
models:
  - {name: internal, cluster: c1, upstream_model: in, price: {input_per_1k: 1, output_per_1k: 2}}
  - {name: external, cluster: c2, upstream_model: ex, price: {input_per_1k: 1, output_per_1k: 2}}
routes:
  - name: anon-internal
    match: {tenants: [anon]}
    aliases: {chat: [internal]}
  - name: general
    aliases: {chat: [external]}
    default: chat
"""


@pytest.mark.parametrize("model", ["chat", None])
def test_the_default_alias_goes_where_naming_it_goes(model: str | None) -> None:
    # Leaving `model` out took the first route with a default, passing over the tenant's
    # own route for that alias: an internal-only tenant's request went to an external model.
    snap = config.parse(TENANT_ROUTE_YAML, "tenant.yaml")
    ex, resp = send_body(snap, chat(model=model), key=None)
    assert forwarded(resp)[0][CLUSTER_HEADER] == b"c1"
    assert (ex.record.route, ex.record.alias, ex.record.model) == \
        ("anon-internal", "chat", "internal")


@pytest.mark.parametrize("path, body", [
    (CHAT, chat("gpt-4o-mini")),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"}),
])
def test_a_top_level_field_atp_does_not_know_is_read(snap, path, body) -> None:
    # vLLM's chat `documents` go into the prompt: they went out unread, past redaction
    # and every policy on data classes. Settings (an output schema) are not read.
    schema = {"type": "json_schema", "json_schema": {"name": "card", "schema": {
        "description": "like ops@example.com"}}}
    body = {**body, "documents": [{"title": "crm", "text": "mail victim@corp-mail.com"}],
            "response_format": schema}
    ex, resp = send_body(snap, body, path=path)
    sent = json.loads(forwarded(resp)[1])
    assert sent["documents"] == [{"title": "crm", "text": "mail [EMAIL_1]"}]
    assert sent["response_format"] == schema
    assert ex.record.data_classes == {"email": 1}


def test_a_top_level_field_name_and_text_in_a_number_setting_are_read(snap) -> None:
    # A field named by an address, and an address or key given as a setting that holds a
    # number, went out unread (past the policies on personal data and credentials).
    body = {**chat("gpt-4o-mini"), "victim@corp-mail.com": "vip", "temperature": "a@b.co",
            "stream_options": {"note": "c@d.co"}, "top_p": 0.5}
    ex, resp = send_body(snap, body)
    sent = json.loads(forwarded(resp)[1])
    assert "victim@corp-mail.com" not in sent
    assert {k: sent[k] for k in sent if k.startswith("[EMAIL")} == {"[EMAIL_1]": "vip"}
    assert sent["temperature"].startswith("[EMAIL_") and sent["top_p"] == 0.5
    assert sent["stream_options"]["note"].startswith("[EMAIL_")
    assert ex.record.data_classes == {"email": 3}


@pytest.mark.parametrize("path, body", [
    (CHAT, {**chat("gpt-4o-mini"), "documents": "data:mail a@b.co;base64,"}),
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "file_data": "mail a@b.co"}]}]}),
    (CHAT, {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi", "detail": "mail a@b.co"}]}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": [{"type": "message", "role": "user",
                                                          "content": "hi",
                                                          "encrypted_content": "a@b.co"}]}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "conversation": "a@b.co",
                       "text": {"verbosity": "low", "note": "a@b.co"}}),
])
def test_text_where_binary_data_ids_or_words_belong_is_read(snap, path, body) -> None:
    # Any "data:...;base64," string passed for binary, and these fields were skipped
    # whatever they held: the address reached the provider as sent.
    ex, resp = send_body(snap, body, path=path)
    assert b"a@b.co" not in forwarded(resp)[1]
    assert ex.record.data_classes == {"email": json.dumps(body).count("a@b.co")}


def _with_a_key_shaped_run(alphabet: str = "+/") -> str:
    # Valid base64 of 3,000 bytes with a run that reads as a Google API key.
    import base64
    import random

    data = bytes(random.Random(7).randrange(256) for _ in range(3000))
    core = base64.b64encode(data, altchars=alphabet.encode()).decode()
    return core[:1000] + alphabet[0] + "AIzaSyB1c2d3e4f5g6h7i8j9k0lmnopqrstuvw" + core[1039:]


@pytest.mark.parametrize("data", [
    "data:application/pdf;name=a%20b.pdf;base64," + _with_a_key_shaped_run(),
    'data:application/pdf;name="a.pdf";base64,' + _with_a_key_shaped_run(),
    "data:application/pdf;base64," + "\n".join(
        _with_a_key_shaped_run()[i:i + 76] for i in range(0, 4000, 76)),  # MIME-wrapped
    "data:image/png;base64," + _with_a_key_shaped_run("-_"),               # base64url
    _with_a_key_shaped_run() + "\n",
])
def test_image_and_file_data_in_any_base64_form_is_left_as_it_is(snap, data) -> None:
    # Taken for text, a key-shaped run in a file's bytes was "redacted" (the file no
    # longer decoded) or refused as a credential.
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "x.pdf", "file_data": data}]}]}
    ex, resp = send_body(snap, body, path="/v1/responses")
    sent = json.loads(forwarded(resp)[1])["input"][0]["content"]
    assert sent[0]["file_data"] == data
    assert not ex.record.data_classes


@pytest.mark.parametrize("item", [
    {"type": "image_generation_call", "id": "ig", "status": "completed",
     "result": "card 4111 1111 1111 1111"},
    {"type": "shell_call_output", "call_id": "c", "output": [{"stdout": "\n".join(
        ["sk-proj-" + "Ab3dEf6hIj" * 16] * 2) + "\n"}]},
    {"role": "user", "content": [{"type": "input_file", "filename": "a.txt",
                                  "file_data": "data:text/plain;base64,4111111111111111"}]},
    {"role": "user", "content": [{"type": "input_file", "filename": "a.pdf",
                                  "file_data": "https://files.example/u/a@b.co/r.pdf"}]},
])
def test_text_shaped_like_data_is_read(snap, item) -> None:
    # Each passed for binary data or a URL where neither belongs: a generated image's
    # result, keys one to a line, a card as a data: URL's payload, a URL as a file's data.
    ex, resp = send_body(snap, {"model": "gpt-4o-mini", "input": [item]},
                         path="/v1/responses")
    if resp.WhichOneof("response") == "immediate_response":  # refused as a credential
        assert ex.record.data_classes
        return
    sent = forwarded(resp)[1]
    assert b"4111 1111" not in sent and b"sk-proj" not in sent and b"a@b.co" not in sent


def test_text_in_a_setting_of_fixed_words_is_read(snap) -> None:
    # service_tier, reasoning.summary and the like went out unread whatever they held.
    body = {**chat("gpt-4o-mini"), "service_tier": "a@b.co", "reasoning_effort": "low",
            "include": ["reasoning.encrypted_content"]}
    sent = json.loads(forwarded(send_body(snap, body)[1])[1])
    assert sent["service_tier"] == "[EMAIL_1]" and sent["reasoning_effort"] == "low"
    assert sent["include"] == ["reasoning.encrypted_content"]


def test_text_in_stream_options_stays_redacted_where_usage_is_injected(snap) -> None:
    # The injected stream_options were built from the body as sent: the note went out.
    body = {**chat("gpt-4o-mini", stream=True), "stream_options": {"note": "a@b.co"}}
    sent = json.loads(forwarded(send_body(snap, body)[1])[1])
    assert sent["stream_options"] == {"note": "[EMAIL_1]", "include_usage": True}


def test_two_field_names_redacted_to_one_are_refused(snap) -> None:
    # One value spelt two ways: the second field silently replaced the first.
    body = {**chat("gpt-4o-mini"), "alice@example.com": {"role": "admin"},
            "Alice@Example.com": {"role": "guest"}}
    assert_error(send_body(snap, body)[1], 400, "sensitive_data_refused")


def test_a_field_name_is_redacted_past_a_field_named_as_a_placeholder(snap) -> None:
    body = {**chat("gpt-4o-mini"), "victim@corp-mail.com": 1, "[EMAIL_1]": 2}
    sent = json.loads(forwarded(send_body(snap, body)[1])[1])
    assert (sent["[EMAIL_1]"], sent["[EMAIL_2]"]) == (2, 1)


def test_a_placeholder_in_a_tool_description_is_not_given_to_a_value(snap) -> None:
    body = {**chat("gpt-4o-mini"), "tools": [{"type": "function", "function": {
        "name": "send", "description": "Sign as [EMAIL_1]"}}]}
    body["messages"][0]["content"] = "I am bob@example.com"
    sent = json.loads(forwarded(send_body(snap, body)[1])[1])
    assert sent["messages"][0]["content"] == "I am [EMAIL_2]"


def test_embeddings_default_and_no_stream_options(snap) -> None:
    ex, resp = send_body(snap, {"input": "hello", "stream": False}, path="/v1/embeddings",
                         key=BOB)
    headers, body, _ = forwarded(resp)
    assert headers[CLUSTER_HEADER] == b"demo_a"
    assert json.loads(body) == {"model": "demo-embed-2026", "input": "hello", "stream": False}
    assert ex.record.usage_injected is False


def test_policy_deny_is_a_403_naming_the_policy(snap) -> None:
    # examples/policies/limits.yaml: limits.embeddings_no_stream
    ex, resp = send_body(snap, {"input": "hello", "stream": True}, path="/v1/embeddings",
                         key=BOB)
    assert resp.immediate_response.status.code == 403
    error = json.loads(resp.immediate_response.body)["error"]
    assert error["policy_id"] == "limits.embeddings_no_stream"
    assert error["code"] == "policy_denied" and error["type"] == "permission_error"
    assert ex.record.policy_denied == "limits.embeddings_no_stream"


def test_spoofed_atp_headers_removed_and_never_used(snap) -> None:
    ex = Exchange(snap)
    first = ex.handle(req_headers("POST", CHAT, BOB, extra={
        "x-atp-cluster": "demo_b", "x-atp-anything": "1", "api-key": BOB}))
    removed = list(first.request_headers.response.header_mutation.remove_headers)
    assert {"x-atp-cluster", "x-atp-anything", "authorization", "api-key"} <= set(removed)
    assert "content-type" not in removed
    headers, _, _ = forwarded(ex.handle(req_body(chat("gpt-4o-mini"))))
    assert headers[CLUSTER_HEADER] == b"demo_a"
    assert ex.record.cluster == "demo_a"


def test_credentials_removed_even_without_authorization_header(snap) -> None:
    ex = Exchange(snap)
    first = ex.handle(req_headers("POST", CHAT, None, extra={"api-key": ALICE}))
    removed = first.request_headers.response.header_mutation.remove_headers
    assert "api-key" in removed and "authorization" in removed
    assert ex.record.tenant == "alice"


def test_request_headers_response_routes_nothing_and_keeps_the_mode(snap) -> None:
    # Routing waits for the body; the headers answer only labels the body JSON.
    _, first = start(snap)
    assert [h.header.key for h in first.request_headers.response.header_mutation
            .set_headers] == ["content-type"]
    assert not first.request_headers.response.clear_route_cache
    assert not first.HasField("mode_override")


def test_query_string_is_ignored_for_routing(snap) -> None:
    ex, resp = send_body(snap, chat("gpt-4o-mini"), path=CHAT + "?api-version=1")
    assert forwarded(resp)[0][CLUSTER_HEADER] == b"demo_a"
    assert ex.record.path == CHAT


@pytest.mark.parametrize("request_id, recorded",
                         [("abc-1.2:3_4", "abc-1.2:3_4"), ("bad id", ""), ("x\ny", ""),
                          ("x" * 129, "")])
def test_request_id_recorded_only_when_safe(snap, request_id, recorded) -> None:
    ex, _ = start(snap, extra={"x-request-id": request_id})
    assert ex.record.request_id == recorded


def test_jwt_tenant_from_metadata(snap) -> None:
    ex, resp = send_body(snap, chat("gpt-4o"), key=None, jwt_claims={"tenant": "alice"})
    assert forwarded(resp)[0][CLUSTER_HEADER] == b"demo_b"
    assert (ex.record.tenant, ex.record.auth_method) == ("alice", "jwt")


def test_jwt_tenant_wins_over_api_key(snap) -> None:
    ex, resp = send_body(snap, chat("gpt-4o"), key=ALICE, jwt_claims={"tenant": "bob"})
    assert_error(resp, 404, "model_not_found")
    assert ex.record.tenant == "bob"


# -- /v1/models --------------------------------------------------------------------


def models_list(snap, key: str) -> list[str]:
    ex = Exchange(snap)
    resp = ex.handle(req_headers("GET", "/v1/models", key, end=True))
    status, body, headers = immediate(resp)
    assert status == 200
    assert headers["content-type"] == b"application/json"
    assert body["object"] == "list"
    assert all(e["object"] == "model" and e["owned_by"] == "atp" for e in body["data"])
    assert ex.record.status == 200
    return [e["id"] for e in body["data"]]


def test_models_list_per_tenant(snap) -> None:
    alice = models_list(snap, ALICE)
    bob = models_list(snap, BOB)
    assert "gpt-4o" in alice
    assert "gpt-4o" not in bob
    assert alice == ["text-embedding-3-small", "gpt-4o", "auto", "gpt-4o-mini", "fast"]
    assert bob == ["text-embedding-3-small", "auto", "gpt-4o-mini", "fast"]
    assert not {"small", "large", "embed"} & set(alice)  # model names stay hidden


def test_models_list_with_query(snap) -> None:
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models?limit=5", ALICE, end=True))
    assert immediate(resp)[0] == 200


def test_model_retrieve(snap) -> None:
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models/gpt-4o", ALICE, end=True))
    status, body, _ = immediate(resp)
    assert status == 200
    assert body == {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "atp"}
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models/gpt-4o", BOB, end=True))
    assert_error(resp, 404, "model_not_found")
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models/large", ALICE, end=True))
    assert_error(resp, 404, "model_not_found")
    # Clients percent-encode the id as a path segment (openai-python: org/model).
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models/gpt%2D4o", ALICE, end=True))
    assert immediate(resp)[1]["id"] == "gpt-4o"


def test_models_needs_auth(snap) -> None:
    resp = Exchange(snap).handle(req_headers("GET", "/v1/models", None, end=True))
    assert_error(resp, 401, "invalid_api_key")


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
def test_models_wrong_method(snap, method) -> None:
    ex = Exchange(snap)
    resp = ex.handle(req_headers(method, "/v1/models", ALICE))
    assert_error(resp, 405, "method_not_allowed")
    assert ex.record.status == 405


# -- refusals ----------------------------------------------------------------------


def test_unknown_model_is_404_with_openai_error(snap) -> None:
    ex, resp = send_body(snap, chat("gpt-5-ultra"))
    err = assert_error(resp, 404, "model_not_found")
    assert err["param"] == "model"
    assert err["type"] == "invalid_request_error"
    assert "gpt-5-ultra" in err["message"]
    assert ex.record.status == 404 and ex.record.error_code == "model_not_found"


def test_premium_alias_refused_for_bob(snap) -> None:
    _, resp = send_body(snap, chat("gpt-4o"), key=BOB)
    assert_error(resp, 404, "model_not_found")


def test_model_name_is_not_an_alias(snap) -> None:
    _, resp = send_body(snap, chat("large"))
    assert_error(resp, 404, "model_not_found")


def test_an_alias_of_another_endpoint_is_not_said_to_be_unknown(snap) -> None:
    # /v1/models lists it: "does not exist" sent its users looking for a typo.
    _, resp = send_body(snap, chat("text-embedding-3-small"))
    err = assert_error(resp, 404, "model_not_found")
    assert "is not served on /v1/chat/completions, only on /v1/embeddings" in err["message"]


@pytest.mark.parametrize("background", [True, "true", 1])
def test_a_background_response_is_refused(snap, background) -> None:
    # The provider queued it, to be fetched by GET /v1/responses/{id}, which ATP does not
    # serve: an answer no one could collect, cancel or price.
    _, resp = send_body(snap, {"model": "gpt-4o", "input": "hi", "background": background},
                        path="/v1/responses")
    assert assert_error(resp, 400, "unsupported_parameter")["param"] == "background"
    _, resp = send_body(snap, {"model": "gpt-4o", "input": "hi", "background": False},
                        path="/v1/responses")
    assert resp.WhichOneof("response") == "request_body"


def test_an_unserved_openai_path_says_what_atp_serves(snap) -> None:
    for method, path, status in (("GET", "/v1/chat/completions/chatcmpl-1", 404),
                                 ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models", 405)):
        ex = Exchange(snap)
        err = assert_error(ex.handle(req_headers(method, path)), status,
                           "unknown_url" if status == 404 else "method_not_allowed")
        assert "ATP serves POST /v1/chat/completions" in err["message"]
        assert "use POST" not in err["message"]


def test_alias_of_another_path_is_404(snap) -> None:
    _, resp = send_body(snap, {"model": "gpt-4o-mini", "input": "x"}, path="/v1/embeddings")
    assert_error(resp, 404, "model_not_found")


def test_body_over_limit_is_413(snap) -> None:
    limit = snap.server.max_body_bytes
    filler = "x" * (limit + 1)
    ex, resp = send_body(snap, json.dumps(chat(content=filler)).encode())
    assert_error(resp, 413, "request_too_large")
    assert ex.record.status == 413
    assert ex.record.request_bytes > limit


SMALL_LIMIT_YAML = """
server: {max_body_bytes: 1024, max_json_depth: 4}
auth: {anonymous_tenant: anon}
models:
  - {name: m, cluster: c1, upstream_model: up, price: {input_per_1k: 1, output_per_1k: 2}}
routes:
  - name: r
    aliases: {a: [m]}
"""


REDACT_POLICY_YAML = SMALL_LIMIT_YAML.replace("max_json_depth: 4", "max_json_depth: 64") \
    .replace("max_body_bytes: 1024", "max_body_bytes: 4194304") + """
redaction: {redaction}
policies:
  - id: pii.redact_email
    owner: sec@example.com
    effect: redact
    data_classes: [email]
    message: e-mail goes out masked
    expression: subject.tenant == 'anon'
"""


def test_a_redaction_a_policy_requires_and_cannot_get_is_refused() -> None:
    # The scan gives up on a body of zero-width characters; on_incomplete: allow sent
    # the e-mail a policy wants masked, logged as redacted.
    snap = config.parse(REDACT_POLICY_YAML.replace("{redaction}", "{on_incomplete: allow}"),
                        "redact.yaml")
    body = chat("a", messages=[{"role": "user", "content": "a\u200b" * 200_000},
                               {"role": "user", "content": "mail jane.doe@example.com"}])
    ex, resp = send_body(snap, body, key=None)
    err = assert_error(resp, 403, "redaction_required")
    assert err["message"] == ("Policy requires redaction of email, but the scan of this "
                              "request stopped short of its end (policy pii.redact_email)")
    assert err["policy_id"] == "pii.redact_email"  # as other policy refusals name it
    # Enforcing everything refuses it too: a rollout's would-deny count must include it.
    assert (ex.record.policy_denied, ex.record.policy_would_deny) == (
        "pii.redact_email", "pii.redact_email")
    # In a dry run the request goes on, and the record says what enforcing would do
    # (it said nothing: dry runs under-counted the refusals enforcing makes).
    dry = config.parse(REDACT_POLICY_YAML.replace("{redaction}", "{on_incomplete: allow}")
                       .replace("    effect: redact\n", "    effect: redact\n    mode: dry_run\n"),
                       "redact.yaml")
    ex, resp = send_body(dry, body, key=None)
    assert resp.WhichOneof("response") == "request_body"
    assert (ex.record.policy_denied, ex.record.policy_would_deny) == (
        None, "pii.redact_email")


def test_a_redact_policy_with_redaction_off_is_refused_at_load() -> None:
    # Loaded, it refused every request it matched: an outage no dry run showed.
    with pytest.raises(config.ConfigError) as info:
        config.parse(REDACT_POLICY_YAML.replace("{redaction}", "{enabled: false}"),
                     "redact.yaml")
    assert info.value.lines == [12]
    assert info.value.problems == [("pii.redact_email", (
        "requires redacting 'email', but redaction is off: every request it matches "
        "would be refused (turn redaction on, or remove the policy)"))]


def test_body_at_limit_passes_and_one_over_is_413() -> None:
    snap = config.parse(SMALL_LIMIT_YAML, "small.yaml")
    base = json.dumps({"model": "a", "messages": [{"role": "user", "content": ""}]})
    pad = 1024 - len(base)
    at = base.replace('"content": ""', '"content": "' + "x" * pad + '"').encode()
    assert len(at) == 1024
    _, resp = send_body(snap, at, key=None)
    assert forwarded(resp)[0][CLUSTER_HEADER] == b"c1"
    over = at.replace(b'"x', b'"xx', 1)
    assert len(over) == 1025
    _, resp = send_body(snap, over, key=None)
    assert_error(resp, 413, "request_too_large")


def test_depth_limit_from_config() -> None:
    snap = config.parse(SMALL_LIMIT_YAML, "small.yaml")
    ok = {"model": "a", "messages": [{"role": "user", "content": ["text"]}]}
    _, resp = send_body(snap, ok, key=None)  # object > list > object > list: depth 4
    forwarded(resp)
    deep = {"model": "a", "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    _, resp = send_body(snap, deep, key=None)  # depth 5
    assert_error(resp, 400, "json_too_deep")


def test_missing_model_without_default() -> None:
    snap = config.parse(SMALL_LIMIT_YAML, "small.yaml")
    _, resp = send_body(snap, {"messages": [{"role": "user", "content": "x"}]}, key=None)
    err = assert_error(resp, 400, "missing_required_parameter")
    assert err["param"] == "model"


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "missing_body"),
        (b"\xff\xfe{}", 400, "invalid_json"),
        (b'{"model":"gpt-4o","model":"fast","messages":[]}', 400, "duplicate_key"),
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":"x","role":"system"}]}',
         400, "duplicate_key"),
        (b"[1,2,3]", 400, "invalid_body"),
        (b'"hello"', 400, "invalid_body"),
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"t":NaN}', 400,
         "invalid_json"),
        (b'{"model":"gpt-4o","messages":[]}x', 400, "invalid_json"),
        (b'{"model":"gpt-4o","messages":' + b"[" * 100_000, 400, "json_too_deep"),
        (b'{"model":"gpt-4o"}', 400, "missing_required_parameter"),
        (b'{"model":"gpt-4o","messages":[]}', 400, "invalid_type"),
        (b'{"model":"gpt 4o","messages":[{"role":"user","content":"x"}]}', 400,
         "invalid_model"),
        (b'{"model":"gpt-4o\\r\\nx-atp-cluster: demo_b","messages":[{"role":"user"}]}', 400,
         "invalid_model"),
        (b'{"model":42,"messages":[{"role":"user","content":"x"}]}', 400, "invalid_type"),
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"stream":"yes"}',
         400, "invalid_type"),
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"stream":true,'
         b'"stream_options":"on"}', 400, "invalid_type"),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else str(v),
)
def test_bad_bodies(snap, body: bytes, status: int, code: str) -> None:
    ex, resp = send_body(snap, body)
    assert_error(resp, status, code)
    assert ex.record.status == status
    assert ex.record.error_code == code
    assert ex.record.cluster == ""


@pytest.mark.parametrize(
    "method, path, key, end, status, code",
    [
        ("POST", CHAT, None, False, 401, "invalid_api_key"),
        ("POST", CHAT, "sk-nope", False, 401, "invalid_api_key"),
        ("POST", "/v1/images/generations", ALICE, False, 404, "unknown_url"),
        ("POST", "/v2/chat/completions", ALICE, False, 404, "unknown_url"),
        ("POST", "/v1/chat/completions/", ALICE, False, 404, "unknown_url"),
        ("GET", CHAT, ALICE, True, 405, "method_not_allowed"),
        ("PUT", "/v1/embeddings", ALICE, False, 405, "method_not_allowed"),
        ("POST", CHAT, ALICE, True, 400, "missing_body"),
    ],
)
def test_bad_request_headers(snap, method, path, key, end, status, code) -> None:
    ex = Exchange(snap)
    resp = ex.handle(req_headers(method, path, key, end=end))
    assert_error(resp, status, code)
    assert ex.record.status == status


@pytest.mark.parametrize("method, path, message", [
    ("CONNECT", "", "Invalid URL (CONNECT): ATP serves"),
    ("post", CHAT, "Method 'post' (methods are case-sensitive) is not allowed"),
    ("BREW", CHAT, "Method <other> is not allowed"),
])
def test_an_odd_method_or_target_is_named_plainly(snap, method, path, message) -> None:
    # "Invalid URL (CONNECT ): ..." and "Method <other>" for HTTP/2's lowercase post.
    resp = Exchange(snap).handle(req_headers(method, path, ALICE))
    assert assert_error(resp, 404 if not path else 405,
                        "unknown_url" if not path else "method_not_allowed")[
        "message"].startswith(message)


def test_auth_checked_before_path(snap) -> None:
    resp = Exchange(snap).handle(req_headers("POST", "/nowhere", None))
    assert_error(resp, 401, "invalid_api_key")


def test_partial_request_body_is_500(snap) -> None:
    ex, _ = start(snap)
    resp = ex.handle(req_body(chat("gpt-4o"), end=False))
    err = assert_error(resp, 500, "atp_partial_body")
    assert err["type"] == "server_error"


def test_a_client_that_leaves_before_its_body_ends_is_recorded_so(snap) -> None:
    ex, _ = start(snap)
    rec = ex.finish()
    assert (rec.status, rec.error_code, rec.operation) == (0, "request_incomplete", "chat")


@pytest.mark.parametrize("status", [408, 400])
def test_envoys_answer_to_a_body_that_never_came_whole_is_recorded_so(snap, status) -> None:
    # A body that stalled (Envoy's 408) or a bad chunk (its 400): the record said
    # `error_code: ""`, and a time to first byte counted from the request's headers.
    ex, _ = start(snap)
    ex.handle(resp_headers(status, "text/plain"))
    rec = ex.finish()
    assert (rec.status, rec.error_code, rec.ttfb_ms) == (status, "request_incomplete", None)


def test_a_buffered_body_followed_by_trailers_is_whole(snap) -> None:
    """Envoy says it buffers (protocol_config): a body without end_of_stream is whole."""
    ex = Exchange(snap)
    first = req_headers("POST", CHAT)
    first.protocol_config.request_body_mode = ProcessingMode.BUFFERED
    ex.handle(first)
    headers, _, _ = forwarded(ex.handle(req_body(chat("gpt-4o"), end=False)))
    assert headers["x-atp-cluster"]


def test_a_body_without_its_headers_fails_closed(snap) -> None:
    # What Envoy sends with request_header_mode: SKIP.
    assert_error(Exchange(snap).handle(req_body(chat("gpt-4o"))), 500, "atp_unexpected_phase")


def test_empty_processing_request_fails_closed(snap) -> None:
    ex = Exchange(snap)
    err = assert_error(ex.handle(ep.ProcessingRequest()), 500, "atp_unexpected_phase")
    assert err["type"] == "server_error"


def test_request_trailers_never_carry_a_credential_on(snap) -> None:
    ex, _ = send_body(snap, chat("gpt-4o"))
    trailers = ep.HttpTrailers(trailers=header_map(
        {"authorization": f"Bearer {ALICE}", "x-atp-cluster": "demo_b", "x-checksum": "1"}))
    resp = ex.handle(ep.ProcessingRequest(request_trailers=trailers))
    removed = set(resp.request_trailers.header_mutation.remove_headers)
    assert {"authorization", "api-key", "x-api-key", "x-atp-cluster"} <= removed
    assert "x-checksum" not in removed


def test_trailers_are_acknowledged(snap) -> None:
    ex = Exchange(snap)
    resp = ex.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    assert resp.WhichOneof("response") == "request_trailers"
    resp = ex.handle(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    assert resp.WhichOneof("response") == "response_trailers"


def test_refused_request_has_no_usage(snap) -> None:
    ex, _ = send_body(snap, chat("nope"))
    rec = ex.finish()
    assert rec.status == 404
    assert rec.cost_usd is None and rec.input_tokens is None


# -- response phase: streaming -----------------------------------------------------


def sse_chunk(choices, usage=None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
           "model": "demo-small-2026", "choices": choices, "usage": usage}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_sse(prompt_tokens: int, completion_tokens: int,
             with_usage: bool = True) -> tuple[bytes, bytes]:
    content = (sse_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
               + sse_chunk([{"index": 0, "delta": {"content": "Hello"}}])
               + sse_chunk([{"index": 0, "delta": {"content": " there!"}}])
               + sse_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    usage_event = sse_chunk([], {"prompt_tokens": prompt_tokens,
                                 "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})
    body = content + (usage_event if with_usage else b"") + b"data: [DONE]\n\n"
    return body, usage_event


def stream_response(ex: Exchange, body: bytes, pieces: int = 3) -> bytes:
    resp = ex.handle(resp_headers(200, "text/event-stream; charset=utf-8"))
    assert resp.WhichOneof("response") == "response_headers"
    mode = resp.mode_override
    assert mode.response_body_mode == ProcessingMode.STREAMED
    assert mode.request_body_mode == ProcessingMode.BUFFERED
    step = math.ceil(len(body) / pieces)
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    out = []
    for i, chunk in enumerate(chunks):
        r = ex.handle(resp_body(chunk, end=i == len(chunks) - 1))
        assert r.WhichOneof("response") == "response_body"
        common = r.response_body.response
        out.append(common.body_mutation.body if common.HasField("body_mutation") else chunk)
    return b"".join(out)


def test_stream_with_injected_usage(snap) -> None:
    clock = FakeClock()
    ex = Exchange(snap, clock=clock)
    ex.handle(req_headers("POST", CHAT, ALICE))
    request = json.dumps(chat("gpt-4o", stream=True)).encode()
    headers, body, _ = forwarded(ex.handle(req_body(request)))
    sent = json.loads(body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "demo-large-2026"
    assert headers["content-length"] == str(len(body)).encode()
    assert ex.record.usage_injected is True and ex.record.stream is True

    clock.now += 0.25
    stream, usage_event = chat_sse(1234, 567)
    out = stream_response(ex, stream, pieces=5)
    assert out == stream.replace(usage_event, b"")
    assert b'"usage": {' not in out
    clock.now += 0.75
    rec = ex.finish()
    assert rec.status == 200
    assert rec.ttfb_ms == pytest.approx(250.0)
    assert rec.duration_ms == pytest.approx(1000.0)
    assert (rec.input_tokens, rec.output_tokens) == (1234, 567)
    assert rec.usage_estimated is False
    # 1234 x 0.0025 / 1K + 567 x 0.01 / 1K, exactly (floats give 0.008754999...).
    assert rec.cost_usd == 0.008755
    assert rec.cost_usd == pytest.approx(1234 * 0.0025 / 1000 + 567 * 0.01 / 1000, rel=1e-12)


@pytest.mark.parametrize("cut", [1, 7, 50, 200, 333])
def test_stream_usage_event_split_across_messages(snap, cut) -> None:
    ex, _ = send_body(snap, chat("fast", stream=True))
    assert ex.record.usage_injected
    stream, usage_event = chat_sse(10, 20)
    start_at = stream.index(usage_event)
    at = min(start_at + cut, len(stream) - 1)
    ex.handle(resp_headers(200, "text/event-stream"))
    out = b""
    for chunk, end in ((stream[:at], False), (stream[at:], True)):
        r = ex.handle(resp_body(chunk, end))
        common = r.response_body.response
        out += common.body_mutation.body if common.HasField("body_mutation") else chunk
    assert out == stream.replace(usage_event, b"")
    assert (ex.finish().input_tokens, ex.record.output_tokens) == (10, 20)


@pytest.mark.parametrize("content_type, usage_without_choices", [
    ("text/event-stream", {}),   # a provider that leaves `choices` out of it
    # ...or sends null: the chunk reached the client, and the openai SDK's stream
    # helper failed on it (TypeError).
    ("text/event-stream", {"choices": None}),
    ("text/plain; charset=utf-8", None),  # a stream labelled as plain text
    ("", None),
])
def test_the_injected_usage_chunk_never_reaches_the_client(
        snap, content_type: str, usage_without_choices: dict | None) -> None:
    ex, _ = send_body(snap, chat("fast", stream=True))
    assert ex.record.usage_injected
    stream, usage_event = chat_sse(11, 7)
    if usage_without_choices is not None:
        bare = b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk",
                                       **usage_without_choices,
                                       "usage": {"prompt_tokens": 11,
                                                 "completion_tokens": 7}}).encode() + b"\n\n"
        stream, usage_event = stream.replace(usage_event, bare), bare
    resp = ex.handle(resp_headers(200, content_type))
    assert resp.mode_override.response_body_mode == ProcessingMode.STREAMED
    r = ex.handle(resp_body(stream, True))
    common = r.response_body.response
    out = common.body_mutation.body if common.HasField("body_mutation") else stream
    assert out == stream.replace(usage_event, b"")
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (11, 7, False)


def test_stream_client_asked_for_usage_keeps_chunk(snap) -> None:
    ex, resp = send_body(snap, chat("fast", stream=True,
                                    stream_options={"include_usage": True}))
    _, body, _ = forwarded(resp)
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    assert body.count(b"stream_options") == 1
    assert ex.record.usage_injected is False
    stream, _ = chat_sse(100, 50)
    assert stream_response(ex, stream) == stream
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens) == (100, 50)
    assert rec.cost_usd == usd(snap.models["small"], 100, 50)


def test_stream_merges_client_stream_options(snap) -> None:
    ex, resp = send_body(snap, chat("fast", stream=True, stream_options={
        "include_usage": False, "continuous_usage_stats": True}))
    _, body, _ = forwarded(resp)
    assert json.loads(body)["stream_options"] == {"include_usage": True,
                                                  "continuous_usage_stats": True}
    assert ex.record.usage_injected is True


def test_stream_without_usage_is_estimated(snap) -> None:
    ex, _ = send_body(snap, chat("fast", stream=True))
    stream, _ = chat_sse(0, 0, with_usage=False)
    assert stream_response(ex, stream) == stream
    rec = ex.finish()
    assert rec.usage_estimated is True
    assert rec.input_tokens == math.ceil(rec.request_bytes / 4)
    assert rec.output_tokens == math.ceil(len("Hello there!") / 4)
    small = snap.models["small"]
    assert rec.cost_usd == usd(small, rec.input_tokens, rec.output_tokens)


def test_a_streams_ttfb_is_its_first_token_not_its_headers(snap) -> None:
    # The router learns a stream's latency from it: headers (or a role-only chunk) sent
    # at once before a slow first token made a slow model look instant.
    now = [0.0]
    ex = Exchange(snap, clock=lambda: now[0])
    ex.handle(req_headers("POST", CHAT))
    ex.handle(req_body(chat("fast", stream=True)))
    now[0] = 0.003
    ex.handle(resp_headers(200, "text/event-stream"))
    now[0] = 1.0
    ex.handle(resp_body(b"", end=False))  # an empty chunk is no first byte,
    now[0] = 1.5
    ex.handle(resp_body(b": PROCESSING\n\n", end=False))  # nor a comment (OpenRouter),
    now[0] = 2.0
    body, _ = chat_sse(3, 2)
    ex.handle(resp_body(body[:20], end=False))  # nor half an event
    now[0] = 2.5
    first = body.index(b"\n\n") + 2
    ex.handle(resp_body(body[20:first], end=False))  # nor the role-only chunk,
    now[0] = 2.8
    second = body.index(b"\n\n", first) + 2
    ex.handle(resp_body(body[first:second], end=False))  # but "Hello"
    now[0] = 3.0
    ex.handle(resp_body(body[second:], end=True))
    rec = ex.finish()
    assert rec.ttfb_ms == pytest.approx(2800.0) and rec.duration_ms == pytest.approx(3000.0)


def test_ttfb_counts_from_when_atp_passed_the_request_on(snap) -> None:
    # A client that took 2 s to upload its body made the model look 2 s slow to routing.
    now = [0.0]
    ex = Exchange(snap, clock=lambda: now[0])
    ex.handle(req_headers("POST", CHAT))
    now[0] = 2.0
    ex.handle(req_body(chat("fast")))
    now[0] = 2.004
    ex.handle(resp_headers(200, "application/json", extra={"content-length": "20"}))
    now[0] = 2.005
    ex.handle(resp_body(b'{"choices": []}'))
    rec = ex.finish()
    assert rec.ttfb_ms == pytest.approx(4.0) and rec.duration_ms == pytest.approx(2005.0)


def test_a_responses_streams_ttfb_is_its_first_delta(snap) -> None:
    # response.created and response.in_progress come at once, before any generation:
    # every Responses candidate looked about 0 ms fast to routing.
    now = [0.0]
    ex = Exchange(snap, clock=lambda: now[0])
    ex.handle(req_headers("POST", "/v1/responses"))
    ex.handle(req_body({"model": "fast", "input": "hi", "stream": True}))
    ex.handle(resp_headers(200, "text/event-stream"))
    events = [{"type": "response.created", "response": {"id": "r"}},
              {"type": "response.in_progress", "response": {"id": "r"}},
              {"type": "response.output_text.delta", "delta": "Hi"},
              {"type": "response.completed", "response": {"id": "r", "usage": {
                  "input_tokens": 3, "output_tokens": 1}}}]
    for t, event in zip((0.01, 0.02, 0.9, 1.0), events, strict=True):
        now[0] = t
        ex.handle(resp_body(b"data: " + json.dumps(event).encode() + b"\n\n",
                            end=event["type"] == "response.completed"))
    assert ex.finish().ttfb_ms == pytest.approx(900.0)


def test_a_stream_whose_client_left_after_its_last_event_is_whole(snap) -> None:
    # The openai SDK stops reading at [DONE] and closes: the body's end never reaches
    # ATP, and every such stream was recorded response_incomplete (no feedback, no
    # learning, counted failed).
    ex, _ = send_body(snap, chat("fast", stream=True))
    ex.handle(resp_headers(200, "text/event-stream"))
    body, _ = chat_sse(3, 2)
    ex.handle(resp_body(body, end=False))
    rec = ex.finish()
    assert (rec.error_code, rec.output_tokens, rec.usage_estimated) == ("", 2, False)


@pytest.mark.parametrize("event", [
    b'data: {"error": "Input validation error", "error_type": "validation"}\n\n',  # TGI
    b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
    b'data: {"type": "error", "code": "server_error", "message": "boom"}\n\n'])
def test_a_stream_ended_by_the_providers_error_event_is_a_failure(snap, event) -> None:
    # It began 200, so the status says success; the ledger and router must not.
    ex, _ = send_body(snap, chat("fast", stream=True))
    body, _ = chat_sse(3, 2, with_usage=False)
    stream_response(ex, body.replace(b"data: [DONE]\n\n", event))
    rec = ex.finish()
    assert (rec.status, rec.error_code) == (200, "upstream_stream_error")


@pytest.mark.parametrize("event", [
    b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
    b'data: {"type": "error", "code": "server_error", "message": "boom"}\n\n'])
def test_a_client_that_stops_at_the_error_event_still_counts_it(snap, event) -> None:
    # The SDKs raise at the error event and close: the body's end never reached ATP,
    # the record said response_incomplete, and the router (which learns nothing from
    # a cut-off answer) never opened the failing model's breaker.
    ex, _ = send_body(snap, chat("fast", stream=True))
    ex.handle(resp_headers(200, "text/event-stream"))
    ex.handle(resp_body(sse_chunk([{"index": 0, "delta": {"content": "Hi"}}]) + event,
                        end=False))
    assert ex.finish().error_code == "upstream_stream_error"


def _events(*objs: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


@pytest.mark.parametrize("path, request_body, body, error_code", [
    # The body ended after two deltas, without [DONE], a finish_reason or a terminal
    # event: recorded a success, so ledger and router counted a cut answer good.
    (CHAT, chat("fast", stream=True),
     _events({"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
             {"choices": [{"index": 0, "delta": {"content": "lo"}}]}), "response_incomplete"),
    ("/v1/responses", {"model": "fast", "input": "hi", "stream": True},
     _events({"type": "response.created", "response": {"id": "r"}},
             {"type": "response.output_text.delta", "delta": "Hel"}), "response_incomplete"),
    # A finish_reason is the answer's end, with or without a [DONE] after it.
    (CHAT, chat("fast", stream=True),
     _events({"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), ""),
    # With n > 1, every choice's: the stream cut while choice 1 was still writing
    # counted whole.
    (CHAT, chat("fast", stream=True, n=2),
     _events({"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
             {"choices": [{"index": 1, "delta": {"content": "Hel"}}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
     "response_incomplete"),
    # SGLang marks each chunk before the last finish_reason "" (KoboldCpp "null"): the
    # cut stream counted whole.
    (CHAT, chat("fast", stream=True),
     _events({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": ""}]},
             {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "null"}]}),
     "response_incomplete"),
    (CHAT, chat("fast", stream=True, n=2),
     _events({"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
             {"choices": [{"index": 1, "delta": {"content": "Hel"}}]},
             {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), ""),
])
def test_a_stream_whose_body_ends_before_its_last_event_is_incomplete(
        snap, path: str, request_body: dict, body: bytes, error_code: str) -> None:
    ex, _ = send_body(snap, request_body, path=path)
    stream_response(ex, body)
    assert ex.finish().error_code == error_code


def test_a_stream_whose_last_event_was_too_large_to_read_is_not_cut_short(
        snap, monkeypatch: pytest.MonkeyPatch) -> None:
    # A response.completed past the 4 MiB ATP reads (generated images) went on unread:
    # the stream's end was never seen, and a whole answer was counted failed.
    monkeypatch.setattr(llm_api, "_MAX_EVENT", 1000)
    ex, _ = send_body(snap, {"model": "fast", "input": "hi", "stream": True},
                      path="/v1/responses")
    stream_response(ex, _events(
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "response.completed", "response": {"id": "r", "image": "x" * 5000}}))
    assert ex.finish().error_code == ""
    # One that was not the last leaves the cut-off rule as it was.
    ex, _ = send_body(snap, {"model": "fast", "input": "hi", "stream": True},
                      path="/v1/responses")
    stream_response(ex, _events(
        {"type": "response.output_text.delta", "delta": "x" * 5000},
        {"type": "response.output_text.delta", "delta": "Hi"}))
    assert ex.finish().error_code == "response_incomplete"


def test_responses_api_stream_usage(snap) -> None:
    ex, resp = send_body(snap, {"model": "gpt-4o", "input": "hi", "stream": True},
                         path="/v1/responses")
    _, body, _ = forwarded(resp)
    assert "stream_options" not in json.loads(body)
    assert ex.record.usage_injected is False
    stream = (b'event: response.output_text.delta\n'
              b'data: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
              b'event: response.completed\n'
              b'data: {"type":"response.completed","response":{"usage":'
              b'{"input_tokens":40,"output_tokens":9}}}\n\n')
    assert stream_response(ex, stream, pieces=4) == stream
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (40, 9, False)
    assert rec.cost_usd == usd(snap.models["large"], 40, 9)


# -- response phase: JSON ----------------------------------------------------------


def test_json_response_usage_priced_exactly(snap) -> None:
    ex, _ = send_body(snap, chat("gpt-4o"))
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 2000, "completion_tokens": 300}}).encode()
    resp = ex.handle(resp_headers(200, "application/json",
                                  extra={"content-length": str(len(body))}))
    assert resp.mode_override.response_body_mode == ProcessingMode.BUFFERED
    r = ex.handle(resp_body(body, end=True))
    assert r.WhichOneof("response") == "response_body"
    assert not r.response_body.response.HasField("body_mutation")
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (2000, 300, False)
    assert rec.cost_usd == (2000 * 0.0025 + 300 * 0.01) / 1000
    assert rec.cost_usd == pytest.approx(0.008, rel=1e-12)


def test_json_response_in_several_messages(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    ex.handle(resp_headers(200, "application/json; charset=utf-8"))
    body = b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}'
    ex.handle(resp_body(body[:10], end=False))
    ex.handle(resp_body(body[10:], end=True))
    rec = ex.finish()
    assert rec.cost_usd == pytest.approx(0.00015 + 0.0006, rel=1e-12)


def test_every_forwarded_request_refuses_compressed_answers(snap) -> None:
    # openai-python asks for gzip; a gzipped answer would hide its usage from ATP. Taken
    # away, the header let a provider pick any coding.
    _, resp = send_body(snap, chat("fast"), extra={"accept-encoding": "gzip, deflate"})
    _, _, common = forwarded(resp)
    assert {(o.header.key, o.header.raw_value) for o in common.header_mutation.set_headers
            if o.header.key == "accept-encoding"} == {("accept-encoding", b"identity")}


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "identity, br"])
def test_compressed_answer_is_left_alone_and_estimated(snap, encoding) -> None:
    ex, _ = send_body(snap, chat("fast"))
    resp = ex.handle(resp_headers(200, "application/json", extra={
        "content-encoding": encoding, "content-length": "400"}))
    assert not resp.HasField("mode_override")
    # A filter config that sends every body anyway: passed on, not counted twice.
    ex.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"\x1f" * 400,
                                                              end_of_stream=True)))
    rec = ex.finish()
    # The output from the compressed size, a lower bound: not nothing.
    assert rec.usage_estimated is True and rec.output_tokens == estimate_tokens(400) > 0


def test_an_identity_answer_with_the_name_in_capitals_is_read(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    resp = ex.handle(resp_headers(200, "application/json",
                                  extra={"content-encoding": "Identity"}))
    assert resp.HasField("mode_override")


def _big_json(n_bytes: int) -> bytes:
    filler = "x" * n_bytes
    return json.dumps({"data": [filler], "usage": {"prompt_tokens": 70,
                                                   "total_tokens": 70}}).encode()


@pytest.mark.parametrize("length", [None, "too big"])
def test_json_answer_envoy_cannot_buffer_is_read_in_chunks(snap, length) -> None:
    # Envoy answers 500 for a buffered body over its limit (a big embeddings batch).
    body = _big_json(2000)
    small = dataclasses.replace(snap, server=snap.server.model_copy(
        update={"max_body_bytes": len(body) - 1 if length else len(body)}))
    ex, _ = send_body(small, {"model": "text-embedding-3-small", "input": "x"},
                      path="/v1/embeddings")
    extra = {"content-length": str(len(body))} if length else {}
    resp = ex.handle(resp_headers(200, "application/json", extra=extra))
    assert resp.mode_override.response_body_mode == ProcessingMode.STREAMED
    for i in range(0, len(body), 700):
        r = ex.handle(resp_body(body[i:i + 700], end=False))
        assert not r.response_body.response.HasField("body_mutation")  # passes as it came
    ex.handle(resp_body(b"", end=True))
    rec = ex.finish()
    # Over the bound ATP keeps too: the usage at the answer's end is read.
    assert (rec.input_tokens, rec.usage_estimated) == (70, False)


def test_a_prompts_size_is_its_texts_however_the_client_escapes_it(snap) -> None:
    # Sent with \\u escapes (json.dumps' default) the same Russian prompt read three times
    # as long, and limits.context_size refused it.
    # Each escape counted 2 bytes: Chinese (3 bytes each) escaped read a third shorter,
    # past limits.context_size, and Go's \u003c for "<" (1 byte) twice as long.
    for text in ("Привет, как дела? " * 2000, "你好\uff0c世界\u3002€ 😀" * 4000, "<a>&" * 4000):
        raw = json.dumps(chat("fast", messages=[{"role": "user", "content": text}]),
                         ensure_ascii=False).encode()
        escaped = json.dumps(chat("fast", messages=[{"role": "user", "content": text}]))
        if text.startswith("<"):
            escaped = escaped.replace("<", "\\u003C").replace(">", "\\u003e").replace(
                "&", "\\u0026")
        sizes = [send_body(snap, body)[0]._prompt_chars()
                 for body in (raw, escaped.encode())]
        assert len(escaped) > 2 * len(raw) and sizes[0] == sizes[1], text[:9]
    # A backslash before a "u" in the text is no escape: counted as one, a prompt of
    # them went below zero, past every cap.
    literal = json.dumps(chat("fast", messages=[{"role": "user", "content": "\\u" * 30000}]))
    ex, _ = send_body(snap, literal.encode())
    assert ex._prompt_chars() >= len(literal) - 1000


def test_data_outside_a_typed_part_counts_as_a_part_per_value(snap) -> None:
    # Base64 in vLLM's `documents` counted for nothing: 500 KB read as a 33-token prompt.
    blob = base64.b64encode(bytes(range(256)) * 1500).decode()
    ex, _ = send_body(snap, chat("fast", documents=[{"data": blob}]))
    one = ex._prompt_chars()
    assert one >= 4000
    # Ten documents counted as one.
    ex, _ = send_body(snap, chat("fast", documents=[{"data": blob[:40_000]}] * 10))
    assert ex._prompt_chars() >= one + 9 * _PART_CHARS
    # A typed part's data is that part, not a second.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + blob}}
    ex, _ = send_body(snap, chat("fast", messages=[{"role": "user", "content": [image]}]))
    assert ex._prompt_chars() < one + _PART_CHARS // 2


def test_the_usage_after_a_large_image_is_read_not_estimated_from_its_size(snap) -> None:
    # A Responses image answer over max_body_bytes was costed by its size: 1,075,133
    # output tokens, $10.75, for a bill of 6,240 ($0.06).
    image = "iVBORw0KGgo" + "A" * 300_000
    answer = json.dumps({"object": "response", "status": "completed", "output": [
        {"type": "image_generation_call", "result": image}],
        "usage": {"input_tokens": 50, "output_tokens": 6240}}).encode()
    small = dataclasses.replace(snap, server=snap.server.model_copy(
        update={"max_body_bytes": 100_000}))
    ex, _ = send_body(small, {"model": "gpt-4o-mini", "input": "draw"}, path="/v1/responses")
    ex.handle(resp_headers(200, "application/json"))
    for i in range(0, len(answer), 16_384):
        ex.handle(resp_body(answer[i:i + 16_384], end=i + 16_384 >= len(answer)))
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.usage_estimated) == (50, 6240, False)


def _restoring_exchange(snap, max_body: int) -> Exchange:
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    server = snap.server.model_copy(update={"max_body_bytes": max_body})
    snap = dataclasses.replace(snap, routes=routes, server=server)
    ex, resp = send_body(snap, chat("fast", messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}]))
    _, body, _ = forwarded(resp)
    assert b"jane.doe@example.com" not in body and ex.restorer is not None
    ex.handle(resp_headers(200, "application/json"))         # no content-length
    return ex


def test_streamed_json_answer_is_held_and_restored_at_its_end(snap) -> None:
    ex = _restoring_exchange(snap, 1 << 20)
    answer = json.dumps({"choices": [{"message": {"content": "Sent to [EMAIL_1]."}}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()
    cut = answer.index(b"EMAIL") + 2      # the placeholder split between two chunks
    first = ex.handle(resp_body(answer[:cut], end=False))
    assert first.response_body.response.body_mutation.body == b""
    last = ex.handle(resp_body(answer[cut:], end=True))
    restored = json.loads(last.response_body.response.body_mutation.body)
    assert restored["choices"][0]["message"]["content"] == "Sent to jane.doe@example.com."
    rec = ex.finish()
    assert rec.restored is True and (rec.input_tokens, rec.output_tokens) == (9, 4)


def _sized_answer_to_restore(snap) -> tuple[Exchange, bytes]:
    """An exchange on a restoring route whose answer, of a known length, holds the
    placeholder of the e-mail the request sent; and that answer."""
    routes = tuple(r.model_copy(update={"restore": True}) for r in snap.routes)
    ex, _ = send_body(dataclasses.replace(snap, routes=routes), chat("fast", messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}]))
    answer = json.dumps({"choices": [{"message": {"content": "Sent to [EMAIL_1]."}}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()
    ex.handle(resp_headers(200, "application/json",
                           extra={"content-length": str(len(answer))}))
    return ex, answer


def test_a_buffered_answer_ended_by_trailers_is_whole(snap) -> None:
    # HTTP/2 lets an answer end with trailers: Envoy then sends the BUFFERED body without
    # end_of_stream (trailers are not sent to ATP). Held for an end that never came, the
    # restored answer never went out (the client got an empty body), and the record said
    # 502 response_incomplete.
    ex, answer = _sized_answer_to_restore(snap)
    reply = ex.handle(resp_body(answer, end=False))
    restored = json.loads(reply.response_body.response.body_mutation.body)
    assert restored["choices"][0]["message"]["content"] == "Sent to jane.doe@example.com."
    rec = ex.finish()
    assert (rec.status, rec.error_code, rec.output_tokens) == (200, "", 4)


def test_a_sized_answer_in_chunks_ends_at_its_length(snap) -> None:
    # Where Envoy ignores ATP's mode (allow_mode_override off), an answer ATP asked
    # BUFFERED comes in STREAMED chunks: each was taken as its end, and the client got
    # each chunk and then the whole body again, unrestored.
    ex, answer = _sized_answer_to_restore(snap)
    sent = b""
    for at in range(0, len(answer), 20):
        reply = ex.handle(resp_body(answer[at:at + 20], end=False)).response_body.response
        assert reply.HasField("body_mutation")
        sent += reply.body_mutation.body
    after = ex.handle(resp_body(b"", end=True)).response_body.response
    assert not after.HasField("body_mutation")
    assert json.loads(sent)["choices"][0]["message"]["content"] == \
        "Sent to jane.doe@example.com."
    assert ex.finish().output_tokens == 4


@pytest.mark.parametrize("answer", [
    {"error": {"message": "Provider returned error", "code": 502}},
    {"id": "resp_1", "object": "response", "status": "failed",
     "error": None, "usage": {"input_tokens": 9, "output_tokens": 0}},
])
def test_a_providers_failure_sent_as_a_200_json_body_is_a_failure(snap, answer) -> None:
    # As a stream's error event it counted failed; as a JSON body (OpenRouter sends
    # mid-generation failures so) it counted a success and drew the router's traffic.
    ex, _ = send_body(snap, chat("fast"))
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(json.dumps(answer).encode()))
    assert ex.finish().error_code == "upstream_stream_error"


def test_streamed_json_over_the_bound_releases_what_was_held(snap) -> None:
    ex = _restoring_exchange(snap, 1024)
    answer = _big_json(1500)
    first = ex.handle(resp_body(answer[:600], end=False))
    assert first.response_body.response.body_mutation.body == b""
    second = ex.handle(resp_body(answer[600:1200], end=False))
    assert second.response_body.response.body_mutation.body == answer[:1200]
    third = ex.handle(resp_body(answer[1200:], end=True))
    assert not third.response_body.response.HasField("body_mutation")
    rec = ex.finish()  # its usage read from its end
    assert (rec.input_tokens, rec.usage_estimated) == (70, False)


def test_a_json_answer_over_the_bound_is_restored_as_it_passes(snap) -> None:
    # Past max_body_bytes the answer went on with its placeholders: the client got
    # [EMAIL_1] back instead of its own address.
    ex = _restoring_exchange(snap, 1024)
    answer = json.dumps({"choices": [{"message": {
        "content": "x" * 1500 + " to [EMAIL_1], again [EMAIL_1]."}}]}).encode()
    cut = answer.rindex(b"[EMAIL_1]") + 3           # the last placeholder split
    out = b""
    for start, stop, end in ((0, 600, False), (600, 1200, False), (1200, cut, False),
                             (cut, len(answer), True)):
        common = ex.handle(resp_body(answer[start:stop], end=end)).response_body.response
        out += (common.body_mutation.body if common.HasField("body_mutation")
                else answer[start:stop])
    content = json.loads(out)["choices"][0]["message"]["content"]
    assert content.endswith(" to jane.doe@example.com, again jane.doe@example.com.")
    assert ex.finish().restored is True


def _bob_tools(snap, tools: list[str], **extra) -> ep.ProcessingResponse:
    # examples/policies/tools.yaml: bob may call get_weather and search_docs only, and
    # tools outside that scope are stripped.
    body = chat("gpt-4o-mini", tools=[
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in tools], **extra)
    return send_body(snap, body, key=BOB)[1]


def test_stripping_every_tool_drops_the_tool_settings_too(snap) -> None:
    resp = _bob_tools(snap, ["send_email"], tool_choice="auto", parallel_tool_calls=False)
    sent = json.loads(forwarded(resp)[1])
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(sent)
    assert sent["messages"] == chat()["messages"]


def test_stripping_some_tools_keeps_the_rest_and_the_settings(snap) -> None:
    resp = _bob_tools(snap, ["send_email", "get_weather"], tool_choice="auto")
    sent = json.loads(forwarded(resp)[1])
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["tool_choice"] == "auto"


def test_a_stripped_tool_is_named_in_the_record_as_its_decision_names_it(snap) -> None:
    # A name unfit for a log is numbered by its place in the request: the record used
    # to number it by its place among the stripped tools (<tool#0> beside <tool#2>).
    ex, resp = send_body(snap, chat("gpt-4o-mini", tools=[
        {"type": "function", "function": {"name": n}}
        for n in ("get_weather", "send_email", "rm -rf /")]), key=BOB)
    assert [t["function"]["name"] for t in json.loads(forwarded(resp)[1])["tools"]] == [
        "get_weather"]
    rec = ex.finish()
    assert rec.tools_stripped == ("send_email", "<tool#2>")
    targets = {t for r in ex.policy.records if r.decision == "strip" for t in r.targets}
    assert targets == set(rec.tools_stripped)


@pytest.mark.parametrize(("tools", "choice"), [
    (["send_email"], {"type": "function", "function": {"name": "send_email"}}),
    (["send_email"], "required"),
    (["send_email", "get_weather"], {"type": "function", "function": {"name": "send_email"}}),
    (["send_email", "get_weather"], {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "send_email"}}]}}),
])
def test_forcing_a_stripped_tool_is_refused(snap, tools, choice) -> None:
    body = assert_error(_bob_tools(snap, tools, tool_choice=choice), 403, "tool_not_allowed")
    # Named for the policy that stripped it, in the answer and the record (neither said).
    assert body["policy_id"] == "tools.bob_scope"


def test_a_refusal_for_a_forced_stripped_tool_is_recorded_as_the_policys(snap) -> None:
    body = chat("gpt-4o-mini", tools=[{"type": "function", "function": {"name": "send_email"}}],
                tool_choice="required")
    ex, _ = send_body(snap, body, key=BOB)
    rec = ex.finish()
    assert (rec.status, rec.error_code, rec.policy_denied) == (
        403, "tool_not_allowed", "tools.bob_scope")
    # What full enforcement would refuse includes what enforcing refuses (it was None).
    assert rec.policy_would_deny == "tools.bob_scope"
    assert rec.route == "chat"  # resolved before the refusal: it was ''


_STRIPS = """policies:
""" + "".join(f"""  - id: t.{name}
    effect: tools
    tool_action: strip
    mode: {mode}
    expression: tool.name == '{name}'
""" for name, mode in (("alpha", "enforce"), ("beta", "enforce"), ("gamma", "dry_run"),
                       ("delta", "dry_run")))


def test_a_refusal_names_the_policy_that_stripped_the_tool_insisted_on(tmp_path) -> None:
    # It named the first strip policy that hit, whichever tool it stripped.
    shutil.copytree(EXAMPLE.parent, tmp_path / "examples")
    (tmp_path / "examples" / "policies" / "strips.yaml").write_text(_STRIPS)
    snap = config.load(tmp_path / "examples" / "atp.yaml")

    def forcing(tool: str, tools: tuple[str, ...]) -> dict:
        return chat("gpt-4o-mini", tools=[{"type": "function", "function": {"name": n}}
                                          for n in tools],
                    tool_choice={"type": "function", "function": {"name": tool}})

    ex, resp = send_body(snap, forcing("beta", ("alpha", "beta", "keep")))
    assert immediate(resp)[1]["error"]["policy_id"] == "t.beta"
    ex, _ = send_body(snap, forcing("delta", ("alpha", "gamma", "delta", "keep")))
    assert ex.finish().policy_would_deny == "t.delta"
    # The field refused names the tool: a Responses input item declaring beta is refused
    # before the choice forcing alpha, and beta's policy is named.
    ex, resp = send_body(snap, {"model": "gpt-4o-mini", "input": [
        {"type": "tool_search_output", "tools": [{"type": "function", "name": "beta"}]}],
        "tools": [{"type": "function", "name": "alpha"}],
        "tool_choice": {"type": "function", "name": "alpha"}}, path="/v1/responses")
    error = immediate(resp)[1]["error"]
    assert (error["param"], error["policy_id"]) == ("input[0].tools", "t.beta")


def test_a_dry_run_strip_that_would_refuse_is_recorded_as_would_deny(tmp_path) -> None:
    # Under policy.mode: dry_run the request went on, and nothing counted the refusal
    # that enforcing would bring.
    shutil.copytree(EXAMPLE.parent, tmp_path / "examples")
    path = tmp_path / "examples" / "atp.yaml"
    path.write_text(path.read_text().replace("mode: per_policy ", "mode: dry_run "))
    dry = config.load(path)
    body = chat("gpt-4o-mini", tools=[{"type": "function", "function": {"name": "send_email"}}],
                tool_choice={"type": "function", "function": {"name": "send_email"}})
    ex, resp = send_body(dry, body, key=BOB)
    assert json.loads(forwarded(resp)[1])["tools"][0]["function"]["name"] == "send_email"
    rec = ex.finish()
    assert (rec.policy_denied, rec.policy_would_deny) == (None, "tools.bob_scope")


@pytest.mark.parametrize("tools", [["send_email"], ["send_email", "get_weather"]])
def test_a_legacy_function_call_forcing_a_stripped_tool_is_refused(snap, tools) -> None:
    # function_call may name a tool of `tools` too: checked against all that is stripped.
    ex, resp = send_body(snap, {**chat("gpt-4o-mini"), "tools": [
        {"type": "function", "function": {"name": n}} for n in tools],
        "function_call": {"name": "send_email"}}, key=BOB)
    assert assert_error(resp, 403, "tool_not_allowed")["param"] == "function_call"
    assert ex.record.tools_stripped == ()  # nothing went anywhere


def test_a_tool_choice_forcing_a_stripped_function_is_refused(snap) -> None:
    body = {**chat("gpt-4o-mini"), "functions": [{"name": "send_email"}, {"name": "get_weather"}],
            "tool_choice": {"type": "function", "function": {"name": "send_email"}}}
    assert_error(send_body(snap, body, key=BOB)[1], 403, "tool_not_allowed")


def test_an_allowed_tools_choice_loses_the_stripped_tools(snap) -> None:
    allowed = [{"type": "function", "function": {"name": n}}
               for n in ("send_email", "get_weather")]
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": allowed}}
    sent = json.loads(forwarded(_bob_tools(snap, ["send_email", "get_weather"],
                                           tool_choice=choice))[1])
    assert sent["tool_choice"] == {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": allowed[1:]}}


def test_the_tools_left_after_stripping_stay_redacted(snap) -> None:
    settings = snap.redactor.settings.model_copy(
        update={"extra_paths": ("tools[*].function.description",)})
    snap = dataclasses.replace(snap, redactor=Redactor(settings))
    body = chat("gpt-4o-mini", tools=[
        {"type": "function", "function": {"name": n, "description": "mail jane@example.com",
                                          "parameters": {"type": "object"}}}
        for n in ("get_weather", "send_email")])
    _, resp = send_body(snap, body, key=BOB)
    sent = forwarded(resp)[1]
    assert b"jane@example.com" not in sent
    assert [t["function"]["name"] for t in json.loads(sent)["tools"]] == ["get_weather"]


def test_embeddings_response_usage(snap) -> None:
    ex, _ = send_body(snap, {"model": "text-embedding-3-small", "input": "x"},
                      path="/v1/embeddings")
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"data":[],"usage":{"prompt_tokens":500,"total_tokens":500}}'))
    rec = ex.finish()
    assert (rec.input_tokens, rec.output_tokens) == (500, 0)
    assert rec.cost_usd == pytest.approx(500 * 0.00002 / 1000, rel=1e-12)


def test_json_response_without_usage_is_estimated(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"choices":[]}'))
    rec = ex.finish()
    assert rec.usage_estimated is True
    assert rec.input_tokens == math.ceil(rec.request_bytes / 4)
    assert rec.output_tokens == 0
    assert rec.cost_usd == usd(snap.models["small"], rec.input_tokens, 0)


@pytest.mark.parametrize("path, answer, output", [
    (CHAT, {"choices": [{"message": {"role": "assistant", "content": "x" * 400}}]}, 100),
    (CHAT, {"choices": [{"message": {"content": None, "tool_calls": [
        {"type": "custom", "custom": {"name": "patch", "input": "y" * 40}}]}}]}, 10),
    (CHAT, {"choices": [{"message": {"content": "x" * 400}}], "usage": None}, 100),
    ("/v1/embeddings", {"data": [{"embedding": [0.5] * 64}]}, 0),
])
def test_json_answer_without_usage_estimates_its_output(snap, path, answer, output) -> None:
    # The output was estimated at 0 whatever the answer: cost and ledger too low.
    body = chat("fast") if path == CHAT else {"model": "text-embedding-3-small",
                                               "input": "hi"}
    ex, _ = send_body(snap, body, path=path)
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(json.dumps(answer).encode()))
    rec = ex.finish()
    assert (rec.output_tokens, rec.usage_estimated) == (output, True)


def test_json_answer_too_big_to_hold_estimates_its_output_from_its_size(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    ex.handle(resp_headers(200, "application/json"))  # no length: STREAMED chunks
    chunk = b" " * (1 << 20)
    for _ in range(5):  # 5 MiB, over max_body_bytes (4 MiB): not held
        ex.handle(resp_body(chunk, end=False))
    ex.handle(resp_body(b"{}", end=True))
    rec = ex.finish()
    assert rec.usage_estimated is True
    assert rec.output_tokens == math.ceil((5 * len(chunk) + 2) / 4)


def _learning_exchange(snap, body: bytes) -> Services:
    router = Router()
    services = Services(router, FeedbackBook(router.observe_quality), PriceBook(), None)
    ex = Exchange(snap, services=services)
    ex.handle(req_headers("POST", CHAT, ALICE))
    ex.handle(req_body(chat("auto")))
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(body))
    ex.finish()
    return services


def test_billed_tokens_teach_the_route_its_request_sizes(snap) -> None:
    services = _learning_exchange(
        snap, b'{"usage": {"prompt_tokens": 4000, "completion_tokens": 900}}')
    priors = services.router._routes["chat-auto"].priors
    assert (priors.input_tokens, priors.output_tokens) == (4000, 900)


def test_estimated_tokens_do_not_teach_the_route(snap) -> None:
    services = _learning_exchange(snap, b'{"choices": []}')
    priors = services.router._routes["chat-auto"].priors
    assert (priors.input_tokens, priors.output_tokens) == (Priors().input_tokens,
                                                           Priors().output_tokens)


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_a_json_answer_under_another_label_is_read(snap, content_type: str) -> None:
    # Passed on unread, a valid answer was counted the provider's failure (and tripped
    # its breaker), its output tokens 0.
    ex, _ = send_body(snap, chat("fast"))
    resp = ex.handle(resp_headers(200, content_type))
    assert resp.HasField("mode_override")
    ex.handle(resp_body(json.dumps({"choices": [], "usage": {
        "prompt_tokens": 1000, "completion_tokens": 500}}).encode()))
    rec = ex.finish()
    assert (rec.error_code, rec.input_tokens, rec.output_tokens) == ("", 1000, 500)


@pytest.mark.parametrize("content_type, body, stream", [
    ("text/html", b"<html>busy</html>", False),  # a proxy's error page
    ("application/json", b"", False),
    ("application/json", b"<html>busy</html>", False),
    ("application/json", b"[1, 2]", False),
    ("text/event-stream", b": keep-alive\n\n", True),  # a stream without an event
])
def test_a_2xx_that_is_no_answer_is_the_providers_failure(
        snap, content_type: str, body: bytes, stream: bool) -> None:
    # Counted a success, it drew the learned router's traffic to the failing provider.
    router = Router()
    services = Services(router, FeedbackBook(router.observe_quality), PriceBook(), None)
    ex = Exchange(snap, services=services)
    ex.handle(req_headers("POST", CHAT, ALICE))
    ex.handle(req_body(chat("auto", stream=stream)))
    ex.handle(resp_headers(200, content_type))
    ex.handle(resp_body(body))
    rec = ex.finish()
    assert rec.error_code == "upstream_invalid_response"
    assert (rec.output_tokens, rec.usage_estimated) == (0, True)
    learned = router.snapshot()["chat-auto"][rec.model]
    assert learned["observations"] == 1 and learned["error_rate"] > 0.05


_INTERNAL_ONLY = """
auth: {anonymous_tenant: anon}
models:
  - {name: small, cluster: a, upstream_model: s, egress: internal,
     price: {input_per_1k: 0.001, output_per_1k: 0.001}}
  - {name: large, cluster: b, upstream_model: l, egress: external,
     price: {input_per_1k: 0.01, output_per_1k: 0.01}}
routes:
  - name: inside
    aliases: {m: [small, large]}
    objective: {restrict: {egress: internal}}
policies:
  - {id: t.no_small, effect: restrict, mode: MODE, expression: "resource.model == 'small'"}
"""


@pytest.mark.parametrize("mode", ["enforce", "dry_run"])
def test_a_restrict_leaving_no_model_the_objective_lets_serve_is_named(mode: str) -> None:
    # large stays for the policy engine, but the route's objective keeps it from serving:
    # enforced, the 403 named no policy; as a dry run, nothing recorded the refusal that
    # enforcing would bring.
    snap = config.parse(_INTERNAL_ONLY.replace("MODE", mode), "atp.yaml")
    router = Router()
    ex = Exchange(snap, services=Services(router, FeedbackBook(router.observe_quality),
                                          PriceBook(), None))
    ex.handle(req_headers("POST", CHAT, None))
    resp = ex.handle(req_body({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    rec = ex.finish()
    assert rec.policy_would_deny == "t.no_small"
    if mode == "enforce":
        assert assert_error(resp, 403, "no_eligible_model")["policy_id"] == "t.no_small"
        assert rec.policy_denied == "t.no_small"
    else:
        assert resp.WhichOneof("response") == "request_body" and rec.model == "small"


def test_several_restricts_leaving_no_model_are_named_as_atps_own() -> None:
    # Each removed one of the two models the objective lets serve: the 403 and the
    # record blamed the first alone (a route without an objective names
    # atp.no_candidate there).
    text = _INTERNAL_ONLY.replace("MODE", "enforce").replace(
        "aliases: {m: [small, large]}", "aliases: {m: [small, large, mid]}").replace(
        "routes:", "  - {name: mid, cluster: c, upstream_model: x, egress: internal,\n"
        "     price: {input_per_1k: 0.001, output_per_1k: 0.001}}\nroutes:") + (
        "  - {id: t.no_mid, effect: restrict, expression: \"resource.model == 'mid'\"}\n")
    router = Router()
    ex = Exchange(config.parse(text, "atp.yaml"), services=Services(
        router, FeedbackBook(router.observe_quality), PriceBook(), None))
    ex.handle(req_headers("POST", CHAT, None))
    resp = ex.handle(req_body({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    assert assert_error(resp, 403, "no_eligible_model")["policy_id"] == "atp.no_candidate"
    assert ex.finish().policy_denied == "atp.no_candidate"


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_error_response_not_priced(snap, status: int) -> None:
    ex, _ = send_body(snap, chat("fast"))
    resp = ex.handle(resp_headers(status, "application/json"))
    assert not resp.HasField("mode_override")
    rec = ex.finish()
    assert rec.status == status
    assert rec.cost_usd is None and rec.input_tokens is None


def test_response_headers_end_of_stream_no_body_mode(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    resp = ex.handle(resp_headers(200, "application/json", end=True))
    assert not resp.HasField("mode_override")


def test_bad_status_header(snap) -> None:
    ex, _ = send_body(snap, chat("fast"))
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=header_map({":status": "abc"})))
    ex.handle(msg)
    assert ex.record.status == 0
    assert ex.finish().cost_usd is None


def test_finish_is_written_once(snap) -> None:
    clock = FakeClock()
    ex = Exchange(snap, clock=clock)
    ex.handle(req_headers("POST", CHAT, ALICE))
    ex.handle(req_body(chat("fast")))
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'))
    clock.now += 1
    first = ex.finish()
    clock.now += 5
    second = ex.finish()
    assert second is first
    assert second.duration_ms == pytest.approx(1000.0)


def test_cost_is_the_ledgers_exact_amount() -> None:
    # Float arithmetic gives (0.1 + 0.2) / 1000 = 0.00030000000000000003; picodollars
    # do not.
    snap = config.parse(SMALL_LIMIT_YAML.replace("input_per_1k: 1, output_per_1k: 2",
                                                 "input_per_1k: 0.1, output_per_1k: 0.2"),
                        "small.yaml")
    ex, _ = send_body(snap, {"model": "a", "messages": [{"role": "user", "content": "x"}]},
                      key=None)
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(json.dumps({"usage": {"prompt_tokens": 1,
                                              "completion_tokens": 1}}).encode()))
    assert ex.finish().cost_usd == 0.0003


# -- known bugs, surfaced through the pipeline -------------------------------------


def test_a_body_too_costly_to_scan_gets_a_message_that_says_so(snap) -> None:
    # "data that may not be sent to a model provider: scan_incomplete" read as if a
    # data class of that name had been found.
    _, resp = send_body(snap, chat("fast", messages=[
        {"role": "user", "content": "1 " * (512 * 1024)}]))
    assert resp.immediate_response.status.code == 400
    error = json.loads(resp.immediate_response.body)["error"]
    assert error["code"] == "redaction_incomplete" and "too costly to scan" in error["message"]


@pytest.mark.parametrize("text", ["card 4111\\ud8001111\\ud8001111\\ud8001111",
                                  "ssn 123\\udc00-45-6789", "x\\ud83d"])
def test_a_lone_surrogate_escape_is_refused_as_invalid_unicode(snap, text: str) -> None:
    # Scanned as a separator it hid the value around it from redaction, while a
    # provider's decoder reads U+FFFD there and the model the value whole.
    raw = b'{"model":"fast","messages":[{"role":"user","content":"%s"}]}' % text.encode()
    ex, _ = start(snap)
    resp = ex.handle(req_body(raw))
    assert resp.immediate_response.status.code == 400
    error = json.loads(resp.immediate_response.body)["error"]
    assert error["code"] == "invalid_json" and "lone surrogate" in error["message"]


@pytest.mark.parametrize("path, body", [
    (CHAT, {"model": "fast", "messages": [
        {"role": "user", "content": "pay"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {
                "name": "pay", "arguments": '{"card": "4111\\ud8001111\\ud8001111\\ud8001111"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}]}),
    ("/v1/responses", {"model": "gpt-4o", "input": [
        {"type": "function_call_output", "call_id": "c",
         "output": '{"files": ["john@example.com report\\udcff.txt"]}'}]}),
])
def test_a_lone_surrogate_escape_inside_a_json_text_is_refused(snap, path, body) -> None:
    # Tool arguments and results are JSON texts in a string: the body's own check did
    # not see into them, a card split by one reached the provider, and a value next to
    # one crashed the rewrite (500, a billed ledger row).
    ex, resp = send_body(snap, body, path=path)
    assert resp.immediate_response.status.code == 400
    error = json.loads(resp.immediate_response.body)["error"]
    assert error["code"] == "invalid_json" and "lone surrogate" in error["message"]
    assert ex.finish().cost_usd is None


def test_a_tool_result_nested_too_deeply_to_check_is_refused(snap) -> None:
    import sys
    n = sys.getrecursionlimit() + 500
    body = {"model": "fast", "messages": [
        {"role": "user", "content": "pay"},
        {"role": "tool", "tool_call_id": "c", "content": "[" * n + "]" * n}]}
    _, resp = send_body(snap, body)
    assert_error(resp, 400, "json_too_deep")


def test_a_paired_escape_inside_a_json_text_passes_redacted(snap) -> None:
    body = {"model": "gpt-4o-mini", "input": [
        {"type": "function_call_output", "call_id": "c",
         "output": '{"files": ["john@example.com \\ud83d\\ude00.txt"]}'}]}
    _, raw, _ = forwarded(send_body(snap, body, path="/v1/responses")[1])
    assert raw is not None and b"john@example.com" not in raw and b"[EMAIL" in raw


def test_paired_and_escaped_surrogate_escapes_pass(snap) -> None:
    raw = (b'{"model":"fast","messages":[{"role":"user","content":'
           b'"\\ud83d\\ude00 and a literal \\\\ud800 a@b.com"}]}')
    _, body, _ = forwarded(send_body(snap, raw)[1])
    assert body is not None
    assert json.loads(body)["messages"][0]["content"].startswith("\U0001f600 and a "
                                                                  "literal \\ud800 [EMAIL")


def test_a_rewritten_body_stays_utf8_and_does_not_grow_into_escapes(snap) -> None:
    # An emoji as a JSON escape takes 12 bytes for its 4: a body within max_body_bytes
    # grew past gRPC's and Envoy's limits, and Envoy answered 500.
    content = "\U0001f600" * 1000 + " mail a@b.com"
    raw = json.dumps({"model": "fast", "messages": [{"role": "user", "content": content}]},
                     ensure_ascii=False).encode()
    _, body, _ = forwarded(send_body(snap, raw)[1])
    assert body is not None and "\U0001f600".encode() * 1000 in body
    assert len(body) < len(raw) + 100


def test_a_renamed_field_is_measured_once(snap, monkeypatch) -> None:
    # The growth check counted a renamed top-level field twice (old and new name): a
    # 4 MB body was refused as 8.4 MB.
    import atp_extproc.exchange as exchange_mod

    monkeypatch.setattr(exchange_mod, "envoy_buffer_limit", lambda max_body: 150 * 1024)
    body = {**chat("fast"), "alice@example.com": "x" * (100 * 1024)}
    sent = json.loads(forwarded(send_body(snap, body)[1])[1])
    assert sent["[EMAIL_1]"] == "x" * (100 * 1024)


def test_a_body_that_placeholders_would_grow_past_envoys_buffer_is_refused(
        snap, monkeypatch) -> None:
    import atp_extproc.exchange as exchange_mod

    limit = 100 * 1024
    monkeypatch.setattr(exchange_mod, "envoy_buffer_limit", lambda max_body: limit)
    small = {"model": "fast", "messages": [{"role": "user", "content": "a@b.co " * 9000}]}
    assert forwarded(send_body(snap, small)[1])[1] is not None  # 63 KiB: not measured
    # 94 KB of UTF-8 (CJK counts three bytes a character) that grows by 30 KB.
    big = json.dumps({"model": "fast", "messages": [{"role": "user", "content":
                      "\u4e16" * 8000 + " a@b.co" * 10000}]}, ensure_ascii=False).encode()
    ex, resp = send_body(snap, big)
    assert resp.immediate_response.status.code == 413
    assert "placeholders" in json.loads(resp.immediate_response.body)["error"]["message"]
    record = ex.finish()
    assert record.model == "" and record.cost_usd is None  # nothing routed, nothing billed


def test_malformed_response_completed_does_not_escape_handle(snap) -> None:
    ex, _ = send_body(snap, {"model": "gpt-4o", "input": "hi", "stream": True},
                      path="/v1/responses")
    stream = b'data: {"type":"response.completed","response":null}\n\n'
    assert stream_response(ex, stream, pieces=1) == stream
    assert ex.finish().usage_estimated is True


def test_a_photos_data_is_no_prompt_text_to_policies_or_estimates(snap) -> None:
    # Counted as text, a 930 KB photo made a short question 240,000 tokens: the example
    # policies refused it as too long (bob) or too costly (alice).
    photo = "data:image/jpeg;base64," + base64.b64encode(os.urandom(700_000)).decode()
    doc = chat("fast", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": photo, "detail": "high"}}]}])
    ex, reply = send_body(snap, doc)
    assert reply.WhichOneof("response") == "request_body"
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"choices": [{"message": {"content": "A cat."}}]}'))
    rec = ex.finish()
    assert rec.usage_estimated and rec.input_tokens < 2_000


def test_token_id_prompts_are_estimated_by_their_size(snap) -> None:
    # Each token array counted as a 1,000-token image: a 1.4 KB prompt of 120 arrays
    # was estimated at 120,000 tokens.
    doc = {"model": "fast", "prompt": [[1, 2, 3]] * 120, "max_tokens": 5}
    ex, reply = send_body(snap, doc, path="/v1/completions")
    assert reply.WhichOneof("response") == "request_body"
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(b'{"choices": [{"text": "ok"}]}'))
    rec = ex.finish()
    assert rec.usage_estimated and rec.input_tokens < 1_000


def _responses_services(snap) -> tuple[config.Snapshot, Services]:
    text = EXAMPLE.read_text().replace(
        "match: { paths: [/v1/chat/completions] }",
        "match: { paths: [/v1/chat/completions, /v1/responses] }", 1)
    router = Router()
    return (config.parse(text, str(EXAMPLE)),
            Services(router, FeedbackBook(router.observe_quality), PriceBook(), None))


def _responses_turn(snap, services, key: str = ALICE, stream: bool = False,
                    **body) -> Exchange:
    ex = Exchange(snap, services=services)
    ex.handle(req_headers("POST", "/v1/responses", key))
    ex.handle(req_body({"model": "auto", "input": "hi", "stream": stream, **body}))
    return ex


_RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
             "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_turn_naming_a_stored_answer_goes_to_the_model_that_stored_it(snap, stream) -> None:
    # A route learning over two providers sent 7 in 40 follow-up turns to the one that
    # never stored the previous turn: a 404 at a real provider.
    snap, services = _responses_services(snap)
    ex = _responses_turn(snap, services, stream=stream)
    if stream:
        ex.handle(resp_headers(200, "text/event-stream"))
        ex.handle(resp_body(_events({"type": "response.completed", "response": _RESPONSE})
                            + b"data: [DONE]\n\n"))
    else:
        ex.handle(resp_headers(200, "application/json"))
        ex.handle(resp_body(json.dumps(_RESPONSE).encode()))
    first = ex.finish()
    assert services.stored.home("alice", "resp_1") == first.model
    other = next(m for m in ("large", "small") if m != first.model)
    services.stored.note("alice", "resp_2", other)
    for _ in range(20):  # whatever the router would pick or explore
        rec = _responses_turn(snap, services, previous_response_id="resp_2").finish()
        assert rec.model == other
        assert rec.routing_excluded == (f"{first.model}:previous_response",)
    # Another tenant's id of that name is not alice's answer.
    rec = _responses_turn(snap, services, key=BOB, previous_response_id="resp_2").finish()
    assert not any("previous_response" in e for e in rec.routing_excluded)


def test_an_answer_not_stored_is_not_noted(snap) -> None:
    snap, services = _responses_services(snap)
    ex = _responses_turn(snap, services, store=False)
    ex.handle(resp_headers(200, "application/json"))
    ex.handle(resp_body(json.dumps(_RESPONSE).encode()))
    ex.finish()
    assert services.stored.home("alice", "resp_1") is None


def test_stored_answers_keep_the_newest_within_their_bound() -> None:
    from atp_extproc.routing.stored import StoredAnswers

    stored = StoredAnswers(capacity=2)
    stored.note("t", "a", "m1")
    stored.note("t", "b", "m2")
    stored.note("t", "a", "m1")  # seen again: the newest
    stored.note("t", "c", "m3")
    assert [stored.home("t", r) for r in "abc"] == ["m1", None, "m3"]


def test_a_stored_answer_whose_model_policy_now_refuses_is_routed_as_any_turn(snap) -> None:
    # The pin left nothing: a 403 naming both models "(policy)", though policy allowed
    # the other.
    snap, services = _responses_services(snap)
    services.stored.note("alice", "resp_9", "large")
    ex = _responses_turn(snap, services, previous_response_id="resp_9",
                         input="mail jane@example.com")  # pii.internal_only: small only
    rec = ex.finish()
    assert (rec.model, rec.policy_denied) == ("small", None)
    assert not any("previous_response" in e for e in rec.routing_excluded)


@pytest.mark.parametrize("name", ["4111-1111-1111-1111", "page_oncall_+14155550132"])
def test_a_tool_an_input_item_declares_keeps_its_name_for_policies(snap, name) -> None:
    # Redaction renamed it ([CARD:…]): bob's strip policy looked for the name it read
    # and found nothing to refuse, and the tool went out under the placeholder.
    body = {"model": "gpt-4o-mini", "input": [
        {"type": "tool_search_output", "tools": [{"type": "function", "name": name}]}],
        "tools": [{"type": "function", "name": "get_weather"}]}
    _, resp = send_body(snap, body, path="/v1/responses", key=BOB)
    assert assert_error(resp, 403, "tool_not_allowed")["policy_id"] == "tools.bob_scope"
