"""Critic objectives: a value model trained on (correct, incorrect) pairs of the same problem.

The value model is a frozen base, the critic adapter ``params["critic"]`` bound into its slots,
and a value head ``params["value_head"]`` (``models.value_head``, a pure function) on the base's
final-norm hidden states — ``HiddenStates`` of a HuggingFace Llama, ``value_input(trunk)`` of an
MTP base — giving ``v [B, T]`` fp32 at every position. ``value_model`` builds it once; the
critic objectives below train it, and the verifiable objective evaluates the same function
with frozen critic parameters to weight the policy's tokens. ``critic_spec=None`` is the
``use_lora = false`` mode: the backbone stays as it is, the params hold only the head.

Batch layout (``data.collate.collate_pairs``): one micro-batch of ``P`` pairs is

    {"pos": {"input_ids": [P, T], "labels": [P, T], "attention_mask": [P, T] (optional)},
     "neg": {... the same keys, the same T ...}}

row ``i`` of ``pos`` is a correct solution and row ``i`` of ``neg`` an incorrect one of the
same problem (same prompt). Only response tokens (``labels ≠ −100``, inside the attention mask)
enter the losses. Both halves run as one ``[2P, T]`` forward.

Objectives (the math is in ``docs/losses-critic-td.md``):

- ``pairwise_objective``: Bradley-Terry on masked-mean values, ``K = 1``, the normaliser is the
  number of pairs, so accumulation over micro-batches and ranks is one big batch of pairs.
- ``lambda_return_objective``: λ-return regression, ``K = 2`` components (the correct half and
  the incorrect half), each normalised by its number of sequences with a response token, so
  the step loss is the mean of the two halves' per-sequence means as in ``lambda_return_loss``.
  The λ schedule needs the step index: it is a counter in ``extra`` (``lambda_extra()``),
  read and advanced by ``prepare``, which hands λ to every micro-batch (``batch["lam"]``). A
  skipped step keeps ``extra``, so λ follows the number of applied updates. Validation
  (``train=False``) uses λ = 1 and keeps no state.

Metrics (both objectives): ``pairwise_accuracy, mean_pos, mean_neg, margin`` (per pair; the
denominator ``pairs`` is reported as its sum) and ``token_variance, spikiness,
position_corr`` (per sequence, each over its ``<name>_count``), from ``losses.critic``'s
additive sums. AUC is not a sum over micro-batches: ``critic_auc`` computes it over a whole
validation set from ``pair_scores``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from wmtp_fn.adapters import AdapterSpec, bound
from wmtp_fn.dist.comm import Comm
from wmtp_fn.losses.critic import (
    LossKind,
    auc,
    critic_metric_sums,
    lambda_at,
    lambda_return_sequence_losses,
    masked_mean,
    pairwise_losses,
)
from wmtp_fn.losses.ntp import IGNORE_INDEX
from wmtp_fn.models.llama import HiddenStates
from wmtp_fn.models.mtp import MTPLlama
from wmtp_fn.models.value_head import ValueHeadSpec, check_value_head, value_head
from wmtp_fn.objectives import Batch, Objective, weighted_sum

ADAPTER = "critic"  # params[ADAPTER]: the critic adapter (absent with use_lora = false)
HEAD = "value_head"  # params[HEAD]: the value head's parameters
LAMBDA_STEP = "lambda_step"  # extra[LAMBDA_STEP]: int64 [], the λ schedule's step

ValueFn = Callable[..., Tensor]
"""``values(params, input_ids [B, T], attention_mask [B, T] | None = None, *, train=False) -> v [B, T]`` fp32."""


def response_mask(batch: Batch) -> Tensor:
    """``[B, T]`` bool: the tokens a loss sees, ``labels ≠ −100`` and inside the optional
    ``attention_mask``."""
    if "labels" not in batch:
        raise KeyError(f"the batch has no 'labels' (keys: {sorted(batch)})")
    m = batch["labels"] != IGNORE_INDEX
    mask = batch.get("attention_mask")
    return m if mask is None else m & mask.bool()


def value_model(base: nn.Module, critic_spec: AdapterSpec | None, head_spec: ValueHeadSpec) -> ValueFn:
    """The value function of ``base`` (a HF Llama or an ``MTPLlama``, slots installed when
    ``critic_spec`` is given) with ``params[ADAPTER]`` bound (unless ``critic_spec`` is None:
    use_lora = false) and the ``head_spec`` head ``params[HEAD]`` on its final-norm hidden
    states. ``train`` turns on the adapter's and the head's dropout (drawn from the global
    generator, which the train step seeds). The base is used as it is, never copied."""
    if isinstance(base, MTPLlama):
        module = base

        def hidden(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
            return base.value_input(base.trunk(input_ids, attention_mask))
    else:
        module = HiddenStates(base)  # a view sharing the base's submodules and adapter paths
        hidden = module

    def values(params: TensorDict, input_ids: Tensor, attention_mask: Tensor | None = None, *, train: bool = False) -> Tensor:
        _check_params(params, critic_spec, head_spec)
        if critic_spec is None:
            h = hidden(input_ids, attention_mask)
        else:
            with bound(module, params[ADAPTER], critic_spec, train=train):
                h = hidden(input_ids, attention_mask)
        return value_head(params[HEAD], h, kind=head_spec.kind, train=train, dropout=head_spec.dropout)

    return values


def _check_params(params: TensorDict, critic_spec: AdapterSpec | None, head_spec: ValueHeadSpec) -> None:
    keys = sorted(params.keys())
    if HEAD not in keys:
        raise KeyError(f"critic params need {HEAD!r} (the value head), got keys {keys}")
    if critic_spec is None and ADAPTER in keys:
        raise ValueError(
            f"critic params hold {ADAPTER!r} but the value model has no critic adapter spec "
            "(use_lora = false trains the head only); pass the adapter's spec or drop the adapter"
        )
    if critic_spec is not None and ADAPTER not in keys:
        raise KeyError(f"critic params need {ADAPTER!r} (the critic adapter), got keys {keys}")
    check_value_head(params[HEAD], head_spec.kind, head_spec.d)


# ------------------------------------------------------------------------------------ pairs


def _halves(batch: Batch) -> tuple[Batch, Batch]:
    if not isinstance(batch, Mapping) or "pos" not in batch or "neg" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a critic micro-batch is {{'pos': batch, 'neg': batch}} (data.collate.collate_pairs), got {got}")
    pos, neg = batch["pos"], batch["neg"]
    for side, half in (("pos", pos), ("neg", neg)):
        for key in ("input_ids", "labels"):
            if key not in half:
                raise KeyError(f"critic micro-batch[{side!r}] has no {key!r} (keys: {sorted(half)})")
    shapes = {f"{side}.{key}": tuple(half[key].shape) for side, half in (("pos", pos), ("neg", neg)) for key in ("input_ids", "labels")}
    if len(set(shapes.values())) != 1 or len(shapes["pos.input_ids"]) != 2:
        raise ValueError(f"critic micro-batch: pos and neg input_ids and labels must all be [P, T] with one P and T, got {shapes}")
    return pos, neg


def _joint_mask(pos: Batch, neg: Batch) -> Tensor | None:
    """The attention mask of the stacked ``[2P, T]`` forward (ones for a half without one)."""
    masks = [half.get("attention_mask") for half in (pos, neg)]
    if all(m is None for m in masks):
        return None
    return torch.cat([torch.ones_like(h["input_ids"]) if m is None else m for h, m in zip((pos, neg), masks)])


def pair_values(values: ValueFn, params: TensorDict, batch: Batch, *, train: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(v_pos, m_pos, v_neg, m_neg)``, each ``[P, T]``: values of both halves from one
    ``[2P, T]`` forward, and their response masks."""
    pos, neg = _halves(batch)
    p = pos["input_ids"].shape[0]
    ids = torch.cat([pos["input_ids"], neg["input_ids"]])
    v = values(params, ids, _joint_mask(pos, neg), train=train)
    return v[:p], response_mask(pos), v[p:], response_mask(neg)


