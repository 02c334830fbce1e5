"""Who is calling: the tenant, from a source ATP can trust, and how it was established."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from google.protobuf import struct_pb2

from atp_extproc.config import TOKEN, Snapshot
from atp_extproc.llm_api import RequestError


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    method: str  # api_key | jwt | trusted_header | anonymous
    key_id: str | None = None


def _unauthorized(message: str) -> RequestError:
    return RequestError(401, message, "invalid_api_key", type_="authentication_error")


def _credential(headers: dict[str, str]) -> tuple[str | None, bool]:
    """(the API key the request carries, or None; whether it carries a credential at all,
    readable or not: an `Authorization` of another scheme, an empty Bearer, `x-api-key`)."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), True
    key = headers.get("api-key") or None
    return key, bool(key or value.strip() or headers.get("x-api-key"))


_NO_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."


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


def _jwt_tenant(snapshot: Snapshot, payload: struct_pb2.Struct | None) -> str | None:
    if payload is None:
        return None
    assert snapshot.auth.jwt is not None
    claim = payload.fields.get(snapshot.auth.jwt.tenant_claim)
    if claim is None or not claim.HasField("string_value") or not claim.string_value:
        return None
    return claim.string_value


def identify(
    snapshot: Snapshot, headers: dict[str, str], jwt_metadata: struct_pb2.Struct | None
) -> Identity:
    """Order: verified JWT claims, then an API key, then a trusted header, then anonymous.

    The bearer token is hashed at once and never stored or logged.
    """
    payload = _jwt_payload(snapshot, jwt_metadata)
    tenant = _jwt_tenant(snapshot, payload)
    if tenant is not None:
        if not TOKEN.fullmatch(tenant):
            raise _unauthorized("The token's tenant claim is not a valid tenant id.")
        return Identity(tenant, "jwt")
    token, presented = _credential(headers)
    header = snapshot.auth.trusted_tenant_header
    # A verified token that has no tenant claim at all is the Bearer, and no key; one
    # whose claim is there but unusable (42, "", a list) is not vouched for.
    claimless = payload is not None and snapshot.auth.jwt is not None and (
        snapshot.auth.jwt.tenant_claim not in payload.fields)
    if token is not None and snapshot.api_keys:
        digest = hashlib.sha256(token.encode()).hexdigest()
        key = snapshot.api_keys.get(digest)
        # The dict lookup already matched; compare again in constant time so a partial
        # match never returns sooner than a miss.
        if key is not None and hmac.compare_digest(key.sha256, digest):
            return Identity(key.tenant, "api_key", key.key_id)
    # A credential that is no valid key (wrong, revoked, unreadable) is refused, never
    # served as the trusted header's or the anonymous tenant, which would keep a revoked
    # key working; unless it is the token Envoy's jwt_authn verified (no tenant claim).
    if presented and snapshot.api_keys and not claimless:
        if token is not None:
            raise _unauthorized("Incorrect API key provided.")
        if headers.get("x-api-key"):
            raise _unauthorized("ATP does not read x-api-key: send the key as "
                                "'Authorization: Bearer KEY'.")
        raise _unauthorized(_NO_KEY)
    if header is not None and headers.get(header):
        if not TOKEN.fullmatch(headers[header]):
            raise _unauthorized(f"The {header} header is not a valid tenant id.")
        return Identity(headers[header], "trusted_header")
    if snapshot.auth.anonymous_tenant is not None:
        return Identity(snapshot.auth.anonymous_tenant, "anonymous")
    raise _unauthorized(_NO_KEY)
