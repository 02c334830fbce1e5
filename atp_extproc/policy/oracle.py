"""cel-python (pure Python CEL) as an independent oracle for the engine's results.

Used by the tests (tests/test_policy_oracle.py), never on the request path: cel-python
is a dev dependency. The attribute document is handed over as CEL values with the same
semantics the C++ runtime gives protobuf messages: unset scalars read as their zero value,
and has() on a message field follows proto3 presence (scalars: not zero; lists and maps:
not empty; messages: set). cel-python leaves message has() to the caller, so this module
supplies it. Equality follows the CEL spec's heterogeneous equality, as the C++ runtime
does: `1 == 1.0` is true and values of unrelated types are simply not equal (`1.0 !=
'eu'` is true), where cel-python would raise "no such overload". `in` and indexing
compare by the same equality (a JSON claim's 5.0 is in [5, 6]; a list takes an index of
any numeric type with an integral value), and string() writes bools and doubles as the
runtime does (`true`, `5`, `1e+06`).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import CELEvalError, Evaluator
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from atp_extproc.policy.gen.atp import policy_pb2 as pb

ERROR = "error"


class ProtoMessage(celtypes.MessageType):
    """A message as a CEL map of every field, remembering proto3 presence."""

    present: frozenset[str] = frozenset()


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    t = f.type
    if t == FieldDescriptor.TYPE_BOOL:
        return celtypes.BoolType(value)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32,
             FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_SFIXED32):
        return celtypes.IntType(value)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_FIXED32):
        return celtypes.UintType(value)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return celtypes.DoubleType(value)
    if t == FieldDescriptor.TYPE_STRING:
        return celtypes.StringType(value)
    if t == FieldDescriptor.TYPE_BYTES:
        return celtypes.BytesType(value)
    if t == FieldDescriptor.TYPE_ENUM:
        return celtypes.IntType(value)
    raise TypeError(f"unsupported field type {t}")


def _json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return celtypes.ListType([_json_value(v) for v in value.list_value.values])
    if kind == "string_value":
        return celtypes.StringType(value.string_value)
    if kind == "number_value":
        return celtypes.DoubleType(value.number_value)
    if kind == "bool_value":
        return celtypes.BoolType(value.bool_value)
    return None


def _struct(s: struct_pb2.Struct) -> celtypes.MapType:
    return celtypes.MapType({celtypes.StringType(k): _json_value(v)
                             for k, v in s.fields.items()})


def _message_value(msg: Any) -> Any:
    if isinstance(msg, struct_pb2.Struct):
        return _struct(msg)
    if isinstance(msg, timestamp_pb2.Timestamp):
        return celtypes.TimestampType(msg.ToJsonString())
    return to_cel(msg)


def to_cel(msg: Any) -> ProtoMessage:
    """A protobuf message as cel-python values, every declared field present."""
    fields: dict[Any, Any] = {}
    present: set[str] = set()
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        key = celtypes.StringType(f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            key_field = f.message_type.fields_by_name["key"]
            fields[key] = celtypes.MapType({
                _scalar(key_field, k): (_message_value(v) if value_field.message_type
                                        else _scalar(value_field, v))
                for k, v in value.items()})
            if len(value):
                present.add(f.name)
        elif f.is_repeated:
            fields[key] = celtypes.ListType([
                _message_value(v) if f.message_type else _scalar(f, v) for v in value])
            if len(value):
                present.add(f.name)
        elif f.message_type is not None:
            fields[key] = _message_value(value)
            if msg.HasField(f.name):
                present.add(f.name)
        else:
            fields[key] = _scalar(f, value)
            if value != f.default_value:
                present.add(f.name)
    out = ProtoMessage(fields)
    out.present = frozenset(present)
    return out


def _kind(value: Any) -> str:
    # By the builtin a value derives from: cel-python's operators return plain str (and
    # the like) where a field reads as StringType, and the two are one CEL type.
    if isinstance(value, (celtypes.BoolType, bool)):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, celtypes.ListType):
        return "list"
    if isinstance(value, celtypes.MapType):
        return "map"
    if value is None:
        return "null"
    return type(value).__name__


def _equal(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return False
    if ka == "number":
        return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) \
            else int(a) == int(b)
    if ka == "list":
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if ka == "map":
        return len(a) == len(b) and all(
            any(_equal(k, k2) and _equal(v, b[k2]) for k2 in b) for k, v in a.items())
    return bool(a == b)


def _spec_eq(a: Any, b: Any) -> Any:
    if isinstance(a, CELEvalError):
        return a
    if isinstance(b, CELEvalError):
        return b
    return celtypes.BoolType(_equal(a, b))


def _spec_ne(a: Any, b: Any) -> Any:
    result = _spec_eq(a, b)
    return result if isinstance(result, CELEvalError) else celtypes.BoolType(not result)


def _spec_add(a: Any, b: Any) -> Any:
    # cel-python's `+` gives plain str, bytes and list, which type() does not name as
    # CEL's string, bytes and list (`type(a + b) == string` was false).
    total = a + b
    if isinstance(total, str):
        return celtypes.StringType(total)
    if isinstance(total, bytes):
        return celtypes.BytesType(total)
    if isinstance(total, list) and not isinstance(total, celtypes.ListType):
        return celtypes.ListType(total)
    return total


def _spec_in(item: Any, container: Any) -> Any:
    # cel-python compares with Python's ==, which raises between a double and an int
    # (a JSON number and a literal) and between unrelated types.
    if isinstance(item, CELEvalError):
        return item
    if isinstance(container, CELEvalError):
        return container
    if not isinstance(container, (celtypes.ListType, celtypes.MapType)):
        return CELEvalError("no such overload", TypeError, None)
    return celtypes.BoolType(any(_equal(item, x) for x in container))


# The runtime takes a double index only where it is an int64 value: below this in
# magnitude.
_INT64_LIMIT = 2.0 ** 63


def _list_index(key: Any) -> int:
    """The position `key` names in a list: an int, a uint or a double with an integral
    value (CEL's numbers compare as one), as the runtime reads it."""
    if isinstance(key, celtypes.BoolType) or not isinstance(key, (int, float)):
        raise TypeError(f"a list index is a number, not {_kind(key)}")
    if isinstance(key, float) and not (key.is_integer() and abs(key) < _INT64_LIMIT):
        raise TypeError(f"a list index must have an integral value, not {key}")
    return int(key)


def _spec_index(container: Any, key: Any) -> Any:
    # Raises as cel-python's own indexing does: its evaluator turns the exception into the
    # CEL error. Python's own indexing takes no double for a list, and indexes a string,
    # which CEL does not.
    if isinstance(container, CELEvalError):
        return container
    if isinstance(key, CELEvalError):
        return key
    if isinstance(container, celtypes.ListType):
        index = _list_index(key)
        if not 0 <= index < len(container):
            raise IndexError(f"index {index} out of range for a list of {len(container)}")
        return container[index]
    if isinstance(container, celtypes.MapType):
        for k, v in container.items():
            if _equal(k, key):
                return v
        raise KeyError(key)
    raise TypeError(f"no index of a {_kind(container)}")


SPEC_FUNCTIONS = {"_==_": _spec_eq, "_!=_": _spec_ne, "_+_": _spec_add, "_in_": _spec_in,
                  "_[_]": _spec_index}


def _double_text(value: float) -> str:
    """A double as the runtime's string() writes it: the fewest digits that read back as
    the same double, in exponent form where %g would use it (below 1e-4, from 1e6 on);
    infinities and NaN as C's printf writes them (the spec leaves those open)."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    shortest = Decimal(repr(float(value))).normalize()
    sign, digits, exponent = shortest.as_tuple()
    magnitude = len(digits) - 1 + int(exponent)
    if -4 <= magnitude < 6:
        return format(shortest, "f")
    mantissa = "".join(map(str, digits))
    fraction = f".{mantissa[1:]}" if len(mantissa) > 1 else ""
    return f"{'-' if sign else ''}{mantissa[0]}{fraction}e{magnitude:+03d}"


def _spec_string(value: Any) -> Any:
    """string() of a bool or double as the runtime writes it (Python writes `True`,
    `5.0`), an error for a value CEL has no string() of (cel-python writes a list or a
    map as Python would); None for a value cel-python converts as CEL does."""
    if isinstance(value, (celtypes.BoolType, bool)):
        return celtypes.StringType("true" if value else "false")
    if isinstance(value, float):
        return celtypes.StringType(_double_text(value))
    if value is None or isinstance(value, (celtypes.ListType, celtypes.MapType)):
        return CELEvalError(f"no such overload: string({_kind(value)})", TypeError, None)
    return None


# The runtime reads int() and uint() of a string as abseil's SimpleAtoi does: ASCII
# whitespace around, one sign, ASCII digits. Python's int() also takes "5_1" and other
# scripts' digits, and cel-python "0x40".
_ASCII_SPACE = "[ \t\n\v\f\r]*"
_NUMBER_TEXT = {"int": re.compile(f"{_ASCII_SPACE}([+-]?[0-9]+){_ASCII_SPACE}"),
               "uint": re.compile(f"{_ASCII_SPACE}\\+?([0-9]+){_ASCII_SPACE}")}


class _ProtoEvaluator(Evaluator):
    """cel-python's evaluator with proto3 has() for ProtoMessage values."""

    def macro_has_eval(self, exprlist: lark.Tree) -> celtypes.BoolType:
        node: Any = exprlist
        while isinstance(node, lark.Tree) and node.data != "member_dot" and \
                len(node.children) == 1:
            node = node.children[0]
        if isinstance(node, lark.Tree) and node.data == "member_dot":
            member_tree, name_token = node.children
            member = self.visit(member_tree)
            name = str(name_token)
            # cel-python reads any error below has() as false; in CEL only the last key
            # is tested, and an error reading the ones before it is the result.
            if isinstance(member, CELEvalError):
                return member  # type: ignore[return-value]
            if isinstance(member, ProtoMessage):
                if celtypes.StringType(name) not in member:
                    return CELEvalError(f"no_such_field {name}", KeyError, None)  # type: ignore[return-value]
                return celtypes.BoolType(name in member.present)
            if isinstance(member, celtypes.MapType):
                return celtypes.BoolType(celtypes.StringType(name) in member)
            # A string, a number, a list or null has no fields to test.
            return CELEvalError(f"no_such_field {name}", TypeError, None)  # type: ignore[return-value]
        return super().macro_has_eval(exprlist)

    def function_eval(self, name_token: lark.Token, exprlist: Any = None) -> Any:
        # Checked here rather than by replacing the functions: `int` and `string` are
        # also type names (`type(x) == int`), and those must stay cel-python's types.
        name = str(name_token)
        if not isinstance(exprlist, list) or len(exprlist) != 1:
            return super().function_eval(name_token, exprlist)
        (arg,) = exprlist
        pattern = _NUMBER_TEXT.get(name)
        if pattern is not None and isinstance(arg, str):
            match = pattern.fullmatch(arg)
            if match is None:
                return CELEvalError("string conversion failed", ValueError, None)
            exprlist = [celtypes.StringType(match.group(1))]
        converted = _spec_string(arg) if name == "string" else None
        if converted is not None:
            return converted
        return super().function_eval(name_token, exprlist)


class _Runner(celpy.InterpretedRunner):
    def evaluate(self, context: Any) -> Any:
        e = _ProtoEvaluator(ast=self.ast, activation=self.new_activation())
        return e.evaluate(context)


class Oracle:
    """Evaluates single policy expressions with cel-python; results True/False/'error'."""

    def __init__(self) -> None:
        self.env = celpy.Environment(runner_class=_Runner)
        self._programs: dict[str, Any] = {}

    def program(self, expression: str) -> Any:
        prog = self._programs.get(expression)
        if prog is None:
            prog = self.env.program(self.env.compile(expression), functions=SPEC_FUNCTIONS)
            self._programs[expression] = prog
        return prog

    def evaluate(self, expression: str, doc: pb.Attributes,
                 resource: pb.Resource | None = None, tool: pb.Tool | None = None) -> Any:
        activation = {"subject": to_cel(doc.subject), "request": to_cel(doc.request),
                      "context": to_cel(doc.context)}
        if resource is not None:
            activation["resource"] = to_cel(resource)
        if tool is not None:
            activation["tool"] = to_cel(tool)
        try:
            value = self.program(expression).evaluate(activation)
        except CELEvalError:
            return ERROR
        except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError):
            return ERROR
        if isinstance(value, CELEvalError):
            return ERROR
        if isinstance(value, celtypes.BoolType):
            return bool(value)
        return ERROR
