"""Which strings of a request body a provider sees, per operation, and how to put the
redacted strings back without touching anything else.

A *unit* is text the model reads as one piece: a string field, or the consecutive text
parts of one message (scanned joined, so PII split across parts is still found; the
joins count as word boundaries). Tool-call arguments and tool results are often JSON
inside a string: then every string and key in them is a unit, and so is every number
whose key names a card, phone or SSN; a value is read after its key ("ssn: ...") so the
detectors' context words apply. A redacted token is re-encoded as a JSON string and
spliced back into the text, which stays valid JSON and keeps its formatting everywhere
else. One nested deeper than Python's parser goes is refused (Collector.too_deep): read
as text, its escapes would hide values from the detectors and its placeholders break it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from atp_extproc.llm_api import holds_lone_surrogate
from atp_extproc.redact.detectors import Budget, key_class


@dataclass(frozen=True, slots=True)
class KeyName:
    """A path step naming a key itself, not its value: `("metadata", KeyName("k"))` is
    the key "k" of metadata, which an edit renames."""

    key: str


Path = tuple[str | int | KeyName, ...]


class KeyCollision(Exception):
    """Redacting keys would make two keys of one object the same."""


TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "summary_text",
                             "reasoning_text"})
# Strings (a key with its colon), numbers of 7 characters or more (shorter ones hold no
# card, SSN or phone number) and brackets of a JSON text: it parsed, so nothing else
# holds a digit, and a number starts after none of its own characters.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"(?:[ \t\r\n]*:)?'
                         r'|(?<![-+.eE0-9])-?[0-9][-+.eE0-9]{6,}|[\[\]{}]', re.S)
# A JSON number that is an integer, maybe written with a zero fraction ("4111...1.0"):
# its digits are read as the value.
_JSON_INT = re.compile(r"([0-9]{7,})(?:\.0+)?\Z")
_JSON_WS = " \t\r\n"


def _integral(number: str) -> str | None:
    """The digits of a whole number written with an exponent ("4.111111111111111e15", as
    Java writes a double), or None."""
    if "e" not in number and "E" not in number:
        return None
    value = float(number)  # a token of a text that parsed as JSON
    return str(int(value)) if value.is_integer() and 1e6 <= abs(value) < 1e20 else None
_scanstring = json.decoder.scanstring
# JSON texts are parsed to be checked, never for their numbers' values. One with an
# integer past Python's conversion limit (4300 digits) is valid all the same, and read as
# text it would get unquoted placeholders: it is parsed again with its integers kept as
# digits (not always: a call per integer costs number-heavy texts half as much again).
_LONG_INTS = json.JSONDecoder(parse_int=str)


def _decode(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        return _LONG_INTS.decode(raw)  # Python's integer limit, its only other ValueError


class JsonArgs:
    """A JSON text held in a string field; its strings, keys and numbers are scanned."""

    __slots__ = ("keys", "path", "raw", "tokens")

    def __init__(self, path: Path, raw: str):
        self.path = path
        self.raw = raw
        self.tokens: list[tuple[int, int]] = []
        # Which tokens are keys: renaming one may make two keys of an object one.
        self.keys: set[int] = set()


class Segment:
    """Text at `path`, or token `token` of a JSON text (and the (JSON text, token) pairs in
    `more`, which repeat it: a value under the same key, or a key, in any JSON text of the
    request), or (neither) text read only as context for the segment after it, never
    changed. At `path`, `tail` follows `text` and is sent unread (a data: URL's payload
    after its media type)."""

    __slots__ = ("also", "args", "more", "path", "tail", "text", "token")

    def __init__(self, text: str, path: Path | None = None, args: JsonArgs | None = None,
                 token: int = -1, tail: str = ""):
        self.text = text
        self.path = path
        self.args = args
        self.token = token
        self.tail = tail
        self.more: list[tuple[JsonArgs, int]] | None = None
        # The other maps holding this key (Collector.map_key), renamed alike.
        self.also: list[Path] | None = None

    @property
    def context(self) -> bool:
        return self.path is None and self.args is None

    @property
    def copies(self) -> int:
        return 1 + len(self.more or ()) + len(self.also or ())

    def other_places(self) -> Iterator[Path]:
        """Where else this segment's text is (a key of other maps), to edit alike."""
        if self.also:
            key = KeyName(self.text)
            yield from ((*m, key) for m in self.also)

    def repeat(self, args: JsonArgs, token: int) -> None:
        """Token `token` of JSON text `args` holds the same text (under the same key)."""
        if self.more is None:
            self.more = []
        self.more.append((args, token))


