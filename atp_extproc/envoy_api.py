"""Reading Envoy's ext_proc ProcessingRequests, and building ProcessingResponses: header
and body mutations, immediate replies.

Envoy facts these builders encode (measured on 1.40, see ARCHITECTURE.md): header values
travel in `raw_value`; a body whose length changes needs `content-length` in the same
response; `clear_route_cache` is ignored unless the same response mutates a header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError, Message

ProcessingResponse = ep.ProcessingResponse
ProcessingRequest = ep.ProcessingRequest
ProcessingMode = processing_mode_pb2.ProcessingMode

# The filter metadata namespace `read_processing_request` marks a message with whose
# metadata it could not read (no filter of Envoy's is named so); the exchange refuses it.
UNREADABLE_METADATA = "atp.unreadable_metadata"


def read_processing_request(data: bytes) -> ProcessingRequest:
    """Envoy's message. gRPC's own deserializer raised where protobuf cannot read it, and
    the stream ended in a 500 that blamed ATP and left no record: a verified token whose
    claims nest past about 30 levels takes the message's metadata past protobuf's 100.
    Such a message is read without its metadata, and marked UNREADABLE_METADATA."""
    try:
        return ProcessingRequest.FromString(data)
    except DecodeError:
        pass
    # Read as a message with no metadata field, the metadata is unknown bytes, which
    # protobuf keeps unread; dropped, the rest reads as Envoy's message.
    partial = _without_metadata().FromString(data)
    partial.DiscardUnknownFields()
    message = ProcessingRequest.FromString(partial.SerializeToString())
    message.metadata_context.filter_metadata.get_or_create(UNREADABLE_METADATA)
    return message


@lru_cache(maxsize=1)
def _without_metadata() -> type[Message]:
    """ProcessingRequest's class without its metadata_context field, in a pool of its own."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        added.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if file is ep.DESCRIPTOR:
            request = next(m for m in proto.message_type if m.name == "ProcessingRequest")
            kept = [f for f in request.field if f.name != "metadata_context"]
            del request.field[:]
            request.field.extend(kept)
        pool.Add(proto)

    add(ep.DESCRIPTOR)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(ProcessingRequest.DESCRIPTOR.full_name))


# No control character (CR, LF, NUL ...) ever reaches a header value.
_HEADER_VALUE_OK = re.compile(rb"[\x20-\x7e\x80-\xff]{1,1024}")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _set_headers(mutation: ep.HeaderMutation, headers: Mapping[str, str]) -> None:
    # Filled in place: nested messages passed to constructors are copied, which costs
    # several times more than the fields themselves.
    options = mutation.set_headers
    for name, value in headers.items():
        raw = value.encode()
        if _HEADER_VALUE_OK.fullmatch(raw) is None:
            raise ValueError(f"refusing unsafe value for header {name}")
        option = options.add(append_action=_OVERWRITE)
        option.header.key = name
        option.header.raw_value = raw


def _headers_answer(phase: str, remove_headers: Iterable[str],
                    mode: ProcessingMode | None) -> ProcessingResponse:
    resp = ProcessingResponse()
    answer = getattr(resp, phase)
    if remove_headers:
        answer.response.header_mutation.remove_headers.extend(remove_headers)
    else:
        answer.SetInParent()
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def request_headers(remove_headers: Iterable[str] = (),
                    set_headers: Mapping[str, str] | None = None) -> ProcessingResponse:
    resp = _headers_answer("request_headers", remove_headers, None)
    if set_headers:
        _set_headers(resp.request_headers.response.header_mutation, set_headers)
    return resp


def request_body(
    set_headers: dict[str, str], body: bytes | None, remove_headers: Iterable[str] = ()
) -> ProcessingResponse:
    resp = ProcessingResponse()
    common = resp.request_body.response
    mutation = common.header_mutation
    _set_headers(mutation, set_headers)
    if body is not None:
        length = mutation.set_headers.add(append_action=_OVERWRITE)
        length.header.key = "content-length"
        length.header.raw_value = b"%d" % len(body)
        common.body_mutation.body = body
    if remove_headers:
        mutation.remove_headers.extend(remove_headers)
    common.clear_route_cache = True
    return resp


def response_headers(mode: ProcessingMode | None = None,
                     remove_headers: Iterable[str] = ()) -> ProcessingResponse:
    return _headers_answer("response_headers", remove_headers, mode)


def response_body(body: bytes | None = None) -> ProcessingResponse:
    resp = ProcessingResponse()
    if body is not None:
        resp.response_body.response.body_mutation.body = body
    else:
        resp.response_body.SetInParent()
    return resp


def trailers(request: bool, remove_headers: Iterable[str] = ()) -> ProcessingResponse:
    answer = ep.TrailersResponse()
    answer.header_mutation.remove_headers.extend(remove_headers)
    if request:
        return ProcessingResponse(request_trailers=answer)
    return ProcessingResponse(response_trailers=answer)


def immediate(
    status: int, body: bytes, headers: dict[str, str] | None = None, details: str = ""
) -> ProcessingResponse:
    resp = ProcessingResponse()
    reply = resp.immediate_response
    reply.status.code = status  # type: ignore[assignment]
    _set_headers(reply.headers, {"content-type": "application/json", **(headers or {})})
    reply.body = body
    reply.details = details
    return resp


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
    """Header name → value; a header sent more than once has its values joined by commas,
    as HTTP combines them, so no reader sees only one of them (a duplicated
    `x-tenant-id: bob` / `x-tenant-id: alice` is one invalid value, not alice)."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        # As bytes read as Latin-1 either way (an older Envoy fills `value`).
        value = (h.raw_value if h.raw_value else h.value.encode()).decode("latin-1")
        out[h.key] = f"{out[h.key]},{value}" if h.key in out else value
    return out
