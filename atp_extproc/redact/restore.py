"""Put the originals back into a response: JSON bodies and SSE streams.

Placeholders are plain ASCII (`[EMAIL_1]`, `[EMAIL:3f9a…]`), so finding them in bytes is
safe. Substituting is where care is needed:
  - an original that needs no JSON escaping (no quote, backslash or control character) can
    be put back byte for byte at any nesting depth, even inside tool-call arguments that
    are JSON inside a JSON string: the fast path;
  - otherwise (a PEM key with newlines, a custom pattern) the JSON is parsed and strings are
    restored where they are, JSON-in-a-string included, then serialised again.

Streams: SSE events are processed whole; a partial event waits for the rest of it, so a
placeholder split between network chunks at any byte is restored. Models also split a
placeholder across *events* ("[EMA" in one delta, "IL_1]" in the next): for incremental
fields (`delta` content, tool-call argument deltas, completion `text`) a trailing prefix of a
known placeholder is held back and prepended to the next delta of the same stream position;
whatever is still held when that position finishes (its choice's `finish_reason`, its
item's `.done` event, the end of the response) is sent as one extra event before the
finishing one, so no text is ever lost. That event carries only what identifies the
position and the held text: clients that add deltas up (the SDKs' stream helpers) would
otherwise get a role, a tool call's id or name, or logprobs twice.

Citations (`url_citation` start_index and end_index, a file citation's index) point into
the text as the provider wrote it: they move by what restore put back before them, in a
whole text and in a streamed one.

Growth is bounded: an answer repeating a long value's placeholder ("[JWT_1] " ten thousand
times, for a 600 KB token) would otherwise grow without limit. Each text (a string, a raw
chunk, a whole body on the fast path) has its growth counted before it is built; past the
exchange's budget restore stops, and that text and every later one keep their placeholders,
which hold no personal data: a value is never put back in part.
"""

from __future__ import annotations

import json
import re
import secrets
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any

from atp_extproc.llm_api import (
    EVENT_END,
    UnreadableNumber,
    bounded_int,
    choice_finish_reason,
    finite_float,
)
from atp_extproc.redact.detectors import PLACEHOLDER, PLACEHOLDER_TEXT, utf8_safe
from atp_extproc.redact.redactor import PlaceholderMap

_TOKEN = PLACEHOLDER_TEXT
_TOKEN_B = re.compile(PLACEHOLDER.encode())
_MAYBE = re.compile(rb'\[[A-Z"]')
# The start of a placeholder, cut before its closing bracket (with PLACEHOLDER's shape):
# held back at the end of a chunk until the next one shows whether it completes. Any
# placeholder-shaped start is held, ours or not, rather than a set of every prefix of
# every placeholder (a million strings for a body of 100k e-mail addresses).
_LINE_END = re.compile(rb"(\r\n|\r|\n)")
_PREFIX = re.compile(r"\[(?:[A-Z][A-Z0-9_]*(?::[0-9a-f]{0,16})?)?")
_PREFIX_B = re.compile(_PREFIX.pattern.encode())
_UNSAFE = re.compile(r'["\\\x00-\x1f]')
# A stream with no event boundary for this long is not SSE: pass it on as raw text.
_MAX_PENDING_EVENT = 4 << 20
_TERMINAL_TYPES = ("response.completed", "response.failed", "response.incomplete")
# Where a Responses event is, as in the carry keys' first element (after the event type).
_POSITION = ("item_id", "output_index", "content_index")

# A carry key: (event type and position, logical path of the field).
Key = tuple[tuple, tuple]
# Each placeholder restore put back in a text: its (start, end) in the text as the
# provider wrote it, and by how much the text has grown up to its end.
Growth = list[tuple[int, int, int]]
_ANNOTATION_ADDED = "response.output_text.annotation.added"
# An event that may add to a text citations point into (Chat content, Responses text).
_TEXT_DELTA = re.compile(rb'"response\.output_text\.delta"|"content"\s*:\s*"')
# A stream event's number, as providers write it: renumbered in the bytes, unparsed.
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def _hashable(value: Any) -> Any:
    """A position field as a key part: a list or an object (no provider sends one, but a
    stream may) stands as its JSON text."""
    return value if value is None or isinstance(value, (str, int, float)) else \
        json.dumps(value, sort_keys=True, default=str)


