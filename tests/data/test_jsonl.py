"""Streaming JSONL: raise vs skip, exact messages, blank lines, empty files, offsets."""

import json

import pytest

from wmtp_fn.data.jsonl import iter_located, iter_records
from wmtp_fn.data.schema import DataError

GOOD = {
    "problem_id": "p1",
    "instruction": "i",
    "input": "",
    "output": "o",
    "is_correct": True,
    "difficulty": 3,
}


def line(**changes):
    return json.dumps({**GOOD, **changes})


def write(tmp_path, lines, name="d.jsonl", *, raw=None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    return p


def first_error(path):
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    return str(info.value)


def test_reads_records_and_offsets(tmp_path):
    lines = [line(problem_id="a"), "", line(problem_id="é")]
    p = write(tmp_path, lines)
    got = list(iter_located(p))
    assert [(g.line, g.offset, g.record.problem_id) for g in got] == [
        (1, 0, "a"),
        (3, len(lines[0]) + 2, "é"),  # blank line still counts as a line; offsets are bytes
    ]
    raw = p.read_bytes()
    assert json.loads(raw[got[1].offset:].split(b"\n")[0])["problem_id"] == "é"


def test_last_line_without_newline(tmp_path):
    p = write(tmp_path, [], raw=(line() + "\n" + line(problem_id="b")).encode())
    assert [r.problem_id for r in iter_records(p)] == ["p1", "b"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"problem_id": "a",', "invalid JSON: Expecting property name enclosed in double quotes (column 20)"),
        ("[1, 2]", "expected a JSON object, got list ([1, 2])"),
        ("42", "expected a JSON object, got int (42)"),
        (line(difficulty="7"), "field 'difficulty': expected int, got str ('7')"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "output"}), "field 'output': missing (expected str)"),
        ('{"problem_id": "a", "problem_id": "b"}', "field 'problem_id': duplicate key in JSON object"),
    ],
)
def test_raise_mode_names_file_line_field(tmp_path, bad_line, expected):
    p = write(tmp_path, [line(), "", bad_line, line()])
    assert first_error(p) == f"{p}:3: {expected}"


def test_invalid_utf8(tmp_path):
    p = write(tmp_path, [], raw=line().encode() + b"\n" + b'{"a": "\xff"}\n')
    assert first_error(p) == f"{p}:2: invalid UTF-8 at byte 8 of the line"


@pytest.mark.parametrize("raw", [b"", b"\n\n  \n"])
def test_empty_file_names_the_file(tmp_path, raw):
    p = write(tmp_path, [], raw=raw)
    msg = f"{p}: no records (the file is empty or has only blank lines)"
    assert first_error(p) == msg
    with pytest.raises(DataError) as info:
        list(iter_records(p, on_error="skip", skipped=[]))
    assert str(info.value) == msg


def test_skip_mode_counts_and_reports(tmp_path):
    p = write(tmp_path, [line(problem_id="a"), "not json", line(is_correct=1), "", line(problem_id="d")])
    skipped = []
    got = [r.problem_id for r in iter_records(p, on_error="skip", skipped=skipped)]
    assert got == ["a", "d"]
    assert [str(e) for e in skipped] == [
        f"{p}:2: invalid JSON: Expecting value (column 1)",
        f"{p}:3: field 'is_correct': expected bool, got int (1)",
    ]


def test_skip_mode_all_bad_still_reports(tmp_path):
    p = write(tmp_path, ["x", "y"])
    skipped = []
    assert list(iter_records(p, on_error="skip", skipped=skipped)) == []
    assert len(skipped) == 2


def test_policy_arguments_checked_at_call_time(tmp_path):
    p = write(tmp_path, [line()])
    with pytest.raises(ValueError) as info:
        iter_records(p, on_error="skip")
    assert str(info.value) == (
        "on_error='skip' needs a `skipped` list to report skipped items into "
        "(skipping is never silent)"
    )
    with pytest.raises(ValueError) as info:
        iter_records(p, on_error="ignore")
    assert str(info.value) == "on_error must be 'raise' or 'skip', got 'ignore'"


def test_streams_without_loading(tmp_path):
    # The first record arrives before a later bad line is read: it is a stream, not a load.
    p = write(tmp_path, [line(problem_id="a"), "bad"])
    it = iter_records(p)
    assert next(it).problem_id == "a"
    with pytest.raises(DataError):
        next(it)
