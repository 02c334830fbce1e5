"""Which strings of a request body a provider sees, per operation, and how to put the
redacted strings back without touching anything else.

A *unit* is text the model reads as one piece: a string field, or the consecutive text
parts of one message (scanned joined, so PII split across parts is still found). Tool-call
arguments are JSON inside a string: each string value in them is a unit, and a redacted
value is re-encoded and spliced back into the arguments text, which stays valid JSON and
keeps its formatting everywhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

Path = tuple[str | int, ...]

TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "summary_text",
                             "reasoning_text"})
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_WS = " \t\r\n"
_scanstring = json.decoder.scanstring


class JsonArgs:
    """A JSON text held in a string field; its string values are scanned."""

    __slots__ = ("path", "raw", "tokens")

    def __init__(self, path: Path, raw: str):
        self.path = path
        self.raw = raw
        self.tokens: list[tuple[int, int]] = []


class Segment:
    __slots__ = ("args", "path", "text", "token")

    def __init__(self, text: str, path: Path | None = None, args: JsonArgs | None = None,
                 token: int = -1):
        self.text = text
        self.path = path
        self.args = args
        self.token = token


class Collector:
    def __init__(self) -> None:
        self.units: list[list[Segment]] = []
        self.non_text = 0
        # Paths already taken; only needed once config adds paths that may repeat the
        # default ones, so the default walk does not pay for it.
        self._seen: set[Path] | None = None

    def dedupe(self) -> None:
        self._seen = {seg.path if seg.args is None else seg.args.path
                      for unit in self.units for seg in unit}

    def text(self, path: Path, value: str) -> None:
        if value:
            seen = self._seen
            if seen is not None:
                if path in seen:
                    return
                seen.add(path)
            self.units.append([Segment(value, path)])

    def joined(self, parts: list[tuple[Path, str]]) -> None:
        seen = self._seen
        if seen is not None:
            parts = [(p, v) for p, v in parts if p not in seen]
            seen.update(p for p, _ in parts)
        unit = [Segment(v, p) for p, v in parts if v]
        if unit:
            self.units.append(unit)

    def json_text(self, path: Path, raw: str) -> None:
        """A string that should hold JSON (tool-call arguments)."""
        if not raw:
            return
        if self._seen is not None:
            if path in self._seen:
                return
        stripped = raw.lstrip(_JSON_WS)
        if not stripped or stripped[0] not in '{["':
            self.text(path, raw)
            return
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            self.text(path, raw)  # not JSON (or partial): scan it as text
            return
        if self._seen is not None:
            self._seen.add(path)
        args = JsonArgs(path, raw)
        n = len(raw)
        for m in _JSON_STRING.finditer(raw):
            j = m.end()
            while j < n and raw[j] in _JSON_WS:
                j += 1
            if j < n and raw[j] == ":":
                continue  # a key
            # `raw` parsed as JSON above, so every token is a valid string literal.
            value = _scanstring(raw, m.start() + 1)[0]
            if not value:
                continue
            args.tokens.append(m.span())
            self.units.append([Segment(value, None, args, len(args.tokens) - 1)])

    def anything(self, path: Path, node: Any) -> None:
        """Every string value under `node` (extra paths from config)."""
        stack: list[tuple[Path, Any]] = [(path, node)]
        while stack:
            p, v = stack.pop()
            if isinstance(v, str):
                self.text(p, v)
            elif isinstance(v, dict):
                stack.extend(((*p, k), c) for k, c in reversed(list(v.items())))
            elif isinstance(v, list):
                stack.extend(((*p, i), c) for i, c in reversed(list(enumerate(v))))


def _content(c: Collector, path: Path, content: Any) -> None:
    if isinstance(content, str):
        c.text(path, content)
        return
    if not isinstance(content, list):
        return
    run: list[tuple[Path, str]] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            run.append(((*path, j), part))
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        text = part.get("text")
        if isinstance(text, str) and (kind in TEXT_PART_TYPES or kind is None):
            run.append(((*path, j, "text"), text))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            run.append(((*path, j, "refusal"), part["refusal"]))
        else:
            if run:
                c.joined(run)
                run = []
            c.non_text += 1
    if run:
        c.joined(run)


def _tool_calls(c: Collector, base: Path, calls: Any) -> None:
    if not isinstance(calls, list):
        return
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            c.json_text((*base, k, "function", "arguments"), fn["arguments"])
        custom = call.get("custom")
        if isinstance(custom, dict) and isinstance(custom.get("input"), str):
            c.text((*base, k, "custom", "input"), custom["input"])


def _common(c: Collector, doc: dict[str, Any]) -> None:
    # Fields every operation may carry that a provider stores or reads.
    if isinstance(doc.get("user"), str):
        c.text(("user",), doc["user"])
    metadata = doc.get("metadata")
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if isinstance(value, str):
                c.text(("metadata", key), value)


_TOOL_ROLES = frozenset(("tool", "function"))


def chat(c: Collector, doc: dict[str, Any]) -> None:
    messages = doc.get("messages")
    if type(messages) is list:
        for i, m in enumerate(messages):
            if type(m) is not dict:
                continue
            content = m.get("content")
            if type(content) is str:
                if m.get("role") in _TOOL_ROLES:
                    c.json_text(("messages", i, "content"), content)  # often JSON
                else:
                    c.text(("messages", i, "content"), content)
            elif content is not None:
                _content(c, ("messages", i, "content"), content)
            if len(m) == 2 and "role" in m and "content" in m:
                continue  # the common case: nothing else to look at
            base: Path = ("messages", i)
            for key in ("name", "refusal"):
                if isinstance(m.get(key), str):
                    c.text((*base, key), m[key])
            _tool_calls(c, (*base, "tool_calls"), m.get("tool_calls"))
            fc = m.get("function_call")
            if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
                c.json_text((*base, "function_call", "arguments"), fc["arguments"])
    prediction = doc.get("prediction")
    if isinstance(prediction, dict):
        _content(c, ("prediction", "content"), prediction.get("content"))
    _common(c, doc)


def _prompt_like(c: Collector, key: str, value: Any) -> None:
    if isinstance(value, str):
        c.text((key,), value)
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            c.non_text += 1  # one array of token ids
            return
        for i, v in enumerate(value):
            if isinstance(v, str):
                c.text((key, i), v)
            elif isinstance(v, list):
                c.non_text += 1


def completions(c: Collector, doc: dict[str, Any]) -> None:
    _prompt_like(c, "prompt", doc.get("prompt"))
    if isinstance(doc.get("suffix"), str):
        c.text(("suffix",), doc["suffix"])
    _common(c, doc)


def embeddings(c: Collector, doc: dict[str, Any]) -> None:
    _prompt_like(c, "input", doc.get("input"))
    _common(c, doc)


_RESPONSES_NON_TEXT = frozenset({"input_image", "input_file", "input_audio", "image",
                                 "image_generation_call", "computer_screenshot"})


def responses(c: Collector, doc: dict[str, Any]) -> None:
    if isinstance(doc.get("instructions"), str):
        c.text(("instructions",), doc["instructions"])
    items = doc.get("input")
    if isinstance(items, str):
        c.text(("input",), items)
    elif isinstance(items, list):
        for i, item in enumerate(items):
            base: Path = ("input", i)
            if isinstance(item, str):
                c.text(base, item)
                continue
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if "content" in item:
                _content(c, (*base, "content"), item["content"])
            if kind in TEXT_PART_TYPES and isinstance(item.get("text"), str):
                c.text((*base, "text"), item["text"])
            elif kind in _RESPONSES_NON_TEXT:
                c.non_text += 1
            if isinstance(item.get("arguments"), str):
                c.json_text((*base, "arguments"), item["arguments"])
            if kind == "custom_tool_call" and isinstance(item.get("input"), str):
                c.text((*base, "input"), item["input"])
            output = item.get("output")
            if isinstance(output, str):
                if kind == "function_call_output":
                    c.json_text((*base, "output"), output)
                else:
                    c.text((*base, "output"), output)
            elif isinstance(output, list):
                _content(c, (*base, "output"), output)
            elif isinstance(output, dict):
                _content(c, (*base, "output"), [output])
            summary = item.get("summary")
            if isinstance(summary, list):
                _content(c, (*base, "summary"), summary)
    _common(c, doc)


WALKERS: dict[str, Callable[[Collector, dict[str, Any]], None]] = {
    "chat": chat, "completions": completions, "embeddings": embeddings,
    "responses": responses,
}


def resolve(doc: Any, path: tuple[str | int, ...]) -> Iterator[tuple[Path, Any]]:
    """Nodes at `path` ('*' is every element of a list or every value of an object)."""
    frontier: list[tuple[Path, Any]] = [((), doc)]
    for step in path:
        nxt: list[tuple[Path, Any]] = []
        for p, node in frontier:
            if step == "*":
                if isinstance(node, list):
                    nxt.extend(((*p, i), v) for i, v in enumerate(node))
                elif isinstance(node, dict):
                    nxt.extend(((*p, k), v) for k, v in node.items())
            elif isinstance(step, int):
                if isinstance(node, list) and -len(node) <= step < len(node):
                    nxt.append(((*p, step % len(node)), node[step]))
            elif isinstance(node, dict) and step in node:
                nxt.append(((*p, step), node[step]))
        frontier = nxt
    yield from frontier


# -- putting new strings back -------------------------------------------------------------

_LEAF = object()


def apply(doc: dict[str, Any], edits: dict[Path, str]) -> dict[str, Any]:
    """New values for the top-level keys under `edits`; `doc` is not modified."""
    tree: dict[Any, Any] = {}
    for path, value in edits.items():
        node = tree
        for step in path:
            node = node.setdefault(step, {})
        node[_LEAF] = value
    return {key: _rebuild(doc[key], sub) for key, sub in tree.items()}


def _rebuild(node: Any, sub: dict[Any, Any]) -> Any:
    if _LEAF in sub:
        return sub[_LEAF]
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    for step, child in sub.items():
        copy[step] = _rebuild(node[step], child)
    return copy


def splice(text: str, changes: list[tuple[int, int, str]]) -> str:
    """`text` with each (start, end) span replaced; spans do not overlap. Sorts `changes`."""
    changes.sort()
    pieces: list[str] = []
    pos = 0
    for s, e, new in changes:
        pieces.append(text[pos:s])
        pieces.append(new)
        pos = e
    pieces.append(text[pos:])
    return "".join(pieces)


def splice_args(args: JsonArgs, new_values: dict[int, str]) -> str:
    """The arguments text with the string tokens numbered in `new_values` re-encoded."""
    tokens = args.tokens
    return splice(args.raw, [(*tokens[i], json.dumps(v, ensure_ascii=False))
                             for i, v in new_values.items()])
