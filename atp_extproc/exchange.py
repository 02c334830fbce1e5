"""One HTTP exchange through the ext_proc phases: the pipeline.

request_headers → who is calling, which API; /v1/models and a shadow copy's origin
request_body    → inspect: parse, check, resolve alias → route, redact, policies
                  route:   choose the model (router), rewrite, tag the cluster (and mirror)
response_headers→ status, time to first byte, attempts; ask for the body only when usage
                  (or a placeholder to restore) is in it
response_body   → usage (JSON or SSE), drop the usage chunk ATP asked for, restore, price
end of stream   → one record, written once; learning and the ledger fed from it
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote

from google.protobuf import struct_pb2

from atp_extproc import envoy_api, logs
from atp_extproc.config import CREDENTIAL_HEADERS, TOKEN, Model, Route, Snapshot, envoy_buffer_limit
from atp_extproc.envoy_api import ProcessingMode, ProcessingRequest, ProcessingResponse
from atp_extproc.identity import Identity, identify
from atp_extproc.llm_api import (
    OPERATIONS,
    USAGE_TAIL_BYTES,
    LlmRequest,
    ParsedBody,
    RequestError,
    SseStream,
    Usage,
    check_depth,
    estimate_tokens,
    mirror_hazard,
    needs_usage_injection,
    parse_body,
    read_request,
    read_response,
    rewrite,
    usage_in_tail,
    wrong_case,
)
from atp_extproc.policy.engine import Outcome
from atp_extproc.policy.runtime import (
    ForcedToolStripped,
    attributes_for_request,
    forces_one_of,
    input_declaring,
    strip_tools,
    tool_choice_without,
)
from atp_extproc.redact import Redaction, Restorer
from atp_extproc.redact.redactor import (
    INCOMPLETE,
    JSON_TOO_DEEP,
    KEYS_COLLIDE,
    LONE_SURROGATE,
)
from atp_extproc.routing.feedback import finish_reason_score
from atp_extproc.routing.router import NoCandidateError, classify_status
from atp_extproc.routing.selection import CandidateModel
from atp_extproc.routing.settings import baseline_for
from atp_extproc.routing.sticky import sticky_key
from atp_extproc.services import Services
from atp_extproc.store.ledger import LedgerEntry
from atp_extproc.store.money import PICO_PER_USD, PriceSnapshot
from atp_extproc.store.sqlite import ShadowHalf

log = logging.getLogger("atp.exchange")

CLUSTER_HEADER = "x-atp-cluster"
ATP_HEADER_PREFIX = "x-atp-"
# Set on the primary request for Envoy's mirror policy and read back, on the mirrored
# copy, by ATP behind the shadow listener (which only Envoy's mirror can reach).
SHADOW_CLUSTER_HEADER = "x-atp-shadow-cluster"
SHADOW_CLUSTER = "atp_shadow"
SHADOW_MODEL_HEADER = "x-atp-shadow-model"
ROUTE_HEADER = "x-atp-route"
TENANT_HEADER = "x-atp-tenant"
FEEDBACK_PATH = "/v1/feedback"
_FEEDBACK_FIELDS = ("request_id", "score")
# The record's error_code when the answer's body never reached its end.
INCOMPLETE_RESPONSE = "response_incomplete"
# ... and when the request's body never came whole (the client left while sending it).
INCOMPLETE_REQUEST = "request_incomplete"
# ... and when a stream that began 200 ended with the provider's error event.
STREAM_ERROR = "upstream_stream_error"
# ... and when Envoy stopped waiting for ATP's answer (message_timeout, or the client left).
ABANDONED = "atp_answer_abandoned"
# ... and when a 2xx answer is no answer of the API: a proxy's HTML page, an empty body,
# JSON that is no object, a stream without one event: the provider failed.
INVALID_RESPONSE = "upstream_invalid_response"
# ... and when Envoy answered 413 itself: the body outgrew its buffer before ATP saw it.
ENVOY_TOO_LARGE = "request_payload_too_large"
# Envoy's own request id is the join key for everything recorded about a request.
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What routing may add to a body after redaction: the model id, stream_options.
_ROUTING_ROOM_BYTES = 4096
# A redacted body this small cannot outgrow Envoy's buffer (see _check_growth).
_GROWTH_UNMEASURED_BYTES = 64 * 1024


@dataclass
class ExchangeRecord:
    """Everything ATP learned about one request; never prompt text or secrets."""

    request_id: str = ""
    config_version: str = ""
    method: str = ""
    path: str = ""
    operation: str = ""
    tenant: str = ""
    auth_method: str = ""
    key_id: str | None = None
    route: str = ""
    alias: str = ""
    model: str = ""
    cluster: str = ""
    upstream_model: str = ""
    stream: bool = False
    usage_injected: bool = False
    request_bytes: int = 0
    status: int = 0
    error_code: str = ""
    # Time to the response headers; for a stream, to its first event (the first token).
    ttfb_ms: float | None = None
    duration_ms: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage_estimated: bool = False
    cost_usd: float | None = None
    # Learned routing (routes with an objective)
    shadow: bool = False
    candidate_set: tuple[str, ...] = ()
    # "model:reason" for candidates left out (policy, breaker_open, p95_latency, ...)
    routing_excluded: tuple[str, ...] = ()
    routing_decision_us: float | None = None
    regret_estimate: float | None = None
    routing_explored: bool = False
    # The chosen model is a half-open breaker's one trial request (it is among the
    # excluded, as breaker_half_open, for every other request), or the tenant's or
    # user's sticky pick.
    routing_probe: bool = False
    routing_sticky: bool = False
    routing_fallback: str = ""
    proposed_model: str = ""
    predicted_savings_usd: float | None = None
    mirror_to: str = ""
    # Envoy's attempts at the upstream: above 1, a retry or a fallback answered
    attempts: int = 1
    # Redaction: counts per data class, never values
    data_classes: dict[str, int] | None = None
    non_text_parts: int = 0
    redaction_incomplete: bool = False
    restored: bool = False
    # Restore stopped at its budget: the rest of the answer kept its placeholders.
    restore_limited: bool = False
    # Policy
    policy_denied: str | None = None
    policy_would_deny: str | None = None
    policy_eval_us: float | None = None
    tools_stripped: tuple[str, ...] = ()


class Exchange:
    def __init__(self, snapshot: Snapshot, clock=time.perf_counter,
                 services: Services | None = None, shadow: bool = False):
        self.snapshot = snapshot
        self.clock = clock
        self.services = services
        self.started = clock()
        # When ATP passed the request on: a model's latency (ttfb, what routing learns)
        # counts from here, not from the request's headers, after which a slow client
        # or a big prompt may take seconds to upload.
        self._forwarded: float | None = None
        self.record = ExchangeRecord(config_version=snapshot.version, shadow=shadow)
        self.identity: Identity | None = None
        self.route: Route | None = None
        self.model: Model | None = None
        self.policy: Outcome | None = None
        self.restorer: Restorer | None = None
        self.finish_reason: str | None = None
        self._answer_id: str | None = None  # a Responses answer's, which a later turn names
        self._redaction: Redaction | None = None
        self._parsed: ParsedBody | None = None
        self._text_bytes: int | None = None  # the body's size, escapes as UTF-8
        self._changes: dict[str, object] = {}
        self._drop: tuple[str, ...] = ()
        self._path = ""  # the request's path without its query (the record's is for logs)
        # Envoy says (protocol_config, on the first message) that it buffers the request
        # body: then a body without end_of_stream is whole, and trailers follow it.
        self._body_buffered = False
        self._allowed: list[str] | None = None
        self._shadow_model = ""
        self.request: LlmRequest | None = None
        self.sse: SseStream | None = None
        self._response_body = bytearray()
        # A JSON answer Envoy cannot buffer (no length, or over max_body_bytes) comes in
        # STREAMED chunks: kept here up to max_body_bytes, held back while a restore waits;
        # past that bound it goes on unread, counted here (0: still within the bound), as
        # is a compressed answer's length: the output is then estimated from its size.
        self._unread_bytes = 0
        self._unread_tail = b""  # the end of an answer too large to read, for its usage
        # How far a stream's ttfb has come: 0 its headers, 1 its first event with data,
        # 2 its first output (a token).
        self._ttfb_at = 0
        self._compressed = False  # the answer is compressed: passed on unread
        # ATP asked for the response body and its end has not come (yet): at finish, the
        # answer was cut off (upstream reset, client gone) and its outcome is unknown.
        self._body_pending = False
        self._answered = False  # the answer's headers came (Envoy's own answer too)
        # Envoy holds the answer's headers until its BUFFERED body has come: the length
        # that body has, and how much of it came.
        self._buffered_length: int | None = None
        self._buffered_got = 0
        self._finished = False

    def handle(self, message: ProcessingRequest) -> ProcessingResponse | None:
        phase = message.WhichOneof("request")
        try:
            if phase == "request_headers":
                return self._on_request_headers(message)
            if phase == "request_body":
                return self._on_request_body(message.request_body)
            if phase == "response_headers":
                return self._on_response_headers(message.response_headers)
            if phase == "response_body":
                return self._on_response_body(message.response_body)
            if phase == "request_trailers":
                return self._on_request_trailers(message.request_trailers)
            if phase == "response_trailers":
                return envoy_api.trailers(request=False)
        except RequestError as err:
            return self._refuse(err)
        # Fail closed: anything ATP does not understand stops the request here.
        return self._refuse(RequestError(500, "ATP could not process this request",
                                         "atp_unexpected_phase", type_="server_error"))

    def _refuse(self, err: RequestError) -> ProcessingResponse:
        self.record.status = err.status
        self.record.error_code = err.code
        return envoy_api.immediate(err.status, err.body(), err.headers,
                                   details=f"atp_{err.code}")

    # -- request -------------------------------------------------------------------

    def _on_request_headers(self, message: ProcessingRequest) -> ProcessingResponse:
        headers = envoy_api.headers_of(message.request_headers.headers)
        rec = self.record
        request_id = headers.get("x-request-id", "")
        rec.request_id = request_id if _REQUEST_ID_OK.fullmatch(request_id) else ""
        method = headers.get(":method", "")
        # HTTP/2 takes any token as a method: what the client typed (a key, a card
        # number) is no record's; the standard ones are.
        rec.method = method if method in _METHODS else "<other>"
        self._body_buffered = (message.protocol_config.request_body_mode
                               == ProcessingMode.BUFFERED)
        path, has_query, _ = headers.get(":path", "").partition("?")
        self._path = path
        rec.path = _loggable(path)
        if envoy_api.UNREADABLE_METADATA in message.metadata_context.filter_metadata:
            # Fail closed: the identity (a token's claims) may be in what was not read.
            raise RequestError(400, "ATP cannot read this request's metadata: it nests data "
                               "more than 100 levels deep (a token's claims past about 30 "
                               "levels) or holds text that is not UTF-8", "metadata_unreadable")
        if rec.shadow:
            return self._on_shadow_headers(headers)
        jwt = self.snapshot.auth.jwt
        jwt_metadata: struct_pb2.Struct | None = None
        if jwt is not None:
            jwt_metadata = message.metadata_context.filter_metadata.get(jwt.metadata_namespace)
        self.identity = identify(self.snapshot, headers, jwt_metadata)
        rec.tenant = self.identity.tenant
        rec.auth_method = self.identity.method
        rec.key_id = self.identity.key_id

        if path == "/v1/models" or path.startswith("/v1/models/"):
            return self._answer_models(rec.method, path)
        operation = "feedback" if path == FEEDBACK_PATH else OPERATIONS.get(path)
        if operation is None:
            # (CONNECT names no path.)
            raise RequestError(404, f"Invalid URL ({f'{rec.method} {_echo(path)}'.strip()}): "
                               f"ATP serves {_SERVED}", "unknown_url")
        if rec.method != "POST":
            # A standard name in another case ("post", which HTTP/2 passes) is said so.
            shown = rec.method if rec.method != "<other>" else (
                f"{method!r} (methods are case-sensitive)" if method.upper() in _METHODS
                else "<other>")
            raise RequestError(405, f"Method {shown} is not allowed on {path}: ATP "
                               f"serves {_SERVED}", "method_not_allowed",
                               headers={"allow": "POST"})
        if message.request_headers.end_of_stream:
            raise RequestError(400, "The request has no body", "missing_body")
        encoding = headers.get("content-encoding", "identity")
        if _encoded(encoding):
            # ATP reads the body as JSON text and forwards what it read: a compressed body
            # would be unreadable, and a label kept on a rewritten body would be false.
            raise RequestError(415, f"Content-Encoding {_echo(encoding)!r} is not supported; send "
                               "the JSON body uncompressed", "unsupported_content_encoding")
        charset = _foreign_charset(headers.get("content-type", ""))
        if charset is not None:
            raise RequestError(415, f"Content-Type charset {charset!r} is not supported; "
                               "send the JSON body as UTF-8", "unsupported_charset")
        rec.operation = operation
        if operation == "feedback":
            return envoy_api.request_headers()
        # ATP reads the body as UTF-8 JSON, and the provider must read what ATP read: a
        # label it would decode otherwise (text/plain, a charset parameter) is replaced.
        # No OpenAI API reads a query string on these paths, and one can carry what
        # redaction never sees (an `api-key=`, an e-mail): the provider gets the path only.
        remove = self._never_forwarded(headers)
        if "expect" in headers:
            # Envoy answers 100-continue itself and passes other expectations on; ATP
            # forwards a whole body, so none is the provider's to answer (with a plain
            # text 417).
            remove.append("expect")
        return envoy_api.request_headers(
            remove_headers=remove,
            set_headers={**_JSON_ONLY, ":path": path} if has_query else _JSON_ONLY)

    def _never_forwarded(self, headers: dict[str, str]) -> list[str]:
        """What of `headers` (or trailers) must not reach a provider: the client's
        credential for ATP, the tenant header (the hop's word to ATP alone, like a
        credential), the account a key bills (the client's key is not the one that
        leaves: beside the key Envoy injects, a tenant would pick which organization or
        project of it pays and whose stored state it reads), the proxy credential and
        cookies the client sent the gateway, and any x-atp-* header,
        which only ATP sets."""
        trusted = self.snapshot.auth.trusted_tenant_header
        identity_headers = (*CREDENTIAL_HEADERS, trusted) if trusted else CREDENTIAL_HEADERS
        return [*identity_headers, *_ACCOUNT_HEADERS, *_GATEWAYS_OWN,
                *(h for h in headers if h.startswith(ATP_HEADER_PREFIX))]

    def _on_request_trailers(self, trailers_msg) -> ProcessingResponse:
        if self.record.operation and self._parsed is None:
            # Trailers right after the headers: the request has no body (HTTP/2), and
            # Envoy sent no body message to check.
            raise RequestError(400, "The request has no body", "missing_body")
        return envoy_api.trailers(
            request=True,
            remove_headers=self._never_forwarded(envoy_api.headers_of(trailers_msg.trailers)))

    def _on_shadow_headers(self, headers: dict[str, str]) -> ProcessingResponse:
        """A mirrored copy: the primary exchange already authenticated, checked and
        redacted it; these headers say whose it is and which challenger measures it."""
        rec = self.record
        route_name = headers.get(ROUTE_HEADER, "")
        self._shadow_model = headers.get(SHADOW_MODEL_HEADER, "")
        tenant = headers.get(TENANT_HEADER, "")
        route = next((r for r in self.snapshot.routes if r.name == route_name), None)
        operation = OPERATIONS.get(self._path)
        if (route is None or operation is None or self._shadow_model not in
                self.snapshot.models or not TOKEN.fullmatch(tenant)):
            raise RequestError(400, "Not a mirrored request ATP sent", "atp_bad_shadow")
        self.route, rec.route = route, route.name
        self.identity = Identity(tenant, "shadow")
        rec.tenant, rec.auth_method, rec.operation = tenant, "shadow", operation
        return envoy_api.request_headers()

    def _answer_models(self, method: str, path: str) -> ProcessingResponse:
        if method not in ("GET", "HEAD"):  # (Envoy sends a HEAD's reply without its body)
            raise RequestError(405, f"Method {method} is not allowed on {_echo(path)}: ATP "
                               f"serves {_SERVED}", "method_not_allowed",
                               headers={"allow": "GET, HEAD"})
        assert self.identity is not None
        aliases = self.snapshot.aliases_for(self.identity.tenant)
        entries = [{"id": a, "object": "model", "created": 0, "owned_by": "atp"}
                   for a in aliases]
        if path == "/v1/models":
            body = {"object": "list", "data": entries}
        else:
            # Clients percent-encode the id as a path segment ("org/model" → org%2Fmodel).
            wanted = unquote(path.removeprefix("/v1/models/"))
            found = [e for e in entries if e["id"] == wanted]
            if not found:
                raise _model_not_found(wanted)
            body = found[0]
        self.record.status = 200
        return envoy_api.immediate(200, json.dumps(body).encode(), details="atp_models")

    def inspect_body(self, message: ProcessingRequest) -> ProcessingResponse | None:
        """The heavy half of the request body: parse, check, redact, evaluate policies.

        It reads only this exchange and the immutable snapshot, so the server may run it
        off the event loop for a large body; `route_body` then finishes on the loop.
        Returns a refusal, or None when the request may go on.
        """
        try:
            return self._inspect(message.request_body)
        except RequestError as err:
            return self._refuse(err)

    def route_body(self) -> ProcessingResponse:
        """The stateful half: the router's choice, then the rewrite and routing headers."""
        try:
            return self._route()
        except RequestError as err:
            return self._refuse(err)

    def _on_request_body(self, body_msg) -> ProcessingResponse:
        refused = self._inspect(body_msg)
        return refused if refused is not None else self._route()

    def _inspect(self, body_msg) -> ProcessingResponse | None:
        refused = self._check(body_msg)
        if refused is None and self.route is not None and self._wants_restore(self.route):
            # Built here, with the rest of the work that grows with the body (off the
            # event loop for a big one): one entry per placeholder, 100k for some bodies.
            assert self._redaction is not None
            # An answer Envoy buffers (up to max_body_bytes) stays within its buffer
            # restored (a stream, which it does not buffer, may grow more: Restorer.feed).
            max_body = self.snapshot.server.max_body_bytes
            self.restorer = Restorer(self._redaction.mapping,
                                     envoy_buffer_limit(max_body) - max_body)
        return refused

    def _check(self, body_msg) -> ProcessingResponse | None:
        rec = self.record
        if not rec.operation:
            # No headers came first (request_header_mode: SKIP): who sends it, to which
            # API, is unknown, so it cannot go.
            raise RequestError(500, "ATP received a request body without its headers",
                               "atp_unexpected_phase", type_="server_error")
        server = self.snapshot.server
        body = body_msg.body
        rec.request_bytes = len(body)
        if len(body) > server.max_body_bytes:
            raise RequestError(413, f"The request body is {len(body)} bytes; the limit is "
                               f"{server.max_body_bytes} bytes", "request_too_large")
        if not (body_msg.end_of_stream or self._body_buffered):
            # Envoy must buffer the body (request_body_mode: BUFFERED); a partial body
            # cannot be checked, so it cannot go.
            raise RequestError(500, "ATP received a partial request body",
                               "atp_partial_body", type_="server_error")
        if not body:
            # Announced by its headers, then none came (an empty chunked body, an HTTP/2
            # empty DATA frame): the same mistake as no body at all.
            raise RequestError(400, "The request has no body", "missing_body")
        parsed = parse_body(body, server.max_json_depth)
        self._parsed = parsed
        if rec.operation == "feedback":
            check_depth(parsed, server.max_json_depth)  # the same bound as any body
            return None
        redactor = self.snapshot.redactor
        request = read_request(rec.operation, parsed.doc, server,
                               redactor.scanned_fields if redactor else frozenset())
        check_depth(parsed, server.max_json_depth)
        if rec.operation == "responses" and parsed.doc.get("background") not in (None, False):
            # The provider would finish it later, to be fetched by GET /v1/responses/{id},
            # which ATP does not serve: an answer no one could collect, cancel, restore
            # or price, billed all the same.
            raise RequestError(400, "Background responses are not supported: ATP cannot "
                               "fetch, cancel or price a response the provider finishes "
                               "later; send the request without 'background'",
                               "unsupported_parameter", param="background")
        self.request = request
        rec.stream = request.stream
        assert self.identity is not None
        if rec.shadow:
            assert self.route is not None
            return None
        route, alias = self._resolve(request)
        self.route, rec.alias, rec.route = route, alias, route.name
        redaction = self._redact(parsed)
        if redaction is not None:
            self._changes.update(redaction.fields)
            self._drop = (*self._drop, *redaction.renamed)
            self._check_growth(parsed)
        if self.snapshot.policies is None:
            return None
        outcome = self._check_policies(route, alias, parsed.doc, len(body))
        if outcome.denied is not None:
            rec.status, rec.error_code = 403, outcome.denied.code
            return envoy_api.immediate(403, outcome.denied.error_body(),
                                       details="atp_policy_denied")
        if outcome.required_redactions and (redaction is None or redaction.incomplete):
            # Fail closed: a policy wants data redacted and nothing can do it, or the
            # scan stopped short (redaction.on_incomplete: allow lets only a request no
            # policy needs redacted go on so).
            requiring = [p for p, d in outcome.decisions.items() if d == "redact"]
            rec.policy_denied = requiring[0] if requiring else None
            rec.policy_would_deny = rec.policy_would_deny or rec.policy_denied
            why = ("redaction is off" if redaction is None else
                   "the scan of this request stopped short of its end")
            raise RequestError(403, "Policy requires redaction of "
                               f"{', '.join(sorted(outcome.required_redactions))}, "
                               f"but {why} (policy {', '.join(requiring)})",
                               "redaction_required", type_="permission_error",
                               policy_id=rec.policy_denied)
        if rec.policy_would_deny is None and (redaction is None or redaction.incomplete):
            # Enforced, a dry-run redact policy would have refused it so.
            rec.policy_would_deny = next(
                (p for p, d in outcome.decisions.items() if d == "would_redact"), None)
        self._allowed = [c.model for c in outcome.allowed_candidates]
        if outcome.strip_hits:
            # Stripped from what redaction left, or the kept tools would go out unredacted.
            doc = {**parsed.doc, **self._changes}
            self._strip_or_refuse(outcome, doc)
        return None

    def _strip_or_refuse(self, outcome: Outcome, doc: dict) -> None:
        """Strip the tools enforced policies strip, or refuse a request that insists on
        one, naming the policy; a request that would be refused so if the dry-run ones
        were enforced is recorded as policy_would_deny, as a dry-run deny is."""
        rec = self.record

        def insisting(names: tuple[str, ...]) -> str | None:
            refusal = self._tool_refusal(doc, names)
            return None if refusal is None else refusal.param

        denied, would_deny = outcome.strip_refusals(insisting)
        rec.policy_would_deny = rec.policy_would_deny or would_deny
        enforced = outcome.tools_to_strip
        if denied is not None:
            refusal = self._tool_refusal(doc, enforced)
            assert refusal is not None  # strip_refusals found it so
            refusal.policy_id = rec.policy_denied = denied
            raise refusal
        for keys in _TOOL_FIELDS if enforced else ():
            kept = strip_tools(doc, enforced, keys[0])
            if kept is not None:
                self._strip_tools(doc, kept, enforced, keys)

    def _tool_refusal(self, doc: dict, names: tuple[str, ...]) -> RequestError | None:
        """The refusal stripping the tools `names` from `doc` makes: a Responses input
        item declaring one, or a tool choice insisting on one; its `param` is the field."""
        declaring = input_declaring(self.record.operation, doc, names)
        if declaring is not None:
            return RequestError(403, f"{declaring} declares a tool this request may not "
                                "use", "tool_not_allowed", param=declaring,
                                type_="permission_error")
        # Either choice key may force a tool of either list (`function_call` one in
        # `tools`): each is checked against everything stripped.
        for keys in _TOOL_FIELDS:
            if forces_one_of(doc.get(keys[1]), names):
                return _forced_stripped(keys[1])
        for keys in _TOOL_FIELDS:
            kept = strip_tools(doc, names, keys[0])
            if kept is not None:
                try:
                    tool_choice_without(doc.get(keys[1]), names, bool(kept))
                except ForcedToolStripped:
                    return _forced_stripped(keys[1])
        return None

    def _check_growth(self, parsed: ParsedBody) -> None:
        """Refuse a body that placeholders would grow past Envoy's buffer (ATP's answer
        would fail as a 500). A placeholder (class names have at most 32 characters) is
        at most ~60 times the shortest value it can replace, so a body up to 64 KiB cannot
        get there, and only a larger one is measured."""
        limit = envoy_buffer_limit(self.snapshot.server.max_body_bytes)
        if not self._changes or self.record.request_bytes <= _GROWTH_UNMEASURED_BYTES:
            return
        size = len(rewrite(parsed, self._changes, self._drop)) + _ROUTING_ROOM_BYTES
        if size > limit:
            raise RequestError(413, f"With its personal data replaced by placeholders, the "
                               f"request body would be {size} bytes, over the {limit}-byte "
                               "limit of the proxy; send a smaller body",
                               "request_too_large")

    def _strip_tools(self, doc: dict, kept: list, names: tuple[str, ...],
                     keys: tuple[str, ...]) -> None:
        """Send the request on without the tools policy strips (`kept`: the rest of the
        list under keys[0]; keys: one of _TOOL_FIELDS)."""
        tools_key, choice_key = keys[:2]
        choice = doc.get(choice_key)
        # Refused already (_tool_refusal) if the choice insists on a stripped tool.
        new_choice = tool_choice_without(choice, names, bool(kept))
        assert self.policy is not None
        self.record.tools_stripped = self.policy.tools_stripped
        if kept:
            self._changes[tools_key] = kept
            if new_choice is not choice:
                self._changes[choice_key] = new_choice
        else:
            # Providers refuse an empty tools list, and tool settings without tools.
            for key in keys:
                self._changes.pop(key, None)
            self._drop = (*self._drop, *keys)

    def _route(self) -> ProcessingResponse:
        rec, parsed, changes = self.record, self._parsed, self._changes
        assert parsed is not None
        if rec.operation == "feedback":
            return self._answer_feedback(parsed.doc)
        request, route = self.request, self.route
        assert request is not None and route is not None
        headers: dict[str, str] = {}
        if rec.shadow:
            model = self.snapshot.models[self._shadow_model]
        else:
            model = self._choose(route, rec.alias, headers, self._allowed)
        self.model = model
        rec.model = model.name
        rec.cluster, rec.upstream_model = model.cluster, model.upstream_model
        headers[CLUSTER_HEADER] = model.cluster

        if request.model != model.upstream_model:
            changes["model"] = model.upstream_model
        if needs_usage_injection(request):
            # (Redacted first, where it held text.)
            options = changes.get("stream_options", parsed.doc.get("stream_options")) or {}
            changes["stream_options"] = {**options, "include_usage": True}
            rec.usage_injected = True
        new_body = rewrite(parsed, changes, drop=self._drop) if changes or self._drop else None
        # Usage (and any placeholder to restore) must be readable in the answer: no
        # compressed answers. Clients such as openai-python ask for gzip; and a request
        # without Accept-Encoding takes any coding (RFC 9110, 12.5.3).
        headers["accept-encoding"] = "identity"
        response = envoy_api.request_body(headers, new_body)
        self._forwarded = self.clock()
        return response

    def _redact(self, parsed: ParsedBody) -> Redaction | None:
        redactor = self.snapshot.redactor
        if redactor is None:
            return None
        assert self.identity is not None
        rec = self.record
        redaction = redactor.redact(rec.operation, parsed.doc, self.identity.tenant,
                                    parsed.text)
        self._redaction = redaction
        rec.data_classes = dict(redaction.counts)
        rec.non_text_parts = redaction.non_text_parts
        rec.redaction_incomplete = redaction.incomplete
        if redaction.denied == (JSON_TOO_DEEP,):
            raise RequestError(400, "A JSON text in the request (tool call arguments or a "
                               "tool result) is nested too deeply to be checked for "
                               "personal data", "json_too_deep")
        if redaction.denied == (LONE_SURROGATE,):
            raise RequestError(400, "We could not parse the JSON body of your request: a "
                               "JSON text in it (tool call arguments or a tool result) "
                               "escapes half of a UTF-16 surrogate pair (a lone surrogate), "
                               "which is not valid Unicode", "invalid_json")
        classes = sorted(d for d in redaction.denied if d not in (INCOMPLETE, KEYS_COLLIDE))
        if classes:
            raise RequestError(400, "The request contains data that may not be sent to a "
                               f"model provider: {', '.join(classes)}",
                               "sensitive_data_refused")
        if KEYS_COLLIDE in redaction.denied:
            raise RequestError(400, "Two keys of one object in the request hold personal "
                               "data that redaction would make one key; rename one",
                               "sensitive_data_refused")
        if INCOMPLETE in redaction.denied:
            # redaction.on_incomplete: deny. Nothing was found to refuse: the body was too
            # costly to scan to its end, and what went unscanned may not go.
            raise RequestError(400, "The request is too costly to scan completely for "
                               "personal data (the per-request work budget ran out); send "
                               "less text, in fewer parts", "redaction_incomplete")
        return redaction

    def _wants_restore(self, route: Route) -> bool:
        redaction = self._redaction
        if redaction is None or not redaction.total or self.snapshot.redactor is None:
            return False
        return route.restore if route.restore is not None else \
            self.snapshot.redactor.settings.restore

    def _check_policies(self, route: Route, alias: str, doc: dict, body_bytes: int) -> Outcome:
        policies = self.snapshot.policies
        assert policies is not None and self.identity is not None
        rec = self.record
        attrs = attributes_for_request(
            tenant=self.identity.tenant, auth_method=self.identity.method,
            key_id=self.identity.key_id, jwt_payload=self.identity.claims, path=self._path,
            operation=rec.operation, alias=alias, body_bytes=body_bytes, doc=doc,
            route=route.name, environment=policies.settings.environment,
            data_classes=rec.data_classes, prompt_chars=self._prompt_chars(),
            request_id=rec.request_id, config_version=rec.config_version)
        outcome = policies.evaluate(attrs, self.snapshot.policy_candidates[(route.name, alias)])
        self.policy = outcome
        rec.policy_denied = outcome.denied.policy_id if outcome.denied else None
        rec.policy_would_deny = outcome.would_deny.policy_id if outcome.would_deny else None
        rec.policy_eval_us = outcome.eval_us
        return outcome

    def _choose(self, route: Route, alias: str, headers: dict[str, str],
                allowed: list[str] | None = None) -> Model:
        """The alias's first candidate policy allows, or the learned router's pick on
        routes with an objective; asks Envoy to mirror the request when the route
        shadows a challenger."""
        objective = route.objective
        if objective is None or self.services is None:
            names = [n for n in route.aliases[alias] if allowed is None or n in allowed]
            if not names:
                raise RequestError(403, "No model of this alias may serve the request",
                                   "no_eligible_model", type_="permission_error")
            return self.snapshot.models[names[0]]
        assert self.identity is not None
        rec = self.record
        shadow = objective.shadow
        hazard = mirror_hazard(rec.operation, self._parsed.doc) \
            if shadow.mode == "mirror" and self._parsed is not None else None
        candidates = self.snapshot.candidates[(route.name, alias)]
        choose = functools.partial(
            self.services.router.choose, route.name, objective, candidates,
            sticky_key(objective.sticky, self.identity.tenant, self._user()),
            request_id=rec.request_id or None, mirror=hazard is None)
        decision = None
        home = self._stored_home(candidates)
        if home is not None and (allowed is None or home in allowed):
            # Only the provider that stored the previous turn can read it. (One that
            # cannot serve leaves the turn routed as any request: that provider's 404
            # then says what is wrong, where a 403 would blame the others.)
            with contextlib.suppress(NoCandidateError):
                decision = choose(restrict=[home])
        pinned = decision is not None
        try:
            decision = decision or choose(restrict=allowed)
        except NoCandidateError as exc:
            refusal = RequestError(403, str(exc), "no_eligible_model",
                                   type_="permission_error")
            if any(why == "policy" for _, why in exc.excluded):
                refusal.policy_id = rec.policy_denied = self._restrictor(route, alias)
                rec.policy_would_deny = rec.policy_would_deny or rec.policy_denied
            raise refusal from None
        if (rec.policy_would_deny is None and self.policy is not None
                and "would_restrict" in self.policy.decisions.values()):
            rec.policy_would_deny = self._restrictor(
                route, alias, allowed if allowed is not None else list(route.aliases[alias]))
        rec.candidate_set = decision.candidate_set
        rec.routing_excluded = tuple(
            f"{m}:previous_response" if pinned and why == "policy" and (
                allowed is None or m in allowed) else f"{m}:{why}"
            for m, why in decision.excluded)
        rec.routing_decision_us = decision.decision_us
        rec.regret_estimate = decision.regret_estimate
        rec.routing_explored = decision.explored
        rec.routing_probe, rec.routing_sticky = decision.probe, decision.sticky
        rec.routing_fallback = decision.fallback_reason
        rec.proposed_model = decision.proposed
        rec.predicted_savings_usd = decision.predicted_savings_usd
        if hazard is not None:
            rec.routing_excluded += (f"{shadow.challenger}:mirror_{hazard}",)
        if decision.mirror_to is not None:
            rec.mirror_to = decision.mirror_to
            headers[SHADOW_CLUSTER_HEADER] = SHADOW_CLUSTER
            headers[SHADOW_MODEL_HEADER] = decision.mirror_to
            headers[ROUTE_HEADER] = route.name
            headers[TENANT_HEADER] = self.identity.tenant
        return self.snapshot.models[decision.chosen]

    def _stored_home(self, candidates: tuple[CandidateModel, ...]) -> str | None:
        """The candidate whose provider stored the answer a Responses request continues
        (`previous_response_id`), where this process saw that answer."""
        prev = self._parsed.doc.get("previous_response_id") \
            if self._parsed is not None and self.record.operation == "responses" else None
        if not isinstance(prev, str) or self.services is None or self.identity is None:
            return None
        home = self.services.stored.home(self.identity.tenant, prev)
        return home if any(c.name == home for c in candidates) else None

    def _restrictor(self, route: Route, alias: str,
                    allowed: list[str] | None = None) -> str | None:
        """Outcome.restrictor over the models the route's objective lets serve (the
        engine sees mirror-only and objective-restricted candidates too)."""
        assert self.services is not None and self.policy is not None
        return self.policy.restrictor(self.services.router.servable(
            route.name, route.objective, self.snapshot.candidates[(route.name, alias)]),
            allowed)

    def _user(self) -> str | None:
        """The end user, for per-user stickiness: the verified token's `sub`, else the
        body's OpenAI `user` field (the tenant vouches for it, not ATP)."""
        if self.identity is not None and self.identity.claims is not None:
            sub = self.identity.claims.fields.get("sub")
            if sub is not None and sub.HasField("string_value"):
                return sub.string_value
        user = self._parsed.doc.get("user") if self._parsed is not None else None
        return user if isinstance(user, str) and user else None

    def _answer_feedback(self, doc: dict) -> ProcessingResponse:
        for key in doc:
            # As for the APIs' fields: `Score` beside `score` is no second score.
            if key not in _FEEDBACK_FIELDS and key.casefold() in _FEEDBACK_FIELDS:
                raise wrong_case(key)
        for name in _FEEDBACK_FIELDS:
            if name not in doc:
                raise RequestError(400, f"Missing required parameter: '{name}'",
                                   "missing_required_parameter", param=name)
        request_id, score = doc["request_id"], doc["score"]
        if not isinstance(request_id, str) or not _REQUEST_ID_OK.fullmatch(request_id):
            raise RequestError(400, "'request_id' must be the x-request-id of a response",
                               "invalid_type", param="request_id")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise RequestError(400, "'score' must be a number from 0 to 1", "invalid_type",
                               param="score")
        if self.services is None:
            raise _feedback_unknown()
        assert self.identity is not None
        try:
            accepted = self.services.feedback.feedback(request_id, score,
                                                       self.identity.tenant)
        except ValueError:
            raise RequestError(400, "'score' must be a number from 0 to 1", "invalid_value",
                               param="score") from None
        if not accepted:
            raise _feedback_unknown()
        self.record.status = 204
        return envoy_api.immediate(204, b"", details="atp_feedback")

    def _resolve(self, request: LlmRequest):
        assert self.identity is not None
        routes = self.snapshot.routes_for(self.record.path, self.identity.tenant)
        alias = request.model
        if alias is None:
            alias = next((r.default for r in routes if r.default is not None), None)
            if alias is None:
                raise RequestError(400, "Missing required parameter: 'model'",
                                   "missing_required_parameter", param="model")
        # A default alias goes where naming it would: leaving `model` out must not pass
        # over an earlier route that serves the alias (a tenant's own, say).
        for route in routes:
            if alias in route.aliases:
                return route, alias
        # /v1/models lists the tenant's aliases of every endpoint: one it lists is no
        # unknown model here, but one another endpoint serves.
        served = dict.fromkeys(p for r in self.snapshot.routes_for_tenant(self.identity.tenant)
                               if alias in r.aliases for p in (r.match.paths or OPERATIONS))
        if served:
            raise RequestError(404, f"The model '{_echo(alias)}' is not served on "
                               f"{self.record.path}, only on {', '.join(served)}",
                               "model_not_found", param="model")
        raise _model_not_found(alias)

    # -- response ------------------------------------------------------------------

    def _on_response_headers(self, headers_msg) -> ProcessingResponse:
        headers = envoy_api.headers_of(headers_msg.headers)
        rec = self.record
        # Envoy's own answer to a request never forwarded (408 to a body that stalled)
        # has no time to first byte.
        self._answered = True
        rec.ttfb_ms = self._since_forwarded_ms() if self._forwarded is not None else None
        try:
            rec.status = int(headers.get(":status", "0"))
        except ValueError:
            rec.status = 0
        attempts = headers.get("x-envoy-attempt-count", "1")
        rec.attempts = int(attempts) if attempts.isascii() and attempts.isdigit() else 1
        if headers_msg.end_of_stream or not 200 <= rec.status < 300 or self.request is None:
            return envoy_api.response_headers()
        if _encoded(headers.get("content-encoding", "identity")):
            # Compressed despite the request: unreadable, so usage is estimated, the
            # output from the compressed size (a lower bound), when the answer gives it.
            self._compressed = True
            length = headers.get("content-length", "")
            if length.isascii() and length.isdigit():
                self._unread_bytes = int(length)
            return envoy_api.response_headers()
        content_type = headers.get("content-type", "").lower()  # media types ignore case
        # Restoring changes the body's length: let Envoy frame it anew.
        remove = ("content-length",) if self.restorer is not None else ()
        # A streamed request's answer labelled neither SSE nor JSON (text/plain, or no
        # label) is still its stream: unread, the usage chunk ATP asked for would reach
        # the client.
        if content_type.startswith("text/event-stream") or (
                self.request.stream and "json" not in content_type):
            self.sse = SseStream(drop_usage_chunk=rec.usage_injected)
            self._body_pending = True
            if rec.usage_injected:
                remove = ("content-length",)  # the usage chunk comes out of the stream
            return envoy_api.response_headers(envoy_api.body_mode(ProcessingMode.STREAMED),
                                              remove)
        # Anything else answers an unstreamed request: JSON, whatever its label says
        # (`text/plain`, `application/octet-stream`): unread, a valid answer was counted
        # a provider failure.
        self._body_pending = True
        # Envoy answers 500 for a body over its buffer limit; an answer of unknown or
        # large size (a big embeddings batch) is read chunk by chunk instead.
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and \
                int(length) <= self.snapshot.server.max_body_bytes:
            mode = ProcessingMode.BUFFERED
            self._buffered_length = int(length)
        else:
            mode = ProcessingMode.STREAMED
        return envoy_api.response_headers(envoy_api.body_mode(mode), remove)

    def _since_forwarded_ms(self) -> float:
        since = self._forwarded if self._forwarded is not None else self.started
        return (self.clock() - since) * 1000.0

    @property
    def passed_unread(self) -> bool:
        """The answer goes on unread (compressed): ATP does not see its end."""
        return self._compressed

    @property
    def response_ended(self) -> bool:
        """The answer has begun and ATP expects no more of it: the body it asked for
        has ended (or its stream's last event came), or it asked for none."""
        return self._answered and not self._awaiting_body

    @property
    def _awaiting_body(self) -> bool:
        # A stream whose last event came is whole, its body's end or not: the SDKs stop
        # reading at `[DONE]` and close the connection.
        return self._body_pending and not (self.sse is not None and self.sse.ended)

    @property
    def _stream_cut_short(self) -> bool:
        """The stream's body ended before its last event (`[DONE]`, every choice's
        finish_reason, a Responses stream's terminal event): the provider, or a hop
        before it, closed it mid-answer, and the SDKs raise or hand the client a cut
        answer. (One without any data is no answer at all: the provider's invalid
        response; one with an event too large to read may have ended in it.)"""
        sse = self.sse
        return (sse is not None and not self._body_pending and sse.data_events > 0
                and not sse.ended and not sse.choices_finished and not sse.unread
                and 200 <= self.record.status < 300)

    @property
    def response_work_bytes(self) -> int:
        """Bytes a restore works through at the next response body message, besides the
        message's own: the JSON answer held back so far (0 when nothing is restored)."""
        return len(self._response_body) if self.restorer is not None else 0

    def _on_response_body(self, body_msg) -> ProcessingResponse:
        # A BUFFERED body comes whole in one message, without end_of_stream where the
        # answer ends with trailers (HTTP/2): held for its end, a restored answer never
        # went out (the client got an empty body) and a whole one was counted cut off.
        # Its length tells: where Envoy ignores ATP's mode (allow_mode_override off)
        # the body comes in STREAMED chunks, and the first is not its end.
        if not self._body_pending:
            # No body ATP asked for (a compressed or failed answer, sent by a filter
            # config that asks for every body), or one past the end of the body it did
            # (an empty end_of_stream after the length came).
            return envoy_api.response_body()
        end = body_msg.end_of_stream
        if not end and self._buffered_length is not None and self.sse is None:
            self._buffered_got += len(body_msg.body)
            end = self._buffered_got >= self._buffered_length
        if end:
            self._body_pending = False
        if self.sse is not None:
            # Read before restore: the provider bills the text it wrote, placeholders
            # included, and an estimate counts that.
            replacement = self.sse.feed(body_msg.body, end)
            if self.restorer is not None:
                replacement = self.restorer.feed(
                    body_msg.body if replacement is None else replacement, end)
            if self._ttfb_at < 2:
                # A stream's first byte is its first token, not its headers, a comment,
                # a role-only chunk nor `response.created`: a provider may send those at
                # once and make the first token wait (a stream without output has its
                # first event with data).
                at = 2 if self.sse.output_chars else 1 if self.sse.data_events else 0
                if at > self._ttfb_at:
                    self._ttfb_at = at
                    self.record.ttfb_ms = self._since_forwarded_ms()
            return envoy_api.response_body(replacement)
        return self._on_json_chunk(body_msg.body, end)

    def _on_json_chunk(self, chunk: bytes, end: bool) -> ProcessingResponse:
        """A JSON answer, BUFFERED (one message) or STREAMED: kept for usage up to
        max_body_bytes. With a restore pending, chunks are held back and the restored body
        goes out with the last one; past the bound, what is held goes on, and each chunk
        after it, restored as it passes (usage is then estimated)."""
        if self._unread_bytes:
            self._unread_bytes += len(chunk)
            self._unread_tail = (self._unread_tail + chunk)[-USAGE_TAIL_BYTES:]
            if self.restorer is None:
                return envoy_api.response_body()
            restored = self.restorer.feed_json(chunk, end)
            return envoy_api.response_body(restored if restored != chunk else None)
        held = self._response_body
        if len(held) + len(chunk) > self.snapshot.server.max_body_bytes:
            self._unread_bytes = len(held) + len(chunk)
            out = bytes(held) + chunk
            self._unread_tail = out[-USAGE_TAIL_BYTES:]
            held.clear()
            if self.restorer is None:
                return envoy_api.response_body()
            return envoy_api.response_body(self.restorer.feed_json(out, end))
        held += chunk
        if self.restorer is None:
            return envoy_api.response_body()
        if not end:
            return envoy_api.response_body(b"")
        body = bytes(held)
        restored = self.restorer.restore_json(body)
        if restored is None and len(body) != len(chunk):
            restored = body  # what was held back goes on as it came
        return envoy_api.response_body(restored)

    # -- end -----------------------------------------------------------------------

    def finish(self) -> ExchangeRecord:
        """Close the record; safe to call more than once, writes once."""
        rec = self.record
        if self._finished:
            return rec
        self._finished = True
        if not rec.method:  # set (a name, or "<other>") by every request's headers
            # Only an answer came: a filter before ATP's (jwt_authn, RBAC) answered the
            # request itself, which Envoy's stats and access log hold. A record without
            # request id, method or path, as its own exchange, would only mislead.
            return rec
        rec.duration_ms = (self.clock() - self.started) * 1000.0
        # Forwarded, then cut off: the body ATP asked for never ended, or no answer came
        # at all (the client left while the model was still working).
        cut_off = self._awaiting_body
        if not rec.error_code and self.sse is not None and self.sse.failed:
            # First: a client that stops reading at the error event (the SDKs raise it)
            # leaves the body unended, and the provider's failure must still count.
            rec.error_code = STREAM_ERROR
        elif not rec.error_code and (cut_off or self._stream_cut_short or (
                self.model is not None and rec.ttfb_ms is None)):
            rec.error_code = INCOMPLETE_RESPONSE
            if cut_off and self._buffered_length is not None:
                # The upstream's headers never left Envoy: the client got Envoy's 502
                # (upstream_unavailable), not the 200 they began with.
                rec.status = 502
        elif not rec.error_code and rec.operation and self._parsed is None:
            # Any answer of Envoy's own before the body came whole (a 408 when it
            # stalled, a 400 at a bad chunk) ends it, as a client leaving does.
            rec.error_code = (ENVOY_TOO_LARGE if rec.status == 413 else
                              INCOMPLETE_REQUEST if not rec.status or rec.status >= 400
                              else "")
        usage = self._usage()
        price: PriceSnapshot | None = None
        if self.model is not None:
            price = self.services.prices.snapshot(self.model) if self.services else \
                PriceSnapshot.from_model(self.model)
            if usage is not None:
                rec.input_tokens, rec.output_tokens = usage.input_tokens, usage.output_tokens
                rec.usage_estimated = usage.estimated
                # The ledger's exact picodollars, so the log and the ledger never disagree.
                rec.cost_usd = price.cost_pico(usage.input_tokens,
                                               usage.output_tokens) / PICO_PER_USD
        if self.restorer is not None:
            rec.restored = self.restorer.restored
            rec.restore_limited = self.restorer.limited
            self.restorer.clear()
        if self._redaction is not None:
            # The placeholder → value map lives only as long as the exchange.
            self._redaction.mapping.clear()
        if self.services is not None and price is not None and (
                rec.ttfb_ms is not None or rec.error_code == INCOMPLETE_RESPONSE):
            self._learn(usage, price)
        if log.isEnabledFor(logging.INFO):
            # vars(), not asdict(): asdict deep-copies every field and costs more than the
            # rest of the exchange's own work.
            fields = vars(rec)
            if self.policy is not None:
                fields = {**fields, **self.policy.log_fields()}
            logs.info_record(log, "exchange", fields)
        return rec

    def _learn(self, usage: Usage | None, price: PriceSnapshot) -> None:
        """Feed what this forwarded request showed to the router, feedback and ledger;
        `price`: the model's prices that priced it."""
        assert self.services is not None and self.model is not None
        assert self.route is not None
        rec, route, services = self.record, self.route, self.services
        # A cut-off answer failed the client, but whether the model did is unknown: the
        # ledger counts it failed, the router learns nothing from it.
        incomplete = rec.error_code == INCOMPLETE_RESPONSE
        ok = False if incomplete or rec.error_code in (STREAM_ERROR, INVALID_RESPONSE) \
            else classify_status(rec.status)
        if route.objective is not None and ok is not None and not incomplete:
            sent_ms_ago = self._since_forwarded_ms()
            latency = rec.ttfb_ms if rec.stream else sent_ms_ago
            # Billed tokens teach the route its request sizes, which price candidates not
            # yet observed; ATP's own estimates would only teach it its guesses back.
            billed = usage if usage is not None and not usage.estimated else None
            services.router.observe(route.name, self.model.name, ok=ok, latency_ms=latency,
                                    cost=rec.cost_usd,
                                    input_tokens=billed.input_tokens if billed else None,
                                    output_tokens=billed.output_tokens if billed else None,
                                    sent_ms_ago=sent_ms_ago)
            if ok and not rec.shadow and self._answer_id is not None and \
                    self._parsed is not None and self._parsed.doc.get("store") is not False:
                services.stored.note(rec.tenant, self._answer_id, self.model.name)
            if ok and not rec.shadow and rec.request_id:
                quality = route.objective.quality
                # The proxy counts when no explicit feedback arrives within the window.
                services.feedback.record_decision(
                    rec.request_id, route.name, self.model.name,
                    quality.feedback_window_s, rec.tenant,
                    proxy=finish_reason_score(self.finish_reason,
                                              quality.finish_reason_scores)
                    if quality.proxy == "finish_reason" else None)
        if services.ledger is None:
            return
        baseline = baseline_for(route, self.snapshot.ledger, rec.operation)
        base_model = self.snapshot.models.get(baseline) if baseline else None
        entry = LedgerEntry(
            time.time(), rec.tenant, route.name, self.model.name, price,
            services.prices.snapshot(base_model) if base_model is not None else None,
            usage.input_tokens if usage else 0, usage.output_tokens if usage else 0,
            ok=bool(ok), estimated=rec.usage_estimated, shadow=rec.shadow)
        services.ledger.record(entry)
        if (rec.shadow or rec.mirror_to) and rec.request_id:
            # Both halves of a mirrored request, joined later by request id.
            services.ledger.record_shadow_half(ShadowHalf(
                rec.request_id, "shadow" if rec.shadow else "primary", route.name,
                self.model.name, rec.status, rec.duration_ms, entry.cost_pico(),
                int(entry.ts)))

    def _usage(self) -> Usage | None:
        rec = self.record
        if self.request is None:
            return None
        if not 200 <= rec.status < 300:
            if rec.error_code != INCOMPLETE_RESPONSE:
                return None
            # No answer came: the provider still read (and bills) the prompt.
            return Usage(estimate_tokens(self._prompt_chars()), 0, estimated=True)
        prompt = estimate_tokens(self._prompt_chars())
        if self.sse is not None:
            self.finish_reason = self.sse.finish_reason
            self._answer_id = self.sse.response_id
            if self.sse.usage is not None:
                return self.sse.usage
            if not self.sse.data_events:
                return self._invalid(prompt)
            return Usage(prompt, estimate_tokens(self.sse.output_chars), estimated=True)
        output_chars = self._unread_bytes  # an answer not read: its size
        if self._unread_tail and (usage := usage_in_tail(self._unread_tail)) is not None:
            return usage  # the provider's own, at the end of an answer too large to read
        if self._response_body:
            usage, self.finish_reason, chars, failed, self._answer_id = read_response(
                bytes(self._response_body))
            if failed:
                rec.error_code = rec.error_code or STREAM_ERROR
            if usage is not None:
                return usage
            if chars is None:
                return self._invalid(prompt)
            output_chars = chars
        elif not (self._unread_bytes or self._compressed):
            return self._invalid(prompt)  # no body
        if rec.operation == "embeddings":
            output_chars = 0  # vectors are no output tokens
        return Usage(prompt, estimate_tokens(output_chars), estimated=True)

    def _prompt_chars(self) -> int:
        """The request's size as the model reads it: its binary data (a photo's base64)
        counted as typical parts (an image, audio, a file) rather than as text, where
        one photo made an ordinary question too long or too costly for the policies.
        (Without redaction, which finds the data, the body's size.)"""
        # A character written as a \uXXXX escape takes 6 bytes for its UTF-8's 1 to 3:
        # the same prompt escaped (json.dumps' default) read three times as long.
        # (Once: policies and the usage estimate both ask, and the body is set by then.)
        size = self._text_bytes
        if size is None:
            text = self._parsed.text if self._parsed is not None else ""
            size = self.record.request_bytes
            if "\\u" in text:  # (an escaped backslash before a "u" is no escape)
                size = max(0, size - _escape_savings(text))
            if self._parsed is not None:
                self._text_bytes = size
        redaction = self._redaction
        if redaction is None:
            return size
        data = redaction.data_chars
        # Data outside a typed part (base64 in vLLM's `documents`) counts as a part per
        # value: it counted for nothing, past the policies' token and cost caps. (A typed
        # part's data is a value of its own: the larger count is the closer.)
        parts = max(redaction.non_text_parts, redaction.data_values)
        return size - data + min(data, _PART_CHARS * parts)

    def _invalid(self, prompt_tokens: int) -> Usage:
        """A 2xx that is no answer: recorded as the provider's failure, its prompt
        (which the provider may still bill) estimated, and no output."""
        self.record.error_code = self.record.error_code or INVALID_RESPONSE
        return Usage(prompt_tokens, 0, estimated=True)


