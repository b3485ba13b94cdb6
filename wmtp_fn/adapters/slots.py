"""LoRA slots: linears that accept adapter tensors bound by `functional_call`.

A slot replaces a target `nn.Linear` once, keeping the *same* weight and bias Parameters (so
state-dict names, FSDP sharding and `save_pretrained` are unchanged). It owns no adapter
weights: its `lora_*` buffers are `None` until `torch.func.functional_call` binds tensors to
them for one call. Unbound, a slot computes exactly `F.linear(x, weight, bias)`, which is what
`nn.Linear.forward` computes, so the base model's outputs are bit-for-bit unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_fn.adapters.spec import TARGETS, resolve_targets

# The names a binding may fill on a slot. `lora_B` arrives pre-scaled (s·B) in compute dtype;
# `lora_magnitude` (DoRA) and `lora_dropout` (a 0-dim fp32 probability) are optional.
SLOT_TENSORS = ("lora_A", "lora_B", "lora_magnitude", "lora_dropout")


class LoRASlot(nn.Module):
    """A linear layer with an empty LoRA slot. See `lora_delta` for the math when bound."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        for name in SLOT_TENSORS:
            self.register_buffer(name, None, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype adapters bind in by default (the weight's)."""
        return self.weight.dtype

    def base_output(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen linear alone: `x Wᵀ (+ b)`. Quantised slots (`adapters.nf4`) override it."""
        return F.linear(x, self.weight, self.bias if bias else None)

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] as a dense tensor (DoRA's norm); quantised slots dequantise."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_output(x)
        if self.lora_A is None:
            return y
        weight = None if self.lora_magnitude is None else self.dense_weight()  # only DoRA reads it
        return y + lora_delta(
            x, y, weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout,
            base_linear=lambda h: self.base_output(h, bias=False),
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def lora_delta(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor | None = None,
    dropout: torch.Tensor | None = None,
    base_linear: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """What a bound slot adds to the base output `y = x Wᵀ + b`.

    x: [..., in], y: [..., out], weight: [out, in], lora_A: [r, in], lora_B: [out, r] already
    multiplied by the scaling s, magnitude: [out] (DoRA), dropout: 0-dim drop probability.
    LoRA: `drop(x) Aᵀ Bᵀ`. DoRA (PEFT's math, the norm detached as in the paper §4.3):
    `(m/‖W + BA‖_row − 1) · base + m/‖W + BA‖_row · drop(x) Aᵀ Bᵀ`, where `base` is the
    bias-free base output on the (dropped-out) input, `base_linear(h)` (default `F.linear(h,
    weight)`; a quantised slot passes its own, which never holds the dense weight for backward).
    """
    h = x
    if dropout is not None:
        # A tensor probability keeps compiled graphs valid across adapters with other dropouts.
        # Draw and rescale in fp32: in bf16 both the threshold and 1/(1-p) round, which biases
        # the drop rate and E[h] (p=0.1: 0.1018 and 0.996 instead of 0.1 and 1).
        keep = torch.rand_like(x, dtype=torch.float32) >= dropout
        h = (x.float() * keep / (1 - dropout)).to(x.dtype)
    delta = F.linear(F.linear(h, lora_A), lora_B)
    if magnitude is None:
        return delta
    with torch.no_grad():
        norm = torch.linalg.vector_norm(weight.to(x.dtype) + lora_B @ lora_A, dim=1)
    scale = magnitude / norm
    if dropout is None:
        base = y if bias is None else y - bias
    else:
        base = F.linear(h, weight) if base_linear is None else base_linear(h)
    return (scale - 1) * base + scale * delta


def install_slots(
    model: nn.Module, targets: tuple[str, ...] | list[str] | str = TARGETS
) -> tuple[str, ...]:
    """Replace every target `nn.Linear` in `model` by a `LoRASlot`, once; returns all slot paths.

    Idempotent: existing slots are kept. Install the union of the targets any adapter will
    use (default: all seven), then bind adapters of any rank / alpha / target subset.
    """
    wanted = set(resolve_targets(targets))
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in wanted and type(module) is nn.Linear:
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, leaf, LoRASlot(module))
    paths = tuple(slot_paths(model))
    if not paths:
        raise ValueError(f"no linear named {sorted(wanted)} found in {type(model).__name__}")
    return paths


def slot_paths(model: nn.Module) -> dict[str, LoRASlot]:
    """Module path → slot, in module order."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRASlot)}


def empty_slots(model: nn.Module) -> dict[str, LoRASlot]:
    """`slot_paths(model)`, checked: slots are installed and none has an adapter bound (binding
    blocks do not nest)."""
    slots = slot_paths(model)
    if not slots:
        raise ValueError(f"{type(model).__name__} has no LoRA slots; call install_slots first")
    busy = next((p for p, s in slots.items() if s.lora_A is not None), None)
    if busy is not None:
        raise RuntimeError(f"slot {busy!r} already has an adapter bound; `bound` blocks do not nest")
    return slots


@contextmanager
def filled(slots: Mapping[str, LoRASlot], binding: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Put `binding` (`{"<slot path>.<leaf>": tensor}`) into the slots for the duration of the
    block, then restore what was there, also on an exception. Used to bind an adapter once for a
    block of calls (`adapters.bound`) and to re-bind a checkpointed layer for its recomputation."""
    saved = []
    try:
        for key, t in binding.items():
            path, _, name = key.rpartition(".")
            slot = slots[path]
            saved.append((slot, name, slot._buffers[name]))
            slot._buffers[name] = t
        yield
    finally:
        for slot, name, old in reversed(saved):
            slot._buffers[name] = old
