"""A metadata index over a JSONL file, and reading records back by byte offset.

The index is built by streaming the file once and is plain JSON-serialisable data::

    {"path": "data.jsonl", "size": 123456, "mtime_ns": 1700000000000000000, "n_records": 980,
     "problems": {"HumanEval/0": {"difficulty": 9,
                                  "correct_offsets": [0],
                                  "incorrect_offsets": [1532, 3101]}, ...}}

Offsets are byte offsets of line starts, in file order. Samplers work on offsets only; records
are read back with ``read_at`` / ``read_many`` so a large file is never loaded whole.
``size`` and ``mtime_ns`` identify the file version: ``check_fresh(index)`` raises if the file
changed since it was indexed (readers of an index call it before reading; the pipelines do, for
every batch), so offsets are never applied to another version of the file.
All records of one problem must agree on ``difficulty``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypedDict

from wmtp_fn.data.jsonl import OnError, check_on_error, decode_line, iter_located
from wmtp_fn.data.schema import DataError, Record, describe, location, parse_record


class ProblemEntry(TypedDict):
    difficulty: int
    correct_offsets: list[int]
    incorrect_offsets: list[int]


class Index(TypedDict):
    path: str
    size: int
    mtime_ns: int
    n_records: int
    problems: dict[str, ProblemEntry]


def build_index(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    skipped: list[DataError] | None = None,
) -> Index:
    """Stream ``path`` once into an ``Index``; errors as in ``jsonl.iter_located``.

    A record whose difficulty disagrees with the first record of its problem is a bad line too.
    """
    check_on_error(on_error, skipped)
    path = os.fspath(path)
    st = os.stat(path)
    size, mtime_ns = st.st_size, st.st_mtime_ns
    problems: dict[str, ProblemEntry] = {}
    first_line: dict[str, int] = {}
    n_records = 0
    for line, offset, record in iter_located(path, on_error=on_error, skipped=skipped):
        entry = problems.get(record.problem_id)
        if entry is None:
            entry = ProblemEntry(
                difficulty=record.difficulty, correct_offsets=[], incorrect_offsets=[]
            )
            problems[record.problem_id] = entry
            first_line[record.problem_id] = line
        elif entry["difficulty"] != record.difficulty:
            error = DataError(
                location(path, line=line),
                f"expected {entry['difficulty']} (problem {record.problem_id!r} has that "
                f"difficulty at line {first_line[record.problem_id]}), "
                f"got {describe(record.difficulty)}",
                field="difficulty",
            )
            if on_error == "raise":
                raise error
            skipped.append(error)  # type: ignore[union-attr]
            continue
        key = "correct_offsets" if record.is_correct else "incorrect_offsets"
        entry[key].append(offset)
        n_records += 1
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise DataError(path, "file changed while it was being indexed")
    return Index(path=path, size=size, mtime_ns=mtime_ns, n_records=n_records, problems=problems)


def check_fresh(index: Index) -> None:
    """Raise if the indexed file changed (size or modification time) since it was indexed."""
    st = os.stat(index["path"])
    if st.st_size != index["size"]:
        raise DataError(
            index["path"],
            f"stale index: file is {st.st_size} bytes, index was built at {index['size']} bytes",
        )
    if "mtime_ns" in index and st.st_mtime_ns != index["mtime_ns"]:
        raise DataError(index["path"], "stale index: file was modified after the index was built (same size)")


def _read_line_at(f, path: str, offset: int) -> bytes:
    if offset < 0:
        raise DataError(location(path, offset=offset), "offset must be >= 0")
    if offset > 0:
        f.seek(offset - 1)
        if f.read(1) != b"\n":
            raise DataError(
                location(path, offset=offset),
                "not the start of a line (stale index or wrong file?)",
            )
    else:
        f.seek(0)
    raw = f.readline()
    if not raw.strip():
        raise DataError(location(path, offset=offset), "no record here (end of file or blank line)")
    return raw


def read_many(path: str | os.PathLike[str], offsets: Iterable[int]) -> list[Record]:
    """Read the records starting at ``offsets`` (any order, repeats allowed), opening once."""
    path = os.fspath(path)
    out = []
    with open(path, "rb") as f:
        for offset in offsets:
            raw = _read_line_at(f, path, offset)
            obj = decode_line(raw, path=path, offset=offset)
            out.append(parse_record(obj, path=path, offset=offset))
    return out


def read_at(path: str | os.PathLike[str], offset: int) -> Record:
    """Read the one record whose line starts at byte ``offset``."""
    return read_many(path, [offset])[0]


def subset(index: Index, problem_ids: Iterable[str]) -> Index:
    """The index restricted to ``problem_ids`` (e.g. a train or validation split)."""
    problems = {}
    for pid in problem_ids:
        if pid not in index["problems"]:
            raise KeyError(f"problem {pid!r} is not in the index of {index['path']}")
        e = index["problems"][pid]
        problems[pid] = ProblemEntry(
            difficulty=e["difficulty"],
            correct_offsets=list(e["correct_offsets"]),
            incorrect_offsets=list(e["incorrect_offsets"]),
        )
    n_records = sum(len(e["correct_offsets"]) + len(e["incorrect_offsets"]) for e in problems.values())
    return Index(
        path=index["path"], size=index["size"], mtime_ns=index["mtime_ns"], n_records=n_records, problems=problems
    )
