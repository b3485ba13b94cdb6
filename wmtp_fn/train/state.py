"""``TrainState``: everything a run needs to continue, and its exact flattening to
``(tensors, json metadata)`` for a checkpoint writer.

The RNG is a plain integer seed: per-step randomness is ``step_seed(seed, step, rank)``
(``wmtp_fn.train.rng``), so there is no generator state to save and a resumed run is bitwise
identical to an uninterrupted one.

The flattening is generic over the fields of ``TrainState``: a ``TensorDict`` field becomes
``"<field>.<dotted leaf path>"`` tensors (its leaf order in the metadata), a tensor field one
``"<field>"`` tensor, an ``int`` field a metadata entry. Adding a field needs no change here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.train import adamw
from wmtp_fn.train.tree import dotted, leaf_items, tree_from_leaves

FORMAT = "wmtp_fn.TrainState/2"
_META_KEYS = ("format", "trees", "tensors")


@dataclass(frozen=True)
class TrainState:
    """params: the trainable pytree by role (fp32 leaves nested by module path);
    opt_state: the optimizer's state (a TensorDict, opaque to all but the optimizer);
    extra: non-trainable run state threaded through the objective (running statistics; an
        empty TensorDict when the objective keeps none) — updated only by its ``prepare``;
    step: optimizer steps taken so far (including skipped ones); seed: the run's seed;
    consecutive_skips: ``[]`` int64 on the params' device, the number of skipped steps
        (non-finite or empty) in a row up to now, kept on the device by the step (no sync)."""

    params: TensorDict
    opt_state: TensorDict
    extra: TensorDict
    step: int
    seed: int
    consecutive_skips: Tensor


def init_train_state(
    params: TensorDict, opt_cfg: adamw.AdamWConfig, *, seed: int, extra: TensorDict | None = None
) -> TrainState:
    """Step 0 of a run: fresh optimizer state for ``params``; ``extra`` the objective's initial
    run state (default empty)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if extra is not None and not isinstance(extra, TensorDict):
        raise TypeError(f"extra must be a TensorDict, got {type(extra).__name__}")
    opt_state = adamw.init(params, opt_cfg)
    device = next(iter(params.values(include_nested=True, leaves_only=True))).device
    return TrainState(
        params=params,
        opt_state=opt_state,
        extra=TensorDict({}, batch_size=[]) if extra is None else extra,
        step=0,
        seed=seed,
        consecutive_skips=torch.zeros((), dtype=torch.int64, device=device),
    )


def flatten_state(state: TrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``state`` -> ``(tensors, meta)``.

    tensors: e.g. ``params.lora.model.layers.0.self_attn.q_proj.lora_A``,
        ``opt_state.mu.lora.…``, ``extra.…``, ``consecutive_skips``. These are the **live**
        buffers, not copies: the train step updates them in place, so write (or clone) them
        before the next step.
    meta: JSON-able ``{"format", "trees": {field: [leaf paths]}, "tensors": [field], "step",
        "seed"}``. ``trees`` records each tree's leaf order, which ``unflatten_state``
        restores (a global gradient norm sums leaves in this order, so the order is part of
        bitwise reproducibility; safetensors files sort their keys).
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT, "trees": {}, "tensors": []}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, TensorDict):
            keys, values = leaf_items(value)
            names = [dotted(k) for k in keys]
            meta["trees"][f.name] = names
            tensors.update({f"{f.name}.{n}": t for n, t in zip(names, values)})
        elif isinstance(value, Tensor):
            meta["tensors"].append(f.name)
            tensors[f.name] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            meta[f.name] = value
        else:
            raise TypeError(f"flatten_state: field {f.name!r} holds a {type(value).__name__}; expected a TensorDict, a tensor or an int")
    return tensors, meta


def unflatten_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> TrainState:
    """Inverse of ``flatten_state``; the tensors are used as given (no copy, device unchanged)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"unflatten_state: expected format {FORMAT!r}, got {meta.get('format')!r}")
    trees, arrays = meta["trees"], meta["tensors"]
    expected = {f"{t}.{n}" for t, names in trees.items() for n in names} | set(arrays)
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise KeyError(
            f"unflatten_state: tensors do not match the metadata: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    values: dict[str, Any] = {}
    for f in fields(TrainState):
        if f.name in trees:
            names = trees[f.name]
            keys = [tuple(n.split(".")) for n in names]
            values[f.name] = tree_from_leaves(keys, [tensors[f"{f.name}.{n}"] for n in names])
        elif f.name in arrays:
            values[f.name] = tensors[f.name]
        elif f.name in meta and f.name not in _META_KEYS:
            values[f.name] = int(meta[f.name])
        else:
            raise KeyError(f"unflatten_state: the metadata has no TrainState field {f.name!r}")
    return TrainState(**values)
