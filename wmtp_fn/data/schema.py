"""The record schema: one JSON line of a dataset, validated into a frozen ``Record``.

A record (docs/data.md)::

    problem_id: str    non-empty
    instruction: str   non-empty (the problem statement / prompt)
    input: str         may be empty
    output: str        non-empty (a solution)
    is_correct: bool   a JSON ``true``/``false``; ``1``/``0`` are rejected
    difficulty: int    >= 0 (CodeContests 0-25, 0 = unknown); ``true`` is not an int
    tests: str         optional
    entry_point: str   optional
    metadata: dict     optional, any JSON object

Optional fields given as JSON ``null`` count as absent. Any other key is an error: a typo such as
``is_corect`` must not silently produce a record with a default; extra data goes in
``metadata``.

Every error is a ``DataError`` whose message starts with where the problem is, then the field::

    {path}:{line}: field 'difficulty': expected int, got str ('7')
    {path}:{line}: field 'output': missing (expected str)
    {path}:{line}: field 'is_corect': unknown field (expected one of: problem_id, ...)
    {path}:{line}: invalid JSON: Expecting ',' delimiter (column 12)
    {path}:{line}: expected a JSON object, got list ([1, 2])
    {path}:byte {offset}: ...       (a record read by byte offset, see ``index.read_at``)
    problem 'HumanEval/3': ...      (a record that fails later, e.g. in ``encode``)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from wmtp_fn.errors import WmtpError

_REPR_MAX = 50


class DataError(WmtpError, ValueError):
    """A bad input, located: ``where`` (``path:line``, ``path:byte N`` or ``problem 'id'``),
    optionally the ``field``, and the ``reason`` (what was expected vs what was found)."""

    def __init__(self, where: str, reason: str, *, field: str | None = None) -> None:
        self.where = where
        self.field = field
        self.reason = reason
        prefix = f"{where}: field {field!r}" if field is not None else where
        super().__init__(f"{prefix}: {reason}")

    def __reduce__(self):  # keeps the exception picklable across worker processes
        return (_rebuild_data_error, (self.where, self.reason, self.field))


def _rebuild_data_error(where: str, reason: str, field: str | None) -> DataError:
    return DataError(where, reason, field=field)


@dataclass(frozen=True)
class Record:
    """One validated dataset line. ``metadata`` is excluded from the hash (dicts are unhashable)."""

    problem_id: str
    instruction: str
    input: str
    output: str
    is_correct: bool
    difficulty: int
    tests: str | None = None
    entry_point: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


# (name, type, must be non-empty) in schema order; this order is also the order written to disk.
REQUIRED_FIELDS: tuple[tuple[str, type, bool], ...] = (
    ("problem_id", str, True),
    ("instruction", str, True),
    ("input", str, False),
    ("output", str, True),
    ("is_correct", bool, False),
    ("difficulty", int, False),
)
OPTIONAL_FIELDS: tuple[tuple[str, type], ...] = (
    ("tests", str),
    ("entry_point", str),
    ("metadata", dict),
)
FIELD_NAMES: tuple[str, ...] = tuple(n for n, _, _ in REQUIRED_FIELDS) + tuple(
    n for n, _ in OPTIONAL_FIELDS
)


def location(path: str, *, line: int | None = None, offset: int | None = None) -> str:
    """``path:line`` when the line is known, ``path:byte offset`` for reads by offset."""
    if line is not None:
        return f"{path}:{line}"
    if offset is not None:
        return f"{path}:byte {offset}"
    return str(path)


def describe(value: Any) -> str:
    """``str ('7')``, ``bool (True)``, ``None``: the JSON value as found, shortened."""
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > _REPR_MAX:
        text = text[: _REPR_MAX - 3] + "..."
    return f"{type(value).__name__} ({text})"


def _has_type(value: Any, expected: type) -> bool:
    # bool is a subclass of int in Python, but JSON true is not a difficulty, and 1 is not a bool.
    if expected is int:
        return type(value) is int
    if expected is bool:
        return type(value) is bool
    return isinstance(value, expected)


def parse_record(
    obj: Any, *, path: str = "<memory>", line: int | None = None, offset: int | None = None
) -> Record:
    """Validate one decoded JSON value into a ``Record``; raise ``DataError`` naming the field."""
    where = location(path, line=line, offset=offset)
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {describe(obj)}")
    for key in obj:
        if key not in FIELD_NAMES:
            raise DataError(
                where,
                f"unknown field (expected one of: {', '.join(FIELD_NAMES)}; "
                "put extra data under 'metadata')",
                field=key,
            )
    values: dict[str, Any] = {}
    for name, typ, non_empty in REQUIRED_FIELDS:
        if name not in obj:
            raise DataError(where, f"missing (expected {typ.__name__})", field=name)
        value = obj[name]
        if not _has_type(value, typ) or (non_empty and value == ""):
            expected = f"non-empty {typ.__name__}" if non_empty else typ.__name__
            raise DataError(where, f"expected {expected}, got {describe(value)}", field=name)
        values[name] = value
    if values["difficulty"] < 0:
        raise DataError(
            where, f"expected int >= 0, got {describe(values['difficulty'])}", field="difficulty"
        )
    for name, typ in OPTIONAL_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if not _has_type(value, typ):
            raise DataError(where, f"expected {typ.__name__}, got {describe(value)}", field=name)
        values[name] = value
    return Record(**values)


def record_to_dict(record: Record) -> dict[str, Any]:
    """Plain dict in schema order; absent optional fields (None, empty metadata) are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name in ("tests", "entry_point") and value is None:
            continue
        if f.name == "metadata" and not value:
            continue
        out[f.name] = value
    return out


def record_to_json(record: Record) -> str:
    """One JSONL line (no newline), byte-stable: schema key order, UTF-8 kept as is."""
    return json.dumps(record_to_dict(record), ensure_ascii=False)
