"""Checkpoints on disk: atomic directories of safetensors + JSON, and the seeds' formats.

Layout of a run's checkpoints (a torn write never replaces a good checkpoint):

    {root}/step_00000100/   params.safetensors  [opt.safetensors]  meta.json
    {root}/latest           text file naming the newest complete directory

A directory is written under a temporary name, every file fsync'ed, then renamed into place;
only then is `latest` replaced (write-to-temp + `os.replace`). A crash at any point leaves the
previous checkpoint and pointer intact. The seeds' `hf_lora` (and legacy `full`) `.pt`
checkpoints are read and written too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import from_flat, to_flat, validate
from wmtp_fn.adapters.spec import AdapterSpec

FORMAT = "wmtp_fn.checkpoint"
VERSION = 1
LATEST = "latest"


# ----------------------------------------------------------------------------- atomic writes


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path in `path`'s directory; if the block completes, the file written
    there is fsync'ed and replaces `path` (readers see the old or the new file, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def recover_dir(final: Path) -> None:
    """Finish a replacement of `final` that crashed between its two renames (`atomic_dir`):
    the old, complete copy waits under `.{name}.old-*`; put it back. Leftover old copies of a
    finished replacement are removed."""
    final = Path(final)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if not final.exists() and olds:
        os.rename(olds.pop(), final)
        fsync_path(final.parent)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory that becomes `final` only if the block completes.

    Replacing an existing `final` takes two renames (old aside, new in); a crash between them
    leaves the old copy aside, and `recover_dir` (called here and by every reader) restores it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # re-saving the same name: move the old one aside, then drop it
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- checkpoint dirs


def write_checkpoint(
    path: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]
) -> Path:
    """Write `{name}.safetensors` for each group of flat tensors plus `meta.json`, atomically."""
    with atomic_dir(Path(path)) as tmp:
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        body = {"format": FORMAT, "version": VERSION, **meta}
        (tmp / "meta.json").write_text(json.dumps(body, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Inverse of `write_checkpoint`: (tensor groups, meta)."""
    path = Path(path)
    recover_dir(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{meta_path}: version {meta['version']} is newer than this code reads ({VERSION})")
    tensors = {p.name.removesuffix(".safetensors"): load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return tensors, meta


def save_step(root: Path, step: int, tensors, meta, *, keep: int | None = 3, protect: Callable[[str], bool] | None = None) -> Path:
    """Write checkpoint `step_{step:08d}` under `root`, point `latest` at it, prune old ones.

    `keep` newest step checkpoints survive (None: all); `protect(name)` exempts others (best).
    """
    root = Path(root)
    path = write_checkpoint(root / f"step_{step:08d}", tensors, meta)
    atomic_write_text(root / LATEST, path.name + "\n")
    if keep is not None:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if protect is None or not protect(old.name):
                shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp-*"):  # leftovers of a crashed write
        shutil.rmtree(stale, ignore_errors=True)
    return path


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    recover_dir(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name!r}, which is not a complete checkpoint")
    return path


# ----------------------------------------------------------------------------- adapters


def adapter_meta(specs: Mapping[str, AdapterSpec]) -> dict[str, Any]:
    return {"adapters": {name: spec.to_dict() for name, spec in specs.items()}}


def save_params(
    path: Path, params: TensorDict, specs: Mapping[str, AdapterSpec], *, meta: Mapping[str, Any] | None = None
) -> Path:
    """An adapter-only checkpoint: the trainable pytree (one or more adapters, value head…)
    as `params.safetensors`, each adapter's spec (with its base fingerprint) in `meta.json`."""
    body = {"kind": "params", **adapter_meta(specs), **(meta or {})}
    return write_checkpoint(path, {"params": to_flat(params)}, body)


def load_params(path: Path) -> tuple[TensorDict, dict[str, AdapterSpec], dict[str, Any]]:
    tensors, meta = read_checkpoint(path)
    if "params" not in tensors:
        raise ValueError(f"{path}: checkpoint has no params.safetensors")
    specs = {name: AdapterSpec.from_dict(d) for name, d in meta.get("adapters", {}).items()}
    return from_flat(tensors["params"]), specs, meta


def load_adapter(path: Path, name: str = "lora", model: nn.Module | None = None) -> tuple[TensorDict, AdapterSpec]:
    """One adapter of a checkpoint (a `save_params` or training checkpoint), strictly checked
    against `model` (keys, shapes, base fingerprint) when given."""
    params, specs, _ = load_params(path)
    if name not in specs:
        raise KeyError(f"{path}: no adapter named {name!r}; it has {sorted(specs)}")
    adapter = params[name]
    if model is not None:
        validate(adapter, specs[name], model)
        adapter = adapter.to(next(model.parameters()).device)
    return adapter, specs[name]


# ----------------------------------------------------------------------------- seeds' formats


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


def read_seed_checkpoint(path: Path, model: nn.Module | None = None, *, trusted: bool = False) -> SeedCheckpoint:
    """Read an `hf_lora` or legacy `full` checkpoint.

    hf_lora keys are module paths relative to the model the seeds wrapped (`LlamaForCausalLM`
    for ref_tuning: `model.layers.…`; `LlamaModel` for the critic: `layers.…`); with `model`
    they are re-rooted onto it when needed and strictly validated. `trusted=True` allows
    arbitrary pickled objects (`weights_only=False`): only for files you made.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for unpicklable content
        raise ValueError(
            f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "if you trust this file, pass trusted=True"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    kind = obj.get("checkpoint_type", "full")
    meta = {k: obj.get(k) for k in ("base_model_path", "epoch", "train_metrics", "val_metrics", "config")}
    value_head = dict(obj.get("value_head_state_dict") or {})
    if kind == "full":
        if "backbone_state_dict" not in obj:
            raise ValueError(f"{path}: legacy 'full' checkpoint without 'backbone_state_dict' (keys: {sorted(obj)})")
        return SeedCheckpoint("full", value_head=value_head, backbone_state=dict(obj["backbone_state_dict"]), meta=meta)
    if kind != "hf_lora":
        raise ValueError(f"{path}: checkpoint_type {kind!r} is not supported; expected 'hf_lora' or 'full'")
    for key in ("lora_state_dict", "lora_config"):
        if key not in obj:
            raise ValueError(f"{path}: hf_lora checkpoint is missing {key!r}")
    cfg = obj["lora_config"]
    missing = [k for k in ("rank", "alpha", "target_modules") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: lora_config is missing {missing}; it has {sorted(cfg)}")
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
    flat = {k: v.float() for k, v in obj["lora_state_dict"].items()}
    if model is not None:
        flat = _reroot(flat, model)
    adapter = from_flat(flat)
    if model is not None:
        validate(adapter, spec, model, check_base=spec.base_fingerprint is not None)
    return SeedCheckpoint("hf_lora", adapter=adapter, spec=spec, value_head=value_head, meta=meta)


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
    raise ValueError(f"hf_lora key path {bad!r} names no module of {type(model).__name__}")


def _json_default(obj):
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable in checkpoint meta: {type(obj).__name__}")
