"""How per-component loss sums become the step objective: the normalisers of the train step's
contract (``objectives``), kept with the losses so that a loss's own convenience mean (e.g.
``losses.mtp.mtp_loss``) is the step's normalisation exactly."""

from __future__ import annotations

import torch
from torch import Tensor


def component_weights(counts: Tensor) -> Tensor:
    """``counts: [K]`` (total normalisers ``N_k``) -> ``scale: [K]`` fp32 with
    ``scale_k = 1 / (N_k · K_active)`` where ``N_k > 0`` and 0 elsewhere (``K_active`` = number
    of components with ``N_k > 0``, at least 1): the step objective is the mean over active
    components of ``S_k / N_k``, so accumulation over micro-batches is one big batch (not a
    mean of means) and an all-masked step gives a finite 0."""
    n = counts.to(torch.float32)
    active = n > 0
    k_active = active.sum().clamp_min(1).to(torch.float32)
    return torch.where(active, 1.0 / (n.clamp_min(1.0) * k_active), 0.0)


def weighted_sum(sums: Tensor, scale: Tensor) -> Tensor:
    """``Σ_k scale_k · sums_k``, ``[]`` fp32: a micro-batch's share of the step objective (the
    plain ``objective`` of a loss; its backward is the whole gradient)."""
    return (sums.to(torch.float32) * scale.to(sums.device)).sum()