def _metrics(v_pos: Tensor, m_pos: Tensor, v_neg: Tensor, m_neg: Tensor) -> dict[str, Tensor]:
    """The reported metrics' sums (``METRIC_MEANS`` names their denominators)."""
    s = critic_metric_sums(v_pos, m_pos, v_neg, m_neg)
    out = {
        "pairs": s["pairs"],
        "pairwise_accuracy": s["pairs_correct"],
        "mean_pos": s["mean_pos_sum"],
        "mean_neg": s["mean_neg_sum"],
        "margin": s["mean_pos_sum"] - s["mean_neg_sum"],
    }
    for name in SEQUENCE_STATS:
        out[name] = s[f"{name}_sum"]
        out[f"{name}_count"] = s[f"{name}_count"]
    return out


SEQUENCE_STATS = ("token_variance", "spikiness", "position_corr")
METRIC_MEANS = {
    **{name: "pairs" for name in ("pairwise_accuracy", "mean_pos", "mean_neg", "margin")},
    **{name: f"{name}_count" for name in SEQUENCE_STATS},
}


# ------------------------------------------------------------------------------- objectives


def pairwise_objective(
    base: nn.Module, critic_spec: AdapterSpec | None, head_spec: ValueHeadSpec, *, train: bool = True
) -> Objective:
    """K = 1: the Bradley-Terry loss ``softplus(v̄_neg − v̄_pos)`` summed over the pairs,
    normalised by the number of pairs of the step. Keeps no ``extra``. ``train`` turns on
    the adapter's and the head's dropout."""
    values = value_model(base, critic_spec, head_spec)

    def count(batch: Batch) -> Tensor:
        pos, _ = _halves(batch)
        return torch.tensor([pos["input_ids"].shape[0]], dtype=torch.int64, device=pos["input_ids"].device)

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: Tensor):
        v_pos, m_pos, v_neg, m_neg = pair_values(values, params, batch, train=train)
        sums = pairwise_losses(v_pos, m_pos, v_neg, m_neg).sum().reshape(1)
        return weighted_sum(sums, scale), sums, _metrics(v_pos, m_pos, v_neg, m_neg)

    return Objective(count=count, loss=loss, means=METRIC_MEANS)


