"""Rho-1 objective: the MTP objective on the tokens whose policy loss most exceeds a reference's.

Head ``k`` (1-based) at position ``t`` trains on its target ``labels[t+k]`` only if its excess
loss against the reference (a next-token model, whose prediction of that token is made at
``t+k−1``; ``losses.rho1``) is among the top ``⌈ratio·N_k⌉`` of the head's ``N_k`` valid
tokens in the scope. The selected NLLs are summed and, as in the plain MTP loss, normalised by
the head's **mask** count, so ``ratio = 1`` is the MTP objective and ``ratio = 0`` a finite 0.

The reference is by default the policy's own frozen MTP base with the reference adapter bound
(head 0 of an MTP base built from a Llama is that Llama: trunk + last layer + norm + unembedding,
so a ``ref_tuning`` adapter binds to it unchanged). It runs under no-grad, without dropout, and
its per-token NLL comes from the chunked CE on head 0's hidden states (no logits held).

Scopes (what the ``⌈ratio·N⌉`` is taken over):

- ``micro_batch``: one policy pass. Inside the sequential head loop, head ``k``'s per-token NLL
  (with its graph) is computed once; the selection reads its detached value and the head's loss
  is ``Σ_selected NLL`` on the same graph. Cost: the MTP step plus one no-grad reference forward.
- ``step``: the selection is over all micro-batches of the step and all ranks (``prepare``,
  ``select_exact(comm=…)``). The pre-pass runs the policy forward (every head, no grad) and the
  reference on every micro-batch, and stores per-head weights under ``WEIGHTS_KEY``; the loss is
  then ``objectives.mtp`` with those weights. Cost: one extra no-grad policy forward per
  micro-batch (≈ 1.33× the policy's compute, a forward + backward being ≈ 3 forwards) on top of
  the reference forward. The pre-pass runs the policy **without dropout** (the seeds used train
  mode): its dropout masks could not be those of the loss pass anyway, so the selection is a
  deterministic function of the params and the batch, and it draws nothing from the step's RNG.

Rules: ``exact`` (default, ``select_exact``: exactly ``⌈ratio·N⌉``, deterministic ties) or the
seeds' ``quantile`` (``select_quantile``: per micro-batch, over-selects under ties; micro-batch
scope only).

Metrics (additive sums, reported per ``means``; ``[H]`` unless marked ``[]``):
``ce`` unweighted CE per head (mean over valid targets); ``wce`` the trained loss per head
(``Σ_selected NLL / mask count``); ``selected_ce`` the CE of the selected tokens (``Σ_selected
NLL / selected count``, the loss normalised by the selected count); ``selected``, ``valid``
(counts); ``ratio`` (``selected / valid``); ``threshold`` (the smallest selected excess, averaged
over the micro-batches in which the head selected a token, counted by ``threshold_count``);
``excess`` (mean excess over valid tokens); ``selected_excess`` (mean over selected);
``overall_ratio`` ``[]`` (``Σ_k selected / Σ_k valid``, denominator ``valid_total``);
``selected_loss`` ``[]`` (``Σ_k Σ_selected NLL / Σ_k selected``, pooled over heads, denominator
``selected_total``). The step's ``loss`` is the mask-normalised loss. Validation uses the same
objective built with ``train=False`` under ``train.evaluate``: ``loss`` (mask count),
``selected_ce`` / ``selected_loss`` (selected count) and ``ce`` (unweighted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from wmtp_fn.adapters import AdapterSpec, bound
from wmtp_fn.dist.comm import Comm
from wmtp_fn.losses.mtp import head_token_nll, mtp_count
from wmtp_fn.losses.rho1 import (
    MODES,
    Mode,
    align_reference_nll,
    excess_loss,
    rho1_weights,
    select_exact,
    selected_count,
    selection_stats,
)
from wmtp_fn.models.llama import HiddenStates
from wmtp_fn.models.mtp import MTPLlama
from wmtp_fn.objectives import COUNT, Batch, Objective
from wmtp_fn.objectives.mtp import mtp_objective
from wmtp_fn.objectives.detached import backward_through_detached

WEIGHTS_KEY = "rho1_weights"
"""Step scope: ``prepare`` stores each micro-batch's per-head weights ``[B, T, H]`` (binary,
source-indexed) under this key; the MTP objective reads them."""
STATS_KEY = "rho1_stats"
"""Step scope: ``prepare`` stores each micro-batch's ``losses.rho1.selection_stats`` (a dict of
``[H]`` sums) under this key, for the loss's metrics."""

MEANS = {
    "ce": COUNT,
    "wce": COUNT,
    "selected_ce": "selected",
    "ratio": "valid",
    "threshold": "threshold_count",
    "excess": "valid",
    "selected_excess": "selected",
    "overall_ratio": "valid_total",
    "selected_loss": "selected_total",
}

Scope = Literal["micro_batch", "step"]
Rule = Literal["exact", "quantile"]
ReferenceNLL = Callable[[Batch], Tensor]


