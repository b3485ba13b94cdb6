"""Collation: lists of token ids → padded tensors.

Policy (explicit, never silent):
- Right padding. ``input_ids`` padding is ``pad_id``, ``labels`` padding is -100,
  ``attention_mask`` is 1 on real tokens and 0 on padding.
- ``T`` = the longest example, rounded up to ``pad_to_multiple_of`` when given, and capped at
  ``max_length`` when given. Collation never truncates: an example longer than ``max_length``
  is an error (truncation belongs to ``encode``, which knows where the prompt ends).
- ``is_correct [B] bool`` is produced when every example has it; some but not all is an error.
- ``collate_pairs`` pads both sides of every pair to one common ``T`` so the ``pos`` and ``neg``
  batches can be stacked, and checks that both sides of a pair share the same prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wmtp_fn.data.encode import IGNORE_INDEX


def _check_example(i: int, ex: Mapping[str, Any], what: str) -> None:
    ids, labels = ex.get("input_ids"), ex.get("labels")
    if ids is None or labels is None:
        raise ValueError(f"{what} {i}: expected keys 'input_ids' and 'labels', got {sorted(ex)}")
    if len(ids) == 0:
        raise ValueError(f"{what} {i}: empty input_ids")
    if len(labels) != len(ids):
        raise ValueError(
            f"{what} {i}: labels has {len(labels)} tokens, input_ids has {len(ids)}"
        )


def padded_length(
    lengths: Sequence[int], *, max_length: int | None = None, pad_to_multiple_of: int | None = None
) -> int:
    """The common ``T`` for sequences of ``lengths`` under the module's policy."""
    longest = max(lengths)
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"an example has {longest} tokens, more than max_length={max_length} "
            "(collate never truncates; truncate in encode)"
        )
    t = longest
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    if max_length is not None:
        t = min(t, max_length)
    return t


def _pad(examples: Sequence[Mapping[str, Any]], t: int, pad_id: int) -> dict[str, torch.Tensor]:
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    has = ["is_correct" in ex for ex in examples]
    if any(has):
        if not all(has):
            missing = has.index(False)
            raise ValueError(f"example {missing}: no 'is_correct' while other examples have it")
        batch["is_correct"] = torch.tensor([bool(ex["is_correct"]) for ex in examples])
    return batch


def collate(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Examples → ``input_ids [B,T] long``, ``attention_mask [B,T] long``, ``labels [B,T] long``
    and, when present, ``is_correct [B] bool``."""
    if len(examples) == 0:
        raise ValueError("collate needs at least one example, got 0")
    for i, ex in enumerate(examples):
        _check_example(i, ex, "example")
    t = padded_length(
        [len(ex["input_ids"]) for ex in examples],
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return _pad(examples, t, pad_id)


def prompt_length(labels: Sequence[int]) -> int:
    """Number of leading masked tokens (the prompt)."""
    n = 0
    for label in labels:
        if label != IGNORE_INDEX:
            break
        n += 1
    return n


def collate_pairs(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    pad_id: int,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``(pos, neg)`` example pairs → ``{"pos": batch, "neg": batch}``, both ``[B, T]``, one T."""
    if len(pairs) == 0:
        raise ValueError("collate_pairs needs at least one pair, got 0")
    for i, (pos, neg) in enumerate(pairs):
        _check_example(i, pos, "pair pos")
        _check_example(i, neg, "pair neg")
        n_pos, n_neg = prompt_length(pos["labels"]), prompt_length(neg["labels"])
        if n_pos != n_neg or list(pos["input_ids"][:n_pos]) != list(neg["input_ids"][:n_neg]):
            raise ValueError(
                f"pair {i}: pos and neg prompts differ ({n_pos} vs {n_neg} prompt tokens); "
                "both sides of a pair must answer the same prompt"
            )
    lengths = [len(ex["input_ids"]) for pair in pairs for ex in pair]
    t = padded_length(lengths, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
    return {
        "pos": _pad([p for p, _ in pairs], t, pad_id),
        "neg": _pad([n for _, n in pairs], t, pad_id),
    }
