"""Verifiable WMTP: the policy adapter trained with the MTP loss, each token weighted by how much
a frozen critic's value changes there (TD errors → GAE advantages → whitened exponential weights).

One base in memory: the critic is the *same* frozen base with the critic adapter and value head
bound (``objectives.critic.value_model``), its parameters closed over, not trained, not in
``params``; the policy is that base with ``params[name]`` bound. They take turns in the slots:
the critic in ``prepare``, the policy in ``loss``. (A separate critic base can be passed as
``critic_base``; checking that the two tokenizers agree is the caller's job.)

A step (``train=True``), the math in ``docs/losses-critic-td.md``:

``prepare`` (no grad, all micro-batches of the step, before any policy forward):
    v = critic values (no dropout); m = response mask (``labels ≠ −100``)
    A = td_advantages(v, m)                             δ at every position, GAE from the last response token
    w_critic = clip(exp(((A − μ)/(σ + 1e-8))/β)) · m    (μ, σ) = extra["whitening"] *before* the step
    w = control_weights(td.control, w_critic, m)        critic | uniform | random | shuffled
    one collective: Σ whitening_sums(A, m), Σ weight_sums(w, m), each rank's min / max
    extra["whitening"] ← update_whitening(old, Σ whitening_sums): once per step
    every micro-batch gets batch[weights_key] = w (position weights [B, T]; the MTP loss gives
    head k the weight of its target token) and batch["td_stats"] (below)
``loss``: ``objectives.mtp.mtp_objective`` with ``weights_key``.

The first step whitens with μ = 0, σ = 1 (``initial_extra``); a skipped step keeps ``extra``
(the train step does that). Randomness (``random``, ``shuffled``) comes from the global
generator, which the train step seeds from ``(seed, step, rank)``: a resumed run draws the same.

Validation (``train=False``): each ``prepare`` call (one batch in ``train.evaluate``) whitens
with that batch's own statistics over its micro-batches and ranks (σ unbiased; ≤ 1 valid token
gives ``w = m``), leaves ``extra`` as it is, and the policy runs without dropout. Under
``random`` / ``shuffled`` it draws from the global generator: wrap ``evaluate`` in
``train.rng.seeded`` for repeatable numbers.

Metrics, besides the MTP objective's per-head ``ce`` (unweighted) and ``wce`` (weighted):
``unweighted_loss`` (the step loss without weights, a sum that is already the mean) and
``loss_ratio`` (weighted / unweighted loss); and the step's statistics, computed once in
``prepare`` over all micro-batches and ranks: ``td_batch_mean, td_batch_std`` (the step's
advantages; in validation the whitening used), ``td_running_mean, td_running_std`` (the running
statistics this step whitened with; training only), and of the weights trained with, over the
response tokens, ``w_mean, w_std, w_min, w_max, w_entropy, w_normalized_entropy`` and
``w_clip_ratio`` (the share of the critic's raw ``exp(Â/β)`` outside the clip range). They reach
the step's metric sums through the first micro-batch only (``td_reports`` counts the reports:
the number of ranks), so in validation they are the mean over batches of each batch's value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from wmtp_fn.adapters import AdapterSpec
from wmtp_fn.dist.comm import Comm
from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.weighting import (
    MODES,
    Mode,
    clip_weights,
    control_weights,
    init_whitening,
    moments,
    raw_weights,
    td_advantages,
    through_last,
    update_whitening,
    validation_td_weights,
    weight_stats,
    weight_sums,
    whitening_sums,
)
from wmtp_fn.models.mtp import MTPLlama
from wmtp_fn.models.value_head import ValueHeadSpec
from wmtp_fn.objectives import Batch, Objective, weighted_sum
from wmtp_fn.objectives.critic import response_mask, value_model
from wmtp_fn.objectives.mtp import mtp_objective

WHITENING = "whitening"  # extra[WHITENING]: the running statistics (losses.weighting.init_whitening)
STATS_KEY = "td_stats"  # batch[STATS_KEY]: the step's statistics (first micro-batch), zeros elsewhere
REPORTS = "td_reports"
WEIGHT_STATS = {  # metric name -> losses.weighting.weight_stats key
    "w_mean": "mean",
    "w_std": "std",
    "w_min": "min",
    "w_max": "max",
    "w_entropy": "entropy",
    "w_normalized_entropy": "normalized_entropy",
    "w_clip_ratio": "clip_ratio",
}
TRAIN_STATS = ("td_batch_mean", "td_batch_std", "td_running_mean", "td_running_std", *WEIGHT_STATS)
EVAL_STATS = ("td_batch_mean", "td_batch_std", *WEIGHT_STATS)
_ADDITIVE = ("n", "w_sum", "w_sq_sum", "w_log_w_sum", "clipped")  # the summable weight_sums


@dataclasses.dataclass(frozen=True)
class TDConfig:
    """TD weighting and control-mode settings (defaults: wmtp_fn's; the seeds' variants are
    ``mc_at_lambda_one=True``, ``random_matched=False``, ``shuffle_scope="attended"``).

    gamma, lam, initial_value, mc_at_lambda_one: ``losses.weighting.td_advantages``;
    beta, w_min, w_max: ``clip(exp(Â/β), w_min, w_max)``; whitening_warmup, whitening_alpha:
    ``update_whitening``; control: ``critic | uniform | random | shuffled``; random_matched:
    LogNormal matched to each micro-batch's critic weights (else the seeds' fixed moments);
    shuffle_scope: permute within the response (``response``) or over all attended positions
    (``attended``: the attention mask, or every position up to the last response token when
    the batch carries none).
    """

    gamma: float = 1.0
    lam: float = 0.95
    initial_value: float = 0.5
    mc_at_lambda_one: bool = False
    beta: float = 1.0
    w_min: float = 0.1
    w_max: float = 3.0
    whitening_warmup: int = 10
    whitening_alpha: float = 0.1
    control: Mode = "critic"
    random_matched: bool = True
    shuffle_scope: Literal["response", "attended"] = "response"

    def __post_init__(self) -> None:
        if self.control not in MODES:
            raise ConfigError(f"td.control must be one of {MODES}, got {self.control!r}")
        if self.shuffle_scope not in ("response", "attended"):
            raise ConfigError(f"td.shuffle_scope must be 'response' or 'attended', got {self.shuffle_scope!r}")
        if not math.isfinite(float(self.initial_value)):
            raise ConfigError(f"td.initial_value must be finite, got {self.initial_value!r}")
        # A dry run on a 1 × 2 batch: every other field is checked by the function that uses it.
        v, m = torch.zeros(1, 2), torch.ones(1, 2)
        adv = td_advantages(v, m, gamma=self.gamma, lam=self.lam, initial_value=self.initial_value)
        w = clip_weights(raw_weights(adv, 0.0, 1.0, beta=self.beta), m, w_min=self.w_min, w_max=self.w_max)
        update_whitening(init_whitening(), whitening_sums(adv, m), warmup=self.whitening_warmup, alpha=self.whitening_alpha)
        _control(self, w, m, None, generator=torch.Generator())


def _control(td: TDConfig, critic_w: Tensor, mask: Tensor, attention_mask: Tensor | None, generator=None) -> Tensor:
    """The weights ``td.control`` trains with, from the critic's ``critic_w [B, T]``."""
    attended = attention_mask if attention_mask is not None else through_last(mask)
    return control_weights(
        td.control,
        critic_w,
        mask,
        attention_mask=attended,
        random_matched=td.random_matched,
        shuffle_scope=td.shuffle_scope,
        w_min=td.w_min,
        w_max=td.w_max,
        generator=generator,
    )