def _json_escape(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)[1:-1]


class _RawNumber:
    """A JSON number Python cannot hold as written (1e400, read as inf, would be written
    back as Infinity, which is no JSON; an integer of 5,000 digits): kept as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _or_raw(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """json's parse_float or parse_int, keeping as _RawNumber what `parse` refuses."""
    def read(text: str) -> Any:
        try:
            return parse(text)
        except UnreadableNumber:
            return _RawNumber(text)
    return read


_float = _or_raw(finite_float)
_int = _or_raw(bounded_int)


def _loads(data: bytes | str) -> Any:
    """JSON to be written again by `_dumps`, its numbers as they were written. Floats are
    each looked at (about 0.1 µs: any may overflow, exponent or not); integers only where
    json refuses one as too long."""
    try:
        return json.loads(data, parse_float=_float)
    except ValueError:
        pass  # no JSON (raised again below), or an integer past Python's digits
    return json.loads(data, parse_int=_int, parse_float=_float)


def _dumps(obj: Any) -> bytes:
    try:
        return _write_json(obj, ascii_only=False).encode()
    except UnicodeEncodeError:  # a lone surrogate the body escaped: escape it again
        return _write_json(obj, ascii_only=True).encode()


def _write_json(obj: Any, ascii_only: bool = False,
               separators: tuple[str, str] = (",", ":")) -> str:
    """json.dumps, with each _RawNumber written as it was read."""
    raw: list[str] = []
    marker = ""

    def keep(o: Any) -> str:
        nonlocal marker
        if not isinstance(o, _RawNumber):
            raise TypeError(f"{type(o).__name__} is not JSON")
        # A string no text holds stands in for the number, then is replaced by it.
        marker = marker or secrets.token_hex(8)
        raw.append(o.text)
        return f"{marker}{len(raw) - 1}."

    text = json.dumps(obj, ensure_ascii=ascii_only, separators=separators, default=keep)
    if not raw:
        return text
    return re.sub(f'"{marker}([0-9]+)\\."', lambda m: raw[int(m[1])], text)


# What restore may add to one answer by default: the shipped Envoy buffer (8 MiB) less
# max_body_bytes' default (4 MiB), the largest answer Envoy buffers for ATP.
RESTORE_BUDGET_BYTES = 4 << 20
# A stream, which Envoy does not buffer, may grow as many times more: a Responses stream
# carries each text five times (its deltas, output_text.done, content_part.done,
# output_item.done and response.completed), which a budget counting each once left with
# the values in the deltas and placeholders in the final response.
STREAM_COPIES = 5


