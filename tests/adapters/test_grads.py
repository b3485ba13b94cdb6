"""Gradients through `apply` against an independent float64 implementation (forward hooks on
the plain HF model), for LoRA and DoRA; the frozen base gets no gradient."""

import pytest
import torch

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots, to_flat
from wmtp_fn.models.base import load_base


def reference_logits(model, flat, s, batch):
    """LoRA/DoRA by hooks: out = x(W + sBA)ᵀ + b, DoRA: m/‖W + sBA‖_row (norm detached) · …
    `s`: the scaling, worked out by hand by the caller (alpha / rank, rsLoRA alpha / √rank)."""
    handles = []
    for key in [k for k in flat if k.endswith(".lora_A")]:
        path = key[: -len(".lora_A")]
        A, B = flat[key], flat[f"{path}.lora_B"]
        m = flat.get(f"{path}.lora_magnitude")
        lin = model.get_submodule(path)

        def hook(mod, inputs, out, A=A, B=B, m=m):
            w = mod.weight + s * B @ A
            y = inputs[0] @ w.T
            if m is not None:
                y = y * (m / w.norm(dim=1).detach())
            return y if mod.bias is None else y + mod.bias

        handles.append(lin.register_forward_hook(hook))
    try:
        return model(**batch).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "kw, scaling",
    [(dict(), 8.0 / 4), (dict(use_rslora=True), 8.0 / 2), (dict(use_dora=True), 8.0 / 4)],
)
def test_grads_match_float64_reference_and_base_gets_none(tiny_dir, batch, kw, scaling):
    ours = load_base(tiny_dir, dtype=torch.float64)
    install_slots(ours)
    ref = load_base(tiny_dir, dtype=torch.float64)
    spec = AdapterSpec(rank=4, alpha=8.0, **kw)
    adapter, spec = init(ours, spec, seed=0)
    adapter = randomize(adapter, seed=1).double()
    weights = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    leaves = adapter.apply(lambda t: t.detach().requires_grad_())
    loss = (apply(ours, leaves, spec, **batch).logits * weights).sum()
    loss.backward()
    got = {k: v.grad for k, v in to_flat(leaves).items()}

    ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in to_flat(adapter).items()}
    ref_loss = (reference_logits(ref, ref_leaves, scaling, batch) * weights).sum()
    ref_loss.backward()

    assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-12
    assert set(got) == set(ref_leaves)
    for k, g in got.items():
        assert g is not None and g.abs().sum() > 0, k
        assert rel_err(g, ref_leaves[k].grad) <= 1e-6, k
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())


def test_fp32_grads_close_to_float64_reference(base, tiny_dir, batch):
    ref = load_base(tiny_dir, dtype=torch.float64)
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0), seed=0)
    adapter = randomize(adapter, seed=1)
    leaves = adapter.apply(lambda t: t.detach().requires_grad_())
    apply(base, leaves, spec, **batch).logits.square().mean().backward()
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in to_flat(adapter).items()}
    reference_logits(ref, ref_leaves, 8.0 / 4, batch).square().mean().backward()
    for k, v in to_flat(leaves).items():
        assert rel_err(v.grad, ref_leaves[k].grad) <= 1e-4, k
