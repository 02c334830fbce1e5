"""The `policy:` section and `policies:` entries of atp.yaml, and loading them with lines.

Policies live in atp.yaml (`policies:`) or in files it includes (`policy.include`, globs
relative to atp.yaml, each holding `policies:`). Every problem found while loading names
the file and the line, so `atp-extproc check` can print `file:line: reason`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
import sys
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from atp_extproc.settings_types import Frozen, Items, problem_reason

# `team.rule`: a namespace, a dot, a name; lowercase so ids compare and grep cleanly.
POLICY_ID = re.compile(r"^[a-z][a-z0-9_-]{0,63}(\.[a-z][a-z0-9_-]{0,63}){1,3}$")
# Ids the engine itself uses in decisions (default deny, empty candidate set).
RESERVED_NAMESPACE = "atp"
DATA_CLASS = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

Effect = Literal["deny", "allow", "restrict", "redact", "tools"]
Mode = Literal["dry_run", "enforce"]


class PolicySpec(Frozen):
    """One policy: a CEL condition and what happens when it is true."""

    # Checked by the compiler (namespace, duplicates) so `check` reports it with a line.
    id: Annotated[str, Field(min_length=1, max_length=200)]
    description: str = ""
    owner: str = ""
    # CEL; true means "the effect applies" (deny: deny; allow: allow; restrict: remove this
    # candidate; redact: require the data classes; tools: this tool is out of scope).
    expression: Annotated[str, Field(min_length=1, max_length=4096)]
    effect: Effect
    mode: Mode = "enforce"
    # What an evaluation error does: deny the request (fail closed), skip the policy, or
    # apply the effect as if the condition were true.
    on_error: Literal["deny", "skip", "apply"] = "deny"
    # Shown to the client on deny (403) and in decision records: write it for a human.
    message: Annotated[str, Field(max_length=500)] = ""
    # redact: the data classes that must be redacted before the request leaves.
    data_classes: Items[Annotated[str, Field(pattern=DATA_CLASS.pattern)]] = ()
    # tools: what happens to a tool outside the scope: the request is denied, or the tool
    # is removed from the request's `tools` before it leaves.
    tool_action: Literal["deny", "strip"] | None = None

    @model_validator(mode="after")
    def _effect_fields(self) -> PolicySpec:
        if self.effect == "redact" and not self.data_classes:
            raise ValueError("a redact policy must list data_classes")
        if self.effect != "redact" and self.data_classes:
            raise ValueError("data_classes only applies to effect: redact")
        if self.effect != "tools" and self.tool_action is not None:
            raise ValueError("tool_action only applies to effect: tools")
        if self.effect == "allow" and self.on_error == "apply":
            raise ValueError("on_error: apply would let an allow policy grant access on an "
                             "error; use deny or skip")
        return self

    @property
    def action(self) -> str:
        return self.tool_action or "deny"


class PolicySettings(Frozen):
    """The `policy:` section of atp.yaml."""

    # per_policy: each policy's own mode; dry_run / enforce: the switch for all of them.
    # Rollout: dry_run → per_policy with the critical denies on enforce → enforce.
    mode: Literal["per_policy", "dry_run", "enforce"] = "per_policy"
    # What a request gets when no allow policy matched and nothing denied it.
    default: Literal["allow", "deny"] = "allow"
    # Files (globs) with more `policies:`, relative to atp.yaml.
    include: Items[Annotated[str, Field(min_length=1)]] = ()
    # context.environment: dev | staging | prod ...
    environment: str = ""

    @field_validator("include")
    @classmethod
    def _globs(cls, include: tuple[str, ...]) -> tuple[str, ...]:
        if any("\x00" in pattern for pattern in include):  # glob raises on it
            raise ValueError("a path cannot hold a NUL character")
        return include

    def effective_mode(self, spec: PolicySpec) -> Mode:
        return spec.mode if self.mode == "per_policy" else self.mode


# -- YAML with line numbers -----------------------------------------------------------


class LineDict(dict):
    """A mapping that remembers where it and each of its keys came from."""

    line: int = 0
    key_lines: dict[Any, int]
    value_nodes: dict[Any, yaml.Node]


class LineList(list):
    line: int = 0
    item_lines: list[int]


MERGE_TAG = "tag:yaml.org,2002:merge"


_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
# YAML 1.1's `=` (a "value key"), which PyYAML resolves and then cannot build: a plain
# string in YAML 1.2 (`environment: =` was an error about a constructor).
_VALUE_TAG = "tag:yaml.org,2002:value"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's plain scalars, where YAML 1.1 reads more into them: booleans are true/false
# alone (YAML 1.1's yes/no/on/off made `mode: off` a boolean, refused as "should be
# 'off'", and the region NO (Norway) false); 017 is 17 (1.1: 15, an octal), and 1:30 and
# 1_000 are words (1.1: 90, minutes and seconds, and 1000); nothing is a date (an
# unquoted 2026-13-01 was a YAML error without a path, and 2026-01-01 a date no field
# takes).
_REGEXPS_12 = {
    _BOOL_TAG: re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    _INT_TAG: re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    _FLOAT_TAG: re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?[0-9]+[eE][-+]?[0-9]+"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
}
_IMPLICIT_RESOLVERS = {
    first: [(tag, _REGEXPS_12.get(tag, regexp)) for tag, regexp in resolvers
            if tag not in (_TIMESTAMP_TAG, _VALUE_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _yaml_12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text[:2] in ("0o", "0x"):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _unprintable(exc: yaml.reader.ReaderError, text: str) -> yaml.MarkedYAMLError:
    """A character YAML refuses (a NUL of a file written part way, a pasted ESC) as a
    marked error. PyYAML's reader walks the text before it, so line and column count as
    in its other marks (a BOM, a lone CR)."""
    reader = yaml.reader.Reader(text[:exc.position])
    reader.forward(exc.position)
    mark = reader.get_mark()
    kind = "control character" if unicodedata.category(chr(exc.character)) == "Cc" \
        else "character"
    return yaml.MarkedYAMLError(
        problem=f"{kind} U+{exc.character:04X} at column {mark.column + 1}; YAML allows none",
        problem_mark=mark)


class KeyCheckingLoader(yaml.SafeLoader):
    """A SafeLoader that notes every key a mapping gives twice (`duplicates`: the later
    key's node, and the key), which YAML would silently settle by keeping the last.

    Keys merged in by `<<: *anchor` are not the mapping's own: its own override them and,
    from `<<: [*a, *b]`, a's override b's (YAML 1.1 merge keys). PyYAML's own merging is
    not used: it keeps the first of two equal keys only when Python happens to share
    their string, so which value won depended on the key's length.
    """

    yaml_implicit_resolvers = _IMPLICIT_RESOLVERS

    def __init__(self, stream: str) -> None:
        try:
            super().__init__(stream)
        except yaml.reader.ReaderError as exc:
            # Raised while the loader is built, with an offset but no line: as a marked
            # error it is caught and placed as every other YAML error is.
            raise _unprintable(exc, stream) from None
        self.yaml_constructors = {**self.yaml_constructors, _INT_TAG: _yaml_12_int}
        self.duplicates: list[tuple[yaml.Node, Any]] = []
        # Merging rewrites a node's pairs in place, and a node is flattened again when it
        # is built or merged elsewhere: only the first time are they its own.
        self._flattened: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Puts the pairs merge keys bring before the mapping's own, lowest precedence
        first: a mapping is built keeping a key's last value."""
        if id(node) in self._flattened:
            return
        self._flattened.add(id(node))
        seen: set[Any] = set()
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                key: Any = "<<"
                merged = self._merged(node, value_node) + merged
            else:
                key = self.construct_object(key_node)
                own.append((key_node, value_node))
            try:
                hash(key)
            except TypeError:   # `? [a, b]`: `in seen` would raise
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark) from None
            if key in seen:
                self.duplicates.append((key_node, key))
            seen.add(key)
        node.value = merged + own

    def _merged(self, node: yaml.MappingNode,
                value: yaml.Node) -> list[tuple[yaml.Node, yaml.Node]]:
        """The pairs `<<: value` brings, lowest precedence first."""
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"a merge key takes a mapping or a list of mappings, not a {source.id}",
                    source.start_mark)
            self.flatten_mapping(source)
            if any(key.tag == MERGE_TAG for key, _ in source.value):
                # Still being flattened: the mapping merges itself, or one that holds it.
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "a mapping cannot merge itself", source.start_mark)
            pairs += source.value
        return pairs