class Collector:
    def __init__(self) -> None:
        self.units: list[list[Segment]] = []
        self.non_text = 0
        self.data_chars = 0  # of binary data left unread
        self.data_values = 0  # that data came in
        # Work units for collecting, one per distinct JSON key of the request: as much as
        # a scan's budget, growing with the JSON texts; past it the rest of a JSON text
        # is not read and the scan is incomplete.
        self.budget = Budget.for_text(0)
        self.incomplete = False
        # A JSON text (tool arguments, a tool result) escapes a lone surrogate, as the body
        # itself may not (llm_api.parse_body): the request is refused.
        self.lone_surrogate = False
        # Every JSON key of the request, read once: its class and the segment of its
        # first occurrence, which lists the others (records, turns repeating a result).
        self._keys: dict[str, tuple[str | None, Segment]] = {}
        # Paths already taken; only needed once config adds paths that may repeat the
        # default ones, so the default walk does not pay for it.
        self._seen: set[Path] | None = None
        # Keys of maps read outside JSON texts, by text: read once, however many maps
        # repeat them (records, logprobs).
        self._map_keys: dict[str, Segment] = {}
        # A JSON text nested deeper than Python's parser goes: the request is refused.
        self.too_deep = False

    def dedupe(self) -> None:
        self._seen = {seg.path if seg.args is None else seg.args.path
                      for unit in self.units for seg in unit if not seg.context}

    def text(self, path: Path, value: str, tail: str = "", label: str = "") -> None:
        """`value` at `path`; `label`, read before it as context only ("secret_key: ")."""
        if value:
            seen = self._seen
            if seen is not None:
                if path in seen:
                    return
                seen.add(path)
            seg = Segment(value, path, tail=tail)
            self.units.append([Segment(label), seg] if label else [seg])

    def map_key(self, path: Path, key: str) -> None:
        """`key` of the map at `path`; its place is (*path, KeyName(key))."""
        seg = self._map_keys.get(key)
        if seg is None:
            self._map_keys[key] = seg = Segment(key, (*path, KeyName(key)))
            self.units.append([seg])
        elif seg.also is None:
            seg.also = [path]
        else:
            seg.also.append(path)

    def joined(self, parts: list[tuple[Path, str]]) -> None:
        seen = self._seen
        if seen is not None:
            parts = [(p, v) for p, v in parts if p not in seen]
            seen.update(p for p, _ in parts)
        unit = [Segment(v, p) for p, v in parts if v]
        if unit:
            self.units.append(unit)

    def json_text(self, path: Path, raw: str, fallback: bool = True) -> bool:
        """A string that should hold JSON (tool-call arguments, tool results); one that
        does not is read as text, or with fallback=False left to the caller (False)."""
        if not raw:
            return True
        if self._seen is not None:
            if path in self._seen:
                return True
        stripped = raw.lstrip(_JSON_WS)
        if not stripped or stripped[0] not in '{["':
            if fallback:
                self.text(path, raw)
            return False
        try:
            decoded = _decode(raw)
        except RecursionError:
            self.too_deep = True  # the request is refused: nothing to read
            return True
        except ValueError:
            if fallback:
                self.text(path, raw)  # not JSON (or partial): scan it as text
            return False
        if holds_lone_surrogate(raw, decoded):
            self.lone_surrogate = True  # the request is refused: nothing to read
            return True
        if self._seen is not None:
            self._seen.add(path)
        self.budget.left += len(raw) // 16
        args = JsonArgs(path, raw)
        tokens = args.tokens
        units = self.units
        # The class (phone, card, ssn) the key of the next value names, and the one an
        # enclosing key named, which a nested object's neutral keys inherit
        # ({"phone": {"number": ...}}); an array's items get the array's key. Numbers
        # under no such key are ids, amounts, sizes, times, GTINs and order numbers:
        # reading them would cost much and misfire often (a random 10-digit id is as
        # often as not a valid phone number, a GTIN or a seed may pass Luhn), so they are
        # not read. None: a neutral key; "": a key naming something else than the value
        # ("phone_id", "ts", "amount").
        cls: str | None = None
        inherit: str | None = None
        outer: list[tuple[str | None, str | None]] = []
        # Arrays of records repeat their keys and many values: each key (in the whole
        # request) and each (class, text) is read once, by the segment of its first
        # token, which lists the others.
        keys = self._keys
        seen: dict[tuple[str | None, str], Segment] = {}
        for m in _JSON_TOKEN.finditer(raw):
            s, e = m.span()
            first = raw[s]
            if first == '"':
                is_key = raw[e - 1] == ":"
                if is_key:
                    e = raw.rindex('"', s, e) + 1
                value = raw[s + 1:e - 1]
                if "\\" in value:  # `raw` parsed as JSON above: a valid string literal
                    value = _scanstring(raw, s + 1)[0]
                if is_key:  # keys are read too ({"alice@example.com": ...}), no context
                    if not value:
                        cls = inherit
                        continue
                    tokens.append((s, e))
                    args.keys.add(len(tokens) - 1)
                    known = keys.get(value)
                    if known is None:
                        # A key new to the request costs a unit (a unit to scan).
                        if not self.budget.spend():
                            self.incomplete = True
                            tokens.pop()
                            break
                        seg = Segment(value, None, args, len(tokens) - 1)
                        known = keys[value] = (key_class(value), seg)
                        units.append([seg])
                    else:
                        known[1].repeat(args, len(tokens) - 1)
                    own = known[0]
                    cls = inherit if own is None else own
                    continue
                if not value:
                    continue
            elif first in "{[":
                outer.append((cls, inherit))
                inherit = cls
                if first == "{":
                    cls = None
                continue
            elif first in "}]":
                cls, inherit = outer.pop()
                continue
            else:
                value = raw[s:e]
                if not cls:
                    continue  # an id, count, amount, time ... ("card_id", "ts", "gtin")
                digits = _JSON_INT.match(value)
                value = digits.group(1) if digits is not None else _integral(value) or value
            tokens.append((s, e))
            seg = seen.get((cls, value))
            if seg is not None:
                seg.repeat(args, len(tokens) - 1)
                continue
            seg = seen[cls, value] = Segment(value, None, args, len(tokens) - 1)
            # The class a key names first, as a label would be in prose ("ssn: 123456789"),
            # so the detectors' context words apply. Only then: any other key is no more
            # than a neutral label, and some ("customer", "ref", "build") would read as
            # an identifier's and hide a value plain text would show.
            units.append([Segment(f"{cls}: "), seg] if cls else [seg])
        return True

    def anything(self, path: Path, node: Any) -> None:
        """Every string value and key under `node` (extra paths from config, shapes no
        walker knows)."""
        stack: list[tuple[Path, Any]] = [(path, node)]
        while stack:
            p, v = stack.pop()
            if isinstance(v, str):
                self.text(p, v)
            elif isinstance(v, dict):
                for k in v:
                    self.map_key(p, k)
                stack.extend(((*p, k), c) for k, c in reversed(list(v.items())))
            elif isinstance(v, list):
                stack.extend(((*p, i), c) for i, c in reversed(list(enumerate(v))))


