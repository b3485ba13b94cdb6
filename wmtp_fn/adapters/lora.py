"""Adapters as data: initialise, validate, and bind a LoRA TensorDict over a slotted base.

An adapter is a `TensorDict` nested by module path with fp32 master leaves
`lora_A [r, in]`, `lora_B [out, r]` (and `lora_magnitude [out]` for DoRA):

    adapter["model", "layers", "3", "self_attn", "q_proj", "lora_A"]

`adapter.flatten_keys(".")` is the mapping that `functional_call` binds onto the slots, after
`bind` has cast every leaf once to the compute dtype and folded the scaling into B.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
import re

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.slots import SLOT_TENSORS, LoRASlot, empty_slots, filled, slot_paths
from wmtp_fn.adapters.spec import AdapterSpec
from wmtp_fn.dist.shard import full_tensor
from wmtp_fn.fingerprint import check_same_base, fingerprint

LEAVES = ("lora_A", "lora_B", "lora_magnitude")


def target_paths(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Module paths `spec` adapts in `model`, in module order; every one must be a slot."""
    wanted = set(spec.targets)
    layers = None if spec.layers is None else set(spec.layers)
    index = _layer_index(model) if layers is not None else {}
    paths, missing = [], []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in wanted or not isinstance(module, (nn.Linear, LoRASlot)):
            continue
        if layers is not None and index.get(_block_of(path)) not in layers:
            continue
        (paths if isinstance(module, LoRASlot) else missing).append(path)
    if missing:
        raise ValueError(
            f"{len(missing)} target linear(s) have no LoRA slot, e.g. {missing[0]!r}; "
            f"call install_slots(model, targets={list(spec.targets)}) once after loading the base"
        )
    if not paths:
        raise ValueError(f"adapter targets {list(spec.targets)} (layers={spec.layers}) match no slot in the model")
    return paths


