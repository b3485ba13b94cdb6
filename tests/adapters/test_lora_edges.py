"""adapters.lora at its edges (surviving mutants): a base record validated without its
fingerprint, the no-slots messages, decoder-block paths and the layer index of an MTP base's
extra heads."""

import pytest
import torch
from torch import nn

from wmtp_fn.adapters import AdapterSpec, apply, bound, init, install_slots, validate
from wmtp_fn.adapters.lora import _block_of, _layer_index
from wmtp_fn.models.base import Base, load_base


def test_a_base_record_is_validated_without_its_fingerprint(tiny_dir):
    module = load_base(tiny_dir, dtype=torch.float32)
    install_slots(module)
    record = Base.of(module, "causal_lm")
    adapter, spec = init(record, AdapterSpec(rank=2, targets=("q_proj",)))
    validate(adapter, spec.replace(base_fingerprint=None), record, check_base=False)  # no fingerprint needed
    with pytest.raises(ValueError, match=r"^adapter is missing 1 key\(s\)"):
        validate(adapter.exclude(("model", "layers", "0", "self_attn", "q_proj", "lora_A")), spec, record, check_base=False)


def test_a_model_without_slots_is_named(plain, base, batch):
    adapter, spec = init(base, AdapterSpec(rank=2))
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM has no LoRA slots; call install_slots first$"):
        apply(plain, adapter, spec, **batch)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM has no LoRA slots; call install_slots first$"):
        with bound(plain, adapter, spec):
            pass


def test_block_of_a_path():
    assert _block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert _block_of("extra_heads.0.mlp.up_proj") == "extra_heads.0"
    assert _block_of("lm_head") is None and _block_of("model.norm") is None


def test_extra_heads_come_after_the_trunk_whatever_the_module_order():
    """Extra heads registered before the trunk: still indexed n, n+1, … after the n trunk blocks."""
    m = nn.Module()
    m.extra_heads = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(2)])
    m.model = nn.Module()
    m.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)])
    assert _layer_index(m) == {"model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 2,
                               "extra_heads.0": 3, "extra_heads.1": 4}


def test_check_bindable_finds_the_slots_itself_and_names_a_stray_key(base):
    from wmtp_fn.adapters.lora import check_bindable

    t = torch.zeros(1)
    check_bindable(base, {"model.layers.0.self_attn.q_proj.lora_A": t})  # slots looked up when not given
    with pytest.raises(KeyError, match=r"adapter key 'model\.nope\.lora_A' does not name a LoRA slot of LlamaForCausalLM "
                                       r"\(\d+ slots installed, e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\)"):
        check_bindable(base, {"model.nope.lora_A": t})
    with pytest.raises(KeyError, match=r"\(0 slots installed, e\.g\. None\)"):
        check_bindable(base, {"model.nope.lora_A": t}, {})


def test_bind_binds_a_dropout_only_when_training_with_a_positive_rate(base):
    from wmtp_fn.adapters import bind

    adapter, spec = init(base, AdapterSpec(rank=2, targets=("q_proj",), dropout=0.25))
    assert not [k for k in bind(adapter, spec, dtype=torch.float32) if k.endswith("lora_dropout")]  # default: eval
    trained = bind(adapter, spec, dtype=torch.float32, train=True)
    drops = {k: v for k, v in trained.items() if k.endswith("lora_dropout")}
    assert len(drops) == len([k for k in trained if k.endswith("lora_A")]) > 0
    assert all(v.dtype == torch.float32 and v.shape == () and v.item() == 0.25 for v in drops.values())
    zero = bind(adapter, spec.replace(dropout=0.0), dtype=torch.float32, train=True)
    assert not [k for k in zero if k.endswith("lora_dropout")]  # p = 0 binds nothing (no RNG draw per call)


def test_bind_refuses_a_whole_pytree_with_its_message(base):
    from tensordict import TensorDict

    from wmtp_fn.adapters import bind

    adapter, spec = init(base, AdapterSpec(rank=2, targets=("q_proj",)))
    tree = TensorDict({"lora": adapter, "value_head": {"weight": torch.zeros(1, 4)}}, batch_size=[])
    with pytest.raises(KeyError, match=r"adapter key 'value_head\.weight': leaf 'weight' is not a LoRA tensor "
                                       r"\(expected one of \('lora_A', 'lora_B', 'lora_magnitude'\)\); "
                                       r"bind one adapter \(e\.g\. params\['lora'\]\), not the whole trainable pytree"):
        bind(tree, spec, dtype=torch.float32)


def test_check_bindable_messages_in_full(base):
    from wmtp_fn.adapters.lora import check_bindable

    t = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        check_bindable(base, {"model.nope.lora_A": t})
    assert err.value.args[0].endswith("is the adapter rooted at another module (e.g. bind adapter['model'] to "
                                      "base.model), or are slots missing?")
    with pytest.raises(KeyError) as err:
        check_bindable(base, {"model.layers.0.self_attn.q_proj.lora_C": t})
    assert err.value.args[0] == ("adapter key 'model.layers.0.self_attn.q_proj.lora_C': unknown leaf 'lora_C'; "
                                 "expected one of ('lora_A', 'lora_B', 'lora_magnitude', 'lora_dropout')")


def test_init_draws_a_from_seed_0_with_peft_s_kaiming_bound(base):
    """Kaiming-uniform with a = √5 (PEFT's init) bounds A by sqrt(6 / ((1 + 5) · fan_in)) =
    1/√fan_in; drawn from seed 0 by default, B zeros."""
    import math

    from wmtp_fn.adapters import to_flat

    flat = to_flat(init(base, AdapterSpec(rank=4))[0])
    a = [v for k, v in flat.items() if k.endswith("lora_A")]
    first = a[0]
    want = torch.nn.init.kaiming_uniform_(torch.empty(first.shape), a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, want)
    scaled = max(float(t.abs().max()) * math.sqrt(t.shape[1]) for t in a)
    assert 0.97 < scaled <= 1.0
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in flat.items() if k.endswith("lora_B"))


def test_target_messages_name_the_first_linear_and_the_layers(plain, base):
    with pytest.raises(ValueError, match=r"^2 target linear\(s\) have no LoRA slot, e\.g\. 'model\.layers\.0\.self_attn\.q_proj'; "):
        init(plain, AdapterSpec(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"^adapter targets \['q_proj'\] \(layers=\(7,\)\) match no slot in the model$"):
        init(base, AdapterSpec(rank=2, targets=("q_proj",), layers=(7,)))


def test_to_flat_keeps_a_top_level_key():
    from tensordict import TensorDict

    from wmtp_fn.adapters import to_flat

    t = torch.zeros(2)
    assert list(to_flat(TensorDict({"lora_A": t, "x": {"lora_B": t}}, batch_size=[]))) == ["lora_A", "x.lora_B"]
