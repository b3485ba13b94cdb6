"""What identifies a frozen base: architecture, parameter shapes and a hash of a few weights.

Adapters store the fingerprint of the base they were trained on, so loading one onto another
base fails loudly. It lives below both `models` and `adapters` (each reads it; neither imports
the other for it), and is computed once per loaded base (`models.base.Base`).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

# Config fields that decide whether two bases are the same architecture.
_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
)
# Elements hashed per tensor: enough to tell two checkpoints apart, cheap on a 7B model.
_HASH_ELEMENTS = 1 << 16


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Identify a base: architecture, parameter shapes, dtype and a hash of a few weight tensors.

    Tensors are hashed after rounding to bfloat16 on the CPU, so the same checkpoint loaded in
    fp32 or bf16 has the same `weights` digest; `dtype` is recorded for information only
    (see `check_same_base`). Must be computed on the unsharded base (before FSDP), and on the
    full-precision weights: a QLoRA base (`adapters.nf4`) has the fingerprint of the weights
    it was quantised from, taken at load (`models.prepare` adds `quant` for information), so
    a module that is already quantised is refused here.
    """
    quantised = next((n for n, m in model.named_modules() if getattr(m, "quant_type", None)), None)
    if quantised is not None:
        raise ValueError(
            f"fingerprint: {type(model).__name__} is already quantised ({quantised!r} is "
            f"{getattr(model.get_submodule(quantised), 'quant_type')}); take the fingerprint of the full-precision "
            "weights before quantising (models.base.Base.of, then prepare(..., quantize=...))"
        )
    cfg = getattr(model, "config", None)
    arch = {"class": type(model).__name__}
    if cfg is not None:
        arch.update({f: getattr(cfg, f, None) for f in _ARCH_FIELDS})
    named = {n: p for n, p in model.named_parameters()}
    shapes = json.dumps({n: list(p.shape) for n, p in named.items()}, sort_keys=True)
    h = hashlib.sha256()
    for name in _hashed_names(list(named)):
        flat = named[name].detach().reshape(-1)[:_HASH_ELEMENTS]
        h.update(name.encode())
        h.update(flat.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    dtype = next(iter(named.values())).dtype if named else torch.float32
    return {
        "arch": json.dumps(arch, sort_keys=True),
        "shapes": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "weights": h.hexdigest()[:16],
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_same_base(expected: dict[str, str] | None, actual: dict[str, str], *, what: str = "adapter") -> None:
    """Raise if `actual` is not the base `expected` was made for (dtype and quant may differ:
    an adapter trained on the NF4 base of a checkpoint fits that checkpoint in bf16 too)."""
    if not expected:
        return
    diff = [k for k in ("arch", "shapes", "weights") if expected.get(k) != actual.get(k)]
    if diff:
        raise ValueError(
            f"{what} was made for a different base: {', '.join(diff)} differ\n"
            f"  {what} base fingerprint: {json.dumps(expected, sort_keys=True)}\n"
            f"  this base fingerprint:  {json.dumps(actual, sort_keys=True)}"
        )


def _hashed_names(names: list[str]) -> list[str]:
    """A few tensors spread over the model: first, last, and a middle one of the list."""
    if not names:
        return []
    picks = {0, len(names) // 2, len(names) - 1}
    return [names[i] for i in sorted(picks)]
