"""Each bad input is a clear error naming what is wrong."""

import json

import pytest
import torch

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, import_peft, init, install_slots, validate
from wmtp_fn.adapters.lora import from_flat, to_flat
from wmtp_fn.models.base import build_base, load_base, tiny_llama_config


@pytest.fixture
def adapter(base):
    return init(base, AdapterSpec(rank=4, alpha=8.0, targets=("q_proj", "down_proj")), seed=0)


def test_missing_key(base, adapter):
    ad, spec = adapter
    flat = to_flat(ad)
    del flat["model.layers.1.mlp.down_proj.lora_B"]
    with pytest.raises(ValueError, match=r"missing 1 key\(s\).*'model.layers.1.mlp.down_proj.lora_B' \(expected shape \(64, 4\)\)"):
        validate(from_flat(flat), spec, base)


def test_extra_key(base, adapter):
    ad, spec = adapter
    flat = to_flat(ad)
    flat["model.layers.0.self_attn.k_proj.lora_A"] = torch.zeros(4, 64)
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*'model.layers.0.self_attn.k_proj.lora_A' \(shape \(4, 64\)\)"):
        validate(from_flat(flat), spec, base)


def test_shape_mismatch_names_key_and_both_shapes(base, adapter):
    ad, spec = adapter
    flat = to_flat(ad)
    flat["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(8, 64)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.lora_A' has shape \(8, 64\), but .* expect \(4, 64\)"):
        validate(from_flat(flat), spec, base)


def test_different_base_fingerprint_names_both(base, adapter, tmp_path):
    ad, spec = adapter
    other = build_base(tiny_llama_config(vocab_size=128), seed=999)  # same shapes, other weights
    install_slots(other)
    with pytest.raises(ValueError) as err:
        validate(ad, spec, other)
    msg = str(err.value)
    assert "different base: weights differ" in msg
    assert spec.base_fingerprint["weights"] in msg


def test_same_base_in_another_dtype_is_accepted(tiny_dir, base, adapter, batch):
    ad, spec = adapter
    ad = randomize(ad, seed=1)
    bf16 = load_base(tiny_dir, dtype=torch.bfloat16)
    install_slots(bf16)
    validate(ad, spec, bf16)  # the weights digest is taken on bf16-rounded tensors
    with torch.no_grad():  # and the adapter computes on it what it computes on the fp32 base
        want = apply(base, ad, spec, **batch).logits
        got = apply(bf16, ad, spec, **batch).logits
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 5e-2
    with pytest.raises(ValueError, match="made for a different base"):
        other = build_base(tiny_llama_config(vocab_size=128), seed=77)
        install_slots(other)
        validate(ad, spec, other)


def test_binding_onto_the_wrong_root_is_an_error(base, adapter, batch):
    ad, spec = adapter
    with pytest.raises(KeyError, match=r"does not name a LoRA slot of LlamaModel.*adapter\['model'\]"):
        apply(base.model, ad, spec, **batch)
    ad = randomize(ad, seed=2)
    with torch.no_grad():  # the right root works: its hidden states give the full model's logits
        hidden = apply(base.model, ad["model"], spec, **batch).last_hidden_state
        logits = apply(base, ad, spec, **batch).logits
    assert rel_err(base.lm_head(hidden), logits) <= 1e-6


def test_target_without_slot_is_an_error(plain):
    install_slots(plain, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"have no LoRA slot.*install_slots"):
        init(plain, AdapterSpec(rank=2, targets=("q_proj", "v_proj")))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(alpha=-1.0), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(targets=("lm_head",)), "unknown LoRA target 'lm_head'"),
    ],
)
def test_bad_spec(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown AdapterSpec field\(s\) \['ranks'\]"):
        AdapterSpec.from_dict({"ranks": 4})


def test_peft_import_refuses_unsupported_options(base, adapter, tmp_path):
    ad, spec = adapter
    export_peft(ad, spec, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"field 'rank_pattern' = \{'q_proj': 8\} is not supported"):
        import_peft(tmp_path, base)


def test_peft_import_of_a_non_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        import_peft(tmp_path)


def test_peft_import_validates_shapes_against_the_base(adapter, tmp_path):
    ad, spec = adapter
    export_peft(ad, spec, tmp_path)
    wider = build_base(tiny_llama_config(vocab_size=128, intermediate_size=96), seed=0)
    install_slots(wider)
    with pytest.raises(ValueError, match=r"down_proj.lora_A' has shape \(4, 176\), but .* expect \(4, 96\)"):
        import_peft(tmp_path, wider)


def test_binding_the_whole_trainable_pytree_names_the_stray_leaf(base, adapter, batch):
    from tensordict import TensorDict

    ad, spec = adapter
    params = TensorDict({"lora": ad, "value_head": {"weight": torch.zeros(1, 64)}}, batch_size=[])
    with pytest.raises(KeyError, match=r"'value_head.weight': leaf 'weight' is not a LoRA tensor.*params\['lora'\]"):
        apply(base, params, spec, **batch)
