"""Per-rank shards of each step's batch, from the one resumable cursor.

Every rank walks the same `Cursor` and builds the same global batch of micro-batches (reading
and tokenising a step's records is cheap next to its forward); rank `r` of `W` then keeps the
`r`-th of `W` contiguous blocks of them. So the cursor — what checkpoints save — is global:
a run resumed on another number of ranks continues the same data order, and the step's
objective (global sums over global counts, `train.step`) is the same as on one process.

Every rank must run the same number of micro-batches: each one runs the sharded base's
forward and backward, whose all-gathers are collectives. A step whose micro-batches do not
split evenly over the ranks is refused with a message naming the sizes (`check_even` checks
the two batch sizes a run can meet, before anything is written).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from wmtp_fn.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C")


def rank_block(n: int, rank: int, world_size: int) -> range:
    """The indices of rank `rank`'s block when `n` items split into `world_size` equal
    contiguous blocks (`n` must be a multiple of `world_size`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if n % world_size:
        raise ValueError(f"{n} items do not split evenly over {world_size} ranks")
    size = n // world_size
    return range(rank * size, (rank + 1) * size)


def shard(micro_batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s share of one step's micro-batches (all of them in a world of one).
    Raises `ValueError` naming the counts when they do not split evenly."""
    if len(micro_batches) % world_size:
        raise ValueError(
            f"this step's batch has {len(micro_batches)} micro-batches, which do not split evenly over "
            f"{world_size} ranks (every rank must run the same number); choose train.batch_size and "
            "train.micro_batch_size so that batch_size / micro_batch_size is a multiple of the ranks"
            " (records skipped as too long can also shorten a batch)"
        )
    return [micro_batches[i] for i in rank_block(len(micro_batches), rank, world_size)]


def micro_batch_count(n_items: int, micro_batch_size: int) -> int:
    """Micro-batches of at most `micro_batch_size` items that `n_items` items make."""
    return -(-n_items // micro_batch_size)


def check_even(n_items: int, batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """Refuse (`ConfigError`) a run whose steps would not split evenly over `world_size` ranks:
    a full batch of `batch_size` items and, when `n_items` is not a multiple of it, the
    shorter last batch of an epoch must each make a multiple of `world_size` micro-batches."""
    if world_size == 1:
        return
    sizes = [min(batch_size, n_items)]
    if n_items > batch_size and n_items % batch_size:
        sizes.append(n_items % batch_size)
    for size in sizes:
        n = micro_batch_count(size, micro_batch_size)
        if n % world_size:
            what = "a step's batch" if size == sizes[0] else f"the last batch of each epoch ({n_items} % {batch_size})"
            raise ConfigError(
                f"under {world_size} ranks, {what} of {size} records makes {n} micro-batches of at most "
                f"train.micro_batch_size={micro_batch_size}, not a multiple of {world_size}; choose "
                "train.batch_size / train.micro_batch_size so that every batch splits evenly over the ranks"
            )


def sharded_stream(next_batch: Callable[[C], tuple[list[Any], C]], rank: int, world_size: int) -> Callable[[C], tuple[list[Any], C]]:
    """`next_batch(cursor) -> (micro_batches, cursor)` of the whole step -> the same with only
    rank `rank`'s share of the micro-batches; the cursor advances over the whole step."""
    if world_size == 1:
        return next_batch

    def next_(cursor: C) -> tuple[list[Any], C]:
        micro_batches, cursor = next_batch(cursor)
        return shard(micro_batches, rank, world_size), cursor

    return next_