# A \uXXXX escape: after an even run of backslashes, so not an escaped backslash's "u".
_UNICODE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([0-9A-Fa-f]{3})[0-9A-Fa-f]")


def _escape_savings(text: str) -> int:
    """How many bytes fewer the JSON text's \\uXXXX escapes take as UTF-8: 5 for an
    ASCII character's (Go writes `<` as \\u003c), 4 for one of 2 bytes or a surrogate
    half (a pair is 4 bytes for 12), 3 for one of 3 bytes (CJK, €)."""
    saved = 0
    # By the first three hex digits (the character's code over 16): few distinct ones.
    for head, n in Counter(_UNICODE_ESCAPE.findall(text)).items():
        code = int(head, 16)
        saved += n * (5 if code < 0x8 else 4 if code < 0x80 or 0xD80 <= code <= 0xDFF else 3)
    return saved


# Each list of tools a body may declare (llm_api.TOOL_LISTS), the choice that may
# force one of them, then other settings that cannot go without the list.
_TOOL_FIELDS = (("tools", "tool_choice", "parallel_tool_calls"),
                ("functions", "function_call"))


def _forced_stripped(choice_key: str) -> RequestError:
    return RequestError(403, f"{choice_key} asks for a tool this request may not use",
                        "tool_not_allowed", param=choice_key, type_="permission_error")


