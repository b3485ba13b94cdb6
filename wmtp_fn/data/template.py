"""Prompt rendering: the Alpaca templates of docs/data.md, or the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(
    instruction: str,
    input: str = "",
    *,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The prompt text that precedes the response.

    Alpaca (default): the with-input template when ``input`` is non-empty, else the no-input one.
    Chat template: one user message, ``instruction`` followed by ``"\\n\\n" + input`` when there
    is an input, rendered with ``add_generation_prompt=True`` so the text ends where the
    assistant's answer begins.
    """
    if not use_chat_template:
        if input:
            return _fill(ALPACA_WITH_INPUT, instruction=instruction, input=input)
        return _fill(ALPACA_NO_INPUT, instruction=instruction)
    if tokenizer is None:
        raise ValueError("use_chat_template=True needs a tokenizer, got tokenizer=None")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"use_chat_template=True but the tokenizer ({type(tokenizer).__name__}, "
            f"{getattr(tokenizer, 'name_or_path', '?')!r}) has no chat_template; "
            "set use_chat_template=False to use the Alpaca template"
        )
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _fill(template: str, **values: str) -> str:
    # Not str.format: instructions are code, full of braces, and may even contain "{input}".
    out = template
    parts = []
    for name, value in values.items():
        head, out = out.split("{" + name + "}")
        parts += [head, value]
    return "".join(parts) + out
