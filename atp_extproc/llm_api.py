"""OpenAI-compatible bodies: parse and check requests, rewrite them, read usage back.

Requests are parsed one top-level member at a time so each member's exact span in the
text is known: rewriting `model` (or adding `stream_options`) is then a splice, not a
re-serialisation of a body that may be megabytes of prompt.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, Protocol

import orjson

OPERATIONS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
# The field each operation cannot do without; a provider would reject the request anyway,
# so ATP answers first and nothing is sent.
_REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input",
             "responses": "input"}
# Streaming usage can be asked for on these; /v1/responses always reports it at the end.
_STREAM_OPTIONS_OPS = frozenset({"chat", "completions"})

MAX_MODEL_LENGTH = 256
_MODEL_OK = re.compile(rf"[\x21-\x7e]{{1,{MAX_MODEL_LENGTH}}}")
_WS = re.compile(r"[ \t\n\r]*")


class RequestError(Exception):
    """A request ATP refuses; rendered as an OpenAI-shaped error with `status`."""

    def __init__(self, status: int, message: str, code: str,
                 type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": self.param, "code": self.code}}).encode()


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    # 1e400 would parse as inf and be written back as the bare token Infinity.
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_finite_float)
_scan_once = _DECODER.scan_once


def _invalid(reason: str) -> RequestError:
    return RequestError(400, f"We could not parse the JSON body of your request: {reason}",
                        "invalid_json")


@dataclass(slots=True)
class ParsedBody:
    text: str
    doc: dict[str, Any]
    # top-level key → (start, end) of its value in `text`
    spans: dict[str, tuple[int, int]]
    open_brace: int


def parse_body(raw: bytes, max_depth: int) -> ParsedBody:
    """Parse and check the JSON itself; `max_depth` names the limit in the error when
    the C parser's own recursion guard trips."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"not UTF-8 at byte {exc.start}") from None
    try:
        parsed = _parse_object(text)
    except _DuplicateKey as exc:
        raise RequestError(400, f"Duplicate key {str(exc)!r} in the JSON body; each key may "
                           "appear once", "duplicate_key") from None
    except RecursionError:
        raise _depth_error(max_depth) from None
    except (ValueError, StopIteration, IndexError) as exc:
        raise _invalid(_describe(exc)) from None
    return parsed


def check_depth(parsed: ParsedBody, max_depth: int) -> None:
    """Refuse nesting deeper than `max_depth` (JSON deeper than ~1000 levels never parses).

    Run after the cheap count limits of read_request: the walk costs per container.
    """
    # Counting brackets (in C) proves most bodies shallow without walking them; brackets
    # inside strings only make the count larger, never wrongly smaller.
    brackets = parsed.text.count("{") + parsed.text.count("[")
    if brackets > max_depth and _too_deep(parsed.doc, max_depth):
        raise _depth_error(max_depth)


def _describe(exc: Exception) -> str:
    if isinstance(exc, StopIteration):
        return f"unexpected value at character {exc.value}"
    if isinstance(exc, IndexError):
        return "unexpected end of body"
    return str(exc)


def _depth_error(max_depth: int) -> RequestError:
    return RequestError(400, f"The JSON body is nested deeper than {max_depth} levels",
                        "json_too_deep")


def _parse_object(text: str) -> ParsedBody:
    i = _WS.match(text).end()  # type: ignore[union-attr]
    if text[i:i + 1] != "{":
        # Tell "valid JSON but not an object" apart from "not JSON": the fixes differ.
        try:
            json.loads(text)
        except ValueError:
            raise ValueError("expected a JSON object") from None
        raise RequestError(400, "The request body must be a JSON object", "invalid_body")
    open_brace = i
    doc: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i] == "}":
        i += 1
    else:
        while True:
            if text[i] != '"':
                raise ValueError(f"expected a key at character {i}")
            key, i = scanstring(text, i + 1)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] != ":":
                raise ValueError(f"expected ':' at character {i}")
            start = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            value, i = _scan_once(text, start)
            if key in doc:
                raise _DuplicateKey(key)
            doc[key] = value
            spans[key] = (start, i)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                continue
            if text[i] == "}":
                i += 1
                break
            raise ValueError(f"expected ',' or '}}' at character {i}")
    if _WS.match(text, i).end() != len(text):  # type: ignore[union-attr]
        raise ValueError(f"extra data at character {i}")
    return ParsedBody(text, doc, spans, open_brace)


def _too_deep(doc: dict[str, Any], limit: int) -> bool:
    # Walks containers only, never characters: cost follows structure, not prompt size.
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


@dataclass(frozen=True, slots=True)
class LlmRequest:
    operation: str
    model: str | None
    stream: bool
    client_wants_usage: bool
    message_count: int
    tool_names: tuple[str, ...]


