"""A real Envoy + ATP + fake upstreams, driven by the openai client and raw HTTP."""

from __future__ import annotations

import json
import socket

import openai
import pytest

from atp_extproc.stack import Stack, wait_until
from tests.conftest import ALICE, BOB, Upstreams, http, post

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def client(stack: Stack, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0)


def only_request(upstreams: Upstreams, name: str) -> dict:
    reqs = upstreams.requests(name)
    assert len(reqs) == 1, reqs
    return reqs[0]


def exchange_records(stack: Stack) -> list[dict]:
    out = []
    for line in stack.log("atp").splitlines():
        if line.startswith("{") and '"msg":"exchange"' in line:
            out.append(json.loads(line))
    return out


def record_for(stack: Stack, request_id: str) -> dict:
    for rec in exchange_records(stack):
        if rec["request_id"] == request_id:
            return rec
    raise AssertionError(f"no exchange record for {request_id}")


# -- routing ---------------------------------------------------------------------------

def test_models_lists_the_tenants_aliases(stack: Stack) -> None:
    alice = {m.id for m in client(stack).models.list()}
    bob = {m.id for m in client(stack, BOB).models.list()}
    assert alice == {"gpt-4o", "gpt-4o-mini", "fast", "auto", "text-embedding-3-small"}
    assert bob == {"gpt-4o-mini", "fast", "auto", "text-embedding-3-small"}
    assert client(stack).models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client(stack, BOB).models.retrieve("gpt-4o")


def test_chat_routes_by_alias_and_rewrites_model(stack: Stack, upstreams: Upstreams) -> None:
    reply = client(stack).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "héllo wörld"}])
    completion = reply.parse()
    assert reply.headers["x-upstream-name"] == "demo_a"
    assert completion.choices[0].message.content == "[demo_a] you said: héllo wörld"
    seen = only_request(upstreams, "demo_a")
    assert upstreams.requests("demo_b") == []
    body = json.loads(seen["body"])
    assert body["model"] == "demo-small-2026"
    assert body["messages"] == [{"role": "user", "content": "héllo wörld"}]
    assert int(seen["content_length_header"]) == seen["body_bytes"] == len(
        seen["body"].encode())
    # Neither the client's ATP key nor ATP's routing headers reach a provider.
    assert "authorization" not in seen["headers"]
    assert not [h for h in seen["headers"] if h.startswith("x-atp-")], seen["headers"]


def test_premium_alias_goes_to_the_other_cluster(stack: Stack, upstreams: Upstreams) -> None:
    completion = client(stack).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": [
            {"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}])
    assert completion.choices[0].message.content == "[demo_b] you said: part one\npart two"
    assert json.loads(only_request(upstreams, "demo_b")["body"])["model"] == "demo-large-2026"
    # bob's routes do not include gpt-4o: same alias, no access.
    with pytest.raises(openai.NotFoundError) as err:
        client(stack, BOB).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    assert upstreams.requests("demo_b") == [only_request(upstreams, "demo_b")]


def test_completions_embeddings_and_responses(stack: Stack, upstreams: Upstreams) -> None:
    c = client(stack)
    text = c.completions.create(model="fast", prompt="say this").choices[0].text
    assert text == "[demo_a] you said: say this"
    emb = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    resp = c.responses.create(model="gpt-4o-mini", input="respond please")
    assert resp.output_text == "[demo_a] you said: respond please"
    models = [json.loads(r["body"])["model"] for r in upstreams.requests("demo_a")]
    assert models == ["demo-small-2026", "demo-embed-2026", "demo-small-2026"]


def test_usage_is_read_and_priced(stack: Stack) -> None:
    reply = client(stack).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "price me"}])
    usage = reply.parse().usage
    request_id = _request_id_of(stack, reply.headers["x-upstream-name"], "price me")
    rec = _wait_record(stack, request_id)
    assert (rec["input_tokens"], rec["output_tokens"]) == (usage.prompt_tokens,
                                                           usage.completion_tokens)
    expected = (usage.prompt_tokens * 0.0025 + usage.completion_tokens * 0.01) / 1000
    assert rec["cost_usd"] == pytest.approx(expected)
    assert rec["usage_estimated"] is False
    assert rec["tenant"] == "alice" and rec["auth_method"] == "api_key"
    assert rec["ttfb_ms"] > 0 and rec["duration_ms"] >= rec["ttfb_ms"]
    assert "price me" not in stack.log("atp")