def _content(c: Collector, path: Path, content: Any, result: bool = False) -> None:
    """Content: text, or parts (consecutive text parts read joined). `result`: a tool's
    result, whose text parts are each read as the JSON they often are."""
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
            c.anything((*path, j), part)  # a list in a list: no provider's shape, read
            continue
        read = _text_of(part)
        if read is not None:
            # A tool result's part of JSON is read as JSON; other text joins the run.
            if not (result and c.json_text((*path, j, read), part[read], fallback=False)):
                run.append(((*path, j, read), part[read]))
            if len(part) > 2 or "type" not in part:  # annotations (citations), logprobs
                _rest(c, (*path, j), part, {read})
        else:
            if run:
                c.joined(run)
                run = []
            c.non_text += 1
            _rest(c, (*path, j), part)  # a file's name, say
    if run:
        c.joined(run)


def _text_of(part: dict[str, Any]) -> str | None:
    """The key of a text part's text ("text", or a refusal's "refusal"), or None."""
    kind = _kind(part)
    if isinstance(part.get("text"), str) and (kind in TEXT_PART_TYPES or kind is None):
        return "text"
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return "refusal"
    return None


def _kind(node: dict[str, Any]) -> str | None:
    """An item's or a part's `type`: None when it has none, "?" when it is no string (a
    list, say, which could not even be looked up in a set)."""
    kind = node.get("type")
    return kind if isinstance(kind, str) else None if kind is None else "?"


def _part(c: Collector, path: Path, part: dict[str, Any], result: bool = False) -> None:
    """One content part standing alone at `path` (a tool's output, a prompt variable)."""
    read = _text_of(part)
    if read is not None:
        (c.json_text if result else c.text)((*path, read), part[read])
        _rest(c, path, part, {read})
    else:
        c.non_text += 1
        _rest(c, path, part)


