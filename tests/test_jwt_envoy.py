"""Identity from a token Envoy's jwt_authn filter verified, through a real Envoy: the
shipped front proxy with a jwt_authn filter put in front of ext_proc, as a deployment
that uses JWTs adds one (HS256 with an inline JWKS, so no key material is needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atp_extproc.stack import Stack, render_envoy
from tests.conftest import Upstreams, post
from tests.test_policy_redact_envoy import record_with

SECRET = b"a test secret of thirty-two bytes"
ISSUER = "https://issuer.test"
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


HEADER = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())


def token(claims: dict, secret: bytes = SECRET) -> str:
    signed = f"{HEADER}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"


def claims(**extra) -> dict:
    return {"iss": ISSUER, "aud": "atp", "exp": int(time.time()) + 600, "sub": "jane",
            **extra}


def _with_jwt_authn(doc: dict) -> None:
    jwks = {"keys": [{"kty": "oct", "alg": "HS256", "k": _b64(SECRET)}]}
    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
                     "JwtAuthentication",
            "providers": {"test": {
                "issuer": ISSUER, "audiences": ["atp"],
                "local_jwks": {"inline_string": json.dumps(jwks)},
                "payload_in_metadata": "jwt_payload"}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "test"}}],
        },
    }
    front = next(li for li in doc["static_resources"]["listeners"] if li["name"] == "front")
    hcm = front["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    filters.insert(next(i for i, f in enumerate(filters)
                        if f["name"] == "envoy.filters.http.ext_proc"), jwt_authn)


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory) -> Iterator[Stack]:
    stack = Stack.on_free_ports(workdir=Path(tmp_path_factory.mktemp("jwt")))
    try:
        stack.start_upstream("demo_a")
        stack.start_upstream("demo_b")
        stack.start_atp()
        stack.start_envoy(render_envoy(stack.ports, edit=_with_jwt_authn))
        yield stack
    finally:
        stack.stop_all()


def test_a_verified_token_names_the_tenant(jwt_stack: Stack) -> None:
    upstreams = Upstreams(jwt_stack)
    upstreams.clear()
    reply = post(jwt_stack, CHAT, BODY, key=token(claims(tenant="bob")))
    assert reply.status == 200, reply.body[:300]
    (seen,) = upstreams.requests("demo_a") + upstreams.requests("demo_b")
    assert "authorization" not in seen["headers"]
    record = record_with(jwt_stack, seen["headers"]["x-request-id"])
    assert (record["tenant"], record["auth_method"]) == ("bob", "jwt")


@pytest.mark.parametrize("bad", ["expired", "wrong key", "wrong audience"])
def test_a_token_jwt_authn_refuses_is_an_openai_shaped_auth_error(jwt_stack: Stack,
                                                                  bad: str) -> None:
    upstreams = Upstreams(jwt_stack)
    upstreams.clear()
    body = {"expired": claims(tenant="bob", exp=int(time.time()) - 600),
            "wrong key": claims(tenant="bob"),
            "wrong audience": claims(tenant="bob", aud="other")}[bad]
    secret = b"another secret of thirty-two byte" if bad == "wrong key" else SECRET
    reply = post(jwt_stack, CHAT, BODY, key=token(body, secret))
    assert reply.status in (401, 403)
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_token")
    assert error["message"]
    assert upstreams.total() == 0


def test_a_verified_token_with_an_unusable_tenant_claim_is_refused(jwt_stack: Stack) -> None:
    upstreams = Upstreams(jwt_stack)
    upstreams.clear()
    reply = post(jwt_stack, CHAT, BODY, key=token(claims(tenant=42)))
    assert reply.status == 401
    assert reply.json()["error"]["message"] == \
        "The token's 'tenant' claim is not a valid tenant id."
    assert upstreams.total() == 0


def test_a_token_whose_claims_nest_too_deep_for_protobuf_is_a_client_error(
        jwt_stack: Stack) -> None:
    # jwt_authn passes claims 31 levels deep (it takes 100); Envoy's message to ATP then
    # nests past protobuf's limit, and gRPC's reader failed the stream: a 500 blaming ATP,
    # with no record.
    upstreams = Upstreams(jwt_stack)
    upstreams.clear()
    deep: dict = {}
    for _ in range(31):
        deep = {"a": deep}
    reply = post(jwt_stack, CHAT, BODY, key=token(claims(tenant="bob", deep=deep)))
    assert reply.status == 400, reply.body[:300]
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "metadata_unreadable")
    assert upstreams.total() == 0
    record = record_with(jwt_stack, reply.headers["x-request-id"])
    assert (record["status"], record["error_code"], record["path"]) == (
        400, "metadata_unreadable", CHAT)


# -- check --envoy: the token's claims must reach ATP --------------------------------------


def _lint(edit) -> list[str]:
    from atp_extproc.policy.envoy_lint import jwt_problems
    from atp_extproc.stack import DEFAULT_PORTS

    def both(doc: dict) -> None:
        _with_jwt_authn(doc)
        edit(doc)
    text = render_envoy(dict(DEFAULT_PORTS), edit=both)
    return [p.reason for p in jwt_problems("envoy.yaml", text, "envoy.filters.http.jwt_authn",
                                           "jwt_payload")]


def _filters(doc: dict) -> list[dict]:
    front = next(li for li in doc["static_resources"]["listeners"] if li["name"] == "front")
    return front["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def _payload_key(doc: dict) -> None:
    jwt = next(f for f in _filters(doc) if f["name"] == "envoy.filters.http.jwt_authn")
    jwt["typed_config"]["providers"]["test"]["payload_in_metadata"] = "claims"


def _no_forwarding(doc: dict) -> None:
    ext = next(f for f in _filters(doc) if f["name"] == "envoy.filters.http.ext_proc")
    del ext["typed_config"]["metadata_options"]


def _after(doc: dict) -> None:
    filters = _filters(doc)
    jwt = next(f for f in filters if f["name"] == "envoy.filters.http.jwt_authn")
    filters.remove(jwt)
    filters.insert(len(filters) - 1, jwt)


def test_check_passes_jwt_authn_wired_to_atp() -> None:
    assert _lint(lambda doc: None) == []


@pytest.mark.parametrize(("edit", "says"), [
    (_payload_key, "payload_in_metadata is 'claims'"),
    (_no_forwarding, "forwarding_namespaces.untyped lacks envoy.filters.http.jwt_authn"),
    (_after, "jwt_authn comes after ext_proc"),
])
def test_check_refuses_jwt_authn_whose_claims_never_reach_atp(edit, says) -> None:
    (reason,) = _lint(edit)
    assert says in reason and "ATP never sees" in reason