def _request_id_of(stack: Stack, upstream: str, text: str) -> str:
    port = stack.ports[upstream]
    reqs = http(f"http://127.0.0.1:{port}/debug/requests").json()["requests"]
    for r in reversed(reqs):
        if text in r["body"]:
            return str(r["headers"]["x-request-id"])
    raise AssertionError("request not seen upstream")


def _wait_record(stack: Stack, request_id: str) -> dict:
    from atp_extproc.stack import wait_until

    found: dict = {}

    def check() -> bool:
        found.update(record_for(stack, request_id))
        return True

    wait_until(check, "exchange record", timeout=10)
    return found


def test_stream_without_usage_request_gets_usage_injected_and_hidden(
        stack: Stack, upstreams: Upstreams) -> None:
    chunks = list(client(stack).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream this please"}],
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[demo_a] you said: stream this please"
    assert all(c.choices for c in chunks), "the usage-only chunk leaked to the client"
    assert all(c.usage is None for c in chunks)
    seen = json.loads(only_request(upstreams, "demo_a")["body"])
    assert seen["stream_options"] == {"include_usage": True}
    request_id = _request_id_of(stack, "demo_a", "stream this please")
    rec = _wait_record(stack, request_id)
    assert rec["usage_injected"] is True and rec["usage_estimated"] is False
    assert rec["output_tokens"] == 10 and rec["input_tokens"] > 0


def test_stream_with_usage_request_keeps_the_usage_chunk(
        stack: Stack, upstreams: Upstreams) -> None:
    chunks = list(client(stack).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}],
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    seen = json.loads(only_request(upstreams, "demo_a")["body"])
    assert seen["stream_options"] == {"include_usage": True}


# -- bad input: a clear OpenAI-shaped error, nothing sent upstream ---------------------

DEEP = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"x":' + \
    b"[" * 100 + b"]" * 100 + b"}"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "gpt-4o-mini", "messages": [', 400, "invalid_json"),
    (b'["model", "gpt-4o-mini"]', 400, "invalid_body"),
    (b'"just a string"', 400, "invalid_body"),
    (b"\xff\xfe{}", 400, "invalid_json"),
    (DEEP, 400, "json_too_deep"),
    (b"[" * 200000, 400, "json_too_deep"),
    (b'{"model":"gpt-4o-mini","model":"gpt-4o","messages":[{"role":"user","content":"x"}]}',
     400, "duplicate_key"),
    (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a","content":"b"}]}',
     400, "duplicate_key"),
    (b'{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}', 404,
     "model_not_found"),
    (b'{"model":"gpt-4o-mini\\r\\nx-atp-cluster: demo_b","messages":[]}', 400,
     "invalid_model"),
    (b'{"model":"' + b"m" * 300 + b'","messages":[{"role":"user","content":"x"}]}', 400,
     "invalid_model"),
    (b'{"model":"gpt-4o-mini"}', 400, "missing_required_parameter"),
    (b'{"model":"gpt-4o-mini","messages":[],"stream":"yes"}', 400, "invalid_type"),
])
def test_bad_input_is_refused_before_any_upstream(
        stack: Stack, upstreams: Upstreams, body: bytes, status: int, code: str) -> None:
    reply = post(stack, CHAT, body)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    assert upstreams.total() == 0


def test_oversize_body_gets_413_from_atp(stack: Stack, upstreams: Upstreams) -> None:
    content = "a" * (4 * 1024 * 1024)
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": content}]})
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    assert upstreams.total() == 0


