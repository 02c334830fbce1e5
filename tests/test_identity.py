"""Unit tests for atp_extproc.identity: who is calling, and from which source."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from atp_extproc import config
from atp_extproc.identity import Identity, identify
from atp_extproc.llm_api import RequestError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "atp.yaml"
ALICE = "sk-demo-alice"
BOB = "sk-demo-bob"

MODELS_AND_ROUTES = """
models:
  - name: small
    cluster: demo_a
    upstream_model: up-small
    price: {input_per_1k: 0.001, output_per_1k: 0.002}
routes:
  - name: chat
    aliases: {fast: [small]}
"""


def snapshot(auth_yaml: str) -> config.Snapshot:
    return config.parse(auth_yaml + MODELS_AND_ROUTES, "identity-test.yaml")


def key_entry(key: str, key_id: str, tenant: str) -> str:
    return (f"    - key_id: {key_id}\n      tenant: {tenant}\n"
            f"      sha256: {config.hash_api_key(key)}\n")


@pytest.fixture(scope="module")
def example() -> config.Snapshot:
    return config.load(EXAMPLE)


def jwt_metadata(claims: dict, payload_key: str = "jwt_payload") -> struct_pb2.Struct:
    """Shaped like the filter metadata Envoy's jwt_authn writes: {payload_key: claims}."""
    meta = struct_pb2.Struct()
    meta.update({payload_key: claims})
    return meta


def refused(snap: config.Snapshot, headers: dict[str, str],
            meta: struct_pb2.Struct | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        identify(snap, headers, meta)
    return info.value


# -- API keys ----------------------------------------------------------------------


def test_api_key_gives_tenant_and_key_id(example) -> None:
    who = identify(example, {"authorization": f"Bearer {ALICE}"}, None)
    assert who == Identity("alice", "api_key", "alice-demo")
    who = identify(example, {"authorization": f"Bearer {BOB}"}, None)
    assert who == Identity("bob", "api_key", "bob-demo")


@pytest.mark.parametrize("value", [f"bearer {ALICE}", f"BEARER {ALICE}",
                                   f"Bearer   {ALICE}  ", f"Bearer {ALICE}\t"])
def test_bearer_scheme_case_and_spaces(example, value: str) -> None:
    assert identify(example, {"authorization": value}, None).tenant == "alice"


def test_api_key_header(example) -> None:
    who = identify(example, {"api-key": BOB}, None)
    assert who == Identity("bob", "api_key", "bob-demo")


def test_the_same_key_in_two_headers_is_one_credential(example) -> None:
    for other in ("api-key", "x-api-key"):
        who = identify(example, {"authorization": f"Bearer {ALICE}", other: ALICE}, None)
        assert who == Identity("alice", "api_key", "alice-demo")


@pytest.mark.parametrize("other", ["api-key", "x-api-key"])
@pytest.mark.parametrize("second", ["sk-wrong", BOB])
def test_a_second_key_that_is_wrong_or_another_is_401(example, other, second) -> None:
    # Served as the Bearer's tenant, a wrong or another tenant's second key would pass
    # unnoticed: every credential sent must be valid, and all the same key.
    err = refused(example, {"authorization": f"Bearer {ALICE}", other: second})
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert ("Incorrect API key" if second == "sk-wrong" else "different API keys") \
        in err.message


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer sk-wrong"},
        {"authorization": f"Bearer {ALICE}x"},
        {"authorization": f"Bearer {ALICE[:-1]}"},
        {"authorization": f"Bearer {ALICE.upper()}"},
        {"api-key": "sk-wrong"},
        {"authorization": f"Bearer {config.hash_api_key(ALICE)}"},  # the digest is no key
    ],
)
def test_wrong_key_is_401(example, headers: dict[str, str]) -> None:
    err = refused(example, headers)
    assert (err.status, err.code, err.type) == (401, "invalid_api_key", "authentication_error")
    assert "Incorrect API key" in err.message


