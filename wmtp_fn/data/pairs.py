"""Critic data: (correct, incorrect) pairs of the same problem, batched from a resumable cursor.

A `PairSet` is a list of `(correct_offset, incorrect_offset)` pairs of one indexed file, drawn
once by a pure function of the index, the rule and the seed (`data.sampling`), so a resumed run
recomputes it. Training walks it epoch by epoch in seeded permutations (`stream.item_stream`,
the same cursor as the record stream); validation takes every pair in the drawn order.

Pairing rules (`PAIRINGS`):

- `random`: `sample_pairs`, unique pairs, at most `max_pairs_per_problem` per problem;
- `length_balanced`: the same, both sides in one bucket of `length_bucket` response tokens;
- `seeds`: the seeds' rule (`seeds_pairs`), every record used at most once per problem;
- `seeds_length_balanced`: the seeds' rule within the seeds' length bins (`seeds_length_bin`).

Lengths are response tokens (the tokens a critic loss sees: output + EOS, after truncation);
a record too long to encode gets length −1, so it pairs only with other such records, and those
pairs are skipped, with a warning, when batched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from ml_collections import ConfigDict

from wmtp_fn.data.collate import collate_pairs
from wmtp_fn.data.encode import IGNORE_INDEX
from wmtp_fn.data.index import Index
from wmtp_fn.data.sampling import Cursor, _problems_in, check_bins, sample_pairs, seeds_pairs, seeds_problem_pairs
from wmtp_fn.data.schema import DataError
from wmtp_fn.data.stream import encoded_examples, item_stream, split_indexes

PAIRINGS = ("random", "length_balanced", "seeds", "seeds_length_balanced")
PairBatch = dict[str, dict[str, torch.Tensor]]  # {"pos": batch [P, T], "neg": batch [P, T]}


@dataclass(frozen=True)
class PairSet:
    """`(correct_offset, incorrect_offset)` pairs of one indexed JSONL file."""

    index: Index
    pairs: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.pairs)


def response_lengths(index: Index, tokenizer, data_cfg: ConfigDict) -> dict[int, int]:
    """`{offset: response tokens}` of every record of `index` (−1 for a record too long to encode)."""
    offsets = sorted(o for e in index["problems"].values() for o in e["correct_offsets"] + e["incorrect_offsets"])
    cfg = ConfigDict({**data_cfg.to_dict(), "too_long": "skip"})  # a too-long record is reported when batched
    examples, _ = encoded_examples(index, offsets, tokenizer, cfg)
    return {o: -1 if ex is None else sum(label != IGNORE_INDEX for label in ex["labels"]) for o, ex in zip(offsets, examples)}


def draw_pairs(
    index: Index, *, pairing: str, seed: int, n_pairs: int, max_pairs_per_problem: int,
    bins: Mapping[str, Sequence[int]], weights: Mapping[str, float], lengths: Mapping[int, int] | None = None,
    length_bucket: int = 32,
) -> list[tuple[int, int]]:
    """The pairs of `index` by rule `pairing` (module docstring); `n_pairs = 0` takes them all.
    `lengths` (`response_lengths`) is needed by the length-balanced rules only."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    balanced = pairing.endswith("length_balanced")
    if balanced and lengths is None:
        raise ValueError(f"pairing {pairing!r} needs the records' lengths")
    lengths = lengths if balanced else None
    if pairing in ("random", "length_balanced"):
        return sample_pairs(index, seed=seed, max_pairs_per_problem=max_pairs_per_problem, n_pairs=n_pairs or None,
                            bins=bins, weights=weights, lengths=lengths, length_bucket=length_bucket if balanced else None)
    if n_pairs == 0:  # every pair the seeds' rule gives in the bins
        problems = {pid for _, lo, hi, _ in check_bins(bins, weights) for pid in _problems_in(index, lo, hi)}
        n_pairs = sum(len(seeds_problem_pairs(index, pid, seed=seed, max_pairs_per_problem=max_pairs_per_problem,
                                              lengths=lengths)) for pid in sorted(problems))
        if n_pairs == 0:
            return []
    return seeds_pairs(index, n_pairs=n_pairs, seed=seed, bins=bins, weights=weights,
                       max_pairs_per_problem=max_pairs_per_problem, lengths=lengths)