def test_body_over_envoy_buffer_gets_openai_shaped_413(
        stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, b'{"x":"' + b"a" * (9 * 1024 * 1024) + b'"}')
    assert reply.status == 413
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error",
                                              "request_payload_too_large")
    assert upstreams.total() == 0
    # ATP's record says why, as the client's error does (its error_code was empty).
    request_id = reply.headers["x-request-id"]
    wait_until(lambda: any(r["request_id"] == request_id for r in exchange_records(stack)),
               "the record of the refused body", timeout=10)
    rec = record_for(stack, request_id)
    assert (rec["status"], rec["error_code"]) == (413, "request_payload_too_large")


_HOST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),  # no Host
    (b"POST /v1/chat/completions#x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
     400),
    # Refused by Envoy's codec, before any route: with ATP asked for every answer's
    # headers, Envoy closed these connections with no answer at all.
    (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 426),
    (_HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (_HOST + b"X-Big: " + b"a" * 61 * 1024 + b"\r\n\r\n", 431),
    (_HOST + b"X-A : 1\r\nContent-Length: 2\r\n\r\n{}", 400),
    (_HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    # RFC 9112's 501, which read as the gateway's fault (gateway_error).
    (_HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
], ids=["no-host", "fragment", "http-1.0", "101-headers", "61-KiB-header",
        "space-before-colon", "chunked-and-length", "unknown-transfer-coding"])
def test_a_request_envoy_refuses_itself_gets_a_client_error_with_a_message(
        stack: Stack, upstreams: Upstreams, request_bytes: bytes, status: int) -> None:
    # Its local reply had an empty message and the type of a gateway fault.
    with socket.create_connection(("127.0.0.1", stack.ports["envoy"]), timeout=10) as conn:
        conn.sendall(request_bytes)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1:2] == [str(status).encode()], data[:200]
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(
        "Envoy could not accept this request (") and error["code"]
    assert upstreams.total() == 0


@pytest.mark.parametrize("request_line", [b"GET /v1/realtime?model=m", b"GET /v1/models"])
def test_a_websocket_upgrade_is_refused_as_unsupported(
        stack: Stack, upstreams: Upstreams, request_line: bytes) -> None:
    # Envoy refuses upgrades before ext_proc; its 403 read as the client's permissions.
    with socket.create_connection(("127.0.0.1", stack.ports["envoy"]), timeout=10) as conn:
        conn.sendall(request_line + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + ALICE.encode() + b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        data = b""
        while not data.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1:2] == [b"400"], data[:200]
    assert json.loads(body)["error"]["code"] == "upgrade_not_supported"
    assert upstreams.total() == 0


def test_body_just_under_the_limit_goes_through(stack: Stack, upstreams: Upstreams) -> None:
    content = "b" * (4 * 1024 * 1024 - 200)
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": content}]})
    assert reply.status == 200, reply.body[:300]
    seen = only_request(upstreams, "demo_a")
    assert int(seen["content_length_header"]) == seen["body_bytes"]
    assert json.loads(seen["body"])["messages"][0]["content"] == content


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("sk-wrong", 401)])
def test_missing_or_wrong_key_is_401(stack: Stack, upstreams: Upstreams, key, status) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "x"}]}, key=key)
    assert reply.status == status
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert upstreams.total() == 0


def test_unknown_path_and_wrong_method(stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, "/v1/images/generations", {"model": "gpt-4o-mini"},
                 headers={"x-atp-cluster": "demo_a"})
    assert reply.status == 404 and reply.json()["error"]["code"] == "unknown_url"
    reply = http(stack.base_url + CHAT, headers={"authorization": f"Bearer {ALICE}"})
    assert reply.status == 405
    assert upstreams.total() == 0


