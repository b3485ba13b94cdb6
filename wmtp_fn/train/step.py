"""The train step: accumulate gradients over micro-batches, then one AdamW update.

Objective of a step (``K`` loss components, e.g. ``K = 1`` for NTP, ``K = H`` heads for MTP;
the contract is in ``wmtp_fn.objectives``):

    N_k   = Σ_ranks Σ_mb count(mb)[k]                 (computed once, before any forward)
    scale = component_weights(N)                       (1 / (N_k · K_active), 0 if N_k = 0)
    loss  = Σ_k scale_k · Σ_ranks Σ_mb sums_k(mb)      (the mean over active components of S_k / N_k)

so accumulating over micro-batches (and ranks) is exactly one big batch (not a mean of
means), and a batch with no valid tokens gives a finite 0 loss and zero gradients. The order
inside a step: counts → scale → ``prepare`` (no grad, all micro-batches) → per micro-batch
``loss`` and ``objective.backward()`` → one sum over ranks of the flat gradient → one sum over
ranks of the loss and metric sums → AdamW with the on-device skip.

Gradients: plain autograd on a detached copy of the params (one flat leaf, viewed as the
pytree's leaves), one ``.backward()`` per micro-batch accumulating into ``.grad``. Why not
``torch.func.grad_and_value``: it needs the whole forward to be functorch-transformable (HF
models with in-place caches, custom autograd Functions without vmap rules, FSDP hooks), and in
eager mode it buys no speed — it runs the same autograd engine with extra wrapping;
``.backward()`` lets the engine accumulate in place, and lets a loss run its own partial
backward passes (per head) before handing the step the rest.

Nothing in the step synchronises with the host unless ``nonfinite="raise"``: metrics are
device tensors, and skips (non-finite loss or gradient norm, empty batch) happen on device
inside the optimizer; ``state.consecutive_skips`` counts them on device.

Empty (all-masked) batches: the update is **skipped** — params, moments and counts stay
bitwise unchanged (no weight decay either) and ``skipped = 1``. A batch without a single
supervised token carries no information; letting it decay weights or move them along stale
momentum (as ``torch.optim.AdamW`` would with a zero gradient) would make the result depend
on how many empty batches the sampler happened to produce. The step counter still advances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal, NamedTuple

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.dist.comm import LOCAL, Comm
from wmtp_fn.objectives import Objective, component_weights, weighted_sum
from wmtp_fn.train import adamw
from wmtp_fn.train.rng import seeded, step_seed
from wmtp_fn.schedule import ScheduleConfig, lr_at
from wmtp_fn.train.state import TrainState
from wmtp_fn.train.sums import add_metrics, check_sums, divide, sum_over_ranks, total_counts
from wmtp_fn.train.tree import aligned_leaves, leaf_items, tree_from_leaves

TrainStep = Callable[[TrainState, Iterable[Any]], tuple[TrainState, dict[str, Tensor]]]


class Accumulated(NamedTuple):
    """What ``accumulate_grads`` returns.

    grads: shaped like ``params`` (zeros for leaves the loss does not reach), summed over ranks.
    loss: ``[]`` fp32, the step objective. counts: ``N [K]`` over micro-batches and ranks.
    extra: the run state after ``prepare`` (the input one when there is none).
    metrics: the objective's metrics, summed over micro-batches and ranks and divided per
        ``objective.means`` (``[]`` / ``[K]`` fp32).
    """

    grads: TensorDict
    loss: Tensor
    counts: Tensor
    extra: TensorDict
    metrics: dict[str, Tensor]


def run_prepare(
    objective: Objective, params: TensorDict, extra: TensorDict, micro_batches: Sequence[Any], comm: Comm
) -> tuple[TensorDict, list[Any]]:
    """``objective.prepare`` under no-grad, checked: it returns an ``extra`` with the leaves
    (keys, shapes, dtypes) of the input one — the structure of the run state is fixed at
    ``init_train_state``, so every checkpoint of a run has the same layout — and one
    micro-batch per input micro-batch."""
    if objective.prepare is None:
        return extra, list(micro_batches)
    with torch.no_grad():
        out = objective.prepare(params, extra, micro_batches, comm)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], TensorDict)):
        raise TypeError("objective.prepare must return (extra: TensorDict, micro_batches)")
    new_extra, prepared = out[0], list(out[1])
    if _layout(new_extra) != _layout(extra):
        raise ValueError(
            f"objective.prepare changed the layout of extra from {_layout(extra)} to {_layout(new_extra)}; "
            "give init_train_state the full initial extra"
        )
    if len(prepared) != len(micro_batches):
        raise ValueError(
            f"objective.prepare returned {len(prepared)} micro-batches for {len(micro_batches)}; it may add "
            "entries to them but must keep one per input micro-batch (the counts were taken on those)"
        )
    return new_extra, prepared


def _layout(tree: TensorDict) -> list[tuple]:
    keys, values = leaf_items(tree)
    return [(".".join(k), tuple(v.shape), v.dtype) for k, v in zip(keys, values)]


def _keep_if_skipped(old: TensorDict, new: TensorDict, skipped: Tensor) -> TensorDict:
    """``old`` where the step was skipped, else ``new`` — leafwise on device, no sync."""
    keys, new_values = leaf_items(new)
    if not keys:
        return new
    flag = skipped.to(torch.bool)
    old_values = aligned_leaves(old, keys, what="extra")
    values = [torch.where(flag.to(n.device), o, n) for o, n in zip(old_values, new_values)]
    return tree_from_leaves(keys, values, new.batch_size)


def accumulate_grads(
    objective: Objective,
    params: TensorDict,
    extra: TensorDict,
    micro_batches: Iterable[Any],
    *,
    comm: Comm = LOCAL,
) -> Accumulated:
    """Gradient of the step objective (module docstring) w.r.t. every leaf of ``params``.
    ``params`` is not modified."""
    mbs = list(micro_batches)
    if not mbs:
        raise ValueError("accumulate_grads: no micro-batches")
    counts = total_counts(objective.count, mbs, comm)
    scale = component_weights(counts)
    extra, mbs = run_prepare(objective, params, extra, mbs, comm)
    tracked, flat = _tracked_copy(params)
    sums_total, metric_sums = None, {}
    for i, mb in enumerate(mbs):
        out, sums, metrics = objective.loss(tracked, extra, mb, scale)
        check_sums(sums, counts)
        if out.requires_grad:
            out.backward()
        sums = sums.detach().to(torch.float32)
        sums_total = sums if sums_total is None else sums_total + sums
        metric_sums = add_metrics(metric_sums, metrics, sums.device, i)
    grads = _summed_grads(tracked, flat, params, comm)
    sums_total, metric_sums = sum_over_ranks(sums_total, metric_sums, comm)
    loss = weighted_sum(sums_total, scale)
    return Accumulated(grads, loss, counts, extra, divide(metric_sums, counts, objective.means))


def _summed_grads(tracked: TensorDict, flat: Tensor | None, params: TensorDict, comm: Comm) -> TensorDict:
    """The accumulated ``.grad`` as a tree like ``params``, summed over ranks (one collective
    on the flat gradient; one per leaf only when the leaves do not share a device and dtype)."""
    keys, ts = leaf_items(tracked)
    if flat is not None:
        grad = comm.sum_(flat.grad if flat.grad is not None else torch.zeros_like(flat))
        values = [g.view(t.shape) for g, t in zip(grad.split([t.numel() for t in ts]), ts)]
    else:
        values = [comm.sum_(t.grad if t.grad is not None else torch.zeros_like(t)) for t in ts]
    return tree_from_leaves(keys, values, params.batch_size)


def _tracked_copy(params: TensorDict) -> tuple[TensorDict, Tensor | None]:
    """Leaves to differentiate: copies of the current values that require grad.

    When all leaves share a device and dtype (the usual case) they are views of *one* flat
    leaf, so autograd accumulates a single gradient buffer instead of one per leaf (hundreds
    of small kernels per step for an adapter on every linear), and the sum over ranks is one
    collective. Returns (tree, flat or None). The optimizer may later update `params` in
    place; the graph is gone by then.
    """
    keys, ts = leaf_items(params)
    if len({(t.device, t.dtype) for t in ts}) != 1:
        return params.apply(lambda t: t.detach().requires_grad_()), None
    flat = torch.cat([t.detach().reshape(-1) for t in ts]).requires_grad_()
    views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in ts]), ts)]
    return tree_from_leaves(keys, views, params.batch_size), flat


def make_train_step(
    objective: Objective,
    opt_cfg: adamw.AdamWConfig,
    sched_cfg: ScheduleConfig,
    *,
    comm: Comm | None = None,
    nonfinite: Literal["skip", "raise"] = "skip",
) -> TrainStep:
    """Build ``step(state, micro_batches) -> (state, metrics)``.

    objective: ``count``, ``loss`` and optional ``prepare`` (``wmtp_fn.objectives``).
    comm: the process group seam (``wmtp_fn.dist.comm``); None: one process.
    nonfinite: ``"skip"`` — a non-finite loss or gradient norm skips the update on device
        (``metrics["skipped"] = 1``) and the step still advances; ``"raise"`` — raise
        ``FloatingPointError`` naming the step and what was non-finite (this syncs; the
        update was already skipped on device, so the input state is unchanged).

    The returned step **donates** ``state``: its params and optimizer buffers are updated in
    place and reused by the new state. Randomness inside ``prepare`` and ``loss`` (dropout) is
    seeded by ``step_seed(state.seed, state.step, comm.rank)``; the caller's global RNG state is
    untouched. The new state carries ``prepare``'s ``extra`` and ``consecutive_skips`` (+1 on a
    skipped step, else 0). A skipped step changes nothing else: params, optimizer state and
    ``extra`` stay as they were (statistics of a poisoned batch do not leak into the run).

    Metrics: a flat ``{name: tensor}`` of ``[]`` and ``[K]`` fp32 tensors on the device, no
    host sync: ``loss`` (the step objective), ``grad_norm`` (before clipping), ``lr``,
    ``n_tokens`` (``Σ_k N_k``), ``skipped`` (0/1), plus the objective's metrics: global sums,
    divided by their named counts where ``objective.means`` says so.
    """
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    comm = LOCAL if comm is None else comm

    def train_step(state: TrainState, micro_batches: Iterable[Any]) -> tuple[TrainState, dict[str, Tensor]]:
        lr = lr_at(state.step, opt_cfg.lr, sched_cfg)
        device = next(iter(state.params.values(include_nested=True, leaves_only=True))).device
        with seeded(step_seed(state.seed, state.step, comm.rank), device):
            acc = accumulate_grads(objective, state.params, state.extra, micro_batches, comm=comm)
        n_tokens = acc.counts.sum().to(torch.float32)
        skip = ~torch.isfinite(acc.loss) | (n_tokens == 0)
        params, opt_state, stats = adamw.update(
            acc.grads, state.opt_state, state.params, lr=lr, cfg=opt_cfg, skip=skip
        )
        if nonfinite == "raise":
            checked = (("loss", acc.loss), ("grad norm", stats["grad_norm"]))
            bad = [name for name, v in checked if not torch.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"train step {state.step}: non-finite {' and '.join(bad)} "
                    f"(loss={acc.loss.item()}, grad_norm={stats['grad_norm'].item()}); the update was skipped"
                )
        skipped = stats["skipped"]
        skips = torch.where(skipped.to(state.consecutive_skips.device) > 0, state.consecutive_skips + 1, 0)
        metrics = {
            "loss": acc.loss,
            "grad_norm": stats["grad_norm"],
            "lr": torch.full((), lr, dtype=torch.float32, device=device),
            "n_tokens": n_tokens,
            "skipped": skipped,
            **acc.metrics,
        }
        extra = _keep_if_skipped(state.extra, acc.extra, skipped)
        new = replace(state, params=params, opt_state=opt_state, extra=extra, step=state.step + 1, consecutive_skips=skips)
        return new, metrics

    return train_step
