"""Who is calling: the tenant, from a source ATP can trust, and how it was established."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from atp_extproc.config import TOKEN, ApiKey, Snapshot
from atp_extproc.llm_api import RequestError


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    method: str  # api_key | jwt | trusted_header | anonymous
    key_id: str | None = None
    # The verified token's claims, when the token established the tenant (method jwt):
    # a token that did not must not lend its groups to another identity's policies.
    claims: struct_pb2.Struct | None = field(default=None, compare=False)


def _unauthorized(message: str, code: str = "invalid_api_key") -> RequestError:
    return RequestError(401, message, code, type_="authentication_error")


def _no_tenant(snapshot: Snapshot) -> str:
    """What a caller who named no tenant should send: only what this config reads."""
    auth = snapshot.auth
    if snapshot.api_keys and auth.jwt is None and auth.trusted_tenant_header is None:
        return "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
    ways = []
    if snapshot.api_keys:
        ways.append("send an API key as 'Authorization: Bearer KEY'")
    if auth.jwt is not None:
        ways.append(f"send a token whose '{auth.jwt.tenant_claim}' claim names the tenant")
    if auth.trusted_tenant_header is not None:
        # Not named: to whoever reaches ATP past the hop, the name would say which
        # header claims any tenant.
        ways.append("come through the hop in front, which names the tenant")
    return "The request does not say who is calling: " + ", or ".join(ways) + "."


def _jwt_payload(snapshot: Snapshot,
                 metadata: struct_pb2.Struct | None) -> struct_pb2.Struct | None:
    """The claims of a token Envoy's jwt_authn verified, if any."""
    jwt = snapshot.auth.jwt
    if jwt is None or metadata is None:
        return None
    payload = metadata.fields.get(jwt.payload_key)
    if payload is None or not payload.HasField("struct_value"):
        return None
    return payload.struct_value


_REGISTERED = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti")


def _is_token(bearer: str, payload: struct_pb2.Struct) -> bool:
    """Whether `bearer` is the token whose verified claims are `payload` (jwt_authn with
    `forward: true` leaves it in Authorization): then it is no API key."""
    parts = bearer.split(".")
    if len(parts) != 3:
        return False
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    if not isinstance(claims, dict):
        return False
    # The registered claims, as the token has them: Envoy may rewrite others in its
    # metadata (normalize_payload_in_metadata), and holds numbers as doubles.
    verified = json_format.MessageToDict(payload)
    shared = [k for k in _REGISTERED if k in claims or k in verified]
    if not shared:  # a token of custom claims only: all of them must agree
        return bool(claims == verified)
    return all(_same_claim(claims.get(k), verified.get(k)) for k in shared)


def _same_claim(token: Any, verified: Any) -> bool:
    # Envoy's metadata holds numbers as doubles: an integer claim past 2**53 (iat, exp)
    # is the token's own only as a double.
    if isinstance(token, int | float) and isinstance(verified, int | float):
        try:
            return float(token) == float(verified)
        except OverflowError:  # past any double, so not what Envoy verified: no crash
            return False
    return bool(token == verified)


def _jwt_shaped(bearer: str) -> bool:
    """A JWS in compact form: three base64url parts, the first a JSON header naming its
    algorithm. No API key is one."""
    parts = bearer.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    return isinstance(header, dict) and "alg" in header


def _lookup(snapshot: Snapshot, key: str) -> ApiKey:
    # The header's own bytes (read as Latin-1): a key with é, sent as UTF-8 and hashed
    # as `printf %s KEY | sha256sum` does, matched only in its garbled spelling.
    try:
        sent = key.encode("latin-1")
    except UnicodeEncodeError:
        sent = key.encode()
    digest = hashlib.sha256(sent).hexdigest()
    found = snapshot.api_keys.get(digest)
    # The dict lookup already matched; compare again in constant time so a partial match
    # never returns sooner than a miss.
    if found is None or not hmac.compare_digest(found.sha256, digest):
        raise _unauthorized("Incorrect API key provided.")
    return found


