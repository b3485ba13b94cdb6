"""LoRA and DoRA with dropout in training mode against real PEFT, under the same dropout mask.

PEFT's DoRA with active dropout computes the base part on the *dropped-out* input
(`(m/‖W + sBA‖ − 1) · drop(x) Wᵀ + m/‖W + sBA‖ · s · drop(x) Aᵀ Bᵀ`), not from the base output.
The mask is shared by seeding: our slot draws `rand_like(x, fp32) >= p` from the global
generator; the same draw, made here first, is handed to PEFT as its dropout module.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots, to_flat

P = 0.4
IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0


class Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(IN, OUT, bias=True)

    def forward(self, x):
        return self.q_proj(x)


class FixedDropout(nn.Module):
    """Inverted dropout with a given keep mask (what nn.Dropout computes for that mask)."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x * self.keep / (1 - P)


def peft_twin(adapter, spec, keep):
    """The same linear, wrapped by PEFT with our adapter's weights and the fixed mask."""
    model = get_peft_model(
        Block(seed=0),
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=P, target_modules=["q_proj"], use_dora=spec.use_dora),
    )
    layer = model.base_model.model.q_proj
    flat = to_flat(adapter)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(flat["q_proj.lora_A"])
        layer.lora_B["default"].weight.copy_(flat["q_proj.lora_B"])
        if spec.use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(flat["q_proj.lora_magnitude"])
    layer.lora_dropout["default"] = FixedDropout(keep)
    return model.train(), layer


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_training_matches_peft_under_the_same_mask(use_dora):
    ours = Block(seed=0)
    install_slots(ours, targets=("q_proj",))
    spec = AdapterSpec(rank=RANK, alpha=ALPHA, dropout=P, targets=("q_proj",), use_dora=use_dora)
    adapter, spec = init(ours, spec, seed=1)
    adapter = randomize(adapter, seed=2).apply(lambda t: t.requires_grad_())
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(3))

    torch.manual_seed(123)
    keep = torch.rand_like(x, dtype=torch.float32) >= P
    assert 0 < keep.float().mean() < 1
    torch.manual_seed(123)
    got = apply(ours, adapter, spec, x, train=True)

    peft_model, layer = peft_twin(adapter.detach(), spec, keep)
    want = peft_model(x)
    assert rel_err(got, want) <= 1e-6

    # Gradients reach the masters as PEFT's reach its parameters (s·B and the magnitude too).
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    grads = to_flat(adapter.apply(lambda t: t.grad))
    assert rel_err(grads["q_proj.lora_A"], layer.lora_A["default"].weight.grad) <= 1e-6
    assert rel_err(grads["q_proj.lora_B"], layer.lora_B["default"].weight.grad) <= 1e-6
    if use_dora:
        assert rel_err(grads["q_proj.lora_magnitude"], layer.lora_magnitude_vector["default"].weight.grad) <= 1e-6

    # The mask matters: without dropout (eval) both give a clearly different output.
    with torch.no_grad():
        no_drop = apply(ours, adapter, spec, x, train=False)
    assert rel_err(no_drop, want) > 1e-2
