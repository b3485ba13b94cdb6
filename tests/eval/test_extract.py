"""Extraction: stop sequences (offline and streaming), code blocks, the chat rule, programs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.eval.local_runner import run_local
from wmtp_fn.eval.extract import (
    HUMANEVAL_STOPS,
    answer_code,
    chat_completion,
    defines,
    first_code_block,
    first_stop,
    humaneval_program,
    raw_completion,
    truncate,
)

BODY = "    total = 0\n    for x in xs:\n        total += x\n    return total\n"


def test_the_stop_sequences_are_humaneval_s():
    assert HUMANEVAL_STOPS == (
        "\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n'''",
    )


@pytest.mark.parametrize(
    "tail",
    [
        "\nclass Foo:\n    pass\n",
        "\ndef helper():\n    return 1\n",
        "\n# test the function\n",
        '\nif __name__ == "__main__":\n    main()\n',
        "\nprint(f([1, 2]))\n",
        "\nassert f([1]) == 1\n",
        '\n"""Examples"""\n',
        "\n'''Examples'''\n",
    ],
)
def test_truncate_at_each_stop(tail):
    assert truncate(BODY + tail) == BODY  # BODY ends with "\n": the stop begins at that newline
    assert truncate(BODY.rstrip("\n") + tail) == BODY.rstrip("\n")


def test_truncate_at_the_earliest_stop_and_not_inside_the_body():
    text = BODY + "\nprint(1)\ndef g():\n    pass\n"
    assert truncate(text) == BODY
    # indented 'def', '#' and 'print(' are part of the body, not stops
    body = "    # sum\n    def inner(y):\n        return y\n    print(inner(1))\n    return 0"
    assert truncate(body) == body
    assert truncate("\ndef f(): pass") == ""  # a stop at the very start leaves nothing
    assert first_stop("abc", ()) is None


@st.composite
def text_and_splits(draw):
    pieces = ["\n", "#", "def ", "class ", "x", " ", "print(", '"""', "'''", "assert ",
              "if __name__", "\nde", "\n\"", "    ", "\ncl"]
    text = "".join(draw(st.lists(st.sampled_from(pieces), max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    return text, cuts


@given(text_and_splits())
def test_streaming_stop_agrees_with_offline_truncation(case):
    """Feeding the text in chunks (as generation decodes it) and stopping at the first cut
    keeps exactly what the offline truncation keeps."""
    text, cuts = case
    checked, kept = 0, text
    for end in cuts + [len(text)]:
        so_far = text[:end]
        cut = first_stop(so_far, HUMANEVAL_STOPS, checked=checked)
        if cut is not None:
            kept = so_far[:cut]
            assert cut == first_stop(text, HUMANEVAL_STOPS)
            break
        checked = end
    assert kept == truncate(text)


def _stream_char_by_char(text: str) -> str:
    for end in range(1, len(text) + 1):  # one decoded character per step
        cut = first_stop(text[:end], HUMANEVAL_STOPS, checked=end - 1)
        if cut is not None:
            return text[:cut]
    return text


@pytest.mark.parametrize("stop", HUMANEVAL_STOPS)
def test_streaming_finds_each_stop_when_its_last_character_arrives(stop):
    # the search window must reach back len(stop) - 1 characters for the longest stop too
    assert _stream_char_by_char("    return 1" + stop + "rest") == "    return 1"


@given(text_and_splits())
def test_streaming_char_by_char_agrees_with_offline_truncation(case):
    assert _stream_char_by_char(case[0]) == truncate(case[0])


@given(text_and_splits())
def test_stopping_generation_does_not_change_the_extracted_completion(case):
    text = case[0] + "\n```\nprose" * (len(case[1]) % 2)
    stopped = text[: first_stop(text, HUMANEVAL_STOPS) or len(text)]
    assert raw_completion(stopped) == raw_completion(text)


@pytest.mark.parametrize(
    "text, block",
    [
        ("```python\nx = 1\n```\nThis sets x.", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("Here is the code:\n\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```python\nfirst\n```\nand\n```python\nsecond\n```", "first\n"),
        ("```python\nx = 1\nstill open", "x = 1\nstill open"),  # generation stopped in the block
        ("```python  \n  y\n  ```\n", "  y\n"),
        ("```python\n```", ""),
        ("```python", ""),
    ],
)
def test_first_code_block(text, block):
    assert first_code_block(text) == block
    assert answer_code(text) == block


def test_no_code_block():
    text = "def f():\n    return '``` not a fence'\n"
    assert first_code_block(text) is None
    assert answer_code(text) == text


def test_raw_completion_ends_at_a_fence():
    # a chat-tuned model continuing a raw prompt closes "its" code block and explains
    assert raw_completion(BODY + "```\n\nThis function sums the list.") == BODY
    assert raw_completion(BODY + "```python\nprint(f([1]))\n```") == BODY
    assert raw_completion("```python\n" + BODY) == ""
    assert raw_completion(BODY + "\n\n\ndef check(c):\n    pass") == BODY + "\n\n"


@pytest.mark.parametrize(
    "code, name, expected",
    [
        ("def f(x):\n", "f", True),
        ("import os\n\ndef  f (x):\n", "f", True),
        ("async def f():\n", "f", True),
        ("def fg(x):\n", "f", False),
        ("def g(f):\n    return f\n", "f", False),
        ("x = 'def f('", "f", False),
    ],
)
def test_defines(code, name, expected):
    assert defines(code, name) is expected


PROMPT = (
    "from typing import List\n\n\n"
    "def helper(x: int) -> int:\n    return x\n\n\n"
    "def total(xs: List[int]) -> int:\n    \"\"\" Sum of xs.\n    >>> total([1, 2])\n    3\n    \"\"\"\n"
)
TEST = "\n\ndef check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"


def test_chat_block_with_the_def_follows_the_whole_prompt():
    answer = (
        "Sure! Here it is:\n```python\ndef total(xs: List[int]) -> int:\n"
        "    return sum(helper(x) for x in xs)\n```\nIt uses the helper."
    )
    completion = chat_completion(answer, "total")
    assert completion == "\ndef total(xs: List[int]) -> int:\n    return sum(helper(x) for x in xs)\n"
    # the block uses List (imported by the prompt only) and helper (defined in the prompt only)
    assert run_local(humaneval_program(PROMPT, completion, TEST, "total")).status == "passed"


def test_chat_block_without_the_def_is_the_body():
    answer = "```python\n    return sum(xs)\n```"
    assert chat_completion(answer, "total") == "    return sum(xs)\n"
    program = humaneval_program(PROMPT, chat_completion(answer, "total"), TEST, "total")
    assert run_local(program).status == "passed"


def test_chat_block_script_part_is_cut():
    answer = (
        "```python\ndef total(xs):\n    return sum(xs)\n\n"
        "if __name__ == '__main__':\n    print(total([int(input())]))\n```"
    )
    completion = chat_completion(answer, "total")
    assert "__main__" not in completion and "input()" not in completion
    assert run_local(humaneval_program(PROMPT, completion, TEST, "total")).status == "passed"


def test_humaneval_program_layout():
    assert humaneval_program("P", "C", "T", "f") == "PC\nT\ncheck(f)\n"
    program = humaneval_program(PROMPT, "    return sum(xs) + 1\n", TEST, "total")
    assert run_local(program).status == "failed"