# What an item or a part says of itself (its kind, id, state, the name of its tool or
# server) and its binary data (images, files, audio, encrypted reasoning), which a scan
# could only corrupt: left out at the top of an item or part only, since deeper down a
# key of these names may be anyone's ({"env": {"name": ...}}).
_OWN_KEYS = frozenset({"type", "id", "call_id", "role", "status", "name", "server_label",
                       "file_id", "tool_call_id"})
# Binary data, or where to fetch it (chat's image_url: {url, detail}): its data or URL is
# left out where it is one (text there, `file_data: "mail alice@…"`, is read).
_BINARY_KEYS = frozenset({"image_url", "file_url", "file_data", "input_audio",
                          "encrypted_content"})
# Those whose string is an address the provider fetches.
_URL_KEYS = frozenset({"image_url", "file_url"})
_BINARY_FIELDS = frozenset({"url", "data"})
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
# Base64 long enough to be data rather than a secret (API keys and tokens are shorter,
# or hold a '.'), which deeper down is known by its shape alone.
# (One line, or wrapped at a fixed width as MIME and PEM wrap it: keys one to a line
# are no base64.)
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/_-]{60,80}\r?\n)*[A-Za-z0-9+/_-]+={0,2}\s*")
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")


# A data: URL is its head, a media type (type/subtype, parameters quoted or %-encoded,
# which may hold commas) up to `;base64,`, and base64 (either alphabet, MIME-wrapped or
# not) to the string's end: text after it is no part of one, and `data:mail alice@…;
# base64,` is text.
# (A scheme in any letter case, RFC 3986; parameters as many and as long as a file's
# name and its media type's need, not a few of a few characters: past the bound, base64
# was read as text, and a key-shaped run in it refused a picture.)
_DATA_URL_HEAD = re.compile(r'(?i:data):[\w.+-]{1,64}/[\w.+-]{1,64}'
                            r'(?:;[\w.+-]{1,64}=(?:"[^"\r\n]{0,1024}"|[^;,\s"]{0,1024}))'
                            r'{0,64};(?i:base64),')
# A payload shorter than this may be a key or a few words (an sk-proj key is 164
# characters of the base64url alphabet): read, as raw base64 that short is.
_DATA_PAYLOAD_MIN = 256


def _data_url_head(text: str) -> int:
    """Where the payload of the data: URL `text` starts; 0 when `text` is none."""
    head = _DATA_URL_HEAD.match(text)
    if head is None or len(text) - head.end() < _DATA_PAYLOAD_MIN or \
            _BASE64.fullmatch(text, head.end()) is None:
        return 0
    return head.end()


def _binary(text: str) -> bool:
    # Random bytes in base64 hold both letter cases; numbers joined by '/', '-' or '_'
    # (a list of phone numbers) do not.
    if not (len(text) >= 256 and _BASE64.fullmatch(text) and _UPPER.search(text)
            and _LOWER.search(text)):
        return False
    # Wrapped at one width of whole 4-character groups, as encoders wrap (64, 76): lines
    # of keys (AWS key pairs, 61 wide; tokens) are text, and went out unread.
    lines = text.rstrip().split("\n")
    if len(lines) == 1:
        return True
    width = len(lines[0].rstrip("\r"))
    return width % 4 == 0 and len(lines[-1]) <= width and all(
        len(line.rstrip("\r")) == width for line in lines[1:-1])


def _unread(c: Collector, path: Path, value: Any, url: bool = False) -> bool:
    """Whether `value` is binary data, or (`url`: in a field of an image's address) a
    URL, which is sent unread; anything else there is text. A data: URL's media type
    and parameters are text (`;filename=jane@example.com.pdf`): `c` reads them."""
    if not isinstance(value, str):
        return False
    if value[:5].lower() == "data:":
        cut = _data_url_head(value)
        if cut:
            c.text(path, value[:cut], value[cut:])
            c.data_chars += len(value) - cut
            c.data_values += 1
            return True
        return False
    if _binary(value):
        c.data_chars += len(value)
        c.data_values += 1
        return True
    return url and _URL.fullmatch(value) is not None


