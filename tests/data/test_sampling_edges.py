"""Sampler argument edges and exact messages, length-balanced pairs through `sample_pairs`,
pairs that depend on the seed and differ between problems, a cursor made by hand, and the
random streams pinned (a resumed run must recompute exactly the samples it started with)."""

import collections

import numpy as np
import pytest

from wmtp_fn.data.sampling import (
    Cursor,
    epoch_permutation,
    next_batch,
    problem_pairs,
    sample_by_difficulty,
    sample_pairs,
)


def make_index(spec):
    """spec: {pid: (difficulty, n_correct, n_incorrect)}; offsets 0, 100, 200, … in order."""
    problems, o = {}, 0
    for pid, (d, nc, ni) in spec.items():
        problems[pid] = {"difficulty": d, "correct_offsets": list(range(o, o + 100 * nc, 100)),
                         "incorrect_offsets": list(range(o + 100 * nc, o + 100 * (nc + ni), 100))}
        o += 100 * (nc + ni)
    return {"path": "x", "size": o, "n_records": o // 100, "problems": problems}


INDEX = make_index({"a": (2, 8, 8), "b": (2, 8, 8), "c": (12, 3, 2)})


def message(fn, *args, error=ValueError, **kwargs):
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    return str(info.value) if error is not KeyError else info.value.args[0]


def test_bin_validation_messages():
    two = {"a": [1, 5], "b": [6, 9]}
    assert message(sample_by_difficulty, INDEX, n_samples=1, seed=0, bins=two, weights={"z": 1, "a": 1, "b": 1}) == (
        "difficulty_weights names unknown bin 'z' (bins: a, b)")
    assert message(sample_by_difficulty, INDEX, n_samples=1, seed=0, bins={"a": [1, 2, 3]}, weights={"a": 1}) == (
        "difficulty_bins['a']: expected [lo, hi] ints with lo <= hi, got [1, 2, 3]")
    assert message(sample_by_difficulty, INDEX, n_samples=1, seed=0, bins={"a": [1, 2.0]}, weights={"a": 1}) == (
        "difficulty_bins['a']: expected [lo, hi] ints with lo <= hi, got [1, 2.0]")
    for bad in (True, "1", float("inf"), float("nan")):
        assert message(sample_by_difficulty, INDEX, n_samples=1, seed=0, bins={"a": [1, 5]}, weights={"a": bad}) == (
            f"difficulty_weights['a']: expected a finite number >= 0, got {bad!r}")


def test_a_bin_of_one_difficulty_and_a_zero_weight_bin():
    out = sample_by_difficulty(INDEX, n_samples=6, seed=0, bins={"two": [2, 2], "hi": [12, 12]},
                               weights={"two": 1.0, "hi": 0})
    assert len(out) == 6 and all(o < 3200 for o in out)  # only problems a and b (difficulty 2)


def test_a_single_missing_sample_is_an_error():
    index = make_index({"x": (3, 5, 0)})
    assert message(sample_by_difficulty, index, n_samples=4, seed=0, correct_ratio=0.75) == (
        "bin 'all' [1, 25]: 1 incorrect samples requested but the bin has no incorrect records (1 problems)")


def test_pair_argument_messages():
    assert message(sample_pairs, INDEX, seed=0, max_pairs_per_problem=0) == (
        "max_pairs_per_problem must be an int >= 1, got 0")
    assert message(sample_pairs, INDEX, seed=0, max_pairs_per_problem=2.0) == (
        "max_pairs_per_problem must be an int >= 1, got 2.0")
    lengths = {o: 10 for e in INDEX["problems"].values() for o in e["correct_offsets"] + e["incorrect_offsets"]}
    for bad in (0, 2.0):
        assert message(sample_pairs, INDEX, seed=0, lengths=lengths, length_bucket=bad) == (
            f"length_bucket must be an int >= 1, got {bad!r}")
    for bad in (-1, 1.0):
        assert message(sample_pairs, INDEX, seed=0, n_pairs=bad) == f"n_pairs must be an int >= 0 or None, got {bad!r}"
    assert message(sample_pairs, INDEX, seed=0, bins={"a": [10, 20], "b": [1, 10]}, weights={"a": 1, "b": 1}) == (
        "difficulty_bins overlap ('a' [10, 20] and 'b' [1, 10]): pairs must be unique")
    assert message(problem_pairs, INDEX, "c", seed=0, max_pairs_per_problem=3, lengths={0: 1},
                   length_bucket=4, error=KeyError) == "lengths has no token length for the record at byte offset 3200"


def test_pair_counts_at_the_edges():
    assert len(sample_pairs(INDEX, seed=0)) == 60 + 60 + 6  # default cap 60 of the 64 pairs of a and b
    assert sample_pairs(INDEX, seed=0, n_pairs=0) == []
    every = sample_pairs(INDEX, seed=0, max_pairs_per_problem=3)
    exact = sample_pairs(INDEX, seed=0, max_pairs_per_problem=3, n_pairs=len(every))  # all of them: allowed
    assert sorted(exact) == sorted(every) and len(set(exact)) == 9
    # length_bucket 1: every token length is its own bucket
    lengths = {o: o // 100 % 2 for e in INDEX["problems"].values() for o in e["correct_offsets"] + e["incorrect_offsets"]}
    pairs = sample_pairs(INDEX, seed=0, max_pairs_per_problem=100, lengths=lengths, length_bucket=1)
    assert pairs and all(lengths[p] == lengths[n] for p, n in pairs)
    # without balancing, pairs across the two length classes exist
    assert any(lengths[p] != lengths[n] for p, n in sample_pairs(INDEX, seed=0, max_pairs_per_problem=100))


def test_length_balancing_reaches_every_problem_through_sample_pairs():
    lengths = {}
    for e in INDEX["problems"].values():
        for i, o in enumerate(e["correct_offsets"] + e["incorrect_offsets"]):
            lengths[o] = 10 * i  # buckets of width 25 hold 2–3 records
    got = sample_pairs(INDEX, seed=1, max_pairs_per_problem=100, lengths=lengths, length_bucket=25)
    want = {pid: problem_pairs(INDEX, pid, seed=1, max_pairs_per_problem=100, lengths=lengths, length_bucket=25)
            for pid in INDEX["problems"]}
    assert all(lengths[p] // 25 == lengths[n] // 25 for p, n in got)
    assert sorted(got) == sorted(pair for pairs in want.values() for pair in pairs)
    assert collections.Counter(p // 1600 if p < 3200 else 2 for p, _ in got)[2] == len(want["c"])


def positions(index, pid, pairs):
    e = index["problems"][pid]
    return sorted((e["correct_offsets"].index(p), e["incorrect_offsets"].index(n)) for p, n in pairs)


def test_pairs_depend_on_the_seed_and_differ_between_problems():
    """a and b have the same shape (8 × 8): drawn from independent streams their pairs differ,
    and another seed draws other pairs (5 of 64: equal sets by chance are ~1e-7 likely)."""
    a1 = positions(INDEX, "a", problem_pairs(INDEX, "a", seed=1, max_pairs_per_problem=5))
    b1 = positions(INDEX, "b", problem_pairs(INDEX, "b", seed=1, max_pairs_per_problem=5))
    a2 = positions(INDEX, "a", problem_pairs(INDEX, "a", seed=2, max_pairs_per_problem=5))
    assert len(set(a1)) == 5 and a1 != b1 and a1 != a2


def test_next_batch_messages():
    assert message(next_batch, 0, 2, Cursor(0)) == "n_items must be an int >= 1, got 0"
    assert message(next_batch, 3.0, 2, Cursor(0)) == "n_items must be an int >= 1, got 3.0"
    assert message(next_batch, 3, 0, Cursor(0)) == "batch_size must be an int >= 1, got 0"
    assert message(next_batch, 3, 1.0, Cursor(0)) == "batch_size must be an int >= 1, got 1.0"
    assert message(next_batch, 5, 2, Cursor(0, 0, 5)) == (
        "cursor position 5 is outside an epoch of 5 items (was the cursor saved for a different dataset?)")


def test_a_cursor_in_the_dropped_tail_moves_to_the_next_epoch():
    """A cursor saved without drop_last (position 8 of 10) resumed with drop_last and batches of 4:
    the 2 items left cannot make a batch, so the batch is the start of the next epoch."""
    batch, cursor = next_batch(10, 4, Cursor(1, 3, 8), drop_last=True)
    assert batch == epoch_permutation(10, 1, 4).tolist()[:4]
    assert cursor == Cursor(1, 4, 4)
    batch, cursor = next_batch(10, 4, Cursor(1, 3, 6), drop_last=True)  # 4 left: still this epoch
    assert batch == epoch_permutation(10, 1, 3).tolist()[6:10] and cursor == Cursor(1, 4, 0)


def test_random_streams_are_pinned():
    """The samples of a seed are part of a run's resumable state: a checkpoint's cursor is only
    meaningful if later code recomputes the same epoch orders, samples and pairs. These values
    were recorded once; if they change, saved runs no longer resume onto the same data."""
    assert epoch_permutation(8, 7, 0).tolist() == [7, 3, 6, 5, 4, 2, 1, 0]
    assert epoch_permutation(8, 7, 1).tolist() == [6, 4, 5, 0, 1, 3, 2, 7]
    assert sample_by_difficulty(INDEX, n_samples=5, seed=7, correct_ratio=0.6) == [1800, 1100, 800, 3200, 500]
    assert problem_pairs(INDEX, "a", seed=7, max_pairs_per_problem=3) == [(300, 800), (400, 1500), (100, 1200)]
    assert sample_pairs(INDEX, seed=7, max_pairs_per_problem=1) == [(500, 900), (2100, 2800), (3300, 3500)]
    # and they are what the documented derivation gives: PCG64 seeded with SeedSequence([seed, ...])
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 4, 1])))
    assert epoch_permutation(8, 7, 1).tolist() == gen.permutation(8).tolist()