class _LineLoader(KeyCheckingLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode):
    data = LineDict()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    data.value_nodes = {}
    yield data
    # Merged keys come first, so the mapping's own override them.
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
        data.value_nodes[key] = value_node


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode):
    data = LineList()
    data.line = node.start_mark.line + 1
    data.item_lines = [child.start_mark.line + 1 for child in node.value]
    yield data
    data.extend(loader.construct_object(child, deep=True) for child in node.value)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    reason: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        tag = "" if self.severity == "error" else "warning: "
        path = f"{self.path}: " if self.path else ""
        return f"{where}: {tag}{path}{self.reason}"


def is_policy_file(raw: Mapping[str, Any]) -> bool:
    """A file holding only `policy:`/`policies:`, as policy.include takes: it says
    nothing about models or redaction."""
    return not set(raw) - {"policy", "policies"}


class PolicyError(Exception):
    """Policies that cannot be loaded; `problems` is [(file, line, path, reason)]."""

    def __init__(self, problems: Iterable[Problem]):
        self.details = tuple(problems)
        self.problems = [(p.file, p.line, p.path, p.reason) for p in self.details]
        super().__init__("\n".join(str(p) for p in self.details))

    def config_problems(self) -> list[tuple[str, str]]:
        """The same problems in ConfigError's (path, reason) shape."""
        return [(f"{p.file}:{p.line}: {p.path}".rstrip(": "), p.reason) for p in self.details]