class CountLimits(Protocol):
    """Counts a body may hold; the config's `server` block is one."""

    @property
    def max_messages(self) -> int: ...

    @property
    def max_tools(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_messages: int = 2048
    max_tools: int = 256


_DEFAULT_LIMITS = Limits()


def _check_counts(doc: dict[str, Any], limits: CountLimits) -> None:
    for key, most in (("messages", limits.max_messages), ("input", limits.max_messages),
                      ("tools", limits.max_tools)):
        value = doc.get(key)
        if isinstance(value, list) and len(value) > most and not (
                key == "input" and value and isinstance(value[0], int)):
            raise RequestError(400, f"'{key}' holds {len(value)} items; at most {most} are "
                               "accepted", "too_many_items", param=key)


def read_request(operation: str, doc: dict[str, Any],
                 limits: CountLimits = _DEFAULT_LIMITS) -> LlmRequest:
    """The request's facts, after the count limits (checked before any per-item work)."""
    _check_counts(doc, limits)
    model = doc.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", "invalid_type", param="model")
        if not _MODEL_OK.fullmatch(model):
            raise RequestError(
                400, f"'model' must be 1 to {MAX_MODEL_LENGTH} printable ASCII characters "
                "without spaces or control characters", "invalid_model", param="model")
    stream = doc.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "invalid_type", param="stream")
    required = _REQUIRED[operation]
    if required not in doc:
        raise RequestError(400, f"Missing required parameter: '{required}'",
                           "missing_required_parameter", param=required)
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", "invalid_type",
                           param="stream_options")
    messages = doc.get("messages") if operation == "chat" else None
    if operation == "chat":
        _check_messages(messages)
    tools = doc.get("tools")
    return LlmRequest(
        operation=operation,
        model=model,
        stream=stream,
        client_wants_usage=bool(options and options.get("include_usage") is True),
        message_count=len(messages) if isinstance(messages, list) else 0,
        tool_names=_tool_names(tools),
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "invalid_type",
                           param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'",
                               "invalid_type", param=f"messages[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(400, f"messages[{i}].content must be a string or an array "
                               "of content parts", "invalid_type",
                               param=f"messages[{i}].content")


def tool_name(tool: Any) -> str | None:
    """A declared tool's name: `function.name` (Chat Completions) or `name` (Responses);
    None for a built-in tool (web_search, file_search ...), which has only a type."""
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
    return name if isinstance(name, str) else None


def _tool_names(tools: Any) -> tuple[str, ...]:
    if not isinstance(tools, list):
        return ()
    return tuple(name for name in map(tool_name, tools) if name is not None)


def needs_usage_injection(request: LlmRequest) -> bool:
    return (request.stream and request.operation in _STREAM_OPTIONS_OPS
            and not request.client_wants_usage)


def rewrite(parsed: ParsedBody, set_fields: dict[str, Any]) -> bytes:
    """Splice new values for top-level fields into the original text."""
    edits: list[tuple[int, int, str]] = []
    inserts: list[str] = []
    for key, value in set_fields.items():
        # ASCII escapes keep a client's lone surrogate (valid as a JSON escape) encodable.
        encoded = json.dumps(value, separators=(",", ":"))
        span = parsed.spans.get(key)
        if span is None:
            inserts.append(f"{json.dumps(key)}:{encoded}")
        else:
            edits.append((span[0], span[1], encoded))
    if inserts:
        tail = "," if parsed.doc else ""
        at = parsed.open_brace + 1
        edits.append((at, at, ",".join(inserts) + tail))
    text = parsed.text
    pieces: list[str] = []
    pos = 0
    for start, end, new in sorted(edits):
        pieces.append(text[pos:start])
        pieces.append(new)
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces).encode()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False


def _usage_of(obj: Any) -> Usage | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    inp = usage.get("prompt_tokens", usage.get("input_tokens"))
    out = usage.get("completion_tokens", usage.get("output_tokens", 0))
    # `type() is int`: JSON true/false would pass isinstance(…, int).
    if type(inp) is not int or type(out) is not int or inp < 0 or out < 0:
        return None
    return Usage(inp, out)


def read_response(body: bytes) -> tuple[Usage | None, str | None]:
    """Usage and the first choice's finish_reason of a JSON response body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:  # too deep included
        return None, None
    return _usage_of(obj), _finish_reason(obj)


def _finish_reason(obj: Any) -> str | None:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None


def estimate_tokens(n_chars: int) -> int:
    # ~4 characters a token for English text; only used when the provider reports nothing.
    return math.ceil(n_chars / 4)


# Captured, so one split yields [event, separator, event, separator, ..., tail].
_EVENT_END = re.compile(rb"(\r?\n\r?\n)")


class SseStream:
    """Reads usage out of an SSE response, chunk by chunk.

    With `drop_usage_chunk`, the usage-only chunk that ATP asked for on the client's
    behalf is removed; complete events are passed on and a partial event is held back
    until its end arrives, so the client never sees half of a dropped event.
    """

    def __init__(self, drop_usage_chunk: bool):
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.output_chars = 0
        self.events = 0
        self._tail = b""

    def feed(self, chunk: bytes, end: bool) -> bytes | None:
        """Observe a chunk; return its replacement, or None to pass it unchanged."""
        data = self._tail + chunk
        pieces = _EVENT_END.split(data)
        self._tail = b"" if end else pieces.pop()
        kept: list[bytes] = []
        changed = False
        for i in range(0, len(pieces), 2):
            event, sep = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else b""
            if event and self._observe(event) and self.drop_usage_chunk:
                changed = True
                continue
            kept.append(event + sep)
        if not self.drop_usage_chunk:
            return None
        out = b"".join(kept)
        return out if changed or out != chunk else None

    def _observe(self, event: bytes) -> bool:
        """Record what the event says; True if it is a usage-only chunk."""
        self.events += 1
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("type") == "response.completed":
                obj = obj.get("response")
                if not isinstance(obj, dict):
                    continue
            usage = _usage_of(obj)
            if usage is not None:
                self.usage = usage
                return obj.get("choices") == []
            self.finish_reason = _finish_reason(obj) or self.finish_reason
            self.output_chars += _delta_chars(obj)
        return False


def _delta_chars(obj: dict[str, Any]) -> int:
    total = 0
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            total += len(text)
    delta = obj.get("delta")
    if isinstance(delta, str):
        total += len(delta)
    return total
