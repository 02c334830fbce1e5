"""Fake OpenAI-compatible model server.

Serves as a demo upstream behind Envoy and as a test fixture: every request
that reaches a ``/v1`` endpoint is recorded byte-for-byte so tests can assert
exactly what a "provider" received. All replies are deterministic.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import re
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

JsonDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BodyHandler = Callable[[web.Request, JsonDict], Awaitable[web.StreamResponse]]

UPSTREAM_NAME_HEADER = "x-upstream-name"
MAX_RECORDED_REQUESTS = 100
EMBEDDING_DIMENSIONS = 8
# Fixed so that responses are byte-for-byte reproducible across runs.
CREATED_TIMESTAMP = 1_700_000_000
MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestError(Exception):
    """A client error that becomes an OpenAI-shaped 400 response."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class UpstreamConfig:
    name: str = "demo"
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    seed: int = 0


class UpstreamState:
    """Mutable per-app state: id counter, failure RNG and request log."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.requests: deque[JsonDict] = deque(maxlen=MAX_RECORDED_REQUESTS)
        self._counter = 0

    def next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self.config.name}-{self._counter:06d}"

    def should_fail(self) -> bool:
        # Always draw so the failure sequence depends only on the request count.
        draw = self.rng.random()
        return draw < self.config.error_rate


STATE_KEY = web.AppKey("upstream_state", UpstreamState)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


def reply_text(name: str, said: str) -> str:
    return f"[{name}] you said: {said}"


def content_text(content: Any, part_types: Iterable[str] = ("text",)) -> str:
    """Text of a message content: the string itself or its joined text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        allowed = set(part_types)
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in allowed
        ]
        return "\n".join(texts)
    raise RequestError("message content must be a string or a list of parts")


def split_for_stream(text: str) -> list[str]:
    """Split per word, keeping whitespace, so the pieces concatenate to text."""
    return re.findall(r"\S+\s*|\s+", text)


def usage_object(prompt_tokens: int, completion_tokens: int) -> JsonDict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_usage(message_texts: list[str], reply: str) -> JsonDict:
    prompt_tokens = sum(count_tokens(text) + 3 for text in message_texts)
    return usage_object(prompt_tokens, count_tokens(reply))


def embedding_vector(key: bytes) -> list[float]:
    digest = hashlib.sha256(key).digest()
    ints = struct.unpack(f"<{EMBEDDING_DIMENSIONS}h", digest[: 2 * EMBEDDING_DIMENSIONS])
    # n / 32768 is exactly representable as float32, so the float and base64
    # encodings of a vector agree bit-for-bit.
    return [value / 32768.0 for value in ints]


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        packed = struct.pack(f"<{len(vector)}f", *vector)
        return base64.b64encode(packed).decode("ascii")
    return vector


def is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def embedding_inputs(raw: Any) -> list[tuple[bytes, int]]:
    """Normalise embeddings ``input`` into (hash key, token count) pairs."""
    if isinstance(raw, str):
        return [(raw.encode("utf-8"), count_tokens(raw))]
    if is_token_list(raw) and raw:
        return [(json.dumps(raw).encode("ascii"), len(raw))]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, str) for item in raw):
            return [(item.encode("utf-8"), count_tokens(item)) for item in raw]
        if all(is_token_list(item) for item in raw):
            return [(json.dumps(item).encode("ascii"), len(item)) for item in raw]
    raise RequestError("input must be a string, a list of strings, or token arrays", "input")


def completion_prompts(raw: Any) -> list[tuple[str, int]]:
    """Each prompt's text, and its tokens: a string, a list of strings, token ids or lists
    of token ids, as OpenAI takes them (token ids read back as `<N tokens>`)."""
    if isinstance(raw, str):
        return [(raw, count_tokens(raw))]
    if is_token_list(raw) and raw:
        return [(f"<{len(raw)} tokens>", len(raw))]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return [(item, count_tokens(item)) for item in raw]
    if isinstance(raw, list) and raw and all(is_token_list(item) and item for item in raw):
        return [(f"<{len(item)} tokens>", len(item)) for item in raw]
    raise RequestError("prompt must be a string, a non-empty list of strings, token ids "
                       "or lists of token ids", "prompt")