@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
    """λ of the λ-return critic per optimizer step (``losses.critic.lambda_at``): ``constant``
    (``start``), or ``linear`` / ``cosine`` from ``start`` to ``end`` over ``decay_steps``
    after ``warmup_steps``."""

    schedule: Literal["constant", "linear", "cosine"] = "constant"
    start: float = 1.0
    end: float = 0.95
    warmup_steps: int = 250
    decay_steps: int = 500

    def __post_init__(self) -> None:
        self.at(0)  # a bad field is a ConfigError now, not at the first step

    def at(self, step: int) -> float:
        return lambda_at(step, **dataclasses.asdict(self))


def lambda_extra(device: torch.device | str | None = None) -> TensorDict:
    """The initial ``extra`` of ``lambda_return_objective``: ``{"lambda_step": int64 [] = 0}``
    (``init_train_state(..., extra=lambda_extra(device))``)."""
    return TensorDict({LAMBDA_STEP: torch.zeros((), dtype=torch.int64, device=device)}, batch_size=[])


def lambda_return_objective(
    base: nn.Module,
    critic_spec: AdapterSpec | None,
    head_spec: ValueHeadSpec,
    *,
    lam_schedule: LambdaSchedule = LambdaSchedule(),
    gamma: float = 1.0,
    value_loss: LossKind = "mse",
    delta: float = 0.5,
    train: bool = True,
) -> Objective:
    """K = 2 (correct half, incorrect half): per-sequence λ-return losses (``R`` = 1 / 0),
    summed over the half's sequences with a response token and normalised by their number.

    train=True: ``prepare`` reads λ = ``lam_schedule.at(extra["lambda_step"])`` (a host read
    of one scalar per step, only for a non-constant schedule), gives it to every micro-batch
    as ``batch["lam"]`` and advances the counter; the initial ``extra`` is ``lambda_extra()``.
    train=False (validation): λ = 1, no dropout, no ``prepare``, any ``extra``."""
    values = value_model(base, critic_spec, head_spec)

    def count(batch: Batch) -> Tensor:
        pos, neg = _halves(batch)
        return torch.stack([(response_mask(h).sum(-1) > 0).sum() for h in (pos, neg)])

    def prepare(params: TensorDict, extra: TensorDict, micro_batches: Sequence[Batch], comm: Comm):
        if LAMBDA_STEP not in extra.keys():
            raise KeyError(f"lambda_return_objective needs extra[{LAMBDA_STEP!r}]; start the run with lambda_extra()")
        step = extra[LAMBDA_STEP]
        lam = lam_schedule.start if lam_schedule.schedule == "constant" else lam_schedule.at(int(step))
        new = TensorDict({LAMBDA_STEP: step + 1}, batch_size=[])
        return new, [{**mb, "lam": lam} for mb in micro_batches]

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: Tensor):
        lam = batch["lam"] if train else 1.0
        v_pos, m_pos, v_neg, m_neg = pair_values(values, params, batch, train=train)
        sums = []
        for v, m, reward in ((v_pos, m_pos, 1.0), (v_neg, m_neg, 0.0)):
            seq, valid = lambda_return_sequence_losses(v, m, reward, lam=lam, gamma=gamma, loss=value_loss, delta=delta)
            sums.append(torch.where(valid, seq, 0.0).sum())
        sums = torch.stack(sums)
        return weighted_sum(sums, scale), sums, _metrics(v_pos, m_pos, v_neg, m_neg)

    return Objective(count=count, loss=loss, prepare=prepare if train else None, means=METRIC_MEANS)


# ------------------------------------------------------------------------------------- AUC


def pair_scores(values: ValueFn, params: TensorDict, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(scores [2P], is_correct [2P] bool)``: the masked-mean value ``v̄`` of every sequence
    of a critic micro-batch (correct half first), without dropout or gradient."""
    with torch.no_grad():
        v_pos, m_pos, v_neg, m_neg = pair_values(values, params, batch, train=False)
    scores = torch.cat([masked_mean(v_pos, m_pos), masked_mean(v_neg, m_neg)])
    labels = torch.arange(scores.shape[0], device=scores.device) < v_pos.shape[0]
    return scores, labels


def critic_auc(values: ValueFn, params: TensorDict, batches: Sequence[Batch]) -> Tensor:
    """AUC of ``v̄`` separating correct from incorrect sequences over all ``batches`` (one
    process; ``[]`` fp64, ``nan`` without both classes). Not additive, so not a step metric."""
    scored = [pair_scores(values, params, b) for b in batches]
    if not scored:
        raise ValueError("critic_auc: no batches")
    return auc(torch.cat([s for s, _ in scored]), torch.cat([l for _, l in scored]))
