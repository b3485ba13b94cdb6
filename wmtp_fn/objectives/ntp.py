"""NTP objective: a `LlamaForCausalLM` base with `params[name]` bound, next-token cross-entropy."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters import AdapterSpec, apply
from wmtp_fn.losses.ntp import ntp_count, ntp_sums_from_hidden
from wmtp_fn.models.llama import HiddenStates, unembedding
from wmtp_fn.objectives import Batch, Objective, weighted_sum


def ntp_objective(
    base: nn.Module, spec: AdapterSpec, *, name: str = "lora", chunk_size: int = 4096, train: bool = True
) -> Objective:
    """K = 1: the NTP loss sum, computed from the hidden states with the chunked linear
    cross-entropy (no [B, T, V] logits), normalised by `ntp_count` (valid next-token targets).

    Batches: `input_ids [B, T]`, `labels [B, T]` (-100 = no loss), and an `attention_mask`
    only when they are not right-padded (see `models.llama.right_padded`). `train` turns the
    adapter's dropout on. No metrics beyond the step's own (its `loss` is the mean CE)."""
    lm_head = unembedding(base)
    trunk = HiddenStates(base)

    def loss(params: TensorDict, extra: TensorDict, batch: Batch, scale: torch.Tensor):
        hidden = apply(
            trunk, params[name], spec, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), train=train
        )
        total, _ = ntp_sums_from_hidden(hidden, lm_head, batch["labels"], chunk_size=chunk_size)
        sums = total.reshape(1)
        return weighted_sum(sums, scale), sums, {}

    return Objective(count=ntp_count, loss=loss)
