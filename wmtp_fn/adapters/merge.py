"""Merge an adapter into base weights (and back) as pure functions, and export a merged model.

    LoRA:  W' = W + s·B·A
    DoRA:  W' = m / ‖W + s·B·A‖_row · (W + s·B·A)

States are HuggingFace state dicts (`"model.layers.0.self_attn.q_proj.weight" → tensor`);
the inputs are never modified. Arithmetic runs in fp32 and the result is cast back to the
weight's dtype. `merged_into` runs a block of calls (generation) on a slotted base with the
merged weights swapped in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import to_flat
from wmtp_fn.adapters.nf4 import quantized_slots
from wmtp_fn.adapters.slots import empty_slots
from wmtp_fn.adapters.spec import AdapterSpec
from wmtp_fn.dist.shard import full_tensor


def delta_weights(adapter: TensorDict, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """Module path → `s·B·A` in fp32: [out, in]."""
    flat = to_flat(adapter)
    return {
        key[: -len(".lora_A")]: spec.scaling * (flat[key[: -len("A")] + "B"].float() @ a.float())
        for key, a in flat.items()
        if key.endswith(".lora_A")
    }


def weight_norms(base_state: Mapping[str, torch.Tensor], adapter: TensorDict, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """DoRA's row norms `‖W + s·B·A‖_row` of the *unmerged* weights (what `unmerge` needs)."""
    return {
        path: torch.linalg.vector_norm(_weight(base_state, path).float() + d, dim=1)
        for path, d in delta_weights(adapter, spec).items()
    }


def merge(base_state: Mapping[str, torch.Tensor], adapter: TensorDict, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter merged into every target weight."""
    out = dict(base_state)
    flat = to_flat(adapter)
    norms = weight_norms(base_state, adapter, spec) if spec.use_dora else {}
    for path, d in delta_weights(adapter, spec).items():
        w = _weight(base_state, path)
        merged = w.float() + d
        if spec.use_dora:
            merged = (flat[f"{path}.lora_magnitude"].float() / norms[path]).unsqueeze(1) * merged
        out[f"{path}.weight"] = merged.to(w.dtype)
    return out


def unmerge(
    merged_state: Mapping[str, torch.Tensor],
    adapter: TensorDict,
    spec: AdapterSpec,
    *,
    norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Undo `merge`. DoRA needs the unmerged row `norms` (from `weight_norms`): a merged row
    has norm `m` whatever the original was, so they cannot be recovered from the merged state."""
    if spec.use_dora and norms is None:
        raise ValueError("unmerging a DoRA adapter needs norms=weight_norms(base_state, adapter, spec)")
    out = dict(merged_state)
    flat = to_flat(adapter)
    for path, d in delta_weights(adapter, spec).items():
        w = _weight(merged_state, path)
        x = w.float()
        if spec.use_dora:
            x = x * (norms[path] / flat[f"{path}.lora_magnitude"].float()).unsqueeze(1)
        out[f"{path}.weight"] = (x - d).to(w.dtype)
    return out


def export_merged(
    base: nn.Module, adapter: TensorDict, spec: AdapterSpec, out_dir: str | Path, *, tokenizer=None
) -> Path:
    """Write a plain HuggingFace model directory with the adapter merged (loadable by
    `from_pretrained` without this package). Slots add no state-dict keys, so the layout is the
    base's own. A sharded base's weights are all-gathered first: under torchrun call it on every rank
    (transformers writes from rank 0)."""
    refuse_quantized(base, "export_merged")
    out_dir = Path(out_dir)
    state = {k: full_tensor(v.detach()) for k, v in base.state_dict().items()}
    base.save_pretrained(out_dir, state_dict=merge(state, adapter, spec), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def refuse_quantized(module: nn.Module, what: str) -> None:
    """Merging needs the full-precision weights: refused on a quantised (QLoRA) base, with what
    to do instead. (Merging into the dequantised NF4 weights would bake the 4-bit error into a
    full-size model that is neither the original base nor smaller.)"""
    paths = quantized_slots(module)
    if paths:
        raise ValueError(
            f"{what}: the base is NF4-quantised ({len(paths)} slots, e.g. {paths[0]!r}); merge into the "
            "full-precision base instead (load base.path without base.quantize: the adapter's base fingerprint "
            "matches it), or bind the adapter unmerged (adapters.bound)"
        )


def _weight(state: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
    key = f"{path}.weight"
    if key not in state:
        raise KeyError(f"state dict has no {key!r} for adapter module {path!r}; is the adapter rooted elsewhere?")
    return state[key]


@contextmanager
def merged_into(module: nn.Module, adapter: TensorDict, spec: AdapterSpec) -> Iterator[None]:
    """Run a block of calls with the adapter merged: each target slot computes with the merged
    weight `W + s·B·A` (DoRA: rescaled rows) — one matmul per linear instead of three, what
    generation wants. Every merged weight is a new tensor, swapped in for the block and swapped
    back on exit (also on an exception); the base's own tensors are never written. No grad;
    slots must be empty. Costs one copy of the target weights while it lasts.
    """
    refuse_quantized(module, "merged_into")
    slots = empty_slots(module)
    paths = list(delta_weights(adapter, spec))
    missing = next((p for p in paths if p not in slots), None)
    if missing is not None:
        raise KeyError(f"adapter path {missing!r} names no LoRA slot of {type(module).__name__}")
    with torch.no_grad():
        state = {f"{p}.weight": slots[p].weight for p in paths}
        new = merge(state, adapter.to(slots[paths[0]].weight.device) if paths else adapter, spec)
    saved = []
    try:
        for p in paths:
            slot = slots[p]
            saved.append((slot, slot._parameters["weight"]))
            slot._parameters["weight"] = nn.Parameter(new[f"{p}.weight"], requires_grad=False)
        yield
    finally:
        for slot, weight in reversed(saved):
            slot._parameters["weight"] = weight
