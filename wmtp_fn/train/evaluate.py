"""Validation: an objective's loss and metrics over a set of batches, without gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDict

from wmtp_fn.dist.comm import LOCAL, Comm
from wmtp_fn.objectives import Objective, component_weights, weighted_sum
from wmtp_fn.train.step import run_prepare
from wmtp_fn.train.sums import add_metrics, check_sums, divide, sum_over_ranks, to_host, total_counts


def evaluate(
    objective: Objective, params: TensorDict, extra: TensorDict, batches: Sequence[Any], *, comm: Comm | None = None
) -> dict[str, float]:
    """The objective over all ``batches`` (and ranks) taken as one big batch, under no-grad.

    Returns ``{"loss": Σ_k scale_k · S_k (the mean over active components of Σ sums_k /
    Σ counts_k), "n_tokens": Σ_k N_k, **metrics}`` with the objective's metrics summed and
    divided per ``objective.means`` exactly as in the train step (a ``[K]`` metric ``m``
    becomes ``m/0 … m/K-1``). One host sync, at the end.

    ``objective.prepare``, if any, runs on each batch alone (the batch is the step) and its new
    ``extra`` is discarded: evaluation never changes the run state. With a ``comm`` every rank
    must pass the same number of batches.
    """
    comm = LOCAL if comm is None else comm
    batches = list(batches)
    if not batches:
        raise ValueError("evaluate: no batches (is the validation set empty?)")
    with torch.no_grad():
        counts = total_counts(objective.count, batches, comm)
        scale = component_weights(counts)
        sums_total, metric_sums = None, {}
        for i, batch in enumerate(batches):
            batch_extra, (batch,) = run_prepare(objective, params, extra, [batch], comm)
            _, sums, metrics = objective.loss(params, batch_extra, batch, scale)
            sums = check_sums(sums, counts).to(torch.float32)
            sums_total = sums if sums_total is None else sums_total + sums
            metric_sums = add_metrics(metric_sums, metrics, sums.device, i)
        sums_total, metric_sums = sum_over_ranks(sums_total, metric_sums, comm)
        out = {
            "loss": weighted_sum(sums_total, scale),
            "n_tokens": counts.sum().to(torch.float32),
            **divide(metric_sums, counts, objective.means),
        }
    return to_host(out)
