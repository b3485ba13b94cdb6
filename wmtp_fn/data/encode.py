"""Tokenising a record into ``input_ids`` and prompt-masked ``labels``.

(Named ``encode`` rather than ``tokenize`` so it never shadows the standard library module.)

Layout of one example, ``P`` prompt tokens and ``R`` response tokens::

    input_ids = [BOS] + prompt_ids + output_ids + [EOS]
    labels    = [-100] * (1 + P)   + output_ids + [EOS]

- The prompt and the output are tokenised separately (``add_special_tokens=False``) and
  concatenated, so the prompt/response boundary is exact: no token straddles it, and the
  first label is the first token of the output however the tokenizer would merge across it.
- BOS: prepended when ``add_bos`` (default) and the tokenizer has a ``bos_token_id``, unless the
  rendered prompt already starts with it (chat templates often write BOS as text). Llama-style
  models expect it; pass ``add_bos=False`` for tokenizers that do not use one (GPT-2, Qwen).
- EOS ends the target so the model learns to stop; a tokenizer without ``eos_token_id`` is an
  error.
- Truncation keeps the whole prompt and cuts the response end to fit ``max_length``. A cut
  response has no EOS (the answer did not end there). A prompt that leaves no room for even
  one response token (``len(prompt) >= max_length``) is an error naming the problem and the
  lengths, or, with ``on_error="skip"`` in ``encode_many``, a reported skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

from wmtp_fn.data.jsonl import OnError, check_on_error
from wmtp_fn.data.schema import DataError, Record
from wmtp_fn.data.template import render_prompt

IGNORE_INDEX = -100


class Example(TypedDict):
    """One tokenised record. ``input_ids``/``labels``: [T] with T <= max_length."""

    input_ids: list[int]
    labels: list[int]
    is_correct: bool


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(
    record: Record, tokenizer: Any, *, add_bos: bool = True, use_chat_template: bool = False
) -> list[int]:
    """Token ids of the rendered prompt, with BOS per the module's policy."""
    ids = _ids(
        tokenizer,
        render_prompt(
            record.instruction, record.input, tokenizer=tokenizer, use_chat_template=use_chat_template
        ),
    )
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def encode(
    record: Record,
    tokenizer: Any,
    *,
    max_length: int,
    add_bos: bool = True,
    use_chat_template: bool = False,
) -> Example:
    """Record → ``Example`` (see the module docstring for layout, BOS/EOS and truncation)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id: the target must end with EOS"
        )
    prompt = prompt_ids(record, tokenizer, add_bos=add_bos, use_chat_template=use_chat_template)
    if len(prompt) >= max_length:
        raise DataError(
            f"problem {record.problem_id!r}",
            f"prompt is {len(prompt)} tokens, max_length is {max_length}: "
            "no room for a response token",
        )
    response = _ids(tokenizer, record.output) + [eos]
    response = response[: max_length - len(prompt)]
    return Example(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        is_correct=record.is_correct,
    )


def encode_many(
    records: Iterable[Record],
    tokenizer: Any,
    *,
    max_length: int,
    add_bos: bool = True,
    use_chat_template: bool = False,
    on_error: OnError = "raise",
    skipped: list[DataError] | None = None,
) -> list[Example]:
    """``encode`` each record; with ``on_error="skip"`` too-long prompts go into ``skipped``."""
    check_on_error(on_error, skipped)
    out = []
    for record in records:
        try:
            out.append(
                encode(
                    record, tokenizer, max_length=max_length, add_bos=add_bos,
                    use_chat_template=use_chat_template,
                )
            )
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(e)  # type: ignore[union-attr]
    return out