def test_spoofed_routing_headers_never_route(stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "spoof"}]},
                 headers={"x-atp-cluster": "demo_b", "x-atp-shadow-cluster": "demo_b",
                          "X-ATP-Cluster": "demo_b", "x-envoy-internal-note": "payments db",
                          "x-envoy-max-retries": "5"})
    assert reply.status == 200
    assert reply.headers["x-upstream-name"] == "demo_a"
    assert upstreams.requests("demo_b") == []
    seen = only_request(upstreams, "demo_a")
    # ATP's own routing headers stop at Envoy: none reaches the model upstream, nor a
    # client's x-envoy-* header (Envoy honours some from a local client: retries).
    assert not [h for h in seen["headers"] if h.startswith("x-atp-")], seen["headers"]
    assert not {"x-envoy-internal-note", "x-envoy-max-retries"} & set(seen["headers"])


def test_every_response_carries_its_request_id(stack: Stack, upstreams: Upstreams) -> None:
    """The id POST /v1/feedback takes is on the response, even one the client sent."""
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "id please"}]})
    assert reply.status == 200
    assert reply.headers["x-request-id"] == only_request(upstreams, "demo_a")["headers"][
        "x-request-id"]
    refused = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": []}, key=None)
    assert refused.status == 401 and refused.headers.get("x-request-id")


def test_complete_answers_and_refusals_are_recorded_as_they_were(stack: Stack) -> None:
    # Envoy resets the ext_proc stream once it has ATP's last answer, which could cancel
    # gRPC's write of it after it went out: 4 to 25 of 100 complete answers were recorded
    # as response_incomplete (and counted failed), with a warning that Envoy stopped
    # waiting. How often depends on timing (test_server_offload has the exact case).
    sent: dict[str, int] = {}
    for i in range(40):
        reply = post(stack, CHAT, {"model": "gpt-4o-mini", "stream": i % 3 == 1, "messages": [
            {"role": "user", "content": f"complete {i}"}]}, key=ALICE if i % 4 else "sk-no")
        assert reply.status == (200 if i % 4 else 401)
        sent[reply.headers["x-request-id"]] = reply.status
    seen: dict[str, dict] = {}

    def all_recorded() -> bool:
        seen.update({r["request_id"]: r for r in exchange_records(stack)
                     if r["request_id"] in sent})
        return len(seen) == len(sent)

    wait_until(all_recorded, "a record of every request", timeout=10)
    assert {rid: (r["status"], r["error_code"] or None) for rid, r in seen.items()} == {
        rid: (status, None if status == 200 else "invalid_api_key")
        for rid, status in sent.items()}
    assert "Envoy stopped waiting" not in stack.log("atp")


def test_a_reply_envoy_gives_without_text_still_says_what_happened(tmp_path) -> None:
    # A model routed to a cluster Envoy lacks: the 503's message was "".
    from atp_extproc.stack import render_envoy

    def without_demo_b(doc: dict) -> None:
        clusters = doc["static_resources"]["clusters"]
        clusters[:] = [c for c in clusters if c["name"] != "demo_b"]

    stack = Stack.on_free_ports(workdir=tmp_path)
    try:
        stack.start_upstream("demo_a")
        stack.start_atp()
        stack.start_envoy(render_envoy(stack.ports, edit=without_demo_b))
        reply = post(stack, CHAT, {"model": "gpt-4o",
                                   "messages": [{"role": "user", "content": "hi"}]})
        error = reply.json()["error"]
        assert (reply.status, error["code"]) == (503, "cluster_not_found")
        assert error["message"] == "Envoy could not complete this request (cluster_not_found)"
    finally:
        stack.stop_all()


def _atp_hosts_healthy(admin_port: int) -> dict[int, bool]:
    """Port → passing its health checks, for each endpoint of Envoy's atp cluster."""
    reply = http(f"http://127.0.0.1:{admin_port}/clusters?format=json")
    (atp,) = [c for c in reply.json()["cluster_statuses"] if c["name"] == "atp"]
    return {h["address"]["socket_address"]["port_value"]:
            not h["health_status"].get("failed_active_health_check")
            for h in atp.get("host_statuses", [])}


