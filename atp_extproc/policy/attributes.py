"""The attribute document a policy reads, built once per request and bounded.

`build_attributes` takes plain Python values (the exchange maps them from Identity,
LlmRequest and ExchangeRecord) and returns protobuf messages from proto/atp/policy.proto,
the form cel-expr-python evaluates fastest with full type checking. Every list, map and
string is capped here, whatever the client sent: no policy is ever handed a 10,000-element
list. Each cut that hides something a policy could look for (an item past a cap, a name
or key cut short) is named in `context.truncated` so a policy can refuse it. A value
written freely (a metadata value, a tool call's argument, a claim) is content, not an
item: a longer one is cut to its first characters and an ellipsis, and not named, or
every request carrying a file's text in a past tool call would be refused.

Caps are applied while copying (itertools.islice), so building costs the cap, not the
size of the input.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, NoReturn

from google.protobuf import struct_pb2, timestamp_pb2

from atp_extproc.llm_api import (
    ITEMS_FIELD,
    TOKEN_LIMIT_KEYS,
    UnreadableNumber,
    parse_arguments,
    token_ids,
    tool_lists,
    tool_name,
)
from atp_extproc.policy.gen.atp import policy_pb2 as pb
from atp_extproc.redact.detectors import utf8_safe

MAX_STRING = 256          # characters of a string attribute (a cut value adds "…")
MAX_ARGUMENTS_JSON = 1 << 20  # characters of one call's arguments that are parsed
MAX_METADATA_VALUE = 512  # characters of a metadata value: as many as OpenAI accepts
MAX_LIST = 64             # items of any list attribute (groups, roles, tools ...)
MAX_MAP = 64              # entries of any map attribute (metadata, data classes, arguments)
MAX_CLAIMS_DEPTH = 4      # nesting kept in JWT claims (Keycloak: resource_access.<client>.roles)
MAX_HISTORY_SCAN = 2048   # messages scanned (newest first) for tool calls; more is "cut"

Subject = pb.Subject
Request = pb.Request
Context = pb.Context
Resource = pb.Resource
Tool = pb.Tool

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UNKNOWN = object()  # a key that is no field


class AttributeError_(ValueError):
    """A value that cannot go into the attribute document (unknown field, wrong type)."""


class Attributes:
    """One request's attribute document: a single pb.Attributes message.

    One message, not four, because cel-expr-python copies each message it is handed
    (serialise, parse): one copy per request is the cheapest. `evaluate` fills
    `doc.candidates` with the candidates it is given.
    """

    __slots__ = ("doc",)

    def __init__(self, doc: pb.Attributes):
        self.doc = doc

    @property
    def subject(self) -> pb.Subject:
        return self.doc.subject

    @property
    def request(self) -> pb.Request:
        return self.doc.request

    @property
    def context(self) -> pb.Context:
        return self.doc.context

    def to_proto(self, resource: pb.Resource | None = None,
                 tool: pb.Tool | None = None) -> pb.Attributes:
        """A copy of the document with `resource` / `tool` set (for tests and the oracle)."""
        doc = pb.Attributes()
        doc.CopyFrom(self.doc)
        del doc.candidates[:]
        if resource is not None:
            doc.resource.CopyFrom(resource)
        if tool is not None:
            doc.tool.CopyFrom(tool)
        return doc

    @property
    def truncated(self) -> tuple[str, ...]:
        return tuple(self.doc.context.truncated)


@dataclass(frozen=True, slots=True)
class CandidateInfo:
    """A model routing may choose; becomes `resource` for policies that read it."""

    model: str
    provider: str = ""
    region: str = ""
    egress: str = ""
    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    cluster: str = ""
    # The Resource without its estimated cost, serialised once: parsing it into each
    # request's document is cheaper than setting its fields one by one (and bytes keep
    # the dataclass picklable).
    _template: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_template", pb.Resource(
            model=self.model, provider=self.provider, region=self.region,
            egress=self.egress, input_per_1k=self.input_per_1k,
            output_per_1k=self.output_per_1k, cluster=self.cluster).SerializeToString())

    @classmethod
    def from_model(cls, model: Any) -> CandidateInfo:
        """From a config.Model (provider defaults to the cluster until config has one)."""
        return cls(model=model.name,
                   provider=getattr(model, "provider", None) or model.cluster,
                   region=model.region, egress=model.egress,
                   input_per_1k=float(model.price.input_per_1k),
                   output_per_1k=float(model.price.output_per_1k),
                   cluster=model.cluster)

    def _cost(self, token_estimate: int, max_tokens: int) -> float:
        cost = (token_estimate * self.input_per_1k + max_tokens * self.output_per_1k) / 1000.0
        return cost if math.isfinite(cost) else 0.0

    def resource(self, request: pb.Request) -> pb.Resource:
        res = pb.Resource()
        self._fill(res, request.token_estimate, output_bound(request))
        return res

    def add_to(self, candidates: Any, token_estimate: int, max_tokens: int) -> None:
        """Append this candidate as a Resource to a repeated field, costed for a request
        of `token_estimate` input and `max_tokens` output tokens."""
        self._fill(candidates.add(), token_estimate, max_tokens)

    def _fill(self, res: pb.Resource, token_estimate: int, max_tokens: int) -> None:
        res.MergeFromString(self._template)
        res.estimated_cost_usd = self._cost(token_estimate, max_tokens)


def _count(value: Any) -> int:
    """A whole number as a lenient server reads it (7, 7.0, "7"); 0 for anything else."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) else 0


