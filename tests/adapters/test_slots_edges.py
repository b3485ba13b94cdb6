"""LoRA slots at their edges (surviving mutants of adapters.slots)."""

from torch import nn

from wmtp_fn.adapters.slots import LoRASlot


def test_slot_repr_shows_its_linear():
    assert repr(LoRASlot(nn.Linear(3, 2))) == "LoRASlot(in_features=3, out_features=2, bias=True)"
    assert repr(LoRASlot(nn.Linear(4, 5, bias=False))) == "LoRASlot(in_features=4, out_features=5, bias=False)"
