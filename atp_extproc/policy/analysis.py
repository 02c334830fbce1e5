"""What a checked CEL expression reads and how it is shaped, from its AST, once at load.

cel-expr-python serialises a compiled expression as a `cel.expr.CheckedExpr` (inside an
Any): the parsed AST with every node's type and every identifier resolved. From it:

- attributes_used: the attribute paths the expression reads (`request.data_classes`,
  `request.tool_details[].name`, `subject.claims.groups` ...);
- constant: whether the expression folds to always true / always false;
- costly shapes: a comprehension over a list or map nested inside another one (a tools
  policy's whole expression is inside one: it runs once per tool);
- errors: regexes built at run time;
- warnings: has() on a proto3 scalar, literals that name no known model, alias, route ...
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cel.expr import checked_pb2, syntax_pb2
from google.protobuf import any_pb2, descriptor_pool

ROOTS = frozenset({"subject", "request", "resource", "context", "tool"})
_UNKNOWN = object()
_COMPARE = {"_<_", "_<=_", "_>_", "_>=_"}
# The checked type of each node, by node id.
Types = Mapping[int, checked_pb2.Type]
# Types whose every value equals itself: a double can be NaN, and a dyn, a message or a
# container of them can hold one.
_REFLEXIVE_PRIMITIVES = frozenset({checked_pb2.Type.BOOL, checked_pb2.Type.INT64,
                                   checked_pb2.Type.UINT64, checked_pb2.Type.STRING,
                                   checked_pb2.Type.BYTES})
_REFLEXIVE_WELL_KNOWN = frozenset({checked_pb2.Type.TIMESTAMP, checked_pb2.Type.DURATION})
# String tests every string passes with an empty argument.
_EMPTY_ALWAYS_TRUE = frozenset({"startsWith", "endsWith", "contains"})
_NESTED = ("costly shape: a comprehension over a list or map nested inside another one "
           "(cost grows with the product of their sizes); restructure it, e.g. with `in` "
           "on one side")
# A value cel.bind builds from copies of other bound values: `cel.bind(b, a + a, ...)`
# twice over quadruples `a`, and 18 levels made one request cost 1 s and 1 GB.
MAX_BIND_COPIES = 1024
_BIND_COPIES = ("costly shape: cel.bind values built from copies of each other hold "
                "{copies} copies of what they read (cost doubles with each level); bind "
                "each value once and read it where it is needed")
_PER_TOOL = ("costly shape: a comprehension over a list or map in a tools policy, which "
             "runs once per tool of the request (cost grows with the number of tools times "
             "its size); use `in`, or decide what does not depend on `tool` once per "
             "request in a deny policy")


@dataclass
class Finding:
    offset: int  # code point offset in the expression
    reason: str
    severity: str = "error"


@dataclass
class Analysis:
    attributes_used: tuple[str, ...]
    roots: frozenset[str]
    constant: bool | None  # None: depends on the attributes
    findings: list[Finding] = field(default_factory=list)
    node_count: int = 0
    # Literal regex patterns (offset, pattern), checked against the engine's RE2 at load.
    patterns: list[tuple[int, str]] = field(default_factory=list)
    # Parts whose value is the same for every request (offset, CEL text): evaluated at
    # load, a part that fails fails every evaluation (an unknown timezone, a bad date).
    probes: list[tuple[int, str]] = field(default_factory=list)


def checked_expr(serialized: bytes) -> checked_pb2.CheckedExpr:
    wrapped = any_pb2.Any()
    wrapped.ParseFromString(serialized)
    checked = checked_pb2.CheckedExpr()
    if not wrapped.Unpack(checked):
        raise ValueError(f"unexpected serialised expression type {wrapped.type_url}")
    return checked


def offset_to_line_col(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    line = before.count("\n") + 1
    col = offset - (before.rfind("\n") + 1) + 1
    return line, col


class _Walker:
    def __init__(self, checked: checked_pb2.CheckedExpr,
                 known_values: Mapping[str, Iterable[str]], per_tool: bool):
        self.types = checked.type_map
        self.positions = checked.source_info.positions
        self.known = {k: frozenset(v) for k, v in known_values.items()}
        self.used: dict[str, None] = {}
        self.findings: list[Finding] = []
        self.patterns: list[tuple[int, str]] = []
        self.probes: list[tuple[int, str]] = []
        self.nodes = 0
        self.pool = descriptor_pool.Default()
        # A tools policy: the whole expression runs inside the loop over the tools.
        self.per_tool = per_tool
        # Map reads by a literal key, (map path, key) → (where, the map as the expression
        # writes it), and the keys the expression tests for (`'k' in m`, `has(m.k)`).
        self.map_reads: dict[tuple[str, str], tuple[int, str]] = {}
        self.map_guards: set[tuple[str, str]] = set()
        # Reads a has() makes before the one key it tests (`org` of has(m.org.x)).
        self.has_reads: set[tuple[str, str]] = set()
        # cel.bind's variables → how many copies of what they read each holds.
        self.bind_copies: dict[str, int] = {}
        # A map the expression writes, read by a key the request gives
        # (`{'alice': 4096}[subject.tenant]`): (where, the key as written, the map's
        # string keys, None for any other); what the expression tests with `in` (a
        # guard for such a key); and what it compares with `==`, to which strings (None
        # for anything else): a guard where one is a key of the map.
        self.literal_reads: list[tuple[int, str, frozenset[str | None]]] = []
        self.tested: set[str] = set()
        self.compared: dict[str, set[str | None]] = {}

    # -- paths ----------------------------------------------------------------------

    def path_of(self, e: syntax_pb2.Expr, scope: Mapping[str, str | None]) -> str | None:
        kind = e.WhichOneof("expr_kind")
        if kind == "ident_expr":
            name = e.ident_expr.name
            if name in scope:
                return scope[name]
            return name if name in ROOTS else None
        if kind == "select_expr":
            base = self.path_of(e.select_expr.operand, scope)
            return f"{base}.{e.select_expr.field}" if base else None
        if kind == "call_expr" and e.call_expr.function == "_[_]" and \
                len(e.call_expr.args) == 2:
            base = self.path_of(e.call_expr.args[0], scope)
            key = e.call_expr.args[1]
            if base and key.WhichOneof("expr_kind") == "const_expr" and \
                    key.const_expr.WhichOneof("constant_kind") == "string_value":
                return f"{base}.{key.const_expr.string_value}"
            return base
        return None

    def use(self, path: str | None) -> None:
        if path and not path.endswith("[]"):
            self.used.setdefault(path, None)

    # -- walk -----------------------------------------------------------------------

    def walk(self, e: syntax_pb2.Expr, scope: dict[str, str | None], loop_depth: int) -> None:
        self.nodes += 1
        kind = e.WhichOneof("expr_kind")
        if kind == "ident_expr":
            self.use(self.path_of(e, scope))
        elif kind == "select_expr":
            sel = e.select_expr
            path = self.path_of(e, scope)
            if path is not None:
                self.use(path)
                base = self.path_of(sel.operand, scope)
                if base is not None:
                    # `m.k` reads the key as m['k'] does, and has(m.k) tests for it as
                    # 'k' in m does: a key the config never fills is never there.
                    self._unknown_value(base + "{}", sel.field, e.id)
                if sel.test_only:
                    self._check_has(e)
                    if base is not None:
                        self.map_guards.add((base, sel.field))
                    # has() tests its last key only: reading the ones before it fails
                    # where they are absent (`has(m.a.b)` without `a`).
                    self._note_key_reads(sel.operand, scope, under_has=True)
                else:
                    self._note_key_reads(e, scope)
                # The operand chain is the path's own prefix: nothing else to read there.
                return
            self.walk(sel.operand, scope, loop_depth)
        elif kind == "call_expr":
            self._call(e, scope, loop_depth)
        elif kind == "list_expr":
            for item in e.list_expr.elements:
                self.walk(item, scope, loop_depth)
        elif kind == "struct_expr":
            for entry in e.struct_expr.entries:
                if entry.HasField("map_key"):
                    self.walk(entry.map_key, scope, loop_depth)
                self.walk(entry.value, scope, loop_depth)
        elif kind == "comprehension_expr":
            self._comprehension(e, scope, loop_depth)

    def _call(self, e: syntax_pb2.Expr, scope: dict[str, str | None], loop_depth: int) -> None:
        call = e.call_expr
        if self._probe(e):
            return
        if call.function == "_[_]":
            path = self.path_of(e, scope)
            base, key = call.args[0], call.args[1]
            written = _reference(key) if len(call.args) == 2 else None
            if (path is None and written is not None and self._literal_string(key) is None
                    and base.WhichOneof("expr_kind") == "struct_expr"
                    and not base.struct_expr.message_name
                    and not _every_bool(base.struct_expr)):
                self.literal_reads.append((e.id, written, frozenset(
                    self._literal_string(entry.map_key) for entry in base.struct_expr.entries)))
            if path is not None:
                self.use(path)
                self._check_known_key(call.args[0], call.args[1], scope, e.id)
                self._note_key_reads(e, scope)
                # A computed key may itself read attributes.
                self.walk(call.args[1], scope, loop_depth)
                return
        if call.function in ("_==_", "_!=_") and len(call.args) == 2:
            self._check_literal(call.args[0], call.args[1], scope, e.id)
            self._check_literal(call.args[1], call.args[0], scope, e.id)
            if call.function == "_==_":  # `subject.tenant == 'alice' && {...}[...]`
                for one, other in (call.args, reversed(call.args)):
                    compared = _reference(one)
                    if compared is not None:
                        self.compared.setdefault(_canonical(compared), set()).add(
                            self._literal_string(other))
        if call.function == "@in" and len(call.args) == 2:
            self._check_in(call.args[0], call.args[1], scope, e.id)
        if call.function == "matches":
            pattern = call.args[-1] if call.args else None
            literal = self._literal_string(pattern) if pattern is not None else None
            if literal is not None:
                self.patterns.append((self.positions.get(e.id, 0), literal))
            elif pattern is not None:
                # Refused: the request could choose the regex, each evaluation would
                # compile one, and its errors would be about the request's own text.
                self.findings.append(Finding(
                    self.positions.get(e.id, 0),
                    "matches() needs a literal pattern: one built at run time lets the "
                    "request choose the regex and compiles it per evaluation"))
        if call.HasField("target"):
            self.walk(call.target, scope, loop_depth)
        for arg in call.args:
            self.walk(arg, scope, loop_depth)

    def _probe(self, e: syntax_pb2.Expr) -> bool:
        """Note what of this call is the same for every request, for the engine to try;
        True when the whole call is (nothing below it reads an attribute)."""
        call = e.call_expr
        at = self.positions.get(e.id, 0)
        # A literal regex is checked as such (the walk goes on to it).
        text = unparse(e) if call.function != "matches" else None
        if text is not None:
            self.probes.append((at, text))
            return True
        args = list(call.args)
        if call.function in ("_/_", "_%_") and len(args) == 2 and \
                args[1].const_expr.WhichOneof("constant_kind") in ("int64_value",
                                                                  "uint64_value") and \
                _const(args[1]) == ("num", 0):  # a double 0 gives infinity, no error
            self.findings.append(Finding(at, "division by zero: fails on every evaluation"))
        if call.function in _TIME_PARTS and call.HasField("target") and len(args) == 1:
            zone = _text(args[0])
            if zone is not None:
                self.probes.append((at, f"timestamp('2000-01-01T00:00:00Z')."
                                        f"{call.function}({zone})"))
        return False

    def _comprehension(self, e: syntax_pb2.Expr, scope: dict[str, str | None],
                       loop_depth: int) -> None:
        comp = e.comprehension_expr
        rng = comp.iter_range
        self.walk(rng, scope, loop_depth)
        rng_type = self.types.get(rng.id)
        is_list = rng_type is not None and rng_type.HasField("list_type")
        base = self.path_of(rng, scope)
        inner = dict(scope)
        inner[comp.iter_var] = f"{base}[]" if base and is_list else base
        if comp.iter_var2:
            inner[comp.iter_var2] = f"{base}[]" if base else None
        # The macros start their accumulator from a literal; cel.bind's is the bound
        # value, which reads as what it was bound to.
        inner[comp.accu_var] = self.path_of(comp.accu_init, scope)
        self.walk(comp.accu_init, scope, loop_depth)
        if rng.WhichOneof("expr_kind") == "list_expr" and not rng.list_expr.elements:
            self._note_bind(comp.accu_var, comp.accu_init, e.id)
        # Any range the request sizes counts: a list, a map (metadata, data classes) or a
        # dyn claim; only a literal written in the policy has a size known at load.
        counted = rng.WhichOneof("expr_kind") not in ("list_expr", "struct_expr")
        # The tool's own fields (tool.arguments) are per tool: over all the tools their
        # costs add up rather than multiply.
        own_tool = self.per_tool and base is not None and base.split(".", 1)[0] == "tool"
        if counted and loop_depth - (1 if own_tool else 0) > 0:
            where = self.positions.get(e.id, self.positions.get(rng.id, 0))
            # Once per tool is bounded (tools are capped at 64): said, but no reason to
            # refuse a config that loaded before; a loop in a loop is refused.
            self.findings.append(Finding(where, _PER_TOOL, "warning")
                                 if self.per_tool and loop_depth == 1
                                 else Finding(where, _NESTED))
        depth = loop_depth + (1 if counted else 0)
        self.walk(comp.loop_condition, inner, depth)
        self.walk(comp.loop_step, inner, depth)
        self.walk(comp.result, inner, loop_depth)

    def _note_bind(self, name: str, value: syntax_pb2.Expr, expr_id: int) -> None:
        """cel.bind(name, value, ...): how many copies of what it reads `name` holds."""
        copies = sum(self.bind_copies.get(ident, 0) for ident in _idents(value))
        self.bind_copies[name] = max(copies, 1)
        if copies > MAX_BIND_COPIES and not any(
                f.reason.startswith(_BIND_COPIES[:40]) for f in self.findings):
            self.findings.append(Finding(self.positions.get(expr_id, 0),
                                         _BIND_COPIES.format(copies=copies)))

    # -- warnings -------------------------------------------------------------------

    def _check_has(self, e: syntax_pb2.Expr) -> None:
        operand_type = self.types.get(e.select_expr.operand.id)
        if operand_type is None or not operand_type.message_type:
            return
        try:
            desc = self.pool.FindMessageTypeByName(operand_type.message_type)
        except KeyError:
            return
        f = desc.fields_by_name.get(e.select_expr.field)
        if f is None or f.message_type is not None or f.is_repeated:
            return
        self.findings.append(Finding(
            self.positions.get(e.id, 0),
            f"has(…{e.select_expr.field}) on a scalar attribute is true only when it is not "
            "its zero value; compare the value instead", "warning"))

    def _literal_string(self, e: syntax_pb2.Expr) -> str | None:
        if e.WhichOneof("expr_kind") == "const_expr" and \
                e.const_expr.WhichOneof("constant_kind") == "string_value":
            return e.const_expr.string_value
        return None

    def _unknown_value(self, path: str, value: str, expr_id: int) -> None:
        known = self.known.get(path)
        if known is not None and value not in known:
            self.findings.append(Finding(
                self.positions.get(expr_id, 0),
                f"{path} is never {value!r} with this config (known: "
                f"{', '.join(sorted(known)) or 'none'})", "warning"))

    def _check_literal(self, attr: syntax_pb2.Expr, lit: syntax_pb2.Expr,
                       scope: Mapping[str, str | None], expr_id: int) -> None:
        value = self._literal_string(lit)
        path = self.path_of(attr, scope)
        if value is not None and path is not None:
            self._unknown_value(path.replace("[]", ""), value, expr_id)

    def _check_in(self, needle: syntax_pb2.Expr, hay: syntax_pb2.Expr,
                  scope: Mapping[str, str | None], expr_id: int) -> None:
        tested = _reference(needle)
        if tested is not None:
            self.tested.add(tested)
        path = self.path_of(needle, scope)
        if path is not None and hay.WhichOneof("expr_kind") == "list_expr":
            for item in hay.list_expr.elements:
                value = self._literal_string(item)
                if value is not None:
                    self._unknown_value(path.replace("[]", ""), value, item.id)
        value = self._literal_string(needle)
        hay_path = self.path_of(hay, scope)
        if value is not None and hay_path is not None:
            self._unknown_value(hay_path + "{}", value, expr_id)
            self.map_guards.add((hay_path, value))

    def _key_read(self, e: syntax_pb2.Expr) -> tuple[syntax_pb2.Expr, str] | None:
        """(operand, key) when `e` reads a literal key: `m.k` or `m['k']`."""
        kind = e.WhichOneof("expr_kind")
        if kind == "select_expr" and not e.select_expr.test_only:
            return e.select_expr.operand, e.select_expr.field
        if kind == "call_expr" and e.call_expr.function == "_[_]" and \
                len(e.call_expr.args) == 2:
            key = self._literal_string(e.call_expr.args[1])
            if key is not None:
                return e.call_expr.args[0], key
        return None

    def _note_key_reads(self, e: syntax_pb2.Expr, scope: Mapping[str, str | None],
                        under_has: bool = False) -> None:
        """Note each map key read along the chain `e` ends: `subject.claims.org.name`
        reads `org` of subject.claims, then `name` of subject.claims.org."""
        chain: list[tuple[syntax_pb2.Expr, syntax_pb2.Expr, str]] = []
        node = e
        while True:
            read = self._key_read(node)
            if read is not None:
                chain.append((node, *read))
                node = read[0]
            elif node.WhichOneof("expr_kind") == "call_expr" and \
                    node.call_expr.function == "_[_]" and len(node.call_expr.args) == 2:
                # Past a computed key or a list index the paths name the whole map or
                # list, not the value read: only the reads below it are known.
                chain.clear()
                node = node.call_expr.args[0]
            else:
                break
        if node.WhichOneof("expr_kind") != "ident_expr":
            return  # the chain starts at a call's result: no attribute path
        for read_node, operand, key in chain:
            path = self.path_of(operand, scope)
            # A value read out of a map (a JSON claim) is dyn: reading a key of it fails
            # like a map's where it is absent. A variable is left alone: its path is
            # the whole list or map it ranges over, not the value.
            keyed = self._is_map(operand) or (self._is_dyn(operand)
                                               and self._key_read(operand) is not None)
            if path is not None and keyed:
                self.map_reads.setdefault((path, key),
                                          (read_node.id, _reference(operand) or path))
                if under_has:
                    self.has_reads.add((path, key))

    def _is_map(self, e: syntax_pb2.Expr) -> bool:
        t = self.types.get(e.id)
        return t is not None and t.HasField("map_type")

    def _is_dyn(self, e: syntax_pb2.Expr) -> bool:
        t = self.types.get(e.id)
        return t is not None and t.HasField("dyn")

    def unguarded_map_reads(self) -> None:
        """A map read by a key the expression never tests for fails (an evaluation error)
        on every request without that key, and on_error (default deny) then decides it:
        `request.data_classes['email'] > 3` refuses every request without an e-mail."""
        for (path, key), (expr_id, written) in self.map_reads.items():
            if (path, key) not in self.map_guards:
                hint = " (has() tests only its last key)" \
                    if (path, key) in self.has_reads else ""
                self.findings.append(Finding(
                    self.positions.get(expr_id, 0),
                    f"{path}[{key!r}] is an evaluation error where the key is absent{hint}, "
                    f"and on_error then decides every such request: guard it "
                    f"({key!r} in {written} && ...)", "warning"))
        tested = {_canonical(t) for t in self.tested}
        for expr_id, key, keys in self.literal_reads:
            values = self.compared.get(_canonical(key), set())
            if _canonical(key) not in tested and not (
                    None in values or (values and None in keys) or values & keys):
                self.findings.append(Finding(
                    self.positions.get(expr_id, 0),
                    f"a map the expression writes, read by {key}, is an evaluation error "
                    f"where {key} is none of its keys, and on_error then decides every "
                    f"such request: guard it ({key} in {{...}} && ...)", "warning"))

    def _check_known_key(self, base: syntax_pb2.Expr, key: syntax_pb2.Expr,
                         scope: Mapping[str, str | None], expr_id: int) -> None:
        value = self._literal_string(key)
        path = self.path_of(base, scope)
        if value is not None and path is not None:
            self._unknown_value(path + "{}", value, expr_id)


# -- constant parts -----------------------------------------------------------------

# Timestamp accessors whose one argument is a timezone.
_TIME_PARTS = frozenset({"getFullYear", "getMonth", "getDate", "getDayOfMonth",
                         "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes",
                         "getSeconds", "getMilliseconds"})
_INFIX = {"_+_": "+", "_-_": "-", "_*_": "*", "_/_": "/", "_%_": "%", "_==_": "==",
          "_!=_": "!=", "_<_": "<", "_<=_": "<=", "_>_": ">", "_>=_": ">=",
          "_&&_": "&&", "_||_": "||", "@in": "in"}


def unparse(e: syntax_pb2.Expr) -> str | None:
    """CEL text of a call that reads no attribute (None for anything else): its value is
    the same for every request."""
    if e.WhichOneof("expr_kind") != "call_expr":
        return None
    return _text(e)


def _text(e: syntax_pb2.Expr) -> str | None:
    kind = e.WhichOneof("expr_kind")
    if kind == "const_expr":
        return _literal(e.const_expr)
    if kind == "list_expr":
        items = [_text(x) for x in e.list_expr.elements]
        return None if None in items else f"[{', '.join(items)}]"  # type: ignore[arg-type]
    if kind != "call_expr":
        return None  # an attribute, a variable, a macro
    call = e.call_expr
    args = [_text(a) for a in call.args]
    if None in args:
        return None
    fn = call.function
    if fn in _INFIX and len(args) == 2:
        return f"({args[0]} {_INFIX[fn]} {args[1]})"
    if fn in ("-_", "!_") and len(args) == 1:
        return f"({fn[0]}{args[0]})"
    if fn == "_[_]" and len(args) == 2:
        return f"{args[0]}[{args[1]}]"
    if fn == "_?_:_" and len(args) == 3:
        return f"({args[0]} ? {args[1]} : {args[2]})"
    if not fn.isidentifier() or fn.startswith("_"):
        return None
    if call.HasField("target"):
        target = _text(call.target)
        return None if target is None else f"{target}.{fn}({', '.join(args)})"  # type: ignore[arg-type]
    return f"{fn}({', '.join(args)})"  # type: ignore[arg-type]


def _every_bool(struct: Any) -> bool:
    """A map literal keyed by both booleans: read by any bool, it never misses."""
    keys = {entry.map_key.const_expr.bool_value for entry in struct.entries
            if entry.HasField("map_key") and entry.map_key.WhichOneof("expr_kind")
            == "const_expr" and entry.map_key.const_expr.HasField("bool_value")}
    return keys == {True, False}


_KEY_INDEX = re.compile(r"""\[(['"])([A-Za-z_][A-Za-z0-9_]*)\1\]""")


def _canonical(reference: str) -> str:
    """`subject.claims['org']` and `subject.claims.org` as one."""
    return _KEY_INDEX.sub(r".\2", reference)


def _idents(e: syntax_pb2.Expr) -> Iterator[str]:
    """The names `e` reads, once per reading."""
    stack = [e]
    while stack:
        node = stack.pop()
        if node.WhichOneof("expr_kind") == "ident_expr":
            yield node.ident_expr.name
        stack.extend(_exprs_in(node))


def _exprs_in(message: Any) -> Iterator[syntax_pb2.Expr]:
    """The expressions directly inside `message` (a call's arguments, a list's items)."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        for item in (value,) if hasattr(value, "ListFields") else value:
            if isinstance(item, syntax_pb2.Expr):
                yield item
            else:
                yield from _exprs_in(item)


def _reference(e: syntax_pb2.Expr) -> str | None:
    """CEL text of a variable or attribute and the fields and literal keys read from it
    (`t.arguments`, `subject.claims['org']`): a guard the author can paste, where the
    attribute path names a comprehension's variable `request.tool_details[]`."""
    kind = e.WhichOneof("expr_kind")
    if kind == "ident_expr":
        return e.ident_expr.name
    if kind == "select_expr" and not e.select_expr.test_only:
        base = _reference(e.select_expr.operand)
        return None if base is None else f"{base}.{e.select_expr.field}"
    if kind == "call_expr" and e.call_expr.function == "_[_]" and len(e.call_expr.args) == 2:
        base, key = _reference(e.call_expr.args[0]), _text(e.call_expr.args[1])
        return None if base is None or key is None else f"{base}[{key}]"
    return None


def _literal(c: syntax_pb2.Constant) -> str | None:
    kind = c.WhichOneof("constant_kind")
    if kind == "string_value":
        return json.dumps(c.string_value, ensure_ascii=False)
    if kind == "bool_value":
        return "true" if c.bool_value else "false"
    if kind == "int64_value":
        return str(c.int64_value)
    if kind == "uint64_value":
        return f"{c.uint64_value}u"
    if kind == "double_value":
        return repr(c.double_value) if math.isfinite(c.double_value) else None
    if kind == "null_value":
        return "null"
    if kind == "bytes_value":
        return 'b"' + "".join(f"\\x{b:02x}" for b in c.bytes_value) + '"'
    return None


# -- constant folding ---------------------------------------------------------------


def _const(e: syntax_pb2.Expr) -> Any:
    c = e.const_expr
    kind = c.WhichOneof("constant_kind")
    if kind == "bool_value":
        return ("bool", c.bool_value)
    if kind in ("int64_value", "uint64_value", "double_value"):
        return ("num", getattr(c, kind))
    if kind == "string_value":
        return ("str", c.string_value)
    if kind == "null_value":
        return ("null", None)
    if kind == "bytes_value":
        return ("bytes", c.bytes_value)
    return _UNKNOWN


def _same(a: syntax_pb2.Expr, b: syntax_pb2.Expr) -> bool:
    """Structural equality, ignoring node ids."""
    ka, kb = a.WhichOneof("expr_kind"), b.WhichOneof("expr_kind")
    if ka != kb:
        return False
    if ka == "const_expr":
        return a.const_expr == b.const_expr
    if ka == "ident_expr":
        return a.ident_expr.name == b.ident_expr.name
    if ka == "select_expr":
        return (a.select_expr.field == b.select_expr.field
                and a.select_expr.test_only == b.select_expr.test_only
                and _same(a.select_expr.operand, b.select_expr.operand))
    if ka == "call_expr":
        ca, cb = a.call_expr, b.call_expr
        return (ca.function == cb.function and ca.HasField("target") == cb.HasField("target")
                and (not ca.HasField("target") or _same(ca.target, cb.target))
                and _same_args(ca.args, cb.args))
    if ka == "list_expr":
        return _same_args(a.list_expr.elements, b.list_expr.elements)
    return False


def fold(e: syntax_pb2.Expr, types: Types) -> Any:
    """('bool', value) etc. when `e` has the same value for every attribute document."""
    kind = e.WhichOneof("expr_kind")
    if kind == "const_expr":
        return _const(e)
    if kind == "list_expr":
        items = [fold(x, types) for x in e.list_expr.elements]
        return _UNKNOWN if any(i is _UNKNOWN for i in items) else ("list", tuple(items))
    if kind == "comprehension_expr":
        comp = e.comprehension_expr
        rng = fold(comp.iter_range, types)
        if rng == ("list", ()):
            return fold(comp.result, types) \
                if comp.result.WhichOneof("expr_kind") == "const_expr" \
                else _fold_empty_loop(comp, types)
        return _UNKNOWN
    if kind != "call_expr":
        return _UNKNOWN
    call = e.call_expr
    fn, args = call.function, list(call.args)
    if fn == "!_" and len(args) == 1:
        v = fold(args[0], types)
        return ("bool", not v[1]) if _is_bool(v) else _UNKNOWN
    if fn in ("_&&_", "_||_") and len(args) == 2:
        left, right = fold(args[0], types), fold(args[1], types)
        absorbing = fn == "_||_"  # true absorbs ||, false absorbs &&
        if ("bool", absorbing) in (left, right):
            return ("bool", absorbing)
        if _is_bool(left) and _is_bool(right):
            return ("bool", not absorbing)
        if _same(args[0], args[1]):
            return left if left is not _UNKNOWN else _UNKNOWN
        # x && !x is never true, x || !x always.
        if _negates(args[0], args[1]) or _negates(args[1], args[0]):
            return ("bool", absorbing)
        # a == 'x' && a == 'y' can never hold; a != 'x' || a != 'y' always does.
        if _different_values(args[0], args[1], "_!=_" if absorbing else "_==_", types):
            return ("bool", absorbing)
        return _UNKNOWN
    if fn == "_?_:_" and len(args) == 3:
        cond = fold(args[0], types)
        if _is_bool(cond):
            return fold(args[1] if cond[1] else args[2], types)
        a, b = fold(args[1], types), fold(args[2], types)
        return a if a is not _UNKNOWN and a == b else _UNKNOWN
    if fn in ("_==_", "_!=_") and len(args) == 2:
        a, b = fold(args[0], types), fold(args[1], types)
        if a is not _UNKNOWN and b is not _UNKNOWN and a[0] == b[0]:
            return ("bool", (a == b) == (fn == "_==_"))
        # Every CEL standard function is deterministic (CEL has no now()), so an
        # expression always equals itself, unless it can be NaN.
        if _same_value(args[0], args[1], types):
            return ("bool", fn == "_==_")
        return _UNKNOWN
    if fn in _COMPARE and len(args) == 2:
        a, b = fold(args[0], types), fold(args[1], types)
        if a is not _UNKNOWN and b is not _UNKNOWN and a[0] == b[0] and \
                a[0] in ("num", "str"):
            x, y = a[1], b[1]
            return ("bool", {"_<_": x < y, "_<=_": x <= y, "_>_": x > y, "_>=_": x >= y}[fn])
        if _same_value(args[0], args[1], types):
            return ("bool", fn in ("_<=_", "_>=_"))
        # A size is never negative: size(x) >= 0 and size(x) > -1 always hold, whichever
        # side it is written on.
        if _is_size(args[0]) and b is not _UNKNOWN and b[0] == "num":
            return _size_against(fn, b[1])
        if _is_size(args[1]) and a is not _UNKNOWN and a[0] == "num":
            return _size_against(_MIRROR[fn], a[1])
        return _UNKNOWN
    if fn == "@in" and len(args) == 2:
        hay = fold(args[1], types)
        if hay == ("list", ()):
            return ("bool", False)
        needle = fold(args[0], types)
        if needle is not _UNKNOWN and hay is not _UNKNOWN and hay[0] == "list":
            return ("bool", needle in hay[1])
        if args[1].WhichOneof("expr_kind") == "list_expr" and any(
                _same_value(args[0], x, types) for x in args[1].list_expr.elements):
            return ("bool", True)  # x in [x, ...]
        return _UNKNOWN
    if fn in _EMPTY_ALWAYS_TRUE and call.HasField("target") and len(args) == 1 and \
            fold(args[0], types) == ("str", ""):
        return ("bool", True)  # every string starts with, ends with, contains ''
    return _UNKNOWN


_MIRROR = {"_<_": "_>_", "_<=_": "_>=_", "_>_": "_<_", "_>=_": "_<=_"}


def _size_against(fn: str, n: float) -> Any:
    """size(x) `fn` n, where that is settled for every size (0, 1, 2 ...)."""
    if (fn == "_>=_" and n <= 0) or (fn == "_>_" and n < 0):
        return ("bool", True)
    if (fn == "_<_" and n <= 0) or (fn == "_<=_" and n < 0):
        return ("bool", False)
    return _UNKNOWN


def _negates(a: syntax_pb2.Expr, b: syntax_pb2.Expr) -> bool:
    """b is !a, or a is `x == y` and b `x != y` or `y != x` (CEL defines != as the
    negation of ==)."""
    if b.WhichOneof("expr_kind") != "call_expr":
        return False
    call = b.call_expr
    if call.function == "!_":
        return len(call.args) == 1 and _same(a, call.args[0])
    if call.function != "_!=_" or a.WhichOneof("expr_kind") != "call_expr" or \
            a.call_expr.function != "_==_":
        return False
    eq = a.call_expr.args
    return _same_args(eq, call.args) or _same_args(eq, call.args[::-1])


def _same_args(xs: Sequence[syntax_pb2.Expr], ys: Sequence[syntax_pb2.Expr]) -> bool:
    return len(xs) == len(ys) and all(_same(x, y) for x, y in zip(xs, ys, strict=True))


def _same_value(a: syntax_pb2.Expr, b: syntax_pb2.Expr, types: Types) -> bool:
    """a and b are the same expression of a type whose values all equal themselves."""
    return _same(a, b) and _reflexive(types.get(a.id))


def _reflexive(t: checked_pb2.Type | None) -> bool:
    if t is None:
        return False
    kind = t.WhichOneof("type_kind")
    if kind == "primitive":
        return t.primitive in _REFLEXIVE_PRIMITIVES
    if kind == "well_known":
        return t.well_known in _REFLEXIVE_WELL_KNOWN
    if kind == "list_type":
        return _reflexive(t.list_type.elem_type)
    if kind == "map_type":
        return _reflexive(t.map_type.key_type) and _reflexive(t.map_type.value_type)
    return False


def _different_values(a: syntax_pb2.Expr, b: syntax_pb2.Expr, op: str, types: Types
                      ) -> bool:
    """a and b are `e op c1` and `e op c2` (either way round) with c1 != c2."""
    def pair(e: syntax_pb2.Expr) -> tuple[syntax_pb2.Expr, Any] | None:
        if e.WhichOneof("expr_kind") != "call_expr" or e.call_expr.function != op \
                or len(e.call_expr.args) != 2:
            return None
        x, y = e.call_expr.args
        for subject, value in ((x, fold(y, types)), (y, fold(x, types))):
            if value is not _UNKNOWN and fold(subject, types) is _UNKNOWN:
                return subject, value
        return None
    pa, pb = pair(a), pair(b)
    return (pa is not None and pb is not None and _same(pa[0], pb[0])
            and pa[1][0] == pb[1][0] and pa[1] != pb[1])


def _fold_empty_loop(comp: syntax_pb2.Expr.Comprehension, types: Types) -> Any:
    init = fold(comp.accu_init, types)
    # exists/all over an empty list: the result is the accumulator's initial value.
    if comp.result.WhichOneof("expr_kind") == "ident_expr" and \
            comp.result.ident_expr.name == comp.accu_var:
        return init
    return _UNKNOWN


def _is_bool(v: Any) -> bool:
    return isinstance(v, tuple) and v[0] == "bool"


def _is_size(e: syntax_pb2.Expr) -> bool:
    return e.WhichOneof("expr_kind") == "call_expr" and e.call_expr.function == "size"


# -- entry point --------------------------------------------------------------------


def analyze(serialized: bytes, known_values: Mapping[str, Iterable[str]] | None = None,
            *, per_tool: bool = False) -> Analysis:
    """per_tool: the expression is a tools policy's, evaluated once per tool."""
    checked = checked_expr(serialized)
    walker = _Walker(checked, known_values or {}, per_tool)
    walker.walk(checked.expr, {}, 1 if per_tool else 0)
    walker.unguarded_map_reads()
    used = tuple(sorted(walker.used))
    roots = frozenset(p.split(".", 1)[0] for p in used)
    folded = fold(checked.expr, checked.type_map)
    constant = folded[1] if _is_bool(folded) else None
    if constant is None and not roots:
        constant = _UNKNOWN  # no attribute at all: the caller evaluates it once
    return Analysis(used, roots, constant, walker.findings,  # type: ignore[arg-type]
                    walker.nodes, walker.patterns, walker.probes)


NO_ATTRIBUTES = _UNKNOWN