class _EnvoyLineLoader(_LineLoader):
    # Envoy's yaml-cpp reads unquoted yes/no/on/off as booleans, as YAML 1.1 does.
    yaml_implicit_resolvers = yaml.SafeLoader.yaml_implicit_resolvers

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.yaml_constructors = {**self.yaml_constructors,
                                  _INT_TAG: yaml.SafeLoader.yaml_constructors[_INT_TAG]}


def load_yaml(text: str, file: str, *, envoy: bool = False) -> tuple[Any, list[Problem]]:
    """Parse YAML keeping lines; duplicate keys are problems, not silent overwrites.
    `envoy`: read as Envoy reads its config (YAML 1.1 booleans)."""
    try:
        loader = (_EnvoyLineLoader if envoy else _LineLoader)(text)
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc)
        return None, [Problem(file, error_line(exc, text), "", f"invalid YAML: {reason}")]
    except RecursionError:
        return None, [Problem(file, 0, "", "invalid YAML: nested too deeply")]
    except (TypeError, ValueError) as exc:
        # A complex mapping key (unhashable) or a scalar such as an impossible date.
        return None, [Problem(file, 0, "", f"invalid YAML: {exc}")]
    # In the file's order: a mapping's keys are checked before those of the mappings in it.
    problems = [Problem(file, node.start_mark.line + 1, str(key),
                        "the key appears twice in this mapping")
                for node, key in sorted(loader.duplicates,
                                        key=lambda found: found[0].start_mark.index)]
    return doc, problems


def error_line(exc: yaml.YAMLError, text: str) -> int:
    """The line of a YAML error (0: none). At the end of the stream (an unclosed `[`, `{`
    or quote) the mark lies past the last line: the construct's opening is named
    instead, when it is in the file, or else the file's last line."""
    problem = getattr(exc, "problem_mark", None)
    if problem is None:
        return 0
    # YAML's own blanks: Python's take in control characters too (a form feed), which
    # YAML refuses where they stand.
    end = len(text.rstrip(" \t\r\n"))
    for mark in (problem, getattr(exc, "context_mark", None)):
        if mark is not None and mark.index < end:
            return int(mark.line) + 1
    return text.count("\n", 0, end) + 1


def include_matches(pattern: str) -> list[str]:
    """What a policy.include glob matches, sorted, as glob.glob (recursive) finds it but
    for `**`, which follows no link to a directory: two links back up (`a -> .`,
    `b -> .`) had it walk for ever, holding check, serve and every reload. Names that
    start with a dot match only where a wildcard part of the pattern does (`.*.yaml`)."""
    path = Path(pattern)
    root = Path(path.anchor or ".")
    relative = path.relative_to(root) if path.anchor else path
    given = set(relative.parts)
    # (A literal part that starts with a dot is a directory the config is in: no reason
    # to take every dot file under it.)
    dotted = any(part.startswith(".") and glob.has_magic(part) for part in given)
    return sorted(str(match) for match in root.glob(str(relative))
                  if dotted or not any(part.startswith(".") and part not in given
                                       for part in match.relative_to(root).parts))


def _unreadable(pattern: str) -> str:
    """Why a glob may match nothing though files are there: glob says nothing of a
    directory it may not read."""
    fixed = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    directory = Path(os.path.dirname(fixed) or ".")
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if directory.is_dir() and not os.access(directory, os.R_OK | os.X_OK):
        return f" ({directory} cannot be read: permission denied)"
    return ""


