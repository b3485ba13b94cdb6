"""Rho-1 token selection for MTP: train each head only on the tokens whose loss most exceeds a
reference model's.

Alignment (source-indexed, like ``losses.mtp``): head ``k`` (1-based) at position ``t`` predicts
``y = labels[:, t+k]``; the reference is a next-token model, and its prediction of that same
token is made at position ``t+k−1``. So with the reference's per-token NLL ``r[:, s]`` (position
``s`` predicting ``labels[:, s+1]``, e.g. ``mtp.head_token_nll(ref_hidden, W, labels, 1)``):

    ℓᵖ[:, t, k−1] = policy NLL of head k at t      ℓʳ[:, t, k−1] = r[:, t+k−1]

and the valid mask is the MTP mask (``mtp.mtp_valid``). Excess by mode: ``signed`` ℓᵖ − ℓʳ,
``absolute`` |ℓᵖ − ℓʳ|, ``difficult`` ℓʳ.

Selection (default, ``select_exact``): per head, exactly ``n = ⌈k·N⌉`` of the ``N`` valid tokens of
the scope, ``k`` the ratio in ``[0, 1]``. **Tie rule:** higher excess first; among equal excess
the lower flat position first, the flat order being micro-batch (list order), then row ``b``,
then position ``t`` (across ranks: rank first). ``k`` is read as the nearest fraction with a
denominator ≤ 10⁶, so ``⌈0.7·10⌉ = 7`` (plain float arithmetic would give 8 for some ``N``).
The result is binary per-head weights ``[B, T, H]``, directly usable as ``mtp`` per-head
weights; the loss stays normalised by the mask count, so ``k = 1`` is the plain MTP loss and
``k = 0`` a finite 0.

Scope: a list of one micro-batch is the micro-batch scope; the list of all micro-batches of a
step (the prepare pre-pass) is the step scope. The seeds' rule (``select_quantile``):
``threshold = torch.quantile(excess_valid, 1 − k)`` (linear interpolation) and
``w = excess ≥ threshold`` per micro-batch — ties select more than ``k·N``, and ``k = 0`` still
selects the maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

Mode = Literal["signed", "absolute", "difficult"]
MODES = ("signed", "absolute", "difficult")

_I64_MIN = torch.iinfo(torch.int64).min
_I64_MAX = torch.iinfo(torch.int64).max
_RATIO_DENOMINATOR = 10**6


class Comm(Protocol):
    """What ``select_exact`` needs from a process group: ``sum_(t)`` all-reduces ``t`` in place
    (sum over ranks), ``rank`` and ``world_size``. ``None`` means one process."""

    rank: int
    world_size: int

    def sum_(self, t: Tensor) -> None: ...


def align_reference_nll(ref_nll: Tensor, n_future: int) -> Tensor:
    """The reference's NLL of each head's target, source-indexed.

    ref_nll: ``[B, T]`` next-token NLL, ``ref_nll[:, s]`` the reference's loss on ``labels[:, s+1]``.
    Returns ``[B, T, H]`` with ``out[:, t, k−1] = ref_nll[:, t+k−1]`` and 0 where ``t+k−1 ≥ T``
    (positions without a target for head ``k``).
    """
    if ref_nll.dim() != 2:
        raise ValueError(f"align_reference_nll: ref_nll must be [B, T], got shape {tuple(ref_nll.shape)}")
    if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1:
        raise ValueError(f"align_reference_nll: n_future must be an int >= 1, got {n_future!r}")
    T = ref_nll.shape[1]
    return torch.stack([F.pad(ref_nll[:, k - 1 :], (0, min(k - 1, T))) for k in range(1, n_future + 1)], dim=-1)


def excess_loss(policy_nll: Tensor, ref_nll: Tensor, mode: Mode = "signed") -> Tensor:
    """Per-token excess loss, no gradient. policy_nll, ref_nll: ``[B, T, H]`` aligned
    (``align_reference_nll``). Returns ``[B, T, H]`` in the common dtype."""
    if policy_nll.shape != ref_nll.shape:
        raise ValueError(
            f"excess_loss: policy_nll {tuple(policy_nll.shape)} and ref_nll {tuple(ref_nll.shape)} differ; "
            "align the reference with align_reference_nll first"
        )
    p, r = policy_nll.detach(), ref_nll.detach()
    if mode == "signed":
        return p - r
    if mode == "absolute":
        return (p - r).abs()
    if mode == "difficult":
        return r.to(torch.promote_types(p.dtype, r.dtype))
    raise ValueError(f"rho1 mode must be one of {MODES}, got {mode!r}")


def _ratio_fraction(ratio: float) -> Fraction:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, Fraction)) or not 0 <= ratio <= 1:
        raise ValueError(f"rho1 selection ratio must be a number in [0, 1], got {ratio!r}")
    return Fraction(ratio).limit_denominator(_RATIO_DENOMINATOR)


def selected_count(n_valid: Tensor, ratio: float) -> Tensor:
    """``⌈k·N⌉`` per head in exact integer arithmetic: n_valid ``[H]`` int64 -> ``[H]`` int64."""
    q = _ratio_fraction(ratio)
    return (n_valid * q.numerator + q.denominator - 1) // q.denominator


def _order_keys(x: Tensor) -> Tensor:
    """Finite floats -> int64 keys with the same order (``a < b ⇔ key(a) < key(b)``, ``-0 = +0``):
    the IEEE bit pattern, magnitude bits flipped for negatives."""
    bits = (x.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ _I64_MAX, bits)


def _key_values(key: Tensor) -> Tensor:
    """Inverse of ``_order_keys``: int64 keys -> float64."""
    return torch.where(key < 0, key ^ _I64_MAX, key).view(torch.float64)


def _flat(ts: Sequence[Tensor]) -> Tensor:
    """``[B_i, T_i, H]`` per micro-batch -> ``[H, Σ B_i·T_i]`` in the flat tie order."""
    return torch.cat([rearrange(t, "b t h -> h (b t)") for t in ts], dim=1)


def _all_sum(t: Tensor, comm: Comm | None) -> Tensor:
    if comm is not None:
        comm.sum_(t)
    return t


@torch.no_grad()
def select_exact(
    excess: Sequence[Tensor], valid: Sequence[Tensor], ratio: float, *, comm: Comm | None = None
) -> tuple[list[Tensor], Tensor]:
    """Exactly ``⌈k·N⌉`` tokens per head over the union of the given micro-batches (and of all
    ranks when ``comm`` is given), ties by the rule in the module docstring.

    excess: per micro-batch ``[B_i, T_i, H]`` (finite values; ``T_i`` may differ).
    valid: per micro-batch ``[B_i, T_i, H]`` bool (``mtp.mtp_valid``).
    ratio: ``k`` in ``[0, 1]``.
    Returns ``(weights, threshold)``: per micro-batch ``[B_i, T_i, H]`` binary weights in the
    excess dtype, and ``threshold: [H]`` float64, the smallest selected excess (0 where a head
    selects nothing). Never syncs with the host.

    How (the same on one process and on many; every global quantity is an ``[H]``-sized sum):
      1. ``N`` = valid count per head (one all-reduce), ``n = ⌈k·N⌉``.
      2. The threshold ``τ`` = the ``n``-th largest excess: the largest ``v`` with
         ``#{excess ≥ v} ≥ n``, found by bisection over the 2⁶⁴ order-preserving integer keys
         of float64 — 64 rounds, each one all-reduce of an ``[H]`` count. Exact, no values move
         between ranks, memory flat.
      3. Every token above ``τ`` is selected; ``r = n − #{excess > τ}`` (one all-reduce) of the
         tokens equal to ``τ`` are taken in flat order: each rank's tie count is gathered (an
         all-reduce of a ``[world, H]`` matrix holding the own row), giving the number of ties
         on lower ranks, and a local cumulative sum orders the rest.
    """
    if len(excess) != len(valid) or not excess:
        raise ValueError(f"select_exact: need matching non-empty lists, got {len(excess)} excess and {len(valid)} valid")
    n_future = excess[0].shape[-1]
    for i, (e, v) in enumerate(zip(excess, valid)):
        if e.dim() != 3 or e.shape != v.shape or e.shape[-1] != n_future:
            raise ValueError(
                f"select_exact: micro-batch {i} has excess {tuple(e.shape)} and valid {tuple(v.shape)}; "
                f"both must be [B, T, H={n_future}]"
            )
    key, ok = _flat([_order_keys(e) for e in excess]), _flat([v.bool() for v in valid])
    device = key.device
    n_valid = _all_sum(ok.sum(dim=1), comm)
    n_pick = selected_count(n_valid, ratio)

    # Invariant per head: #{key ≥ lo} ≥ n and #{key ≥ hi} < n (finite floats never reach I64_MAX).
    lo = torch.full((n_future,), _I64_MIN, dtype=torch.int64, device=device)
    hi = torch.full((n_future,), _I64_MAX, dtype=torch.int64, device=device)
    for _ in range(64):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        at_least = _all_sum(((key >= mid[:, None]) & ok).sum(dim=1), comm)
        lo, hi = torch.where(at_least >= n_pick, mid, lo), torch.where(at_least >= n_pick, hi, mid)
    tau = lo[:, None]

    above = (key > tau) & ok
    tie = (key == tau) & ok
    n_ties_needed = n_pick - _all_sum(above.sum(dim=1), comm)
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    per_rank = torch.zeros(world, n_future, dtype=torch.int64, device=device)
    per_rank[rank] = tie.sum(dim=1)
    ties_before = _all_sum(per_rank, comm)[:rank].sum(dim=0)
    tie_order = ties_before[:, None] + tie.cumsum(dim=1) - 1
    chosen = above | (tie & (tie_order < n_ties_needed[:, None]))

    threshold = torch.where(n_pick > 0, _key_values(lo), 0.0)
    sizes = [e.shape[0] * e.shape[1] for e in excess]
    weights = [
        rearrange(c, "h (b t) -> b t h", b=e.shape[0]).to(e.dtype) for c, e in zip(chosen.split(sizes, dim=1), excess)
    ]
    return weights, threshold


@torch.no_grad()
def select_quantile(excess: Tensor, valid: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """The seeds' rule, per micro-batch and head: ``threshold = quantile(excess_valid, 1 − k)``
    (linear interpolation) and ``w = valid & (excess ≥ threshold)``. Ties over-select.

    excess, valid: ``[B, T, H]``. Returns ``(weights: [B, T, H]`` in the excess dtype,
    ``threshold: [H]`` float64, 0 where a head has no valid token).
    """
    if excess.dim() != 3 or excess.shape != valid.shape:
        raise ValueError(
            f"select_quantile: excess {tuple(excess.shape)} and valid {tuple(valid.shape)} must both be [B, T, H]"
        )
    q = 1.0 - float(_ratio_fraction(ratio))
    x = rearrange(torch.where(valid.bool(), excess.to(torch.float64), torch.nan), "b t h -> h (b t)")
    threshold = torch.nanquantile(x, q, dim=1, interpolation="linear")  # NaN for a head with no valid token
    weights = valid.bool() & (excess.to(torch.float64) >= threshold)
    return weights.to(excess.dtype), torch.nan_to_num(threshold, nan=0.0)


def rho1_weights(
    policy_nll: Tensor,
    ref_nll: Tensor,
    valid: Tensor,
    *,
    ratio: float,
    mode: Mode = "signed",
    rule: Literal["exact", "quantile"] = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """Micro-batch scope in one call: excess, then selection.

    policy_nll, ref_nll (aligned), valid: ``[B, T, H]``; rule ``"exact"`` (``select_exact``) or
    ``"quantile"`` (the seeds', ``select_quantile``).
    Returns ``(weights: [B, T, H], threshold: [H], excess: [B, T, H])``.
    """
    e = excess_loss(policy_nll, ref_nll, mode)
    if rule == "exact":
        (weights,), threshold = select_exact([e], [valid], ratio)
    elif rule == "quantile":
        weights, threshold = select_quantile(e, valid, ratio)
    else:
        raise ValueError(f"rho1 selection rule must be 'exact' or 'quantile', got {rule!r}")
    return weights, threshold, e


def selection_stats(
    weights: Tensor, valid: Tensor, excess: Tensor, policy_nll: Tensor, threshold: Tensor
) -> dict[str, Tensor]:
    """Per-head selection statistics of one micro-batch as additive partial sums (all ``[H]``).

    weights, valid, excess, policy_nll: ``[B, T, H]``; threshold: ``[H]`` from the selection.
    ``selected / valid`` is the head's ratio (``Σ selected / Σ valid`` the overall one),
    ``excess_sum / valid`` the mean excess, ``selected_excess_sum / selected`` the mean selected
    excess, ``selected_ce_sum / selected`` the mean policy CE of the selected tokens, and
    ``threshold_sum / threshold_count`` the threshold (averaged over the micro-batches in which
    the head selected a token; in the step scope every one carries the same step threshold).
    """
    sel = weights.detach() > 0
    ok = valid.bool()
    dims = (0, 1)
    any_sel = sel.any(dim=0).any(dim=0)
    return {
        "selected": sel.sum(dim=dims),
        "valid": ok.sum(dim=dims),
        "excess_sum": torch.where(ok, excess.detach(), 0.0).sum(dim=dims),
        "selected_excess_sum": torch.where(sel, excess.detach(), 0.0).sum(dim=dims),
        "selected_ce_sum": torch.where(sel, policy_nll.detach(), 0.0).sum(dim=dims),
        "threshold_sum": torch.where(any_sel, threshold.to(excess.dtype), 0.0),
        "threshold_count": any_sel.to(torch.int64),
    }
