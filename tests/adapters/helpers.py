"""Test helpers for adapters: random non-zero adapters and relative errors."""

from __future__ import annotations

import torch
from tensordict import TensorDict


def randomize(adapter: TensorDict, seed: int, scale: float = 0.3) -> TensorDict:
    """Same structure, every leaf random and non-zero (B, unlike at init, is not zero).
    DoRA magnitudes are perturbed around their initial row norms."""
    gen = torch.Generator().manual_seed(seed)

    def fill(key, t):
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if key[-1] == "lora_magnitude":
            return t * (1 + 0.2 * noise)
        return scale * noise

    return adapter.named_apply(fill, nested_keys=True)


def randomize_peft(peft_model) -> None:
    """In place, under the caller's RNG: PEFT initialises B to zeros, so give every lora_B random
    non-zero weights and perturb DoRA magnitudes around their initial row norms."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