def _rest(c: Collector, base: Path, node: dict[str, Any],
          handled: frozenset[str] | set[str] = frozenset()) -> None:
    """What a walker does not know of an item or part (a new item type, a field a
    provider added, a value of an unexpected shape) is read rather than sent unread:
    every string and nested key under `node` but its `handled` keys, its own keys and
    binary data, and every whole number under a key naming a card, phone or SSN (or
    nested below one, as in JSON arguments)."""
    stack: list[tuple[Path, Any, str | None]] = []
    for k, v in node.items():
        # An own key's value is left out as a string, a number or null; any other
        # shape is no kind, id or data, so it is read.
        if k in handled or (k in _OWN_KEYS and not isinstance(v, (dict, list))):
            continue
        if k in _BINARY_KEYS:
            if isinstance(v, dict):
                stack.extend(((*base, k, f), x, None) for f, x in v.items()
                             if not (f in _BINARY_FIELDS
                                     and _unread(c, (*base, k, f), x, f == "url")))
                continue
            if _unread(c, (*base, k), v, k in _URL_KEYS):
                continue
        if k not in _OWN_KEYS:
            c.map_key(base, k)  # an item's own keys may be anyone's words too
        stack.append(((*base, k), v, key_class(k)))
    _read_values(c, stack)


def _read_values(c: Collector, stack: list[tuple[Path, Any, str | None]]) -> None:
    """Every string and map key under the (path, value, key class) entries of `stack`,
    but binary data, and every whole number under a key naming a card, phone or SSN."""
    while stack:
        path, value, cls = stack.pop()
        if isinstance(value, str):
            # Labelled with the class its key names, as prose would name it ("phone: ";
            # any other key, "orderId", would hide what plain text shows). A secret's
            # value is never data however much it looks like base64 (a session token).
            if cls in _SECRET_KEYS or not _unread(c, path, value):
                c.text(path, value, label=f"{cls}: " if cls else "")
        elif isinstance(value, dict):
            for k, v in value.items():
                c.map_key(path, k)  # keys of a map may be anyone's words
                own = key_class(k)
                stack.append(((*path, k), v, cls if own is None else own))
        elif isinstance(value, list):
            stack.extend(((*path, i), v, cls) for i, v in enumerate(value))
        else:
            _number(c, path, value, cls)


_SECRET_KEYS = frozenset(("secret_key", "session_token", "private_key", "password",
                          "api_key"))


def _number(c: Collector, path: Path, value: Any, cls: str | None) -> None:
    """A whole number under a key naming a card, phone or SSN (`cls`), read as one."""
    if cls and type(value) in (int, float) and value == value // 1:
        c.units.append([Segment(f"{cls}: "), Segment(str(int(value)), path)])


def _tool_calls(c: Collector, base: Path, calls: Any) -> None:
    if not isinstance(calls, list):
        return
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        # Each field but the call's own (its name, JSON arguments, a custom tool's input
        # text) is read as _rest reads what it does not know.
        for kind, own in (("function", "arguments"), ("custom", "input")):
            spec = call.get(kind)
            if not isinstance(spec, dict):
                continue
            path = (*base, k, kind)
            if isinstance(spec.get(own), str):
                (c.json_text if own == "arguments" else c.text)((*path, own), spec[own])
                _rest(c, path, spec, frozenset({own}))
            else:
                _rest(c, path, spec)
        # A call of the usual shape holds nothing else; any other key, an id or type that
        # is no string, or a function that is no object, is read (a call of three other
        # keys, `{id, name, arguments}`, went out unread).
        read = frozenset(kind for kind in _CALL_READ if isinstance(call.get(kind), dict))
        if not (call.keys() <= _CALL_KEYS and read == call.keys() & _CALL_READ
                and isinstance(call.get("id", ""), str)
                and isinstance(call.get("type", ""), str)):
            _rest(c, (*base, k), call, read)


_ARGUMENTS = frozenset({"arguments"})
_CALL_READ = frozenset({"function", "custom"})
_CALL_KEYS = frozenset({"id", "type", *_CALL_READ})


STORED = ("user", "safety_identifier", "prompt_cache_key")
# Top-level fields of the OpenAI APIs that hold settings, not text a model reads or a
# provider stores (tool definitions, output schemas and stop sequences are documented as
# not scanned unless redaction.extra_paths names them).
# Any other top-level field is read: a provider's own, such as vLLM's chat `documents`,
# which its chat template puts into the prompt, would otherwise go out unread.
_SETTINGS = frozenset((
    "model", "stream", "stream_options", "temperature", "top_p", "top_k", "n",
    "max_tokens", "max_completion_tokens", "max_output_tokens", "max_tool_calls",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "seed", "service_tier", "parallel_tool_calls", "tool_choice", "function_call",
    "tools", "functions", "response_format", "text", "reasoning", "reasoning_effort",
    "verbosity", "modalities", "audio", "store", "background", "include", "truncation",
    "previous_response_id", "conversation", "encoding_format", "dimensions", "best_of",
    "echo", "web_search_options", "prompt_cache_retention", "stop"))
