"""Functional AdamW vs torch.optim.AdamW (fused and foreach), LoRA+, no-decay, clipping, skips."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tensordict import TensorDict

from wmtp_fn.train import adamw
from wmtp_fn.train.clip import clip_by_global_norm
from wmtp_fn.train.tree import leaf_keys, leaves

IMPLS = ["fused", "foreach"]

# Several shapes, two "layers" of LoRA pairs, a DoRA magnitude and a value head with a bias.
SHAPES = {
    ("lora", "model", "layers", "0", "q_proj", "lora_A"): (4, 16),
    ("lora", "model", "layers", "0", "q_proj", "lora_B"): (12, 4),
    ("lora", "model", "layers", "1", "q_proj", "lora_A"): (4, 16),
    ("lora", "model", "layers", "1", "q_proj", "lora_B"): (12, 4),
    ("lora", "model", "layers", "1", "q_proj", "lora_magnitude"): (12,),
    ("value_head", "weight"): (1, 16),
    ("value_head", "bias"): (1,),
    ("extra", "cube"): (2, 3, 5),
}


def make_params(seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    td = TensorDict({}, batch_size=[])
    for k, shape in SHAPES.items():
        td.set(k, torch.randn(shape, generator=g))
    return td


def grad_tree(params: TensorDict, seed: int, scale: float = 1.0) -> TensorDict:
    g = torch.Generator().manual_seed(1000 + seed)
    return params.apply(lambda t: scale * torch.randn(t.shape, generator=g))


def clone(td: TensorDict) -> TensorDict:
    return td.apply(lambda t: t.clone())


def assert_tree_close(a: TensorDict, b_list, keys, rtol=1e-6, atol=1e-7):
    for k, x, y in zip(keys, leaves(a, keys), b_list):
        torch.testing.assert_close(x, y.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{'.'.join(k)}: {m}")


def torch_reference(params, groups, impl):
    """groups: list of (predicate(key), overrides) -> a torch.optim.AdamW with those param groups."""
    keys = leaf_keys(params)
    ref = {k: params.get(k).clone().requires_grad_() for k in keys}
    param_groups = []
    for pred, overrides in groups:
        ps = [ref[k] for k in keys if pred(k)]
        if ps:
            param_groups.append({"params": ps, **overrides})
    return ref, param_groups, dict(fused=impl == "fused", foreach=impl == "foreach")


def run_both(cfg, torch_groups, torch_kwargs, impl, steps=12, clip=None, grad_scale=1.0):
    params = make_params()
    keys = leaf_keys(params)
    ref, pgroups, flags = torch_reference(params, torch_groups, impl)
    opt = torch.optim.AdamW(pgroups, **torch_kwargs, **flags)
    state = adamw.init(params, cfg)
    for s in range(steps):
        grads = grad_tree(params, s, grad_scale)
        for k in keys:
            ref[k].grad = grads.get(k).clone()
        if clip:
            torch.nn.utils.clip_grad_norm_([ref[k] for k in keys], clip)
        opt.step()
        params, state, stats = adamw.update(grads, state, params, lr=torch_kwargs["lr"], cfg=cfg)
        assert float(stats["skipped"]) == 0.0
    return params, state, ref, opt, keys


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_torch_adamw_with_no_decay(impl):
    cfg = adamw.AdamWConfig(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, impl=impl,
                            no_decay=("bias", "lora_magnitude"))
    no_decay = lambda k: k[-1] in ("bias", "lora_magnitude")  # noqa: E731
    groups = [(lambda k: not no_decay(k), {}), (no_decay, {"weight_decay": 0.0})]
    params, state, ref, opt, keys = run_both(
        cfg, groups, dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), impl
    )
    assert_tree_close(params, [ref[k] for k in keys], keys)
    assert_tree_close(state["mu"], [opt.state[ref[k]]["exp_avg"] for k in keys], keys)
    assert_tree_close(state["nu"], [opt.state[ref[k]]["exp_avg_sq"] for k in keys], keys)
    for c in leaves(state["count"], keys):
        assert c.dtype == torch.float32 and c.shape == () and float(c) == 12.0


@pytest.mark.parametrize("impl", IMPLS)
def test_no_decay_leaves_follow_plain_adam(impl):
    """Weight decay must not touch no-decay leaves: their trajectory is that of wd = 0."""
    base = dict(lr=1e-2, impl=impl, no_decay=("bias",))
    p_wd, _, _, _, keys = run_both(adamw.AdamWConfig(weight_decay=0.5, **base), [(lambda k: True, {})],
                                   dict(lr=1e-2, weight_decay=0.5), impl, steps=5)
    p_0, _, _, _, _ = run_both(adamw.AdamWConfig(weight_decay=0.0, **base), [(lambda k: True, {})],
                               dict(lr=1e-2, weight_decay=0.0), impl, steps=5)
    for k in keys:
        same = torch.equal(p_wd.get(k), p_0.get(k))
        assert same == (k[-1] == "bias"), k


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_plus_multiplier_only_on_lora_B(impl):
    ratio = 16.0
    cfg = adamw.AdamWConfig(lr=1e-3, weight_decay=0.01, lr_multipliers={"lora_B": ratio}, no_decay=(), impl=impl)
    params, state, _, _, keys = run_both(cfg, [(lambda k: True, {})], dict(lr=1e-3, weight_decay=0.01), impl)
    # Independent references: plain AdamW at lr for the others, at lr·ratio for the B leaves.
    _, _, ref_plain, _, _ = run_both(adamw.AdamWConfig(lr=1e-3, weight_decay=0.01, no_decay=(), impl=impl),
                                     [(lambda k: True, {})], dict(lr=1e-3, weight_decay=0.01), impl)
    _, _, ref_fast, _, _ = run_both(adamw.AdamWConfig(lr=1e-3 * ratio, weight_decay=0.01, no_decay=(), impl=impl),
                                    [(lambda k: True, {})], dict(lr=1e-3 * ratio, weight_decay=0.01), impl)
    b_keys = [k for k in keys if k[-1] == "lora_B"]
    other = [k for k in keys if k[-1] != "lora_B"]
    assert len(b_keys) == 2
    assert_tree_close(params, [ref_fast[k] for k in b_keys], b_keys)
    assert_tree_close(params, [ref_plain[k] for k in other], other)
    # and the multiplier really matters
    assert not torch.allclose(params.get(b_keys[0]), ref_plain[b_keys[0]].detach(), rtol=1e-3)


def test_param_groups_match_names_and_paths():
    cfg = adamw.AdamWConfig(weight_decay=0.1, lr_multipliers={"lora_B": 16.0, "value_head.*": 2.0},
                            no_decay=("bias", "lora_magnitude"))
    groups = adamw.param_groups(make_params(), cfg)
    by_key = {k: (g.lr_multiplier, g.decay) for g in groups for k in g.keys}
    assert by_key[("lora", "model", "layers", "0", "q_proj", "lora_B")] == (16.0, True)
    assert by_key[("lora", "model", "layers", "0", "q_proj", "lora_A")] == (1.0, True)
    assert by_key[("lora", "model", "layers", "1", "q_proj", "lora_magnitude")] == (1.0, False)
    assert by_key[("value_head", "weight")] == (2.0, True)
    assert by_key[("value_head", "bias")] == (2.0, False)
    assert len(groups) == 5 and sum(len(g.keys) for g in groups) == len(SHAPES)
    # weight_decay 0: nobody "decays", so no_decay does not split groups
    assert len(adamw.param_groups(make_params(), adamw.AdamWConfig())) == 1


def test_conflicting_multipliers_raise():
    cfg = adamw.AdamWConfig(lr_multipliers={"lora_B": 16.0, "lora_*": 2.0})
    with pytest.raises(ValueError, match="lora_B"):
        adamw.init(make_params(), cfg)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=0.0), dict(weight_decay=-0.1),
     dict(lr_multipliers={"lora_B": 0.0}), dict(no_decay="bias"), dict(max_grad_norm=-1.0), dict(impl="cuda")],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        adamw.AdamWConfig(**kwargs)


def test_init_structure_and_errors():
    params = make_params()
    state = adamw.init(params, adamw.AdamWConfig())
    keys = leaf_keys(params)
    for tree in (state["mu"], state["nu"]):
        assert leaf_keys(tree) == keys
        for p, m in zip(leaves(params, keys), leaves(tree, keys)):
            assert m.shape == p.shape and m.dtype == p.dtype and not m.any()
    with pytest.raises(TypeError, match="non-float"):
        adamw.init(TensorDict({"a": torch.zeros(2, dtype=torch.long)}, batch_size=[]), adamw.AdamWConfig())
    grads = grad_tree(params, 0)
    del grads["value_head", "bias"]
    with pytest.raises(KeyError, match="value_head.bias"):
        adamw.update(grads, state, params, lr=1e-3, cfg=adamw.AdamWConfig())


def test_clip_by_global_norm_equals_torch():
    params = make_params()
    for max_norm, scale in [(1.0, 1.0), (0.3, 5.0), (1e6, 1.0)]:
        grads = grad_tree(params, 3, scale)
        ref_params = [torch.zeros_like(t, requires_grad=True) for t in leaves(grads, leaf_keys(grads))]
        for p, t in zip(ref_params, leaves(grads, leaf_keys(grads))):
            p.grad = t.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        ref = [p.grad for p in ref_params]
        out, norm = clip_by_global_norm(grads, max_norm)
        assert out is grads
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        assert_tree_close(grads, ref, leaf_keys(grads), rtol=1e-6, atol=1e-8)
    # off: only measures
    grads = grad_tree(params, 4, 100.0)
    before = clone(grads)
    _, norm = clip_by_global_norm(grads, None)
    assert (grads == before).all() and float(norm) > 100.0


@pytest.mark.parametrize("impl", IMPLS)
def test_update_with_clipping_matches_torch(impl):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5, no_decay=(), impl=impl)
    params, _, ref, _, keys = run_both(cfg, [(lambda k: True, {})], dict(lr=1e-2, weight_decay=0.05), impl,
                                       steps=10, clip=0.5, grad_scale=3.0)
    assert_tree_close(params, [ref[k] for k in keys], keys)


def _snapshot(params, state):
    return clone(params), clone(state["mu"]), clone(state["nu"]), clone(state["count"])


def _assert_bitwise(snap, params, state):
    for before, after in zip(snap, (params, state["mu"], state["nu"], state["count"])):
        keys = leaf_keys(before)
        for k, x, y in zip(keys, leaves(before, keys), leaves(after, keys)):
            assert torch.equal(x, y), ".".join(k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("first", [True, False])
def test_nonfinite_grad_skips_bitwise(impl, bad, first):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, impl=impl)
    params = make_params()
    state = adamw.init(params, cfg)
    ref_params, ref_state = clone(params), adamw.init(clone(params), cfg)
    if not first:
        for s in range(3):
            params, state, _ = adamw.update(grad_tree(params, s), state, params, lr=1e-2, cfg=cfg)
            ref_params, ref_state, _ = adamw.update(grad_tree(params, s), ref_state, ref_params, lr=1e-2, cfg=cfg)
    snap = _snapshot(params, state)
    grads = grad_tree(params, 99)
    grads["lora", "model", "layers", "1", "q_proj", "lora_A"][2, 3] = bad
    params, state, stats = adamw.update(grads, state, params, lr=1e-2, cfg=cfg)
    assert float(stats["skipped"]) == 1.0 and not torch.isfinite(stats["grad_norm"])
    _assert_bitwise(snap, params, state)
    # The skipped step left no trace: the next step equals that of a run that never saw it.
    params, state, stats = adamw.update(grad_tree(params, 7), state, params, lr=1e-2, cfg=cfg)
    ref_params, ref_state, _ = adamw.update(grad_tree(params, 7), ref_state, ref_params, lr=1e-2, cfg=cfg)
    assert float(stats["skipped"]) == 0.0
    _assert_bitwise(_snapshot(ref_params, ref_state), params, state)


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_flag_skips_finite_update(impl):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, impl=impl)
    params = make_params()
    state = adamw.init(params, cfg)
    params, state, _ = adamw.update(grad_tree(params, 0), state, params, lr=1e-2, cfg=cfg)
    snap = _snapshot(params, state)
    params, state, stats = adamw.update(grad_tree(params, 1), state, params, lr=1e-2, cfg=cfg,
                                        skip=torch.tensor(True))
    assert float(stats["skipped"]) == 1.0 and torch.isfinite(stats["grad_norm"])
    _assert_bitwise(snap, params, state)


@settings(max_examples=15, deadline=None)
@given(
    lr=st.floats(1e-5, 1e-1),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.9999),
    wd=st.floats(0.0, 0.5),
    mult=st.floats(0.5, 32.0),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_fused_and_foreach_agree(lr, b1, b2, wd, mult, steps, seed):
    out = []
    for impl in IMPLS:
        cfg = adamw.AdamWConfig(lr=lr, betas=(b1, b2), weight_decay=wd, lr_multipliers={"lora_B": mult}, impl=impl)
        params = make_params(seed)
        state = adamw.init(params, cfg)
        for s in range(steps):
            params, state, _ = adamw.update(grad_tree(params, seed + s), state, params, lr=lr, cfg=cfg)
        out.append((params, state))
    (p1, s1), (p2, s2) = out
    keys = leaf_keys(p1)
    # The fused kernel computes the bias corrections in fp32, the foreach path in fp64: they
    # differ by ~1 ulp of the step, so the tolerance grows with the distance travelled.
    assert_tree_close(p2, leaves(p1, keys), keys, rtol=1e-6, atol=1e-6 * (1 + lr * mult * steps))
    assert_tree_close(s2["nu"], leaves(s1["nu"], keys), keys, rtol=1e-5, atol=1e-9)