_JSON_ONLY = MappingProxyType({"content-type": "application/json"})


# Charsets that write ASCII otherwise than ASCII: a body in one of them reads as other
# text in UTF-8 (UTF-7's `+AEA-` is `@`). In the others (Latin-1, GBK, Shift_JIS...) the
# ASCII is the same, and a byte above it is no UTF-8 text (refused) or UTF-8's, which
# the provider reads too (it is told application/json).
_ASCII_OPAQUE = re.compile(
    r".*utf[-_]?(?:7|16|32).*|(?:cs)?unicode.*|.*ucs[-_]?[24].*|(?:cs)?iso[-_]?2022.*"
    r"|.*ebcdic.*|hz.*|x-imap4-modified-utf7"
    # EBCDIC code pages by number: 037, the national ones, 1047, 1140-1149 ...
    r"|(?:cp|ibm|csibm)[-_]?0?(?:37|273|277|278|280|284|285|290|297|420|423|424|500|833"
    r"|838|870|871|875|880|905|918|1025|1026|1047|114\d)",
    re.IGNORECASE)
# A Content-Type's parameters (a header sent twice arrives joined by a comma); a quoted
# value may hold ';' or ','.
_PARAM = re.compile(r'[;,]\s*([^=;,\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')


def _foreign_charset(content_type: str) -> str | None:
    """A charset a Content-Type names (any of them, if a header sent twice names two)
    that writes ASCII otherwise than ASCII: a provider's server would decode the body
    with it, where ATP reads UTF-8."""
    for name, value in _PARAM.findall(content_type):
        charset = value.strip().strip("\"'").strip()
        if name.lower() == "charset" and _ASCII_OPAQUE.fullmatch(charset):
            return _echo(charset)
    return None


