"""OpenAI-compatible bodies: parse and check requests, rewrite them, read usage back.

Requests are parsed one top-level member at a time so each member's exact span in the
text is known: rewriting `model` (or adding `stream_options`) is then a splice, not a
re-serialisation of a body that may be megabytes of prompt.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, NamedTuple, Protocol

import orjson

OPERATIONS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
# The field each operation cannot do without, its messages, prompts or inputs; a provider
# would reject a request without it anyway, so ATP answers first and nothing is sent.
ITEMS_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input",
               "responses": "input"}
# Streaming usage can be asked for on these; /v1/responses always reports it at the end.
_STREAM_OPTIONS_OPS = frozenset({"chat", "completions"})

MAX_MODEL_LENGTH = 256
_MODEL_OK = re.compile(rf"[\x21-\x7e]{{1,{MAX_MODEL_LENGTH}}}")
_WS = re.compile(r"[ \t\n\r]*")


class RequestError(Exception):
    """A request ATP refuses; rendered as an OpenAI-shaped error with `status`."""

    def __init__(self, status: int, message: str, code: str,
                 type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, policy_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param
        # Response headers the status calls for (a 405's Allow).
        self.headers = headers
        # The policy whose decision made this a refusal, named as policy_denied's are.
        self.policy_id = policy_id

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}
        if self.policy_id is not None:
            error["policy_id"] = self.policy_id
        return json.dumps({"error": error}).encode()


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


class UnreadableNumber(ValueError):
    """A JSON number Python cannot hold as written: an integer longer than
    sys.get_int_max_str_digits, or one out of a float's range (1e400)."""


def finite_float(text: str) -> float:
    """json's parse_float, raising UnreadableNumber for a number out of range: it would
    parse as inf and be written back as the bare token Infinity, which is no JSON."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise UnreadableNumber(f"number {text[:32]} is out of range")
    return value


def bounded_int(text: str) -> int:
    """json's parse_int, raising UnreadableNumber past Python's bound."""
    try:
        return int(text)
    except ValueError:
        # Python's own message points the client at sys.set_int_max_str_digits.
        raise UnreadableNumber(f"a number of {len(text.lstrip('-'))} digits is too long "
                               f"(at most {sys.get_int_max_str_digits()})") from None


# Integers parse in C: bounded_int, a Python call per integer, would cost bodies of token
# ids several times over; an over-long one is named when the error is described.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=finite_float)
_scan_once = _DECODER.scan_once
# Tool-call arguments are read as json.loads reads them, a key given twice aside.
_ARGUMENTS_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates,
                                      parse_float=finite_float, parse_int=bounded_int)


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
    if text.startswith("\ufeff"):
        # RFC 8259 forbids it, and some providers' parsers refuse what others ignore.
        raise _invalid("the body starts with a byte order mark (U+FEFF); send the JSON "
                       "without one")
    try:
        parsed = _parse_object(text)
    except _DuplicateKey as exc:
        raise RequestError(400, f"Duplicate key {str(exc)!r} in the JSON body; each key may "
                           "appear once", "duplicate_key") from None
    except RecursionError:
        raise _depth_error(max_depth) from None
    except (ValueError, StopIteration, IndexError) as exc:
        raise _invalid(_describe(exc, text)) from None
    if holds_lone_surrogate(text, parsed.doc):
        # Invalid Unicode, as the invalid UTF-8 refused above: scanned as a separator, it
        # would hide the value around it from redaction, while a provider's decoder
        # turns it into U+FFFD and the model reads the value whole.
        raise _invalid("a \\u escape leaves half of a UTF-16 surrogate pair (a lone "
                       "surrogate), which is not valid Unicode")
    return parsed


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A UTF-16 surrogate, which only a JSON escape can put in a str.
SURROGATE = re.compile("[\ud800-\udfff]")


def holds_lone_surrogate(text: str, decoded: Any) -> bool:
    """Whether JSON `text`, decoded as `decoded`, holds a lone surrogate (half of a
    UTF-16 pair, escaped): invalid Unicode, which redaction reads as a separator while a
    provider's decoder reads U+FFFD and the model the value around it whole."""
    # Only escapes can carry one (UTF-8 itself has no surrogates): text mostly has none.
    if _SURROGATE_ESCAPE.search(text) is None:
        return False
    if isinstance(decoded, str):
        return SURROGATE.search(decoded) is not None
    # Paired escapes decode to one character above U+FFFF: what is left is lone.
    stack: list[Any] = [decoded] if isinstance(decoded, (dict, list)) else []
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and SURROGATE.search(key):
                return True
            if isinstance(value, str):
                if SURROGATE.search(value):
                    return True
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return False


def parse_arguments(text: str) -> Any:
    """A tool call's JSON `arguments` (a string in the body), for policies to read.

    A key given twice is refused as in the body itself: policies would read one value
    and a provider perhaps the other. Raises ValueError when the text is no JSON, and
    RecursionError (too deep) or UnreadableNumber when it is JSON Python cannot read
    whole."""
    try:
        return _ARGUMENTS_DECODER.decode(text)
    except _DuplicateKey as exc:
        raise RequestError(400, f"Duplicate key {str(exc)!r} in the arguments of a tool "
                           "call; each key may appear once", "duplicate_key") from None


