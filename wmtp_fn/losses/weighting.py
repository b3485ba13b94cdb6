"""Token weights from a critic's values (TD errors, GAE, whitening) and the control modes.

The math is written out in ``docs/losses-critic-td.md``. In short, for values ``v [B, T]`` and a
response mask ``m [B, T]`` (1 on the tokens the policy is trained on):

- TD error at every position: ``δ_t = γ v_t − v_{t−1}``, with ``v_{−1} = initial_value``;
- GAE backwards from each row's last response token: ``A_t = δ_t + γλ A_{t+1}``, zero after it,
  then masked to the response (``mc_at_lambda_one``: ``A_t = R − v_t`` when ``λ = γ = 1``);
- whitening ``Â = (A − μ)/(σ + 1e-8)``: in training with running statistics (explicit state:
  ``init_whitening`` / ``update_whitening``, fed once per optimizer step with the
  ``whitening_sums`` of all micro-batches and ranks), in validation with the batch's own;
- weights ``w = clip(exp(Â/β), w_min, w_max) · m``;
- control modes that keep "how much reweighting" but change "which tokens": ``uniform``,
  ``random`` (LogNormal: the seeds' fixed moments or matched to the batch), ``shuffled``.

Everything here is a pure function of tensors and runs on device without host syncs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.errors import ConfigError

EPS = 1e-8  # added to σ before dividing, and the floor of a batch variance
LOG_EPS = 1e-10  # inside the entropy's log (the seeds' constant)
SEEDS_RANDOM_MEAN, SEEDS_RANDOM_STD = 1.328, 0.981  # the seeds' published critic-weight moments
MODES = ("critic", "uniform", "random", "shuffled")

Mode = Literal["critic", "uniform", "random", "shuffled"]


def _check_unit(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"td.{name} must be in [0, 1], got {value!r}")


def _check_shapes(fn: str, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"{fn} expects [B, T] tensors of one shape, got {shapes}")


# ---------------------------------------------------------------------------- discounted sums


def reverse_discounted_cumsum(x: Tensor, discount: float) -> Tensor:
    """``y_t = Σ_{k ≥ t} discount^(k−t) · x_k`` along the last axis: ``x: [B, T]`` -> ``[B, T]``.

    Computed as ``y = x · Dᵀ`` with the upper-triangular matrix ``D[t, k] = discount^(k−t)``
    (``k ≥ t``), in float64. Every power has a non-negative exponent, so each entry is in
    ``[0, 1]`` for ``discount ≤ 1``: nothing overflows and small terms underflow harmlessly to 0.
    (The tempting O(T) trick ``cumsum(x_k · c^k) / c^t`` needs ``c^(−t)``: for ``c = 0.95`` and
    ``T = 2048`` that is ~1e45, past the fp32 range, and the final subtraction of two huge
    partial sums cancels away every digit of the answer.) The matrix is ``T²`` float64
    (32 MiB at ``T = 2048``) and the product ``B·T²`` multiply-adds, negligible beside a forward
    pass; float64 also keeps the result exact to fp32 under TF32 matmul settings.
    """
    if not (0.0 <= float(discount) <= 1.0):
        raise ConfigError(f"discount must be in [0, 1], got {discount!r}")
    T = x.shape[-1]
    t = torch.arange(T, device=x.device, dtype=torch.float64)
    gap = t.unsqueeze(0) - t.unsqueeze(1)  # gap[t, k] = k − t
    powers = torch.pow(torch.tensor(float(discount), dtype=torch.float64, device=x.device), gap.clamp_min(0))
    matrix = torch.where(gap >= 0, powers, 0.0)
    return (x.to(torch.float64) @ matrix.T).to(x.dtype)


def through_last(mask: Tensor) -> Tensor:
    """``mask: [B, T]`` -> bool ``[B, T]``, true at and before each row's last true position
    (all false in a row without one)."""
    m = mask.bool()
    return torch.flip(torch.cummax(torch.flip(m, dims=[-1]).int(), dim=-1).values, dims=[-1]).bool()


# ------------------------------------------------------------------------------ TD and GAE


def td_errors(values: Tensor, *, gamma: float = 1.0, initial_value: float = 0.5) -> Tensor:
    """``δ_t = γ v_t − v_{t−1}`` at every position of ``values: [B, T]``, with ``v_{−1} =
    initial_value`` at position 0. The first response token ``t₀`` therefore uses the value of
    the last prompt token; ``initial_value`` only matters where a row's position 0 is scored.
    Returns ``[B, T]`` in ``values``' dtype."""
    _check_unit("gamma", gamma)
    previous = torch.cat([torch.full_like(values[:, :1], float(initial_value)), values[:, :-1]], dim=1)
    return gamma * values - previous