def chat_message_texts(body: JsonDict) -> tuple[list[str], str]:
    """All message texts, and the text of the last user message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    texts: list[str] = []
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("each message must be an object", "messages")
        text = content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    return texts, last_user


RESPONSES_PART_TYPES = ("text", "input_text", "output_text")


def responses_input_texts(raw: Any) -> tuple[list[str], str]:
    """Responses API ``input``: a string (one user message) or message items."""
    if isinstance(raw, str):
        return [raw], raw
    if not isinstance(raw, list) or not raw:
        raise RequestError("input must be a string or a non-empty list", "input")
    texts: list[str] = []
    last_user = ""
    for item in raw:
        if not isinstance(item, dict):
            raise RequestError("each input item must be an object", "input")
        text = content_text(item.get("content"), RESPONSES_PART_TYPES)
        texts.append(text)
        if item.get("role") == "user":
            last_user = text
    return texts, last_user


def error_body(
    message: str, error_type: str, code: str | None, param: str | None = None
) -> JsonDict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, body: JsonDict) -> web.Response:
    return web.json_response(body, status=status)


# ---------------------------------------------------------------------------
# Request recording, latency and failure injection
# ---------------------------------------------------------------------------


def header_dict(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def record_request(state: UpstreamState, request: web.Request, raw: bytes) -> None:
    state.requests.append(
        {
            "method": request.method,
            "path": request.raw_path,  # as received, query string and all
            "headers": header_dict(request),
            "body": raw.decode("utf-8", errors="replace"),
            "content_length_header": request.headers.get("Content-Length"),
            "body_bytes": len(raw),
        }
    )


def parse_json_object(raw: bytes) -> JsonDict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"Invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    return body


def v1_endpoint(handler: BodyHandler, *, json_body: bool = True) -> Handler:
    """Wrap a /v1 handler with recording, latency, failure injection and parsing."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        raw = await request.read()
        record_request(state, request, raw)
        if state.config.latency_ms > 0:
            await asyncio.sleep(state.config.latency_ms / 1000.0)
        if state.should_fail():
            body = error_body("injected failure", "server_error", "upstream_error")
            return error_response(state.config.error_status, body)
        try:
            parsed = parse_json_object(raw) if json_body else {}
            return await handler(request, parsed)
        except RequestError as exc:
            body = error_body(exc.message, "invalid_request_error", None, exc.param)
            return error_response(400, body)

    return wrapped


# ---------------------------------------------------------------------------
# Server-sent events
# ---------------------------------------------------------------------------


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload: str, name: str | None = None) -> None:
    # aiohttp frames each write() as its own HTTP chunk and StreamResponse.write
    # drains under backpressure (resp.drain() is deprecated); yielding to the
    # loop lets the transport flush before the next event is produced.
    field = f"event: {name}\n" if name is not None else ""
    await response.write(f"{field}data: {payload}\n\n".encode())
    await asyncio.sleep(0)


async def stream_events(request: web.Request, chunks: Iterable[JsonDict]) -> web.StreamResponse:
    response = await start_sse(request)
    for chunk in chunks:
        await send_event(response, json.dumps(chunk))
    await send_event(response, "[DONE]")
    await response.write_eof()
    return response


async def stream_typed_events(
    request: web.Request, events: Iterable[JsonDict]
) -> web.StreamResponse:
    """Responses API stream: each event is named by its ``type``, and no [DONE] follows."""
    response = await start_sse(request)
    for event in events:
        await send_event(response, json.dumps(event), event["type"])
    await response.write_eof()
    return response


def include_usage(body: JsonDict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage_field(body: JsonDict, chunks: list[JsonDict], usage: JsonDict) -> list[JsonDict]:
    """Add the trailing usage chunk and ``usage: null`` markers when requested."""
    if not include_usage(body):
        return chunks
    for chunk in chunks:
        chunk["usage"] = None
    final = dict(chunks[-1])
    final["choices"] = []
    final["usage"] = usage
    return [*chunks, final]


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


def chat_chunk(base: JsonDict, delta: JsonDict, finish_reason: str | None) -> JsonDict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**base, "choices": [choice]}


