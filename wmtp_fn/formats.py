"""Read an adapter from any format the project writes or reads, detected from the path.

Above `adapters`, `checkpoint` and `models` (it reads all three formats' modules).

    read_adapter(path, base) -> (adapter, spec)

- a project checkpoint directory (`meta.json`: `checkpoint.save_params` or a run checkpoint),
  or a run directory holding one in `adapter/`;
- a PEFT directory (`adapter_config.json`);
- the seeds' `hf_lora` file (`checkpoint_type: "hf_lora"`);
- the seeds' MTP policy file (`checkpoint_type: "lora"`, Meta key names), for an MTP base.

Every adapter is strictly validated against `base` (keys and shapes: every weight in the file
must land in a slot, so an all-linear adapter can never silently lose its FFN weights) and
moved to its device. The base fingerprint is checked when the file carries one.
"""

from __future__ import annotations

from pathlib import Path

from tensordict import TensorDict

from wmtp_fn.adapters.lora import from_flat, module_and_fingerprint, validate
from wmtp_fn.adapters.spec import AdapterSpec
from wmtp_fn.errors import CheckpointError

FORMATS = ("project", "peft", "hf_lora", "seeds_policy")


def adapter_format(path: str | Path, *, trusted: bool = False) -> str:
    """Which of `FORMATS` `path` holds; a `CheckpointError` naming the path otherwise.
    `trusted`: a `torch.save` file may hold arbitrary pickled objects (only files you made)."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "adapter" / "meta.json").is_file():
            return "project"
        if (path / "adapter_config.json").is_file():
            return "peft"
        raise CheckpointError(f"{path}: not an adapter directory (expected meta.json, adapter/meta.json or adapter_config.json)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such adapter file or directory")
    from wmtp_fn.adapters.seeds_io import load_torch_dict

    kind = load_torch_dict(path, trusted=trusted).get("checkpoint_type")
    if kind == "hf_lora":
        return "hf_lora"
    if kind == "lora":
        return "seeds_policy"
    raise CheckpointError(f"{path}: checkpoint_type {kind!r} holds no adapter; expected 'hf_lora' or 'lora'")


def read_adapter(path: str | Path, base, *, name: str | None = None, trusted: bool = False) -> tuple[TensorDict, AdapterSpec]:
    """The adapter at `path` (any of `FORMATS`), validated against `base` (a `models.base.Base`
    or a slotted module), on its device. `name` picks the subtree of a project checkpoint with
    several adapters (default: its only one). `trusted` allows pickled objects in the seeds'
    `torch.save` files (only for files you made)."""
    path = Path(path)
    module, fingerprint = module_and_fingerprint(base)
    kind = adapter_format(path, trusted=trusted)
    if kind == "project":
        from wmtp_fn.checkpoint import load_params

        root = path if (path / "meta.json").is_file() else path / "adapter"
        params, specs, _ = load_params(root)
        adapters = [k for k, s in specs.items() if isinstance(s, AdapterSpec)]
        if name is None:
            if len(adapters) != 1:
                raise CheckpointError(f"{root}: holds adapters {adapters}; choose one by name")
            name = adapters[0]
        if name not in adapters:
            raise CheckpointError(f"{root}: no adapter named {name!r}; it has {adapters}")
        adapter, spec = params[name], specs[name]
    elif kind == "peft":
        from wmtp_fn.adapters.peft_io import import_peft

        adapter, spec = import_peft(path)
    elif kind == "hf_lora":
        from wmtp_fn.adapters.seeds_io import read_seed_checkpoint

        seed = read_seed_checkpoint(path, module, trusted=trusted)
        adapter, spec = seed.adapter, seed.spec
    else:
        from wmtp_fn.models.meta import read_seeds_policy

        flat, spec, _ = read_seeds_policy(path, module.config, trusted=trusted)
        adapter = from_flat(flat)
    check_base = spec.base_fingerprint is not None
    try:
        validate(adapter, spec, base, check_base=check_base)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not check_base:  # PEFT and the seeds' policy files carry none: record the base it fits
        spec = spec.replace(base_fingerprint=fingerprint)
    return adapter.to(next(module.parameters()).device), spec


def adapter_run_config(path: str | Path) -> dict | None:
    """The flat config of the run that trained the adapter at `path` (what it trained on), or
    None when the format records none (PEFT) or records it in another layout."""
    path = Path(path)
    kind = adapter_format(path)
    if kind == "peft":
        return None
    if kind == "project":
        import json

        root = path if (path / "meta.json").is_file() else path / "adapter"
        config = json.loads((root / "meta.json").read_text()).get("config")
    else:
        from wmtp_fn.adapters.seeds_io import load_torch_dict

        config = load_torch_dict(path).get("config")
    # the project's flat config (`seed`, `data.*` keys); the seeds' nested configs say nothing usable
    flat = isinstance(config, dict) and "seed" in config and any(str(k).startswith("data.") for k in config)
    return dict(config) if flat else None
