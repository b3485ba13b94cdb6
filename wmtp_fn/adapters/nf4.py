"""QLoRA's frozen base: target linears stored in 4-bit NormalFloat (NF4), double-quantised.

A weight `W [out, in]` is cut into blocks of 64 consecutive elements (row-major); each block
stores 64 4-bit indices into the 16 NF4 levels and one absmax, `Ŵ = level[idx] · absmax`.
Double quantisation stores the absmaxes themselves in 8 bits (blocks of 256, minus their mean
`offset`), as QLoRA and `BitsAndBytesConfig(bnb_4bit_use_double_quant=True)` do. About 4.13
bits per weight instead of 16.

The packing and the two dequantisation kernels are bitsandbytes' (`quantize_4bit`,
`torch.ops.bitsandbytes.dequantize_4bit` / `dequantize_blockwise`, CPU and CUDA), so a base
quantised here is bit-for-bit the one PEFT QLoRA trains on (docs/qlora.md says why
bitsandbytes). What is ours: an `NF4Slot` is a `LoRASlot` (adapters bind into it exactly as
before) whose base output is `F.linear(x, dequantise(W))`, with a backward that dequantises
again instead of saving the dense weight, so only the 4-bit weight is held between the passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_fn.adapters.slots import SLOT_TENSORS, LoRASlot, slot_paths
from wmtp_fn.adapters.spec import TARGETS, resolve_targets
from wmtp_fn.errors import ConfigError

QUANT_TYPES = ("nf4",)
BLOCKSIZE = 64  # elements per absmax (bitsandbytes' and PEFT's default)
# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E), ascending; index 7 is exactly 0.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# Largest |w − Ŵ| / absmax of the 4-bit rounding: half the widest gap between two levels.
NF4_MAX_REL_ERROR = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as e:
        raise ImportError(
            "base.quantize='nf4' needs bitsandbytes: pip install 'wmtp_fn[quant]' (bitsandbytes>=0.50.2,<0.51)"
        ) from e
    return bnb_f


def check_quant_type(quantize: str, *, key: str = "base.quantize") -> str:
    """`""` (no quantisation) or one of `QUANT_TYPES`; anything else is refused naming `key`
    (a `ConfigError`: the command line prints it as one line)."""
    if quantize not in ("", *QUANT_TYPES):
        raise ConfigError(f"{key}: {quantize!r} is not a quantisation; expected '' (none) or one of {list(QUANT_TYPES)}")
    return quantize


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantise `weight [out, in]` (bf16/fp16/fp32, on its device) to double-quantised NF4.

    Returns the tensors an `NF4Slot` stores: `packed` uint8 [out·in/2, 1] (two indices per
    byte, high nibble first), `absmax` uint8 [n_blocks] (8-bit codes of the per-64 absmaxes),
    `absmax2` fp32 [n_blocks/256] and `code2` fp32 [256] (the second-level state), `offset`
    fp32 0-dim (the mean absmax subtracted before the second level).
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_nf4: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    packed, state = _bnb_functional().quantize_4bit(
        weight.detach().contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
        quant_storage=torch.uint8,
    )
    return {
        "packed": packed,
        "absmax": state.absmax,
        "absmax2": state.state2.absmax.float(),
        "code2": state.state2.code.float().to(weight.device),
        "offset": torch.as_tensor(state.offset, dtype=torch.float32, device=weight.device).reshape(()),
    }


def absmax_of(q: dict[str, torch.Tensor], blocksize2: int = 256) -> torch.Tensor:
    """The fp32 per-block absmaxes [n_blocks] from their 8-bit codes (the second level)."""
    scaled = torch.ops.bitsandbytes.dequantize_blockwise.default(
        q["absmax"], q["absmax2"].float(), q["code2"].float(), blocksize2, torch.float32
    )
    return scaled + q["offset"].float()


def dequantize_nf4(q: dict[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight `Ŵ [out, in]` in `dtype` that `quantize_nf4` stands for.

    Dequantised as one row `[1, out·in]` and viewed as `shape`: blocks run over the flattened
    weight, and bitsandbytes 0.50's CPU kernel mis-indexes them when `in` is not a multiple of
    64 (it restarts the block count at each row); the one-row call is exact on every device.
    (2-D, not 1-D: the CPU kernel returns a 1-D shape as `[1, n]`, which the op's fake
    implementation, and so a compiled graph, would not expect.)"""
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        q["packed"], absmax_of(q), BLOCKSIZE, "nf4", [1, math.prod(shape)], dtype
    )
    return flat.view(*shape)


