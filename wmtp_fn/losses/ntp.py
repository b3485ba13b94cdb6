"""Next-token-prediction loss as unnormalised sums (docs/losses.md, "NTP").

Position ``t`` predicts ``labels[:, t+1]``; ``labels == -100`` carries no loss. The functions
return ``(sum of per-token NLL, number of valid targets)`` so that the train step can
normalise by the token count of the whole accumulated batch (``Σ sums / Σ counts``), not by
a mean of per-micro-batch means.

Padding: the loss looks only at ``labels``. The data layer guarantees that padded positions
carry ``-100`` (and ``attention_mask = 0``); ``attention_mask`` is deliberately not read
here, so a padded position with a real label *would* count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from wmtp_fn.losses.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


def shift_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``labels: [B, T]`` -> ``targets: [B, T]`` with ``targets[:, t] = labels[:, t+1]`` and the
    last position (which has no next token) set to ``ignore_index``. Keeping length ``T`` (as
    HuggingFace does) lets the logits / hidden states be used without slicing copies."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def ntp_sums(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """NTP loss sum and target count from full logits.

    logits: ``[B, T, V]`` (any float dtype; upcast to fp32 like HuggingFace's loss).
    labels: ``[B, T]`` int64.
    Returns ``(sum: [] fp32, count: [] int64)``; all-masked gives ``(0., 0)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            "ntp_sums expects logits [B, T, V], labels [B, T]; "
            f"got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    targets = shift_targets(labels, ignore_index)
    total = F.cross_entropy(
        rearrange(logits, "b t v -> (b t) v").float(),
        rearrange(targets, "b t -> (b t)"),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return total, (targets != ignore_index).sum()


def ntp_sums_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """NTP loss sum and target count from final hidden states, never building ``[B·T, V]`` logits.

    hidden: ``[B, T, d]`` after the final norm (what ``lm_head`` would read).
    weight: ``[V, d]`` the ``lm_head`` weight (same dtype as ``hidden``).
    labels: ``[B, T]`` int64.
    Returns ``(sum: [] fp32, count: [] int64)``. Every position's logits are computed, masked
    ones included: selecting only valid rows would need a data-dependent size (a host sync).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            "ntp_sums_from_hidden expects hidden [B, T, d], labels [B, T]; "
            f"got {tuple(hidden.shape)}, {tuple(labels.shape)}"
        )
    targets = rearrange(shift_targets(labels, ignore_index), "b t -> (b t)")
    nll = linear_cross_entropy(
        rearrange(hidden, "b t d -> (b t) d"),
        weight,
        targets,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
    return nll.sum(), (targets != ignore_index).sum()


def ntp_count(batch: Mapping[str, Tensor], *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The normaliser of a micro-batch for the train step: ``[1]`` int64, the number of valid
    next-token targets in ``batch["labels"]`` (``[B, T]``)."""
    return (batch["labels"][:, 1:] != ignore_index).sum().reshape(1)


def ntp_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean NTP loss of one batch, ``[]`` fp32: ``sum / count``, and exactly 0 when all-masked."""
    total, count = ntp_sums(logits, labels, ignore_index=ignore_index)
    return total / count.clamp_min(1)
