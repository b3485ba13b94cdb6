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
import re
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


def record_format(obj: dict[str, Any]) -> str:
    """``"seeds"`` for a record of the research code's files (a ``task_id``, no ``problem_id``),
    else ``"project"`` (whose own errors then name what is missing)."""
    return "seeds" if "task_id" in obj and "problem_id" not in obj else "project"


def parse_record(
    obj: Any, *, path: str = "<memory>", line: int | None = None, offset: int | None = None
) -> Record:
    """Validate one decoded JSON value into a ``Record``; raise ``DataError`` naming the field.

    Both the project's schema and the seeds' schema (see ``parse_seeds_record``) are accepted;
    which one a record is in is decided by ``record_format``.
    """
    where = location(path, line=line, offset=offset)
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {describe(obj)}")
    if record_format(obj) == "seeds":
        return parse_seeds_record(obj, where)
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
            hint = " or, for the seeds' format, a 'task_id'" if name == "problem_id" else ""
            raise DataError(where, f"missing (expected {typ.__name__}{hint})", field=name)
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


# The research code's records (its CodeContests / HumanEval / MBPP files), loaded unchanged:
#   {"instruction", "input": "", "output", "task_id": "{name}_correct_{i}" | "{name}_incorrect_{i}",
#    "is_correct", "metadata": {"source", "difficulty" (-1 or absent = unknown), "has_tests",
#    HumanEval: "test", "entry_point"; MBPP: "test_list", "test_setup_code"}}
SEEDS_FIELDS: tuple[str, ...] = ("instruction", "input", "output", "task_id", "is_correct", "metadata")
_SEEDS_TASK_ID = re.compile(r"^(.+?)_(correct|incorrect)_\d+$")


def parse_seeds_record(obj: dict[str, Any], where: str) -> Record:
    """A seeds'-format record as a ``Record``: ``problem_id`` from ``task_id``, difficulty from
    ``metadata.difficulty`` (-1 or absent → 0, unknown), tests and entry point from the
    HumanEval-style (``test``, ``entry_point``) or MBPP-style (``test_list``,
    ``test_setup_code``) metadata. The whole metadata is kept."""
    for key in obj:
        if key not in SEEDS_FIELDS:
            raise DataError(where, f"unknown field for the seeds' format (expected one of: {', '.join(SEEDS_FIELDS)})", field=key)
    for name, typ in (("task_id", str), ("instruction", str), ("output", str), ("is_correct", bool)):
        if name not in obj:
            raise DataError(where, f"missing (expected {typ.__name__}; seeds' format)", field=name)
        if not _has_type(obj[name], typ) or obj[name] == "":
            raise DataError(where, f"expected {'non-empty ' if typ is str else ''}{typ.__name__}, got {describe(obj[name])}", field=name)
    match = _SEEDS_TASK_ID.match(obj["task_id"])
    if match is None:
        raise DataError(where, f"expected '{{name}}_correct_{{i}}' or '{{name}}_incorrect_{{i}}', got {describe(obj['task_id'])}", field="task_id")
    if (match.group(2) == "correct") != obj["is_correct"]:
        raise DataError(where, f"is {obj['is_correct']} but task_id {obj['task_id']!r} says {match.group(2)}", field="is_correct")
    text_input = obj.get("input", "")
    if not isinstance(text_input, str):
        raise DataError(where, f"expected str, got {describe(text_input)}", field="input")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DataError(where, f"expected dict, got {describe(meta)}", field="metadata")
    difficulty = meta.get("difficulty", -1)
    if difficulty is None:
        difficulty = -1
    if not _has_type(difficulty, int) or difficulty < -1:
        raise DataError(where, f"expected int >= -1 (-1 = unknown), got {describe(difficulty)}", field="metadata.difficulty")
    return Record(
        problem_id=match.group(1),
        instruction=obj["instruction"],
        input=text_input,
        output=obj["output"],
        is_correct=obj["is_correct"],
        difficulty=max(difficulty, 0),
        tests=_seeds_tests(meta, where),
        entry_point=_optional_str(meta, "entry_point", where),
        metadata=meta,
    )


def _optional_str(meta: dict[str, Any], name: str, where: str) -> str | None:
    value = meta.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(where, f"expected str, got {describe(value)}", field=f"metadata.{name}")
    return value or None


def _seeds_tests(meta: dict[str, Any], where: str) -> str | None:
    """HumanEval's ``test`` (a ``check(candidate)`` function) as is; MBPP's setup code and
    assert lines joined into one program; None when the record carries no tests."""
    test = _optional_str(meta, "test", where)
    if test is not None:
        return test
    asserts = meta.get("test_list")
    if asserts is None:
        return None
    if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
        raise DataError(where, f"expected a list of str, got {describe(asserts)}", field="metadata.test_list")
    setup = _optional_str(meta, "test_setup_code", where)
    return "\n".join(([setup] if setup else []) + asserts) + "\n" if asserts or setup else None