class Restorer:
    def __init__(self, mapping: PlaceholderMap, budget: int = RESTORE_BUDGET_BYTES):
        # A lone surrogate (a request may escape one; redaction keeps it) has no UTF-8
        # form: the client gets U+FFFD in its place.
        self._map: dict[str, str] = {k: utf8_safe(v) for k, v in mapping.items()}
        self._bytes = {k.encode(): v.encode() for k, v in self._map.items()}
        self._escaped_text = {k: _json_escape(v) for k, v in self._map.items()}
        self._escaped = {k.encode(): v.encode() for k, v in self._escaped_text.items()}
        self._safe = {k.encode(): not _UNSAFE.search(v) for k, v in self._map.items()}
        self._max = max((len(k) for k in self._map), default=0)
        # Bytes a placeholder's value adds where it goes back, as str and as bytes key:
        # escaped twice, the most it can add (in JSON text held in a string, as tool-call
        # arguments are; an unescaped or once-escaped value is never longer).
        self._cost: dict[str | bytes, int] = {}
        for k, v in self._escaped_text.items():
            self._cost[k] = self._cost[k.encode()] = len(_json_escape(v).encode()) - len(k)
        self._budget = budget
        self._added_bytes = 0
        self._streamed = False
        # The answer is JSON: its streamed text is a fragment of JSON, like arguments.
        self._json_text = mapping.json_text
        self._tail = b""
        self._raw = False
        # stream key → (held text, template event, physical path of the field)
        self._carry: dict[Key, tuple[str, Any, tuple]] = {}
        # A streamed text's position (a Responses content part, a Chat choice) → how
        # much of it the provider has sent, and what restore added where: citations
        # streamed later point into the provider's text.
        self._grown: dict[tuple, tuple[int, Growth]] = {}
        # Some placeholder was put back; the budget stopped restore (for the record).
        self.restored = False
        self.limited = False
        # Events ATP added to a stream that numbers its events (Responses'
        # sequence_number): every later event's number moves up by as many, so numbers
        # stay unique and in order; and the last number seen, for events added at the end.
        self._added = 0
        self._last_seq: int | None = None

    def clear(self) -> None:
        """Forget the originals (end of the exchange)."""
        for d in (self._map, self._bytes, self._escaped, self._escaped_text, self._safe,
                  self._cost, self._carry, self._grown):
            d.clear()
        self._tail = b""

    # -- text ----------------------------------------------------------------------------

    def restore_text(self, text: str, escape: bool = False) -> str:
        if "[" not in text or not self._map:
            return text
        return self._sub(_TOKEN, self._escaped_text if escape else self._map, text)

    def _growth(self, text: str, base: int = 0, grown: int = 0) -> Growth:
        """Where restore_text puts values back in `text` (which starts at `base` of a
        longer text that has grown by `grown` before it)."""
        out: Growth = []
        for m in _TOKEN.finditer(text):
            value = self._map.get(m.group())
            if value is not None:
                grown += len(value) - len(m.group())
                out.append((base + m.start(), base + m.end(), grown))
        return out

    def _recite(self, old: dict, new: dict) -> bool:
        """Move a whole text's citations (Responses `annotations[].start_index` and
        `end_index` beside `text`; Chat's under `url_citation` beside `content`) by what
        restore put back before them. Only where the text was restored as text (not a
        JSON text written again)."""
        key = "text" if isinstance(old.get("text"), str) else "content"
        text = old.get(key)
        restored = new.get(key)
        if not isinstance(text, str) or not isinstance(restored, str) or \
                not self._restored_as_text(text, restored):
            return False
        return _move_citations(new.get("annotations"), self._growth(text))

    def _restored_as_text(self, text: str, new: str) -> bool:
        """`new` is `text` with every placeholder put back as text. Compared piece by
        piece: restoring `text` again would count against the budget twice, and build a
        text the budget refused."""
        at = last = 0
        for m in _TOKEN.finditer(text):
            for piece in (text[last:m.start()], self._map.get(m.group(), m.group())):
                if not new.startswith(piece, at):
                    return False
                at += len(piece)
            last = m.end()
        return new[at:] == text[last:]

    def _sub(self, pattern: Any, table: Mapping[Any, Any], text: Any,
             tokens: list[Any] | None = None) -> Any:
        """`text` (str or bytes, as `pattern` and `table` are) with the placeholders of
        `table` replaced by its values; unchanged once that would pass the budget.
        `tokens`: `pattern.findall(text)`, when the caller has it already."""
        if self.limited:
            return text
        cost = self._cost
        costs = [cost[t] for t in (pattern.findall(text) if tokens is None else tokens)
                 if t in cost]
        if not costs:
            return text
        grown = self._added_bytes + sum(costs)
        if grown > self._budget:
            self.limited = True
            return text
        self._added_bytes = grown
        self.restored = True

        def put_back(m: Any) -> Any:
            return table.get(m.group(), m.group())
        return pattern.sub(put_back, text)

    # -- whole JSON bodies ----------------------------------------------------------------

    def restore_json(self, body: bytes) -> bytes | None:
        """The body with originals put back, or None if it holds none of our placeholders."""
        if not self._map or b"[" not in body:
            return None
        tokens = _TOKEN_B.findall(body)
        found = {t for t in tokens if t in self._bytes}
        if not found:
            return None
        # Citations point into the text: they move with what restore puts back; so do a
        # logprob token's bytes.
        if all(self._safe[t] for t in found) and not _CITATION.search(body) and \
                b'"bytes"' not in body:
            return self._sub(_TOKEN_B, self._bytes, body, tokens)
        try:
            return _dumps(self._node(_loads(body)))
        except (ValueError, RecursionError):  # (nested deeper than the walk goes)
            return self._sub(_TOKEN_B, self._escaped, body)

    def _node(self, node: Any) -> Any:
        if isinstance(node, str):
            return self._string(node)
        if isinstance(node, dict):
            # Keys too: JSON keys of tool arguments and results are redacted.
            out = {(self.restore_text(k) if "[" in k else k): self._node(v)
                   for k, v in node.items()}
            if "annotations" in node:
                self._recite(node, out)
            _rebyte(node, out)
            return out
        if isinstance(node, list):
            return [self._node(v) for v in node]
        return node

    def _string(self, s: str) -> str:
        if "[" not in s:
            return s
        head = s.lstrip()[:1]
        # JSON in a string is parsed (and written again) only where an original needs
        # escaping: written again, its numbers and spacing would change (0.1000…01 to
        # 0.1), and a stream's deltas would no longer add up to its .done text.
        if head in ("{", "[") and not all(self._safe.get(t.encode(), True)
                                          for t in _TOKEN.findall(s)):
            try:
                inner = _loads(s)
                if isinstance(inner, (dict, list)):
                    return _write_json(self._node(inner), separators=(", ", ": "))
            except RecursionError:
                # JSON all the same, deeper than the walk goes: its placeholders sit in
                # string literals, where a value goes escaped.
                return self.restore_text(s, escape=True)
            except ValueError:
                pass  # no JSON: text
        return self.restore_text(s)

    # -- streams -------------------------------------------------------------------------

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """Restore one chunk of a streamed (SSE) body; holds back what may be incomplete."""
        if not self._map and not self._tail:
            return chunk
        if not self._streamed:
            self._streamed = True
            self._budget *= STREAM_COPIES
        held = len(self._tail)
        data = self._tail + chunk if self._tail else chunk
        out: list[bytes] = []
        if self._raw:
            m = EVENT_END.search(data, max(0, held - 3))
            if m is None:
                return self._raw_event_part(data, end)
            # The oversized event (a streamed image's 4 MiB of base64) ends here: the
            # stream is read event by event again, with what it held before.
            out.append(self._raw_feed(data[:m.end()], True))
            self._raw = False
            data, held = data[m.end():], 0
        pos = 0
        # The held bytes end no event, but for a separator's first bytes (at most 3): a
        # long event arriving in small chunks is scanned once, not once per chunk.
        for m in EVENT_END.finditer(data, max(0, held - 3)):
            out.append(self._event(data[pos:m.start()]))
            out.append(m.group())
            pos = m.end()
        rest = data[pos:]
        if end:
            # Held text goes out before a last event without its blank line: a client
            # drops such an event (a stream cut mid-event), and a blank line after it
            # would have it read the cut JSON. Text that event holds comes after it.
            out.append(self._flush(seq=self._next_seq())[0])
            if rest:
                out.append(self._event(rest))
                after, _ = self._flush(seq=self._next_seq())
                if after:
                    out += [b"\n\n", after]  # or the held text's event is glued onto it
            self._tail = b""
        elif len(rest) > _MAX_PENDING_EVENT:
            self._raw = True
            if _TEXT_DELTA.search(rest, 0, 4096):
                # Read raw, a text delta cannot take held text: that goes first, in its
                # order. (Other events, a streamed image's, leave it held for the text.)
                flushed, added = self._flush(seq=self._next_seq())
                self._added += added
                out.append(flushed)
            out.append(self._raw_event_part(rest, False))
        else:
            self._tail = rest
        return b"".join(out)

    def _raw_event_part(self, data: bytes, end: bool) -> bytes:
        """Part of an event too big to hold, restored as raw bytes. Line ends at its end
        may be the first half of the event's end: they wait for the next chunk, as a
        placeholder's start does (none holds a line end)."""
        ends = 0 if end else min(3, len(data) - len(data.rstrip(b"\r\n")))
        body = self._raw_feed(data[:len(data) - ends], end)
        self._tail += data[len(data) - ends:]
        return body

    def feed_json(self, chunk: bytes, end: bool) -> bytes:
        """Restore one chunk of a JSON answer too big to hold whole: the values go in
        escaped for a JSON string; a placeholder cut by the chunk's end waits for the
        next one."""
        data = self._tail + chunk if self._tail else chunk
        return self._raw_feed(data, end) if self._map else data

    def _raw_feed(self, data: bytes, end: bool) -> bytes:
        hold = b"" if end else self._held_bytes(data)
        body = data[:len(data) - len(hold)]
        self._tail = hold
        if self._added:
            body = _SEQUENCE.sub(self._renumber, body)
        # Still SSE, whose data is JSON: an original with a quote or a newline must not
        # end a string, or an event.
        return self._sub(_TOKEN_B, self._escaped, body)

    def _held_bytes(self, data: bytes) -> bytes:
        i = data.rfind(b"[", max(0, len(data) - self._max))
        if i == -1:
            return b""
        suffix = data[i:]
        return suffix if _PREFIX_B.fullmatch(suffix) else b""

    def _event(self, event: bytes) -> bytes:
        if self._added:
            event = _SEQUENCE.sub(self._renumber, event)
        # Only "[" followed by a capital (a placeholder) or by a closing quote (a delta
        # ending in "[", which may be one) needs a look; JSON's own arrays do not; nor
        # does a citation, unless restore lengthened the text it points into.
        if not self._carry and not _MAYBE.search(event) and not (
                self._grown and _CITATION.search(event)):
            if _TEXT_DELTA.search(event):
                self._count_sent(event)
            return event
        lines = _lines(event)
        if sum(line.startswith(b"data:") for line, _ in lines) > 1:
            joined = self._multiline_event(lines)
            if joined is not None:
                return joined
        out_lines: list[bytes] = []
        before: list[bytes] = []
        for line, eol in lines:
            if not line.startswith(b"data:"):
                out_lines.append(line + eol)
                continue
            payload = line[5:]
            lead = b" " if payload.startswith(b" ") else b""
            payload = payload[len(lead):]
            if payload.strip() == b"[DONE]":
                before.append(self._flush(seq=self._next_seq())[0])
                out_lines.append(line + eol)
                continue
            try:
                flush, new_obj, changed = self._event_obj(_loads(payload))
            except (ValueError, RecursionError):  # no JSON, or deeper than the walk goes
                text = payload.decode("utf-8", "replace")
                out_lines.append(b"data:" + lead + self.restore_text(text).encode() + eol)
                continue
            before.append(flush)
            if changed:
                payload = _dumps(new_obj)
            out_lines.append(b"data:" + lead + payload + eol)
        return b"".join(before) + b"".join(out_lines)

    def _multiline_event(self, lines: list[tuple[bytes, bytes]]) -> bytes | None:
        """An event whose JSON spans several data lines (SSE joins them with line
        breaks, as clients do), restored as one, or None when they hold no JSON."""
        try:
            obj = _loads(_data_of(lines))
        except (ValueError, RecursionError):
            return None
        flush, new_obj, changed = self._event_obj(obj)
        if not changed:
            return flush + b"".join(line + eol for line, eol in lines)
        # One data line holds it all, where the last one was (its line end, none at the
        # event's end, is the one the event needs).
        last = max(i for i, (line, _) in enumerate(lines) if line.startswith(b"data:"))
        out = [b"data: " + _dumps(new_obj) + eol if i == last else line + eol
               for i, (line, eol) in enumerate(lines)
               if i == last or not line.startswith(b"data:")]
        return flush + b"".join(out)

    def _count_sent(self, event: bytes) -> None:
        """Count what a text delta passed on unchanged adds to its text: a citation
        streamed later points past it, and past what restore put back after it."""
        try:
            obj = json.loads(_data_of(_lines(event)))
        except (ValueError, RecursionError):
            return
        if not isinstance(obj, dict):
            return
        texts: list[tuple[tuple | None, Any]] = []
        if obj.get("type") == "response.output_text.delta":
            ctx = tuple(map(_hashable, (obj.get("type"), *map(obj.get, _POSITION))))
            texts.append((_text_position(ctx, ()), obj.get("delta")))
        elif isinstance(obj.get("choices"), list):
            for i, choice in enumerate(obj["choices"]):
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    logical = ("choices", ("#", _hashable(choice.get("index", i))), "delta",
                               "content")
                    texts.append((_text_position((None,), logical), delta.get("content")))
        for where, text in texts:
            if where is not None and isinstance(text, str) and text:
                self._note_sent(where, text, restored=False)

    def _note_sent(self, where: tuple, text: str, restored: bool) -> None:
        """`text` of the provider's went on at the end of the streamed text `where`, with
        its placeholders put back if `restored`."""
        sent, growth = self._grown.get(where, (0, []))
        if restored:
            growth += self._growth(text, sent, growth[-1][2] if growth else 0)
        self._grown[where] = (sent + len(text), growth)

    def _event_obj(self, obj: Any) -> tuple[bytes, Any, bool]:
        if not isinstance(obj, (dict, list)):
            return b"", obj, False
        ends = _finishes(obj)
        ctx: tuple = (None, None, None, None)
        if isinstance(obj, dict):
            ctx = tuple(map(_hashable, (obj.get("type"), *map(obj.get, _POSITION))))
        changed = False
        new_holds: list[Key] = []

        def walk(node: Any, phys: tuple, logical: tuple, incremental: bool,
                 fragment: bool) -> Any:
            nonlocal changed
            if isinstance(node, str):
                if incremental:
                    key = (ctx, logical)
                    held = self._carry.pop(key, None)
                    text = held[0] + node if held else node
                    hold = "" if ends is not None and ends(key) else self._held(text)
                    emit = text[:len(text) - len(hold)]
                    new = self.restore_text(emit, escape=fragment)
                    where = None if fragment else _text_position(ctx, logical)
                    if where is not None:
                        self._note_sent(where, emit, restored=new != emit)
                    if hold:
                        self._carry[key] = (hold, None, phys)
                        new_holds.append(key)
                elif "[" in node:
                    new = self._string(node)
                else:
                    return node
                if new != node:
                    changed = True
                return new
            if isinstance(node, dict):
                out = {}
                for k, v in node.items():
                    inc = incremental or k == "delta" or (k == "text" and "choices" in logical)
                    frag = fragment or k in ("arguments", "partial_json") or (
                        k == "content" and self._json_text)
                    # Keys too, as in a whole JSON answer (the request's metadata keys);
                    # a held text's place is the restored key's, as the event kept has it.
                    key = self.restore_text(k) if "[" in k else k
                    changed |= key != k
                    out[key] = walk(v, (*phys, key), (*logical, k), inc, frag)
                if "annotations" in out or "annotation" in out:
                    changed |= self._cite(ctx, phys, logical, incremental, node, out)
                _rebyte(node, out)
                return out
            if isinstance(node, list):
                items = []
                for i, v in enumerate(node):
                    lid = _hashable(v.get("index", i)) if isinstance(v, dict) else i
                    items.append(walk(v, (*phys, i), (*logical, ("#", lid)), incremental,
                                      fragment))
                return items
            return node

        new_obj = walk(obj, (), (), False, _is_fragment_event(obj, self._json_text))
        for key in new_holds:  # the event a held text came from shapes its flush event
            # (Gone where a later entry of the same choice index in this event took it:
            # Ollama numbers every parallel tool call 0.)
            if (held := self._carry.get(key)) is not None:
                self._carry[key] = (held[0], new_obj, held[2])
        seq = obj.get("sequence_number") if isinstance(obj, dict) else None
        if isinstance(seq, bool) or not isinstance(seq, int):
            seq = None
        self._last_seq = seq if seq is not None else self._last_seq
        flush, added = self._flush(ends, seq) if ends is not None and self._carry else \
            (b"", 0)
        if added:  # the held text goes out first, under this event's number
            assert seq is not None and isinstance(new_obj, dict)
            new_obj["sequence_number"] = self._last_seq = seq + added
            self._added += added
            changed = True
        return flush, new_obj, changed

    def _renumber(self, m: re.Match[bytes]) -> bytes:
        return b'"sequence_number":%d' % (int(m.group(1)) + self._added)

    def _next_seq(self) -> int | None:
        return None if self._last_seq is None else self._last_seq + 1

    def _cite(self, ctx: tuple, phys: tuple, logical: tuple, incremental: bool,
              old: dict, new: dict) -> bool:
        """Move the citations of an event's object: a whole text's by its own restore, a
        streamed one's by what restore put back in the deltas before."""
        if not incremental:
            if ctx[0] == _ANNOTATION_ADDED and not phys:
                where = _text_position(ctx, ())
                annotations = [new.get("annotation")]
            else:
                return "annotations" in new and self._recite(old, new)
        elif logical[-1:] == ("delta",):  # a Chat choice's citations come in a delta
            where = _text_position(ctx, (*logical, "content"))
            annotations = new.get("annotations")
        else:
            return False
        growth = self._grown.get(where, (0, []))[1] if where is not None else []
        return _move_citations(annotations, growth)

    def _held(self, text: str) -> str:
        i = text.rfind("[", max(0, len(text) - self._max))
        if i == -1:
            return ""
        suffix = text[i:]
        return suffix if _PREFIX.fullmatch(suffix) else ""

    def _flush(self, ends: Callable[[Key], bool] | None = None,
               seq: int | None = None) -> tuple[bytes, int]:
        """Emit held text as events of their own, shaped like the event it came from: for
        the positions `ends` says are finished, or all of them; in a stream numbering its
        events, numbered from `seq` on. Also says how many took a number."""
        out: list[bytes] = []
        numbered = 0
        for key in [k for k in self._carry if ends is None or ends(k)]:
            hold, template, phys = self._carry.pop(key)
            event = _skeleton(template, phys, hold)
            if seq is not None and isinstance(event, dict) and "sequence_number" in event:
                event["sequence_number"] = seq + numbered
                numbered += 1
            kind = event.get("type") if isinstance(event, dict) else None
            # A Responses event goes by its type's name too, as every other event of the
            # stream does: a client listening by name (EventSource) would miss it.
            name = b"event: " + kind.encode() + b"\n" if isinstance(kind, str) and \
                kind.isascii() and kind.isprintable() else b""
            out.append(name + b"data: " + _dumps(event) + b"\n\n")
        return b"".join(out), numbered