@dataclass(frozen=True)
class Reference:
    """The Rho-1 reference: a next-token model evaluated under no-grad and without dropout.

    adapter, spec: the reference adapter (e.g. a ``ref_tuning`` output) bound for the call, or
        both ``None`` for the bare base.
    model: ``None`` (default) for the policy's own MTP base — head 0 is the reference, and no
        second copy of any parameter exists; or a separate base (a HF Llama causal LM, or an MTP
        base whose head 0 is used) with the same vocabulary, the adapter rooted at it.
    """

    adapter: TensorDict | None = None
    spec: AdapterSpec | None = None
    model: nn.Module | None = None

    def __post_init__(self) -> None:
        if (self.adapter is None) != (self.spec is None):
            raise ValueError("rho1 Reference: give both adapter and spec, or neither (the bare base)")


def _vocab_size(model: nn.Module, what: str) -> int:
    head = getattr(model, "lm_head", None)
    if not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"rho1 {what}: {type(model).__name__} has no lm_head; the reference must be a causal LM")
    return head.weight.shape[0]


def reference_nll_fn(base: MTPLlama, reference: Reference, *, chunk_size: int = 4096) -> ReferenceNLL:
    """``batch -> ref_nll [B, T]``: the reference's next-token NLL (``ref_nll[:, s]`` its loss on
    ``labels[:, s+1]``, 0 where that target is invalid), under no-grad, from the chunked CE.

    base: the policy's MTP base (the reference when ``reference.model`` is ``None``). A separate
    reference model must have the policy's vocabulary size (checked here, once).
    """
    model = base if reference.model is None else reference.model
    if model is not base:
        ref_vocab, policy_vocab = _vocab_size(model, "reference"), _vocab_size(base, "policy base")
        if ref_vocab != policy_vocab:
            raise ValueError(
                f"rho1 reference: the reference model has a vocabulary of {ref_vocab} tokens, the policy "
                f"base {policy_vocab}; the two must share one tokenizer"
            )
    if isinstance(model, MTPLlama):

        def hidden(ids: Tensor, mask: Tensor | None) -> Tensor:
            return model.head_hidden(model.trunk(ids, mask), 0)

    else:
        hidden = HiddenStates(model)  # raises for a model that is not a HF Llama
    unembedding = model.lm_head.weight

    @torch.no_grad()
    def ref_nll(batch: Batch) -> Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if reference.adapter is None:
            h = hidden(ids, mask)
        else:
            with bound(model, reference.adapter, reference.spec, train=False):
                h = hidden(ids, mask)
        nll, _ = head_token_nll(h, unembedding, batch["labels"], 1, attention_mask=mask, chunk_size=chunk_size)
        return nll

    return ref_nll


def rho1_objective(
    base: MTPLlama,
    spec: AdapterSpec,
    *,
    reference: Reference,
    name: str = "policy",
    ratio: float = 0.7,
    mode: Mode = "signed",
    scope: Scope = "micro_batch",
    rule: Rule = "exact",
    chunk_size: int = 4096,
    train: bool = True,
) -> Objective:
    """K = H components, one per head: the head's selected NLL sum, normalised by its mask count
    (module docstring).

    base: the frozen MTP base with slots; spec: the policy adapter's spec, bound from
    ``params[name]`` (dropout on when ``train``). reference: see ``Reference``.
    ratio: the selected fraction ``k`` in ``[0, 1]`` (production 0.7); mode: ``signed``,
    ``absolute`` or ``difficult``; scope: ``micro_batch`` or ``step``; rule: ``exact`` or
    ``quantile`` (micro-batch scope only).

    Batches: ``input_ids [B, T]``, ``labels [B, T]`` and an optional ``attention_mask``; in the
    step scope ``prepare`` adds ``WEIGHTS_KEY`` and ``STATS_KEY``. Metrics: ``MEANS``.
    """
    selected_count(torch.zeros(1, dtype=torch.int64), ratio)  # a clear error for a bad ratio, now
    if mode not in MODES:
        raise ValueError(f"rho1 mode must be one of {MODES}, got {mode!r}")
    if rule not in ("exact", "quantile"):
        raise ValueError(f"rho1 selection rule must be 'exact' or 'quantile', got {rule!r}")
    if scope not in ("micro_batch", "step"):
        raise ValueError(f"rho1 scope must be 'micro_batch' or 'step', got {scope!r}")
    if scope == "step" and rule == "quantile":
        raise ValueError("rho1: the seeds' quantile rule is per micro-batch; use scope='micro_batch' with rule='quantile'")
    ref_nll = reference_nll_fn(base, reference, chunk_size=chunk_size)
    if scope == "micro_batch":
        return _micro_batch_objective(base, spec, ref_nll, name, ratio, mode, rule, chunk_size, train)
    return _step_objective(base, spec, ref_nll, name, ratio, mode, chunk_size, train)


