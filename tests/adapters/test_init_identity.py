"""A fresh adapter is the identity: bound or not, the model computes exactly the base's outputs
(B = 0, DoRA magnitude = ‖W‖_row), while A is a non-degenerate Kaiming-uniform draw, so the
first gradient step does move B."""

import math

import pytest
import torch

from wmtp_fn.adapters import AdapterSpec, apply, init, to_flat

VARIANTS = {"lora": dict(), "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fresh_adapter_gives_exactly_the_base_logits(variant, plain, base, batch):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=16.0, **VARIANTS[variant]), seed=5)
    with torch.no_grad():
        want = plain(**batch).logits
        got = apply(base, adapter, spec, **batch).logits
    assert torch.equal(got, want)


def test_fresh_leaves_follow_the_documented_init(base):
    adapter, spec = init(base, AdapterSpec(rank=8, alpha=16.0, use_dora=True), seed=0)
    flat = to_flat(adapter)
    weights = dict(base.named_parameters())
    n_a = 0
    for key, t in flat.items():
        path, _, leaf = key.rpartition(".")
        w = weights[f"{path}.weight"]
        assert t.dtype == torch.float32
        if leaf == "lora_B":
            assert torch.equal(t, torch.zeros(w.shape[0], 8))
        elif leaf == "lora_magnitude":
            assert torch.allclose(t, w.detach().double().norm(dim=1).float(), rtol=1e-6, atol=0)
        else:
            # kaiming_uniform_(a=√5): U(−b, b) with b = gain·√(3/fan_in), gain = √(2/(1+5)) → b = 1/√fan_in
            n_a += 1
            bound = 1 / math.sqrt(w.shape[1])
            assert t.shape == (8, w.shape[1])
            assert t.abs().max() <= bound
            assert t.abs().max() > 0.9 * bound and abs(t.mean()) < 0.1 * bound  # spread over the range
    assert n_a == 2 * 7  # two layers, seven targets


def test_fresh_adapter_gets_a_gradient_on_B_only(base, batch):
    """With B = 0 the loss is flat in A, and ∂/∂B = s·(∂/∂Δ)·Aᵀ is non-zero (A is not zero)."""
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, targets=("q_proj", "down_proj")), seed=1)
    leaves = adapter.apply(lambda t: t.requires_grad_())
    apply(base, leaves, spec, **batch).logits.square().mean().backward()
    for key, t in to_flat(leaves).items():
        if key.endswith("lora_B"):
            assert t.grad.abs().max() > 0, key
        else:
            assert torch.equal(t.grad, torch.zeros_like(t)), key


def test_same_seed_same_adapter_other_seed_other_A(base):
    spec = AdapterSpec(rank=4, alpha=8.0, targets=("v_proj",))
    a1, _ = init(base, spec, seed=3)
    a2, _ = init(base, spec, seed=3)
    a3, _ = init(base, spec, seed=4)
    key = "model.layers.0.self_attn.v_proj.lora_A"
    assert torch.equal(to_flat(a1)[key], to_flat(a2)[key])
    assert not torch.equal(to_flat(a1)[key], to_flat(a3)[key])
