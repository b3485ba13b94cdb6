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


@pytest.mark.parametrize("impl, used", [("fused", "_fused_adamw_"), ("foreach", "_foreach_adamw_"),
                                        ("auto", "_fused_adamw_")])  # auto: fused wherever it has a kernel (fp32 CPU)
def test_impl_selects_its_kernel(monkeypatch, impl, used):
    """Both kernels compute AdamW (their results agree), so only a spy tells which one ran."""
    from tests.train.test_train_adamw import grad_tree

    calls = []
    for name in ("_fused_adamw_", "_foreach_adamw_"):
        real = getattr(adamw, name)
        monkeypatch.setattr(adamw, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    cfg = adamw.AdamWConfig(lr=1e-2, impl=impl)
    params = make_params()
    adamw.update(grad_tree(params, 0), adamw.init(params, cfg), params, lr=1e-2, cfg=cfg)
    assert calls and set(calls) == {used}


def test_a_0_1_float_skip_flag_skips():
    import torch

    from tests.train.test_train_adamw import grad_tree

    cfg = adamw.AdamWConfig(lr=1e-2)
    params = make_params()
    before = params.apply(lambda t: t.clone())
    _, _, stats = adamw.update(grad_tree(params, 0), adamw.init(params, cfg), params, lr=1e-2, cfg=cfg,
                               skip=torch.tensor(1.0))
    assert stats["skipped"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before.values(True, True), params.values(True, True)))


def test_update_names_bad_state_keys_and_drifted_moment_trees():
    from tests.train.test_train_adamw import grad_tree

    cfg = adamw.AdamWConfig(lr=1e-2)
    params = make_params()
    state = adamw.init(params, cfg)
    with pytest.raises(KeyError, match=r"AdamW\.update: state has keys \['count', 'mu'\], expected \['mu', 'nu', 'count'\]"):
        adamw.update(grad_tree(params, 0), state.exclude("nu"), params, lr=1e-2, cfg=cfg)
    drifted = state.clone()
    drifted["mu"] = drifted["mu"].exclude(("value_head", "bias"))
    with pytest.raises(KeyError, match=r"AdamW\.update: state\['mu'\] and params differ in leaves \['value_head\.bias'\]"):
        adamw.update(grad_tree(params, 0), drifted, params, lr=1e-2, cfg=cfg)


def test_messages_name_nested_leaves_with_dots():
    import torch
    from tensordict import TensorDict

    from tests.train.test_train_adamw import grad_tree

    ints = TensorDict({"a": {"b": torch.zeros(2, dtype=torch.int64)}}, batch_size=[])
    with pytest.raises(TypeError, match=r"^AdamW\.init: leaf 'a\.b' has non-float dtype torch\.int64$"):
        adamw.init(ints, adamw.AdamWConfig())
    cfg = adamw.AdamWConfig(lr=1e-2)
    params = make_params()
    state = adamw.init(params, cfg)
    with pytest.raises(KeyError, match=r"AdamW\.update: grads and params differ in leaves \['value_head\.bias'\]"):
        adamw.update(grad_tree(params, 0).exclude(("value_head", "bias")), state, params, lr=1e-2, cfg=cfg)
    wrong = grad_tree(params, 0)
    wrong["value_head", "bias"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^AdamW\.update: grad of 'value_head\.bias' has shape \(2,\), param \(1,\)"):
        adamw.update(wrong, state, params, lr=1e-2, cfg=cfg)
