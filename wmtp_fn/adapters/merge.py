"""Merge an adapter into base weights (and back) as pure functions, and export a merged model.

    LoRA:  W' = W + s·B·A
    DoRA:  W' = m / ‖W + s·B·A‖_row · (W + s·B·A)

States are HuggingFace state dicts (`"model.layers.0.self_attn.q_proj.weight" → tensor`);
the inputs are never modified. Arithmetic runs in fp32 and the result is cast back to the
weight's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import to_flat
from wmtp_fn.adapters.spec import AdapterSpec


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
    base's own."""
    out_dir = Path(out_dir)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    base.save_pretrained(out_dir, state_dict=merge(state, adapter, spec), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _weight(state: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
    key = f"{path}.weight"
    if key not in state:
        raise KeyError(f"state dict has no {key!r} for adapter module {path!r}; is the adapter rooted elsewhere?")
    return state[key]
