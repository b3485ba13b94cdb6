"""The contract between an objective and the train step (and ``train.evaluate``).

An objective combines a frozen base, the bound adapters and a pure loss from ``wmtp_fn.losses``
into three functions over one micro-batch (``batch``: whatever the data layer yields, usually
``{"input_ids": [B, T], "labels": [B, T], ...}``):

``count(batch) -> [K]``
    The normalisers ``n_k`` of the ``K`` loss components (``K = 1`` for NTP, ``H`` heads for
    MTP), from the masks alone — the step calls it for every micro-batch before any forward,
    sums over micro-batches and ranks into ``N_k``, and derives ``scale`` from it.

``loss(params, extra, batch, scale) -> (objective, sums, metrics)``
    ``scale: [K]`` fp32 is ``component_weights(N)``: ``1 / (N_k · K_active)``, 0 for components
    with ``N_k = 0``. ``sums: [K]`` are the unnormalised loss sums of the micro-batch (detached
    or not), so the step objective is ``Σ_k scale_k · Σ_mb sums_k``. ``objective: []`` is what
    the step calls ``.backward()`` on (when it requires grad): in the plain form
    ``weighted_sum(sums, scale)``; a loss that runs its own partial backward passes (per MTP
    head on a detached trunk, each scaled by ``scale_k``) returns the remaining surrogate (e.g.
    ``(trunk_out * trunk_cotangent).sum()``) whose backward finishes the job. Such a loss must
    run its inner backward passes only when ``torch.is_grad_enabled()``: ``evaluate`` calls it
    under ``torch.no_grad()``. ``extra`` is read-only here (see below).

``prepare(params, extra, micro_batches, comm) -> (extra, micro_batches)`` (optional)
    A no-grad pre-pass over *all* micro-batches of a step, after the counts and before the
    first ``loss``: step-wide statistics (TD whitening) or a step-wide selection (Rho-1),
    reduced over ranks through ``comm`` (``wmtp_fn.dist.comm``). It returns the new ``extra``
    (the run state the losses, the next steps and the checkpoint see; new tensors with the
    layout of the input ``extra``, which it must not modify in place — a skipped step keeps
    the old one) and the micro-batches the losses get: the same number, possibly with added
    entries computed once here (a reference NLL, token weights), so the loss need not
    recompute them. The initial ``extra`` is given to ``train.state.init_train_state``.

Why only ``prepare`` may update ``extra``: a loss that updated it would make micro-batch ``i``
see statistics of micro-batches ``0..i-1``, so the result would depend on how a batch was cut
into micro-batches. ``prepare`` sees the whole step at once (equinox's ``(model, state) ->
(loss, state)``, with the state threaded once per step rather than once per call).

Metrics are additive partial sums. ``metrics`` maps a name (no ``"/"``) to a ``[]`` or ``[K]``
tensor or a Python number that is a *sum* over the micro-batch; the step (and ``evaluate``)
adds them over micro-batches and ranks. ``Objective.means`` names which sums to report as
ratios: ``means = {"ce": "count", "w_mean": "n_w"}`` reports ``Σ ce / N`` (``"count"`` is
``COUNT``: the step's normalisers ``N [K]``) and ``Σ w_mean / Σ n_w`` (another metric's sum),
elementwise, 0 where the denominator is 0. So the loss returns the numerator *sum* under
the name of the reported ratio (``"ce"``: the per-head CE sums, reported as mean CE). Every
other metric, denominators included, is reported as its global sum. A ``[K]`` vector stays a
vector (loggers write ``name/k``). Sums are accumulated in fp32 (counts exact to 2**24). The
names ``loss, grad_norm, lr, n_tokens, skipped`` are the step's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.dist.comm import Comm
from wmtp_fn.losses.normalise import component_weights, weighted_sum  # noqa: F401  (part of the contract)

COUNT = "count"
"""The denominator name in ``Objective.means`` that means the step's normalisers ``N [K]``."""

Batch = Mapping[str, Any]
Metrics = Mapping[str, Tensor | float]
CountFn = Callable[[Batch], Tensor]
LossFn = Callable[[TensorDict, TensorDict, Batch, Tensor], tuple[Tensor, Tensor, Metrics]]
PrepareFn = Callable[[TensorDict, TensorDict, Sequence[Batch], Comm], tuple[TensorDict, Sequence[Batch]]]


@dataclass(frozen=True)
class Objective:
    """``count``, ``loss`` and the optional ``prepare`` of one training objective (module
    docstring), and ``means``: metric name -> the name of its denominator (``COUNT`` or another
    metric)."""

    count: CountFn
    loss: LossFn
    prepare: PrepareFn | None = None
    means: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, denom in self.means.items():
            if not (isinstance(name, str) and isinstance(denom, str)) or name == denom:
                raise ValueError(f"Objective.means needs metric name -> another name, got {name!r}: {denom!r}")
            if name == COUNT:
                raise ValueError(f"Objective.means: {COUNT!r} is the step's normalisers, not a metric to divide")
