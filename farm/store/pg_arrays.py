"""PostgreSQL array literals for the write buffer's unnest statements (farm/store/writes.py, ``_Unnest``):
a column of values written as the text of one array, which the statement casts (``%s::INTEGER[]``), so
the server parses every element with the column type's own input function.

psycopg's list dumper runs a regular expression and a few Python calls for every element (~0.5 µs each;
a step of 50 tasks sends ~4,000 values: ~2 ms of the step's CPU, bench/dispatch.py --profile --db pg);
these write a column of plain ints, floats, strings or bools with a few C-level joins. Invariant: the
text reads back as exactly the values given (floats by ``repr``, the shortest text of the same double;
every string double-quoted, so that no trimming or NULL-guessing applies), and a column holding anything
else (a bool in an integer column, a subclass, bytes) is returned as the list itself, for psycopg to adapt.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Boolean, Enum, Float, Integer, String
from sqlalchemy.types import TypeDecorator

_NONE = type(None)


def _array(values: list, kinds: frozenset, text: Callable[[object], str]) -> str | list:
    """``values`` as an array literal when every one is of ``kinds`` or None (``text`` writes one), else
    ``values`` itself."""
    seen = set(map(type, values))
    if seen <= kinds:
        return "{" + ",".join(map(text, values)) + "}"
    if seen <= kinds | {_NONE}:
        return "{" + ",".join("NULL" if v is None else text(v) for v in values) + "}"
    return values


def _quoted(v: str) -> str:
    # inside double quotes only backslash and the quote are special (no trimming, NULL is a string)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


_INTS, _FLOATS, _STRS, _BOOLS = frozenset({int}), frozenset({float, int}), frozenset({str}), frozenset({bool})
_BOOL_TEXT = {True: "t", False: "f"}.__getitem__


def _ints(values: list) -> str | list:
    return _array(values, _INTS, str)


def _floats(values: list) -> str | list:
    return _array(values, _FLOATS, repr)  # repr: the shortest text that reads back as the same double (inf, nan)


def _strs(values: list) -> str | list:
    return _array(values, _STRS, _quoted)


def _bools(values: list) -> str | list:
    return _array(values, _BOOLS, _BOOL_TEXT)


def array_text_for(sql_type) -> Callable[[list], str | list] | None:
    """How to write a column of ``sql_type`` as a PostgreSQL array literal, or None (psycopg adapts it).
    A TypeDecorator (sqlmodel's AutoString) is written as the type it stores, its bind processor having run."""
    while isinstance(sql_type, TypeDecorator):
        sql_type = sql_type.impl_instance
    if isinstance(sql_type, Boolean):
        return _bools
    if isinstance(sql_type, Integer):  # Integer, BigInteger, SmallInteger
        return _ints
    if isinstance(sql_type, Float):
        return _floats
    if isinstance(sql_type, String) and not isinstance(sql_type, Enum):
        return _strs
    return None