def pair_sets(data_cfg: ConfigDict, critic_cfg: ConfigDict, tokenizer, seed: int) -> tuple[PairSet, PairSet]:
    """Train and validation pairs of the split `stream.split_indexes` gives: `critic.n_pairs`
    and `critic.val_n_pairs` (0 = all) by `critic.pairing`. A rule that cannot be met (too few
    pairs, no pair at all) is a `DataError` naming the file."""
    bins, weights = dict(data_cfg.difficulty_bins), dict(data_cfg.difficulty_weights)

    def draw(index: Index, n: int, key: str) -> PairSet:
        lengths = response_lengths(index, tokenizer, data_cfg) if critic_cfg.pairing.endswith("length_balanced") else None
        try:
            pairs = draw_pairs(index, pairing=critic_cfg.pairing, seed=seed, n_pairs=n, bins=bins, weights=weights,
                               max_pairs_per_problem=critic_cfg.max_pairs_per_problem, lengths=lengths,
                               length_bucket=critic_cfg.length_bucket)
        except ValueError as e:
            raise DataError(index["path"], f"{key}={n}, critic.pairing={critic_cfg.pairing!r}: {e}") from None
        if not pairs:
            raise DataError(index["path"], f"no (correct, incorrect) pair of one problem in difficulty bins {bins} "
                                           f"(critic.pairing={critic_cfg.pairing!r})")
        return PairSet(index, tuple(pairs))

    train_index, val_index = split_indexes(data_cfg, seed)
    return draw(train_index, critic_cfg.n_pairs, "critic.n_pairs"), draw(val_index, critic_cfg.val_n_pairs, "critic.val_n_pairs")


def encoded_pair_batches(
    pairs: PairSet, items: Sequence[int], tokenizer, data_cfg: ConfigDict, *, micro_batch_size: int
) -> tuple[list[PairBatch], list[DataError]]:
    """Read, tokenise and collate pairs `items` of `pairs` into micro-batches of
    `micro_batch_size` pairs (CPU tensors, `data.collate.collate_pairs`); a pair with a side
    skipped as too long is dropped and its error returned (once per distinct error)."""
    offsets = [o for i in items for o in pairs.pairs[i]]
    examples, skipped = encoded_examples(pairs.index, offsets, tokenizer, data_cfg)
    kept = [(pos, neg) for pos, neg in zip(examples[::2], examples[1::2]) if pos is not None and neg is not None]
    skipped = list({str(e): e for e in skipped}.values())  # both sides share a prompt: one report per record
    batches = [
        collate_pairs(kept[i : i + micro_batch_size], pad_id=tokenizer.pad_token_id,
                      pad_to_multiple_of=data_cfg.pad_to_multiple_of or None)
        for i in range(0, len(kept), micro_batch_size)
    ]
    return batches, skipped


def pair_stream(
    pairs: PairSet, tokenizer, data_cfg: ConfigDict, *, batch_size: int, micro_batch_size: int, device: torch.device
) -> Callable[[Cursor], tuple[list[PairBatch], Cursor]]:
    """`next_batch(cursor) -> (pair micro-batches on device, cursor)`, `batch_size` pairs per
    step: seeded, epoch-permuted, resumable, like `stream.batch_stream`."""

    def encode(items: list[int]):
        return encoded_pair_batches(pairs, items, tokenizer, data_cfg, micro_batch_size=micro_batch_size)

    return item_stream(len(pairs), encode, batch_size=batch_size, device=device, where=pairs.index["path"],
                       noun="pairs sampled for training", max_length=data_cfg.max_length)