def test_replicas_as_readme_sets_them_serve_while_most_are_down(tmp_path) -> None:
    # Two of three ATP endpoints down (a replica stopped, another draining): under
    # Envoy's default panic threshold (50%) it sent exchanges to all three, and two in
    # three requests failed closed with a 500 though one ATP could serve them all.
    # README "Scaling out" sets the threshold to 0 for replicas.
    from atp_extproc.stack import free_port, render_envoy

    dead = [free_port(), free_port()]

    def three_endpoints(doc: dict) -> None:
        (atp,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "atp"]
        atp["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
        endpoints = atp["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints += [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}} for port in dead]

    stack = Stack.on_free_ports(workdir=tmp_path)
    try:
        stack.start_upstream("demo_a")
        stack.start_atp()
        stack.start_envoy(render_envoy(stack.ports, edit=three_endpoints), wait_for_atp=False)
        wanted = {stack.ports["atp"]: True, **dict.fromkeys(dead, False)}
        wait_until(lambda: _atp_hosts_healthy(stack.ports["admin"]) == wanted,
                   "envoy's health verdicts on the three ATP endpoints", timeout=20)
        statuses = [post(stack, CHAT, {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": f"hi {i}"}]}).status for i in range(12)]
        assert statuses == [200] * 12
    finally:
        stack.stop_all()


def test_a_slow_model_gets_the_route_timeout_not_the_idle_timeout(tmp_path) -> None:
    """A non-streamed answer is silent until complete, which Envoy counts as idle: the
    model route's own idle timeout must reach its timeout, or stream_idle_timeout (shorter)
    cuts every slow answer first. Scaled down: listener idle 1s, model route 3s (as
    shipped, the route's idle timeout is its timeout), model answers after 1.8s."""
    from atp_extproc.stack import render_envoy

    def scale(doc: dict) -> None:
        for listener in doc["static_resources"]["listeners"]:
            manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
            manager["stream_idle_timeout"] = "1s"
            for vhost in manager["route_config"]["virtual_hosts"]:
                for route in vhost["routes"]:
                    action = route.get("route", {})
                    if "idle_timeout" in action:
                        assert action["idle_timeout"] == action["timeout"], route
                        action["idle_timeout"] = "3s"
                    if "timeout" in action:
                        action["timeout"] = "3s"

    stack = Stack.on_free_ports(workdir=tmp_path)
    try:
        stack.start_upstream("demo_a", "--latency-ms", "1800")
        stack.start_upstream("demo_b")
        stack.start_atp()
        stack.start_envoy(render_envoy(stack.ports, edit=scale))
        reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "slow"}]})
        assert reply.status == 200, reply.body[:300]
    finally:
        stack.stop_all()


def test_logs_hold_no_query_string_nor_a_path_or_method_the_client_made_up(
        stack: Stack, upstreams: Upstreams) -> None:
    in_query, in_path = "sk-live-INQUERY123", "sk-live-INPATH456"
    post(stack, CHAT + f"?key={in_query}&mail=jo.query@example.com",
         {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    post(stack, f"/v1/jo.path@example.com/{in_path}", {"model": "gpt-4o-mini"})
    http(stack.base_url + "/v1/models/jo.model@example.com",
         headers={"authorization": f"Bearer {ALICE}"})
    in_method = "sk-live-INMETHOD789"  # HTTP/2 takes any token as a method
    assert h2_post(stack, CHAT, b"{}", trailers=False, method=in_method)[0] == 405
    # Both logs write the unknown path and method as "<other>" and a model id as {id}.
    wait_until(lambda: all('"path": "<other>"' in stack.log(name).replace('":"', '": "')
                           and '"method": "<other>"' in stack.log(name).replace('":"', '": "')
                           and "/v1/models/{id}" in stack.log(name)
                           for name in ("atp", "envoy")), "the requests logged", timeout=10)
    for name in ("atp", "envoy"):
        log = stack.log(name)
        assert [w for w in (in_query, in_path, in_method, "jo.query", "jo.path", "jo.model")
                if w in log] == [], name


def test_the_query_string_never_reaches_the_provider(stack: Stack, upstreams: Upstreams) -> None:
    """No OpenAI API reads a query string on these paths, and redaction never sees one: a
    key or an e-mail put there must not leave with the request."""
    reply = post(stack, CHAT + "?api-key=sk-live-INQUERY789&mail=jo.query@example.com",
                 {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}]})
    assert reply.status == 200, reply.body[:300]
    assert only_request(upstreams, "demo_a")["path"] == CHAT


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-7", 'application/json;CHARSET="UTF-16"',
    "application/json; charset=utf-8, application/json; charset=utf-16"])