def _finishes(obj: Any) -> Callable[[Key], bool] | None:
    """Which stream positions the event `obj` finishes, as a test on carry keys (None: it
    finishes none). With n > 1 choices, or several output items, the others go on."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    if isinstance(kind, str) and (kind.endswith(".done") or kind in _TERMINAL_TYPES):
        # An item's, a content part's or a text's end, or (no position) the response's.
        where = [(i, _hashable(obj[k])) for i, k in enumerate(_POSITION, 1)
                 if obj.get(k) is not None]

        def in_position(key: Key) -> bool:
            return all(key[0][i] == v for i, v in where)
        return in_position
    choices = obj.get("choices")
    if isinstance(choices, list):
        done = {("#", _hashable(c.get("index", i))) for i, c in enumerate(choices)
                if isinstance(c, dict) and choice_finish_reason(c) is not None}
        if done:
            def in_choice(key: Key) -> bool:
                logical = key[1]
                return len(logical) > 1 and logical[0] == "choices" and logical[1] in done
            return in_choice
    return None


def _lines(event: bytes) -> list[tuple[bytes, bytes]]:
    """An event's lines with their ends (CRLF, LF or CR, as SSE allows), the last bare."""
    parts = _LINE_END.split(event)
    return list(zip(parts[0::2], [*parts[1::2], b""], strict=True))