def check_depth(parsed: ParsedBody, max_depth: int) -> None:
    """Refuse nesting deeper than `max_depth` (JSON deeper than ~1000 levels never parses).

    Run after the cheap count limits of read_request: the walk costs per container.
    """
    # Counting brackets (in C) proves most bodies shallow without walking them; brackets
    # inside strings only make the count larger, never wrongly smaller.
    brackets = parsed.text.count("{") + parsed.text.count("[")
    if brackets > max_depth and _too_deep(parsed.doc, max_depth):
        raise _depth_error(max_depth)


def _describe(exc: Exception, text: str) -> str:
    if isinstance(exc, StopIteration):
        return f"unexpected value at character {exc.value}"
    if isinstance(exc, IndexError):
        return "unexpected end of body"
    if type(exc) is ValueError:
        # Not json's own (a JSONDecodeError): maybe Python's integer limit, whose message
        # points the client at sys.set_int_max_str_digits. Read again to name the number.
        try:
            json.loads(text, parse_int=bounded_int)
        except UnreadableNumber as plain:
            return str(plain)
        except (ValueError, RecursionError):
            pass
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
            # Where: a NUL or a no-break space before the "{" is no JSON whitespace.
            raise ValueError(f"expected a JSON object at character {i}") from None
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


_INTS = frozenset({int})
_STRS = frozenset({str})
_LISTS = frozenset({list})
_OBJECTS = frozenset({dict})
_PARTS = frozenset({str, dict})


def _only(items: list[Any], kinds: frozenset[type]) -> bool:
    # map/set run in C: cheap even over a long token array. Exact types: JSON true and
    # false would pass isinstance(…, int).
    return set(map(type, items)) <= kinds


# The request's caps on generated tokens (Chat's old and new name, Responses'): a
# provider honours whichever it reads, so policies see the largest.
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def token_ids(value: Any) -> bool:
    """Is `value` one input given as token ids (a non-empty list of ints)?"""
    return type(value) is list and bool(value) and _only(value, _INTS)


_INPUT_KEYS = frozenset(("messages", "input", "prompt"))
# Top-level fields that hold one string a provider reads or stores.
_STRING_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "instructions", "suffix")


# The request fields ATP reads, scans or checks. Go's encoding/json (behind many OpenAI-
# compatible servers) fills a struct field from a key equal to its name ignoring case,
# with Unicode folding ("Content", "me\u017f\u017fages"): such a key would reach the
# provider's `content` unread by redaction and policies, so it is refused.
_FIELDS = frozenset((
    "action", "allowed_tools", "arguments", "background", "best_of", "call_id", "code",
    "command", "commands", "content", "conversation", "custom", "diff", "error", "format",
    "function", "function_call", "functions", "id", "include_usage", "input",
    "instructions", "logs", "max_tokens", "max_completion_tokens", "max_output_tokens",
    "messages", "metadata", "mode", "model", "n", "name", "operation", "output",
    "outputs", "parallel_tool_calls", "parameters", "prediction", "previous_response_id",
    "prompt", "prompt_cache_key", "queries", "query", "refusal", "response_format",
    "results", "role", "safety_identifier", "stderr", "stdout", "store", "stream",
    "stream_options", "suffix", "summary", "text", "tool_call_id", "tool_calls",
    "tool_choice", "tools", "type", "user", "variables", "working_directory"))
# Values that are maps of the client's own keys (or JSON schemas), where "ID" and "id"
# may both be names: Go fills maps by exact key.
_USER_MAPS = frozenset(("metadata", "parameters", "schema", "logit_bias", "variables",
                        "headers", "input_schema", "env", "properties", "$defs",
                        "definitions", "patternProperties", "guided_json",
                        "structured_outputs", "chat_template_kwargs", "vllm_xargs",
                        "mm_processor_kwargs", "kv_transfer_params"))


@lru_cache(maxsize=8)
def _fields_with(scanned: frozenset[str]) -> frozenset[str]:
    """_FIELDS and the field names a config's redaction scans too: one set per config,
    not a union per request."""
    return _FIELDS | scanned


def wrong_case(key: str) -> RequestError:
    """The refusal of `key`, a field's name in another letter case."""
    return RequestError(400, f"Unrecognized request argument {key!r} (keys are case-"
                        f"sensitive: {key.casefold()!r}?)", "unknown_parameter", param=key)


def _check_field_names(node: Any, fields: frozenset[str]) -> None:
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                # (Tested here, not in a call: this runs for every key of every body.)
                if key not in fields and key.casefold() in fields:
                    raise wrong_case(key)
                if isinstance(value, (dict, list)) and key not in _USER_MAPS:
                    stack.append(value)
        elif isinstance(node, list):
            # Objects only: a list in a list is a token-id array (a prompt), never fields.
            stack.extend(v for v in node if isinstance(v, dict))


