"""Samplers: ratios, uniqueness, determinism, resumability (properties + golden splits)."""

import collections
import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wmtp_fn.data.sampling import (
    Cursor,
    epoch_permutation,
    next_batch,
    problem_pairs,
    sample_by_difficulty,
    sample_pairs,
    split_counts,
)
from wmtp_fn.data.split import split_problems


def make_index(spec):
    """spec: {pid: (difficulty, n_correct, n_incorrect)} → (index, offset → (pid, is_correct))."""
    problems, owner, o = {}, {}, 0
    for pid, (d, nc, ni) in spec.items():
        entry = {"difficulty": d, "correct_offsets": [], "incorrect_offsets": []}
        for label, n in ((True, nc), (False, ni)):
            for _ in range(n):
                entry["correct_offsets" if label else "incorrect_offsets"].append(o)
                owner[o] = (pid, label)
                o += 100
        problems[pid] = entry
    return {"path": "x", "size": o, "n_records": len(owner), "problems": problems}, owner


SPEC = {f"p{i}": (1 + i % 25, 1 + i % 3, i % 4) for i in range(60)}
INDEX, OWNER = make_index(SPEC)
BINS = {"easy": [1, 8], "mid": [9, 16], "hard": [17, 25]}
WEIGHTS = {"easy": 0.5, "mid": 0.3, "hard": 0.2}


def test_split_counts_golden():
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert split_counts(7, [0.5, 0.25, 0.25]) == [3, 2, 2]
    assert split_counts(0, [1, 2]) == [0, 0]
    assert split_counts(5, [0, 1]) == [0, 5]


def bin_of(offset):
    d = INDEX["problems"][OWNER[offset][0]]["difficulty"]
    return next(name for name, (lo, hi) in BINS.items() if lo <= d <= hi)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 400), ratio=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_difficulty_bins_and_correct_ratio(n, ratio, seed):
    out = sample_by_difficulty(INDEX, n_samples=n, seed=seed, bins=BINS, weights=WEIGHTS, correct_ratio=ratio)
    assert len(out) == n
    per_bin = collections.Counter(bin_of(o) for o in out)
    # Largest remainder, stated independently: each bin gets its quota n·w rounded down or up,
    # and no bin rounded down has a larger remainder than a bin rounded up.
    quota = {b: n * WEIGHTS[b] / sum(WEIGHTS.values()) for b in BINS}
    got = {b: per_bin.get(b, 0) for b in BINS}
    assert sum(got.values()) == n
    assert all(math.floor(quota[b]) <= got[b] <= math.floor(quota[b]) + 1 for b in BINS)
    up = [quota[b] - math.floor(quota[b]) for b in BINS if got[b] > math.floor(quota[b])]
    down = [quota[b] - math.floor(quota[b]) for b in BINS if got[b] == math.floor(quota[b])]
    assert not up or not down or min(up) >= max(down)
    for b in BINS:
        n_correct = sum(1 for o in out if bin_of(o) == b and OWNER[o][1])
        q = ratio * got[b]
        assert q - 0.5 < n_correct <= q + 0.5  # round(ratio · n_bin), halves up


def test_without_replacement_while_possible():
    pool = sorted(o for o, (_, ok) in OWNER.items() if ok)
    few = sample_by_difficulty(INDEX, n_samples=len(pool) - 5, seed=1, bins={"all": [1, 25]},
                               weights={"all": 1})
    assert len(set(few)) == len(few)
    many = sample_by_difficulty(INDEX, n_samples=2 * len(pool) + 7, seed=1, bins={"all": [1, 25]},
                                weights={"all": 1})
    counts = collections.Counter(many)
    assert set(counts) == set(pool) and set(counts.values()) <= {2, 3}
    assert sum(v == 3 for v in counts.values()) == 7


def test_difficulty_zero_excluded_by_default():
    index, _ = make_index({"unknown": (0, 5, 0), "known": (3, 2, 0)})
    out = sample_by_difficulty(index, n_samples=10, seed=0)
    assert set(out) <= set(index["problems"]["known"]["correct_offsets"])


