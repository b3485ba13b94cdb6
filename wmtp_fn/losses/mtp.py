"""Multi-token-prediction loss as per-head sums and counts.

Head ``k = 1..H`` (1-based) at position ``t`` predicts ``labels[:, t+k]``. Everything here is
**source-indexed**: a ``[B, T]`` (or ``[B, T, H]``) tensor for head ``k`` holds at ``t`` the
quantity of the prediction made at ``t``, so logits and hidden states are used without slicing.
A target is valid where ``t < T−k``, ``labels[:, t+k] ≠ −100`` and (if given)
``attention_mask[:, t+k] = 1``.

Per head ``CE_k = Σ_t w_k·ce_k·m_k / Σ_t m_k`` — normalised by the **mask count**, never by the
weight sum, so weights change each token's share without renormalising the head — and
``loss = (1/H_valid)·Σ_k CE_k`` over the heads with at least one valid target. A batch without
any valid target gives a finite 0 with zero gradients.

Weights, three kinds:
- ``None``: every valid target weighs 1 (the baseline).
- position weights ``[B, T]``, **target-indexed**: head ``k`` uses ``w[:, t+k]``, the weight of
  the token it predicts (token-weighting schemes weight tokens, whichever head predicts them).
- per-head weights ``[B, T, H]``, **source-indexed**: head ``k`` uses ``w[:, t, k−1]`` (Rho-1
  selects per head and per predicting position).
Weights are used as given (detach them if they must not receive gradients).

The train step normalises globally: a loss returns per-head sums ``[H]``, ``mtp_count`` gives
the per-head counts ``[H]`` from the batch alone (before any forward), and the step's
``scale_k = 1/(N_k·H_active)`` turns ``Σ_k scale_k·sums_k`` into the loss over all micro-batches
and ranks. ``mtp_loss`` is the same normalisation applied to one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from wmtp_fn.losses.cross_entropy import linear_cross_entropy
from wmtp_fn.losses.ntp import IGNORE_INDEX
from wmtp_fn.losses.normalise import component_weights


def _check_labels(labels: Tensor, attention_mask: Tensor | None, where: str) -> None:
    if labels.dim() != 2:
        raise ValueError(f"{where}: labels must be [B, T], got shape {tuple(labels.shape)}")
    if attention_mask is not None and attention_mask.shape != labels.shape:
        raise ValueError(
            f"{where}: attention_mask must have the labels' shape {tuple(labels.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )


def _check_head(k: int, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: head index k must be an int >= 1 (1-based), got {k!r}")


def head_targets(
    labels: Tensor, k: int, attention_mask: Tensor | None = None, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Targets of head ``k``, source-indexed.

    labels: ``[B, T]`` int64; attention_mask: ``[B, T]`` (0/1 or bool) or ``None``.
    Returns ``targets: [B, T]`` with ``targets[:, t] = labels[:, t+k]`` where that target is
    valid (module docstring) and ``ignore_index`` elsewhere, including the last ``k`` positions.
    """
    _check_labels(labels, attention_mask, "head_targets")
    _check_head(k, "head_targets")
    future = labels[:, k:]
    if attention_mask is not None:
        future = torch.where(attention_mask[:, k:].bool(), future, ignore_index)
    pad = labels.new_full((labels.shape[0], min(k, labels.shape[1])), ignore_index)
    return torch.cat([future, pad], dim=1)


