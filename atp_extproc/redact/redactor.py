"""Redactor: one per config snapshot; `redact()` per request body.

Flow for one request: collect the strings the provider would see (scope.py) → join them
into one text, units separated by NUL, the parts of a unit back to back (their joins are
passed on as word boundaries) → normalise (normalize.py) → one RE2 Set pass says
which detector families can match; with none, return at once → run those families and
validate candidates (detectors.py) → map each finding back to the original text → replace
it by its placeholder, numbered per request and per data class, the same value always
getting the same placeholder → splice the changed strings back into copies of the
top-level fields that hold them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from atp_extproc.redact import scope
from atp_extproc.redact.detectors import PLACEHOLDER_TEXT, Budget, Scanner, ScanResult
from atp_extproc.redact.normalize import INVISIBLE, normalize, warm
from atp_extproc.redact.settings import RedactionSettings, parse_path

# An escaped ASCII character: only those can spell a placeholder (text in another script,
# which JSON writers escape by the thousand, is left alone).
_JSON_ESCAPE = re.compile(r"\\u00([0-7][0-9a-fA-F])")

OPERATIONS = tuple(scope.WALKERS)
# In `Redaction.denied` when the scan stopped early (work budget spent) and the settings
# say to refuse rather than let a partly scanned body go.
INCOMPLETE = "scan_incomplete"
# In `Redaction.denied` when two keys of one object would become one placeholder.
KEYS_COLLIDE = "keys_collide_when_redacted"
# ... and alone when a JSON text in the body (tool arguments, a tool result) escapes a
# lone surrogate: invalid Unicode, refused as the body itself would be.
LONE_SURROGATE = "lone_surrogate_in_json_text"
# ... and alone when a JSON text in the body is nested deeper than Python's parser goes.
JSON_TOO_DEEP = "json_text_too_deep"
_MIN_KEY_BYTES = 16
_PROCESS_KEY = secrets.token_bytes(32)
_TENANT_KEYS_MAX = 4096


# A segment's path whose first step is a field a provider keeps per end user.
_STORED_ROOTS = frozenset((key,) for key in scope.STORED)


class PlaceholderMap:
    """Placeholder → original text, for one exchange only.

    It holds personal data: it never shows its values in repr/str, and it refuses to be
    pickled or copied, so it cannot end up in a log record, a store or a cache by accident.
    Drop it (or call `clear()`) when the exchange ends. `json_text`: the request asked for
    a JSON answer, so originals go back into its streamed text JSON-escaped.
    """

    __slots__ = ("_d", "json_text")

    def __init__(self, data: Mapping[str, str] | None = None, json_text: bool = False):
        self._d: dict[str, str] = dict(data or {})
        self.json_text = json_text

    def __len__(self) -> int:
        return len(self._d)

    def __bool__(self) -> bool:
        return bool(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._d.get(key, default)

    def keys(self):
        return self._d.keys()

    def items(self):
        return self._d.items()

    def clear(self) -> None:
        self._d.clear()

    def __repr__(self) -> str:
        return f"<PlaceholderMap: {len(self._d)} placeholder(s), values hidden>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce_ex__(self, protocol):
        raise TypeError("PlaceholderMap holds personal data for one exchange only; it cannot "
                        "be pickled, copied or persisted")


_EMPTY_MAP = PlaceholderMap()


@dataclass(frozen=True, slots=True, repr=False)
class Redaction:
    # Top-level body keys whose value changed → the new value (splice only these); a
    # top-level key redacted itself is here under its new name...
    fields: dict[str, Any] = field(default_factory=dict)
    # ...and its old name here, to drop.
    renamed: tuple[str, ...] = ()
    # Occurrences per data class found (never values).
    counts: dict[str, int] = field(default_factory=dict)
    # Data classes found whose action is `deny`: the request must not go.
    denied: tuple[str, ...] = ()
    # Images, audio, files, token arrays, data: URIs: not scanned, counted for policy.
    non_text_parts: int = 0
    # Characters of binary data (base64, a data: URL's payload) sent unread: no prompt
    # text, which a token estimate from the body's size would count by the thousand.
    data_chars: int = 0
    # How many values that data came in (a part's, or loose, as vLLM's `documents`).
    data_values: int = 0
    mapping: PlaceholderMap = field(default=_EMPTY_MAP)
    # True when the work budget ran out (adversarial bodies: megabytes of digit groups,
    # invisible characters or near-miss candidates) and part of the body was not scanned.
    # With `on_incomplete: deny` (the default), `denied` then holds "scan_incomplete".
    incomplete: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.fields)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return (f"Redaction(fields={sorted(self.fields)}, counts={self.counts}, "
                f"denied={self.denied}, non_text_parts={self.non_text_parts}, "
                f"mapping={self.mapping!r}, incomplete={self.incomplete})")


_NOTHING = Redaction()


@dataclass(frozen=True, slots=True)
class Span:
    """A finding in original text offsets (for tools and tests)."""

    cls: str
    start: int
    end: int
    value: str
    # Other classes found within the span (findings of both readings merged into one).
    also: tuple[str, ...] = ()


# How much of a part's start and end is read on its own: a value, and the context words
# before it, fit (a window grows to the next whitespace, so a long token stays whole).
_EDGE = 128
_EDGE_MAX = 64 * 1024
_SPACE = re.compile(r"\s")


def _edges(text: str) -> list[tuple[int, int]]:
    """The (start, end) windows of `text` its parts-alone reading covers."""
    n = len(text)
    if n <= 2 * _EDGE + 64:
        return [(0, n)]
    space = _SPACE.search(text, _EDGE, min(n, _EDGE + _EDGE_MAX))
    head = space.start() if space is not None else min(n, _EDGE + _EDGE_MAX)
    lo = max(0, n - _EDGE - _EDGE_MAX)
    tail = n - _EDGE
    while tail > lo and not text[tail - 1].isspace():
        tail -= 1
    return [(0, n)] if head >= tail else [(0, head), (tail, n)]


def _unsplit(text: str) -> str:
    """`text` with each NUL as another control character, the same length. A NUL is what
    separates the scanned units, so detectors stop at one; one the client sent must not
    split a value ("4111\\u00001111..."), but go as the other controls do (normalize
    removes them)."""
    return text.replace("\x00", "\x01")


def _reconcile(joined: list[Span], alone: list[Span], text: str) -> list[Span]:
    """Both readings' findings as one set of spans over the joined `text`: every character
    either one finds is redacted, so neither can leak what the other found.

    A joined finding that only stretched a value of one part over the next part's text
    is dropped when that text holds a value of its own ("...1111." + "bob@example.com":
    the card and the e-mail, not an e-mail "1111.bob@example.com"). Other overlapping
    findings become one span: the one the joined reading found as is keeps its class and
    value (it may hold a value split over two parts); a wider one, stretched over several,
    takes the first's class and its own text as its value, and names the other classes
    in it (`also`), which count and may refuse the request as their own findings would.
    """
    if not alone:
        return joined
    # Most findings are the same in both readings (all but those at a join): those go
    # through as they are, and only the others are looked at.
    same = {(h.start, h.end, h.cls) for h in joined} & {(a.start, a.end, a.cls) for a in alone}
    if same:
        # ... unless a finding of one reading only overlaps them.
        near = bytearray(len(text))
        for h in (*joined, *alone):
            if (h.start, h.end, h.cls) not in same:
                near[h.start:h.end] = b"\x01" * (h.end - h.start)
        settled = {k for k in same if near.find(1, k[0], k[1]) == -1}
        if settled:
            out = [h for h in joined if (h.start, h.end, h.cls) in settled]
            joined = [h for h in joined if (h.start, h.end, h.cls) not in settled]
            alone = [a for a in alone if (a.start, a.end, a.cls) not in settled]
            if joined or alone:
                out += _reconcile(joined, alone, text) if alone else joined
                out.sort(key=lambda h: h.start)
            return out
    alone = sorted(alone, key=lambda a: a.start)
    starts = [a.start for a in alone]
    kept = [h for h in joined if not _stretched(h, _overlapping(h, alone, starts))]
    out: list[Span] = []
    group: list[Span] = []
    end = -1
    # Joined findings first where two start together, so they lead their group.
    for h in sorted(kept + alone, key=lambda h: h.start):
        if group and h.start >= end:
            out.append(_one_span(group, end, text))
            group = []
        group.append(h)
        end = max(end, h.end) if len(group) > 1 else h.end
    if group:
        out.append(_one_span(group, end, text))
    return out


def _overlapping(h: Span, alone: list[Span], starts: list[int]) -> list[Span]:
    """The findings of `alone` (sorted by start, none overlapping another) that `h`
    overlaps: a bisection and a few steps, not a pass over all of them."""
    i = max(bisect_right(starts, h.start) - 1, 0)
    out = []
    while i < len(alone) and alone[i].start < h.end:
        if alone[i].end > h.start:
            out.append(alone[i])
        i += 1
    return out


def _stretched(h: Span, over: list[Span]) -> bool:
    """Did the joined finding `h` only stretch one part's value (among `over`, the
    parts-alone findings it overlaps) over another value?"""
    for a in over:
        if a.cls != h.cls or (a.start != h.start and a.end != h.end):
            continue
        rest = (a.end, h.end) if a.start == h.start else (h.start, a.start)
        if any(b is not a and b.start < rest[1] and b.end > rest[0] for b in over):
            return True
    return False


# Past this many findings merged into one span (adversarial input only), every class in
# it counts rather than a pairwise look for pieces of others.
_MAX_GROUP_CHECK = 64


def _one_span(group: list[Span], end: int, text: str) -> Span:
    first = group[0]
    # A finding inside another is a piece of it (the tail of an IBAN split over two parts
    # read alone as a phone number), not a value of its own class.
    whole = group if len(group) > _MAX_GROUP_CHECK else [h for h in group if not any(
        o is not h and o.start <= h.start and h.end <= o.end for o in group)]
    also = tuple(dict.fromkeys(c for h in whole for c in (h.cls, *h.also)
                               if c != first.cls))
    for h in group:
        if h.start == first.start and h.end == end:
            return h if not also else Span(h.cls, h.start, h.end, h.value, also)
    return Span(first.cls, first.start, end, text[first.start:end], also)


_JSON_FORMATS = ("json_object", "json_schema")


def _json_answer(operation: str, doc: dict[str, Any]) -> bool:
    """Does the request ask for an answer in JSON (chat `response_format`, Responses
    `text.format`)? Its text is then JSON, streamed in pieces."""
    if operation == "chat":
        fmt = doc.get("response_format")
    elif operation == "responses":
        text = doc.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    else:
        return False
    return isinstance(fmt, dict) and fmt.get("type") in _JSON_FORMATS


class Redactor:
    """Compiled detectors and actions for one config snapshot; safe to share."""

    def __init__(self, settings: RedactionSettings, *, hmac_key: bytes | str | None = None,
                 environ: Mapping[str, str] | None = None):
        self.settings = settings
        warm()
        self.scanner = Scanner(settings)
        self._actions = {c: settings.action_for(c) for c in settings.classes}
        self._extra = [parse_path(p) for p in settings.extra_paths]
        # Field names the extra paths walk through: a request must spell them exactly,
        # as the fields redaction reads by default (llm_api.read_request).
        self.scanned_fields = frozenset(step for path in self._extra for step in path
                                        if isinstance(step, str) and step != "*")
        self._refuse_incomplete = settings.on_incomplete == "deny"
        env = os.environ if environ is None else environ
        key = hmac_key if hmac_key is not None else env.get(settings.hmac_key_env)
        if isinstance(key, str):
            # The environment's bytes as they are: a key that is no UTF-8 (random bytes
            # from a Secret) reaches Python with surrogates, which .encode() refused.
            key = os.fsencode(key)
        hashed = sorted(c for c, a in self._actions.items() if a == "hash")
        if key and len(key) < _MIN_KEY_BYTES:
            # Refused even where no action is hash: left aside, the process's own key
            # made the Responses placeholders differ across replicas and restarts.
            raise ValueError(
                f"the environment variable {settings.hmac_key_env} holds {len(key)} "
                f"bytes: a key needs at least {_MIN_KEY_BYTES} bytes"
                + ("" if hashed else " (or leave it unset)"))
        if hashed and not key:
            raise ValueError(
                f"action 'hash' for {', '.join(hashed)} needs a key of at least "
                f"{_MIN_KEY_BYTES} bytes in the environment variable "
                f"{settings.hmac_key_env}")
        # Also keys the Responses API's placeholders (see redact): without a key
        # configured, by one the process draws, the same for every reload.
        self._master = key or _PROCESS_KEY
        self._tenant_keys: dict[str, bytes] = {}

    # -- public --------------------------------------------------------------------------

    def redact(self, operation: str, doc: dict[str, Any], tenant: str,
               body: str = "") -> Redaction:
        """`body`: the JSON text `doc` was read from, for the placeholders it already
        holds where nothing is scanned."""
        if not self.settings.enabled:
            return _NOTHING
        walker = scope.WALKERS.get(operation)
        if walker is None:
            raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
        c = scope.Collector()
        walker(c, doc)
        if self._extra:
            c.dedupe()
            for path in self._extra:
                for p, node in scope.resolve(doc, path):
                    if scope.in_tool_list(p):
                        scope.tool_definitions(c, p, node)
                    else:
                        c.anything(p, node)
        if c.lone_surrogate:
            return Redaction(denied=(LONE_SURROGATE,))
        if c.too_deep:
            return Redaction(denied=(JSON_TOO_DEEP,))
        if not c.units:
            return Redaction(non_text_parts=c.non_text, data_chars=c.data_chars,
                             data_values=c.data_values) \
                if c.non_text or c.data_chars else _NOTHING

        segs: list[scope.Segment] = []
        starts: list[int] = []
        pieces: list[str] = []
        joins: list[int] = []  # where a unit's second, third ... segment starts
        parted: list[int] = []  # segments of units of several text parts (no context key)
        context = False  # some unit starts with a JSON key read as context
        pos = 0
        for u, unit in enumerate(c.units):
            if u:
                pieces.append("\x00")
                pos += 1
            first_seg = len(segs)
            for seg in unit:
                segs.append(seg)
                starts.append(pos)
                pieces.append(seg.text)
                pos += len(seg.text)
            if len(unit) > 1:
                joins.extend(starts[first_seg + 1:])
                if unit[0].context:
                    context = True
                else:
                    parted.extend(range(first_seg, len(segs)))
        joined = "".join(pieces)
        scanned = joined
        if joined.count("\x00") > len(c.units) - 1:
            scanned = "\x00".join(_unsplit("".join(seg.text for seg in unit))
                                   for unit in c.units)
        budget = Budget.for_text(len(joined))
        norm = normalize(scanned, budget)
        bounds = frozenset(map(norm.norm_offset, joins)) if joins else frozenset()
        res = self.scanner.scan(norm, budget, bounds)
        if c.incomplete:
            res.incomplete = True  # a JSON text was not read to its end
        hits = [Span(f.cls, norm.orig_start(f.start), norm.orig_end(f.end), f.value)
                for f in res.found]
        if parted:
            hits = self._with_parts_alone(hits, res, segs, starts, parted, joined)
        if not scanned.isascii() and INVISIBLE.search(scanned):
            hits = self._with_invisible_dropped(hits, res, scanned, joins, joined)

        def seg_of(start: int) -> scope.Segment:
            """The segment the original offset `start` falls in."""
            return segs[bisect_right(starts, start) - 1]

        if context:
            # What starts in a JSON key read as context is found in the key's own unit.
            hits = [h for h in hits if not seg_of(h.start).context]
        non_text = c.non_text + res.data_uris
        refuse = (INCOMPLETE,) if res.incomplete and self._refuse_incomplete else ()
        if not hits:
            if non_text or c.data_chars or res.incomplete:
                return Redaction(non_text_parts=non_text, data_chars=c.data_chars,
                                 data_values=c.data_values,
                                 incomplete=res.incomplete, denied=refuse)
            return _NOTHING
        if refuse:
            # The request will be refused: count what was found, build nothing.
            counts: dict[str, int] = {}
            for h in hits:
                for cls in (h.cls, *h.also):
                    counts[cls] = counts.get(cls, 0) + seg_of(h.start).copies
            denied = {c for c in counts if self._actions[c] == "deny"}
            return Redaction(counts=counts, denied=(*sorted(denied), *refuse),
                             non_text_parts=non_text, data_chars=c.data_chars,
                             data_values=c.data_values, incomplete=True)

        if body:
            # A placeholder written where nothing is scanned (a tool's description) is
            # read by the model too: a value numbered like it would be restored in place
            # of what the model says about it. JSON may write one with \u escapes.
            res.reserved.update(PLACEHOLDER_TEXT.findall(body))
            if "\\u00" in body:
                res.reserved.update(PLACEHOLDER_TEXT.findall(_JSON_ESCAPE.sub(
                    lambda m: chr(int(m[1], 16)), body)))
        mapping: dict[str, str] = {}
        counts = {}
        denied = set()
        # The Responses API keeps conversations at the provider (stored responses, item
        # references, conversations): placeholders numbered per request would give values
        # of different requests one `[EMAIL_1]` there, which the model conflates and a
        # restore answers with the wrong value. Keyed ones (as the hash action's) name one
        # value alike in every request.
        keyed = operation == "responses"
        tokens: dict[tuple[str, str, bool], str] = {}
        numbers: dict[str, int] = {}
        per_seg: dict[int, list[tuple[int, int, str]]] = {}
        for h in hits:
            s, e = h.start, h.end
            if e <= s:
                continue
            i = bisect_right(starts, s) - 1
            action = self._actions[h.cls]
            # The end-user fields (user, safety_identifier, prompt_cache_key) a provider
            # keeps per end user: numbered, every tenant's users were one `[EMAIL_1]`
            # there, and one user a new one in each request.
            path = segs[i].path
            stored = keyed or (path is not None and path[:1] in _STORED_ROOTS)
            key = (h.cls, h.value, stored)
            token = tokens.get(key)
            if token is None:
                token = self._token(h.cls, h.value, "hash" if stored and action == "mask"
                                    else action, tenant, numbers, res.reserved)
                tokens[key] = token
                mapping.setdefault(token, joined[s:e])
            # A JSON token scanned once for all its repeats occurs that many times.
            for cls in (h.cls, *h.also):
                counts[cls] = counts.get(cls, 0) + segs[i].copies
                if self._actions[cls] == "deny":
                    denied.add(cls)
            # Spread the replacement over the segments it covers (joined content parts):
            # the placeholder goes where the value starts, the rest of it is removed.
            first = True
            while i < len(segs) and starts[i] < e:
                seg_s = starts[i]
                seg_e = seg_s + len(segs[i].text)
                ls, le = max(s, seg_s) - seg_s, min(e, seg_e) - seg_s
                if le > ls or (first and le >= ls):
                    per_seg.setdefault(i, []).append((ls, le, token if first else ""))
                    first = False
                i += 1

        edits: dict[scope.Path, str] = {}
        # JsonArgs hashes by identity: one entry per arguments text.
        args_values: dict[scope.JsonArgs, dict[int, str]] = {}
        for i, changes in per_seg.items():
            seg = segs[i]
            new = scope.splice(seg.text, changes)
            if seg.args is None:
                assert seg.path is not None
                edits[seg.path] = new + seg.tail
                for path in seg.other_places():
                    edits[path] = new
            else:
                args_values.setdefault(seg.args, {})[seg.token] = new
                for more_args, token in seg.more or ():
                    args_values.setdefault(more_args, {})[token] = new
        try:
            for args, values in args_values.items():
                edits[args.path] = scope.splice_args(args, values)
            fields, renamed = scope.apply(doc, edits)
        except scope.KeyCollision:
            return Redaction(counts=counts, denied=(*sorted(denied), KEYS_COLLIDE),
                             non_text_parts=non_text, data_chars=c.data_chars,
                             data_values=c.data_values,
                             incomplete=res.incomplete)
        return Redaction(fields=fields, renamed=renamed, counts=counts,
                         denied=tuple(sorted(denied)) + refuse, non_text_parts=non_text,
                         data_chars=c.data_chars, data_values=c.data_values,
                         mapping=PlaceholderMap(mapping, _json_answer(operation, doc)),
                         incomplete=res.incomplete)

    def _with_parts_alone(self, hits: list[Span], res: ScanResult,
                          segs: list[scope.Segment], starts: list[int], parted: list[int],
                          joined: str) -> list[Span]:
        """`hits` (the joined text's findings) with those of the text parts read each on
        its own. Joining parts back to back finds a value split over two of them, but can
        also glue a value to the text of the part before or after, which then hides it
        ("id42" + "123-45-6789"). Offsets are the joined text's."""
        # Only a part's edges read differently on their own (a value glued to the next
        # part's text is at an edge): the middle of a long part is read once, joined.
        piece_starts: list[int] = []
        where: list[tuple[int, bool, bool]] = []  # (joined offset, cut before, cut after)
        pieces: list[str] = []
        pos = 0
        for i in parted:
            text = segs[i].text
            for lo, hi in _edges(text):
                piece_starts.append(pos)
                where.append((starts[i] + lo, lo > 0, hi < len(text)))
                pieces.append(_unsplit(text[lo:hi]))
                pos += hi - lo + 1
        text = "\x00".join(pieces)
        budget = Budget.for_text(len(text))
        norm = normalize(text, budget)
        alone = self.scanner.scan(norm, budget)
        res.incomplete = res.incomplete or alone.incomplete
        res.reserved |= alone.reserved
        parts: list[Span] = []
        for f in alone.found:
            s, e = norm.orig_start(f.start), norm.orig_end(f.end)
            k = bisect_right(piece_starts, s) - 1
            at, cut_before, cut_after = where[k]
            if (cut_before and s == piece_starts[k]) or (
                    cut_after and e == piece_starts[k] + len(pieces[k])):
                continue  # cut by the window, not by the part: the joined reading has it
            shift = at - piece_starts[k]
            parts.append(Span(f.cls, s + shift, e + shift, f.value))
        return _reconcile(hits, parts, joined)

    def _with_invisible_dropped(self, hits: list[Span], res: ScanResult, scanned: str,
                                joins: list[int], joined: str) -> list[Span]:
        """`hits` with those of a reading that drops tag characters: read as ASCII they
        find a text written in tags, dropped they find a value they sit inside. Offsets
        are the joined text's."""
        budget = Budget.for_text(len(scanned))
        norm = normalize(scanned, budget, drop_invisible=True)
        other = self.scanner.scan(norm, budget, frozenset(map(norm.norm_offset, joins)))
        res.incomplete = res.incomplete or other.incomplete
        res.reserved |= other.reserved
        return _reconcile(hits, [Span(f.cls, norm.orig_start(f.start), norm.orig_end(f.end),
                                      f.value) for f in other.found], joined)

    def scan_text(self, text: str) -> list[Span]:
        """Findings in one string, in its own offsets (for tools and tests)."""
        budget = Budget.for_text(len(text))
        norm = normalize(_unsplit(text), budget)
        res = self.scanner.scan(norm, budget)
        return [Span(f.cls, norm.orig_start(f.start), norm.orig_end(f.end), f.value)
                for f in res.found]

    # -- placeholders --------------------------------------------------------------------

    def _token(self, cls: str, value: str, action: str, tenant: str,
               numbers: dict[str, int], reserved: set[str]) -> str:
        label = cls.upper()
        if action == "hash":
            # surrogatepass: a lone surrogate from the JSON body may be part of a value.
            digest = hmac.new(self._tenant_key(tenant),
                              f"{cls}\x00{value}".encode("utf-8", "surrogatepass"),
                              hashlib.sha256).hexdigest()[:16]
            return f"[{label}:{digest}]"
        n = numbers.get(cls, 0)
        while True:
            n += 1
            token = f"[{label}_{n}]"
            if token not in reserved:
                numbers[cls] = n
                return token

    def _tenant_key(self, tenant: str) -> bytes:
        key = self._tenant_keys.get(tenant)
        if key is None:
            key = hmac.new(self._master, b"atp-redact-tenant\x00" + tenant.encode(),
                           hashlib.sha256).digest()
            if len(self._tenant_keys) >= _TENANT_KEYS_MAX:
                self._tenant_keys.clear()
            self._tenant_keys[tenant] = key
        return key