def test_same_seed_same_different_seed_differs():
    kw = dict(n_samples=200, bins=BINS, weights=WEIGHTS, correct_ratio=0.5)
    a = sample_by_difficulty(INDEX, seed=42, **kw)
    assert a == sample_by_difficulty(INDEX, seed=42, **kw)
    assert a != sample_by_difficulty(INDEX, seed=43, **kw)
    assert sample_pairs(INDEX, seed=42) == sample_pairs(INDEX, seed=42)
    assert sample_pairs(INDEX, seed=42) != sample_pairs(INDEX, seed=43)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(bins={}), "difficulty_bins is empty: give at least one bin, e.g. {'all': [1, 25]}"),
        (dict(bins={"a": [5, 3]}, weights={"a": 1}), "difficulty_bins['a']: expected [lo, hi] ints with lo <= hi, got [5, 3]"),
        (dict(bins={"a": [1, 2]}, weights={"b": 1}), "difficulty_weights names unknown bin 'b' (bins: a)"),
        (dict(bins={"a": [1, 2], "b": [3, 4]}, weights={"a": 1}), "difficulty_weights has no weight for bin 'b'"),
        (dict(bins={"a": [1, 2]}, weights={"a": -1}), "difficulty_weights['a']: expected a finite number >= 0, got -1"),
        (dict(bins={"a": [1, 2]}, weights={"a": 0}), "difficulty_weights sum to 0: at least one bin needs a positive weight"),
        (dict(correct_ratio=1.5), "correct_ratio must be in [0, 1], got 1.5"),
        (dict(n_samples=-1), "n_samples must be an int >= 0, got -1"),
        (dict(seed=-3), "seed must be an int >= 0, got -3"),
    ],
)
def test_difficulty_errors(kw, msg):
    args = dict(n_samples=10, seed=0)
    args.update(kw)
    with pytest.raises(ValueError) as info:
        sample_by_difficulty(INDEX, **args)
    assert str(info.value) == msg


def test_empty_pool_error():
    index, _ = make_index({"x": (24, 2, 0), "y": (25, 1, 0), "z": (3, 1, 1)})
    with pytest.raises(ValueError) as info:
        sample_by_difficulty(index, n_samples=10, seed=0, bins={"top": [24, 25]}, weights={"top": 1},
                             correct_ratio=0.75)
    assert str(info.value) == (
        "bin 'top' [24, 25]: 2 incorrect samples requested but the bin has no incorrect records (2 problems)"
    )


def test_pairs_share_problem_opposite_labels_unique_capped():
    pairs = sample_pairs(INDEX, seed=7, max_pairs_per_problem=4)
    assert len(set(pairs)) == len(pairs)
    per_problem = collections.Counter()
    for pos, neg in pairs:
        assert OWNER[pos][0] == OWNER[neg][0]
        assert OWNER[pos][1] is True and OWNER[neg][1] is False
        per_problem[OWNER[pos][0]] += 1
    for pid, (d, nc, ni) in SPEC.items():
        if 1 <= d <= 25:
            assert per_problem[pid] == min(4, nc * ni)


def test_pairs_n_pairs_and_bins():
    pairs = sample_pairs(INDEX, seed=0, max_pairs_per_problem=3, n_pairs=30, bins=BINS, weights=WEIGHTS)
    assert len(pairs) == 30 == len(set(pairs))
    assert collections.Counter(bin_of(p) for p, _ in pairs) == {"easy": 15, "mid": 9, "hard": 6}
    with pytest.raises(ValueError) as info:
        sample_pairs(INDEX, seed=0, max_pairs_per_problem=1, n_pairs=1000)
    assert str(info.value) == (
        "bin 'all' [1, 25]: 1000 pairs requested but only 45 unique pairs exist "
        "(max_pairs_per_problem=1); lower n_pairs or use n_pairs=None for all"
    )
    with pytest.raises(ValueError) as info:
        sample_pairs(INDEX, seed=0, bins={"a": [1, 10], "b": [10, 25]}, weights={"a": 1, "b": 1})
    assert str(info.value) == "difficulty_bins overlap ('a' [1, 10] and 'b' [10, 25]): pairs must be unique"


def test_pairs_length_balanced():
    index, owner = make_index({"p": (5, 6, 6)})
    c, i = index["problems"]["p"]["correct_offsets"], index["problems"]["p"]["incorrect_offsets"]
    lengths = {**dict(zip(c, [10, 12, 25, 31, 50, 90])), **dict(zip(i, [11, 19, 28, 70, 71, 95]))}
    got = problem_pairs(index, "p", seed=0, max_pairs_per_problem=100, lengths=lengths, length_bucket=10)
    want = {(c[0], i[0]), (c[1], i[0]), (c[1], i[1]), (c[0], i[1]), (c[2], i[2]), (c[5], i[5])}
    assert set(got) == want and len(got) == len(want)
    with pytest.raises(ValueError) as info:
        sample_pairs(index, seed=0, length_bucket=10)
    assert str(info.value) == "length balancing needs both `lengths` and `length_bucket` (or neither)"


