"""The train step: accumulate gradients over micro-batches, then one AdamW update.

Objective of a step (``K`` loss components, e.g. ``K = 1`` for NTP, ``K = H`` heads for MTP):

    N_k  = Σ_mb count_fn(mb)[k]                       (computed once, before any forward)
    loss = mean over {k : N_k > 0} of  Σ_mb sums_k(mb) / N_k

so accumulating over micro-batches is exactly one big batch (not a mean of means), and a
batch with no valid tokens gives a finite 0 loss and zero gradients.

Gradients: plain autograd on a detached fp32 copy of the params (one flat leaf, viewed as the
pytree's leaves), one ``.backward()`` per micro-batch accumulating into ``.grad``. Why not ``torch.func.grad_and_value``: it needs the
whole forward to be functorch-transformable (HF models with in-place caches, custom autograd
Functions without vmap rules, FSDP hooks), and in eager mode it buys no speed — it runs the
same autograd engine with extra wrapping; ``.backward()`` lets the engine accumulate in
place (the first micro-batch's gradient buffer is reused, later ones are added into it).

Nothing in the step synchronises with the host unless ``nonfinite="raise"``: metrics are
device tensors, and skips (non-finite loss or gradient norm, empty batch) happen on device
inside the optimizer.

Empty (all-masked) batches: the update is **skipped** — params, moments and counts stay
bitwise unchanged (no weight decay either) and ``skipped = 1``. A batch without a single
supervised token carries no information; letting it decay weights or move them along stale
momentum (as ``torch.optim.AdamW`` would with a zero gradient) would make the result depend
on how many empty batches the sampler happened to produce. The step counter still advances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.train import adamw
from wmtp_fn.train.rng import seeded, step_seed
from wmtp_fn.train.schedule import ScheduleConfig, lr_at
from wmtp_fn.train.state import TrainState
from wmtp_fn.train.tree import leaf_items, tree_from_leaves

LossFn = Callable[[TensorDict, Any], tuple[Tensor, Mapping[str, Any]]]
CountFn = Callable[[Any], Tensor]
TrainStep = Callable[[TrainState, Iterable[Any]], tuple[TrainState, dict[str, Tensor]]]

_METRICS = ("loss", "grad_norm", "lr", "n_tokens", "skipped")


def component_weights(counts: Tensor) -> Tensor:
    """``counts: [K]`` (total normalisers ``N_k``) -> ``w: [K]`` fp32 with
    ``w_k = 1 / (N_k · K_active)`` where ``N_k > 0`` and 0 elsewhere (``K_active`` = number of
    components with ``N_k > 0``, at least 1), so that ``Σ_k w_k · S_k`` is the objective."""
    n = counts.to(torch.float32)
    active = n > 0
    k_active = active.sum().clamp_min(1).to(torch.float32)
    return torch.where(active, 1.0 / (n.clamp_min(1.0) * k_active), 0.0)


def _scalar_aux(aux: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for name, v in aux.items():
        if isinstance(v, Tensor) and v.numel() == 1:
            out[name] = v.detach().reshape(()).to(torch.float32)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = torch.tensor(float(v))
    return out


def accumulate_grads(
    loss_fn: LossFn, count_fn: CountFn, params: TensorDict, micro_batches: Iterable[Any]
) -> tuple[TensorDict, Tensor, Tensor, dict[str, Tensor]]:
    """Gradient of the step objective (module docstring) w.r.t. every leaf of ``params``.

    Returns ``(grads, loss, counts, aux)``: ``grads`` a TensorDict shaped like ``params``
    (zeros for leaves the loss does not reach), ``loss: []`` fp32, ``counts: [K]`` (``N_k``),
    ``aux``: the scalar entries of each micro-batch's aux dict, averaged over micro-batches
    (unweighted; return sums and counts in aux if you need exact weighting).
    ``params`` is not modified.
    """
    mbs = list(micro_batches)
    if not mbs:
        raise ValueError("accumulate_grads: no micro-batches")
    counts = torch.stack([count_fn(mb) for mb in mbs]).sum(0)
    if counts.dim() != 1:
        raise ValueError(
            f"count_fn must return a [K] tensor, got shape {tuple(counts.shape[1:])} per micro-batch"
        )
    w = component_weights(counts)
    tracked, flat = _tracked_copy(params)
    loss = None
    aux_sum: dict[str, Tensor] = {}
    for mb in mbs:
        sums, aux = loss_fn(tracked, mb)
        if sums.shape != counts.shape:
            raise ValueError(
                f"loss_fn returned sums of shape {tuple(sums.shape)}, count_fn counts {tuple(counts.shape)}"
            )
        objective = (sums.to(torch.float32) * w.to(sums.device)).sum()
        if objective.requires_grad:
            objective.backward()
        loss = objective.detach() if loss is None else loss + objective.detach()
        for name, v in _scalar_aux(aux).items():
            aux_sum[name] = aux_sum[name] + v if name in aux_sum else v
    keys, ts = leaf_items(tracked)
    if flat is not None:
        grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)
        values = [g.view(t.shape) for g, t in zip(grad.split([t.numel() for t in ts]), ts)]
    else:
        values = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ts]
    grads = tree_from_leaves(keys, values, params.batch_size)
    aux_mean = {name: v / len(mbs) for name, v in aux_sum.items()}
    return grads, loss, counts, aux_mean


def _tracked_copy(params: TensorDict) -> tuple[TensorDict, Tensor | None]:
    """Leaves to differentiate: copies of the current values that require grad.

    When all leaves share a device and dtype (the usual case) they are views of *one* flat
    leaf, so autograd accumulates a single gradient buffer instead of one per leaf (hundreds
    of small kernels per step for an adapter on every linear). Returns (tree, flat or None).
    The optimizer may later update `params` in place; the graph is gone by then.
    """
    keys, ts = leaf_items(params)
    if len({(t.device, t.dtype) for t in ts}) != 1:
        return params.apply(lambda t: t.detach().requires_grad_()), None
    flat = torch.cat([t.detach().reshape(-1) for t in ts]).requires_grad_()
    views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in ts]), ts)]
    return tree_from_leaves(keys, views, params.batch_size), flat


def make_train_step(
    loss_fn: LossFn,
    count_fn: CountFn,
    opt_cfg: adamw.AdamWConfig,
    sched_cfg: ScheduleConfig,
    *,
    nonfinite: Literal["skip", "raise"] = "skip",
) -> TrainStep:
    """Build ``step(state, micro_batches) -> (state, metrics)``.

    loss_fn(params, batch) -> (sums: [K], aux): unnormalised loss sums of a micro-batch.
    count_fn(batch) -> [K]: the matching normalisers; must depend only on the batch.
    nonfinite: ``"skip"`` — a non-finite loss or gradient norm skips the update on device
        (``metrics["skipped"] = 1``) and the step still advances; ``"raise"`` — raise
        ``FloatingPointError`` naming the step and what was non-finite (this syncs; the
        update was already skipped on device, so the input state is unchanged).

    The returned step **donates** ``state``: its params and optimizer buffers are updated in
    place and reused by the new state. Randomness inside ``loss_fn`` (dropout) is seeded by
    ``step_seed(state.rng, state.step)``; the caller's global RNG state is untouched.
    Metrics (``[]`` fp32 tensors on the params' device; aux given as Python numbers stay on
    the CPU): ``loss, grad_norm`` (before clipping), ``lr``, ``n_tokens`` (``Σ_k N_k``),
    ``skipped`` (0/1), plus the scalar entries of ``aux`` (mean over micro-batches).
    """
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")

    def train_step(state: TrainState, micro_batches: Iterable[Any]) -> tuple[TrainState, dict[str, Tensor]]:
        lr = lr_at(state.step, opt_cfg.lr, sched_cfg)
        device = next(iter(state.params.values(include_nested=True, leaves_only=True))).device
        with seeded(step_seed(state.rng, state.step), device):
            grads, loss, counts, aux = accumulate_grads(loss_fn, count_fn, state.params, micro_batches)
        clash = sorted(set(aux) & set(_METRICS))
        if clash:  # checked before the update, which would consume the donated state
            raise ValueError(f"loss_fn aux keys {clash} collide with the train-step metrics {_METRICS}")
        n_tokens = counts.sum().to(torch.float32)
        skip = ~torch.isfinite(loss) | (n_tokens == 0)
        params, opt_state, stats = adamw.update(
            grads, state.opt_state, state.params, lr=lr, cfg=opt_cfg, skip=skip
        )
        if nonfinite == "raise":
            checked = (("loss", loss), ("grad norm", stats["grad_norm"]))
            bad = [name for name, v in checked if not torch.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"train step {state.step}: non-finite {' and '.join(bad)} "
                    f"(loss={loss.item()}, grad_norm={stats['grad_norm'].item()}); the update was skipped"
                )
        metrics = {
            "loss": loss.to(torch.float32),
            "grad_norm": stats["grad_norm"],
            "lr": torch.full((), lr, dtype=torch.float32, device=device),
            "n_tokens": n_tokens,
            "skipped": stats["skipped"],
        }
        metrics.update(aux)
        return replace(state, params=params, opt_state=opt_state, step=state.step + 1), metrics

    return train_step