_COMMON = frozenset((*STORED, "metadata"))
# Settings that hold a number or a boolean (stream_options: booleans by name): text in
# one is the client's own, a model's provider would still receive it, so it is read.
_SCALAR_SETTINGS = frozenset((
    "stream", "stream_options", "temperature", "top_p", "top_k", "n", "max_tokens",
    "max_completion_tokens", "max_output_tokens", "max_tool_calls", "presence_penalty",
    "frequency_penalty", "logprobs", "top_logprobs", "seed", "parallel_tool_calls", "store",
    "background", "dimensions", "best_of", "echo"))
_SCALARS = (int, float, bool, type(None))
# Settings that hold a word from a short list (or a list or object of such words): read
# whatever they hold, which costs a few words, as a client's text there reaches the
# provider all the same.
_ENUM_SETTINGS = frozenset((
    "service_tier", "reasoning_effort", "verbosity", "truncation", "encoding_format",
    "modalities", "include", "prompt_cache_retention", "reasoning", "audio",
    # ids of the provider's making
    "conversation", "previous_response_id"))


def _common(c: Collector, doc: dict[str, Any], known: frozenset[str]) -> None:
    """What every operation may carry that a provider stores or reads, and any top-level
    field not `known` (the operation's own fields, _COMMON's and _SETTINGS)."""
    for key in STORED:
        if isinstance(doc.get(key), str):
            c.text((key,), doc[key])
    metadata = doc.get("metadata")
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            # Its keys are the client's own words too ({"alice@example.com": "vip"}).
            c.text(("metadata", KeyName(key)), key)
            if isinstance(value, str):
                c.text(("metadata", key), value)
    # In the body's order, so that placeholders are numbered the same every time.
    unknown = [k for k in doc if k not in known or k in _ENUM_SETTINGS
               or (k in _SCALAR_SETTINGS and type(doc[k]) not in _SCALARS)]
    for key in unknown:
        # Its name is the client's words too ({"alice@example.com": "vip"}).
        c.map_key((), key)
    stack = [((k,), doc[k], key_class(k)) for k in unknown]
    for key in _CHOICES:
        _choice(c, (key,), doc.get(key))
    text = doc.get("text")
    if isinstance(text, dict):  # Responses' text settings: words, but for its schema
        for k, v in text.items():
            if k != "format":
                c.map_key(("text",), k)
                stack.append((("text", k), v, key_class(k)))
    elif "text" in doc:
        # No settings object: a string or list there is read whole, as any unknown field.
        stack.append((("text",), text, None))
    _read_values(c, stack)


_CHOICES = ("tool_choice", "function_call")
_CHOICE_WORDS = frozenset(("auto", "none", "required"))


def _choice(c: Collector, path: Path, node: Any, tool: bool = True,
            cls: str | None = None, schema: bool = False) -> None:
    """A tool choice is read as _read_values reads a value (keys, strings, numbers under a
    card or phone key), but for what names the tools it picks: their names, types and
    labels (in the choice itself, a `function` or `custom` object, an entry of a `tools`
    list, an object with a `type`: `tool`) and lists of tool names. Those must match
    `tools`, which is not scanned, or the provider finds no such tool. In a parameter
    schema (`schema`) only its parameter names are kept (`properties` keys, `required`):
    an object there with a `type` is an example or a default, anyone's words."""
    if isinstance(node, dict):
        tool = not schema and (tool or "type" in node)
        for k, v in node.items():
            if tool and k in _OWN_KEYS and isinstance(v, str):
                continue
            if k in (_PARAMETER_LISTS if schema else _NAME_LISTS) and isinstance(
                    v, list) and all(isinstance(x, str) for x in v):
                continue
            if schema and k in _SCHEMA_VALUES:
                # Values a parameter may take: anyone's words, whatever keys they hold.
                c.map_key(path, k)
                _read_values(c, [((*path, k), v, cls)])
                continue
            if schema and k == "properties" and isinstance(v, dict):
                # The parameter names: the model's arguments must match them.
                for name, sub in v.items():
                    _choice(c, (*path, k, name), sub, False, cls, True)
                continue
            c.map_key(path, k)
            own = key_class(k)
            _choice(c, (*path, k), v, not schema and k in _TOOL_SPECS,
                    cls if own is None else own, schema or k in _SCHEMA_KEYS)
    elif isinstance(node, list):
        # The entries of a `tools` list are tools, with a type or not (chat's legacy
        # functions go by their name alone).
        listed = not schema and path[-1] in _TOOL_LISTS
        for i, v in enumerate(node):
            _choice(c, (*path, i), v, listed, cls, schema)
    elif isinstance(node, str):
        if node not in _CHOICE_WORDS and not _unread(c, path, node):
            c.text(path, node)
    else:
        _number(c, path, node, cls)


