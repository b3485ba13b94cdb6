"""Record validation: every error path with its exact message."""

import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wmtp_fn.data.schema import (
    DataError,
    Record,
    parse_record,
    record_to_dict,
    record_to_json,
)

GOOD = {
    "problem_id": "p1",
    "instruction": "Add two numbers.",
    "input": "",
    "output": "def add(a, b):\n    return a + b\n",
    "is_correct": True,
    "difficulty": 7,
}


def bad(**changes):
    obj = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return obj


def message(obj, **kw):
    with pytest.raises(DataError) as info:
        parse_record(obj, **kw)
    return str(info.value)


def test_good_record_parses_with_defaults():
    r = parse_record(GOOD, path="d.jsonl", line=1)
    assert r == Record("p1", "Add two numbers.", "", GOOD["output"], True, 7)
    assert r.tests is None and r.entry_point is None and r.metadata == {}


def test_optional_fields_and_null_as_absent():
    r = parse_record(bad(tests="assert 1", entry_point="add", metadata={"k": [1]}))
    assert (r.tests, r.entry_point, r.metadata) == ("assert 1", "add", {"k": [1]})
    r = parse_record(bad(tests=None, entry_point=None, metadata=None))
    assert (r.tests, r.entry_point, r.metadata) == (None, None, {})


def test_brief_example_message_exactly():
    assert (
        message(bad(difficulty="7"), path="data/train.jsonl", line=12)
        == "data/train.jsonl:12: field 'difficulty': expected int, got str ('7')"
    )


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"difficulty": True}, "field 'difficulty': expected int, got bool (True)"),
        ({"difficulty": 7.0}, "field 'difficulty': expected int, got float (7.0)"),
        ({"difficulty": -1}, "field 'difficulty': expected int >= 0, got int (-1)"),
        ({"is_correct": 1}, "field 'is_correct': expected bool, got int (1)"),
        ({"is_correct": "true"}, "field 'is_correct': expected bool, got str ('true')"),
        ({"problem_id": 3}, "field 'problem_id': expected non-empty str, got int (3)"),
        ({"problem_id": ""}, "field 'problem_id': expected non-empty str, got str ('')"),
        ({"output": ""}, "field 'output': expected non-empty str, got str ('')"),
        ({"output": None}, "field 'output': expected non-empty str, got None"),
        ({"input": ["a"]}, "field 'input': expected str, got list (['a'])"),
        ({"tests": 5}, "field 'tests': expected str, got int (5)"),
        ({"metadata": []}, "field 'metadata': expected dict, got list ([])"),
        ({"output": ...}, "field 'output': missing (expected str)"),
        ({"is_correct": ...}, "field 'is_correct': missing (expected bool)"),
        ({"difficulty": ...}, "field 'difficulty': missing (expected int)"),
        (
            {"is_corect": True},
            "field 'is_corect': unknown field (expected one of: problem_id, instruction, "
            "input, output, is_correct, difficulty, tests, entry_point, metadata; "
            "put extra data under 'metadata')",
        ),
        (
            {"instruction": "x" * 80},
            None,  # valid: long strings are fine
        ),
    ],
)
def test_field_errors(changes, expected):
    obj = bad(**changes)
    if expected is None:
        parse_record(obj)
        return
    assert message(obj, path="f.jsonl", line=3) == f"f.jsonl:3: {expected}"


def test_long_values_are_shortened_in_messages():
    assert (
        message(bad(difficulty="a" * 100), path="f", line=1)
        == "f:1: field 'difficulty': expected int, got str ('" + "a" * 46 + "...)"
    )


def test_non_object_and_locations():
    assert message([1, 2], path="f.jsonl", line=2) == "f.jsonl:2: expected a JSON object, got list ([1, 2])"
    assert message("x", path="f.jsonl", offset=120) == "f.jsonl:byte 120: expected a JSON object, got str ('x')"
    assert message(None) == "<memory>: expected a JSON object, got None"


def test_error_attributes_and_pickle():
    with pytest.raises(DataError) as info:
        parse_record(bad(difficulty="7"), path="f", line=1)
    e = info.value
    assert (e.where, e.field, e.reason) == ("f:1", "difficulty", "expected int, got str ('7')")
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.field == "difficulty"


def test_to_json_schema_order_and_roundtrip():
    r = parse_record(bad(metadata={"b": 1, "a": "é"}, tests="t"))
    line = record_to_json(r)
    assert line == (
        '{"problem_id": "p1", "instruction": "Add two numbers.", "input": "", '
        '"output": "def add(a, b):\\n    return a + b\\n", "is_correct": true, '
        '"difficulty": 7, "tests": "t", "metadata": {"b": 1, "a": "é"}}'
    )
    assert parse_record(json.loads(line)) == r
    assert "tests" not in record_to_dict(parse_record(GOOD))


text = st.text(min_size=1, max_size=20)


@given(
    pid=text, ins=text, inp=st.text(max_size=5), out=text, ok=st.booleans(),
    d=st.integers(0, 25), meta=st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
def test_json_roundtrip_property(pid, ins, inp, out, ok, d, meta):
    r = Record(pid, ins, inp, out, ok, d, metadata=meta)
    assert parse_record(json.loads(record_to_json(r))) == r
