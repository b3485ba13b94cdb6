"""AdamW details the parity tests do not pin: "auto" and "fused" run PyTorch's fused kernel
(bitwise equal to torch.optim.AdamW(fused=True) on the CPU), counts are fp32 on the leaf's
device whatever the default dtype, messages name nested leaves by their dotted path, a float
skip flag, a skipped foreach step zeroes the gradients, and weight decay 1.0 is applied."""

import dataclasses

import pytest
import torch
from tensordict import TensorDict

from wmtp_fn.train import adamw


def tree(**leaves):
    return TensorDict(leaves, batch_size=[])


def run(impl, p0, grads, **cfg_kw):
    cfg = adamw.AdamWConfig(impl=impl, no_decay=(), **cfg_kw)
    params = tree(w=p0.clone())
    state = adamw.init(params, cfg)
    for g in grads:
        params, state, _ = adamw.update(tree(w=g.clone()), state, params, lr=cfg.lr, cfg=cfg)
    return params["w"]


def torch_run(p0, grads, fused, **kw):
    ref = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], fused=fused, foreach=not fused, **kw)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
    return ref.detach()


GEN = torch.Generator().manual_seed(0)
P0 = torch.randn(5, 7, generator=GEN)
GRADS = [torch.randn(5, 7, generator=GEN) for _ in range(6)]
HP = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-8)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_auto_and_fused_are_torch_fused_bitwise(impl):
    want = torch_run(P0, GRADS, fused=True, **HP)
    assert torch.equal(run(impl, P0, GRADS, **HP), want)
    # the foreach path is the same math with other rounding: close, not bitwise
    other = run("foreach", P0, GRADS, **HP)
    assert not torch.equal(other, want) and torch.allclose(other, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_weight_decay_one_is_applied(impl):
    hp = dict(HP, weight_decay=1.0)
    want = torch_run(P0, GRADS, fused=impl == "fused", **hp)
    torch.testing.assert_close(run(impl, P0, GRADS, **hp), want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(run(impl, P0, GRADS, **dict(HP, weight_decay=0.0)), want, rtol=1e-3)


def test_counts_are_fp32_on_the_leaf_device():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = adamw.init(tree(w=torch.zeros(2)), adamw.AdamWConfig())
    finally:
        torch.set_default_dtype(old)
    assert state.count["w"].dtype == torch.float32
    meta = adamw.init(tree(w=torch.zeros(2, 3, device="meta")), adamw.AdamWConfig())
    assert meta.count["w"].device.type == "meta" and meta.mu["w"].device.type == "meta"


def test_messages_name_nested_leaves_by_dotted_path():
    with pytest.raises(TypeError) as info:
        adamw.init(TensorDict({"head": {"n": torch.zeros(2, dtype=torch.int64)}}, batch_size=[]), adamw.AdamWConfig())
    assert str(info.value) == "AdamW.init: leaf 'head.n' has non-float dtype torch.int64"
    with pytest.raises(ValueError) as info:
        adamw.init(TensorDict({"lora": {"lora_B": torch.zeros(2)}}, batch_size=[]),
                   adamw.AdamWConfig(lr_multipliers={"lora_B": 2.0, "lora.*": 3.0}))
    assert str(info.value) == "leaf 'lora.lora_B' matches lr_multipliers with different values [2.0, 3.0]"
    params = TensorDict({"m": {"w": torch.ones(3)}}, batch_size=[])
    state = adamw.init(params, adamw.AdamWConfig())
    with pytest.raises(ValueError) as info:
        adamw.update(TensorDict({"m": {"w": torch.ones(4)}}, batch_size=[]), state, params, lr=1e-3,
                     cfg=adamw.AdamWConfig())
    assert str(info.value) == "AdamW.update: grad of 'm.w' has shape (4,), param (3,)"


def test_missing_leaves_name_the_tree():
    params = tree(a=torch.ones(2), b=torch.ones(2))
    cfg = adamw.AdamWConfig()
    state = adamw.init(params, cfg)
    with pytest.raises(KeyError) as info:
        adamw.update(tree(a=torch.ones(2)), state, params, lr=1e-3, cfg=cfg)
    assert info.value.args[0] == "AdamW.update: grads and params differ in leaves ['b']"
    for name in ("mu", "nu", "count"):
        broken = dataclasses.replace(state, **{name: getattr(state, name).exclude("a")})
        with pytest.raises(KeyError) as info:
            adamw.update(tree(a=torch.ones(2), b=torch.ones(2)), broken, params, lr=1e-3, cfg=cfg)
        assert info.value.args[0] == f"AdamW.update: state.{name} and params differ in leaves ['a']"


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_a_float_skip_flag(impl):
    cfg = adamw.AdamWConfig(lr=1e-2, impl=impl)
    for flag, skipped in ((1.0, True), (0.0, False)):
        params = tree(w=P0.clone())
        state = adamw.init(params, cfg)
        params, state, stats = adamw.update(tree(w=GRADS[0].clone()), state, params, lr=1e-2, cfg=cfg,
                                            skip=torch.tensor(flag))
        assert float(stats["skipped"]) == float(skipped)
        assert torch.equal(params["w"], P0) == skipped


def test_a_skipped_foreach_step_zeroes_the_gradients():
    """Documented donation: a skipped foreach step zeroes `grads` (so 0·NaN never reaches state)."""
    cfg = adamw.AdamWConfig(lr=1e-2, impl="foreach")
    params = tree(w=P0.clone())
    state = adamw.init(params, cfg)
    grads = tree(w=GRADS[0].clone())
    grads["w"][0, 0] = float("nan")
    adamw.update(grads, state, params, lr=1e-2, cfg=cfg)
    assert torch.equal(grads["w"], torch.zeros(5, 7))