_ABSENT = object()


def located(doc: Any, loc: Iterable[Any]) -> tuple[str, int]:
    """A pydantic error location as the file wrote it (`routes[0].aliases.null`) and the
    line of the deepest node it reaches. Pydantic names a null key 'None' and a true key
    1, and marks a key's own problem with '[key]': the keys are taken from the document."""
    line = getattr(doc, "line", 0)
    node: Any = doc
    out = ""
    for part in loc:
        if isinstance(node, LineDict):
            key = next((k for k in node if k == part and type(k) is type(part)), _ABSENT)
            if key is _ABSENT:  # pydantic's spelling of a key that is no string
                key = next((k for k in node if not isinstance(k, str)
                            and (k == part or str(k) == part)), _ABSENT)
            if key is not _ABSENT:
                line, node = node.key_lines.get(key, line), node[key]
                out += f".{_written_key(key)}" if out else _written_key(key)
                continue
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line, node = node.item_lines[part], node[part]
            out += f"[{part}]"
            continue
        node = None
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out, line


def _written_key(key: Any) -> str:
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    # A key with an invisible character (a pasted zero-width space, a no-break space)
    # shows it: printed as it is, it read as the right key refused.
    return str(key) if not isinstance(key, str) or key.isprintable() else repr(key)


def line_of(doc: Any, loc: Iterable[Any]) -> int:
    """The line of the deepest node along `loc` (a pydantic error location)."""
    return located(doc, loc)[1]


# -- loaded policies ------------------------------------------------------------------


@dataclass(frozen=True)
class SourcedPolicy:
    """A validated policy and where it was written."""

    spec: PolicySpec
    file: str = "<policies>"
    line: int = 0
    # The file line the expression starts on, and for one written over several lines
    # (a `|` or `>` block, a folded plain scalar) where each file line starts in the
    # expression text: (offset, file line) pairs, so errors inside name their own line.
    expr_line: int = 0
    expr_lines: tuple[tuple[int, int], ...] = ()
    field_lines: dict[str, int] = field(default_factory=dict, compare=False)

    def file_line(self, offset: int) -> int:
        """The file line of the expression's character at `offset`."""
        at = bisect_right(self.expr_lines, (offset, sys.maxsize)) - 1
        return self.expr_lines[at][1] if at >= 0 else (self.expr_line or self.line)


@dataclass(frozen=True)
class LoadedPolicies:
    settings: PolicySettings
    policies: tuple[SourcedPolicy, ...]
    # Every file read (atp.yaml and includes), so a reload poller can watch them all.
    files: tuple[str, ...]
    digest: str
    problems: tuple[Problem, ...]
    # Raw atp.yaml sections other checks use (models for candidates, redaction switch).
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    # policy.include as the absolute globs read: a file that starts matching one is a
    # change too.
    include_globs: tuple[str, ...] = ()


def _policies_from(doc: Any, file: str, key_path: str, line: int = 0
                   ) -> tuple[list[SourcedPolicy], list[Problem]]:
    """The policies of `doc`, the value of the key `key_path` at `line`."""
    problems: list[Problem] = []
    out: list[SourcedPolicy] = []
    if doc is None:
        return out, problems
    if not isinstance(doc, list):
        return out, [Problem(file, getattr(doc, "line", 0) or line, key_path,
                             "must be a list of policies")]
    for i, entry in enumerate(doc):
        where = f"{key_path}[{i}]"
        line = doc.item_lines[i] if isinstance(doc, LineList) else 0
        if not isinstance(entry, dict):
            problems.append(Problem(file, line, where, "a policy must be a mapping"))
            continue
        try:
            spec = PolicySpec.model_validate(dict(entry))
        except ValidationError as exc:
            for err in exc.errors():
                sub, sub_line = located(entry, err["loc"])
                problems.append(Problem(
                    file, sub_line or line, f"{where}.{sub}" if sub else where,
                    problem_reason(err)))
            continue
        expr_line, expr_lines = line, ()
        if isinstance(entry, LineDict):
            node = entry.value_nodes.get("expression")
            if node is not None:
                expr_line = node.start_mark.line + (2 if node.style in ("|", ">") else 1)
                expr_lines = _line_starts(node, spec.expression, expr_line)
            fields = dict(entry.key_lines)
            # Each data class's own line, so a problem with one names it.
            classes = entry.get("data_classes")
            if isinstance(classes, LineList):
                fields.update((f"data_classes[{k}]", item_line)
                              for k, item_line in enumerate(classes.item_lines))
        else:
            fields = {}
        out.append(SourcedPolicy(spec, file, line, expr_line, expr_lines, fields))
    return out, problems


