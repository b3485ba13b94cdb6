"""The held-out evaluation split: disjoint from training and validation, the same for every
run seed, and what `record_sets` trains on never touches it."""

import pytest
from ml_collections import ConfigDict

from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.index import build_index
from wmtp_fn.data.split import held_out_problems, run_splits
from wmtp_fn.data.stream import record_sets, trained_problem_ids
from wmtp_fn.errors import ConfigError

INDEX = build_index(str(embedded_dataset_path()))


def data_cfg(**kw):
    c = ConfigDict({"train_path": "", "val_path": "", "val_fraction": 0.1, "n_samples": 0, "val_n_samples": 0,
                    "correct_ratio": 0.5, "difficulty_bins": {"all": [0, 100]}, "difficulty_weights": {"all": 1.0}})
    c.update(kw)
    return c


def test_half_of_humaneval_is_held_out_the_same_for_every_run_seed():
    ids = set(INDEX["problems"])
    for seed in (0, 1, 42):
        train, val, held = run_splits(INDEX, data_cfg(heldout_fraction=0.5), seed)
        assert len(held) == 82 and len(val) == round(0.1 * 82)  # round half up on the rest
        assert set(train) | set(val) | set(held) == ids
        assert not (set(train) & set(held)) and not (set(val) & set(held)) and not (set(train) & set(val))
        assert held == run_splits(INDEX, data_cfg(heldout_fraction=0.5), 0)[2]


def test_the_held_out_set_is_the_hash_order_by_its_own_seed():
    import hashlib

    order = sorted(INDEX["problems"], key=lambda p: hashlib.sha256(f"heldout:3\0{p}".encode()).hexdigest())
    assert held_out_problems(INDEX, 0.25, seed=3)[1] == sorted(order[:41])
    assert held_out_problems(INDEX, 0.25, seed=3)[1] != held_out_problems(INDEX, 0.25, seed=4)[1]
    assert held_out_problems(INDEX, 0.0)[1] == []


def test_no_record_of_a_held_out_problem_is_trained_or_validated_on():
    cfg = data_cfg(heldout_fraction=0.5)
    train, val = record_sets(cfg, seed=42)
    held = set(held_out_problems(INDEX, 0.5)[1])
    for records in (train, val):
        assert set(records.index["problems"]).isdisjoint(held)
    assert len(train.index["problems"]) + len(val.index["problems"]) == 82


def test_a_bad_fraction_names_the_key():
    with pytest.raises(ConfigError, match="data.heldout_fraction must be in"):
        run_splits(INDEX, data_cfg(heldout_fraction=1.0), 0)


def test_trained_problem_ids_from_a_saved_flat_config_are_exactly_the_training_split():
    flat = {"seed": 7, "data.train_path": "", "data.val_path": "", "data.val_fraction": 0.1,
            "data.heldout_fraction": 0.5, "data.heldout_seed": 0}
    train, val, held = run_splits(INDEX, data_cfg(heldout_fraction=0.5), 7)
    assert trained_problem_ids(flat) == set(train)
    old_run = {k: v for k, v in flat.items() if "heldout" not in k}  # written before the held-out split
    assert trained_problem_ids(old_run) == set(run_splits(INDEX, data_cfg(), 7)[0])
    assert len(trained_problem_ids(old_run)) == 164 - round(0.1 * 164)
