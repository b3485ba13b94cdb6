"""Critic (value model) losses and metrics over per-position values ``v [B, T]``.

Only response tokens (the ``mask``, 1 where ``labels ≠ −100``) enter. Pairs are given as two
aligned batches: row ``i`` of ``(v_pos, m_pos)`` is a correct solution and row ``i`` of
``(v_neg, m_neg)`` an incorrect one of the same problem. The math is written out in
``docs/losses-critic-td.md``:

- pairwise (Bradley-Terry) on masked-mean values ``v̄ = Σ m v / (Σ m + 1e-8)``:
  ``−mean log σ(v̄_pos − v̄_neg)``;
- λ-return regression towards ``G_t = (1−λ)γ v_{t+1} + λγ G_{t+1}``, ``G = R`` (1 / 0) at the
  last response token, with ``mse`` or ``smooth_l1``; per sequence, then over sequences, then the
  mean of the two halves. λ = 1 is the Monte-Carlo critic.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.weighting import reverse_discounted_cumsum, through_last
from wmtp_fn.schedule import ScheduleConfig, lr_at

MEAN_EPS = 1e-8  # in the masked mean's denominator and the spikiness ratio's
LossKind = Literal["mse", "smooth_l1"]


def _check_pair(fn: str, v_pos: Tensor, m_pos: Tensor, v_neg: Tensor, m_neg: Tensor) -> None:
    shapes = [tuple(t.shape) for t in (v_pos, m_pos, v_neg, m_neg)]
    if v_pos.dim() != 2 or shapes[0] != shapes[1] or shapes[2] != shapes[3] or v_pos.shape[0] != v_neg.shape[0]:
        raise ValueError(
            f"{fn} expects v_pos, m_pos [P, T] and v_neg, m_neg [P, T'] with the same P pairs, got {shapes}"
        )


def masked_mean(v: Tensor, mask: Tensor) -> Tensor:
    """``v̄ = Σ_t m v / (Σ_t m + 1e-8)`` per row: ``v, mask: [B, T]`` -> ``[B]`` (0 for an empty row)."""
    m = mask.to(v.dtype)
    return (v * m).sum(-1) / (m.sum(-1) + MEAN_EPS)


# -------------------------------------------------------------------------------- pairwise


def pairwise_losses(v_pos: Tensor, m_pos: Tensor, v_neg: Tensor, m_neg: Tensor) -> Tensor:
    """Per-pair Bradley-Terry losses ``−log σ(v̄_pos − v̄_neg) = softplus(v̄_neg − v̄_pos)``: ``[P]``.
    (Sum them times the step's ``1/N_pairs`` scale under gradient accumulation.)"""
    _check_pair("pairwise_losses", v_pos, m_pos, v_neg, m_neg)
    return F.softplus(masked_mean(v_neg, m_neg) - masked_mean(v_pos, m_pos))


def pairwise_loss(v_pos: Tensor, m_pos: Tensor, v_neg: Tensor, m_neg: Tensor) -> Tensor:
    """Mean Bradley-Terry loss over the ``P`` pairs, ``[]``; 0 when ``P = 0``."""
    losses = pairwise_losses(v_pos, m_pos, v_neg, m_neg)
    return losses.sum() / max(losses.numel(), 1)


# ------------------------------------------------------------------------------- λ-returns


def lambda_returns(values: Tensor, mask: Tensor, reward: Tensor | float, *, lam: float, gamma: float = 1.0) -> Tensor:
    """λ-return targets (no gradient): ``values, mask: [B, T]``, ``reward``: ``[B]`` or a float.

    ``G = R`` at each row's last ``mask`` token, ``G_t = (1−λ)γ v_{t+1} + λγ G_{t+1}`` before
    it, 0 after it. Unrolled, ``G_t = Σ_k (λγ)^(k−t) x_k`` with ``x_k = (1−λ)γ v_{k+1}`` before
    the last token and ``x = R`` at it — one reverse discounted sum. Returns ``[B, T]`` in
    ``values``' dtype.
    """
    for name, x in (("lam", lam), ("gamma", gamma)):
        if not (0.0 <= float(x) <= 1.0):
            raise ConfigError(f"critic.{name} must be in [0, 1], got {x!r}")
    with torch.no_grad():
        v = values.detach()
        m = mask.bool()
        inside = through_last(m)
        last = inside & ~torch.cat([inside[:, 1:], torch.zeros_like(inside[:, :1])], dim=1)
        following = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # v_{t+1}
        r = torch.as_tensor(reward, dtype=v.dtype, device=v.device).expand(v.shape[0]).unsqueeze(1)
        x = torch.where(last, r, torch.where(inside, (1.0 - lam) * gamma * following, 0.0))
        return reverse_discounted_cumsum(x, lam * gamma)


def lambda_return_sequence_losses(
    values: Tensor,
    mask: Tensor,
    reward: Tensor | float,
    *,
    lam: float,
    gamma: float = 1.0,
    loss: LossKind = "mse",
    delta: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Per-sequence λ-return losses: the mean over the row's ``mask`` tokens of ``(v − G)²``
    (``mse``) or ``smooth_l1(v, G, beta=delta)``. Returns ``(losses [B], valid [B] bool)``;
    rows without a valid token have loss 0 and ``valid = False``."""
    targets = lambda_returns(values, mask, reward, lam=lam, gamma=gamma)
    if loss == "mse":
        per_token = (values - targets) ** 2
    elif loss == "smooth_l1":
        if not delta > 0:
            raise ConfigError(f"critic.smooth_l1 delta must be > 0, got {delta!r}")
        per_token = F.smooth_l1_loss(values, targets, reduction="none", beta=delta)
    else:
        raise ConfigError(f"critic.value_loss must be 'mse' or 'smooth_l1', got {loss!r}")
    m = mask.bool()
    count = m.sum(-1)
    total = torch.where(m, per_token, 0.0).sum(-1)
    return total / count.clamp_min(1), count > 0


def lambda_return_loss(
    v_pos: Tensor,
    m_pos: Tensor,
    v_neg: Tensor,
    m_neg: Tensor,
    *,
    lam: float,
    gamma: float = 1.0,
    loss: LossKind = "mse",
    delta: float = 0.5,
) -> Tensor:
    """λ-return loss of a batch of pairs, ``[]``: ``R = 1`` for ``pos``, ``0`` for ``neg``; each
    half is the mean of its valid sequences' losses, the loss the mean of the halves that have
    a valid sequence (0 when neither has)."""
    _check_pair("lambda_return_loss", v_pos, m_pos, v_neg, m_neg)
    halves = []
    for v, m, reward in ((v_pos, m_pos, 1.0), (v_neg, m_neg, 0.0)):
        seq, valid = lambda_return_sequence_losses(v, m, reward, lam=lam, gamma=gamma, loss=loss, delta=delta)
        n = valid.sum()
        halves.append((torch.where(valid, seq, 0.0).sum() / n.clamp_min(1), n > 0))
    means = torch.stack([h for h, _ in halves])
    present = torch.stack([p for _, p in halves])
    return torch.where(present, means, 0.0).sum() / present.sum().clamp_min(1)


def lambda_at(
    step: int,
    *,
    schedule: Literal["constant", "linear", "cosine"] = "constant",
    start: float = 1.0,
    end: float = 0.95,
    warmup_steps: int = 250,
    decay_steps: int = 500,
) -> float:
    """λ for optimizer step ``step``: ``constant`` is ``start``; ``linear`` / ``cosine`` hold
    ``start`` for ``warmup_steps``, then go to ``end`` over ``decay_steps`` (held after). The
    decay shape is the learning-rate schedule's (``lr_at`` without warm-up, scaled onto
    ``[end, start]``). Validation uses λ = 1 whatever the schedule."""
    for name, x in (("start", start), ("end", end)):
        if not (0.0 <= float(x) <= 1.0):
            raise ConfigError(f"critic.lambda_schedule.{name} must be in [0, 1], got {x!r}")
    if schedule == "constant":
        return float(start)
    if schedule not in ("linear", "cosine"):
        raise ConfigError(f"critic.lambda_schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
        raise ConfigError(f"critic.lambda_schedule.decay_steps must be an int >= 1, got {decay_steps!r}")
    shape = lr_at(max(0, step - warmup_steps), 1.0, ScheduleConfig(kind=schedule, total_steps=decay_steps))
    return float(end + (start - end) * shape)


# --------------------------------------------------------------------------------- metrics


def sequence_value_stats(v: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-sequence shape statistics of the values on ``mask`` tokens, each ``(value [B], valid [B])``:

    - ``token_variance``: unbiased variance of ``v`` (rows with ≥ 2 tokens);
    - ``spikiness``: ``max|Δv| / (mean|Δv| + 1e-8)`` over consecutive valid pairs (rows with ≥ 1);
    - ``position_corr``: Pearson correlation of ``v`` with the position (rows with ≥ 3 tokens;
      0 for constant values). Near 1 means the critic mostly measures length.
    Computed in float64.
    """
    vd = v.detach().to(torch.float64)
    m = mask.bool()
    n = m.sum(-1).to(torch.float64)
    centered = torch.where(m, vd - masked_mean(vd, m).unsqueeze(1), 0.0)
    variance = (centered * centered).sum(-1) / (n - 1).clamp_min(1)

    pairs = m[:, 1:] & m[:, :-1]
    jumps = torch.where(pairs, (vd[:, 1:] - vd[:, :-1]).abs(), 0.0)
    jumps = torch.cat([torch.zeros_like(vd[:, :1]), jumps], dim=1)  # |Δv| ≥ 0: a neutral column for T = 1
    n_pairs = pairs.sum(-1)
    spikiness = jumps.amax(-1) / (jumps.sum(-1) / n_pairs.clamp_min(1) + MEAN_EPS)

    t = torch.arange(v.shape[1], dtype=torch.float64, device=v.device).expand_as(vd)
    t_centered = torch.where(m, t - masked_mean(t, m).unsqueeze(1), 0.0)
    cov = (t_centered * centered).sum(-1)
    scale = torch.sqrt((t_centered**2).sum(-1) * (centered**2).sum(-1))
    corr = torch.where(scale > 0, cov / scale.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return {
        "token_variance": (variance, n >= 2),
        "spikiness": (spikiness, n_pairs >= 1),
        "position_corr": (corr, n >= 3),
    }


def critic_metric_sums(v_pos: Tensor, m_pos: Tensor, v_neg: Tensor, m_neg: Tensor) -> dict[str, Tensor]:
    """Additive sums (over micro-batches and ranks) behind ``critic_metrics``, fp64 ``[]``:
    ``pairs, pairs_correct`` (strict ``v̄_pos > v̄_neg``), ``mean_pos_sum, mean_neg_sum``, and for
    each per-sequence statistic (over pos and neg rows together) ``<name>_sum, <name>_count``."""
    _check_pair("critic_metric_sums", v_pos, m_pos, v_neg, m_neg)
    mean_pos = masked_mean(v_pos.detach(), m_pos).to(torch.float64)
    mean_neg = masked_mean(v_neg.detach(), m_neg).to(torch.float64)
    out = {
        "pairs": torch.tensor(float(mean_pos.numel()), dtype=torch.float64, device=mean_pos.device),
        "pairs_correct": (mean_pos > mean_neg).sum().to(torch.float64),
        "mean_pos_sum": mean_pos.sum(),
        "mean_neg_sum": mean_neg.sum(),
    }
    per_half = [sequence_value_stats(v_pos, m_pos), sequence_value_stats(v_neg, m_neg)]
    for name in per_half[0]:
        values = torch.cat([h[name][0] for h in per_half])
        valid = torch.cat([h[name][1] for h in per_half])
        out[f"{name}_sum"] = torch.where(valid, values, 0.0).sum()
        out[f"{name}_count"] = valid.sum().to(torch.float64)
    return out


def critic_metrics(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """``pairwise_accuracy, mean_pos, mean_neg, margin, token_variance, spikiness,
    position_corr`` from the (reduced) ``critic_metric_sums``; an empty count gives 0."""
    pairs = sums["pairs"].clamp_min(1)
    mean_pos, mean_neg = sums["mean_pos_sum"] / pairs, sums["mean_neg_sum"] / pairs
    out = {
        "pairwise_accuracy": sums["pairs_correct"] / pairs,
        "mean_pos": mean_pos,
        "mean_neg": mean_neg,
        "margin": mean_pos - mean_neg,
    }
    for name in ("token_variance", "spikiness", "position_corr"):
        out[name] = sums[f"{name}_sum"] / sums[f"{name}_count"].clamp_min(1)
    return out


def auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve of ``scores [N]`` separating ``labels [N]`` (true = correct):
    the probability that a random correct sequence scores above a random incorrect one, ties
    counting 1/2 (Mann-Whitney U from average ranks, O(N log N)). ``nan`` when a class is empty.
    """
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"auc expects scores [N] and labels [N], got {tuple(scores.shape)}, {tuple(labels.shape)}")
    s = scores.detach().to(torch.float64)
    pos = labels.bool()
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each value's last copy
    ranks = (last_rank - (counts.to(torch.float64) - 1) / 2)[inverse]
    n_pos = pos.sum().to(torch.float64)
    n_neg = (~pos).sum().to(torch.float64)
    u = torch.where(pos, ranks, 0.0).sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