def _check_counts(operation: str, doc: dict[str, Any], limits: CountLimits) -> None:
    for key in ("messages", "input", "prompt"):
        value = doc.get(key)
        # A token-id array is one input however long, but only if every item is an int:
        # a leading int proves nothing.
        if isinstance(value, list) and len(value) > limits.max_messages and not (
                key in _INPUT_KEYS and token_ids(value)):
            raise _too_many(key, len(value), limits.max_messages)
    # Every tool counts, those of a namespace or an input item too: counted per list,
    # hundreds in one namespace were read, and forwarded. Each list is counted before
    # the namespaces in it are looked for.
    total = 0
    for param, tools in tool_lists(operation, doc):
        if not isinstance(tools, list):
            continue
        total += len(tools)
        if total > limits.max_tools:
            if total == len(tools):
                raise _too_many(param, total, limits.max_tools)
            raise RequestError(400, f"The request declares more than {limits.max_tools} "
                               f"tools, counting those in '{param}'; at most "
                               f"{limits.max_tools} are accepted", "too_many_items",
                               param=param)


def _too_many(param: str, count: int, most: int) -> RequestError:
    return RequestError(400, f"'{param}' holds {count} items; at most {most} are accepted",
                        "too_many_items", param=param)


def read_request(operation: str, doc: dict[str, Any],
                 limits: CountLimits = _DEFAULT_LIMITS,
                 scanned: frozenset[str] = frozenset()) -> LlmRequest:
    """The request's facts, after the count limits (checked before any per-item work).
    `scanned`: more field names redaction reads (`redaction.extra_paths`)."""
    _check_counts(operation, doc, limits)
    _check_field_names(doc, _fields_with(scanned))
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
    required = ITEMS_FIELD[operation]
    if operation == "responses":
        _check_stored_prompt(doc.get("prompt"))
    # A Responses request may take its input from a stored prompt instead.
    if required not in doc and not (operation == "responses" and doc.get("prompt")):
        raise RequestError(400, f"Missing required parameter: '{required}'",
                           "missing_required_parameter", param=required)
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", "invalid_type",
                           param="stream_options")
    if options and not isinstance(options.get("include_usage", False), bool | None):
        # ATP sets it to true when the client did not ask: a 1 or "true" would be read
        # as not asking, and the usage the client asked for dropped from its stream.
        raise RequestError(400, "'stream_options.include_usage' must be a boolean",
                           "invalid_type", param="stream_options.include_usage")
    for key in _STRING_FIELDS:
        # Redaction reads these as strings: any other shape would go out unscanned.
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise RequestError(400, f"'{key}' must be a string", "invalid_type", param=key)
    metadata = doc.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise RequestError(400, "'metadata' must be an object of strings", "invalid_type",
                           param="metadata")
    for key in TOKEN_LIMIT_KEYS:
        # Policies cap these: "8000" or 8000.0 would pass them and still be read as
        # 8000 by providers that coerce.
        if doc.get(key) is not None and type(doc[key]) is not int:
            raise RequestError(400, f"'{key}' must be an integer", "invalid_type", param=key)
    _check_tools(operation, doc)
    # Redaction only reads the shapes a provider accepts: any other shape would reach the
    # provider unscanned, so it is refused here.
    value = doc.get(required)
    if operation == "chat":
        _check_messages(value)
        prediction = doc.get("prediction")
        if prediction is not None and not (isinstance(prediction, dict) and isinstance(
                prediction.get("content", ""), (str, list))):
            raise RequestError(400, "'prediction' must be an object whose content is text "
                               "or text parts", "invalid_type", param="prediction")
    elif operation == "responses":
        if required in doc:
            _check_items(value)
    else:
        _check_prompt(required, value)
    return LlmRequest(
        operation=operation,
        model=model,
        stream=stream,
        client_wants_usage=bool(options and options.get("include_usage") is True),
        message_count=len(value) if operation == "chat" else 0,
        tool_names=_tool_names(doc.get("tools")) + _tool_names(doc.get("functions")),
    )


def _check_prompt(param: str, value: Any) -> None:
    """completions `prompt`, embeddings `input`: text, texts, token ids, token-id arrays
    (and a null prompt, which OpenAI reads as the start of a document)."""
    if type(value) is str or (value is None and param == "prompt"):
        return
    if type(value) is list:
        kinds = set(map(type, value))
        if kinds <= _STRS or kinds <= _INTS or (
                kinds == _LISTS and all(_only(ids, _INTS) for ids in value)):
            return
    raise RequestError(400, f"'{param}' must be a string, an array of strings, an array of "
                       "token ids or an array of token-id arrays", "invalid_type",
                       param=param)


def _check_stored_prompt(prompt: Any) -> None:
    """responses `prompt`: a stored prompt's reference, with variables that are text or
    input parts (redaction reads those shapes)."""
    if prompt is None:
        return
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if not isinstance(prompt, dict) or not (variables is None or (
            isinstance(variables, dict)
            and all(isinstance(v, (str, dict)) for v in variables.values()))):
        raise RequestError(400, "'prompt' must be an object whose 'variables' are strings or "
                           "input parts", "invalid_type", param="prompt")