@pytest.mark.parametrize("headers", [{}, {"authorization": ""}, {"api-key": ""}])
def test_missing_key_is_401(example, headers: dict[str, str]) -> None:
    err = refused(example, headers)
    assert (err.status, err.code, err.type) == (401, "invalid_api_key", "authentication_error")
    assert "send an API key as 'Authorization: Bearer KEY'" in err.message


@pytest.mark.parametrize("authorization", [
    "Bearer", "Bearer   ", f"Basic {ALICE}", ALICE, f"Bearer\t{ALICE}",
    # One header of another scheme, with commas of its own: no repeated header.
    'Digest username="alice", realm="atp", nonce="x"'])
def test_an_unreadable_authorization_is_told_as_such(example, authorization: str) -> None:
    # A credential was sent: "you didn't provide an API key" sent its sender looking
    # for the wrong mistake.
    err = refused(example, {"authorization": authorization})
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert err.message.startswith("Authorization holds no API key")


@pytest.mark.parametrize("name, value", [
    ("authorization", f"Bearer {ALICE},Bearer {ALICE}"), ("api-key", f"{ALICE},{ALICE}")])
def test_a_repeated_key_header_is_told_as_such(example, name: str, value: str) -> None:
    # Joined by commas, the right key twice was refused as "Incorrect API key".
    err = refused(example, {name: value})
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert f"The {name} header holds more than one value" in err.message


def test_a_key_in_x_api_key_is_refused_with_where_to_send_it(example) -> None:
    err = refused(example, {"x-api-key": ALICE})
    assert err.status == 401 and "Authorization: Bearer" in err.message


def test_token_without_configured_keys_is_not_accepted() -> None:
    snap = snapshot("auth:\n  jwt: {}\n")
    err = refused(snap, {"authorization": f"Bearer {ALICE}"})
    assert err.status == 401


# -- JWT ---------------------------------------------------------------------------


def test_jwt_claims_win_over_api_key(example) -> None:
    meta = jwt_metadata({"sub": "u1", "tenant": "carol", "iss": "https://idp"})
    who = identify(example, {"authorization": f"Bearer {ALICE}"}, meta)
    assert who == Identity("carol", "jwt", None)


def test_jwt_claims_win_over_wrong_api_key(example) -> None:
    meta = jwt_metadata({"tenant": "carol"})
    assert identify(example, {"authorization": "Bearer sk-wrong"}, meta).tenant == "carol"


def test_jwt_alone(example) -> None:
    assert identify(example, {}, jwt_metadata({"tenant": "dave"})) == Identity("dave", "jwt")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "u1"},                 # no tenant claim
        {"tenant": ""},                # empty
        {"tenant": 7},                 # not a string
        {"tenant": True},
        {"tenant": ["alice"]},
        {"tenant": {"id": "alice"}},
        {"tenant": None},
    ],
)
def test_jwt_without_usable_tenant_falls_back_to_api_key(example, claims: dict) -> None:
    who = identify(example, {"authorization": f"Bearer {BOB}"}, jwt_metadata(claims))
    assert who == Identity("bob", "api_key", "bob-demo")


def test_jwt_payload_not_a_struct_is_ignored(example) -> None:
    meta = struct_pb2.Struct()
    meta.update({"jwt_payload": "tenant=evil"})
    assert identify(example, {"authorization": f"Bearer {BOB}"}, meta).tenant == "bob"


def test_jwt_under_other_payload_key_is_ignored(example) -> None:
    meta = jwt_metadata({"tenant": "evil"}, payload_key="other")
    assert identify(example, {"authorization": f"Bearer {BOB}"}, meta).tenant == "bob"


def test_jwt_metadata_ignored_when_jwt_not_configured() -> None:
    snap = snapshot("auth:\n  api_keys:\n" + key_entry(ALICE, "a", "alice"))
    meta = jwt_metadata({"tenant": "evil"})
    assert identify(snap, {"authorization": f"Bearer {ALICE}"}, meta).tenant == "alice"
    assert refused(snap, {}, meta).status == 401