def test_pairs_of_one_problem_independent_of_others():
    small, _ = make_index({k: SPEC[k] for k in ["p5", "p6"]})
    # offsets differ between the two indexes, so compare positions within each problem
    def positions(index, pid):
        e = index["problems"][pid]
        return [(e["correct_offsets"].index(p), e["incorrect_offsets"].index(n))
                for p, n in problem_pairs(index, pid, seed=3, max_pairs_per_problem=2)]
    assert positions(small, "p6") == positions(INDEX, "p6")


def reference_batches(n, bs, seed, drop_last, count):
    """Epoch after epoch, each epoch's permutation cut into consecutive batches of `bs` (the
    short last one dropped with drop_last): what `next_batch` must reproduce from any cursor."""
    out, epoch = [], 0
    while len(out) < count:
        perm = epoch_permutation(n, seed, epoch).tolist()
        cut = [perm[i:i + bs] for i in range(0, n, bs)]
        out.extend(c for c in cut if len(c) == bs or not drop_last)
        epoch += 1
    return out[:count]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), bs=st.integers(1, 12), k=st.integers(0, 15), m=st.integers(1, 15),
       seed=st.integers(0, 2**31), drop_last=st.booleans())
def test_cursor_save_restore_same_continuation(n, bs, k, m, seed, drop_last):
    assume(not (drop_last and bs > n))
    cursor = Cursor(seed)
    resumed = []
    for _ in range(k):
        batch, cursor = next_batch(n, bs, cursor, drop_last=drop_last)
        resumed.append(batch)
    cursor = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))
    for _ in range(m):
        batch, cursor = next_batch(n, bs, cursor, drop_last=drop_last)
        resumed.append(batch)
    assert resumed == reference_batches(n, bs, seed, drop_last, k + m)


def test_epochs_are_permutations_and_differ():
    n, bs = 10, 4
    cursor, batches = Cursor(5), []
    for _ in range(6):
        batch, cursor = next_batch(n, bs, cursor)
        batches.append(batch)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 == epoch_permutation(n, 5, 0).tolist()
    assert cursor == Cursor(5, 2, 0)
    cursor, batches = Cursor(5), []
    for _ in range(4):
        batch, cursor = next_batch(n, bs, cursor, drop_last=True)
        batches.append(batch)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert batches[2] == epoch1[:4] and cursor == Cursor(5, 2, 0)
    assert epoch_permutation(n, 6, 0).tolist() != epoch0


@pytest.mark.parametrize(
    "obj, msg",
    [
        ([], "cursor: expected a dict, got list"),
        ({"seed": 1, "epoch": 0}, "cursor: missing key 'position'"),
        ({"seed": 1, "epoch": 0, "position": 0, "pos": 1}, "cursor: unknown key 'pos' (expected seed, epoch, position)"),
        ({"seed": 1, "epoch": "0", "position": 0}, "cursor: 'epoch' must be an int >= 0, got '0'"),
    ],
)
def test_cursor_from_dict_errors(obj, msg):
    with pytest.raises(ValueError) as info:
        Cursor.from_dict(obj)
    assert str(info.value) == msg


def test_next_batch_errors():
    with pytest.raises(ValueError) as info:
        next_batch(5, 2, Cursor(0, 0, 7))
    assert str(info.value) == (
        "cursor position 7 is outside an epoch of 5 items (was the cursor saved for a different dataset?)"
    )
    with pytest.raises(ValueError) as info:
        next_batch(3, 4, Cursor(0), drop_last=True)
    assert str(info.value) == "drop_last with batch_size=4 > n_items=3 would never yield a batch"


def test_split_problems():
    train, val = split_problems(INDEX, 0.1, seed=42)
    assert len(val) == 6 and len(train) == 54
    assert sorted(train + val) == sorted(INDEX["problems"]) and not set(train) & set(val)
    assert (train, val) == split_problems(INDEX, 0.1, seed=42)
    assert val != split_problems(INDEX, 0.1, seed=43)[1]
    assert split_problems(INDEX, 0.001, seed=0)[1] != []  # at least one when > 0
    assert split_problems(INDEX, 0.0, seed=0)[1] == []
    with pytest.raises(ValueError) as info:
        split_problems(INDEX, 1.0, seed=0)
    assert str(info.value) == "val_fraction must be in [0, 1), got 1.0"
