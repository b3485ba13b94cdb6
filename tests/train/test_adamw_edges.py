"""AdamW at its edges (surviving mutants of train.adamw): a weight decay of exactly 1 matches
torch.optim.AdamW, and a conflicting multiplier names the dotted leaf and both values."""

import pytest

from tests.train.test_train_adamw import IMPLS, assert_tree_close, make_params, run_both
from wmtp_fn.train import adamw


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_decay_of_one_matches_torch(impl):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=1.0, impl=impl, no_decay=())
    params, _, ref, _, keys = run_both(cfg, [(lambda k: True, {})], dict(lr=1e-2, weight_decay=1.0), impl, steps=4)
    assert_tree_close(params, [ref[k] for k in keys], keys)


def test_conflicting_multipliers_name_the_leaf_and_both_values():
    cfg = adamw.AdamWConfig(lr_multipliers={"lora_B": 16.0, "lora_*": 2.0})
    with pytest.raises(ValueError, match=r"^leaf 'lora\.model\.layers\.0\.q_proj\.lora_B' matches lr_multipliers "
                                         r"with different values \[2\.0, 16\.0\]$"):
        adamw.init(make_params(), cfg)
