"""Run checkpoints and adapter-only params on disk: atomic directories of safetensors + JSON.

Layout of a run's checkpoints (a torn write never replaces a good checkpoint):

    {root}/step_00000100/   params.safetensors  [opt.safetensors]  meta.json
    {root}/latest           text file naming the newest complete directory

A directory is written under a temporary name, every file fsync'ed, then renamed into place;
only then is `latest` replaced (write-to-temp + `os.replace`). A crash at any point leaves the
previous checkpoint and pointer intact (the primitives are in `wmtp_fn.atomic`). The seeds'
`hf_lora` / `full` formats are in `wmtp_fn.adapters.seeds_io`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters.lora import from_flat, to_flat, validate
from wmtp_fn.adapters.spec import AdapterSpec
from wmtp_fn.atomic import atomic_dir, atomic_write_text, recover_dir
from wmtp_fn.errors import CheckpointError

FORMAT = "wmtp_fn.checkpoint"
VERSION = 1
LATEST = "latest"


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
        raise CheckpointError(f"{meta_path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{meta_path}: version {meta['version']} is newer than this code reads ({VERSION})")
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
            # never the one just written: after a resume from an older `latest`, newer-numbered
            # leftovers on disk would otherwise push it out while `latest` names it
            if old.name != path.name and (protect is None or not protect(old.name)):
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


Spec = Any  # AdapterSpec | models.value_head.ValueHeadSpec: each knows its to_dict/from_dict


def _kind_of(spec: Spec) -> str:
    if isinstance(spec, AdapterSpec):
        return "lora"
    from wmtp_fn.models.value_head import ValueHeadSpec

    if isinstance(spec, ValueHeadSpec):
        return "value_head"
    raise TypeError(f"no checkpoint kind for a {type(spec).__name__} spec")


def subtree_meta(specs: Mapping[str, Spec]) -> dict[str, Any]:
    """The spec of every subtree of a trainable pytree, tagged with its kind, for `meta.json`:
    `{"subtrees": {"policy": {"kind": "lora", "spec": {...}}, "value_head": {"kind": "value_head", ...}}}`."""
    return {"subtrees": {name: {"kind": _kind_of(spec), "spec": spec.to_dict()} for name, spec in specs.items()}}


def specs_from_meta(meta: Mapping[str, Any], where: str = "checkpoint") -> dict[str, Spec]:
    """Inverse of `subtree_meta` (also reads the untagged `adapters` of older checkpoints)."""
    from wmtp_fn.models.value_head import ValueHeadSpec

    readers = {"lora": AdapterSpec.from_dict, "value_head": ValueHeadSpec.from_dict}
    if "subtrees" not in meta:
        return {name: AdapterSpec.from_dict(d) for name, d in meta.get("adapters", {}).items()}
    out = {}
    for name, entry in meta["subtrees"].items():
        if entry.get("kind") not in readers:
            raise CheckpointError(f"{where}: subtree {name!r} has kind {entry.get('kind')!r}; expected one of {sorted(readers)}")
        out[name] = readers[entry["kind"]](entry["spec"])
    return out


def save_params(
    path: Path, params: TensorDict, specs: Mapping[str, Spec], *, meta: Mapping[str, Any] | None = None
) -> Path:
    """An adapter-only checkpoint: the trainable pytree (one or more adapters, value head…)
    as `params.safetensors`, each adapter's spec (with its base fingerprint) in `meta.json`."""
    body = {"kind": "params", **subtree_meta(specs), **(meta or {})}
    return write_checkpoint(path, {"params": to_flat(params)}, body)


def load_params(path: Path) -> tuple[TensorDict, dict[str, Spec], dict[str, Any]]:
    tensors, meta = read_checkpoint(path)
    if "params" not in tensors:
        raise CheckpointError(f"{path}: checkpoint has no params.safetensors")
    return from_flat(tensors["params"]), specs_from_meta(meta, str(path)), meta


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


# ----------------------------------------------------------------------------- run checkpoints


def save_run(root: Path, state, cursor, *, specs: Mapping[str, Spec], config: Mapping[str, Any],
             info: Mapping[str, Any], keep: int | None) -> Path:
    """A resumable checkpoint: the whole train state (params, optimizer state, extra, step, seed,
    skip counter), the data cursor, the flat config. `params.safetensors` holds the params
    alone, keyed as in an adapter-only checkpoint; `state.safetensors` the rest of the state."""
    from wmtp_fn.train.state import flatten_state

    tensors, meta = flatten_state(state)
    params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("params.")}
    body = {"kind": "train", "state": meta, "cursor": cursor.to_dict(), "config": dict(config),
            "metrics": dict(info), **subtree_meta(specs)}
    return save_step(root, state.step, {"params": params, "state": rest}, body, keep=keep)


def restore_run(path: Path, device: torch.device):
    """Inverse of `save_run`: `(state on device, cursor, meta)`."""
    from wmtp_fn.data.sampling import Cursor
    from wmtp_fn.train.state import unflatten_state

    tensors, meta = read_checkpoint(path)
    flat = {f"params.{k}": v.to(device) for k, v in tensors["params"].items()}
    flat.update({k: v.to(device) for k, v in tensors["state"].items()})
    return unflatten_state(flat, meta["state"]), Cursor.from_dict(meta["cursor"]), meta


def _json_default(obj):
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable in checkpoint meta: {type(obj).__name__}")