def _api_key(snapshot: Snapshot, headers: dict[str, str],
             payload: struct_pb2.Struct | None) -> ApiKey | None:
    """The configured key the request's credentials name, or None when it sends none.

    Every key sent must be valid and all must be the same key: served as one of them, a
    wrong or another tenant's second key would never be told apart from the right one.
    The bearer token is hashed at once and never stored or logged.
    """
    if not snapshot.api_keys:
        return None
    authorization = headers.get("authorization", "")
    scheme, _, bearer = authorization.partition(" ")
    bearer = bearer.strip()
    is_bearer = scheme.lower() == "bearer"
    for name, value in (("authorization", bearer if is_bearer else ""),
                        ("api-key", headers.get("api-key", "")),
                        ("x-api-key", headers.get("x-api-key", ""))):
        # headers_of joins a repeated header with commas, which no key nor bearer token
        # holds (another scheme's one header may: Digest): told as such, not as a wrong key.
        if "," in value:
            raise _unauthorized(f"The {name} header holds more than one value (sent twice, "
                                "or with a comma): send the key once, as "
                                "'Authorization: Bearer KEY'.")
    sent = [headers[name] for name in ("api-key", "x-api-key") if headers.get(name)]
    if is_bearer and bearer:
        # jwt_authn with `forward: true` leaves the verified token there: it is no API key.
        if payload is None or not _is_token(bearer, payload):
            sent.insert(0, bearer)
    elif authorization.strip():
        # A credential of another scheme, or an empty Bearer: unreadable, so refused even
        # beside a valid key (every credential sent must be one).
        raise _unauthorized("Authorization holds no API key (another scheme, no "
                            "'Bearer ' before the key, or an empty Bearer); send the key "
                            "as 'Authorization: Bearer KEY'.")
    if sent == [headers.get("x-api-key")]:
        raise _unauthorized("ATP does not read x-api-key: send the key as "
                            "'Authorization: Bearer KEY'.")
    if snapshot.auth.jwt is not None and sent[:1] == [bearer] and _jwt_shaped(bearer):
        try:
            _lookup(snapshot, bearer)
        except RequestError:
            # jwt_authn let it through unverified (allow_missing_or_failed, so JWTs and
            # keys share Authorization): "Incorrect API key" sent its caller to the
            # wrong fix.
            raise _unauthorized("The bearer token is a JWT that Envoy's jwt_authn did not "
                                "verify (expired, not yet valid, or of another issuer, "
                                "audience or signing key), and no API key.",
                                "invalid_token") from None
    keys = {_lookup(snapshot, key) for key in sent}
    if len(keys) > 1:
        raise _unauthorized("The request carries different API keys (Authorization, "
                            "api-key, x-api-key): send one.")
    return keys.pop() if keys else None


def identify(
    snapshot: Snapshot, headers: dict[str, str], jwt_metadata: struct_pb2.Struct | None
) -> Identity:
    """Order: verified JWT claims, then an API key, then a trusted header, then anonymous.

    A credential that is no valid key (wrong, revoked, unreadable) is refused, never served
    as another source's tenant, which would keep a revoked key working.
    """
    payload = _jwt_payload(snapshot, jwt_metadata)
    no_tenant = _no_tenant(snapshot)
    # A token whose tenant claim is there but unusable (42, "", a list) names a tenant
    # ATP cannot use: only a valid API key may still say who is calling.
    bad_claim: str | None = None
    if payload is not None:
        assert snapshot.auth.jwt is not None
        name = snapshot.auth.jwt.tenant_claim
        claim = payload.fields.get(name)
        if claim is None:
            # A verified token without the claim leaves the tenant to the other sources.
            no_tenant = (f"The token has no '{name}' claim naming the tenant, and no API "
                         "key was sent.")
        else:
            tenant = claim.string_value if claim.HasField("string_value") else ""
            if TOKEN.fullmatch(tenant):
                return Identity(tenant, "jwt", claims=payload)
            bad_claim = f"The token's '{name}' claim is not a valid tenant id."
    key = _api_key(snapshot, headers, payload)
    if key is not None:
        return Identity(key.tenant, "api_key", key.key_id)
    if bad_claim is not None:
        raise _unauthorized(bad_claim, "invalid_token")
    header = snapshot.auth.trusted_tenant_header
    if header is not None and headers.get(header):
        if "," in headers[header]:  # headers_of joins a repeated header with commas
            raise _unauthorized(f"The request carries more than one {header} header: "
                                "send the tenant once.")
        if not TOKEN.fullmatch(headers[header]):
            raise _unauthorized(f"The {header} header is not a valid tenant id.")
        return Identity(headers[header], "trusted_header")
    if snapshot.auth.anonymous_tenant is not None:
        return Identity(snapshot.auth.anonymous_tenant, "anonymous")
    raise _unauthorized(no_tenant)
