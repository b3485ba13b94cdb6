"""Critic pairs: pairing rules over an index, and the resumable pair batch stream."""

import pytest
import torch
from ml_collections import ConfigDict
from transformers import AutoTokenizer

from wmtp_fn.data.embedded import embedded_split, embedded_tokenizer_path
from wmtp_fn.data.encode import IGNORE_INDEX, encode
from wmtp_fn.data.index import read_at
from wmtp_fn.data.pairs import PairSet, draw_pairs, encoded_pair_batches, pair_stream, response_lengths
from wmtp_fn.data.sampling import Cursor, seeds_length_bin

BINS, WEIGHTS = {"all": [1, 25]}, {"all": 1.0}
DATA = ConfigDict({"max_length": 320, "use_chat_template": False, "too_long": "skip", "pad_to_multiple_of": 0})


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_path()))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def val_index():
    return embedded_split(0.1, seed=42)[1]


def problem_of(index, offset):
    return next(pid for pid, e in index["problems"].items() if offset in e["correct_offsets"] + e["incorrect_offsets"])


@pytest.mark.parametrize("pairing", ["random", "seeds"])
def test_every_pair_is_a_correct_and_an_incorrect_record_of_one_problem(val_index, pairing):
    pairs = draw_pairs(val_index, pairing=pairing, seed=1, n_pairs=0, max_pairs_per_problem=60, bins=BINS, weights=WEIGHTS)
    assert len(set(pairs)) == len(pairs)
    for pos, neg in pairs:
        assert read_at(val_index["path"], pos).is_correct and not read_at(val_index["path"], neg).is_correct
        assert problem_of(val_index, pos) == problem_of(val_index, neg)
    # all of them: the seeds' rule uses each record once (min(#correct, #incorrect) per problem),
    # the random rule takes every (correct, incorrect) combination (here under the cap of 60)
    per_problem = [(len(e["correct_offsets"]), len(e["incorrect_offsets"])) for e in val_index["problems"].values()
                   if 1 <= e["difficulty"] <= 25]
    expected = sum(min(c, i) if pairing == "seeds" else c * i for c, i in per_problem)
    assert len(pairs) == expected


def test_length_balanced_pairs_share_a_length_bucket_of_response_tokens(val_index, tokenizer):
    lengths = response_lengths(val_index, tokenizer, DATA)
    for offset in sorted(o for o, n in lengths.items() if n >= 0)[:5]:  # response tokens: the labels a loss sees
        ex = encode(read_at(val_index["path"], offset), tokenizer, max_length=320)
        assert lengths[offset] == sum(t != IGNORE_INDEX for t in ex["labels"])
    for pairing, bucket in (("length_balanced", lambda n: n // 16), ("seeds_length_balanced", seeds_length_bin)):
        pairs = draw_pairs(val_index, pairing=pairing, seed=1, n_pairs=0, max_pairs_per_problem=60, bins=BINS,
                           weights=WEIGHTS, lengths=lengths, length_bucket=16)
        assert pairs and all(bucket(lengths[p]) == bucket(lengths[n]) for p, n in pairs)
    with pytest.raises(ValueError, match="needs the records' lengths"):
        draw_pairs(val_index, pairing="length_balanced", seed=1, n_pairs=0, max_pairs_per_problem=60, bins=BINS,
                   weights=WEIGHTS)


def test_the_pair_stream_is_a_pure_function_of_the_cursor_and_walks_every_pair_once_per_epoch(val_index, tokenizer):
    pairs = PairSet(val_index, tuple(draw_pairs(val_index, pairing="random", seed=3, n_pairs=0, max_pairs_per_problem=60,
                                                bins=BINS, weights=WEIGHTS)))
    next_batch = pair_stream(pairs, tokenizer, DATA, batch_size=5, micro_batch_size=2, device=torch.device("cpu"))
    a, after_a = next_batch(Cursor(seed=7))
    b, after_b = next_batch(Cursor(seed=7))
    assert after_a == after_b and len(a) == len(b)
    for x, y in zip(a, b):
        for side in ("pos", "neg"):
            for k in x[side]:
                assert torch.equal(x[side][k], y[side][k])
    # one epoch of cursor steps sees every pair once (those with a too-long prompt dropped)
    seen, cursor = 0, Cursor(seed=7)
    while cursor.epoch == 0:
        mbs, cursor = next_batch(cursor)
        seen += sum(mb["pos"]["input_ids"].shape[0] for mb in mbs)
    kept, _ = encoded_pair_batches(pairs, range(len(pairs)), tokenizer, DATA, micro_batch_size=len(pairs))
    assert seen == kept[0]["pos"]["input_ids"].shape[0] > 0


def test_a_pair_batch_holds_the_correct_record_in_pos_and_the_incorrect_one_in_neg(val_index, tokenizer):
    pairs = PairSet(val_index, tuple(draw_pairs(val_index, pairing="random", seed=3, n_pairs=0, max_pairs_per_problem=60,
                                                bins=BINS, weights=WEIGHTS))[:6])
    (mb,), _ = encoded_pair_batches(pairs, [4, 1, 2], tokenizer, DATA, micro_batch_size=3)
    for row, item in enumerate([4, 1, 2]):
        for side, offset in zip(("pos", "neg"), pairs.pairs[item]):
            ex = encode(read_at(val_index["path"], offset), tokenizer, max_length=320)
            n = len(ex["input_ids"])
            assert mb[side]["input_ids"][row, :n].tolist() == ex["input_ids"]
            assert mb[side]["labels"][row, :n].tolist() == ex["labels"]
            assert mb[side]["attention_mask"][row].sum() == n