class _NF4Linear(torch.autograd.Function):
    """`y = x Ŵᵀ + b` with Ŵ dequantised in the forward and again in the backward: the 4-bit
    tensors are what is saved, never the dense weight (the base is frozen: no weight grad)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, shape, bias):
        q = {"packed": packed, "absmax": absmax, "absmax2": absmax2, "code2": code2, "offset": offset}
        ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(q, shape, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, absmax2, code2, offset = ctx.saved_tensors
        q = {"packed": packed, "absmax": absmax, "absmax2": absmax2, "code2": code2, "offset": offset}
        # x is the only differentiable input (the base is frozen): when the backward runs, x needs it
        return grad_y @ dequantize_nf4(q, ctx.shape, grad_y.dtype), None, None, None, None, None, None, None


_STATE = ("packed", "absmax", "absmax2", "code2", "offset")


class NF4Slot(LoRASlot):
    """A LoRA slot over an NF4 weight. The 4-bit tensors are non-persistent buffers
    (`weight_packed`, `weight_absmax`, ...), so they move with `.to(device)` and are not in the
    state dict (a quantised base is re-made from `base.path`, never saved). `compute_dtype`
    is the dtype of the weight it was quantised from."""

    quant_type = "nf4"

    def __init__(self, linear: nn.Linear | LoRASlot):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_shape = (linear.out_features, linear.in_features)
        self.weight_dtype = linear.weight.dtype
        for name, t in quantize_nf4(linear.weight).items():
            self.register_buffer(f"weight_{name}", t, persistent=False)
        self.bias = linear.bias
        for name in SLOT_TENSORS:
            self.register_buffer(name, None, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"weight_{name}") for name in _STATE}

    def base_output(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return _NF4Linear.apply(
            x, *self.quant_state().values(), self.weight_shape, self.bias if bias else None
        )

    def dense_weight(self) -> torch.Tensor:
        """The dequantised weight [out, in] in the compute dtype (a new tensor each call)."""
        return dequantize_nf4(self.quant_state(), self.weight_shape, self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant=nf4"


def quantize_linears(model: nn.Module, targets: Sequence[str] | str = TARGETS, quantize: str = "nf4") -> tuple[str, ...]:
    """Replace every target `nn.Linear` (or dense `LoRASlot`) of `model` by an `NF4Slot`, in
    place, on the weight's own device; returns the quantised module paths. Quantise before
    anything wraps the layers (`models.prepare` owns the order). Embeddings, norms and the
    unembedding stay in their dtype (as transformers' bitsandbytes loading keeps `lm_head`)."""
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantize_linears: {quantize!r} is not one of {list(QUANT_TYPES)}")
    wanted = set(resolve_targets(targets))
    done = []
    for path, module in list(model.named_modules()):
        parent_path, _, leaf = path.rpartition(".")
        if leaf not in wanted or isinstance(module, NF4Slot) or type(module) not in (nn.Linear, LoRASlot):
            continue
        setattr(model.get_submodule(parent_path), leaf, NF4Slot(module))  # "" is the model itself
        done.append(path)
    if not done and not any(isinstance(s, NF4Slot) for s in slot_paths(model).values()):
        raise ValueError(f"no linear named {sorted(wanted)} to quantise in {type(model).__name__}")
    return tuple(done)


def quantized_slots(model: nn.Module) -> list[str]:
    """Paths of the NF4 slots of `model` (empty for a dense base)."""
    return [p for p, s in slot_paths(model).items() if isinstance(s, NF4Slot)]
