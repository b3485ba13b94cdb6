"""Sampler boundaries against hand-computed expectations: the epoch batcher when the batch size
divides the item count (no full batch lost with drop_last), correct_ratio rounding (half up),
the split of samples across difficulty bins (largest remainder, ties by name)."""

import collections

import pytest

from wmtp_fn.data.sampling import Cursor, epoch_permutation, next_batch, sample_by_difficulty


def batches(n, bs, seed, drop_last, count):
    cursor, out = Cursor(seed), []
    for _ in range(count):
        batch, cursor = next_batch(n, bs, cursor, drop_last=drop_last)
        out.append(batch)
    return out, cursor


@pytest.mark.parametrize("n, bs", [(8, 4), (12, 3), (6, 6), (5, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_size_dividing_the_items_uses_every_item_each_epoch(n, bs, drop_last):
    per_epoch = n // bs
    got, cursor = batches(n, bs, seed=3, drop_last=drop_last, count=2 * per_epoch)
    for e in range(2):
        perm = epoch_permutation(n, 3, e).tolist()
        assert got[e * per_epoch:(e + 1) * per_epoch] == [perm[i:i + bs] for i in range(0, n, bs)]
    assert cursor == Cursor(3, 2, 0)


@pytest.mark.parametrize(
    "n, bs, drop_last, sizes, end",
    [
        # 10 items in 4s: 4, 4, then the short 2 (or, with drop_last, straight to the next epoch)
        (10, 4, False, [4, 4, 2, 4, 4, 2], Cursor(1, 2, 0)),
        (10, 4, True, [4, 4, 4, 4], Cursor(1, 2, 0)),
        # 7 in 3s: 3, 3, 1 / 3, 3
        (7, 3, False, [3, 3, 1, 3], Cursor(1, 1, 3)),
        (7, 3, True, [3, 3, 3, 3, 3], Cursor(1, 2, 3)),
        # one batch is the whole epoch
        (4, 4, True, [4, 4, 4], Cursor(1, 3, 0)),
        # n − bs·k = bs − 1 left over: dropped
        (11, 4, True, [4, 4, 4], Cursor(1, 1, 4)),
    ],
)
def test_batch_sizes_and_cursor_by_hand(n, bs, drop_last, sizes, end):
    got, cursor = batches(n, bs, seed=1, drop_last=drop_last, count=len(sizes))
    assert [len(b) for b in got] == sizes
    assert cursor == end


def make_index(n_correct, n_incorrect, difficulty=5):
    offsets = iter(range(0, 100 * (n_correct + n_incorrect), 100))
    entry = {
        "difficulty": difficulty,
        "correct_offsets": [next(offsets) for _ in range(n_correct)],
        "incorrect_offsets": [next(offsets) for _ in range(n_incorrect)],
    }
    return {"path": "x", "size": 0, "n_records": n_correct + n_incorrect, "problems": {"p": entry}}


@pytest.mark.parametrize(
    "n, ratio, n_correct",
    [
        (10, 0.25, 3),  # 2.5 → 3 (half up; half-to-even would give 2)
        (2, 0.25, 1),  # 0.5 → 1
        (6, 0.75, 5),  # 4.5 → 5
        (5, 0.5, 3),  # 2.5 → 3
        (3, 0.5, 2),  # 1.5 → 2
        (7, 0.3, 2),  # 2.1 → 2
        (7, 0.4, 3),  # 2.8 → 3
        (10, 0.5, 5),
        (10, 0.0, 0),
        (10, 1.0, 10),
        (0, 0.5, 0),
    ],
)
def test_correct_ratio_rounds_half_up(n, ratio, n_correct):
    index = make_index(20, 20)
    correct = set(index["problems"]["p"]["correct_offsets"])
    out = sample_by_difficulty(index, n_samples=n, seed=0, correct_ratio=ratio)
    assert len(out) == n
    assert sum(o in correct for o in out) == n_correct


def test_bins_split_by_largest_remainder_by_hand():
    problems = {}
    for name, d in (("e", 2), ("m", 10), ("h", 20)):
        problems[name] = {"difficulty": d, "correct_offsets": [ord(name) * 1000 + i for i in range(30)],
                          "incorrect_offsets": []}
    index = {"path": "x", "size": 0, "n_records": 90, "problems": problems}
    bins = {"easy": [1, 8], "mid": [9, 16], "hard": [17, 25]}
    weights = {"easy": 0.5, "mid": 0.3, "hard": 0.2}
    owner = {o: name for name, e in problems.items() for o in e["correct_offsets"]}
    cases = {
        10: {"e": 5, "m": 3, "h": 2},
        7: {"e": 4, "m": 2, "h": 1},  # quotas 3.5 2.1 1.4: the one left over goes to the .5
        3: {"e": 1, "m": 1, "h": 1},  # quotas 1.5 .9 .6: two left over, to .9 and .6
        9: {"e": 4, "m": 3, "h": 2},  # quotas 4.5 2.7 1.8: to .8 and .7, not to .5
        1: {"e": 1, "m": 0, "h": 0},
    }
    for n, want in cases.items():
        out = sample_by_difficulty(index, n_samples=n, seed=2, bins=bins, weights=weights)
        got = collections.Counter(owner[o] for o in out)
        assert {k: got.get(k, 0) for k in want} == want, n
    # equal remainders: the bin whose name sorts first gets the extra sample
    bins2, weights2 = {"b": [1, 8], "a": [9, 25]}, {"b": 1.0, "a": 1.0}
    out = sample_by_difficulty(index, n_samples=3, seed=0, bins=bins2, weights=weights2)
    got = collections.Counter(owner[o] for o in out)
    assert got["e"] == 1 and got["m"] + got["h"] == 2