def _line_starts(node: Any, expression: str, first_line: int) -> tuple[tuple[int, int], ...]:
    """(offset in `expression`, file line) where each source line of a scalar written
    over several lines starts. Folding joins lines with spaces and block scalars lose
    their indentation, so each line's text is looked for in order; a line not found (an
    escape in a quoted scalar) is left out, and errors in it name the line before."""
    start, end = node.start_mark, node.end_mark
    buffer = getattr(start, "buffer", None)
    if not buffer or start.line == end.line:
        return ()
    lines = buffer[start.index:end.index].split("\n")
    if node.style in ("|", ">"):
        lines = lines[1:]  # the indicator's own line
    elif node.style in ('"', "'"):
        lines[0], lines[-1] = lines[0][1:], lines[-1][:-1]  # the quotes
    out: list[tuple[int, int]] = []
    pos = 0
    for k, text in enumerate(lines):
        content = text.strip()
        if not content:
            continue
        found = expression.find(content, pos)
        if found < 0:
            continue
        out.append((found, first_line + k))
        pos = found + len(content)
    return tuple(out)


def _settings_from(doc: Any, file: str) -> tuple[PolicySettings, list[Problem]]:
    raw = doc.get("policy") if isinstance(doc, dict) else None
    if raw is None:
        return PolicySettings(), []
    if not isinstance(raw, dict):
        return PolicySettings(), [Problem(file, line_of(doc, ["policy"]), "policy",
                                          "must be a mapping")]
    try:
        return PolicySettings.model_validate(dict(raw)), []
    except ValidationError as exc:
        return PolicySettings(), [
            Problem(file, line, path, problem_reason(e)) for e in exc.errors()
            for path, line in [located(doc, ["policy", *e["loc"]])]]


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system gave, held as surrogates
        return False
    return True


def load_text(text: str, file: str, *, base_dir: Path | None = None,
              overrides: Mapping[str, Any] | None = None) -> LoadedPolicies:
    """Policies from atp.yaml text (or a file holding only `policies:`), with includes.

    `overrides`: valid `policy:` fields that replace the file's (`policy test`'s
    `settings:`); the files read are always those of the file's own `include`.

    Never raises: problems are returned so `check` can list them all; `require_ok`
    turns them into a PolicyError.
    """
    base_dir = base_dir if base_dir is not None else directory_of(Path(file))
    hasher = hashlib.sha256(text.encode())
    doc, problems = load_yaml(text, file)
    files = [file]
    policies: list[SourcedPolicy] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        problems.append(Problem(file, 1, "", "the file must hold a mapping "
                                "(policy:, policies:, ...)"))
        doc = {}
    settings, more = _settings_from(doc, file)
    problems += more
    includes = settings.include
    if overrides:
        settings = PolicySettings.model_validate({**settings.model_dump(), **overrides})
    found, more = _policies_from(doc.get("policies"), file, "policies",
                                 line_of(doc, ["policies"]))
    policies += found
    problems += more
    # The directory taken as it is named: `team[prod]/` read its sibling `teamp/`.
    include_globs = tuple(os.path.join(glob.escape(str(base_dir)), pattern)
                          for pattern in includes)
    # A file two globs match is read once ("p/*.yaml" and "p/critical.yaml"): twice, its
    # policies would be duplicates of themselves. A glob over atp.yaml's own directory
    # ("*.yaml") passes it by: read as included, it was refused as holding more than
    # `policies:`, and each of its policies called a duplicate of itself.
    included: set[str] = {os.path.realpath(file)}
    for i, (pattern, absolute) in enumerate(zip(includes, include_globs, strict=True)):
        line = line_of(doc, ["policy", "include", i])
        try:
            matches = include_matches(absolute)
        except ValueError as exc:  # "a**b"
            problems.append(Problem(file, line, f"policy.include[{i}]", f"{pattern!r}: {exc}"))
            continue
        if not matches:
            problems.append(Problem(file, line, f"policy.include[{i}]",
                                    f"{pattern!r} matches no file{_unreadable(absolute)}"))
        for match in matches:
            if os.path.realpath(match) in included:
                continue
            included.add(os.path.realpath(match))
            path = Path(match)
            shown = _shown(path)
            if not _utf8(shown):
                # Never printed or logged as it is (no UTF-8 encodes it): named escaped.
                problems.append(Problem(file, line, f"policy.include[{i}]", (
                    f"{pattern!r} matches a file whose name is no UTF-8: "
                    f"{shown.encode('utf-8', 'backslashreplace').decode()} (rename it)")))
                continue
            inc_text, why = read_regular(path)
            if inc_text is None:
                problems.append(Problem(shown, 0, "", f"{why}: an included policy file is "
                                        "one" if why == NOT_REGULAR else why))
                continue
            files.append(shown)
            # Named as relative to atp.yaml's directory: the version must not change with
            # the working directory, nor with a ConfigMap's timestamped directory.
            hasher.update(b"\0" + os.path.relpath(match, base_dir).encode() + b"\0"
                          + inc_text.encode())
            inc_doc, more = load_yaml(inc_text, shown)
            problems += more
            refused, readable = _as_included(inc_doc, shown, parsed=not more)
            problems += refused
            if not readable:
                continue
            found, more = _policies_from(inc_doc.get("policies"), shown, "policies",
                                         line_of(inc_doc, ["policies"]))
            policies += found
            problems += more
    return LoadedPolicies(settings, tuple(policies), tuple(files), hasher.hexdigest()[:12],
                          tuple(problems), raw=dict(doc), include_globs=include_globs)