def _check_items(value: Any) -> None:
    """responses `input`: text, or an array of input items (objects)."""
    if type(value) is str or (type(value) is list and _only(value, _OBJECTS)):
        return
    raise RequestError(400, "'input' must be a string or an array of input items (objects)",
                       "invalid_type", param="input")


# Where a body declares tools: `functions` is Chat Completions' older form of `tools`
# (entries {name, description, parameters}, forced by `function_call`), still accepted.
TOOL_LISTS = ("tools", "functions")


# Hosted tools that act at the provider (an MCP server's actions, code run in a
# container the request may name): a mirrored copy would act twice.
_ACTING_TOOLS = frozenset({"mcp", "code_interpreter"})


def mirror_hazard(operation: str, doc: dict[str, Any]) -> str | None:
    """What a copy of this request would do again at the provider, which no shadow may:
    add its turn to the client's `conversation`, or run a hosted tool that acts. None
    when a copy only answers."""
    if operation != "responses":
        return None
    if doc.get("conversation") is not None:
        return "conversation"
    for _, tools in tool_lists(operation, doc):
        for tool in tools if isinstance(tools, list) else ():
            if isinstance(tool, dict) and tool.get("type") in _ACTING_TOOLS:
                return str(tool["type"])
    return None


def tool_lists(operation: str, doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(param, value) of every list of tools a body declares, in body order: TOOL_LISTS,
    the tools of a Responses input item (`additional_tools`, `tool_search_output`, ...:
    any item with `tools`), and the tools grouped in a namespace tool of any of these.
    Values are as the body has them: read_request refuses any that is no list of
    objects, so after it they are."""
    lists: list[tuple[str, Any]] = [(key, doc[key]) for key in TOOL_LISTS
                                    if doc.get(key) is not None]
    items = doc.get("input") if operation == "responses" else None
    if isinstance(items, list):
        # An mcp_list_tools item lists an MCP server's tools: the server's, one tool
        # `mcp` to policies, not tools the request declares.
        lists += [(f"input[{i}].tools", item["tools"]) for i, item in enumerate(items)
                  if isinstance(item, dict) and item.get("tools") is not None
                  and item.get("type") != "mcp_list_tools"]
    for param, tools in lists:  # grows with the namespaces found on the way
        yield param, tools
        if isinstance(tools, list):
            lists += [(f"{param}[{i}].tools", tool["tools"]) for i, tool in enumerate(tools)
                      if isinstance(tool, dict) and tool.get("tools") is not None]


def _check_tools(operation: str, doc: dict[str, Any]) -> None:
    """Tools are objects with one name each: policies read a tool by the name tool_name
    gives, and a provider that reads another of its name fields must not be handed a
    tool policies never saw."""
    for param, tools in tool_lists(operation, doc):
        if not (type(tools) is list and _only(tools, _OBJECTS)):
            raise RequestError(400, f"'{param}' must be an array of tool objects",
                               "invalid_type", param=param)
        for i, tool in enumerate(tools):
            _check_tool(tool, f"{param}[{i}]", declared=True)
    for key in ("tool_choice", "function_call"):
        choice = doc.get(key)
        if choice is None or isinstance(choice, str):
            continue
        if not isinstance(choice, dict):
            raise RequestError(400, f"'{key}' must be a string or an object",
                               "invalid_type", param=key)
        # A forced MCP tool names the server's tool beside type "mcp": choices may.
        _check_tool(choice, key, declared=False)


# Tool types as the APIs spell them. Policies read "Function" or "function " as a built-in
# tool of that name, while a provider that folds case or trims (Go's strings.EqualFold,
# a lower()) reads a function and hands the model the tool its name gives.
_TOOL_TYPE = re.compile(r"[a-z][a-z0-9_.:-]*")


def _check_tool(tool: dict[str, Any], param: str, declared: bool) -> None:
    named = {"name": tool.get("name")}
    for key in ("function", "custom"):
        sub = tool.get(key)
        if isinstance(sub, dict):
            named[f"{key}.name"] = sub.get("name")
    given = {field: name for field, name in named.items() if name is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise RequestError(400, f"{param} has two different names ({' and '.join(given)}): "
                           "give a tool one name", "invalid_value", param=param)
    kind = tool.get("type")
    if not isinstance(kind, str):
        return  # no type: Chat's legacy function, read by its name
    if not _TOOL_TYPE.fullmatch(kind):
        raise RequestError(400, f"Invalid value for {param}.type: {kind!r} (tool types are "
                           "lowercase: 'function', 'custom', 'web_search' ...)",
                           "invalid_value", param=f"{param}.type")
    if declared and given and kind not in _NAMED_TOOL_TYPES:
        # Policies read a built-in tool by its type; a provider that ignores `type`
        # (Ollama reads every Responses tool as a function) would run it by the name.
        raise RequestError(400, f"{param} is a {kind!r} tool, which has no name "
                           f"({' and '.join(given)} given): function, custom and namespace "
                           "tools have one", "invalid_value", param=f"{param}.type")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "invalid_type",
                           param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'",
                               "invalid_type", param=f"messages[{i}]")
        content = message.get("content")
        if content is not None and not (isinstance(content, str) or (
                type(content) is list and _only(content, _PARTS))):
            raise RequestError(400, f"messages[{i}].content must be a string or an array "
                               "of content parts", "invalid_type",
                               param=f"messages[{i}].content")
        if "tool_calls" in message or "function_call" in message:
            _check_calls(message, f"messages[{i}]")


def _check_calls(message: dict[str, Any], where: str) -> None:
    """An assistant turn's tool calls: redaction and policies read their arguments as
    JSON text, so any other shape is refused rather than sent on unread."""
    calls = message.get("tool_calls")
    if calls is not None and not (type(calls) is list and _only(calls, _OBJECTS)):
        raise RequestError(400, f"{where}.tool_calls must be an array of tool calls",
                           "invalid_type", param=f"{where}.tool_calls")
    functions = [(f"{where}.tool_calls[{k}].function", call.get("function"))
                 for k, call in enumerate(calls or ())]
    functions.append((f"{where}.function_call", message.get("function_call")))
    for param, fn in functions:
        if fn is not None and not (isinstance(fn, dict) and isinstance(
                fn.get("arguments", ""), str)):
            raise RequestError(400, f"{param} must be an object whose arguments are a "
                               "string of JSON", "invalid_type", param=param)
    for k, call in enumerate(calls or ()):
        custom = call.get("custom")
        if custom is not None and not (isinstance(custom, dict) and isinstance(
                custom.get("input", ""), str)):
            param = f"{where}.tool_calls[{k}].custom"
            raise RequestError(400, f"{param} must be an object whose input is a string",
                               "invalid_type", param=param)


# Tools a provider runs by their name (Moonshot's Kimi names its built-ins so: `{"type":
# "builtin_function", "function": {"name": "$web_search"}}`); any other type is a
# provider's built-in tool (web_search, shell, mcp ...), and a tool without a type is
# Chat's legacy function.
_NAMED_TOOL_TYPES = frozenset({"function", "custom", "namespace", "builtin_function"})


def tool_name(tool: Any) -> str | None:
    """A declared tool's name: `function.name` or `custom.name` (Chat Completions) or
    `name` (Responses); None for a built-in tool (web_search, file_search ...), which has
    only a type. Also the name a tool_choice forces, which has the same shape."""
    if not isinstance(tool, dict):
        return None
    kind = tool.get("type")
    if isinstance(kind, str) and kind not in _NAMED_TOOL_TYPES:
        return None  # a provider runs a built-in tool by its type, whatever else it says
    for key in ("function", "custom"):
        sub = tool.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("name"), str):
            return str(sub["name"])
    # A nested object without a name ({"function": {"strict": true}}) names nothing: a
    # provider reads the tool by its `name` then (_check_tools refuses two names).
    name = tool.get("name")
    return name if isinstance(name, str) else None


def _tool_names(tools: Any) -> tuple[str, ...]:
    if not isinstance(tools, list):
        return ()
    return tuple(name for name in map(tool_name, tools) if name is not None)


def needs_usage_injection(request: LlmRequest) -> bool:
    return (request.stream and request.operation in _STREAM_OPTIONS_OPS
            and not request.client_wants_usage)


def rewrite(parsed: ParsedBody, set_fields: dict[str, Any],
            drop: Collection[str] = ()) -> bytes:
    """Splice new values for top-level fields into the original text, and remove the
    body's top-level keys named in `drop`."""
    if any(key in parsed.doc for key in drop):
        return _reserialize(parsed.doc, set_fields, drop)
    edits: list[tuple[int, int, str]] = []
    inserts: list[str] = []
    for key, value in set_fields.items():
        # UTF-8, not ASCII escapes: an escape takes up to 12 bytes for a 4-byte character,
        # and a body within max_body_bytes could grow past every limit behind ATP.
        encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
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


def _reserialize(doc: dict[str, Any], set_fields: dict[str, Any],
                 drop: Collection[str]) -> bytes:
    # Removing a member is rare (a policy stripped every tool): writing the whole body
    # again is simpler than splicing out a key and its comma.
    merged = {key: value for key, value in {**doc, **set_fields}.items() if key not in drop}
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False


# No real request comes near this; a provider's larger count would overflow the ledger's
# int64 sums, so it is read as no count at all and the figure is estimated instead.
MAX_USAGE_TOKENS = 10**9


def _is_count(value: Any) -> bool:
    # `type() is int`: JSON true/false would pass isinstance(…, int).
    return type(value) is int and 0 <= value <= MAX_USAGE_TOKENS


def _usage_of(obj: Any) -> Usage | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    # A name present as null says nothing: the other name's count stands (a gateway
    # filling both APIs' names, one of them null).
    inp = usage.get("prompt_tokens")
    if inp is None:
        inp = usage.get("input_tokens")
    out = usage.get("completion_tokens")
    if out is None:
        out = usage.get("output_tokens")
    if out is None:  # absent or null alike: embeddings have no output
        out = 0
    if not (_is_count(inp) and _is_count(out)):
        return None
    # xAI leaves its reasoning out of completion_tokens, counted in total_tokens and
    # billed as output (recorded 3-13x too cheap); OpenAI's completion_tokens hold it, and
    # its total is the sum. The rest of a total past the sum is not read as output: a
    # Gemini total holds its search results' prompt tokens, billed as input.
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    total = usage.get("total_tokens")
    if _is_count(reasoning) and _is_count(total) and reasoning and \
            total >= inp + out + reasoning and out + reasoning <= MAX_USAGE_TOKENS:
        out += reasoning
    return Usage(inp, out)


# How much of an answer too large to read is kept for its usage: the end, where the
# APIs put it, after the output (a generated image's base64).
USAGE_TAIL_BYTES = 64 * 1024
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*(?=\{)')


def usage_in_tail(tail: bytes) -> Usage | None:
    """The provider's usage in the last bytes of a JSON answer too large to read whole:
    the last `"usage": {...}` there whose counts are readable. Outside a JSON string a
    quote is no text's (text escapes it), so the key is the answer's own."""
    # The last few only, each read no further than a usage object goes: a tail of many
    # `"usage":{` read each to its end was quadratic, on the event loop.
    for m in reversed(list(_USAGE_KEY.finditer(tail))[-_USAGE_TRIES:]):
        try:
            value, _ = _DECODER.raw_decode(
                tail[m.end():m.end() + _USAGE_MAX_BYTES].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            continue
        usage = _usage_of({"usage": value})
        if usage is not None:
            return usage
    return None


_USAGE_TRIES = 3
_USAGE_MAX_BYTES = 4096  # a usage object with its details takes a few hundred
_DECODER = json.JSONDecoder()


def _answer_json(data: bytes | bytearray) -> Any:
    """The JSON value of a provider's answer or event; None where it is no JSON.

    orjson refuses JSON that RFC 8259 allows and the openai SDKs read: a lone surrogate
    escape (`"\\ud83d"`, half an emoji cut by a provider) and a number past a double
    (`1e400`); and the `NaN` and `Infinity` the SDKs read too (a logprob of
    `-Infinity`). Refused, a whole answer was counted failed and lost its usage, and the
    usage chunk ATP asked for reached the client: they are read as Python's json reads
    them."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # too deep included
        # Only those: read again, a cut or foreign answer (the usual failure) cost 6-8
        # times orjson's parse on the loop for nothing.
        reason = str(exc)
        if not (_PYTHON_READS.match(reason) or (
                _NON_FINITE_REFUSED.match(reason)
                and (b"NaN" in data or b"Infinity" in data))):
            return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


# orjson's reasons for refusing what Python's json reads.
_PYTHON_READS = re.compile(r"(?:no low|invalid high|invalid low) surrogate|"
                           r"number is infinity")
# ...and those it gives at a `NaN` or `Infinity`, among other characters.
_NON_FINITE_REFUSED = re.compile(r"unexpected character, expected a JSON value|"
                                 r"no digit after sign")


class Answer(NamedTuple):
    """What ATP reads of a JSON answer."""
    usage: Usage | None
    finish_reason: str | None  # the first choice's
    # Of output text, for an estimate when there is no usage (0 when there is); None
    # when the body is no JSON object, which no API answers with.
    chars: int | None
    # The provider's failure (an `error` object, a Responses `status: failed`), though
    # sent as a 2xx.
    failed: bool
    response_id: str | None  # a Responses answer's, which later turns may name


def read_response(body: bytes) -> Answer:
    """What a JSON response body says (Answer)."""
    # A BOM is no part of the JSON, and a reader may ignore it (RFC 8259 §8.1), as the
    # openai SDKs do: the answer is whole, and its usage is the provider's bill.
    obj = _answer_json(body.removeprefix(codecs.BOM_UTF8))
    if not isinstance(obj, dict):
        return Answer(None, None, None, False, None)
    usage = _usage_of(obj)
    # OpenRouter and others send a failure met mid-generation as a 200 (its docs say
    # so): counted a success, it drew the learned router's traffic to that provider.
    failed = bool(obj.get("error")) or obj.get("status") == "failed"
    return Answer(usage, _finish_reason(obj), _answer_chars(obj) if usage is None else 0,
                  failed, response_id(obj))


def response_id(obj: dict[str, Any]) -> str | None:
    """A Responses object's id, where it is one a later turn could name."""
    rid = obj.get("id")
    if obj.get("object") != "response" or not isinstance(rid, str):
        return None
    return rid if 0 < len(rid) <= 256 and rid.isprintable() else None


def choice_finish_reason(choice: dict[str, Any]) -> str | None:
    """A choice's finish_reason, None while it goes on: servers that mark a chunk not
    the last with "" (SGLang, older Ollama) or "null" (KoboldCpp) had the first chunk
    end the answer (held placeholder text went out unrestored; a cut stream read whole)."""
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) and reason not in ("", "null") else None


def _finish_reason(obj: Any) -> str | None:
    """The first choice's finish_reason; for a Responses object, the one its status
    says, so the quality proxy scores the Responses API too."""
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choice_finish_reason(choices[0])
    if obj.get("object") != "response":
        return None
    status = obj.get("status")
    if status == "completed":
        return "stop"
    details = obj.get("incomplete_details")
    why = details.get("reason") if status == "incomplete" and isinstance(details, dict) \
        else None
    return _INCOMPLETE_REASONS.get(why) if isinstance(why, str) else None


# A Responses answer's incomplete_details.reason, as Chat's finish_reason says it.
_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def estimate_tokens(n_chars: int) -> int:
    # ~4 bytes of UTF-8 a token for English text; only used when the provider reports nothing.
    return math.ceil(n_chars / 4)


# SSE ends a line with CRLF, LF or CR, and an event with an empty line. `\r(?!\n)` keeps
# one CRLF from being read as two line ends.
EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
# A separator is at most 4 bytes, so at most its first 3 can sit in held bytes; of those,
# only a trailing CR, LF or CRLF can (more would already have ended the event).
_SEPARATOR_OVERLAP = 2
_CR = 13
# Memory bound: an event this long without an end is passed on unread, not held (a
# usage-only chunk is never near it; a giant final event's usage is then estimated).
_MAX_EVENT = 4 << 20
# More choices than any API lets a request ask for (OpenAI: n <= 128).
_MAX_CHOICES = 1024
# /v1/responses streams end with one of these; each carries the response's usage.
_TERMINAL_TYPES = frozenset({"response.completed", "response.incomplete",
                             "response.failed"})


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
        # Events with data (a provider may send comments first, ": PROCESSING").
        self.data_events = 0
        # The provider's error event ended a stream that began 200 (OpenAI sends
        # `{"error": {...}}`; Responses `response.failed` or `error`).
        self.failed = False
        # The stream's last event came (`[DONE]`, or a Responses stream's terminal one).
        self.ended = False
        # The id of the Responses object its terminal event carries.
        self.response_id: str | None = None
        # The indexes of the choices the stream began, and of those it finished (n > 1
        # streams each choice in chunks of its own).
        self._begun: set[int] = set()
        self._finished: set[int] = set()
        # The last event was over _MAX_EVENT and went on unread: it may have been the
        # stream's end.
        self.unread = False
        # The event in progress. Appending to it costs the chunk, never the whole event.
        self._buf = bytearray()
        # Set while inside an event over _MAX_EVENT: _buf then keeps only the bytes a
        # separator may start in, all of them already passed on.
        self._skipping = False
        # The last separator ended in a chunk's final CR: a LF opening the next chunk
        # completes it, and goes (b"\n") or not (b"") the way its event went.
        self._after_cr: bytes | None = None

    def feed(self, chunk: bytes, end: bool) -> bytes | None:
        """Observe a chunk; return its replacement, or None to pass it unchanged."""
        kept: list[bytes | bytearray] = []
        skip = 0
        if self._after_cr is not None and chunk:
            if chunk[:1] == b"\n":
                kept.append(self._after_cr)
                skip = 1
            self._after_cr = None
        buf = self._buf
        scan = max(0, len(buf) - _SEPARATOR_OVERLAP)
        buf += memoryview(chunk)[skip:]
        drop = self.drop_usage_chunk
        pos = 0
        for m in EVENT_END.finditer(buf, scan):
            start, stop = m.span()
            head = self._event_head(buf, pos, start)
            if head is not None and drop:
                kept.append(buf[head:stop])
            if stop == len(buf) and buf[-1] == _CR and not end:
                self._after_cr = b"" if head is None else b"\n"
            pos = stop
        if end:
            head = self._event_head(buf, pos, len(buf))
            if head is not None and drop:
                kept.append(buf[head:])
            self._buf = bytearray()
        elif self._skipping or len(buf) - pos > _MAX_EVENT:
            self.unread = True
            if drop:
                kept.append(buf[_SEPARATOR_OVERLAP if self._skipping else pos:])
            self._buf = buf[-_SEPARATOR_OVERLAP:]
            self._skipping = True
        else:
            del buf[:pos]
        if not drop:
            return None
        out = b"".join(kept)
        return None if out == chunk else out

    def _event_head(self, buf: bytearray, pos: int, start: int) -> int | None:
        """Where the bytes still to pass on of the event buf[pos:start] begin; None if the
        event is dropped."""
        if self._skipping:
            # Too big to have been held: all but what this chunk added is already out.
            self._skipping = False
            return _SEPARATOR_OVERLAP
        if start > pos and self._observe(buf[pos:start]) and self.drop_usage_chunk:
            return None
        return pos

    def _observe(self, event: bytearray) -> bool:
        """Record what the event says; True if it is a usage-only chunk."""
        self.events += 1
        self.unread = False  # the event too large to read was not the last
        payload = _data_of(event)
        if payload:
            self.data_events += 1
        if not payload.startswith(b"{"):
            self.ended = self.ended or payload == b"[DONE]"
            return False
        obj = _answer_json(payload)
        if not isinstance(obj, dict):  # no JSON (too deep included): passed unread
            return False
        kind = obj.get("type")
        error = obj.get("error")
        # OpenAI's {"error": {...}}, TGI's {"error": "text"}, any other value that says
        # something (not null, false or empty); Responses' error events.
        has_error = bool(error) or isinstance(error, dict)
        if has_error or kind in ("error", "response.failed"):
            self.failed = True
        if isinstance(kind, str) and kind in _TERMINAL_TYPES:
            self.ended = True
            obj = obj.get("response")
            if not isinstance(obj, dict):
                return False
            self.response_id = response_id(obj)
        self.finish_reason = _finish_reason(obj) or self.finish_reason
        self._note_choices(obj.get("choices"))
        self.output_chars += _delta_chars(obj)
        # A later usage supersedes an earlier one (per-chunk usage grows), an unreadable
        # one too: the figures are then absent and estimated, never the stale ones.
        # `"usage": null`, which include_usage puts on every other chunk, says nothing.
        if obj.get("usage") is not None:
            self.usage = _usage_of(obj)
        # The chunk include_usage asks for, whether its counts are readable or not.
        # Some providers leave `choices` out of it, or send null, rather than an empty
        # list (a Responses event, which has a type, never has them). One holding an
        # error is the provider's failure, which the client must see, however it
        # carries usage.
        choices = obj.get("choices")
        return ((choices == [] or (choices is None and kind is None))
                and obj.get("usage") is not None and not has_error)

    def _note_choices(self, choices: Any) -> None:
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < _MAX_CHOICES:
                continue
            self._begun.add(index)
            if choice_finish_reason(choice) is not None:
                self._finished.add(index)

    @property
    def choices_finished(self) -> bool:
        """Every choice the stream began has its finish_reason: with n > 1, one
        finished choice is not the answer's end."""
        return bool(self._finished) and self._begun <= self._finished


def _data_of(event: bytearray) -> bytes:
    """The event's data: its `data:` lines, one optional space dropped, joined by LF."""
    return b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines()
                      if line.startswith(b"data:")).lstrip()


def _delta_chars(obj: dict[str, Any]) -> int:
    """Output characters of a streamed chunk (chat, completions, Responses deltas)."""
    delta = obj.get("delta")
    return _choices_chars(obj, "delta") + (_utf8_len(delta) if isinstance(delta, str) else 0)


def _answer_chars(obj: dict[str, Any]) -> int:
    """Output characters of a whole JSON answer: chat, completions, Responses."""
    return _choices_chars(obj, "message") + _texts_chars(obj.get("output"))


def _choices_chars(obj: dict[str, Any], part: str) -> int:
    total = 0
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get(part)
        if not isinstance(message, dict):
            text = choice.get("text")
            total += _utf8_len(text) if isinstance(text, str) else 0
            continue
        # Reasoning as `reasoning` (OpenRouter, Groq, vLLM) as well, content as a list of
        # parts (Mistral), an audio answer's transcript, the legacy `function_call`:
        # left out, a stream's first token waited for its text and an answer without
        # usage was estimated at no output.
        for key in ("content", "refusal"):
            total += _text_chars(message.get(key))
        # vLLM sent the same text as both for a while: the longer one counts.
        total += max(_text_chars(message.get("reasoning_content")),
                     _text_chars(message.get("reasoning")))
        total += _fields_chars(message, (("function_call", "arguments"),
                                         ("audio", "transcript")))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                total += _fields_chars(call, (("function", "arguments"), ("custom", "input")))
    return total


def _utf8_len(text: str) -> int:
    """A text's size as UTF-8, as the prompt's is counted: by characters, 4,000 Chinese
    ones were 1,000 output tokens against 3,000 input."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _text_chars(value: Any) -> int:
    """Characters of a text, or of the texts in a list of parts."""
    if isinstance(value, str):
        return _utf8_len(value)
    return _texts_chars(value) if isinstance(value, list) else 0


def _fields_chars(obj: dict[str, Any], fields: tuple[tuple[str, str], ...]) -> int:
    """Characters of the texts at `obj[key][field]` for each (key, field)."""
    total = 0
    for key, field in fields:
        sub = obj.get(key)
        text = sub.get(field) if isinstance(sub, dict) else None
        total += _utf8_len(text) if isinstance(text, str) else 0
    return total


_OUTPUT_TEXT_KEYS = frozenset({"text", "arguments", "refusal", "input", "output"})


def _texts_chars(node: Any) -> int:
    """Characters of the texts in a Responses `output` list, at any depth."""
    total = 0
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str):
                    total += _utf8_len(value) if key in _OUTPUT_TEXT_KEYS else 0
                elif isinstance(value, (dict, list)):
                    stack.append(value)
    return total
