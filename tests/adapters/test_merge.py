import pytest
import torch
from transformers import LlamaForCausalLM

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, export_merged, init, merge, unmerge, weight_norms


@pytest.mark.parametrize("kw", [dict(), dict(use_rslora=True), dict(use_dora=True)])
def test_merged_weights_forward_equals_bound_forward(kw, base, plain, batch):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=16.0, targets=("q_proj", "o_proj", "gate_proj"), **kw), seed=0)
    adapter = randomize(adapter, seed=4)
    state = plain.state_dict()
    plain.load_state_dict(merge(state, adapter, spec))
    with torch.no_grad():
        merged = plain(**batch).logits
        bound = apply(base, adapter, spec, **batch).logits
        unbound = base(**batch).logits
    assert rel_err(merged, bound) <= 1e-5
    assert rel_err(unbound, bound) > 1e-3


@pytest.mark.parametrize("use_dora", [False, True])
def test_unmerge_restores_the_base_weights(use_dora, base):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=16.0, use_dora=use_dora), seed=0)
    adapter = randomize(adapter, seed=4)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge(state, adapter, spec)
    key = "model.layers.1.mlp.up_proj.weight"
    assert rel_err(merged[key], state[key]) > 1e-3
    norms = weight_norms(state, adapter, spec) if use_dora else None
    restored = unmerge(merged, adapter, spec, norms=norms)
    for k, v in state.items():
        assert torch.allclose(restored[k], v, atol=1e-6, rtol=1e-5), k
    assert torch.equal(base.state_dict()[key], state[key])  # inputs untouched


def test_dora_unmerge_without_norms_is_an_error(base):
    adapter, spec = init(base, AdapterSpec(rank=2, use_dora=True), seed=0)
    with pytest.raises(ValueError, match="needs norms=weight_norms"):
        unmerge(base.state_dict(), adapter, spec)


def test_merged_export_reloads_with_plain_from_pretrained(base, batch, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, use_dora=True), seed=0)
    adapter = randomize(adapter, seed=9)
    export_merged(base, adapter, spec, tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="sdpa").eval()
    assert all(type(m).__name__ != "LoRASlot" for m in reloaded.modules())
    with torch.no_grad():
        assert rel_err(reloaded(**batch).logits, apply(base, adapter, spec, **batch).logits) <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_into_computes_what_the_bound_adapter_computes_and_restores_the_base(base, batch, use_dora):
    from wmtp_fn.adapters import AdapterSpec, apply, init, merged_into

    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, use_dora=use_dora), seed=0)
    gen = torch.Generator().manual_seed(5)
    adapter = adapter.apply(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen))
    want = apply(base, adapter, spec, **batch).logits
    before = {n: p for n, p in base.named_parameters()}
    values = {n: p.clone() for n, p in before.items()}
    with torch.no_grad(), merged_into(base, adapter, spec):
        got = base(**batch).logits
        assert any(p is not before[n] for n, p in base.named_parameters())  # merged copies are in
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    after = dict(base.named_parameters())
    assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before)
    with pytest.raises(RuntimeError, match="boom"), merged_into(base, adapter, spec):
        raise RuntimeError("boom")
    assert all(p is before[n] for n, p in base.named_parameters())