def output_bound(request: pb.Request) -> int:
    """The most output tokens the request may be billed: max_tokens for each answer."""
    return request.max_tokens * max(1, request.choices)


class _Cut:
    """Collects the paths that caps shortened."""

    __slots__ = ("paths",)

    def __init__(self) -> None:
        self.paths: list[str] = []

    def note(self, path: str) -> None:
        if path not in self.paths:
            self.paths.append(path)


def _s(value: Any, path: str, cut: _Cut) -> str:
    if value.__class__ is str:
        if len(value) <= MAX_STRING:
            return value
        cut.note(path)
        return value[:MAX_STRING]
    if value is None:
        return ""
    if isinstance(value, str):
        return _s(str(value), path, cut)
    raise AttributeError_(f"{path} must be a string, not {type(value).__name__}")


def _clip(text: str, limit: int = MAX_STRING) -> str:
    """A value cut to `limit` characters, not noted in context.truncated. The ellipsis
    keeps a cut value from reading as another valid one: it equals no short constant and
    no number conversion takes it (int() of the first 256 characters of "000...051" was
    0, under a policy's `> 50`)."""
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _i(value: Any, path: str, cut: _Cut) -> int:
    if value.__class__ is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        # int64 range: clamp instead of failing on an absurd client value.
        return max(_INT64_MIN, min(_INT64_MAX, value))
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AttributeError_(f"{path} must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise AttributeError_(f"{path} must be finite")
    return _i(int(value), path, cut)


def _b(value: Any, path: str, cut: _Cut) -> bool:
    if value is True or value is False:
        return value
    if value is None:
        return False
    raise AttributeError_(f"{path} must be a boolean")


def _strings(values: Any, path: str, cut: _Cut, limit: int = MAX_LIST) -> list[str]:
    cls = values.__class__
    if cls is list or cls is tuple:
        if len(values) <= limit:
            for v in values:
                if v.__class__ is not str or len(v) > MAX_STRING:
                    break
            else:
                return list(values)
    else:
        if values is None:
            return []
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise AttributeError_(f"{path} must be a list of strings")
    out = [v if v.__class__ is str and len(v) <= MAX_STRING else _s(v, path, cut)
           for v in islice(values, limit)]
    if _longer_than(values, limit):
        cut.note(path)
    return out


def _str_map(values: Any, path: str, cut: _Cut, limit: int = MAX_MAP,
             value_limit: int = MAX_STRING) -> dict[str, str]:
    if values.__class__ is dict:
        if len(values) <= limit:
            for k, v in values.items():
                if k.__class__ is not str or v.__class__ is not str or \
                        len(k) > MAX_STRING or len(v) > value_limit:
                    break
            else:
                return dict(values)
    else:
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            raise AttributeError_(f"{path} must be a mapping")
    # A key cut short is noted: two keys alike in their first characters would be one.
    out = {_s(str(k), path, cut): _clip(str(_scalar_text(v)), value_limit)
           for k, v in islice(values.items(), limit)}
    if len(values) > limit:
        cut.note(path)
    return out


def _int_map(values: Any, path: str, cut: _Cut, limit: int = MAX_MAP) -> dict[str, int]:
    if values.__class__ is dict:
        if len(values) <= limit:
            for k, v in values.items():
                if k.__class__ is not str or v.__class__ is not int or \
                        len(k) > MAX_STRING or not _INT64_MIN <= v <= _INT64_MAX:
                    break
            else:
                return dict(values)
    else:
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            raise AttributeError_(f"{path} must be a mapping of counts")
    out = {_s(k if k.__class__ is str else str(k), path, cut): _i(v, path, cut)
           for k, v in islice(values.items(), limit)}
    if len(values) > limit:
        cut.note(path)
    return out


def _longer_than(values: Any, limit: int) -> bool:
    try:
        return len(values) > limit
    except TypeError:
        return False


def _scalar_text(value: Any) -> str:
    if value.__class__ is str or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return ""  # objects and lists are not scalars: kept as an empty value


def _unknown_keys(fields: Mapping[str, Any], known: Mapping[str, Any], where: str
                  ) -> NoReturn:
    extra = set(fields) - set(known)
    raise AttributeError_(f"unknown {where} attribute(s): {', '.join(sorted(extra))}; "
                          f"known: {', '.join(sorted(known))}")


def _claims(value: Any, cut: _Cut, path: str, depth: int = 0) -> Any:
    """JSON-like claims, bounded in size and depth (deeper parts are dropped)."""
    cls = value.__class__
    if cls is str and len(value) <= MAX_STRING:
        return value
    if cls is dict or isinstance(value, Mapping):
        if depth >= MAX_CLAIMS_DEPTH:
            if value:  # an empty one loses nothing
                cut.note(path)
            return {}
        if len(value) > MAX_MAP:
            cut.note(path)
        return {_s(str(k), path, cut): _claims(v, cut, path, depth + 1)
                for k, v in islice(value.items(), MAX_MAP)}
    if isinstance(value, (list, tuple)):
        if depth >= MAX_CLAIMS_DEPTH:
            if value:
                cut.note(path)
            return []
        if len(value) > MAX_LIST:
            cut.note(path)
        return [_claims(v, cut, path, depth + 1) for v in islice(value, MAX_LIST)]
    if isinstance(value, str):
        return _clip(str(value))
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    return None


def _from_value(value: struct_pb2.Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_struct(value.struct_value, depth + 1)
    if kind == "list_value":
        if depth >= MAX_CLAIMS_DEPTH:
            return [None] * min(len(value.list_value.values), MAX_LIST + 1)
        return [_from_value(v, depth + 1)
                for v in islice(value.list_value.values, MAX_LIST + 1)]
    return None


def _from_struct(struct: struct_pb2.Struct, depth: int) -> dict[str, Any]:
    """A Struct (JWT claims from Envoy metadata) as plain values, read only up to the caps
    (one entry past them, so _claims still sees that something was cut). A protobuf map
    has no order, so keys are taken sorted: the same claims always keep the same keys."""
    if depth >= MAX_CLAIMS_DEPTH:
        return {"": None} if struct.fields else {}
    fields = struct.fields
    keys = sorted(fields) if len(fields) > MAX_MAP else fields
    return {k: _from_value(fields[k], depth) for k in islice(keys, MAX_MAP + 1)}


def _tool(entry: Any, cut: _Cut) -> dict[str, Any]:
    # A plain dict (nearly every entry) goes straight to _fields, past the isinstance
    # checks.
    if entry.__class__ is not dict:
        if isinstance(entry, str):
            return {"name": _s(entry, "request.tool_details.name", cut), "declared": True}
        if isinstance(entry, pb.Tool):
            entry = {"name": entry.name, "type": entry.type, "declared": entry.declared,
                     "called": entry.called, "parameters": list(entry.parameters),
                     "arguments": dict(entry.arguments)}
        elif not isinstance(entry, Mapping):
            raise AttributeError_("each of request.tool_details must be a mapping or a name")
    kwargs = _fields(entry, _TOOL_KINDS, _TOOL_PATHS, cut, "tool")
    kwargs.setdefault("declared", True)
    return kwargs


def _tools(values: Any, path: str, cut: _Cut) -> list[dict[str, Any]]:
    cls = values.__class__
    if cls is not list and cls is not tuple:
        if values is None:
            return []
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise AttributeError_("request.tool_details must be a list of tools")
    out = [_tool(entry, cut) for entry in islice(values, MAX_LIST)]
    if _longer_than(values, MAX_LIST):
        cut.note(path)
    return out


def _metadata_map(values: Any, path: str, cut: _Cut) -> dict[str, str]:
    return _str_map(values, path, cut, value_limit=MAX_METADATA_VALUE)


def _arguments_map(values: Any, path: str, cut: _Cut) -> dict[str, str]:
    # A call's null, object or list argument is no argument, as _arguments reads a body:
    # `policy test` read it as "" and refused what serve let through.
    if isinstance(values, Mapping) and not all(
            isinstance(v, (str, int, float, bool)) for v in values.values()):
        values = {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}
    return _str_map(values, path, cut)


# Field name → converter, for each message; a converter takes (value, path, cut).
_TOOL_KINDS = {"name": _s, "type": _s, "declared": _b, "called": _b,
               "parameters": _strings, "arguments": _arguments_map}
_SUBJECT_KINDS = {"tenant": _s, "user": _s, "groups": _strings, "roles": _strings,
                  "auth_method": _s, "key_id": _s, "claims": None}
_REQUEST_KINDS = {"path": _s, "operation": _s, "alias": _s, "stream": _b,
                  "token_estimate": _i, "message_count": _i, "tools": _strings,
                  "tool_count": _i, "tool_details": _tools, "tool_choice": _s,
                  "max_tokens": _i, "data_classes": _int_map, "metadata": _metadata_map,
                  "body_bytes": _i, "choices": _i}
_CONTEXT_KINDS = {"route": _s, "environment": _s, "request_id": _s, "config_version": _s,
                  "time": None, "truncated": None}


def _paths(prefix: str, kinds: Mapping[str, Any]) -> dict[str, str]:
    return {name: f"{prefix}.{name}" for name in kinds}


# Field name → its path in error messages and `context.truncated`, built once rather
# than formatted per value.
_TOOL_PATHS = _paths("request.tool_details", _TOOL_KINDS)
_SUBJECT_PATHS = _paths("subject", _SUBJECT_KINDS)
_REQUEST_PATHS = _paths("request", _REQUEST_KINDS)
_CONTEXT_PATHS = _paths("context", _CONTEXT_KINDS)
assert set(_TOOL_KINDS) == {f.name for f in pb.Tool.DESCRIPTOR.fields}
assert set(_SUBJECT_KINDS) == {f.name for f in pb.Subject.DESCRIPTOR.fields}
assert set(_REQUEST_KINDS) == {f.name for f in pb.Request.DESCRIPTOR.fields}
assert set(_CONTEXT_KINDS) == {f.name for f in pb.Context.DESCRIPTOR.fields}


def _fields(values: Mapping[str, Any], kinds: Mapping[str, Any], paths: Mapping[str, str],
            cut: _Cut, where: str) -> dict[str, Any]:
    out = {}
    try:
        for name, value in values.items():
            convert = kinds.get(name, _UNKNOWN)
            # Short strings, in-range ints and bools (nearly every value) are taken as
            # they are, without a call.
            if convert is _s:
                if value.__class__ is str and len(value) <= MAX_STRING:
                    out[name] = value
                    continue
            elif convert is _i:
                if value.__class__ is int and _INT64_MIN <= value <= _INT64_MAX:
                    out[name] = value
                    continue
            elif convert is _b:
                if value is True or value is False:
                    out[name] = value
                    continue
            elif convert is _UNKNOWN:
                _unknown_keys(values, kinds, where)
            if convert is not None and value is not None:
                out[name] = convert(value, paths[name], cut)
    except AttributeError_:
        if not values.keys() <= kinds.keys():
            _unknown_keys(values, kinds, where)  # reported before any bad value
        raise
    return out


def _subject(subject: Mapping[str, Any], cut: _Cut) -> tuple[dict[str, Any], Any]:
    kwargs = _fields(subject, _SUBJECT_KINDS, _SUBJECT_PATHS, cut, "subject")
    claims = subject.get("claims")
    if claims is not None:
        if isinstance(claims, struct_pb2.Struct):
            claims = _from_struct(claims, 0)
        if not isinstance(claims, Mapping):
            raise AttributeError_("subject.claims must be a mapping")
        claims = _claims(claims, cut, "subject.claims")
    return kwargs, claims


def _request(request: Mapping[str, Any], cut: _Cut) -> dict[str, Any]:
    kwargs = _fields(request, _REQUEST_KINDS, _REQUEST_PATHS, cut, "request")
    details = kwargs.get("tool_details")
    if details and "tools" not in kwargs:
        kwargs["tools"] = [t.get("name", "") for t in details]
    elif kwargs.get("tools") and "tool_details" not in kwargs:
        # Tools given by name alone (a policy test case) are declared tools all the
        # same: tools policies run over tool_details.
        kwargs["tool_details"] = [{"name": n, "declared": True} for n in kwargs["tools"]]
    if "tool_count" not in kwargs and ("tools" in request or details):
        names = request.get("tools")
        given = len(names) if isinstance(names, (list, tuple)) else 0
        raw_details = request.get("tool_details")
        given_details = len(raw_details) if isinstance(raw_details, (list, tuple)) else 0
        kwargs["tool_count"] = max(given, given_details)
    return kwargs


def _context(context: Mapping[str, Any], cut: _Cut) -> dict[str, Any]:
    kwargs = _fields(context, _CONTEXT_KINDS, _CONTEXT_PATHS, cut, "context")
    when = context.get("time")
    if when is None:
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        kwargs["time"] = {"seconds": seconds, "nanos": nanos}
    else:
        ts = timestamp_pb2.Timestamp()
        if isinstance(when, datetime):
            ts.FromDatetime(when if when.tzinfo else when.replace(tzinfo=UTC))
        elif isinstance(when, str):
            try:
                ts.FromJsonString(when)
            except ValueError as exc:
                raise AttributeError_(f"context.time: {exc}") from None
        elif isinstance(when, (int, float)) and not isinstance(when, bool):
            ts.FromNanoseconds(int(when * 1e9))
        else:
            raise AttributeError_("context.time must be a datetime, RFC 3339 text or epoch "
                                  "seconds")
        kwargs["time"] = ts
    if context.get("truncated"):
        for path in _strings(context["truncated"], "context.truncated", cut):
            cut.note(path)
    return kwargs


def build_attributes(subject: Mapping[str, Any] | None = None,
                     request: Mapping[str, Any] | None = None,
                     context: Mapping[str, Any] | None = None) -> Attributes:
    """The attribute document from plain values keyed by the proto's field names.

    subject: tenant, user, groups, roles, auth_method, key_id, claims (JSON-like mapping
             or a Struct). request: path, operation, alias, stream, token_estimate,
             message_count, tools (names), tool_details (mappings or names), tool_choice,
             max_tokens, data_classes ({class: count}), metadata, body_bytes.
             context: route, time (datetime / RFC 3339 / epoch; default now), environment,
             request_id, config_version, truncated (paths the caller already cut). Unknown
             keys raise, so a typo cannot silently leave an attribute empty.
    """
    try:
        return _build(subject, request, context)
    except UnicodeEncodeError:
        # A lone surrogate (JSON lets a body escape "\ud800"), which protobuf strings
        # cannot hold: policies see U+FFFD in its place, as for any other bad character.
        return _build(*_without_surrogates((subject, request, context)))


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, Mapping):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_surrogates(v) for v in value]
    return value


