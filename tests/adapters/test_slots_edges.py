"""LoRA slots at their edges (surviving mutants of adapters.slots)."""

from torch import nn

from wmtp_fn.adapters.slots import LoRASlot


def test_slot_repr_shows_its_linear():
    assert repr(LoRASlot(nn.Linear(3, 2))) == "LoRASlot(in_features=3, out_features=2, bias=True)"
    assert repr(LoRASlot(nn.Linear(4, 5, bias=False))) == "LoRASlot(in_features=4, out_features=5, bias=False)"


def test_a_dora_slot_over_a_biased_linear_keeps_the_bias_out_of_the_rescaling():
    """DoRA by hand in float64: out = m/‖W + BA‖_row · (x Wᵀ + x Aᵀ Bᵀ) + b — the bias is added
    after the magnitude rescaling, not scaled with it."""
    import torch

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 2, bias=True).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.tensor([0.5, -1.5], dtype=torch.float64))
    slot = LoRASlot(lin)
    A, B = torch.randn(1, 3, generator=g, dtype=torch.float64), torch.randn(2, 1, generator=g, dtype=torch.float64)
    m = torch.tensor([0.7, 2.0], dtype=torch.float64)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = torch.func.functional_call(slot, {"lora_A": A, "lora_B": B, "lora_magnitude": m}, (x,))
    w = lin.weight + B @ A
    want = (m / w.norm(dim=1)) * (x @ w.T) + lin.bias
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_install_slots_names_what_it_did_not_find():
    import pytest

    from wmtp_fn.adapters.slots import install_slots

    with pytest.raises(ValueError, match=r"^no linear named \['q_proj'\] found in Sequential$"):
        install_slots(nn.Sequential(nn.ReLU()), targets=("q_proj",))
