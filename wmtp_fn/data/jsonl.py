"""Streaming a JSONL file of records, line by line, never loading the whole file.

Policy:
- Line numbers are 1-based and count every physical line, so an error points at the line an
  editor shows.
- Blank (whitespace-only) lines are ignored: they carry no record, and a trailing newline or a
  separating blank line is common in hand-edited files. They are not counted as skipped.
- A file with no records at all (empty, or only blank lines) is an error naming the file, in
  both modes: an empty dataset is never what a training run wants.
- ``on_error="raise"`` stops at the first bad line with a ``DataError``.
  ``on_error="skip"`` drops bad lines but appends each ``DataError`` to the caller's ``skipped``
  list, which is then the count and the reasons; skipping without that list is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from wmtp_fn.data.schema import DataError, Record, location, parse_record, record_format

OnError = Literal["raise", "skip"]


class Located(NamedTuple):
    """A record with where it came from: 1-based ``line`` and the byte ``offset`` of its start."""

    line: int
    offset: int
    record: Record


def check_on_error(on_error: str, skipped: list[DataError] | None) -> None:
    """Validate the error policy arguments shared by every streaming reader."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_error == "skip" and skipped is None:
        raise ValueError(
            "on_error='skip' needs a `skipped` list to report skipped items into "
            "(skipping is never silent)"
        )


def _reject_duplicate_keys(where: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DataError(where, "duplicate key in JSON object", field=key)
            out[key] = value
        return out

    return hook


def decode_line(raw: bytes, *, path: str, line: int | None = None, offset: int | None = None) -> Any:
    """Bytes of one line → the JSON value; ``DataError`` for bad UTF-8, bad JSON, duplicate keys.

    Columns in messages are 1-based (characters for JSON errors, bytes for UTF-8 errors).
    """
    where = location(path, line=line, offset=offset)
    try:
        # Without the newline a JSON error at the end of the line gets its column on this line.
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, f"invalid UTF-8 at byte {e.start + 1} of the line") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys(where))
    except json.JSONDecodeError as e:
        raise DataError(where, f"invalid JSON: {e.msg} (column {e.colno})") from None


def iter_located(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    skipped: list[DataError] | None = None,
) -> Iterator[Located]:
    """Yield ``Located(line, offset, record)`` for every record line of ``path``.

    Arguments are checked at call time, before the first ``next``; the file is opened lazily.
    """
    check_on_error(on_error, skipped)
    return _located(os.fspath(path), on_error, skipped)


def _located(path: str, on_error: str, skipped: list[DataError] | None) -> Iterator[Located]:
    n_nonblank = 0
    offset = 0
    file_format: tuple[str, int] | None = None  # (format, line) of the first record
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            n_nonblank += 1
            try:
                obj = decode_line(raw, path=path, line=line_no)
                if isinstance(obj, dict):
                    if file_format is None:
                        file_format = (record_format(obj), line_no)
                    elif record_format(obj) != file_format[0]:
                        raise DataError(
                            location(path, line=line_no),
                            f"record in the {record_format(obj)} format, but line {file_format[1]} is in "
                            f"the {file_format[0]} format (one format per file)",
                        )
                record = parse_record(obj, path=path, line=line_no)
            except DataError as e:
                if on_error == "raise":
                    raise
                skipped.append(e)  # type: ignore[union-attr]  # checked by check_on_error
                continue
            yield Located(line_no, start, record)
    if n_nonblank == 0:
        raise DataError(path, "no records (the file is empty or has only blank lines)")


def iter_records(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    skipped: list[DataError] | None = None,
) -> Iterator[Record]:
    """Yield the records of a JSONL file in order (see the module docstring for the policy)."""
    return (located.record for located in iter_located(path, on_error=on_error, skipped=skipped))