def test_jwt_custom_payload_key_and_claim() -> None:
    snap = snapshot("auth:\n  jwt: {payload_key: claims, tenant_claim: org}\n")
    meta = jwt_metadata({"org": "acme", "tenant": "wrong"}, payload_key="claims")
    assert identify(snap, {}, meta) == Identity("acme", "jwt")
    assert refused(snap, {}, jwt_metadata({"tenant": "x"}, payload_key="claims")).status == 401


def test_empty_metadata_struct(example) -> None:
    assert identify(example, {"api-key": ALICE}, struct_pb2.Struct()).tenant == "alice"


# -- trusted header and anonymous --------------------------------------------------


def test_trusted_header_only_when_configured(example) -> None:
    # Not configured: the header is just a header.
    assert refused(example, {"x-tenant": "mallory"}).status == 401
    snap = snapshot("auth:\n  trusted_tenant_header: x-tenant\n")
    assert identify(snap, {"x-tenant": "acme"}, None) == Identity("acme", "trusted_header")
    assert refused(snap, {"x-other": "acme"}).status == 401
    assert refused(snap, {"x-tenant": ""}).status == 401


def test_a_repeated_trusted_header_is_told_as_such() -> None:
    # Joined by commas, two tenants were refused as "not a valid tenant id".
    snap = snapshot("auth:\n  trusted_tenant_header: x-tenant\n")
    with pytest.raises(RequestError) as exc:
        identify(snap, {"x-tenant": "bob,alice"}, None)
    assert exc.value.status == 401 and "more than one x-tenant header" in exc.value.message


def test_api_key_wins_over_trusted_header() -> None:
    snap = snapshot("auth:\n  trusted_tenant_header: x-tenant\n  api_keys:\n"
                    + key_entry(ALICE, "a", "alice"))
    who = identify(snap, {"x-tenant": "acme", "authorization": f"Bearer {ALICE}"}, None)
    assert who == Identity("alice", "api_key", "a")
    assert identify(snap, {"x-tenant": "acme"}, None).tenant == "acme"


def test_wrong_key_with_trusted_header_but_no_anonymous_is_401() -> None:
    snap = snapshot("auth:\n  trusted_tenant_header: x-tenant\n  api_keys:\n"
                    + key_entry(ALICE, "a", "alice"))
    assert refused(snap, {"x-tenant": "acme", "authorization": "Bearer nope"}).status == 401


def test_trusted_header_name_is_case_insensitive() -> None:
    snap = snapshot("auth:\n  trusted_tenant_header: X-Tenant-Id\n")
    assert identify(snap, {"x-tenant-id": "acme"}, None).tenant == "acme"


def test_anonymous_fallback() -> None:
    snap = snapshot("auth:\n  anonymous_tenant: public\n")
    assert identify(snap, {}, None) == Identity("public", "anonymous")


def test_anonymous_after_jwt_and_keys_miss() -> None:
    snap = snapshot("auth:\n  anonymous_tenant: public\n  jwt: {}\n  api_keys:\n"
                    + key_entry(ALICE, "a", "alice"))
    assert identify(snap, {}, jwt_metadata({"sub": "x"})) == Identity("public", "anonymous")
    assert identify(snap, {"api-key": ALICE}, None) == Identity("alice", "api_key", "a")
    assert identify(snap, {}, jwt_metadata({"tenant": "t"})) == Identity("t", "jwt")


