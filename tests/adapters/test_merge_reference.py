"""merge / unmerge / weight_norms against references that are not ours: the formulas written out
in float64 with the scaling by hand, and PEFT's own merge_and_unload."""

import pytest
import torch
from peft import PeftModel

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, export_peft, init, merge, to_flat, unmerge, weight_norms

TARGETS = ("q_proj", "o_proj", "gate_proj")
# (spec kwargs, scaling by hand for rank 4, alpha 16)
VARIANTS = {"lora": (dict(), 16 / 4), "rslora": (dict(use_rslora=True), 16 / 2), "dora": (dict(use_dora=True), 16 / 4)}


def adapter_for(base, variant, seed=4):
    kw, _ = VARIANTS[variant]
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=16.0, targets=TARGETS, **kw), seed=0)
    return randomize(adapter, seed=seed), spec


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_equals_the_float64_formula(variant, base):
    adapter, spec = adapter_for(base, variant)
    _, s = VARIANTS[variant]
    state = {k: v.detach() for k, v in base.state_dict().items()}
    merged = merge(state, adapter, spec)
    flat = {k: v.double() for k, v in to_flat(adapter).items()}
    changed = set()
    for key in flat:
        if not key.endswith(".lora_A"):
            continue
        path = key[: -len(".lora_A")]
        w = state[f"{path}.weight"].double() + s * flat[f"{path}.lora_B"] @ flat[key]
        if variant == "dora":
            w = (flat[f"{path}.lora_magnitude"] / w.norm(dim=1)).unsqueeze(1) * w
            assert rel_err(weight_norms(state, adapter, spec)[path], (state[f"{path}.weight"].double()
                           + s * flat[f"{path}.lora_B"] @ flat[key]).norm(dim=1)) <= 1e-6
        assert merged[f"{path}.weight"].dtype == state[f"{path}.weight"].dtype
        assert rel_err(merged[f"{path}.weight"], w) <= 1e-6, path
        changed.add(f"{path}.weight")
    assert len(changed) == 2 * len(TARGETS)
    for k, v in state.items():  # everything else is passed through untouched
        if k not in changed:
            assert merged[k] is v, k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_equals_peft_merge_and_unload(variant, base, plain, tmp_path):
    adapter, spec = adapter_for(base, variant, seed=6)
    export_peft(adapter, spec, tmp_path / "peft")
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    want = PeftModel.from_pretrained(plain, tmp_path / "peft").merge_and_unload().state_dict()
    got = merge(state, adapter, spec)
    assert set(got) == set(want)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-6, k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unmerge_inverts_the_float64_formula(variant, base):
    """unmerge of a hand-merged state gives the base weights back (DoRA with the hand-made norms)."""
    adapter, spec = adapter_for(base, variant, seed=8)
    _, s = VARIANTS[variant]
    state = {k: v.detach() for k, v in base.state_dict().items()}
    flat = {k: v.double() for k, v in to_flat(adapter).items()}
    merged, norms = dict(state), {}
    for key in [k for k in flat if k.endswith(".lora_A")]:
        path = key[: -len(".lora_A")]
        w = state[f"{path}.weight"].double() + s * flat[f"{path}.lora_B"] @ flat[key]
        norms[path] = w.norm(dim=1).float()
        if variant == "dora":
            w = (flat[f"{path}.lora_magnitude"] / w.norm(dim=1)).unsqueeze(1) * w
        merged[f"{path}.weight"] = w.float()
    restored = unmerge(merged, adapter, spec, norms=norms if variant == "dora" else None)
    for k, v in state.items():
        assert torch.allclose(restored[k], v, rtol=1e-5, atol=1e-6), k


def test_merge_names_a_missing_weight(base):
    adapter, spec = adapter_for(base, "lora")
    state = {k: v for k, v in base.state_dict().items() if k != "model.layers.1.mlp.gate_proj.weight"}
    with pytest.raises(KeyError) as info:
        merge(state, adapter, spec)
    assert info.value.args[0] == (
        "state dict has no 'model.layers.1.mlp.gate_proj.weight' for adapter module 'model.layers.1.mlp.gate_proj'; "
        "is the adapter rooted elsewhere?"
    )


def test_export_merged_writes_the_tokenizer_beside_the_weights(base, tmp_path):
    from transformers import AutoTokenizer

    from wmtp_fn.adapters import export_merged
    from wmtp_fn.data.embedded import embedded_tokenizer_path

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_path())
    adapter, spec = adapter_for(base, "dora")
    out = export_merged(base, adapter, spec, tmp_path / "merged", tokenizer=tok)
    assert out == tmp_path / "merged"
    again = AutoTokenizer.from_pretrained(out)
    assert again.get_vocab() == tok.get_vocab() and again.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_and_unmerge_keep_a_bf16_state_bf16(variant, base):
    """Arithmetic in fp32, result cast back to each weight's dtype."""
    adapter, spec = adapter_for(base, variant, seed=10)
    state = {k: v.detach().bfloat16() for k, v in base.state_dict().items()}
    merged = merge(state, adapter, spec)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    want = merge({k: v.float() for k, v in state.items()}, adapter, spec)[key]
    assert torch.equal(merged[key], want.bfloat16())
    norms = weight_norms(state, adapter, spec) if variant == "dora" else None
    restored = unmerge(merged, adapter, spec, norms=norms)
    assert restored[key].dtype == torch.bfloat16
    want = unmerge({k: v.float() for k, v in merged.items()}, adapter, spec, norms=norms)[key]
    assert torch.equal(restored[key], want.bfloat16())


def test_dora_unmerge_without_norms_message(base):
    adapter, spec = adapter_for(base, "dora")
    with pytest.raises(ValueError) as info:
        unmerge(base.state_dict(), adapter, spec)
    assert str(info.value) == "unmerging a DoRA adapter needs norms=weight_norms(base_state, adapter, spec)"


def test_export_merged_writes_safetensors(base, tmp_path):
    from wmtp_fn.adapters import export_merged

    adapter, spec = adapter_for(base, "lora")
    out = export_merged(base, adapter, spec, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
