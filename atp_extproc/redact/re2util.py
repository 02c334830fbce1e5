"""RE2 options as the redactor uses them, and thin, fast iteration over matches on bytes.

The `re2` module's own `finditer` builds a match object and maps offsets for every match;
on bytes input the offsets need no mapping, so calling the compiled RE2 object directly
halves the per-match cost. Falls back to the public API if the internals ever move.
"""

from __future__ import annotations

from collections.abc import Iterator

import re2

try:
    from re2 import _re2

    _UNANCHORED = _re2.RE2.Anchor.UNANCHORED
except (ImportError, AttributeError):  # pragma: no cover
    _UNANCHORED = None

Spans = list[tuple[int, int]]


def re2_options(case_sensitive: bool = True, max_mem: int = 64 << 20) -> re2.Options:
    """Options for one pattern or Set: a memory cap, and errors raised rather than logged
    (a bad custom pattern is reported to the config loader, not to stderr)."""
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = case_sensitive
    options.max_mem = max_mem
    return options


def spans(rx, data: bytes, pos: int = 0) -> Iterator[Spans]:
    """Non-overlapping matches of `rx` in `data` from `pos`: each a list of (start, end)
    per group, group 0 first, (-1, -1) for a group that did not take part."""
    inner = getattr(rx, "_regexp", None)
    if _UNANCHORED is None or inner is None:  # pragma: no cover
        for m in rx.finditer(data, pos):
            yield [m.span(g) for g in range(rx.groups + 1)]
        return
    end = len(data)
    match = inner.Match
    while pos <= end:
        found = match(_UNANCHORED, data, pos, end)
        s, e = found[0]
        if s == -1:
            return
        yield found
        pos = e if e > s else e + 1


def search(rx, data: bytes, pos: int = 0) -> Spans | None:
    """The first match of `rx` in `data` from `pos`, as `spans` gives it, or None."""
    inner = getattr(rx, "_regexp", None)
    if _UNANCHORED is None or inner is None:  # pragma: no cover
        return next(spans(rx, data, pos), None)
    found = inner.Match(_UNANCHORED, data, pos, len(data))
    return None if found[0][0] == -1 else found