@pytest.mark.parametrize("extra", ["", "  trusted_tenant_header: x-t\n"])
def test_a_wrong_key_is_refused_even_with_an_anonymous_tenant(extra) -> None:
    # Served as the anonymous (or the header's) tenant, a revoked key would keep working
    # and a mistyped one would never be told: a credential sent must be a valid key.
    snap = snapshot("auth:\n  anonymous_tenant: public\n" + extra + "  api_keys:\n"
                    + key_entry(ALICE, "a", "alice"))
    for headers in ({"api-key": "wrong"}, {"authorization": "Bearer wrong", "x-t": "acme"},
                    {"x-api-key": "wrong"}, {"authorization": "Basic dXNlcjpwYXNz"},
                    {"authorization": "wrong"}):
        with pytest.raises(RequestError) as info:
            identify(snap, headers, None)
        assert (info.value.status, info.value.code) == (401, "invalid_api_key")
    assert identify(snap, {}, None) == Identity("public", "anonymous")


def bearer_of(claims: dict) -> str:
    """An Authorization value carrying a token with these claims (jwt_authn `forward`)."""
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
    return f"Bearer {part({'alg': 'RS256'})}.{part(claims)}.c2ln"


JWT_AND_KEYS = ("auth:\n  anonymous_tenant: public\n  jwt:\n    tenant_claim: org\n"
                "  api_keys:\n" + key_entry(ALICE, "a", "alice"))


@pytest.mark.parametrize("forwarded", [True, False])
@pytest.mark.parametrize("claim", [42, "", ["acme"], None])
def test_a_verified_token_with_an_unusable_tenant_claim_is_refused(claim, forwarded) -> None:
    # Numeric tenant ids (common in identity providers) must not become the anonymous
    # tenant: the token names a tenant ATP cannot use; and the error says so.
    claims = {"org": claim, "exp": 1767225600}
    headers = {"authorization": bearer_of(claims)} if forwarded else {}
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), headers, jwt_metadata(claims))
    assert (info.value.status, info.value.message) == (
        401, "The token's 'org' claim is not a valid tenant id.")


def test_a_verified_token_without_a_tenant_claim_is_no_wrong_key() -> None:
    claims = {"sub": "u1", "exp": 1767225600, "nested": {"a": [1, "b"]}}
    who = identify(snapshot(JWT_AND_KEYS), {"authorization": bearer_of(claims)},
                   jwt_metadata(claims))
    assert who == Identity("public", "anonymous")


def test_a_wrong_key_beside_a_verified_token_without_a_tenant_claim_is_refused() -> None:
    # The token came in another header (jwt_authn from_headers): the Bearer is a key.
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), {"authorization": "Bearer sk-revoked"},
                 jwt_metadata({"sub": "u1"}))
    assert (info.value.status, info.value.message) == (401, "Incorrect API key provided.")


def test_a_token_without_a_tenant_claim_and_nothing_else_says_so() -> None:
    snap = snapshot("auth:\n  jwt:\n    tenant_claim: org\n  api_keys:\n"
                    + key_entry(ALICE, "a", "alice"))
    with pytest.raises(RequestError) as info:
        identify(snap, {}, jwt_metadata({"sub": "u1"}))
    assert "no 'org' claim" in info.value.message


def test_only_the_token_that_named_the_tenant_lends_its_claims() -> None:
    who = identify(snapshot(JWT_AND_KEYS), {"authorization": f"Bearer {ALICE}"},
                   jwt_metadata({"sub": "u1", "groups": ["llm-admins"]}))
    assert (who.method, who.claims) == ("api_key", None)
    who = identify(snapshot(JWT_AND_KEYS), {}, jwt_metadata({"org": "acme", "sub": "u1"}))
    assert who.method == "jwt" and who.claims is not None and who.claims["sub"] == "u1"


def test_trusted_header_before_anonymous() -> None:
    snap = snapshot("auth:\n  anonymous_tenant: public\n  trusted_tenant_header: x-t\n")
    assert identify(snap, {"x-t": "acme"}, None).method == "trusted_header"
    assert identify(snap, {}, None).method == "anonymous"


