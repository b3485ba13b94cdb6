"""encode edges, expected ids written out by hand: the input field in the Alpaca prompt, the
defaults of prompt_ids, encode_many forwarding its options, max_length = 2, and tokenizers that
lack the BOS / EOS attributes altogether."""

import pytest

from wmtp_fn.data.encode import encode, encode_many, prompt_ids
from wmtp_fn.data.schema import Record

X = -100
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{i}\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:\n")


def ids(text):
    return [ord(c) + 10 for c in text]


class CharTokenizer:
    """Token id = code point + 10; BOS 1, EOS 2; the chat template is `[U]content[A]`."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = "char"

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": ids(text)}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "[U]" + messages[0]["content"] + "[A]"


class Bare:
    """A tokenizer object with no bos_token_id / eos_token_id attributes at all."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ids(text)}


class BareWithEos(Bare):
    eos_token_id = 2


def rec(instruction="i", input="", output="ab"):
    return Record("p", instruction, input, output, True, 1)


def test_the_input_field_is_part_of_the_prompt():
    ex = encode(rec("do", "ctx"), CharTokenizer(), max_length=1000)
    prompt = [1] + ids(WITH_INPUT.format(i="do", x="ctx"))
    assert ex["input_ids"] == prompt + [107, 108, 2]
    assert ex["labels"] == [X] * len(prompt) + [107, 108, 2]
    chat = encode(rec("do", "ctx"), CharTokenizer(), max_length=1000, use_chat_template=True)
    assert chat["input_ids"] == [1] + ids("[U]do\n\nctx[A]") + [107, 108, 2]


def test_prompt_ids_defaults_are_bos_and_alpaca():
    assert prompt_ids(rec("q"), CharTokenizer()) == [1] + ids(NO_INPUT.format(i="q"))


def test_encode_many_forwards_its_options():
    tok = CharTokenizer()
    [plain] = encode_many([rec("q")], tok, max_length=1000, add_bos=False)
    assert plain["input_ids"] == ids(NO_INPUT.format(i="q")) + [107, 108, 2]
    [chat] = encode_many([rec("q")], tok, max_length=1000, use_chat_template=True)
    assert chat["input_ids"] == [1] + ids("[U]q[A]") + [107, 108, 2]


def test_max_length_two_is_bos_plus_one_response_token():
    class Empty(CharTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return ""

    ex = encode(rec(output="ab"), Empty(), max_length=2, use_chat_template=True)
    assert ex == {"input_ids": [1, 107], "labels": [X, 107], "is_correct": True}


def test_tokenizers_without_the_special_token_attributes():
    ex = encode(rec(output="a"), BareWithEos(), max_length=1000)  # no BOS attribute: none added
    assert ex["input_ids"] == ids(NO_INPUT.format(i="i")) + [107, 2]
    with pytest.raises(ValueError) as info:
        encode(rec(), Bare(), max_length=1000)
    assert str(info.value) == "tokenizer Bare has no eos_token_id: the target must end with EOS"