def initial_extra(device: torch.device | str | None = None) -> TensorDict:
    """The run state of a verifiable run before its first step: ``{"whitening": {"mean": 0.,
    "std": 1., "updates": 0}}`` (float64, float64, int64 ``[]``), for ``init_train_state``."""
    return TensorDict({WHITENING: init_whitening(device)}, batch_size=[])


def verifiable_objective(
    base: MTPLlama,
    policy_spec: AdapterSpec,
    critic: TensorDict,
    critic_spec: AdapterSpec | None,
    value_head_spec: ValueHeadSpec,
    *,
    td: TDConfig = TDConfig(),
    train: bool = True,
    name: str = "policy",
    weights_key: str = "td_weights",
    chunk_size: int = 4096,
    critic_base: nn.Module | None = None,
) -> Objective:
    """K = H heads: the MTP objective of ``params[name]`` on ``base`` with TD weights from the
    frozen ``critic`` (module docstring).

    critic: the critic's parameters, ``{"critic": adapter, "value_head": head}`` (no
        ``"critic"`` with ``critic_spec=None``: a head on the bare base), on the base's device;
        closed over, never trained. critic_base: the critic's own base when it is not ``base``.
    Batches: ``input_ids [B, T]``, ``labels [B, T]`` (the response), optional ``attention_mask``.
    train=True needs ``extra`` from ``initial_extra``; train=False is the validation variant.
    """
    if not isinstance(base, MTPLlama):
        raise TypeError(f"verifiable_objective needs an MTPLlama policy base, got {type(base).__name__}")
    if not isinstance(td, TDConfig):
        raise TypeError(f"verifiable_objective: td must be a TDConfig, got {type(td).__name__}")
    policy = mtp_objective(base, policy_spec, name=name, chunk_size=chunk_size, train=train, weights_key=weights_key)
    values = value_model(base if critic_base is None else critic_base, critic_spec, value_head_spec)
    stat_names = TRAIN_STATS if train else EVAL_STATS

    def prepare(params: TensorDict, extra: TensorDict, micro_batches: Sequence[Batch], comm: Comm):
        masks = [response_mask(mb) for mb in micro_batches]
        advs = [
            td_advantages(
                values(critic, mb["input_ids"], mb.get("attention_mask")),
                m,
                gamma=td.gamma,
                lam=td.lam,
                initial_value=td.initial_value,
                mc_at_lambda_one=td.mc_at_lambda_one,
            )
            for mb, m in zip(micro_batches, masks)
        ]
        adv_sums = torch.stack([whitening_sums(a, m) for a, m in zip(advs, masks)]).sum(0)
        if train:
            if WHITENING not in extra.keys():
                raise KeyError(f"verifiable_objective needs extra[{WHITENING!r}]; start the run with initial_extra()")
            running = extra[WHITENING]
            mean, std = running["mean"], running["std"]  # the statistics after the previous step
            raws = [raw_weights(a, mean, std, beta=td.beta) for a in advs]
            critic_ws = [clip_weights(r, m, w_min=td.w_min, w_max=td.w_max) for r, m in zip(raws, masks)]
        else:
            adv_sums = comm.sum_(adv_sums)  # the whole batch's own statistics whiten it
            out = [validation_td_weights(a, m, sums=adv_sums, beta=td.beta, w_min=td.w_min, w_max=td.w_max) for a, m in zip(advs, masks)]
            critic_ws, (_, mean, std) = [w for w, _, _ in out], out[0]
            raws = [raw_weights(a, mean, std, beta=td.beta) for a in advs]
        weights = [_control(td, w, m, mb.get("attention_mask")) for w, m, mb in zip(critic_ws, masks, micro_batches)]
        pending = adv_sums if train else adv_sums[:0]  # training reduces the advantage sums here
        step_sums, reduced = _weight_sums_over_step(weights, masks, raws, td, comm, pending)
        w_stats = weight_stats(step_sums)

        if train:
            stats = [*moments(reduced), mean, std]
            whitening = update_whitening(running, reduced, warmup=td.whitening_warmup, alpha=td.whitening_alpha)
            new_extra = TensorDict({**{k: extra[k] for k in extra.keys()}, WHITENING: whitening}, batch_size=[])
        else:
            stats, new_extra = [mean, std], extra
        stats += [w_stats[key] for key in WEIGHT_STATS.values()]
        report = torch.cat([torch.stack(stats).to(torch.float32), torch.ones(1, device=mean.device)])
        prepared = [
            {**mb, weights_key: w, STATS_KEY: report if i == 0 else torch.zeros_like(report)}
            for i, (mb, w) in enumerate(zip(micro_batches, weights))
        ]
        return new_extra, prepared

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: Tensor):
        objective, sums, metrics = policy.loss(params, extra, batch, scale)
        report = batch[STATS_KEY]
        out = {
            **metrics,
            "unweighted_loss": weighted_sum(metrics["ce"], scale),
            "loss_ratio": weighted_sum(sums, scale),
            **{n: report[i] for i, n in enumerate(stat_names)},
            REPORTS: report[-1],
        }
        return objective, sums, out

    means = {**policy.means, "loss_ratio": "unweighted_loss", **{n: REPORTS for n in stat_names}}
    return Objective(count=policy.count, loss=loss, prepare=prepare, means=means)


