import pytest
import torch
from torch import nn

from wmtp_fn.adapters import LoRASlot, install_slots, slot_paths
from wmtp_fn.adapters.spec import TARGETS


def test_unbound_slots_give_bitwise_identical_logits(plain, base, batch):
    assert len(slot_paths(base)) == 7 * 2  # 7 linears x 2 layers
    with torch.no_grad():
        want = plain(**batch).logits
        got = base(**batch).logits
    assert torch.equal(got, want)


def test_slots_keep_parameters_and_state_dict_layout(plain, base):
    assert list(base.state_dict()) == list(plain.state_dict())
    slot = base.model.layers[0].self_attn.q_proj
    assert isinstance(slot, LoRASlot)
    assert slot.lora_A is None and slot.lora_B is None
    assert not any(p.requires_grad for p in base.parameters())


def test_install_is_idempotent_and_keeps_the_same_parameter_objects(base):
    weight = base.model.layers[1].mlp.down_proj.weight
    paths = install_slots(base)
    assert len(paths) == 14
    assert base.model.layers[1].mlp.down_proj.weight is weight


def test_install_subset_and_meta_aliases(plain):
    paths = install_slots(plain, targets=["wq", "w2"])  # Meta names for q_proj and down_proj
    assert {p.rsplit(".", 1)[-1] for p in paths} == {"q_proj", "down_proj"}
    assert type(plain.model.layers[0].self_attn.k_proj) is nn.Linear


def test_unknown_target_lists_valid_names(plain):
    with pytest.raises(ValueError) as err:
        install_slots(plain, targets=["q_proj", "qkv"])
    msg = str(err.value)
    assert "unknown LoRA target 'qkv'" in msg
    for name in TARGETS + ("wq", "w3"):
        assert name in msg