@pytest.mark.parametrize(("auth", "says", "never"), [
    # The trusted header is never named: it would tell anyone how to claim a tenant.
    ("  trusted_tenant_header: x-t\n", "calling: come through the hop in front", "x-t"),
    ("  jwt: {tenant_claim: org}\n", "a token whose 'org' claim names the tenant",
     "API key"),
    ("  jwt: {tenant_claim: org}\n  trusted_tenant_header: x-t\n",
     "claim names the tenant, or come through the hop in front", "x-t"),
])
def test_a_caller_naming_no_tenant_is_told_what_this_config_reads(
        auth: str, says: str, never: str) -> None:
    # Told "You didn't provide an API key" where no key can work, a caller who sent
    # one went on sending it.
    for headers in ({}, {"authorization": f"Bearer {ALICE}"}):
        err = refused(snapshot("auth:\n" + auth), headers)
        assert (err.status, err.type) == (401, "authentication_error")
        assert says in err.message and never not in err.message


def test_a_bearer_too_deep_to_read_is_no_token_but_a_wrong_key() -> None:
    deep = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), {"authorization": f"Bearer a.{deep}.c"},
                 jwt_metadata({"sub": "u1"}))
    assert (info.value.status, info.value.message) == (401, "Incorrect API key provided.")


def test_a_forwarded_token_is_known_by_its_registered_claims() -> None:
    # Envoy rewrites some claims in its metadata (normalize_payload_in_metadata) and
    # holds numbers as doubles: the token is still the verified one.
    raw = {"sub": "u1", "exp": 1767225600, "scope": "openid email", "n": 2**53 + 1}
    verified = {"sub": "u1", "exp": 1767225600, "scope": ["openid", "email"],
                "n": float(2**53)}
    who = identify(snapshot(JWT_AND_KEYS), {"authorization": bearer_of(raw)},
                   jwt_metadata(verified))
    assert who == Identity("public", "anonymous")


def test_an_unusable_tenant_claim_is_an_invalid_token() -> None:
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), {}, jwt_metadata({"org": 42}))
    assert info.value.code == "invalid_token"


def test_policies_see_only_the_string_groups_of_a_token_as_policy_test_does() -> None:
    from atp_extproc.policy.runtime import claimed_subject
    claims = {"sub": "u1", "groups": ["llm-admins", 7, True, None], "roles": "a b"}
    struct = struct_pb2.Struct()
    struct.update(claims)
    assert claimed_subject(struct) == claimed_subject(claims) == {
        "user": "u1", "groups": ["llm-admins"], "roles": ["a", "b"]}


def test_space_separated_groups_split_on_spaces_alone() -> None:
    # Split on any whitespace, a group named "sales<NBSP>admin" gave its holder "admin".
    from atp_extproc.policy.runtime import claimed_subject
    subject = claimed_subject({"groups": "sales\u00a0admin  ops", "roles": "a\u2003b"})
    assert (subject["groups"], subject["roles"]) == (["sales\u00a0admin", "ops"], ["a\u2003b"])


@pytest.mark.parametrize("groups", [[f"g{i}" for i in range(100)],
                                    " ".join(f"g{i}" for i in range(100)),
                                    # strings past the cap behind a number
                                    [f"g{i}" for i in range(64)] + [7, "contractor"]])
def test_a_groups_claim_cut_to_the_list_cap_is_named_truncated(groups) -> None:
    # The list form was cut before the attribute document saw it: no cut was named, and
    # a policy on 'subject.groups' in context.truncated missed it.
    from atp_extproc.policy.runtime import attributes_for_request
    attrs = attributes_for_request(
        tenant="t", auth_method="jwt", key_id=None, jwt_payload={"groups": groups},
        path="/v1/chat/completions", operation="chat", alias="a", body_bytes=2, doc={})
    assert len(attrs.subject.groups) == 64
    assert "subject.groups" in attrs.doc.context.truncated