def _weight_sums_over_step(
    weights: Sequence[Tensor], masks: Sequence[Tensor], raws: Sequence[Tensor], td: TDConfig, comm: Comm, pending: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """``weight_sums`` of all micro-batches and ranks (``min`` / ``max`` reduced as such) and
    ``pending`` (other fp64 sums to reduce) summed over ranks, in **one** collective."""
    sums = [weight_sums(w, m, r, w_min=td.w_min, w_max=td.w_max) for w, m, r in zip(weights, masks, raws)]
    additive = torch.stack([torch.stack([s[k] for k in _ADDITIVE]) for s in sums]).sum(0)
    lowest = torch.stack([s["min"] for s in sums]).amin()
    highest = torch.stack([s["max"] for s in sums]).amax()
    # min / max through a sum: each rank fills its own row of a zero table (±inf rows mean no token).
    table = torch.zeros(comm.world_size, 2, dtype=torch.float64, device=additive.device)
    table[comm.rank] = torch.stack([lowest, highest])
    packed = comm.sum_(torch.cat([pending.to(torch.float64), additive, table.reshape(-1)]))
    reduced, packed = packed[: pending.numel()], packed[pending.numel() :]
    table = packed[len(_ADDITIVE) :].reshape(comm.world_size, 2)
    out = {k: packed[i] for i, k in enumerate(_ADDITIVE)}
    out.update(min=table[:, 0].amin(), max=table[:, 1].amax())
    return out, reduced