def gae(delta: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> Tensor:
    """GAE advantages ``A_t = δ_t + γλ A_{t+1}`` run backwards from each row's last ``mask``
    token (``A`` is 0 after it), then masked: ``delta, mask: [B, T]`` -> ``A: [B, T]``.

    Positions before the last token that are not in ``mask`` (the prompt) still pass the
    recursion through; with a contiguous response they lie before it and only get masked.
    """
    _check_shapes("gae", delta=delta, mask=mask)
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    inside = through_last(mask)
    adv = reverse_discounted_cumsum(torch.where(inside, delta, 0.0), gamma * lam)
    return torch.where(mask.bool(), adv, 0.0)


def td_advantages(
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    initial_value: float = 0.5,
    mc_at_lambda_one: bool = False,
    reward: float = 1.0,
) -> Tensor:
    """Advantages of the response tokens: ``values, mask: [B, T]`` -> ``A: [B, T]`` (0 off ``mask``).

    ``mc_at_lambda_one`` (the seeds' rule): when ``λ = 1`` and ``γ = 1`` use ``A_t = R − v_t``
    instead of the recursion. This is not the recursion's limit (which telescopes to
    ``v_last − v_{t−1}``), so turning the flag on makes the result jump at ``λ = γ = 1``.
    """
    _check_shapes("td_advantages", values=values, mask=mask)
    if mc_at_lambda_one and lam == 1.0 and gamma == 1.0:
        return torch.where(mask.bool(), reward - values, 0.0)
    return gae(td_errors(values, gamma=gamma, initial_value=initial_value), mask, gamma=gamma, lam=lam)


# ------------------------------------------------------------------------------- whitening


def whitening_sums(x: Tensor, mask: Tensor) -> Tensor:
    """``(Σx, Σx², N)`` over the ``mask`` tokens of ``x: [B, T]`` as a float64 ``[3]``: additive,
    so the step sums it over micro-batches and ranks before one ``update_whitening``."""
    _check_shapes("whitening_sums", x=x, mask=mask)
    m = mask.bool()
    xm = torch.where(m, x, 0.0).to(torch.float64)
    return torch.stack([xm.sum(), (xm * xm).sum(), m.sum().to(torch.float64)])


def moments(sums: Tensor, *, unbiased: bool = False) -> tuple[Tensor, Tensor]:
    """``(μ, σ)`` from ``sums = (Σx, Σx², N)``: ``σ = sqrt(max(var, 1e-8))`` with the population
    variance ``E[x²] − E[x]²`` or, if ``unbiased``, ``(Σx² − N μ²)/(N − 1)``. ``N = 0`` gives
    ``μ = 0`` (and ``N ≤ 1`` with ``unbiased`` gives ``σ = 1e-4``); callers decide what such a
    batch means."""
    total, total_sq, n = sums.unbind(-1)
    mean = total / n.clamp_min(1.0)
    if unbiased:
        var = (total_sq - n * mean * mean) / (n - 1.0).clamp_min(1.0)
    else:
        var = total_sq / n.clamp_min(1.0) - mean * mean
    return mean, torch.sqrt(var.clamp_min(EPS))


def init_whitening(device: torch.device | str | None = None) -> TensorDict:
    """Running whitening statistics before any update: ``μ = 0``, ``σ = 1`` (no whitening).

    ``{"mean": float64 [], "std": float64 [], "updates": int64 []}``; part of the train state's
    ``extra`` and checkpointed with it."""
    f64 = dict(dtype=torch.float64, device=device)
    return TensorDict(
        {
            "mean": torch.zeros((), **f64),
            "std": torch.ones((), **f64),
            "updates": torch.zeros((), dtype=torch.int64, device=device),
        },
        batch_size=[],
    )


def update_whitening(stats: TensorDict, batch_sums: Tensor, *, warmup: int = 10, alpha: float = 0.1) -> TensorDict:
    """The statistics after one optimizer step whose valid tokens summed to ``batch_sums [3]``.

    With the batch's ``(μ_b, σ_b)`` (population σ) and ``n`` the number of this update
    (1-based), each of ``μ`` and ``σ`` (σ itself, not the variance) becomes
    ``((n−1)/W)·s + (1 − (n−1)/W)·batch`` while ``n ≤ W = warmup``, and ``(1−α)·s + α·batch``
    afterwards; the first update therefore takes the batch's statistics outright. A step with
    no valid token leaves the statistics (and ``n``) unchanged. Pure: returns a new TensorDict.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"td.whitening warmup must be an int >= 0, got {warmup!r}")
    _check_unit("whitening alpha", alpha)
    if tuple(batch_sums.shape) != (3,):
        raise ValueError(f"update_whitening expects batch_sums (Σx, Σx², N) of shape [3], got {tuple(batch_sums.shape)}")
    batch_mean, batch_std = moments(batch_sums.to(torch.float64))
    n = stats["updates"] + 1
    prior = (n - 1).to(torch.float64) / max(warmup, 1)
    keep = torch.where(n <= warmup, prior, 1.0 - alpha)  # weight of the old statistics
    has_data = batch_sums[2] > 0
    new = {}
    for key, batch in (("mean", batch_mean), ("std", batch_std)):
        blended = keep * stats[key] + (1.0 - keep) * batch
        new[key] = torch.where(has_data, blended, stats[key])
    new["updates"] = torch.where(has_data, n, stats["updates"])
    return TensorDict(new, batch_size=[])


def whiten(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x − μ)/(σ + 1e-8)`` in ``x``'s dtype (``mean``, ``std``: scalar tensors or floats)."""
    mean = torch.as_tensor(mean, device=x.device).to(x.dtype)
    std = torch.as_tensor(std, device=x.device).to(x.dtype)
    return (x - mean) / (std + EPS)


# --------------------------------------------------------------------------------- weights


def raw_weights(adv: Tensor, mean: Tensor, std: Tensor, *, beta: float = 1.0) -> Tensor:
    """``exp(Â/β)`` before clipping: ``adv: [B, T]`` -> ``[B, T]``."""
    if not beta > 0:
        raise ConfigError(f"td.beta must be > 0, got {beta!r}")
    return torch.exp(whiten(adv, mean, std) / beta)


def clip_weights(raw: Tensor, mask: Tensor, *, w_min: float = 0.1, w_max: float = 3.0) -> Tensor:
    """``clip(raw, w_min, w_max)`` on ``mask`` tokens and exactly 0 elsewhere (an ``inf`` or
    ``nan`` off the mask never leaks through)."""
    if not (0.0 <= w_min <= w_max):
        raise ConfigError(f"td weight clip needs 0 <= w_min <= w_max, got w_min={w_min!r}, w_max={w_max!r}")
    return torch.where(mask.bool(), raw.clamp(w_min, w_max), 0.0)


def td_weights(
    adv: Tensor,
    mask: Tensor,
    mean: Tensor,
    std: Tensor,
    *,
    beta: float = 1.0,
    w_min: float = 0.1,
    w_max: float = 3.0,
) -> Tensor:
    """Training weights ``w = clip(exp(((A − μ)/(σ + 1e-8))/β), w_min, w_max) · m`` with the
    running statistics ``(μ, σ)`` read before the step: ``adv, mask: [B, T]`` -> ``[B, T]``."""
    return clip_weights(raw_weights(adv, mean, std, beta=beta), mask, w_min=w_min, w_max=w_max)


def validation_td_weights(
    adv: Tensor,
    mask: Tensor,
    *,
    sums: Tensor | None = None,
    beta: float = 1.0,
    w_min: float = 0.1,
    w_max: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validation weights whitened with the batch's own ``(μ, σ)``, σ unbiased; a batch with at
    most one valid token gets ``w = m``. ``sums``: the batch's ``whitening_sums`` when it spans
    more than ``adv`` (all micro-batches and ranks of an evaluation batch); default those of
    ``adv`` itself. Returns ``(w [B, T], μ [], σ [])``."""
    sums = whitening_sums(adv, mask) if sums is None else sums
    mean, std = moments(sums, unbiased=True)
    w = td_weights(adv, mask, mean, std, beta=beta, w_min=w_min, w_max=w_max)
    few = sums[2] <= 1
    return torch.where(few, mask.to(w.dtype), w), mean, std


def weight_sums(w: Tensor, mask: Tensor, raw: Tensor | None = None, *, w_min: float = 0.1, w_max: float = 3.0) -> dict[str, Tensor]:
    """Additive sums (over micro-batches and ranks) behind the logged weight statistics, over
    the ``mask`` tokens: ``n, w_sum, w_sq_sum, w_log_w_sum`` (``Σ w·log(w + 1e-10)``) and, given
    ``raw`` (``exp(Â/β)`` before clipping), ``clipped`` (how many fell outside
    ``[w_min, w_max]``). ``min`` / ``max`` hold the extremes (reduce those by min/max);
    they are ``+inf`` / ``−inf`` without a valid token. All fp64 ``[]``."""
    m = mask.bool()
    wd = w.to(torch.float64)
    valid = torch.where(m, wd, 0.0)
    out = {
        "n": m.sum().to(torch.float64),
        "w_sum": valid.sum(),
        "w_sq_sum": (valid * valid).sum(),
        "w_log_w_sum": torch.where(m, wd * torch.log(wd + LOG_EPS), 0.0).sum(),
        "min": torch.where(m, wd, math.inf).amin(),
        "max": torch.where(m, wd, -math.inf).amax(),
    }
    if raw is not None:
        outside = (raw < w_min) | (raw > w_max)
        out["clipped"] = (outside & m).sum().to(torch.float64)
    return out


def weight_stats(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The logged statistics from the (reduced) ``weight_sums``: ``mean``, ``std`` (population),
    ``min``, ``max``, ``entropy`` (the seeds': ``−mean(w·log(w + 1e-10))``),
    ``normalized_entropy`` (``−Σ p log p / log N`` with ``p = w/Σw``; 1 when ``N ≤ 1``, the
    uniform value) and ``clip_ratio`` (when ``clipped`` is present). Without a valid token
    every statistic is 0."""
    n = sums["n"]
    has = n > 0
    n1 = n.clamp_min(1.0)
    mean = sums["w_sum"] / n1
    var = (sums["w_sq_sum"] / n1 - mean * mean).clamp_min(0.0)
    total = sums["w_sum"].clamp_min(torch.finfo(torch.float64).tiny)
    # −Σ p log p = log Σw − Σ w log w / Σw  (the 1e-10 inside the log is ~1e-10 relative here)
    plogp = torch.log(total) - sums["w_log_w_sum"] / total
    normalized = torch.where(n > 1, plogp / torch.log(n.clamp_min(2.0)), 1.0)
    out = {
        "mean": mean,
        "std": var.sqrt(),
        "min": torch.where(has, sums["min"], 0.0),
        "max": torch.where(has, sums["max"], 0.0),
        "entropy": -sums["w_log_w_sum"] / n1,
        "normalized_entropy": torch.where(has, normalized, 0.0),
    }
    if "clipped" in sums:
        out["clip_ratio"] = sums["clipped"] / n1
    return out


# ---------------------------------------------------------------------------- control modes


def lognormal_weights(
    mask: Tensor, mean: Tensor | float, std: Tensor | float, *, generator: torch.Generator | None = None
) -> Tensor:
    """LogNormal draws with the given mean and std on ``mask`` tokens (0 elsewhere): with
    ``s² = log(1 + std²/mean²)`` and ``μ = log mean − s²/2``, ``w = exp(μ + s·z)``, ``z ~ N(0, 1)``.
    ``mask: [B, T]`` -> ``[B, T]`` fp32."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=mask.device).clamp_min(EPS)
    std = torch.as_tensor(std, dtype=torch.float32, device=mask.device).clamp_min(0.0)
    s2 = torch.log1p((std / mean) ** 2)
    mu = torch.log(mean) - s2 / 2
    z = torch.randn(mask.shape, generator=generator, device=mask.device)
    return torch.where(mask.bool(), torch.exp(mu + s2.sqrt() * z), 0.0)


def random_weights(
    critic_w: Tensor,
    mask: Tensor,
    *,
    matched: bool = True,
    w_min: float = 0.1,
    w_max: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``random`` control: LogNormal weights on ``mask`` tokens.

    matched (default): the mean and population std of this batch's own critic weights
    ``critic_w`` over ``mask``, unclipped (clipping would shrink both moments below the ones
    matched). Otherwise the seeds' fixed form: mean 1.328, std 0.981, clamped to
    ``[w_min, w_max]``, the same distribution for every batch.
    """
    _check_shapes("random_weights", critic_w=critic_w, mask=mask)
    if matched:
        mean, std = moments(whitening_sums(critic_w, mask))
        std = torch.where(mask.bool().sum() > 1, std, 0.0)  # moments' 1e-4 floor is not a spread
        return lognormal_weights(mask, mean, std, generator=generator)
    w = lognormal_weights(mask, SEEDS_RANDOM_MEAN, SEEDS_RANDOM_STD, generator=generator)
    return clip_weights(w, mask, w_min=w_min, w_max=w_max)


def shuffle_weights(w: Tensor, scope: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``w`` with its values permuted uniformly at random among each row's ``scope`` positions;
    positions outside ``scope`` keep their own value. ``w, scope: [B, T]`` -> ``[B, T]``.

    Vectorised: sorting random keys orders each row's scope positions randomly (the sources),
    sorting the positions themselves orders them ascending (the destinations); both sorts put the
    out-of-scope positions last in the same order, so they map onto themselves.
    """
    _check_shapes("shuffle_weights", w=w, scope=scope)
    s = scope.bool()
    T = w.shape[1]
    index = torch.arange(T, device=w.device).expand_as(w)
    keys = torch.rand(w.shape, generator=generator, device=w.device)
    outside = T + index  # after every scope position, in ascending order
    sources = torch.argsort(torch.where(s, keys * T, outside.to(keys.dtype)), dim=1)
    targets = torch.argsort(torch.where(s, index, outside), dim=1)
    return torch.zeros_like(w).scatter(1, targets, w.gather(1, sources))


def control_weights(
    mode: Mode,
    critic_w: Tensor,
    mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    random_matched: bool = True,
    shuffle_scope: Literal["response", "attended"] = "response",
    w_min: float = 0.1,
    w_max: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The weights a control mode trains with, from the critic's ``critic_w [B, T]`` (0 off the
    response ``mask``).

    critic: ``critic_w``; uniform: ``m``; random: ``random_weights(matched=random_matched)``;
    shuffled: ``critic_w`` permuted within each row's response tokens (``shuffle_scope =
    "response"``, the multiset per sequence is kept), or, as the seeds did, over all of the
    row's ``attention_mask`` positions (``"attended"``), which moves prompt zeros into the
    response and response weights onto the prompt, where the loss ignores them.
    """
    if mode == "critic":
        return critic_w
    if mode == "uniform":
        return mask.to(critic_w.dtype)
    if mode == "random":
        return random_weights(critic_w, mask, matched=random_matched, w_min=w_min, w_max=w_max, generator=generator)
    if mode == "shuffled":
        if shuffle_scope == "response":
            return shuffle_weights(critic_w, mask, generator=generator)
        if shuffle_scope == "attended":
            if attention_mask is None:
                raise ValueError("control_weights(shuffle_scope='attended') needs the batch's attention_mask")
            return shuffle_weights(critic_w, attention_mask, generator=generator)
        raise ConfigError(f"td.shuffle_scope must be 'response' or 'attended', got {shuffle_scope!r}")
    raise ConfigError(f"td.control mode must be one of {MODES}, got {mode!r}")
