"""The offset index: grouping, difficulty consistency, reads by offset, staleness."""

import json
import os

import pytest

from wmtp_fn.data.index import build_index, check_fresh, read_at, read_many, subset
from wmtp_fn.data.schema import DataError


def rec(pid, ok, d=3, out="o"):
    return json.dumps(
        {"problem_id": pid, "instruction": "i", "input": "", "output": out,
         "is_correct": ok, "difficulty": d}
    )


@pytest.fixture
def data(tmp_path):
    lines = [rec("a", True), rec("a", False, out="é"), "", rec("b", False, d=9), rec("a", True, out="x2")]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p, lines


def test_index_golden(data):
    p, lines = data
    o = [0]
    for s in lines:
        o.append(o[-1] + len(s.encode()) + 1)
    index = build_index(p)
    assert index == {
        "path": str(p),
        "size": p.stat().st_size,
        "mtime_ns": p.stat().st_mtime_ns,
        "n_records": 4,
        "problems": {
            "a": {"difficulty": 3, "correct_offsets": [o[0], o[4]], "incorrect_offsets": [o[1]]},
            "b": {"difficulty": 9, "correct_offsets": [], "incorrect_offsets": [o[3]]},
        },
    }
    assert json.loads(json.dumps(index)) == index  # plain, JSON-serialisable data
    assert read_at(p, o[1]).output == "é"
    assert [r.output for r in read_many(p, [o[4], o[0], o[4]])] == ["x2", "o", "x2"]


def test_difficulty_conflict(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(rec("a", True, d=3) + "\n" + rec("b", True) + "\n" + rec("a", False, d=5) + "\n")
    with pytest.raises(DataError) as info:
        build_index(p)
    assert str(info.value) == (
        f"{p}:3: field 'difficulty': expected 3 (problem 'a' has that difficulty at line 1), got int (5)"
    )
    skipped = []
    index = build_index(p, on_error="skip", skipped=skipped)
    assert index["n_records"] == 2 and len(skipped) == 1
    assert index["problems"]["a"]["incorrect_offsets"] == []


def test_read_errors(data):
    p, lines = data
    with pytest.raises(DataError) as info:
        read_at(p, 3)
    assert str(info.value) == f"{p}:byte 3: not the start of a line (stale index or wrong file?)"
    blank = len(lines[0].encode()) + len(lines[1].encode()) + 2
    with pytest.raises(DataError) as info:
        read_at(p, blank)
    assert str(info.value) == f"{p}:byte {blank}: no record here (end of file or blank line)"
    with pytest.raises(DataError) as info:
        read_at(p, p.stat().st_size)
    assert str(info.value) == f"{p}:byte {p.stat().st_size}: no record here (end of file or blank line)"


def test_stale_and_subset(data):
    p, _ = data
    index = build_index(p)
    small = subset(index, ["b"])
    assert small["n_records"] == 1 and list(small["problems"]) == ["b"]
    small["problems"]["b"]["incorrect_offsets"].append(1)
    assert index["problems"]["b"]["incorrect_offsets"] != small["problems"]["b"]["incorrect_offsets"]
    with pytest.raises(KeyError):
        subset(index, ["zz"])
    check_fresh(index)
    with open(p, "a") as f:
        f.write(rec("c", True) + "\n")
    with pytest.raises(DataError) as info:
        check_fresh(index)
    assert str(info.value).startswith(f"{p}: stale index: file is ")


def test_same_size_rewrite_is_a_stale_index(data):
    p, _ = data
    index = build_index(p)
    p.write_text(p.read_text())  # same bytes, new version of the file
    later = index["mtime_ns"] + 10**9  # timestamps can be coarse: make the rewrite visibly later
    os.utime(p, ns=(later, later))
    with pytest.raises(DataError, match="stale index: file was modified after the index was built"):
        check_fresh(index)