def _build(subject: Mapping[str, Any] | None, request: Mapping[str, Any] | None,
           context: Mapping[str, Any] | None) -> Attributes:
    cut = _Cut()
    subj, claims = _subject(subject or {}, cut)
    # One answer unless the request asks for more (a policy test's case says nothing).
    req = _request({"choices": 1, **(request or {})}, cut)
    ctx = _context(context or {}, cut)
    if cut.paths:
        ctx["truncated"] = cut.paths[:MAX_LIST]
    # The request's maps are filled in after the message is made: keyword init fills
    # them through MutableMapping.update, a Python loop slower than a plain one.
    data_classes = req.pop("data_classes", None)
    metadata = req.pop("metadata", None)
    doc = pb.Attributes(subject=subj, request=req, context=ctx)
    if data_classes or metadata:
        message = doc.request
        if data_classes:
            _fill(message.data_classes, data_classes)
        if metadata:
            _fill(message.metadata, metadata)
    if claims is not None:
        doc.subject.claims.update(claims)
    return Attributes(doc)


def _fill(container: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        container[key] = value


# -- from an OpenAI-compatible body ---------------------------------------------------

# An identifier that starts with a letter, holds at most 6 digits, no dotted quad and at
# most one colon, does not start as a credential does and holds no Stripe-style key: a
# card, phone or social security number, an IP address or a key (AWS, OpenAI, Stripe,
# Hugging Face, GitHub, Slack, Google, a JWT) named as a tool never reaches a log. (A
# random key may hold few digits: rk_live_4eC39HqLyjWDarjtT1zdp7dc holds five.)
_TOOL_NAME = re.compile(r"(?=(?:\D*\d){0,6}\D*\Z)(?!.*\d\.\d+\.\d+\.\d)(?!.*:.*:)"
                        r"(?!(?:AKIA|ASIA|sk-|sk_|rk-|rk_|hf_|gh[pousr]_|github_pat_|"
                        r"xox[abpr]-|AIza|eyJ))(?!.*[sr]k_(?:live|test)_)"
                        r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")


def request_from_body(operation: str,
                      doc: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The request attributes a parsed body gives (tools, tool_choice, max_tokens, metadata).

    Bounded: tools and history are read through islice and MAX_HISTORY_SCAN, arguments are
    parsed up to MAX_ARGUMENTS_JSON characters. Returns (keys for build_attributes's
    `request`, paths cut while reading, for `context.truncated`); the caller adds path,
    alias, token_estimate, data_classes ...
    """
    out: dict[str, Any] = {"operation": operation}
    details: dict[str, dict[str, Any]] = {}
    cut = _Cut()
    declared_count = 0
    for _, tools in tool_lists(operation, doc):
        declared_count += len(tools)
        for tool in islice(tools, MAX_LIST):
            if not isinstance(tool, dict):
                continue
            fn = tool.get("function")
            spec = fn if isinstance(fn, dict) else tool
            kind = tool.get("type")
            if not isinstance(kind, str):
                kind = "function"
            name = tool_key(tool)
            params = spec.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            entry = details.setdefault(name, {"name": name, "type": kind, "declared": True})
            entry["declared"] = True
            if isinstance(props, dict):
                entry["parameters"] = list(islice(props, MAX_LIST))
                if len(props) > MAX_LIST:
                    cut.note("request.tool_details.parameters")
        if len(tools) > MAX_LIST:
            cut.note("request.tools")
    if len(details) > MAX_LIST:
        cut.note("request.tools")
    parallel = _history_calls(operation, doc, details, cut)
    if details:
        out["tool_details"] = [*details.values(), *parallel]
        out["tools"] = list(details)
        out["tool_count"] = max(declared_count, len(details))
    # An explicit null is no choice: then the legacy key may still force a function.
    choice = doc.get("tool_choice")
    if choice is None:
        choice = doc.get("function_call")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict):
        out["tool_choice"] = _forced_name(choice)
    # A negative cap is none (llama.cpp, Ollama read -1 as "no limit"): as unset, 0, not
    # a number a limit passes and a cost estimate subtracts.
    limits = [v for v in map(doc.get, TOKEN_LIMIT_KEYS) if type(v) is int and v > 0]
    if limits:
        out["max_tokens"] = max(limits)
    # Each answer asked for is written, and billed: `n` (chat, completions), `best_of`
    # (completions, which writes that many to return the best), for each prompt of a
    # completions batch. A count as servers read it leniently ("7", 7.0) counts too.
    counts = [c for c in map(_count, (doc.get("n"), doc.get("best_of"))) if c > 1]
    prompts = doc.get("prompt") if operation == "completions" else None
    batch = len(prompts) if isinstance(prompts, list) and prompts \
        and not token_ids(prompts) else 1
    out["choices"] = max(counts, default=1) * batch
    metadata = doc.get("metadata")
    if isinstance(metadata, dict):
        out["metadata"] = metadata
    # Messages, input items, prompts: a string is one, token ids are one, however many.
    # The operation's own field only: a stray `messages: []` beside a Responses request's
    # input made its count 0, past limits.message_count.
    items = doc.get(ITEMS_FIELD.get(operation, ""))
    if isinstance(items, list):
        out["message_count"] = 1 if token_ids(items) else len(items)
    elif isinstance(items, str):
        out["message_count"] = 1
    stream = doc.get("stream")
    if isinstance(stream, bool):
        out["stream"] = stream
    return out, cut.paths


def tool_key(tool: dict[str, Any]) -> str:
    """What a tool declared in a body goes by in request.tool_details, so what a tools
    policy names it (and what stripping it must match): its name, else its type (built-in
    tools such as web_search have no name), else "function"."""
    name = tool_name(tool)
    if name is not None:
        return name
    kind = tool.get("type")
    return kind if isinstance(kind, str) else "function"


def _builtin_tool(details: dict[str, dict], base: str) -> str:
    """The declared built-in tool a `<base>_call` item belongs to: `base` itself or a
    variant of it (web_search_preview, computer_use_preview, dated versions). A function
    is none, though named so (`shell_status`): a built-in tool's name is its type."""
    for key, entry in details.items():
        if entry.get("declared") and entry.get("type") == key and (
                key == base or key.startswith(f"{base}_")):
            return key
    return "computer_use_preview" if base == "computer" else base


def _history_calls(operation: str, doc: Mapping[str, Any], details: dict[str, dict],
                   cut: _Cut) -> list[dict]:
    """Note in `details` the tools the history calls, each with the arguments of its
    latest call; return one more entry per other call of a tool in that call's turn
    (parallel calls, whose results all come back now): read alone, the latest let an
    earlier call of the same turn through (`max_results` 1, then 100)."""
    # A conversation's turns: chat's messages, Responses' input items. (Embeddings' and
    # completions' input lists are texts or token ids: a batch of 2,049 ids was a cut
    # history, 403 limits.truncated.)
    items = doc.get(ITEMS_FIELD[operation]) if operation in ("chat", "responses") else None
    if not isinstance(items, list):
        return []
    start = max(0, len(items) - MAX_HISTORY_SCAN)
    if start:
        cut.note("request.tool_details")
    # The turn (counted newest first) whose calls give each tool's arguments: a chat
    # message, or the Responses items between two messages (calls and their outputs).
    turn_of: dict[str, int] = {}
    turn = 0
    parallel: list[dict] = []
    # Newest first: the latest call of each tool gives its arguments.
    for i in range(len(items) - 1, start - 1, -1):
        item = items[i]
        if not isinstance(item, dict):
            continue
        # (name, JSON arguments, type): a custom tool's call carries free text, often
        # code, which policies see by name only.
        calls: list[tuple[Any, Any, str]] = []
        if isinstance(item.get("tool_calls"), list):
            if len(item["tool_calls"]) > MAX_LIST:
                cut.note("request.tool_details")
            for call in islice(item["tool_calls"], MAX_LIST):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    calls.append((fn.get("name"), fn.get("arguments"), "function"))
                custom = call.get("custom") if isinstance(call, dict) else None
                if isinstance(custom, dict):
                    calls.append((custom.get("name"), None, "custom"))
        elif item.get("type") == "function_call":
            calls.append((item.get("name"), item.get("arguments"), "function"))
        elif item.get("type") == "custom_tool_call":
            calls.append((item.get("name"), None, "custom"))
        elif item.get("type") == "mcp_call":
            calls.append(("mcp", None, "mcp"))  # an MCP server is one tool, `mcp`
        elif isinstance(item.get("type"), str) and item["type"].endswith("_call"):
            # A built-in tool's own call (shell_call, web_search_call): the tool declared
            # by that type (web_search_preview, computer_use_preview ...), else the type.
            kind = _builtin_tool(details, item["type"][:-len("_call")])
            calls.append((kind, None, kind))
        legacy = item.get("function_call")  # a Chat assistant turn before tool_calls
        if isinstance(legacy, dict):
            calls.append((legacy.get("name"), legacy.get("arguments"), "function"))
        if operation == "chat" or item.get("type") == "message" or "role" in item:
            turn += 1
        for name, arguments, kind in reversed(calls):  # a turn's last call is its latest
            if not isinstance(name, str):
                continue
            if name not in details:
                if len(details) >= MAX_LIST:
                    cut.note("request.tool_details")
                    continue
                details[name] = {"name": name, "type": kind, "declared": False}
            entry = details[name]
            entry["called"] = True
            if name not in turn_of:
                turn_of[name] = turn
                entry["arguments"] = _arguments(arguments, cut)
            elif turn_of[name] == turn and arguments is not None:
                other = {**entry, "arguments": _arguments(arguments, cut)}
                if other["arguments"] == entry.get("arguments") or other in parallel:
                    continue  # the same call again: nothing more to see
                if len(details) + len(parallel) >= MAX_LIST:
                    # In a Responses agent loop (call, output, call, output ...), one
                    # turn to this reader, the older calls go unread as Chat's older
                    # turns do (70 reads of a file were a cut limits.truncated refused);
                    # past the cap in one Chat message, they are a cut.
                    if operation == "chat":
                        cut.note("request.tool_details")
                    continue
                parallel.append(other)
    return parallel


def allowed_tools_spec(choice: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """An allowed_tools choice's `tools` and `mode` holder, and whether it is nested:
    Chat puts them under "allowed_tools", the Responses API in the choice itself."""
    nested = isinstance(choice.get("allowed_tools"), dict)
    return (choice["allowed_tools"] if nested else choice), nested


# Tools a name names: one of these without a name forces nothing a policy can name.
_NAMED_KINDS = ("function", "custom", "namespace", "builtin_function")


def _forced_name(choice: dict[str, Any]) -> str:
    """What a tool_choice object asks for: the tool it forces (an allowed_tools choice
    of mode required over one tool forces that one), else its type."""
    if choice.get("type") == "allowed_tools":
        spec, _ = allowed_tools_spec(choice)
        tools = spec.get("tools")
        if spec.get("mode") == "required" and isinstance(tools, list) and len(tools) == 1:
            # A built-in tool (web_search_preview, mcp) goes by its type, as when the
            # choice forces it directly.
            forced = tools[0]
            kind = forced.get("type") if isinstance(forced, dict) else None
            if tool_name(forced) is not None or (isinstance(kind, str)
                                                 and kind not in _NAMED_KINDS):
                return tool_key(forced)
            return "allowed_tools"
        return "allowed_tools"
    name = tool_name(choice)
    return name if name is not None else str(choice.get("type", ""))


def _arguments(arguments: Any, cut: _Cut) -> dict[str, Any]:
    """The scalar arguments of one call; arguments it cannot read whole (too long, too
    deep, too many) are noted as cut, so a policy on them can refuse the request."""
    if isinstance(arguments, str):
        # A file's text in a past write_file call is no cut (over 8 KB, limits.truncated
        # refused it); past MAX_ARGUMENTS_JSON the parse would cost more than the read.
        if len(arguments) > MAX_ARGUMENTS_JSON:
            cut.note("request.tool_details.arguments")
            return {}
        try:
            arguments = parse_arguments(arguments)
        except (RecursionError, UnreadableNumber):
            cut.note("request.tool_details.arguments")
            return {}
        except ValueError:
            return {}  # not JSON: there are no arguments to read
    if not isinstance(arguments, dict):
        return {}
    # As many as a tool may declare parameters (MAX_LIST, which MAX_MAP equals): the call
    # of a tool whose declaration passed is not cut.
    if len(arguments) > MAX_MAP:
        cut.note("request.tool_details.arguments")
    return {k: v for k, v in islice(arguments.items(), MAX_MAP)
            if isinstance(v, (str, int, float, bool))}


def safe_name(name: str, index: int) -> str:
    """A tool or model name fit for a log: identifiers pass, anything else is replaced."""
    return name if _TOOL_NAME.fullmatch(name) else f"<tool#{index}>"
