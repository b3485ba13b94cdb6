"""Per-rank shards of a step's micro-batches (`dist.sampler`), checked against the real
sampler's batches and by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wmtp_fn.data.sampling import Cursor, next_batch
from wmtp_fn.dist.sampler import check_even, micro_batch_count, rank_block, shard, sharded_stream
from wmtp_fn.errors import ConfigError


def test_rank_blocks_by_hand():
    assert [list(rank_block(6, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert list(rank_block(4, 0, 1)) == [0, 1, 2, 3]
    assert list(rank_block(0, 1, 2)) == []


@given(st.integers(1, 6), st.integers(0, 5))
def test_the_ranks_shards_in_order_are_the_whole_step(world, per_rank):
    mbs = [f"mb{i}" for i in range(world * per_rank)]
    shards = [shard(mbs, r, world) for r in range(world)]
    assert [m for s in shards for m in s] == mbs
    assert {len(s) for s in shards} == {per_rank}


def test_shard_refuses_an_uneven_step_and_a_rank_outside_the_world():
    with pytest.raises(ValueError) as got:
        shard(["a", "b", "c"], 0, 2)
    assert str(got.value) == (
        "this step's batch has 3 micro-batches, which do not split evenly over 2 ranks (every rank must run the "
        "same number); choose train.batch_size and train.micro_batch_size so that batch_size / micro_batch_size "
        "is a multiple of the ranks (records skipped as too long can also shorten a batch)"
    )
    with pytest.raises(ValueError, match=r"rank 2 is not in a world of 2"):
        rank_block(4, 2, 2)
    with pytest.raises(ValueError, match=r"rank -1 is not in a world of 2"):
        rank_block(4, -1, 2)
    with pytest.raises(ValueError, match=r"rank 0 is not in a world of 0"):
        rank_block(4, 0, 0)
    with pytest.raises(ValueError, match=r"5 items do not split evenly over 2 ranks"):
        rank_block(5, 1, 2)


def test_micro_batch_count_by_hand():
    assert [micro_batch_count(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def epoch_batch_sizes(n_items: int, batch_size: int) -> set[int]:
    """The batch sizes the real sampler yields over two epochs."""
    cursor, sizes = Cursor(seed=0), set()
    for _ in range(2 * (n_items // batch_size + 1)):
        items, cursor = next_batch(n_items, batch_size, cursor)
        sizes.add(len(items))
    return sizes


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 5), st.integers(1, 4))
def test_check_even_accepts_exactly_the_runs_whose_every_batch_splits(n_items, batch_size, mbs, world):
    splits = all(micro_batch_count(b, mbs) % world == 0 for b in epoch_batch_sizes(n_items, batch_size))
    if splits or world == 1:
        check_even(n_items, batch_size, mbs, world)
    else:
        with pytest.raises(ConfigError, match=f"under {world} ranks"):
            check_even(n_items, batch_size, mbs, world)


def test_check_even_names_the_batch_that_does_not_split():
    check_even(16, 4, 2, 2)  # 2 micro-batches in every step
    check_even(18, 4, 1, 2)  # the last batch of 2 records: 2 micro-batches too
    with pytest.raises(ConfigError, match=r"a step's batch of 4 records makes 1 micro-batches .*micro_batch_size=4"):
        check_even(16, 4, 4, 2)
    with pytest.raises(ConfigError) as got:
        check_even(18, 4, 2, 2)
    assert str(got.value) == (
        "under 2 ranks, the last batch of each epoch (18 % 4) of 2 records makes 1 micro-batches of at most "
        "train.micro_batch_size=2, not a multiple of 2; choose train.batch_size / train.micro_batch_size so that "
        "every batch splits evenly over the ranks"
    )
    with pytest.raises(ConfigError, match=r"a step's batch of 3 records makes 3 micro-batches"):
        check_even(3, 8, 1, 2)  # fewer records than a batch: the one batch is all of them


def test_sharded_stream_advances_the_one_cursor_over_the_whole_step():
    def whole(cursor: int):
        return [f"{cursor}.{i}" for i in range(4)], cursor + 1

    assert sharded_stream(whole, 0, 1) is whole
    for rank, want in ((0, ["7.0", "7.1"]), (1, ["7.2", "7.3"])):
        assert sharded_stream(whole, rank, 2)(7) == (want, 8)