def expected_shapes(model: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Flat key → shape of every leaf an adapter with `spec` must have on `model`."""
    slots = slot_paths(model)
    shapes = {}
    for path in target_paths(model, spec):
        slot = slots[path]
        shapes[f"{path}.lora_A"] = (spec.rank, slot.in_features)
        shapes[f"{path}.lora_B"] = (slot.out_features, spec.rank)
        if spec.use_dora:
            shapes[f"{path}.lora_magnitude"] = (slot.out_features,)
    return shapes


def module_and_fingerprint(model) -> tuple[nn.Module, dict[str, str]]:
    """A base record (`models.base.Base`: `.module`, `.fingerprint` computed once at load) or a
    bare module (fingerprinted now, for notebooks) -> `(module, fingerprint)`. Duck-typed, so
    adapters need not import models."""
    if isinstance(model, nn.Module):
        return model, fingerprint(model)
    return model.module, model.fingerprint


def init(
    model, spec: AdapterSpec, *, seed: int = 0, device: torch.device | str | None = None
) -> tuple[TensorDict, AdapterSpec]:
    """A fresh adapter for `model` (a base record or a module): A Kaiming-uniform (a=√5), B
    zeros, DoRA magnitude = ‖W‖_row.

    Returns the fp32 adapter and `spec` with the base fingerprint filled in. Initialisation runs
    on the CPU from `seed`, so the same seed gives the same adapter on any device.
    """
    model, base_fingerprint = module_and_fingerprint(model)
    spec = spec.replace(base_fingerprint=base_fingerprint)
    gen = torch.Generator().manual_seed(seed)
    slots = slot_paths(model)
    flat = {}
    for path in target_paths(model, spec):
        slot = slots[path]
        a = torch.empty(spec.rank, slot.in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        flat[f"{path}.lora_A"] = a
        flat[f"{path}.lora_B"] = torch.zeros(slot.out_features, spec.rank)
        if spec.use_dora:
            flat[f"{path}.lora_magnitude"] = torch.linalg.vector_norm(full_tensor(slot.dense_weight().detach()).float().cpu(), dim=1)
    device = device if device is not None else _device_of(model)
    return from_flat(flat).to(device), spec


def from_flat(flat: dict[str, torch.Tensor]) -> TensorDict:
    """Nest a `{"a.b.lora_A": t}` mapping into an adapter TensorDict."""
    return TensorDict(dict(flat), batch_size=[]).unflatten_keys(".")


def to_flat(adapter: TensorDict) -> dict[str, torch.Tensor]:
    """The adapter as `{"a.b.lora_A": t}`, in insertion order (one traversal, no copies)."""
    return {
        ".".join(k) if isinstance(k, tuple) else k: v
        for k, v in adapter.items(include_nested=True, leaves_only=True)
    }


def validate(adapter: TensorDict, spec: AdapterSpec, model, *, check_base: bool = True) -> None:
    """Strict check that `adapter` fits `model`: same keys, same shapes, same base.

    Raises ValueError naming the first missing / unexpected key, or the key with both shapes,
    or both base fingerprints.
    """
    if check_base:
        model, base_fingerprint = module_and_fingerprint(model)
        check_same_base(spec.base_fingerprint, base_fingerprint)
    elif not isinstance(model, nn.Module):
        model = model.module
    want = expected_shapes(model, spec)
    have = {k: tuple(v.shape) for k, v in to_flat(adapter).items()}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing:
        raise ValueError(
            f"adapter is missing {len(missing)} key(s) that spec {spec.variant} r={spec.rank} "
            f"targets={list(spec.targets)} requires, first: {missing[0]!r} (expected shape {want[missing[0]]})"
        )
    if extra:
        raise ValueError(
            f"adapter has {len(extra)} unexpected key(s) for this model and spec, first: {extra[0]!r} "
            f"(shape {have[extra[0]]}); its targets or layers do not match the spec"
        )
    for k, shape in want.items():
        if have[k] != shape:
            raise ValueError(f"adapter key {k!r} has shape {have[k]}, but this model and spec expect {shape}")


def bind(
    adapter: TensorDict, spec: AdapterSpec, *, dtype: torch.dtype, train: bool = False
) -> dict[str, torch.Tensor]:
    """The flat tensors `functional_call` puts into the slots, for one call.

    The master leaves are cast to `dtype` once here (not per op), the scaling folded into B,
    a dropout probability bound only when training with `spec.dropout > 0`. Leaves of a kind
    (all A, all B, all magnitudes) are concatenated, scaled and cast together and handed out
    as views, so a call costs a handful of kernels (and its backward a handful more) however
    many modules the adapter covers. Autograd flows from these views back to the masters.
    """
    flat = to_flat(adapter)
    groups: dict[str, list[str]] = {leaf: [] for leaf in LEAVES}
    for key in flat:
        leaf = key.rpartition(".")[2]
        if leaf not in groups:
            raise KeyError(
                f"adapter key {key!r}: leaf {leaf!r} is not a LoRA tensor (expected one of {LEAVES}); "
                "bind one adapter (e.g. params['lora']), not the whole trainable pytree"
            )
        groups[leaf].append(key)
    out = {}
    for leaf, keys in groups.items():
        if not keys:
            continue
        masters = [flat[k] for k in keys]
        joined = torch.cat([t.reshape(-1) for t in masters])
        if leaf == "lora_B":
            joined = joined * spec.scaling
        pieces = joined.to(dtype).split([t.numel() for t in masters])
        out.update({k: piece.view(t.shape) for k, piece, t in zip(keys, pieces, masters)})
    if train and spec.dropout > 0:
        p = torch.tensor(float(spec.dropout), dtype=torch.float32, device=_first(out).device)
        for key in groups["lora_A"]:
            out[key[: -len("lora_A")] + "lora_dropout"] = p
    return out


def apply(
    module: nn.Module,
    adapter: TensorDict,
    spec: AdapterSpec,
    *args,
    train: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs,
):
    """Call `module(*args, **kwargs)` with `adapter` bound into its slots (the base is untouched).

    `adapter` is rooted at `module`: for a `LlamaForCausalLM` base, bind the whole adapter to
    the base, or `adapter["model"]` to `base.model` to get hidden states. Compute runs in
    `dtype` (default: the slots' `compute_dtype`, the weights' dtype: bf16 for a bf16 base).
    """
    slots = slot_paths(module)
    if not slots:
        raise ValueError(f"{type(module).__name__} has no LoRA slots; call install_slots first")
    binding = bind(adapter, spec, dtype=dtype or next(iter(slots.values())).compute_dtype, train=train)
    check_bindable(module, binding, slots)
    return torch.func.functional_call(module, binding, args, kwargs, strict=False)


@contextmanager
def bound(
    module: nn.Module, adapter: TensorDict, spec: AdapterSpec, *, train: bool = False, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """Bind `adapter` into `module`'s slots for a block of calls (a generation loop, the heads
    of an MTP step), restoring the empty slots on exit, also on an exception. `apply` is the
    one-call form. The binding (cast, scaled, dropout set) is made once for the block, so every
    call inside shares it and gradients flow back to the master leaves from all of them.

        with bound(base, adapter, spec):
            for _ in range(n):
                logits = base(ids).logits
    """
    slots = empty_slots(module)
    binding = bind(adapter, spec, dtype=dtype or next(iter(slots.values())).compute_dtype, train=train)
    check_bindable(module, binding, slots)
    with filled(slots, binding):
        yield


def check_bindable(
    module: nn.Module, binding: dict[str, torch.Tensor], slots: dict[str, LoRASlot] | None = None
) -> None:
    """Every bound key must land in a slot; anything else would be silently ignored.
    `slots`: `slot_paths(module)`, when the caller has it already."""
    slots = slot_paths(module) if slots is None else slots
    for key in binding:
        path, _, leaf = key.rpartition(".")
        if path not in slots:
            raise KeyError(
                f"adapter key {key!r} does not name a LoRA slot of {type(module).__name__} "
                f"({len(slots)} slots installed, e.g. {next(iter(slots), None)!r}); is the adapter rooted "
                "at another module (e.g. bind adapter['model'] to base.model), or are slots missing?"
            )
        if leaf not in SLOT_TENSORS:
            raise KeyError(f"adapter key {key!r}: unknown leaf {leaf!r}; expected one of {SLOT_TENSORS}")


_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layers|extra_heads)\.\d+)(?:\.|$)")


def _block_of(path: str) -> str | None:
    """The decoder block a module path is in (`model.layers.3`, `extra_heads.0`), or None."""
    m = _BLOCK.match(path)
    return m.group(1) if m else None


def _layer_index(model: nn.Module) -> dict[str, int]:
    """Decoder-block path -> its index in `AdapterSpec.layers`: the blocks of `layers` in order,
    then an MTP base's `extra_heads` (so with a trunk of n blocks, extra head j is n + j)."""
    blocks = [p for p, _ in model.named_modules() if _BLOCK.match(p) and _block_of(p) == p]
    ordered = [p for p in blocks if ".extra_heads." not in f".{p}"] + [p for p in blocks if ".extra_heads." in f".{p}"]
    return {p: i for i, p in enumerate(ordered)}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _first(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return next(iter(d.values()))
