"""The seeds' pair rule: one-to-one matching per problem, bin targets, length-balanced pairs."""

from collections import Counter

import pytest

from wmtp_fn.data.sampling import _seeds_targets, seeds_length_bin, seeds_pairs, seeds_problem_pairs


def index_of(problems):
    """problems: {pid: (difficulty, n_correct, n_incorrect)}; offsets are unique ints."""
    out, next_offset = {}, 0
    for pid, (difficulty, n_pos, n_neg) in problems.items():
        pos = list(range(next_offset, next_offset + n_pos))
        neg = list(range(next_offset + n_pos, next_offset + n_pos + n_neg))
        next_offset += n_pos + n_neg
        out[pid] = {"difficulty": difficulty, "correct_offsets": pos, "incorrect_offsets": neg}
    return {"path": "x", "size": 0, "mtime_ns": 0, "n_records": next_offset, "problems": out}


@pytest.mark.parametrize("n_tokens, name", [(0, "<50"), (49, "<50"), (50, "<100"), (124, "<125"), (1999, "<2000"), (2000, "2000+"), (9999, "2000+")])
def test_length_bins(n_tokens, name):
    assert seeds_length_bin(n_tokens) == name


@pytest.mark.parametrize("n_pos, n_neg, cap, expected", [(5, 3, 60, 3), (2, 7, 60, 2), (9, 9, 4, 4), (3, 0, 60, 0)])
def test_a_problem_gives_a_one_to_one_matching(n_pos, n_neg, cap, expected):
    index = index_of({"p": (3, n_pos, n_neg)})
    pairs = seeds_problem_pairs(index, "p", seed=42, max_pairs_per_problem=cap)
    assert len(pairs) == expected
    entry = index["problems"]["p"]
    assert all(c in entry["correct_offsets"] and i in entry["incorrect_offsets"] for c, i in pairs)
    assert len({c for c, _ in pairs}) == len({i for _, i in pairs}) == expected  # each record used once


def test_length_balanced_pairs_share_a_length_bin_and_cap_after_matching():
    index = index_of({"p": (3, 6, 6)})
    e = index["problems"]["p"]
    # correct lengths 10, 10, 60, 60, 60, 3000; incorrect 20, 70, 70, 2500, 2600, 130
    lengths = dict(zip(e["correct_offsets"], [10, 10, 60, 60, 60, 3000]))
    lengths.update(zip(e["incorrect_offsets"], [20, 70, 70, 2500, 2600, 130]))
    pairs = seeds_problem_pairs(index, "p", seed=1, max_pairs_per_problem=60, lengths=lengths)
    assert Counter(seeds_length_bin(lengths[c]) for c, _ in pairs) == {"<50": 1, "<100": 2, "2000+": 1}
    assert all(seeds_length_bin(lengths[c]) == seeds_length_bin(lengths[i]) for c, i in pairs)
    assert len(seeds_problem_pairs(index, "p", seed=1, max_pairs_per_problem=3, lengths=lengths)) == 3


def test_bin_targets_by_hand():
    # weights 0.5/0.3/0.2, the last bin empty: its weight is spread, 10 * 0.625 = 6, 10 * 0.375 = 3,
    # and the one left over goes to the bin with the most pairs (a tie: the first).
    assert _seeds_targets(10, [0.5, 0.3, 0.2], [100, 100, 0]) == [7, 3, 0]
    assert _seeds_targets(11, [0.5, 0.3, 0.2], [5, 100, 50]) == [5, 4, 2]  # 5, 3, 2 + 1 to the richest
    assert _seeds_targets(7, [1.0, 1.0], [3, 3]) == [4, 3]
    with pytest.raises(ValueError, match="no bin with a positive weight"):
        _seeds_targets(3, [1.0, 0.0], [0, 9])


def test_seeds_pairs_by_bin_and_shortage():
    index = index_of({"easy1": (2, 3, 3), "easy2": (3, 2, 5), "hard": (9, 4, 4), "no_neg": (2, 5, 0)})
    bins, weights = {"easy": [1, 5], "hard": [6, 10]}, {"easy": 0.5, "hard": 0.5}
    pairs = seeds_pairs(index, n_pairs=8, seed=42, bins=bins, weights=weights)
    hard = set(index["problems"]["hard"]["correct_offsets"])
    assert len(pairs) == 8 and sum(c in hard for c, _ in pairs) == 4
    assert len(set(pairs)) == 8
    assert pairs == seeds_pairs(index, n_pairs=8, seed=42, bins=bins, weights=weights)
    assert pairs != seeds_pairs(index, n_pairs=8, seed=43, bins=bins, weights=weights)
    with pytest.raises(ValueError, match=r"bin 'hard' \[6, 10\]: 5 pairs requested but only 4 exist"):
        seeds_pairs(index, n_pairs=10, seed=42, bins=bins, weights=weights)


def test_length_balanced_mode_ignores_the_weights():
    index = index_of({"a": (2, 4, 4), "b": (9, 4, 4)})
    lengths = {o: 10 for o in range(16)}
    pairs = seeds_pairs(index, n_pairs=8, seed=0, bins={"lo": [1, 5], "hi": [6, 10]},
                        weights={"lo": 1.0, "hi": 0.0}, lengths=lengths)
    assert len(pairs) == 8 and {c // 8 for c, _ in pairs} == {0, 1}  # both bins, despite hi's weight 0
