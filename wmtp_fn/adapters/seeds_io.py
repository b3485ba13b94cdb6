"""The seeds' checkpoint formats: `hf_lora` (read and write) and the legacy `full` (read).

The research code this project replaces saved `torch.save`d dicts::

    {"checkpoint_type": "hf_lora", "lora_state_dict": {module path + ".lora_A" / ".lora_B": tensor},
     "value_head_state_dict": {...} or {}, "lora_config": {"rank", "alpha", "dropout",
     "target_modules"}, "base_model_path", "epoch", "train_metrics", "val_metrics", "config"}

and, in older runs, `{"checkpoint_type": "full", "backbone_state_dict", "value_head_state_dict"}`.
The seeds' critic files also hold `optimizer_state_dict` (ignored), and their LoRA keys may carry
the critic's `backbone.` prefix and FSDP's `._checkpoint_wrapped_module` infixes (stripped on
reading; `models.value_head.read_seed_critic` reads a whole critic). We add `base_fingerprint` (and `use_rslora` / `use_dora` / `layers` in `lora_config` when they
differ from the seeds' defaults); files without them read as the seeds wrote them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import from_flat, to_flat, validate
from wmtp_fn.adapters.spec import AdapterSpec
from wmtp_fn.atomic import atomic_file
from wmtp_fn.errors import CheckpointError


@dataclass
class SeedCheckpoint:
    """A checkpoint of the research code this project replaces (`torch.save`d dict)."""

    kind: str  # "hf_lora" | "full"
    adapter: TensorDict | None = None
    spec: AdapterSpec | None = None
    value_head: dict[str, torch.Tensor] = field(default_factory=dict)
    backbone_state: dict[str, torch.Tensor] | None = None  # legacy "full" only
    meta: dict[str, Any] = field(default_factory=dict)  # base_model_path, epoch, metrics, config


def save_hf_lora(
    path: Path,
    adapter: TensorDict,
    spec: AdapterSpec,
    *,
    value_head: Mapping[str, torch.Tensor] | None = None,
    base_model_path: str = "",
    epoch: float = 0.0,
    train_metrics: Mapping[str, Any] | None = None,
    val_metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the seeds' `hf_lora` checkpoint (`torch.save`), atomically."""
    lora_config = {"rank": spec.rank, "alpha": float(spec.alpha), "dropout": float(spec.dropout), "target_modules": list(spec.targets)}
    if spec.use_rslora or spec.use_dora or spec.layers is not None:  # our extensions, absent = seeds' defaults
        lora_config.update(use_rslora=spec.use_rslora, use_dora=spec.use_dora, layers=spec.layers and list(spec.layers))
    obj = {
        "checkpoint_type": "hf_lora",
        "lora_state_dict": {k: v.detach().cpu() for k, v in to_flat(adapter).items()},
        "value_head_state_dict": {k: v.detach().cpu() for k, v in (value_head or {}).items()},
        "lora_config": lora_config,
        "base_model_path": str(base_model_path),
        "epoch": float(epoch),
        "train_metrics": dict(train_metrics or {}),
        "val_metrics": dict(val_metrics or {}),
        "config": dict(config or {}),
        "base_fingerprint": dict(spec.base_fingerprint or {}),
    }
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch_dict(path: Path, *, trusted: bool = False) -> dict:
    """A `torch.save`d dict of the research code, read weights-only unless `trusted` (arbitrary
    pickled objects: only for files you made); a `CheckpointError` naming the file otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for unpicklable content
        raise CheckpointError(
            f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "if you trust this file, pass trusted=True"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def read_seed_checkpoint(path: Path, model: nn.Module | None = None, *, trusted: bool = False) -> SeedCheckpoint:
    """Read an `hf_lora` or legacy `full` checkpoint.

    hf_lora keys are module paths relative to the model the seeds wrapped (`LlamaForCausalLM`
    for ref_tuning: `model.layers.…`; `LlamaModel` for the critic: `layers.…`); with `model`
    they are re-rooted onto it when needed and strictly validated. `trusted=True` allows
    arbitrary pickled objects (`weights_only=False`): only for files you made.
    """
    path = Path(path)
    obj = load_torch_dict(path, trusted=trusted)
    kind = obj.get("checkpoint_type", "full")
    meta = {k: obj.get(k) for k in ("base_model_path", "epoch", "train_metrics", "val_metrics", "config")}
    value_head = dict(obj.get("value_head_state_dict") or {})
    if kind == "full":
        if "backbone_state_dict" not in obj:
            raise CheckpointError(f"{path}: legacy 'full' checkpoint without 'backbone_state_dict' (keys: {sorted(obj)})")
        return SeedCheckpoint("full", value_head=value_head, backbone_state=dict(obj["backbone_state_dict"]), meta=meta)
    if kind != "hf_lora":
        raise CheckpointError(f"{path}: checkpoint_type {kind!r} is not supported; expected 'hf_lora' or 'full'")
    for key in ("lora_state_dict", "lora_config"):
        if key not in obj:
            raise CheckpointError(f"{path}: hf_lora checkpoint is missing {key!r}")
    cfg = obj["lora_config"]
    missing = [k for k in ("rank", "alpha", "target_modules") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: lora_config is missing {missing}; it has {sorted(cfg)}")
    spec = AdapterSpec(
        rank=int(cfg["rank"]),
        alpha=float(cfg["alpha"]),
        dropout=float(cfg.get("dropout", 0.0)),
        targets=tuple(cfg["target_modules"]),
        layers=tuple(cfg["layers"]) if cfg.get("layers") else None,
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        base_fingerprint=obj.get("base_fingerprint") or None,
    )
    flat = {seeds_lora_key(k): v.float() for k, v in obj["lora_state_dict"].items()}
    if model is not None:
        flat = _reroot(flat, model)
    adapter = from_flat(flat)
    if model is not None:
        validate(adapter, spec, model, check_base=spec.base_fingerprint is not None)
    return SeedCheckpoint("hf_lora", adapter=adapter, spec=spec, value_head=value_head, meta=meta)


def seeds_lora_key(key: str) -> str:
    """A seeds' LoRA key without the critic's `backbone.` prefix and the `._checkpoint_wrapped_module`
    infixes activation checkpointing put into module paths."""
    return key.removeprefix("backbone.").replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")


def _reroot(flat: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Add or strip a leading `model.` so the keys name modules of `model`."""
    modules = dict(model.named_modules())
    paths = {k.rpartition(".")[0] for k in flat}
    if all(p in modules for p in paths):
        return flat
    for fix in (lambda k: "model." + k, lambda k: k.removeprefix("model.")):
        if all(fix(p) in modules for p in paths):
            return {fix(k): v for k, v in flat.items()}
    bad = next(p for p in sorted(paths) if p not in modules)
    raise CheckpointError(f"hf_lora key path {bad!r} names no module of {type(model).__name__}")
