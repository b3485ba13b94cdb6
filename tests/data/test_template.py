"""Prompt templates, asserted character for character against docs/data.md."""

import pytest

from wmtp_fn.data.template import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, render_prompt

# Copied verbatim from docs/data.md, "Prompt templates" (its line breaks are the "\n" here).
REF_WITH_INPUT = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
REF_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def test_templates_match_reference():
    assert ALPACA_WITH_INPUT == REF_WITH_INPUT
    assert ALPACA_NO_INPUT == REF_NO_INPUT


def test_render_without_input():
    assert render_prompt("Sort {x}.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSort {x}.\n\n### Response:\n"
    )


def test_render_with_input_and_braces():
    got = render_prompt("Use {input} literally {}", "[3, 1]")
    assert got == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nUse {input} literally {}\n\n### Input:\n[3, 1]\n\n### Response:\n"
    )


class FakeChatTokenizer:
    name_or_path = "fake"
    chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"

    def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
        assert add_generation_prompt is True and tokenize is False
        return "".join(f"<u>{m['content']}</u>" for m in messages) + "<a>"


def test_chat_template_path():
    tok = FakeChatTokenizer()
    assert render_prompt("Do it.", tokenizer=tok, use_chat_template=True) == "<u>Do it.</u><a>"
    assert render_prompt("Do it.", "x", tokenizer=tok, use_chat_template=True) == "<u>Do it.\n\nx</u><a>"


def test_chat_template_errors():
    with pytest.raises(ValueError) as info:
        render_prompt("x", use_chat_template=True)
    assert str(info.value) == "use_chat_template=True needs a tokenizer, got tokenizer=None"

    class NoTemplate:
        name_or_path = "tiny"
        chat_template = None

    with pytest.raises(ValueError) as info:
        render_prompt("x", tokenizer=NoTemplate(), use_chat_template=True)
    assert str(info.value) == (
        "use_chat_template=True but the tokenizer (NoTemplate, 'tiny') has no chat_template; "
        "set use_chat_template=False to use the Alpaca template"
    )
