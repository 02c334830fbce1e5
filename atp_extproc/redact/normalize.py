"""Normalise text for detection, keeping a map back to the original offsets.

Detectors run on a normalised copy so that look-alike spellings match:
  - compatibility forms (NFKC, per character) that turn into ASCII letters, digits or the
    punctuation detectors use (`@ . - + ( ) / _ % [ ] # =`): fullwidth digits and at sign,
    circled and mathematical digits, ligatures;
  - any decimal digit (Arabic-Indic, Devanagari, ...) becomes its ASCII digit;
  - every default-ignorable code point (zero-width space/joiner, soft hyphen, bidi marks,
    BOM, variation selectors, fillers ...) and every control character but tab, newline,
    carriage return, NUL (the unit separator) and the separator-like ones is dropped;
    the separator-like controls (vertical tab, form feed, ESC, FS/GS/RS/US, NEL) become
    ' ', so the words around them stay apart; Unicode "tag" characters (U+E0020-E007E,
    invisible ASCII look-alikes) become ASCII, so a text written in them is read; as
    that hides a value one sits inside (a card with a tag between its groups),
    `drop_invisible` drops them instead, for a second reading of a text that holds
    them (`INVISIBLE`);
  - every space separator (NBSP, narrow NBSP, ideographic space ...) becomes ' ', every
    dash (hyphens, minus sign) becomes '-'; where those spaces were is kept
    (`Normalized.soft`);
  - combining marks right after an ASCII character are dropped ("4̲1̲1̲1̲");
  - literal escapes are decoded: JSON `\\uXXXX`, HTML `&#64;` / `&#x40;`, and `%40`.
Replacement spans are then mapped back, so the original text is replaced exactly where
the normalised match was, and nothing around it changes.

Cost: pure-ASCII text without escapes or control characters is returned as is (one
`isascii` check and one RE2 search). Otherwise a
single linear pass of a one-character-class regex finds the characters that may change
(prose in any script hits almost none of them), and only those are looked at. Same-length
replacements need no offset bookkeeping; only deletions and escapes record a change.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from bisect import bisect_left, bisect_right
from functools import lru_cache

import re2

from atp_extproc.redact.re2util import re2_options, search, spans

_RELEVANT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                      "@.-+()/_%[]#= ")
# Combining marks used to decorate or obfuscate ASCII (not the vowel signs of Indic or
# Thai scripts, which are everywhere in those languages and never sit on ASCII).
_MARK_RANGES = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF),
                (0xFE00, 0xFE0F), (0xFE20, 0xFE2F))
# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties): rendered as nothing, so
# one inside a value hides it from the detectors and not from the reader. Unassigned ones
# are included: renderers must show them as nothing too.
_IGNORABLE_RANGES = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
                     (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
                     (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
                     (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                     (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
_TAGS = (0xE0020, 0xE007E)
# The characters a text is read twice for (`drop_invisible`): the tags.
INVISIBLE = re.compile(f"[{chr(_TAGS[0])}-{chr(_TAGS[1])}]")
# Control characters that separate what is around them (a Word line break, a page break,
# ESC of a colour code, the information separators, NEL): they become ' '.
_SEPARATORS = (0x0B, 0x0C, *range(0x1B, 0x20), 0x85)
# Other control characters but tab, newline, carriage return and NUL (which joins units):
# dropped.
_CONTROLS = tuple(cp for cp in (*range(0x01, 0x09), *range(0x0E, 0x20), *range(0x7F, 0xA0))
                  if cp not in _SEPARATORS)
# What makes pure-ASCII text need normalising: escapes and control characters.
_ASCII_HOT = re2.compile(r"\\u|&#|%40|[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]", re2_options())
# The ASCII separators, one byte each in UTF-8 (never part of a multi-byte sequence): a
# `bytes.translate` turns them all into spaces at memory speed, offsets unchanged. Looked
# for one by one (memchr: seven of those cost less than one RE2 pass over UTF-8).
_ASCII_SEP = tuple(bytes((b,)) for b in _SEPARATORS if b < 0x80)
_ASCII_SEP_TABLE = bytes.maketrans(bytes(b for b in _SEPARATORS if b < 0x80),
                                   b" " * sum(1 for b in _SEPARATORS if b < 0x80))
_ASCII_REST = re2.compile(r"\\u|&#|%40|[\x01-\x08\x0e-\x1a\x7f]", re2_options())
_ESC_U = re.compile(r"\\u([0-9a-fA-F]{4})")
_ESC_HTML = re.compile(r"&#(?:[xX]([0-9a-fA-F]{1,6})|([0-9]{1,7}));")


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, str], re.Pattern[str], frozenset[str], frozenset[str],
                      re.Pattern[str]]:
    trans: dict[str, str] = {}
    latin: set[str] = set()
    soft: set[str] = set()
    for block in (range(0x80, 0x20000), range(0xE0000, 0xE1000)):
        for cp in block:
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if cat in ("Cn", "Co", "Cs"):
                continue
            if cat in ("Lu", "Ll", "Lt") and unicodedata.name(ch, "").startswith("LATIN "):
                latin.add(ch)
            if _TAGS[0] <= cp <= _TAGS[1]:
                trans[ch] = chr(cp - 0xE0000)
            elif cat == "Cf":
                trans[ch] = ""
            elif cat == "Zs":
                trans[ch] = " "
                soft.add(ch)
            elif cat == "Pd" or ch in "\u2212\u02d7":
                trans[ch] = "-"
            elif cat == "Nd":
                trans[ch] = str(unicodedata.digit(ch))
            elif cat not in ("Mn", "Me"):
                n = unicodedata.normalize("NFKC", ch)
                if n != ch and n and len(n) <= 4 and all(c in _RELEVANT for c in n):
                    trans[ch] = n
    ignorable = {chr(cp) for lo, hi in _IGNORABLE_RANGES for cp in range(lo, hi + 1)
                 if not _TAGS[0] <= cp <= _TAGS[1]}
    for ch in (*ignorable, *map(chr, _CONTROLS)):
        trans[ch] = ""
    for cp in _SEPARATORS:
        trans[chr(cp)] = " "
    # Ideographic full stops: UTS #46 reads them as dots in a domain name (张伟@公司。中国).
    trans["\uff61"] = trans["\u3002"] = "."
    # Ignorable marks (variation selectors, CGJ) are dropped wherever they are.
    marks = frozenset(chr(cp) for lo, hi in _MARK_RANGES for cp in range(lo, hi + 1)
                      if unicodedata.category(chr(cp)) in ("Mn", "Me")) - ignorable
    # One RE2 character class (a DFA: ~1 ns a byte whatever the class size) finds every
    # character that may change; everything else is copied untouched.
    hot_chars = [*trans, *marks, "\\", "&", "%"]
    hot = re2.compile(f"[{_char_class(hot_chars)}]+", re2_options())
    return trans, hot, frozenset(latin), marks, re.compile(f"[{''.join(sorted(soft))}]+")


def _char_class(chars) -> str:
    """A compact regex character class body for a set of characters."""
    cps = sorted(set(ord(c) for c in chars))
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = cps[i], cps[j]
        parts.append(_esc(lo) if lo == hi else f"{_esc(lo)}-{_esc(hi)}")
        i = j + 1
    return "".join(parts)


def _esc(cp: int) -> str:
    return f"\\x{{{cp:x}}}"  # RE2 syntax


def latin_letters() -> frozenset[str]:
    return _tables()[2]


def warm() -> None:
    """Build the tables now (≈0.2 s, once per process) rather than on the first request."""
    _tables()


_NONE: list[int] = []


class Normalized:
    """The normalised text and the map from its offsets to the original's.

    `soft`: the (start, end) normalised offsets, ascending, of runs of spaces that were
    another space separator than ' ' (NBSP ...). Rendered alike, they are a word break to
    a reader; inside a token they are a paste artefact, which the secret detectors look
    through.
    """

    __slots__ = ("_n_ends", "_n_starts", "_o_ends", "_o_starts", "soft", "text")

    def __init__(self, text: str, changes: list[tuple[int, int, int, int]] | None = None,
                 soft: list[tuple[int, int]] | None = None):
        self.text = text
        self.soft = soft or _NONE
        if changes:
            self._o_starts = [c[0] for c in changes]
            self._o_ends = [c[1] for c in changes]
            self._n_starts = [c[2] for c in changes]
            self._n_ends = [c[3] for c in changes]
        else:
            self._o_starts = self._o_ends = self._n_starts = self._n_ends = _NONE

    def orig_start(self, p: int) -> int:
        """Original offset where a span starting at normalised offset `p` starts."""
        i = bisect_right(self._n_starts, p) - 1
        if i < 0:
            return p
        if p < self._n_ends[i]:
            return self._o_starts[i]
        return p + self._o_ends[i] - self._n_ends[i]

    def norm_offset(self, o: int) -> int:
        """Normalised offset of original offset `o` (where what starts there went)."""
        i = bisect_right(self._o_starts, o) - 1
        if i < 0:
            return o
        if o < self._o_ends[i]:
            return self._n_starts[i]
        return o + self._n_ends[i] - self._o_ends[i]

    def orig_end(self, p: int) -> int:
        """Original offset where a span ending (exclusive) at `p` ends."""
        i = bisect_left(self._n_starts, p) - 1
        if i < 0:
            return p
        if p <= self._n_ends[i]:
            return self._o_ends[i]
        return p + self._o_ends[i] - self._n_ends[i]


def normalize(text: str, budget=None, drop_invisible: bool = False) -> Normalized:
    """Normalise `text`. `budget` (detectors.Budget) is charged one unit per run of
    characters that may change (a translation or a deletion, about a microsecond), and one
    more and half a unit per character for a run walked character by character; when it
    runs out the rest is left as it is and the budget says so (the caller then reports the
    scan as incomplete). `drop_invisible`: tag characters are dropped, not read as
    ASCII."""
    if text.isascii():
        data = text.encode()
        if search(_ASCII_HOT, data) is None:
            return Normalized(text)
        if any(sep in data for sep in _ASCII_SEP):
            data = data.translate(_ASCII_SEP_TABLE)
            text = data.decode()
            if search(_ASCII_REST, data) is None:
                return Normalized(text)
    else:
        data = text.encode("utf-8", "surrogatepass")
        # (The loop below turns them into spaces too, a run at a time: only a long text
        # full of them, a colour log, needs this; a short one is not worth the look.)
        if len(data) > 4096 and any(sep in data for sep in _ASCII_SEP):
            data = data.translate(_ASCII_SEP_TABLE)
            text = data.decode("utf-8", "surrogatepass")
    trans, hot, _, marks, soft = _tables()
    table = _translate_table()
    if drop_invisible:
        trans, table = _tags_dropped()
    out = _Out(text)
    byte_at = 0  # byte offset ...
    char_at = 0  # ... and the character offset it corresponds to
    for m in spans(hot, data):
        b0, b1 = m[0]
        char_at += len(data[byte_at:b0].decode("utf-8", "surrogatepass"))
        i = char_at
        char_at += len(data[b0:b1].decode("utf-8", "surrogatepass"))
        byte_at = b1
        j = char_at
        if j <= out.pos:
            continue  # inside an escape already decoded
        if budget is not None and not budget.spend(1):
            break
        i = max(i, out.pos)
        run = text[i:j]
        if "\\" not in run and "&" not in run and "%" not in run:
            new = run.translate(table)
            if len(new) == len(run) and (j >= len(text) or text[j] not in marks):
                if marks.isdisjoint(run):
                    if " " in new:
                        # Python work per run of them: paid as characters walked one by one.
                        marked = out.mark_soft(i, run, soft)
                        if budget is not None and not budget.spend(marked // 2):
                            break
                    out.put(i, j, new)  # same length: offsets unchanged
                    continue
            elif not new and (j >= len(text) or text[j] not in marks):
                out.put(i, j, "")  # a run of invisible characters
                continue
        # About a microsecond a character in Python: paid by the character, so one long
        # run (megabytes of ligatures or '%') cannot get that work for one unit.
        if budget is not None and not budget.spend(1 + (j - i) // 2):
            break
        _slow(text, i, j, out, trans, marks, soft)
    return out.result()


class _Out:
    """The normalised text being built and its offset changes."""

    __slots__ = ("changes", "pieces", "pos", "shift", "soft", "text")

    def __init__(self, text: str):
        self.text = text
        self.pieces: list[str] = []
        self.changes: list[tuple[int, int, int, int]] = []
        self.soft: list[tuple[int, int]] = []
        self.pos = 0  # original offset copied up to
        self.shift = 0  # normalised offset minus original offset, at `pos`

    def put(self, i: int, end: int, new: str) -> None:
        self.pieces.append(self.text[self.pos:i])
        self.pieces.append(new)
        if end - i != len(new):
            self.changes.append((i, end, i + self.shift, i + self.shift + len(new)))
            self.shift += len(new) - (end - i)
        self.pos = end

    def mark_soft(self, i: int, run: str, soft: re.Pattern[str]) -> int:
        """Record the runs of soft spaces in `run`, about to be put at original offset `i`;
        how many."""
        at = i + self.shift
        runs = self.soft
        count = 0
        for m in soft.finditer(run):
            s, e = at + m.start(), at + m.end()
            if runs and runs[-1][1] == s:
                runs[-1] = (runs[-1][0], e)
            else:
                runs.append((s, e))
            count += 1
        return count

    def result(self) -> Normalized:
        if not self.pieces:
            return Normalized(self.text)
        self.pieces.append(self.text[self.pos:])
        return Normalized("".join(self.pieces), self.changes, self.soft)


def _slow(text: str, i: int, j: int, out: _Out, trans: dict[str, str],
          marks: frozenset[str], soft: re.Pattern[str]) -> None:
    """Character by character: escapes, marks, and runs that mix lengths."""
    n = len(text)
    while i < j:
        if i < out.pos:
            i = out.pos
            continue
        ch = text[i]
        end = i + 1
        new: str | None = None
        if ch == "\\":
            esc = _ESC_U.match(text, i)
            if esc is not None:
                new = _decode(int(esc.group(1), 16))
                end = esc.end()
        elif ch == "&":
            esc = _ESC_HTML.match(text, i)
            if esc is not None:
                hexa, dec = esc.groups()
                new = _decode(int(hexa, 16) if hexa else int(dec))
                end = esc.end()
        elif ch == "%":
            if text.startswith("%40", i):
                new, end = "@", i + 3
        elif ch in marks:
            if i > 0 and "\x21" <= text[i - 1] <= "\x7e":
                new = ""
        else:
            new = trans.get(ch)
        if new is None:
            i += 1
            continue
        if new and new in trans:  # an escape for a character that itself normalises
            out.mark_soft(i, new, soft)
            new = trans[new]
        elif new == " ":
            out.mark_soft(i, ch, soft)
        while end < n and text[end] in marks:
            end += 1  # marks on a replaced character go with it
        out.put(i, end, new)
        i = end


@lru_cache(maxsize=1)
def _translate_table() -> dict[int, str]:
    return _ordinals(_tables()[0])


@lru_cache(maxsize=1)
def _tags_dropped() -> tuple[dict[str, str], dict[int, str]]:
    trans = {**_tables()[0], **{chr(cp): "" for cp in range(_TAGS[0], _TAGS[1] + 1)}}
    return trans, _ordinals(trans)


def _ordinals(trans: dict[str, str]) -> dict[int, str]:
    """`trans` as str.translate takes it."""
    return {ord(k): v for k, v in trans.items()}


def _decode(cp: int) -> str | None:
    if cp > sys.maxunicode or 0xD800 <= cp <= 0xDFFF or cp == 0:
        return None
    return chr(cp)
