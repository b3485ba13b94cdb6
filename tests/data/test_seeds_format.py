"""The seeds' record files load unchanged: task_id -> problem_id, metadata -> difficulty/tests."""

import json

import pytest

from wmtp_fn.data.index import build_index, read_at
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.data.schema import DataError, Record, parse_record

HUMANEVAL = {
    "instruction": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
    "input": "",
    "output": "    return a + b\n",
    "task_id": "HumanEval_0_correct_3",
    "is_correct": True,
    "metadata": {"source": "humaneval", "difficulty": 4, "has_tests": True,
                 "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"},
}
MBPP = {
    "instruction": "Write a function to add.",
    "input": "",
    "output": "def add(a, b):\n    return a - b\n",
    "task_id": "mbpp_11_incorrect_0",
    "is_correct": False,
    "metadata": {"source": "mbpp", "difficulty": -1, "has_tests": True,
                 "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "import math"},
}


def with_(base, **changes):
    obj = json.loads(json.dumps(base))
    for k, v in changes.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


def test_humaneval_style_record():
    r = parse_record(HUMANEVAL)
    assert r == Record("HumanEval_0", HUMANEVAL["instruction"], "", "    return a + b\n", True, 4,
                       tests=HUMANEVAL["metadata"]["test"], entry_point="add", metadata=HUMANEVAL["metadata"])


def test_mbpp_style_record_unknown_difficulty_and_joined_tests():
    r = parse_record(MBPP)
    assert (r.problem_id, r.is_correct, r.difficulty, r.entry_point) == ("mbpp_11", False, 0, None)
    assert r.tests == "import math\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"


@pytest.mark.parametrize(
    "task_id, problem",
    [("a_correct_1", "a"), ("cc_1234_A_incorrect_17", "cc_1234_A"), ("x_correct_y_incorrect_2", "x_correct_y")],
)
def test_problem_id_is_the_task_id_before_the_suffix(task_id, problem):
    ok = "incorrect" not in task_id.rsplit("_", 2)[1]
    assert parse_record(with_(HUMANEVAL, task_id=task_id, is_correct=ok)).problem_id == problem


def test_absent_metadata_and_difficulty_mean_unknown():
    r = parse_record(with_(HUMANEVAL, metadata=...))
    assert (r.difficulty, r.tests, r.entry_point, r.metadata) == (0, None, None, {})
    assert parse_record(with_(HUMANEVAL, metadata={"source": "x"})).difficulty == 0


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"task_id": "HumanEval_0_3"}, "field 'task_id': expected '{name}_correct_{i}'"),
        ({"task_id": "p_correct_1", "is_correct": False}, "field 'is_correct': is False but task_id 'p_correct_1' says correct"),
        ({"is_correct": 1}, "field 'is_correct': expected bool, got int (1)"),
        ({"output": ...}, "field 'output': missing (expected str; seeds' format)"),
        ({"extra": 1}, "field 'extra': unknown field for the seeds' format"),
        ({"metadata": {"difficulty": "3"}}, "field 'metadata.difficulty': expected int >= -1"),
        ({"metadata": {"difficulty": -2}}, "field 'metadata.difficulty': expected int >= -1"),
        ({"metadata": {"test_list": "assert 1"}}, "field 'metadata.test_list': expected a list of str"),
        ({"metadata": [1]}, "field 'metadata': expected dict"),
    ],
)
def test_located_errors(changes, expected):
    with pytest.raises(DataError) as info:
        parse_record(with_(HUMANEVAL, **changes), path="seeds.jsonl", line=5)
    assert str(info.value).startswith("seeds.jsonl:5: " + expected), str(info.value)


def test_a_record_in_neither_format_names_both():
    obj = {k: v for k, v in HUMANEVAL.items() if k != "task_id"}
    with pytest.raises(DataError, match=r"field 'problem_id': missing \(expected str or, for the seeds' format, a 'task_id'\)"):
        parse_record(obj, path="f", line=1)


def test_a_seeds_file_indexes_and_reads_back_by_offset(tmp_path):
    path = tmp_path / "seeds.jsonl"
    rows = [HUMANEVAL, with_(HUMANEVAL, task_id="HumanEval_0_incorrect_0", is_correct=False, output="    return a\n"), MBPP]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = build_index(path)
    assert index["problems"]["HumanEval_0"]["difficulty"] == 4
    assert len(index["problems"]["HumanEval_0"]["correct_offsets"]) == 1
    assert len(index["problems"]["HumanEval_0"]["incorrect_offsets"]) == 1
    (bad,) = index["problems"]["mbpp_11"]["incorrect_offsets"]
    assert read_at(path, bad) == parse_record(MBPP)
    assert list(iter_records(path)) == [parse_record(r) for r in rows]


def test_one_format_per_file(tmp_path):
    project = {"problem_id": "p", "instruction": "i", "input": "", "output": "o", "is_correct": True, "difficulty": 1}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(project) + "\n\n" + json.dumps(HUMANEVAL) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:3: record in the seeds format, but line 1 is in the project format"):
        list(iter_records(path))
    skipped = []
    assert [r.problem_id for r in iter_records(path, on_error="skip", skipped=skipped)] == ["p"]
    assert len(skipped) == 1