def test_a_charset_that_writes_ascii_otherwise_is_refused(stack: Stack, upstreams: Upstreams,
                                              content_type: str) -> None:
    """The provider's server decodes by the charset named (aiohttp, body-parser): UTF-7's
    `+AEA-` is its `@`, and JSON punctuation written so gave it another document than
    the one ATP checked."""
    reply = post(stack, CHAT, {"model": "gpt-4o", "messages": [
        {"role": "user", "content": "mail john.doe+AEA-example.com"}]},
                 headers={"content-type": content_type})
    assert reply.status == 415, reply.body
    assert reply.json()["error"]["code"] == "unsupported_charset"
    assert upstreams.total() == 0


def test_the_provider_is_told_the_body_is_json(stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"}]}, headers={"content-type": "text/plain; a=b"})
    assert reply.status == 200, reply.body
    assert only_request(upstreams, "demo_a")["headers"]["content-type"] == "application/json"


@pytest.mark.parametrize("expect", ["100-continue, foo", "200-ok"])
def test_an_expectation_never_reaches_the_provider(stack: Stack, upstreams: Upstreams,
                                                   expect: str) -> None:
    # The provider answered it with a plain-text 417.
    reply = post(stack, CHAT, {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"}]}, headers={"expect": expect})
    assert reply.status == 200, reply.body
    assert "expect" not in only_request(upstreams, "demo_a")["headers"]


def test_a_second_key_of_another_tenant_is_401(stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "x"}]},
                 headers={"api-key": BOB})
    assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert upstreams.total() == 0


def h2_post(stack: Stack, path: str, body: bytes, trailers: bool = True,
            method: str = "POST") -> tuple[int, bytes]:
    """One HTTP/2 (prior knowledge) POST, its body sent as flow control allows, then
    trailers (or the end of the stream); the answer's status and body."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    host, port = stack.base_url.removeprefix("http://").split(":")
    status, answer, ended = 0, b"", False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        def pump() -> None:
            nonlocal status, answer, ended
            data = sock.recv(65536)
            assert data, "connection closed before the answer ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            sock.sendall(conn.data_to_send())

        conn.initiate_connection()
        conn.send_headers(1, [(":method", method), (":scheme", "http"), (":path", path),
                              (":authority", "localhost"),
                              ("content-type", "application/json"),
                              ("authorization", f"Bearer {ALICE}")])
        sock.sendall(conn.data_to_send())
        sent = 0
        while sent < len(body) and not ended:
            room = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
            if room <= 0:
                pump()
                continue
            conn.send_data(1, body[sent:sent + room])
            sent += room
            sock.sendall(conn.data_to_send())
        if not ended:
            if trailers:
                conn.send_headers(1, [("x-checksum", "abc")], end_stream=True)
            else:
                conn.end_stream(1)
            sock.sendall(conn.data_to_send())
        while not ended:
            pump()
    return status, answer


def test_a_malformed_http2_request_fails_alone(stack: Stack, upstreams: Upstreams) -> None:
    """A request HTTP/2 forbids (a connection-specific header) beside one in flight on the
    same connection: Envoy reset the whole connection, losing the good request too."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    host, port = stack.base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "still here"}]}).encode()
    events: dict[int, list] = {1: [], 3: []}
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", CHAT),
                              (":authority", "localhost"), ("content-type", "application/json"),
                              ("authorization", f"Bearer {ALICE}")])
        conn.send_data(1, body[:10])
        conn.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":path", "/v1/models"),
                              (":authority", "localhost"), ("authorization", f"Bearer {ALICE}"),
                              ("connection", "keep-alive")], end_stream=True)
        sock.sendall(conn.data_to_send())
        wait_until(lambda: events[3] or _pump(sock, conn, events), "the bad stream's end",
                   timeout=10)
        conn.send_data(1, body[10:], end_stream=True)
        sock.sendall(conn.data_to_send())
        wait_until(lambda: any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
                               for e in events[1]) or _pump(sock, conn, events),
                   "the good stream's end", timeout=10)
    assert [type(e) for e in events[3]] == [h2.events.StreamReset]
    assert any(isinstance(e, h2.events.ResponseReceived)
               and dict(e.headers)[b":status"] == b"200" for e in events[1])
    assert json.loads(only_request(upstreams, "demo_a")["body"])["messages"][0][
        "content"] == "still here"