def mtp_valid(
    labels: Tensor, attention_mask: Tensor | None = None, *, n_future: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The MTP mask ``m``, source-indexed: ``[B, T, H]`` bool, ``m[:, t, k−1]`` true where head
    ``k`` has a valid target at ``t``. labels, attention_mask: ``[B, T]``."""
    _check_head(n_future, "mtp_valid (n_future)")
    heads = [head_targets(labels, k, attention_mask, ignore_index=ignore_index) for k in range(1, n_future + 1)]
    return torch.stack(heads, dim=-1) != ignore_index


def mtp_counts(
    labels: Tensor, attention_mask: Tensor | None = None, *, n_future: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-head normalisers ``N_k = Σ m_k``: ``[H]`` int64. labels, attention_mask: ``[B, T]``."""
    return mtp_valid(labels, attention_mask, n_future=n_future, ignore_index=ignore_index).sum(dim=(0, 1))


def mtp_count(batch: Mapping[str, Tensor], *, n_future: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The train step's ``count(batch) -> [H]`` int64: ``mtp_counts`` of ``batch["labels"]``
    ``[B, T]`` and the optional ``batch["attention_mask"]``."""
    if "labels" not in batch:
        raise KeyError(f"mtp_count: the batch has no 'labels' (keys: {sorted(batch)})")
    return mtp_counts(batch["labels"], batch.get("attention_mask"), n_future=n_future, ignore_index=ignore_index)


def head_weights(weights: Tensor | None, k: int, *, shape: tuple[int, int]) -> Tensor | None:
    """Source-indexed ``[B, T]`` weights of head ``k`` (or ``None`` for unweighted).

    weights: ``None``; position weights ``[B, T]`` (target-indexed: returns ``w[:, t+k]``, 0 for
    the last ``k`` positions, which have no target); or per-head weights ``[B, T, H]`` with
    ``H >= k`` (source-indexed: returns ``w[:, :, k−1]``). shape: the labels' ``(B, T)``.
    """
    _check_head(k, "head_weights")
    if weights is None:
        return None
    if tuple(weights.shape) == tuple(shape):
        return F.pad(weights[:, k:], (0, min(k, shape[1])))
    if weights.dim() == 3 and tuple(weights.shape[:2]) == tuple(shape) and weights.shape[2] >= k:
        return weights[:, :, k - 1]
    raise ValueError(
        f"MTP weights must be position weights [B, T] = {tuple(shape)} or per-head weights "
        f"[B, T, H >= {k}] with [B, T] = {tuple(shape)}; got shape {tuple(weights.shape)}"
    )


def head_token_nll(
    hidden: Tensor,
    unembedding: Tensor,
    labels: Tensor,
    k: int,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Per-token NLL of head ``k`` from its final hidden states, without ``[B·T, V]`` logits.

    hidden: ``[B, T, d]`` head ``k``'s output after the final norm (what the unembedding reads).
    unembedding: ``[V, d]``, same dtype as ``hidden``.
    labels, attention_mask: ``[B, T]``.
    Returns ``(nll: [B, T] fp32 (fp64 for fp64 inputs), valid: [B, T] bool)``, source-indexed,
    ``nll`` exactly 0 where not valid. With ``k = 1`` this is the next-token NLL (a reference
    model's per-token loss).
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"head_token_nll expects hidden [B, T, d] and labels [B, T]; got {tuple(hidden.shape)}, "
            f"{tuple(labels.shape)}"
        )
    targets = head_targets(labels, k, attention_mask, ignore_index=ignore_index)
    nll = linear_cross_entropy(
        rearrange(hidden, "b t d -> (b t) d"),
        unembedding,
        rearrange(targets, "b t -> (b t)"),
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
    return rearrange(nll, "(b t) -> b t", b=labels.shape[0]), targets != ignore_index


def mtp_token_nll(
    logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-token NLL of every head from all-head logits (small inputs: this holds an fp32 copy).

    logits: ``[B, T, H, V]``; labels, attention_mask: ``[B, T]``.
    Returns ``(nll: [B, T, H] fp32 (fp64 for fp64 logits), valid: [B, T, H] bool)``,
    source-indexed, ``nll`` 0 where not valid.
    """
    if logits.dim() != 4 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"mtp_token_nll expects logits [B, T, H, V] and labels [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}"
        )
    n_future = logits.shape[2]
    targets = torch.stack(
        [head_targets(labels, k, attention_mask, ignore_index=ignore_index) for k in range(1, n_future + 1)],
        dim=-1,
    )
    nll = F.cross_entropy(
        rearrange(logits, "b t h v -> (b t h) v").to(torch.promote_types(logits.dtype, torch.float32)),
        rearrange(targets, "b t h -> (b t h)"),
        ignore_index=ignore_index,
        reduction="none",
    )
    return rearrange(nll, "(b t h) -> b t h", b=labels.shape[0], h=n_future), targets != ignore_index


def _weighted_sum(nll: Tensor, valid: Tensor, w: Tensor | None) -> Tensor:
    """``Σ w·nll`` over valid tokens (``w = None``: unweighted). The weights are zeroed off the
    mask first, so that weights at invalid positions (e.g. NaN padding) reach neither the value
    nor the gradient."""
    if w is None:
        return nll.sum()
    return (nll * torch.where(valid, w.to(nll.dtype), 0.0)).sum()


def head_ce_sums(
    hidden: Tensor,
    unembedding: Tensor,
    labels: Tensor,
    k: int,
    *,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Head ``k``'s CE sums from its hidden states, with the chunked CE (no logits held) — the
    per-head piece of the sequential-head objective.

    hidden: ``[B, T, d]`` head ``k``'s output after the final norm; unembedding: ``[V, d]``;
    labels, attention_mask: ``[B, T]``; weights: ``None``, ``[B, T]`` or ``[B, T, H]`` (module
    docstring).
    Returns ``(weighted: [] , unweighted: [])`` fp32 sums over the valid targets; the
    normaliser is ``mtp_counts(...)[k−1]``.
    """
    nll, valid = head_token_nll(
        hidden, unembedding, labels, k, attention_mask=attention_mask, chunk_size=chunk_size, ignore_index=ignore_index
    )
    w = head_weights(weights, k, shape=labels.shape)
    return _weighted_sum(nll, valid, w), nll.sum()


def mtp_sums(
    logits: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Per-head CE sums from all-head logits.

    logits: ``[B, T, H, V]``; labels, attention_mask: ``[B, T]``; weights: ``None``, ``[B, T]``
    or ``[B, T, H]`` (module docstring).
    Returns ``(weighted: [H], unweighted: [H])`` fp32; the normalisers are ``mtp_counts``.
    """
    nll, valid = mtp_token_nll(logits, labels, attention_mask, ignore_index=ignore_index)
    n_future = logits.shape[2]
    if weights is not None and weights.dim() == 3 and weights.shape[2] != n_future:
        raise ValueError(f"mtp_sums: per-head weights have {weights.shape[2]} heads, the logits {n_future}")
    weighted = torch.stack(
        [
            _weighted_sum(nll[..., k - 1], valid[..., k - 1], head_weights(weights, k, shape=labels.shape))
            for k in range(1, n_future + 1)
        ]
    )
    return weighted, nll.sum(dim=(0, 1))


def mtp_metrics(weighted: Tensor, unweighted: Tensor, counts: Tensor) -> dict[str, Tensor]:
    """Per-head metrics as additive partial sums (summed over micro-batches and ranks, then
    ``ce_sum / count`` and ``weighted_ce_sum / count`` give each head's CE). All ``[H]``."""
    return {"ce_sum": unweighted.detach(), "weighted_ce_sum": weighted.detach(), "count": counts}


def mtp_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The normalised MTP loss of one batch, ``[]`` fp32 (for notebooks and tests; training uses
    the sums with global counts). logits: ``[B, T, H, V]``; the rest as in ``mtp_sums``."""
    weighted, _ = mtp_sums(logits, labels, attention_mask=attention_mask, weights=weights, ignore_index=ignore_index)
    counts = mtp_counts(labels, attention_mask, n_future=logits.shape[2], ignore_index=ignore_index)
    return (component_weights(counts).to(weighted.device) * weighted).sum()
