"""Building ext_proc ProcessingResponses: header and body mutations, immediate replies.

Envoy facts these builders encode (measured on 1.40, see ARCHITECTURE.md): header values
travel in `raw_value`; a body whose length changes needs `content-length` in the same
response; `clear_route_cache` is ignored unless the same response mutates a header.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

ProcessingResponse = ep.ProcessingResponse
ProcessingRequest = ep.ProcessingRequest
ProcessingMode = processing_mode_pb2.ProcessingMode

# Only ASCII printable without CR/LF/NUL ever reaches a header value.
_HEADER_VALUE_BAD = frozenset(range(0, 0x20)) | {0x7F}


def header_value_ok(value: bytes) -> bool:
    return 0 < len(value) <= 1024 and not any(b in _HEADER_VALUE_BAD for b in value)


def _header(name: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value.encode() if isinstance(value, str) else value
    if not header_value_ok(raw):
        raise ValueError(f"refusing unsafe value for header {name}")
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=raw),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _common(
    set_headers: dict[str, str] | None,
    remove_headers: Iterable[str],
    body: bytes | None,
    clear_route_cache: bool,
) -> ep.CommonResponse:
    common = ep.CommonResponse()
    if set_headers:
        common.header_mutation.set_headers.extend(
            _header(k, v) for k, v in set_headers.items())
    common.header_mutation.remove_headers.extend(remove_headers)
    if body is not None:
        common.body_mutation.body = body
    if clear_route_cache:
        common.clear_route_cache = True
    return common


def request_headers(
    remove_headers: Iterable[str] = (), mode: ProcessingMode | None = None
) -> ProcessingResponse:
    resp = ProcessingResponse(
        request_headers=ep.HeadersResponse(response=_common(None, remove_headers, None, False)))
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def request_body(
    set_headers: dict[str, str], body: bytes | None, remove_headers: Iterable[str] = ()
) -> ProcessingResponse:
    headers = dict(set_headers)
    if body is not None:
        headers["content-length"] = str(len(body))
    return ProcessingResponse(
        request_body=ep.BodyResponse(
            response=_common(headers, remove_headers, body, clear_route_cache=True)))


def response_headers(mode: ProcessingMode | None = None,
                     remove_headers: Iterable[str] = ()) -> ProcessingResponse:
    resp = ProcessingResponse(response_headers=ep.HeadersResponse())
    if remove_headers:
        resp.response_headers.response.header_mutation.remove_headers.extend(remove_headers)
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def response_body(body: bytes | None = None) -> ProcessingResponse:
    common = ep.CommonResponse()
    if body is not None:
        common.body_mutation.body = body
    return ProcessingResponse(response_body=ep.BodyResponse(response=common))


def trailers(request: bool) -> ProcessingResponse:
    if request:
        return ProcessingResponse(request_trailers=ep.TrailersResponse())
    return ProcessingResponse(response_trailers=ep.TrailersResponse())


def immediate(
    status: int, body: bytes, headers: dict[str, str] | None = None, details: str = ""
) -> ProcessingResponse:
    mutation = ep.HeaderMutation()
    all_headers = {"content-type": "application/json", **(headers or {})}
    mutation.set_headers.extend(_header(k, v) for k, v in all_headers.items())
    return ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=mutation,
            body=body,
            details=details,
        ))


# Mode overrides that change only how the response body is sent; built once, copied
# into each response.
_BODY_MODES = {
    mode: ProcessingMode(
        request_header_mode=ProcessingMode.SEND,
        request_body_mode=ProcessingMode.BUFFERED,
        response_header_mode=ProcessingMode.SEND,
        response_body_mode=mode,  # type: ignore[arg-type]
    )
    for mode in (ProcessingMode.BUFFERED, ProcessingMode.STREAMED)
}


def body_mode(response: int) -> ProcessingMode:
    """The mode override for a response body sent `response` (BUFFERED or STREAMED)."""
    return _BODY_MODES[response]


def headers_of(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in header_map.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out
