"""What every atp.yaml block is built from, and how a problem with a value is worded.

Config, routing, redaction and policy settings take these from here, so each section
reads values alike: immutable, unknown keys refused, types strict (README,
"Configuration reference"). This module imports nothing of ATP's.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict
from pydantic_core import ErrorDetails


class Frozen(BaseModel):
    """The base of every atp.yaml block: immutable, unknown keys refused, types strict."""

    # Strict: lax pydantic read the string '4194304' and true as integers, and the word
    # 1_000 as 1000. An integer is still a number.
    # No NaN nor infinity: a NaN passes no bound and was told "less than or equal to".
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


_T = TypeVar("_T")


def _ordered(value: Any) -> Any:
    # Lax, a tuple takes a set too: a YAML !!set's order is the process's hash seed, so
    # replicas (or one ATP before and after a restart) read one file as different lists.
    if isinstance(value, set | frozenset):
        raise ValueError("a YAML set (!!set) has no order: give a list")
    return value


# YAML gives a list, which strictness refuses as a tuple.
Items = Annotated[tuple[_T, ...], Strict(False), BeforeValidator(_ordered)]

# README: only true and false are booleans, but a boolean setting still takes yes/no,
# as files written for YAML 1.1 spell them; nothing else. Lax pydantic also read 'off',
# 't', '1', 1 and 0 as booleans, which README promises no setting does.
_YES_NO = {"yes": True, "Yes": True, "YES": True, "no": False, "No": False, "NO": False}


def _yes_no(value: Any) -> Any:
    return _YES_NO.get(value, value) if isinstance(value, str) else value


Flag = Annotated[bool, BeforeValidator(_yes_no)]

# What a value of the wrong type should have been: pydantic's "Input should be a valid
# integer" does not say what the file gave, and "a valid tuple" names no YAML type.
_EXPECTED = {"int_type": "an integer", "float_type": "a number",
             "bool_type": "true or false", "string_type": "a string",
             "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "invalid_key": "a string key"}


# Pydantic's reasons that do not quote the value.
_SAYS_NOT_WHAT_IT_GOT = frozenset({"literal_error", "string_pattern_mismatch", "enum"})


def problem_reason(error: ErrorDetails) -> str:
    """The reason of one of pydantic's errors, as atp.yaml's problems word it:
    `expected an integer, got the string '4194304'`."""
    expected = _EXPECTED.get(error["type"])
    if error["type"] in _SAYS_NOT_WHAT_IT_GOT:
        # "Input should be 'INFO' or ..." of `INFO` with a zero-width space after it.
        return f"{error['msg']}, got {_as_written(error['input'])}"
    if expected is None:
        return error["msg"].removeprefix("Value error, ")
    return f"expected {expected}, got {_as_written(error['input'])}"


def _as_written(value: Any) -> str:
    """A YAML value as the file wrote it: `the string '4194304'`, `true`, `a list`."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        # A pasted page of text is no message's: its start says which value it is.
        return f"the string {value!r}" if len(value) <= 80 else \
            f"the string {value[:77]!r}... ({len(value)} characters)"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    return "a mapping" if isinstance(value, dict) else "a list"
