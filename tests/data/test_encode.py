"""Tokenisation: prompt masking, BOS/EOS, truncation, too-long prompts (golden by hand).

A character-level fake tokenizer makes the expected ids computable by hand; the boundary test
with the real embedded BPE tokenizer is in test_embedded.py.
"""

import pytest

from wmtp_fn.data.encode import encode, encode_many
from wmtp_fn.data.schema import DataError, Record
from wmtp_fn.data.template import render_prompt

X = -100


class CharTokenizer:
    """Token id = code point + 10; 1 = BOS, 2 = EOS. "<s>" in text is the BOS token."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, template=None, bos=1):
        self.chat_template = template
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<s>", i):
                ids.append(1)
                i += 3
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return {"input_ids": ids}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<s>U:" + messages[0]["content"] + "\nA:"


def rec(output="ab", instruction="i", pid="p"):
    return Record(pid, instruction, "", output, True, 1)


def ids(text):
    return [ord(c) + 10 for c in text]


def test_layout_golden():
    tok = CharTokenizer()
    prompt = ids(render_prompt("i"))
    ex = encode(rec("ab"), tok, max_length=1000)
    assert ex["input_ids"] == [1] + prompt + [107, 108, 2]
    assert ex["labels"] == [X] * (1 + len(prompt)) + [107, 108, 2]
    assert ex["is_correct"] is True


def test_no_bos_when_absent_or_disabled():
    prompt = ids(render_prompt("i"))
    assert encode(rec("a"), CharTokenizer(bos=None), max_length=1000)["input_ids"] == prompt + [107, 2]
    assert encode(rec("a"), CharTokenizer(), max_length=1000, add_bos=False)["input_ids"] == prompt + [107, 2]


def test_chat_template_bos_not_doubled():
    tok = CharTokenizer(template="x")
    ex = encode(rec("a", instruction="q"), tok, max_length=100, use_chat_template=True)
    assert ex["input_ids"] == [1] + ids("U:q\nA:") + [107, 2]
    assert ex["labels"] == [X] * 7 + [107, 2]


def test_truncation_keeps_prompt_cuts_response_end():
    tok = CharTokenizer()
    n_prompt = 1 + len(render_prompt("i"))
    ex = encode(rec("abcdef"), tok, max_length=n_prompt + 3)
    assert ex["input_ids"][n_prompt:] == [107, 108, 109]  # cut: no EOS
    assert ex["labels"] == [X] * n_prompt + [107, 108, 109]
    exact = encode(rec("ab"), tok, max_length=n_prompt + 3)  # fits exactly with EOS
    assert exact["input_ids"][n_prompt:] == [107, 108, 2]
    one = encode(rec("ab"), tok, max_length=n_prompt + 1)
    assert one["labels"][n_prompt:] == [107]


def test_prompt_too_long_error_and_skip():
    tok = CharTokenizer()
    n_prompt = 1 + len(render_prompt("i"))
    with pytest.raises(DataError) as info:
        encode(rec(pid="HumanEval/3"), tok, max_length=n_prompt)
    assert str(info.value) == (
        f"problem 'HumanEval/3': prompt is {n_prompt} tokens, max_length is {n_prompt}: "
        "no room for a response token"
    )
    skipped = []
    long = rec(pid="long", instruction="i" * 50)
    out = encode_many([rec(pid="a"), long, rec(pid="b")], tok, max_length=n_prompt + 5,
                      on_error="skip", skipped=skipped)
    assert len(out) == 2
    assert [str(e) for e in skipped] == [
        f"problem 'long': prompt is {n_prompt + 49} tokens, max_length is {n_prompt + 5}: "
        "no room for a response token"
    ]
    with pytest.raises(DataError):
        encode_many([long], tok, max_length=n_prompt + 5)


def test_argument_errors():
    with pytest.raises(ValueError) as info:
        encode(rec(), CharTokenizer(), max_length=1)
    assert str(info.value) == "max_length must be >= 2, got 1"

    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError) as info:
        encode(rec(), NoEos(), max_length=100)
    assert str(info.value) == "tokenizer NoEos has no eos_token_id: the target must end with EOS"