def _as_included(doc: Any, shown: str, parsed: bool) -> tuple[list[Problem], bool]:
    """What serve refuses in an included policy file (`doc` as YAML read it; `parsed`:
    without a YAML error), and whether its `policies:` can be read all the same."""
    # Mostly a file caught mid-write (truncated, then filled): loading it as "no
    # policies" would drop its denies until the next poll.
    if doc is None:
        return ([Problem(shown, 1, "", "the file is empty; an included policy file holds "
                         "`policies:` (`policies: []` for none)")] if parsed else []), False
    if isinstance(doc, dict) and "policies" in doc and doc["policies"] is None:
        return [Problem(shown, line_of(doc, ["policies"]) or 1, "policies",
                        "empty; `policies: []` says none")], False
    if not isinstance(doc, dict) or set(doc) - {"policies"}:
        return [Problem(shown, getattr(doc, "line", 1), "",
                        "an included policy file holds only `policies:`")], \
            isinstance(doc, dict)
    return [], True


def included_file_problems(path: str | Path) -> list[Problem]:
    """What serve refuses in the policy file at `path` when atp.yaml includes it, beside
    what load_file finds: checked or tested alone, an empty one, or one with `policy:`
    settings beside its `policies:`, passed, then failed the deploy (or its reload). (A
    file of `policy:` settings alone is an atp.yaml's part, as tests write it.)"""
    text, _ = read_regular(Path(path))
    if text is None:
        return []  # load_file says why
    doc, more = load_yaml(text, str(path))
    if isinstance(doc, dict) and "policy" in doc and "policies" not in doc:
        return []
    return _as_included(doc, str(path), parsed=not more)[0]


def directory_of(file: Path) -> Path:
    """The directory `file` is named in, absolute but with its symlinks kept: a Kubernetes
    ConfigMap's atp.yaml links into a timestamped directory that each update replaces,
    and paths relative to that would change (and vanish) with every update."""
    return file.absolute().parent


def _shown(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


NOT_REGULAR = "not a regular file (a pipe, a device or a directory)"


def read_regular(path: Path) -> tuple[str | None, str]:
    """The UTF-8 text of the file at `path`, or None and why it is none: it cannot be
    read, or it is no regular file (a FIFO would block the read: a reload's thread for
    good, and with it every request or the exit). stat, not exists(): that raises where
    the path cannot be looked up (a directory not ours to search, a name too long)."""
    try:
        if stat.S_ISREG(path.stat().st_mode):
            return path.read_text(encoding="utf-8"), ""
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read: {exc}"
    return None, NOT_REGULAR


def load_file(path: str | Path, overrides: Mapping[str, Any] | None = None
              ) -> LoadedPolicies:
    path = Path(path)
    text, why = read_regular(path)
    if text is None:
        return LoadedPolicies(PolicySettings.model_validate(dict(overrides or {})), (),
                              (str(path),), "", (Problem(str(path), 0, "", why),))
    return load_text(text, str(path), base_dir=directory_of(path), overrides=overrides)


def require_ok(loaded: LoadedPolicies) -> LoadedPolicies:
    errors = [p for p in loaded.problems if p.severity == "error"]
    if errors:
        raise PolicyError(errors)
    return loaded
