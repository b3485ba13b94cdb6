"""MTP objective: an MTP base with `params[name]` bound, the heads trained one at a time.

The trunk runs once; each head runs on a detached copy of its output, computes its CE from
hidden states with the chunked CE (no `[B, T, H, V]` logits), and is backpropagated at once
with its scale (`objectives.detached`); the returned objective backpropagates the trunk once with the
summed cotangent. Peak memory holds the trunk and one head, whatever `n_future` is.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from wmtp_fn.adapters import AdapterSpec, bound
from wmtp_fn.losses.mtp import head_ce_sums, mtp_count
from wmtp_fn.models.llama import unembedding
from wmtp_fn.models.mtp import MTPLlama
from wmtp_fn.objectives import COUNT, Batch, Objective
from wmtp_fn.objectives.detached import backward_through_detached


def mtp_objective(
    base: MTPLlama,
    spec: AdapterSpec,
    *,
    name: str = "policy",
    chunk_size: int = 4096,
    train: bool = True,
    weights_key: str | None = None,
) -> Objective:
    """K = H components, one per head: head k's (weighted) CE sum, normalised by its mask count.

    Batches: `input_ids [B, T]`, `labels [B, T]`, an optional `attention_mask`, and with
    `weights_key` the token weights under that key (position weights `[B, T]`, target-indexed,
    or per-head weights `[B, T, H]`, source-indexed; see `losses.mtp`), e.g. put there by a
    verifiable or Rho-1 `prepare`. Metrics per head `[H]`: `ce` (unweighted CE) and `wce` (the
    weighted CE the loss trains on), both means over the head's valid targets.
    """
    n_future = base.n_future
    unembedding_weight = unembedding(base)

    def count(batch: Batch) -> torch.Tensor:
        return mtp_count(batch, n_future=n_future)

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: torch.Tensor):
        labels, mask = batch["labels"], batch.get("attention_mask")
        weights = batch[weights_key] if weights_key else None
        weighted, plain = [], []

        def head(k: int):
            def run(z: torch.Tensor) -> torch.Tensor:
                h = base.head_hidden(trunk, k, z=z)
                w_sum, u_sum = head_ce_sums(
                    h, unembedding_weight, labels, k + 1, attention_mask=mask, weights=weights, chunk_size=chunk_size
                )
                weighted.append(w_sum.detach())
                plain.append(u_sum.detach())
                return w_sum * scale[k].to(w_sum.device)

            return run

        with bound(base, params[name], spec, train=train):
            trunk = base.trunk(batch["input_ids"], mask)
            objective, _ = backward_through_detached(trunk.hidden, [head(k) for k in range(n_future)])
        sums = torch.stack(weighted)
        return objective, sums, {"ce": torch.stack(plain), "wce": sums}

    return Objective(count=count, loss=loss, means={"ce": COUNT, "wce": COUNT})