_TOOL_SPECS = frozenset(("function", "custom"))
# Lists of tool names (an MCP entry's allowed tools, as a list or as its `tool_names`),
# and of a schema's parameter names.
_NAME_LISTS = frozenset(("allowed_tools", "tool_names"))
_PARAMETER_LISTS = frozenset(("required",))
_SCHEMA_VALUES = frozenset(("examples", "example", "default", "const", "enum"))
_TOOL_LISTS = frozenset(("tools", "functions"))
# Where a tool's parameter schema sits (Chat and Responses `parameters`, MCP's
# `input_schema`).
_SCHEMA_KEYS = frozenset(("parameters", "input_schema"))


def in_tool_list(path: Path) -> bool:
    """Whether `path` is in a list of tools: the top level's, or one a Responses input
    item declares (`input[i].tools`)."""
    return bool(path) and (path[0] in _TOOL_LISTS or (
        len(path) > 2 and path[0] == "input" and path[2] == "tools"))


def tool_definitions(c: Collector, path: Path, node: Any) -> None:
    """What redaction.extra_paths names under `tools` or `functions` (descriptions,
    schemas), read as a tool choice is: never the names, types and labels of tools, nor
    parameter names, which the request's choices, history and a policy's strip match
    against, and the model's arguments use."""
    tool = (len(path) > 1 and path[-2] in _TOOL_LISTS) or path[-1] in _TOOL_SPECS
    schema = any(p in _SCHEMA_KEYS for p in path)
    if schema and path[-1] in ("properties", *_PARAMETER_LISTS):
        # A schema's parameter names named by the path itself: the same as within it.
        _choice(c, path[:-1], {path[-1]: node}, False, schema=True)
        return
    _choice(c, path, node, tool, schema=schema)


_TOOL_ROLES = frozenset(("tool", "function"))
# A chat message's fields chat() reads itself (llm_api checked their shapes).
_CHAT_READ = frozenset({"content", "tool_calls", "function_call"})


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
                _content(c, ("messages", i, "content"), content,
                         result=m.get("role") in _TOOL_ROLES)
            if len(m) == 2 and "role" in m and "content" in m:
                continue  # the common case: nothing else to look at
            base: Path = ("messages", i)
            for key in ("name", "refusal"):
                # A tool result's `name` is the function's, which must match its
                # declaration (not scanned); a user's or an assistant's is anyone's.
                if isinstance(m.get(key), str) and not (
                        key == "name" and m.get("role") in _TOOL_ROLES):
                    c.text((*base, key), m[key])
            _tool_calls(c, (*base, "tool_calls"), m.get("tool_calls"))
            fc = m.get("function_call")
            if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
                c.json_text((*base, "function_call", "arguments"), fc["arguments"])
                if len(fc) > 2 or not isinstance(fc.get("name"), str):
                    _rest(c, (*base, "function_call"), fc, _ARGUMENTS)
            # What else a message holds (reasoning_content, reasoning, a provider's own
            # fields, a name that is no string) is read as a Responses item's is.
            _rest(c, base, m, _CHAT_READ | {k for k in ("name", "refusal")
                                             if isinstance(m.get(k), str)})
    prediction = doc.get("prediction")
    if isinstance(prediction, dict):
        _content(c, ("prediction", "content"), prediction.get("content"))
        _rest(c, ("prediction",), prediction, _CONTENT)
    _common(c, doc, _CHAT_TOP)


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
    _common(c, doc, _COMPLETIONS_TOP)


def embeddings(c: Collector, doc: dict[str, Any]) -> None:
    _prompt_like(c, "input", doc.get("input"))
    _common(c, doc, _EMBEDDINGS_TOP)


# Items whose output is a tool's result, as often JSON as not.
_TOOL_RESULTS = frozenset({"function_call_output", "custom_tool_call_output", "mcp_call"})
_RESPONSES_NON_TEXT = frozenset({"input_image", "input_file", "input_audio", "image",
                                 "image_generation_call", "computer_screenshot"})


def _prompt_variables(c: Collector, prompt: Any) -> None:
    """Values filled into a stored prompt template: strings or input parts; and the
    prompt's other fields, as _rest reads them."""
    if not isinstance(prompt, dict):
        return
    _rest(c, ("prompt",), prompt, _VARIABLES)
    variables = prompt.get("variables")
    if not isinstance(variables, dict):
        return
    for name, value in variables.items():
        base: Path = ("prompt", "variables", name)
        if isinstance(value, str):
            c.text(base, value)
        elif isinstance(value, dict):
            _part(c, base, value)