def _metrics(weighted: Tensor, plain: Tensor, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """The objective's additive metric sums from one micro-batch: weighted (selected NLL) and
    plain (all valid NLL) sums ``[H]`` of the loss pass, and ``selection_stats``."""
    selected, valid = stats["selected"], stats["valid"]
    return {
        "ce": plain,
        "wce": weighted,
        "selected_ce": weighted,
        "selected": selected,
        "valid": valid,
        "ratio": selected,
        "threshold": stats["threshold_sum"],
        "threshold_count": stats["threshold_count"],
        "excess": stats["excess_sum"],
        "selected_excess": stats["selected_excess_sum"],
        "overall_ratio": selected.sum(),
        "valid_total": valid.sum(),
        "selected_loss": weighted.sum(),
        "selected_total": selected.sum(),
    }


def _micro_batch_objective(
    base: MTPLlama, spec: AdapterSpec, ref_nll: ReferenceNLL, name: str, ratio: float, mode: Mode, rule: Rule,
    chunk_size: int, train: bool,
) -> Objective:
    """One policy pass: each head selects on its own (detached) NLL, then backpropagates the
    selected sum on the same graph."""
    n_future = base.n_future
    unembedding = base.lm_head.weight

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: Tensor):
        labels, mask = batch["labels"], batch.get("attention_mask")
        ref = align_reference_nll(ref_nll(batch), n_future)  # [B, T, H], no grad; before the policy binding
        weighted, plain, stats = [], [], []

        def head(k: int):
            def run(z: Tensor) -> Tensor:
                h = base.head_hidden(trunk, k, z=z)
                nll, valid = head_token_nll(h, unembedding, labels, k + 1, attention_mask=mask, chunk_size=chunk_size)
                # Heads select independently, so this head alone is the whole selection: [B, T, 1].
                nll_k, ref_k, valid_k = nll[..., None], ref[..., k : k + 1], valid[..., None]
                w, threshold, excess = rho1_weights(nll_k, ref_k, valid_k, ratio=ratio, mode=mode, rule=rule)
                w_sum = (nll * w[..., 0]).sum()  # nll and w are 0 off the mask
                weighted.append(w_sum.detach())
                plain.append(nll.detach().sum())
                stats.append(selection_stats(w, valid_k, excess, nll_k, threshold))
                return w_sum * scale[k].to(w_sum.device)

            return run

        with bound(base, params[name], spec, train=train):
            trunk = base.trunk(batch["input_ids"], mask)
            objective, _ = backward_through_detached(trunk.hidden, [head(k) for k in range(n_future)])
        sums = torch.stack(weighted)
        per_head = {key: torch.cat([s[key] for s in stats]) for key in stats[0]}
        return objective, sums, _metrics(sums, torch.stack(plain), per_head)

    return Objective(count=lambda batch: mtp_count(batch, n_future=n_future), loss=loss, means=MEANS)


def _step_objective(
    base: MTPLlama, spec: AdapterSpec, ref_nll: ReferenceNLL, name: str, ratio: float, mode: Mode,
    chunk_size: int, train: bool,
) -> Objective:
    """A no-grad pre-pass selects over the whole step (all micro-batches, all ranks); the loss is
    the MTP objective with the selection as per-head weights."""
    n_future = base.n_future
    unembedding = base.lm_head.weight
    mtp = mtp_objective(base, spec, name=name, chunk_size=chunk_size, train=train, weights_key=WEIGHTS_KEY)

    def policy_nll(adapter: TensorDict, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(nll, valid) [B, T, H]`` of every head, without dropout."""
        labels, mask = batch["labels"], batch.get("attention_mask")
        with bound(base, adapter, spec, train=False):
            trunk = base.trunk(batch["input_ids"], mask)
            heads = [
                head_token_nll(
                    base.head_hidden(trunk, k), unembedding, labels, k + 1, attention_mask=mask, chunk_size=chunk_size
                )
                for k in range(n_future)
            ]
        return torch.stack([n for n, _ in heads], dim=-1), torch.stack([v for _, v in heads], dim=-1)

    def prepare(params: TensorDict, extra: TensorDict, micro_batches: Sequence[Batch], comm: Comm):
        nlls, valids, excesses = [], [], []
        for batch in micro_batches:
            nll, valid = policy_nll(params[name], batch)
            nlls.append(nll)
            valids.append(valid)
            excesses.append(excess_loss(nll, align_reference_nll(ref_nll(batch), n_future), mode))
        weights, threshold = select_exact(excesses, valids, ratio, comm=comm)
        prepared = [
            {**batch, WEIGHTS_KEY: w, STATS_KEY: selection_stats(w, v, e, n, threshold)}
            for batch, w, v, e, n in zip(micro_batches, weights, valids, excesses, nlls)
        ]
        return extra, prepared

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: Tensor):
        if WEIGHTS_KEY not in batch or STATS_KEY not in batch:
            raise KeyError(
                f"rho1 (step scope): the micro-batch has no {WEIGHTS_KEY!r}/{STATS_KEY!r}; objective.prepare "
                "must run first (train.step and train.evaluate run it)"
            )
        objective, sums, m = mtp.loss(params, extra, batch, scale)
        return objective, sums, _metrics(sums, m["ce"], batch[STATS_KEY])

    return Objective(count=mtp.count, loss=loss, prepare=prepare, means=MEANS)
