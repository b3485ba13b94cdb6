"""Batches for the train step: sampled records of an indexed file, read by offset, tokenised,
collated and moved to the device, one optimizer step at a time from a resumable cursor."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from wmtp_fn.data.collate import collate
from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.encode import Example, encode_many
from wmtp_fn.data.index import Index, build_index, check_fresh, read_many, subset
from wmtp_fn.data.sampling import Cursor, next_batch, sample_by_difficulty
from wmtp_fn.data.schema import DataError
from wmtp_fn.data.split import configured_held_out, run_splits
from wmtp_fn.errors import ConfigError
from wmtp_fn.models.llama import right_padded

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RecordSet:
    """Sampled records of one indexed JSONL file, read by offset when a batch needs them."""

    index: Index
    offsets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.offsets)


def record_sets(data_cfg: ConfigDict, seed: int) -> tuple[RecordSet, RecordSet]:
    """Train and validation records by difficulty sampling (docs/data.md, "Sampling"): the
    validation file, or `val_fraction` of the train file's problems; the problems of
    `data.heldout_fraction` (an evaluation split) are in neither."""
    train_index, val_index = split_indexes(data_cfg, seed)
    bins, weights = dict(data_cfg.difficulty_bins), dict(data_cfg.difficulty_weights)
    ratio = float(data_cfg.correct_ratio)

    def draw(idx: Index, n: int) -> RecordSet:
        available = _count_in_bins(idx, bins, correct=ratio >= 1.0)
        n = min(n, available) if n else available
        if n == 0:
            raise DataError(idx["path"], f"no records in difficulty bins {bins} to sample from")
        offsets = sample_by_difficulty(idx, n_samples=n, seed=seed, bins=bins, weights=weights, correct_ratio=ratio)
        return RecordSet(idx, tuple(offsets))

    return draw(train_index, data_cfg.n_samples), draw(val_index, data_cfg.val_n_samples)


def trained_problem_ids(flat_config: Mapping[str, object]) -> set[str]:
    """The problem ids a run could have trained on, from its saved flat config (`config.json`,
    or the `config` of an adapter's metadata): its train file's problems minus the held-out and
    validation ones. What an evaluation must not score as unseen."""
    data = ConfigDict({k.removeprefix("data."): v for k, v in flat_config.items()
                       if k.startswith("data.") and k.count(".") == 1})
    return set(split_indexes(data, int(flat_config["seed"]))[0]["problems"])


def split_indexes(data_cfg: ConfigDict, seed: int) -> tuple[Index, Index]:
    """The train and validation indexes: `data.train_path` (the embedded data when empty) less
    the `data.heldout_fraction` problems, and `data.val_path`, or `val_fraction` of the rest."""
    train_path = data_cfg.train_path or str(embedded_dataset_path())
    index = build_index(_input_file(train_path, "data.train_path"))
    if data_cfg.get("val_path"):
        rest, _ = configured_held_out(index, data_cfg)
        return subset(index, rest), build_index(_input_file(data_cfg.val_path, "data.val_path"))
    train_ids, val_ids, _ = run_splits(index, data_cfg, seed)
    return subset(index, train_ids), subset(index, val_ids)


def _input_file(path: str, key: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path!r} is not a file (expected a JSONL file of records, see docs/data.md)")
    return path


def _count_in_bins(index: Index, bins: Mapping[str, Sequence[int]], *, correct: bool) -> int:
    total = 0
    for entry in index["problems"].values():
        if any(lo <= entry["difficulty"] <= hi for lo, hi in bins.values()):
            total += len(entry["correct_offsets"]) + (0 if correct else len(entry["incorrect_offsets"]))
    return total


def encoded_examples(
    index: Index, offsets: Sequence[int], tokenizer, data_cfg: ConfigDict
) -> tuple[list[Example | None], list[DataError]]:
    """The records at `offsets` of `index`, tokenised: one `Example` per offset, None where the
    record was skipped as too long (only with `data.too_long = "skip"`), and those errors."""
    check_fresh(index)  # the offsets belong to the file as it was indexed
    skipped: list[DataError] = []
    out: list[Example | None] = []
    for record in read_many(index["path"], offsets):
        got = encode_many([record], tokenizer, max_length=data_cfg.max_length,
                          use_chat_template=data_cfg.use_chat_template, on_error=data_cfg.too_long, skipped=skipped)
        out.append(got[0] if got else None)
    return out, skipped


def encoded_batches(
    records: RecordSet, items: Sequence[int], tokenizer, data_cfg: ConfigDict, *, micro_batch_size: int
) -> tuple[list[Batch], list[DataError]]:
    """Read, tokenise and collate `items` of `records` into micro-batches (CPU tensors); returns
    them with the records skipped as too long (only with `data.too_long = "skip"`)."""
    found, skipped = encoded_examples(records.index, [records.offsets[i] for i in items], tokenizer, data_cfg)
    examples = [ex for ex in found if ex is not None]
    batches = [
        collate(examples[i : i + micro_batch_size], pad_id=tokenizer.pad_token_id,
                pad_to_multiple_of=data_cfg.pad_to_multiple_of or None)
        for i in range(0, len(examples), micro_batch_size)
    ]
    return batches, skipped


def batch_stream(
    records: RecordSet, tokenizer, data_cfg: ConfigDict, *, batch_size: int, micro_batch_size: int, device: torch.device
) -> Callable[[Cursor], tuple[list[Batch], Cursor]]:
    """`next_batch(cursor) -> (micro_batches on device, cursor)`: seeded, epoch-permuted,
    resumable. A record skipped as too long is reported as it happens; a whole epoch of them is
    an error (there is nothing to train on)."""

    def encode(items: list[int]) -> tuple[list[Batch], list[DataError]]:
        return encoded_batches(records, items, tokenizer, data_cfg, micro_batch_size=micro_batch_size)

    return item_stream(len(records), encode, batch_size=batch_size, device=device, where=records.index["path"],
                       noun="records sampled for training", max_length=data_cfg.max_length)


def item_stream(
    n_items: int, encode: Callable[[list[int]], tuple[list, list[DataError]]], *, batch_size: int,
    device: torch.device, where: str, noun: str, max_length: int,
) -> Callable[[Cursor], tuple[list, Cursor]]:
    """`next_batch(cursor)` over `n_items` items of any kind: the cursor's next `batch_size`
    item indices (`sampling.next_batch`), `encode`d into CPU micro-batches (a batch, or a
    mapping of batches such as `{"pos", "neg"}`) and moved to `device`. Items skipped by
    `encode` are reported; a whole epoch of them is an error located at `where` ("none of the
    {n_items} {noun} fits max_length")."""

    def next_(cursor: Cursor):
        tried: set[int] = set()
        while True:
            items, cursor = next_batch(n_items, batch_size, cursor)
            mbs, skipped = encode(items)
            for error in skipped:
                tqdm.write(f"warning: skipped (too long): {error}")
            if mbs:
                return [to_device(mb, device) for mb in mbs], cursor
            tried.update(items)
            if len(tried) == n_items:
                raise DataError(
                    where,
                    f"none of the {n_items} {noun} fits max_length={max_length} "
                    "(every prompt leaves no room for a response token); raise data.max_length",
                )

    return next_


def to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    """Move a CPU batch (or a mapping of batches, such as a critic's `{"pos", "neg"}`, each
    moved alike). A mask of an unpadded or right-padded batch is dropped (decided on the
    CPU, no sync): causal attention never looks right, so the loss is unchanged, and attention
    takes its unmasked causal kernel."""
    if all(isinstance(v, Mapping) for v in batch.values()):
        return {k: to_device(v, device) for k, v in batch.items()}
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "attention_mask"}
    mask = batch.get("attention_mask")
    if mask is not None and not right_padded(mask):
        out["attention_mask"] = mask.to(device, non_blocking=True)
    return out
