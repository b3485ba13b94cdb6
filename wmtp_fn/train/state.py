"""``TrainState``: everything a run needs to continue — params, optimizer state, step, seed —
and its exact flattening to ``(tensors, json metadata)`` for a checkpoint writer.

The RNG is a plain integer seed: per-step randomness is ``step_seed(rng, step)``
(``wmtp_fn.train.rng``), so there is no generator state to save and a resumed run is bitwise
identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.train import adamw
from wmtp_fn.train.tree import dotted, leaf_keys, leaves

FORMAT = "wmtp_fn.TrainState/1"
_SECTIONS = ("params", "opt.mu", "opt.nu", "opt.count")


@dataclass(frozen=True)
class TrainState:
    """params: trainable fp32 leaves nested by module path; opt_state: AdamW moments/counts
    with the same structure; step: optimizer steps taken so far (including skipped ones);
    rng: the run's seed."""

    params: TensorDict
    opt_state: adamw.AdamWState
    step: int
    rng: int


def init_train_state(params: TensorDict, opt_cfg: adamw.AdamWConfig, *, seed: int) -> TrainState:
    """Step 0 of a run: fresh optimizer state for ``params``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return TrainState(params=params, opt_state=adamw.init(params, opt_cfg), step=0, rng=seed)


def to_flat(state: TrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``state`` -> ``(tensors, meta)``.

    tensors: ``{"params.<path>", "opt.mu.<path>", "opt.nu.<path>", "opt.count.<path>"}`` with
        ``<path>`` the dotted leaf path (e.g. ``params.lora.model.layers.0.self_attn.q_proj.lora_A``).
        These are the **live** buffers, not copies: the train step updates them in place, so
        write (or clone) them before the next step.
    meta: JSON-able ``{"format", "step", "rng", "leaves"}``; ``leaves`` records the leaf order,
        which ``from_flat`` restores (a global gradient norm sums leaves in this order, so the
        order is part of bitwise reproducibility; safetensors files sort their keys).
    """
    keys = leaf_keys(state.params)
    names = [dotted(k) for k in keys]
    trees = (state.params, state.opt_state.mu, state.opt_state.nu, state.opt_state.count)
    tensors: dict[str, Tensor] = {}
    for section, tree in zip(_SECTIONS, trees):
        for name, t in zip(names, leaves(tree, keys)):
            tensors[f"{section}.{name}"] = t
    meta = {"format": FORMAT, "step": state.step, "rng": state.rng, "leaves": names}
    return tensors, meta


def from_flat(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> TrainState:
    """Inverse of ``to_flat``; the tensors are used as given (no copy, device unchanged)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"from_flat: expected format {FORMAT!r}, got {meta.get('format')!r}")
    names = list(meta["leaves"])
    expected = {f"{s}.{n}" for s in _SECTIONS for n in names}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise KeyError(
            f"from_flat: tensors do not match meta['leaves']: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    trees = []
    for section in _SECTIONS:
        tree = TensorDict({}, batch_size=[])
        for name in names:
            tree.set(tuple(name.split(".")), tensors[f"{section}.{name}"])
        trees.append(tree)
    params, mu, nu, count = trees
    return TrainState(
        params=params,
        opt_state=adamw.AdamWState(mu=mu, nu=nu, count=count),
        step=int(meta["step"]),
        rng=int(meta["rng"]),
    )
