"""`bound`: one binding for a block of calls, equal to `apply`, always undone."""

import pytest
import torch

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, apply, bound, init, install_slots
from wmtp_fn.models.base import load_base


def test_bound_equals_apply_and_unbinds(base, batch):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0), seed=0)
    adapter = randomize(adapter, seed=3)
    ref = apply(base, adapter, spec, **batch).logits
    plain = base(**batch).logits
    with bound(base, adapter, spec):
        first = base(**batch).logits
        second = base(**batch).logits
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert not torch.equal(ref, plain)
    assert torch.equal(base(**batch).logits, plain)  # slots empty again
    assert all(s.lora_A is None and s.lora_B is None for s in base.modules() if hasattr(s, "lora_A"))


def test_gradients_from_every_call_of_the_block_reach_the_masters(tiny_dir, batch):
    base = load_base(tiny_dir, dtype=torch.float64)  # (HF norms still round to fp32 inside)
    install_slots(base)
    adapter, spec = init(base, AdapterSpec(rank=2), seed=0)
    adapter = randomize(adapter, seed=4).apply(lambda t: t.double())
    leaves = adapter.apply(lambda t: t.detach().requires_grad_())
    with bound(base, leaves, spec):
        loss = base(**batch).logits.square().mean() + 2 * base(**batch).logits.square().mean()
    loss.backward()  # after the block: the graph kept the bound tensors
    ref = adapter.apply(lambda t: t.detach().requires_grad_())
    (apply(base, ref, spec, **batch).logits.square().mean() + 2 * apply(base, ref, spec, **batch).logits.square().mean()).backward()
    for (k, a), (_, b) in zip(leaves.items(True, True), ref.items(True, True)):
        assert a.grad is not None and torch.equal(a.grad, b.grad), k  # the same graph, bound once


def test_unbinds_after_an_exception_and_refuses_nesting(base, batch):
    adapter, spec = init(base, AdapterSpec(rank=2), seed=0)
    with pytest.raises(ZeroDivisionError):
        with bound(base, adapter, spec):
            1 / 0
    assert base.model.layers[0].self_attn.q_proj.lora_A is None
    with bound(base, adapter, spec):
        with pytest.raises(RuntimeError, match="already has an adapter bound"):
            with bound(base, adapter, spec):
                pass
    assert base.model.layers[0].self_attn.q_proj.lora_A is None


def test_a_key_that_names_no_slot_is_refused_before_binding(base):
    adapter, spec = init(base, AdapterSpec(rank=2), seed=0)
    with pytest.raises(KeyError, match="does not name a LoRA slot"):
        with bound(base.model, adapter, spec):  # rooted at the causal LM, not at .model
            pass
    assert base.model.layers[0].self_attn.q_proj.lora_A is None