def _data_of(lines: list[tuple[bytes, bytes]]) -> bytes:
    """An event's data: its data lines' values (less one leading space), joined by line
    breaks."""
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:]
                       for line, _ in lines if line.startswith(b"data:"))


def _text_position(ctx: tuple, logical: tuple) -> tuple | None:
    """Which streamed text a delta at `logical` of an event `ctx` adds to, where
    citations may point into it: a Responses content part's, or a Chat choice's."""
    if ctx[0] in ("response.output_text.delta", _ANNOTATION_ADDED):
        return ("part", *ctx[1:])
    if len(logical) == 4 and logical[0] == "choices" and logical[2:] == ("delta", "content"):
        return ("choice", logical[1])
    return None


def _rebyte(old: dict, new: dict) -> None:
    """A logprob's `bytes` as its restored `token`'s: clients that build the text from
    the bytes (as OpenAI advises for tokens that split a character) got the placeholder."""
    token, was = new.get("token"), old.get("token")
    if isinstance(token, str) and token != was and isinstance(was, str) and \
            old.get("bytes") == list(was.encode()):
        new["bytes"] = list(token.encode())


# What a citation of a text position says: a range, or a file citation's insertion
# point ("the index in the output text at which to insert the file citation", as the
# openai SDK has it; a file_path's index is one in a list of files).
_CITATION = re.compile(rb'"start_index"|"file_citation"')
_POINT_CITATIONS = ("file_citation",)