def chat_stream_chunks(base: JsonDict, reply: str) -> list[JsonDict]:
    chunks = [chat_chunk(base, {"role": "assistant", "content": ""}, None)]
    chunks += [chat_chunk(base, {"content": piece}, None) for piece in split_for_stream(reply)]
    chunks.append(chat_chunk(base, {}, "stop"))
    return chunks


async def chat_completions(request: web.Request, body: JsonDict) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    texts, last_user = chat_message_texts(body)
    reply = reply_text(state.config.name, last_user)
    usage = chat_usage(texts, reply)
    base: JsonDict = {
        "id": state.next_id("chatcmpl"),
        "created": CREATED_TIMESTAMP,
        "model": body.get("model"),
        "system_fingerprint": None,
    }
    if body.get("stream") is True:
        chunks = chat_stream_chunks({**base, "object": "chat.completion.chunk"}, reply)
        return await stream_events(request, with_usage_field(body, chunks, usage))
    message = {"role": "assistant", "content": reply, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    result = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    return web.json_response(result)


def text_choice(text: str, finish_reason: str | None, index: int = 0) -> JsonDict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def text_chunk(base: JsonDict, text: str, finish_reason: str | None,
               index: int = 0) -> JsonDict:
    return {**base, "choices": [text_choice(text, finish_reason, index)]}


async def completions(request: web.Request, body: JsonDict) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    prompts = completion_prompts(body.get("prompt"))
    # One choice per prompt, as OpenAI answers a list of them.
    replies = [reply_text(state.config.name, text) for text, _ in prompts]
    # Raw prompts carry no per-message overhead, unlike chat messages.
    usage = usage_object(sum(tokens for _, tokens in prompts),
                         sum(count_tokens(r) for r in replies))
    base: JsonDict = {
        "id": state.next_id("cmpl"),
        "object": "text_completion",
        "created": CREATED_TIMESTAMP,
        "model": body.get("model"),
        "system_fingerprint": None,
    }
    if body.get("stream") is True:
        chunks = [text_chunk(base, piece, None, i) for i, reply in enumerate(replies)
                  for piece in split_for_stream(reply)]
        chunks += [text_chunk(base, "", "stop", i) for i in range(len(replies))]
        return await stream_events(request, with_usage_field(body, chunks, usage))
    choices = [text_choice(reply, "stop", i) for i, reply in enumerate(replies)]
    return web.json_response({**base, "choices": choices, "usage": usage})


async def embeddings(request: web.Request, body: JsonDict) -> web.StreamResponse:
    inputs = embedding_inputs(body.get("input"))
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError("encoding_format must be 'float' or 'base64'", "encoding_format")
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_embedding(embedding_vector(key), encoding_format),
        }
        for index, (key, _tokens) in enumerate(inputs)
    ]
    prompt_tokens = sum(tokens for _key, tokens in inputs)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def response_object(
    base: JsonDict, status: str, output: list[JsonDict], usage: JsonDict | None
) -> JsonDict:
    return {**base, "status": status, "output": output, "usage": usage}


def responses_stream_events(base: JsonDict, message: JsonDict, usage: JsonDict) -> list[JsonDict]:
    """The Responses API event sequence for a one-message reply, as OpenAI sends it."""
    part = message["content"][0]
    reply = part["text"]
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    started = response_object(base, "in_progress", [], None)
    events: list[JsonDict] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []}
            for piece in split_for_stream(reply)
        ),
        {"type": "response.output_text.done", **at, "text": reply, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {
            "type": "response.completed",
            "response": response_object(base, "completed", [message], usage),
        },
    ]
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