_CONTENT = frozenset({"content"})
_VARIABLES = frozenset({"variables"})


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
            kind = _kind(item)
            result = kind in _TOOL_RESULTS
            # What the item's own walk reads; _rest reads what is left.
            handled: set[str] = set()
            if kind == "image_generation_call" and _unread(c, (*base, "result"),
                                                           item.get("result")):
                handled.add("result")  # an image (text there is read)
            if isinstance(item.get("content"), (str, list)):
                _content(c, (*base, "content"), item["content"])
                handled.add("content")
            if kind in TEXT_PART_TYPES and isinstance(item.get("text"), str):
                c.text((*base, "text"), item["text"])
                handled.add("text")
            elif kind in _RESPONSES_NON_TEXT:
                c.non_text += 1
            if isinstance(item.get("arguments"), str):
                c.json_text((*base, "arguments"), item["arguments"])
                handled.add("arguments")
            output = item.get("output")
            if isinstance(output, str):
                (c.json_text if result else c.text)((*base, "output"), output)
                handled.add("output")
            elif isinstance(output, list) and kind != "shell_call_output":
                _content(c, (*base, "output"), output, result)
                handled.add("output")
            elif isinstance(output, dict):
                _part(c, (*base, "output"), output, result)
                handled.add("output")
            if isinstance(item.get("summary"), list):
                _content(c, (*base, "summary"), item["summary"])
                handled.add("summary")
            if isinstance(item.get("tools"), list) and kind != "mcp_list_tools":
                # Tools the item declares (llm_api.tool_lists), left as the request's own
                # are: renamed, a tool policy stripped went out under the placeholder.
                handled.add("tools")
            _rest(c, base, item, handled)
    _prompt_variables(c, doc.get("prompt"))
    _common(c, doc, _RESPONSES_TOP)


# The top-level fields each walker reads itself, with those _common reads and settings.
_CHAT_TOP = _SETTINGS | _COMMON | {"messages", "prediction"}
_COMPLETIONS_TOP = _SETTINGS | _COMMON | {"prompt", "suffix"}
_EMBEDDINGS_TOP = _SETTINGS | _COMMON | {"input"}
_RESPONSES_TOP = _SETTINGS | _COMMON | {"instructions", "input", "prompt"}

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


def apply(doc: dict[str, Any], edits: dict[Path, str]
          ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """New values for the top-level keys under `edits`, a renamed top-level key's under
    its new name, and the renamed keys (to drop); `doc` is not modified."""
    tree: dict[Any, Any] = {}
    for path, value in edits.items():
        node = tree
        for step in path:
            node = node.setdefault(step, {})
        node[_LEAF] = value
    renames = {step.key: sub[_LEAF] for step, sub in tree.items() if isinstance(step, KeyName)}
    fields = {key: _rebuild(doc[key], sub) for key, sub in tree.items()
              if not isinstance(key, KeyName)}
    if len(set(renames.values())) != len(renames):
        raise KeyCollision  # two keys masked to one placeholder (one value spelt two ways)
    for old, new in renames.items():
        if new in doc and new not in renames:
            raise KeyCollision  # the placeholder names a field the body has
        fields[new] = fields.pop(old) if old in fields else doc[old]
    return fields, tuple(renames)


def _rebuild(node: Any, sub: dict[Any, Any]) -> Any:
    if _LEAF in sub:
        return sub[_LEAF]
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    renames: dict[str, str] = {}
    for step, child in sub.items():
        if isinstance(step, KeyName):
            renames[step.key] = child[_LEAF]
        else:
            copy[step] = _rebuild(node[step], child)
    if renames:  # keys renamed in place, the others' order kept
        renamed = {renames.get(k, k): v for k, v in copy.items()}
        if len(renamed) != len(copy):
            # Two keys masked to one placeholder (one value spelt two ways): one entry
            # would be lost.
            raise KeyCollision
        copy = renamed
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
    """The JSON text with the tokens numbered in `new_values` written as JSON strings (a
    redacted number becomes the string "[CARD_1]": the text stays valid JSON). Raises
    KeyCollision when renamed keys make two keys of an object one."""
    tokens = args.tokens
    text = splice(args.raw, [(*tokens[i], json.dumps(v, ensure_ascii=False))
                             for i, v in new_values.items()])
    if not args.keys.isdisjoint(new_values):
        json.loads(text, object_pairs_hook=_one_of_each, parse_int=str)  # KeyCollision
    return text


def _one_of_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise KeyCollision  # two keys that were different when the client sent them
    return obj