def _move_citations(annotations: Any, growth: Growth) -> bool:
    """Citations' start_index and end_index (in Chat, under url_citation), and a file
    citation's `index` (where it goes in the text), moved by the growth before them; an
    index inside a restored value goes to its start."""
    if not growth or not isinstance(annotations, list):
        return False
    ends = [end for _, end, _ in growth]
    moved = False
    for annotation in annotations:
        if not isinstance(annotation, dict):
            continue
        cited = annotation.get("url_citation")
        cited = cited if isinstance(cited, dict) else annotation
        names = ("index",) if cited.get("type") in _POINT_CITATIONS else (
            "start_index", "end_index")
        for name in names:
            index = cited.get(name)
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            k = bisect_right(ends, index)  # values put back wholly before the index
            new = index + (growth[k - 1][2] if k else 0)
            if k < len(growth) and growth[k][0] < index:
                new = growth[k][0] + (growth[k - 1][2] if k else 0)
            if new != index:
                cited[name] = new
                moved = True
    return moved


def _is_fragment_event(obj: Any, json_text: bool) -> bool:
    kind = obj.get("type") if isinstance(obj, dict) else None
    return isinstance(kind, str) and ("arguments" in kind or (
        json_text and kind == "response.output_text.delta"))


def _skeleton(node: Any, path: tuple, hold: str, top: bool = True) -> Any:
    """`hold` at `path` in a copy of the event `node` cut down to what places it: the
    top-level scalars (id, object, created, model; a Responses event's type, item_id,
    *_index, sequence_number) and `index` below. Everything else, which a client would
    add to what it has (role, a tool call's id, type and name, logprobs, usage), goes."""
    if not path:
        return hold
    step, rest = path[0], path[1:]
    if isinstance(node, list):
        return [_skeleton(node[step], rest, hold, False)]
    if top:
        out = {k: v for k, v in node.items() if not isinstance(v, (dict, list))}
        if isinstance(node.get("logprobs"), list):
            out["logprobs"] = []  # required in Responses text deltas; empty adds nothing
    else:
        out = {"index": node["index"]} if "index" in node else {}
    out[step] = _skeleton(node[step], rest, hold, False)
    return out
