"""Collation golden tests: tiny token lists → exact tensors, by hand."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmtp_fn.data.collate import collate, collate_pairs, padded_length

X = -100


def test_collate_golden():
    examples = [
        {"input_ids": [1, 5, 6, 7], "labels": [X, X, 6, 7], "is_correct": True},
        {"input_ids": [1, 5], "labels": [X, 5], "is_correct": False},
    ]
    b = collate(examples, pad_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels", "is_correct"}
    assert b["input_ids"].tolist() == [[1, 5, 6, 7], [1, 5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[X, X, 6, 7], [X, 5, X, X]]
    assert b["is_correct"].tolist() == [True, False]
    for k in ("input_ids", "attention_mask", "labels"):
        assert b[k].dtype == torch.long
    assert b["is_correct"].dtype == torch.bool


def test_pad_to_multiple_and_cap():
    ex = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}]
    b = collate(ex, pad_id=9, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9]]
    assert b["labels"].tolist() == [[X, 2, 3, X]]
    assert "is_correct" not in b
    assert collate(ex, pad_id=9, pad_to_multiple_of=4, max_length=3)["input_ids"].shape == (1, 3)
    assert padded_length([5, 9], pad_to_multiple_of=8) == 16
    assert padded_length([5, 9], pad_to_multiple_of=8, max_length=12) == 12


@pytest.mark.parametrize(
    "examples, kw, msg",
    [
        ([], {}, "collate needs at least one example, got 0"),
        ([{"input_ids": [1, 2], "labels": [X]}], {}, "example 0: labels has 1 tokens, input_ids has 2"),
        ([{"input_ids": [1], "labels": [1]}, {"input_ids": [], "labels": []}], {}, "example 1: empty input_ids"),
        ([{"input_ids": [1]}], {}, "example 0: expected keys 'input_ids' and 'labels', got ['input_ids']"),
        (
            [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}],
            {"max_length": 2},
            "an example has 3 tokens, more than max_length=2 (collate never truncates; truncate in encode)",
        ),
        (
            [{"input_ids": [1], "labels": [1], "is_correct": True}, {"input_ids": [1], "labels": [1]}],
            {},
            "example 1: no 'is_correct' while other examples have it",
        ),
    ],
)
def test_collate_errors(examples, kw, msg):
    with pytest.raises(ValueError) as info:
        collate(examples, pad_id=0, **kw)
    assert str(info.value) == msg


def test_collate_pairs_golden():
    pos = {"input_ids": [1, 4, 8, 9, 2], "labels": [X, X, 8, 9, 2], "is_correct": True}
    neg = {"input_ids": [1, 4, 7, 2], "labels": [X, X, 7, 2], "is_correct": False}
    pos2 = {"input_ids": [1, 3, 8], "labels": [X, X, 8], "is_correct": True}
    neg2 = {"input_ids": [1, 3, 6, 6, 6, 2], "labels": [X, X, 6, 6, 6, 2], "is_correct": False}
    b = collate_pairs([(pos, neg), (pos2, neg2)], pad_id=0)
    assert b["pos"]["input_ids"].tolist() == [[1, 4, 8, 9, 2, 0], [1, 3, 8, 0, 0, 0]]
    assert b["neg"]["input_ids"].tolist() == [[1, 4, 7, 2, 0, 0], [1, 3, 6, 6, 6, 2]]
    assert b["neg"]["labels"].tolist() == [[X, X, 7, 2, X, X], [X, X, 6, 6, 6, 2]]
    assert b["pos"]["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    assert b["pos"]["is_correct"].tolist() == [True, True]
    assert b["neg"]["is_correct"].tolist() == [False, False]
    stacked = torch.stack([b["pos"]["input_ids"], b["neg"]["input_ids"]])
    assert stacked.shape == (2, 2, 6)


def test_collate_pairs_prompt_mismatch():
    pos = {"input_ids": [1, 4, 8], "labels": [X, X, 8]}
    neg = {"input_ids": [1, 5, 8], "labels": [X, X, 8]}
    with pytest.raises(ValueError) as info:
        collate_pairs([(pos, pos), (pos, neg)], pad_id=0)
    assert str(info.value) == (
        "pair 1: pos and neg prompts differ (2 vs 2 prompt tokens); "
        "both sides of a pair must answer the same prompt"
    )


seqs = st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=12), min_size=1, max_size=6)


@given(seqs, st.integers(1, 5))
def test_collate_property(rows, m):
    examples = [{"input_ids": r, "labels": [X] + r[1:]} for r in rows]
    b = collate(examples, pad_id=0, pad_to_multiple_of=m)
    t = b["input_ids"].shape[1]
    assert t % m == 0 and t - max(map(len, rows)) < m
    assert b["attention_mask"].sum(1).tolist() == [len(r) for r in rows]
    for i, r in enumerate(rows):
        assert b["input_ids"][i, : len(r)].tolist() == r
        assert (b["labels"][i, len(r):] == X).all()
        assert (b["input_ids"][i] * (1 - b["attention_mask"][i])).eq(0).all()
