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


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("api-key") or None


def _jwt_tenant(snapshot: Snapshot, metadata: struct_pb2.Struct | None) -> str | None:
    jwt = snapshot.auth.jwt
    if jwt is None or metadata is None:
        return None
    payload = metadata.fields.get(jwt.payload_key)
    if payload is None or not payload.HasField("struct_value"):
        return None
    claim = payload.struct_value.fields.get(jwt.tenant_claim)
    if claim is None or not claim.HasField("string_value") or not claim.string_value:
        return None
    return claim.string_value


def identify(
    snapshot: Snapshot, headers: dict[str, str], jwt_metadata: struct_pb2.Struct | None
) -> Identity:
    """Order: verified JWT claims, then an API key, then a trusted header, then anonymous.

    The bearer token is hashed at once and never stored or logged.
    """
    tenant = _jwt_tenant(snapshot, jwt_metadata)
    if tenant is not None:
        if not TOKEN.fullmatch(tenant):
            raise _unauthorized("The token's tenant claim is not a valid tenant id.")
        return Identity(tenant, "jwt")
    token = _bearer(headers)
    if token is not None and snapshot.api_keys:
        digest = hashlib.sha256(token.encode()).hexdigest()
        key = snapshot.api_keys.get(digest)
        # The dict lookup already matched; compare again in constant time so a partial
        # match never returns sooner than a miss.
        if key is not None and hmac.compare_digest(key.sha256, digest):
            return Identity(key.tenant, "api_key", key.key_id)
        # A key that is wrong (mistyped, revoked) is refused, never served as the
        # trusted header's or the anonymous tenant: that would keep a revoked key working.
        raise _unauthorized("Incorrect API key provided.")
    header = snapshot.auth.trusted_tenant_header
    if header is not None and headers.get(header):
        if not TOKEN.fullmatch(headers[header]):
            raise _unauthorized(f"The {header} header is not a valid tenant id.")
        return Identity(headers[header], "trusted_header")
    if snapshot.auth.anonymous_tenant is not None:
        return Identity(snapshot.auth.anonymous_tenant, "anonymous")
    raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer "
                        "KEY'.")
