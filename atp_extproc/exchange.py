"""One HTTP exchange through the ext_proc phases: the pipeline.

request_headers → who is calling, which API, answer /v1/models locally
request_body    → parse, check, resolve alias → model → cluster, rewrite, tag the route
response_headers→ status and time to first byte; ask for the body only when usage is in it
response_body   → usage (JSON or SSE), drop the usage chunk ATP asked for, price it
end of stream   → one record, written once
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from google.protobuf import struct_pb2

from atp_extproc import envoy_api
from atp_extproc.config import Model, Snapshot
from atp_extproc.envoy_api import ProcessingMode, ProcessingRequest, ProcessingResponse
from atp_extproc.identity import Identity, identify
from atp_extproc.llm_api import (
    OPERATIONS,
    LlmRequest,
    RequestError,
    SseStream,
    Usage,
    estimate_tokens,
    needs_usage_injection,
    parse_body,
    read_request,
    rewrite,
    usage_from_json,
)

log = logging.getLogger("atp.exchange")

CLUSTER_HEADER = "x-atp-cluster"
ATP_HEADER_PREFIX = "x-atp-"
# Envoy's own request id is the join key for everything recorded about a request.
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The client's credential for ATP must never travel on to a model provider.
_CREDENTIAL_HEADERS = ("authorization", "api-key")


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
    ttfb_ms: float | None = None
    duration_ms: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage_estimated: bool = False
    cost_usd: float | None = None


def price(model: Model, usage: Usage) -> float:
    return (usage.input_tokens * model.price.input_per_1k
            + usage.output_tokens * model.price.output_per_1k) / 1000.0


class Exchange:
    def __init__(self, snapshot: Snapshot, clock=time.perf_counter):
        self.snapshot = snapshot
        self.clock = clock
        self.started = clock()
        self.record = ExchangeRecord(config_version=snapshot.version)
        self.identity: Identity | None = None
        self.model: Model | None = None
        self.request: LlmRequest | None = None
        self.sse: SseStream | None = None
        self._response_body = bytearray()
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
            if phase in ("request_trailers", "response_trailers"):
                return envoy_api.trailers(request=phase == "request_trailers")
        except RequestError as err:
            return self._refuse(err)
        # Fail closed: anything ATP does not understand stops the request here.
        return self._refuse(RequestError(500, "ATP could not process this request",
                                         "atp_unexpected_phase", type_="server_error"))

    def _refuse(self, err: RequestError) -> ProcessingResponse:
        self.record.status = err.status
        self.record.error_code = err.code
        return envoy_api.immediate(err.status, err.body(), details=f"atp_{err.code}")

    # -- request -------------------------------------------------------------------

    def _on_request_headers(self, message: ProcessingRequest) -> ProcessingResponse:
        headers = envoy_api.headers_of(message.request_headers.headers)
        rec = self.record
        request_id = headers.get("x-request-id", "")
        rec.request_id = request_id if _REQUEST_ID_OK.fullmatch(request_id) else ""
        rec.method = headers.get(":method", "")
        rec.path = headers.get(":path", "").partition("?")[0]
        jwt = self.snapshot.auth.jwt
        jwt_metadata: struct_pb2.Struct | None = None
        if jwt is not None:
            jwt_metadata = message.metadata_context.filter_metadata.get(jwt.metadata_namespace)
        self.identity = identify(self.snapshot, headers, jwt_metadata)
        rec.tenant = self.identity.tenant
        rec.auth_method = self.identity.method
        rec.key_id = self.identity.key_id

        if rec.path == "/v1/models" or rec.path.startswith("/v1/models/"):
            return self._answer_models(rec.method, rec.path)
        operation = OPERATIONS.get(rec.path)
        if operation is None:
            raise RequestError(404, f"Invalid URL ({rec.method} {rec.path})", "unknown_url")
        if rec.method != "POST":
            raise RequestError(405, f"Method {rec.method} is not allowed on {rec.path}; "
                               "use POST", "method_not_allowed")
        if message.request_headers.end_of_stream:
            raise RequestError(400, "The request has no body", "missing_body")
        rec.operation = operation
        spoofed = [h for h in headers if h.startswith(ATP_HEADER_PREFIX)]
        return envoy_api.request_headers(remove_headers=[*_CREDENTIAL_HEADERS, *spoofed])

    def _answer_models(self, method: str, path: str) -> ProcessingResponse:
        if method != "GET":
            raise RequestError(405, f"Method {method} is not allowed on {path}",
                               "method_not_allowed")
        assert self.identity is not None
        aliases = self.snapshot.aliases_for(self.identity.tenant)
        entries = [{"id": a, "object": "model", "created": 0, "owned_by": "atp"}
                   for a in aliases]
        if path == "/v1/models":
            body = {"object": "list", "data": entries}
        else:
            wanted = path.removeprefix("/v1/models/")
            found = [e for e in entries if e["id"] == wanted]
            if not found:
                raise _model_not_found(wanted)
            body = found[0]
        self.record.status = 200
        return envoy_api.immediate(200, json.dumps(body).encode(), details="atp_models")

    def _on_request_body(self, body_msg) -> ProcessingResponse:
        rec = self.record
        server = self.snapshot.server
        body = body_msg.body
        rec.request_bytes = len(body)
        if len(body) > server.max_body_bytes:
            raise RequestError(413, f"The request body is {len(body)} bytes; the limit is "
                               f"{server.max_body_bytes} bytes", "request_too_large")
        if not body_msg.end_of_stream:
            # Envoy must buffer the body (request_body_mode: BUFFERED); a partial body
            # cannot be checked, so it cannot go.
            raise RequestError(500, "ATP received a partial request body",
                               "atp_partial_body", type_="server_error")
        parsed = parse_body(body, server.max_json_depth)
        request = read_request(rec.operation, parsed.doc)
        self.request = request
        rec.stream = request.stream
        assert self.identity is not None
        route, alias = self._resolve(request)
        model = self.snapshot.models[route.aliases[alias][0]]
        self.model = model
        rec.route, rec.alias, rec.model = route.name, alias, model.name
        rec.cluster, rec.upstream_model = model.cluster, model.upstream_model

        changes: dict[str, object] = {}
        if request.model != model.upstream_model:
            changes["model"] = model.upstream_model
        if needs_usage_injection(request):
            options = parsed.doc.get("stream_options") or {}
            changes["stream_options"] = {**options, "include_usage": True}
            rec.usage_injected = True
        new_body = rewrite(parsed, changes) if changes else None
        return envoy_api.request_body({CLUSTER_HEADER: model.cluster}, new_body)

    def _resolve(self, request: LlmRequest):
        assert self.identity is not None
        routes = self.snapshot.routes_for(self.record.path, self.identity.tenant)
        if request.model is None:
            for route in routes:
                if route.default is not None:
                    return route, route.default
            raise RequestError(400, "Missing required parameter: 'model'",
                               "missing_required_parameter", param="model")
        for route in routes:
            if request.model in route.aliases:
                return route, request.model
        raise _model_not_found(request.model)

    # -- response ------------------------------------------------------------------

    def _on_response_headers(self, headers_msg) -> ProcessingResponse:
        headers = envoy_api.headers_of(headers_msg.headers)
        rec = self.record
        rec.ttfb_ms = (self.clock() - self.started) * 1000.0
        try:
            rec.status = int(headers.get(":status", "0"))
        except ValueError:
            rec.status = 0
        if headers_msg.end_of_stream or not 200 <= rec.status < 300 or self.request is None:
            return envoy_api.response_headers()
        content_type = headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            self.sse = SseStream(drop_usage_chunk=rec.usage_injected)
            return envoy_api.response_headers(envoy_api.body_mode(ProcessingMode.STREAMED))
        if "json" in content_type:
            return envoy_api.response_headers(envoy_api.body_mode(ProcessingMode.BUFFERED))
        return envoy_api.response_headers()

    def _on_response_body(self, body_msg) -> ProcessingResponse:
        if self.sse is not None:
            replacement = self.sse.feed(body_msg.body, body_msg.end_of_stream)
            return envoy_api.response_body(replacement)
        self._response_body += body_msg.body
        return envoy_api.response_body()

    # -- end -----------------------------------------------------------------------

    def finish(self) -> ExchangeRecord:
        """Close the record; safe to call more than once, writes once."""
        rec = self.record
        if self._finished:
            return rec
        self._finished = True
        rec.duration_ms = (self.clock() - self.started) * 1000.0
        usage = self._usage()
        if usage is not None and self.model is not None:
            rec.input_tokens, rec.output_tokens = usage.input_tokens, usage.output_tokens
            rec.usage_estimated = usage.estimated
            rec.cost_usd = price(self.model, usage)
        if log.isEnabledFor(logging.INFO):
            # vars(), not asdict(): asdict deep-copies every field and costs more than the
            # rest of the exchange's own work.
            log.info("exchange", extra={"record": vars(rec)})
        return rec

    def _usage(self) -> Usage | None:
        if self.request is None or not 200 <= self.record.status < 300:
            return None
        if self.sse is not None:
            if self.sse.usage is not None:
                return self.sse.usage
            return Usage(estimate_tokens(self.record.request_bytes),
                         estimate_tokens(self.sse.output_chars), estimated=True)
        if self._response_body:
            usage = usage_from_json(bytes(self._response_body))
            if usage is not None:
                return usage
        return Usage(estimate_tokens(self.record.request_bytes), 0, estimated=True)


def _model_not_found(model: str) -> RequestError:
    return RequestError(404, f"The model '{model}' does not exist or you do not have access "
                        "to it.", "model_not_found", param="model")