def test_a_forwarded_token_of_custom_claims_only_is_no_key() -> None:
    claims = {"team": "red", "level": 3}
    who = identify(snapshot(JWT_AND_KEYS), {"authorization": bearer_of(claims)},
                   jwt_metadata(claims))
    assert who == Identity("public", "anonymous")


def test_a_forwarded_token_with_an_integer_past_a_double_is_still_known() -> None:
    # Envoy's metadata holds iat as a double: 2**60+1 arrives as 2**60, the same claim.
    raw = {"sub": "u1", "iat": 2**60 + 1}
    who = identify(snapshot(JWT_AND_KEYS), {"authorization": bearer_of(raw), "api-key": ALICE},
                   jwt_metadata({"sub": "u1", "iat": float(2**60 + 1)}))
    assert who.tenant == "alice"


def test_a_key_with_non_ascii_characters_matches_its_utf8_digest() -> None:
    # Envoy's header bytes are read as Latin-1: hashed as that text's UTF-8, the key
    # matched only a garbled digest, never the one `printf %s KEY | sha256sum` gives.
    key = "sk-café-ünï"
    snap = snapshot("auth:\n  api_keys:\n" + key_entry(key, "k", "carol"))
    sent = key.encode().decode("latin-1")  # as headers_of gives the header
    assert identify(snap, {"authorization": f"Bearer {sent}"}, None).tenant == "carol"


def test_a_bearer_with_an_integer_past_any_double_is_no_token_not_a_crash() -> None:
    # float() of a 401-digit exp raised OverflowError: ATP failed the stream, and the
    # client got 500 "ATP is down" for what is a token jwt_authn did not verify.
    bearer = bearer_of({"sub": "u1", "exp": 10**400})
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), {"authorization": bearer},
                 jwt_metadata({"sub": "u1", "exp": 1.0}))
    assert (info.value.status, info.value.code) == (401, "invalid_token")


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   "])
def test_an_unreadable_authorization_beside_a_valid_key_is_401(example, authorization) -> None:
    err = refused(example, {"authorization": authorization, "api-key": ALICE})
    assert err.status == 401 and "Authorization holds no API key" in err.message


def test_a_header_envoy_sends_as_text_reads_as_its_raw_bytes_do() -> None:
    # An older Envoy fills `value`, not `raw_value`: read as it came, a key with é
    # matched no digest.
    from envoy.config.core.v3 import base_pb2

    from atp_extproc.envoy_api import headers_of

    key = "sk-café-ünï"
    snap = snapshot("auth:\n  api_keys:\n" + key_entry(key, "k", "carol"))
    for header in (base_pb2.HeaderValue(key="api-key", raw_value=key.encode()),
                   base_pb2.HeaderValue(key="api-key", value=key)):
        headers = headers_of(base_pb2.HeaderMap(headers=[header]))
        assert identify(snap, headers, None).tenant == "carol"


@pytest.mark.parametrize("metadata", [None, {"sub": "u1"}])
def test_a_jwt_jwt_authn_did_not_verify_is_an_invalid_token_not_a_wrong_key(metadata) -> None:
    # allow_missing_or_failed lets an expired or foreign token through unverified (as
    # JWTs and keys share Authorization): "Incorrect API key provided." sent its caller
    # to the wrong fix.
    headers = {"authorization": bearer_of({"org": "acme", "exp": 1})}
    with pytest.raises(RequestError) as info:
        identify(snapshot(JWT_AND_KEYS), headers,
                 None if metadata is None else jwt_metadata(metadata))
    assert (info.value.status, info.value.code) == (401, "invalid_token")
    assert "jwt_authn did not verify" in info.value.message
    # Where ATP reads no JWTs, a JWT is a wrong key as any other.
    with pytest.raises(RequestError) as info:
        identify(snapshot("auth:\n  api_keys:\n" + key_entry(ALICE, "a", "alice")),
                 headers, None)
    assert info.value.code == "invalid_api_key"
