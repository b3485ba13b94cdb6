"""LoRA slots at their edges (surviving mutants of adapters.slots)."""

import pytest
import torch
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


def _dora_dropout_case(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, generator=g).to(dtype)
    w = torch.randn(4, 6, generator=g).to(dtype)
    a = (0.5 * torch.randn(2, 6, generator=g)).to(dtype)
    b = (0.5 * torch.randn(4, 2, generator=g)).to(dtype)
    m = (1.0 + torch.rand(4, generator=g)).to(dtype)
    return x, w, a, b, m


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_delta_dora_with_dropout_by_hand(dtype):
    """DoRA + dropout with the default base path `drop(x) Wᵀ`: against the formula written out,
    the mask drawn in fp32 from the same seed and the input rescaled in fp32."""
    from wmtp_fn.adapters.slots import lora_delta

    x, w, a, b, m = _dora_dropout_case(dtype)
    p = torch.tensor(0.3)
    torch.manual_seed(7)
    got = lora_delta(x, x @ w.T, w, None, a, b, m, p)
    torch.manual_seed(7)
    keep = torch.rand(x.shape, dtype=torch.float32) >= 0.3
    h = (x.float() * keep / (1 - torch.tensor(0.3))).to(dtype)  # the documented fp32 rescale
    norm = torch.sqrt(((w.double() + b.double() @ a.double()) ** 2).sum(dim=1))
    scale = m.double() / norm
    want = (scale - 1) * (h.double() @ w.double().T) + scale * (h.double() @ a.double().T @ b.double().T)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0.05, atol=0.1)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)
    assert not torch.equal(h, x)  # dropout did act


def test_lora_delta_takes_the_base_path_it_is_given():
    """A quantised slot passes its own base path (no dense weight held for the backward): the
    delta must use it, not `drop(x) Wᵀ`."""
    from wmtp_fn.adapters.slots import lora_delta

    x, w, a, b, m = _dora_dropout_case(torch.float64)
    p = torch.tensor(0.2)
    torch.manual_seed(3)
    plain = lora_delta(x, x @ w.T, w, None, a, b, m, p)
    torch.manual_seed(3)
    other = lora_delta(x, x @ w.T, w, None, a, b, m, p, base_linear=lambda h: torch.full((*h.shape[:-1], 4), 2.0, dtype=h.dtype))
    norm = torch.linalg.vector_norm(w + b @ a, dim=1)
    scale = m / norm
    # the two differ exactly by (scale - 1) * (2 - drop(x) Wᵀ)
    torch.manual_seed(3)
    keep = torch.rand(x.shape, dtype=torch.float32) >= 0.2
    h = (x.float() * keep / 0.8).to(x.dtype)
    torch.testing.assert_close(other - plain, (scale - 1) * (2.0 - h @ w.T), rtol=0, atol=1e-12)