def _pump(sock: socket.socket, conn, events: dict[int, list]) -> bool:
    """Read what has come on `sock` into `events` by stream; False (poll again)."""
    data = sock.recv(65536)
    assert data, "Envoy closed the connection"
    for event in conn.receive_data(data):
        if getattr(event, "stream_id", None) in events:
            events[event.stream_id].append(event)
    sock.sendall(conn.data_to_send())
    return False


def test_an_http2_request_with_trailers_is_served(stack: Stack, upstreams: Upstreams) -> None:
    """Trailers follow the body, so Envoy hands ATP the whole buffered body without
    end_of_stream: it is complete all the same (the ext_proc stream says it buffers)."""
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "trailers"}]}).encode()
    status, answer = h2_post(stack, CHAT, body)
    assert status == 200, answer[:300]
    assert json.loads(only_request(upstreams, "demo_a")["body"])["model"] == "demo-small-2026"


def test_a_long_header_envoy_accepts_reaches_the_upstream(
        stack: Stack, upstreams: Upstreams) -> None:
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "long"}]},
                 headers={"x-trace-context": "t" * 20000})
    assert reply.status == 200, reply.body[:200]
    assert len(only_request(upstreams, "demo_a")["headers"]["x-trace-context"]) == 20000


def test_head_on_the_models_list_is_get_without_a_body(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {ALICE}"}
    reply = http(stack.base_url + "/v1/models", "HEAD", headers=auth)
    assert (reply.status, reply.body) == (200, b"")
    assert reply.headers["content-type"] == "application/json"
    reply = http(stack.base_url + "/v1/models", "DELETE", headers=auth)
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"


def test_headers_that_leave_no_room_for_atps_get_a_431(stack: Stack, upstreams: Upstreams) -> None:
    """About 90 headers pass Envoy's limit of 100 until ATP adds its routing headers."""
    reply = post(stack, CHAT, {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "x"}]},
                 headers={f"x-pad-{i}": "v" for i in range(90)})
    assert reply.status == 431
    error = reply.json()["error"]
    assert error["code"] == "request_headers_too_large" and error["message"]
    assert upstreams.total() == 0


def test_an_http2_body_past_envoys_buffer_gets_a_413(stack: Stack, upstreams: Upstreams) -> None:
    """Over HTTP/2 Envoy hands ATP the whole body, past its own buffer: the client must
    read that its body is too large (ATP's 413), not that ATP is down."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "x" * (9 * 1024 * 1024)}]}).encode()
    status, answer = h2_post(stack, CHAT, body, trailers=False)
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["code"] == "request_too_large"
    assert upstreams.total() == 0


def test_an_http2_request_of_trailers_and_no_body_is_a_400(
        stack: Stack, upstreams: Upstreams) -> None:
    status, answer = h2_post(stack, CHAT, b"")
    assert status == 400, answer[:300]
    assert json.loads(answer)["error"]["code"] == "missing_body"
    assert upstreams.total() == 0