async def responses(request: web.Request, body: JsonDict) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    texts, last_user = responses_input_texts(body.get("input"))
    reply = reply_text(state.config.name, last_user)
    counts = chat_usage(texts, reply)
    usage = {
        "input_tokens": counts["prompt_tokens"],
        "output_tokens": counts["completion_tokens"],
        "total_tokens": counts["total_tokens"],
    }
    output_text = {"type": "output_text", "text": reply, "annotations": []}
    message = {
        "type": "message",
        "id": state.next_id("msg"),
        "status": "completed",
        "role": "assistant",
        "content": [output_text],
    }
    base: JsonDict = {
        "id": state.next_id("resp"),
        "object": "response",
        "created_at": CREATED_TIMESTAMP,
        "model": body.get("model"),
    }
    if body.get("stream") is True:
        return await stream_typed_events(request, responses_stream_events(base, message, usage))
    return web.json_response(response_object(base, "completed", [message], usage))


async def list_models(request: web.Request, body: JsonDict) -> web.StreamResponse:
    return web.json_response({"object": "list", "data": []})


async def unknown_v1(request: web.Request, body: JsonDict) -> web.StreamResponse:
    message = f"Unknown endpoint: {request.method} {request.path}"
    return error_response(404, error_body(message, "invalid_request_error", "unknown_url"))


async def get_debug_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": list(request.app[STATE_KEY].requests)})


async def clear_debug_requests(request: web.Request) -> web.Response:
    request.app[STATE_KEY].requests.clear()
    return web.json_response({"requests": []})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


# ---------------------------------------------------------------------------
# App wiring and entry points
# ---------------------------------------------------------------------------


def make_app(config: UpstreamConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = UpstreamState(config)

    async def add_name_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[UPSTREAM_NAME_HEADER] = config.name

    app.on_response_prepare.append(add_name_header)
    app.router.add_post("/v1/chat/completions", v1_endpoint(chat_completions))
    app.router.add_post("/v1/completions", v1_endpoint(completions))
    app.router.add_post("/v1/embeddings", v1_endpoint(embeddings))
    app.router.add_post("/v1/responses", v1_endpoint(responses))
    app.router.add_get("/v1/models", v1_endpoint(list_models, json_body=False), allow_head=False)
    # Registered last so it only catches /v1 requests no route above accepts;
    # they are still recorded, which helps debug proxy routing.
    app.router.add_route("*", "/v1/{tail:.*}", v1_endpoint(unknown_v1, json_body=False))
    app.router.add_get("/debug/requests", get_debug_requests, allow_head=False)
    app.router.add_delete("/debug/requests", clear_debug_requests)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app


async def serve(config: UpstreamConfig, host: str, port: int) -> None:
    # Envoy forwards headers up to 60 KiB (max_request_headers_kb); aiohttp's own bound
    # (8190 bytes) would answer a longer one with a text/plain 400 no provider sends.
    runner = web.AppRunner(make_app(config), access_log=None, max_line_size=61440,
                           max_field_size=61440)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _in_range(kind: Callable[[str], float], low: float, high: float,
              message: str) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` from `low` to `high` (NaN never is)."""
    def parse(value: str) -> Any:
        number = kind(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(message)
        return number
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


error_rate_arg = _in_range(float, 0.0, 1.0, "must be between 0 and 1")
latency_arg = _in_range(float, 0.0, sys.float_info.max, "must be 0 or more milliseconds")
error_status_arg = _in_range(int, 400, 599, "must be an HTTP error status, 400 to 599")
port_arg = _in_range(int, 1, 65535, "must be 1 to 65535")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="atp-extproc demo-upstream",
        description="A fake OpenAI-compatible model server: chat, completions and "
                    "responses (streamed or not), embeddings and GET /v1/models; GET "
                    "/debug/requests lists what it received.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=port_arg, default=18001, help="port to listen on")
    parser.add_argument("--name", default="demo",
                        help="its name: in the x-upstream-name header and each reply")
    parser.add_argument("--latency-ms", type=latency_arg, default=0.0,
                        help="wait this long before each answer")
    parser.add_argument("--error-rate", type=error_rate_arg, default=0.0,
                        help="share of requests (0 to 1) answered with --error-status")
    parser.add_argument("--error-status", type=error_status_arg, default=503,
                        help="HTTP status of those errors")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the error draws, for repeatable runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = UpstreamConfig(
        name=args.name,
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        seed=args.seed,
    )
    try:
        asyncio.run(serve(config, args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the address is in use or cannot be bound
        print(f"demo-upstream: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
