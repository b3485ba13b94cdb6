"""PEFT interoperability: `adapter_config.json` + `adapter_model.safetensors` in, and out.

Key mapping (PEFT ↔ ours), for a `LlamaForCausalLM` root:
    base_model.model.{path}.lora_A.weight        ↔ {path}.lora_A
    base_model.model.{path}.lora_B.weight        ↔ {path}.lora_B
    base_model.model.{path}.lora_magnitude_vector ↔ {path}.lora_magnitude   (DoRA)
PEFT stores B unscaled, as we do; the scaling comes from `r`, `lora_alpha`, `use_rslora`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import from_flat, module_and_fingerprint, to_flat, validate
from wmtp_fn.adapters.spec import AdapterSpec, resolve_targets

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_OURS_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_PEFT_TO_OURS = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_magnitude_vector": "lora_magnitude",
    "lora_magnitude_vector.weight": "lora_magnitude",  # older PEFT releases
}
# PEFT options whose non-default values change the math or the layout: refused on import.
_UNSUPPORTED = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
}


def export_peft(
    adapter: TensorDict,
    spec: AdapterSpec,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write `adapter` as a PEFT LoRA directory that `PeftModel.from_pretrained` loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in to_flat(adapter).items():
        path, _, leaf = key.rpartition(".")
        tensors[f"{PREFIX}{path}.{_OURS_TO_PEFT[leaf]}"] = t.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "layers_to_transform": None if spec.layers is None else list(spec.layers),
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def import_peft(src_dir: str | Path, model=None) -> tuple[TensorDict, AdapterSpec]:
    """Read a PEFT LoRA directory into an fp32 adapter TensorDict and its spec.

    With `model` (a slotted base), the adapter is strictly validated against it and the spec
    records that base's fingerprint (PEFT directories carry none).
    """
    src_dir = Path(src_dir)
    cfg_path = src_dir / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src_dir}: no {CONFIG}; not a PEFT adapter directory")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field, default in _UNSUPPORTED.items():
        value = cfg.get(field, default)
        if value != default and value not in (None, {}, [], False):
            raise ValueError(f"{cfg_path}: field {field!r} = {value!r} is not supported (expected {default!r})")

    flat = _read_peft_tensors(src_dir)
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:  # a regex, or absent: the tensors say what is adapted
        targets = sorted({k.rsplit(".", 2)[-2] for k in flat})
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    spec = AdapterSpec(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=resolve_targets(targets),
        layers=None if layers is None else tuple(layers),
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
    )
    adapter = from_flat(flat)
    if model is not None:
        module, base_fingerprint = module_and_fingerprint(model)
        spec = spec.replace(base_fingerprint=base_fingerprint)
        validate(adapter, spec, model)
        adapter = adapter.to(next(module.parameters()).device)
    return adapter, spec


def _read_peft_tensors(src_dir: Path) -> dict[str, torch.Tensor]:
    st, binf = src_dir / WEIGHTS, src_dir / "adapter_model.bin"
    if st.is_file():
        raw = load_file(str(st))
    elif binf.is_file():
        raw = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{src_dir}: neither {WEIGHTS} nor adapter_model.bin")
    flat = {}
    for key, t in raw.items():
        path = key.removeprefix(PREFIX)
        match = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", path)
        if match is None:
            raise ValueError(
                f"{src_dir}: tensor {key!r} is not a LoRA A/B/magnitude weight of a linear; "
                "only plain LoRA/DoRA adapters of linear layers are supported"
            )
        flat[f"{match.group(1)}.{_PEFT_TO_OURS[match.group(2)]}"] = t.float()
    return flat