def _echo(text: str) -> str:
    """What an error repeats of the client's own request: bounded (a 10 KB header came
    back whole)."""
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "…"


_ECHO_CHARS = 64
# Told to a client on an unknown path or method: an endpoint of the OpenAI API ATP does
# not serve (stored completions, a stored response, files) must not read as a wrong
# base URL.
_SERVED = (f"POST {', '.join(OPERATIONS)} and {FEEDBACK_PATH}, and GET /v1/models and "
           "/v1/models/{id} (no stored completions or responses, files, batches, audio, "
           "images or moderations)")


def _encoded(content_encoding: str) -> bool:
    """Whether a Content-Encoding value names a coding; a header sent twice arrives
    joined by commas, and "identity, identity" names none."""
    codings = {c.strip() for c in content_encoding.lower().split(",")}
    return bool(codings - {"identity", ""})


# A non-text part (an image, audio, a file) as prompt text: about 1,000 tokens (OpenAI
# bills a 1024x1024 image at 765, high detail).
_PART_CHARS = 4000
# OpenAI's: which of a key's organizations and projects a request is for.
_ACCOUNT_HEADERS = ("openai-organization", "openai-project")
# The client's word to the gateway alone: a credential for the first proxy (RFC 9110
# §11.7.2; an SDK set up with proxy credentials sends its key there) and its cookies.
_GATEWAYS_OWN = ("proxy-authorization", "cookie")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                      "PATCH"))


def _loggable(path: str) -> str:
    """The request path as the record logs it: an API path as is; a model id, or any
    other path, which carries whatever the client typed into the URL, not."""
    if path in OPERATIONS or path in (FEEDBACK_PATH, "/v1/models"):
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "<other>"


def _feedback_unknown() -> RequestError:
    return RequestError(404, "No recent request with that id is waiting for feedback",
                        "feedback_not_found")


def _model_not_found(model: str) -> RequestError:
    return RequestError(404, f"The model '{_echo(model)}' does not exist or you do not have "
                        "access to it.", "model_not_found", param="model")
