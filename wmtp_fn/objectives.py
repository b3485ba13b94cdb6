"""Objectives: `loss_fn(params, batch) -> (sums [K], aux)` over a frozen base with adapters bound.

Each builder closes over the frozen base and the adapter's spec (static), and combines a model
call (`adapters.apply`) with a pure loss from `wmtp_fn.losses`. The train step pairs a
`loss_fn` with the matching `count_fn` (the normalisers, e.g. `losses.ntp.ntp_count`).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from wmtp_fn.adapters import AdapterSpec, apply
from wmtp_fn.losses.ntp import ntp_sums_from_hidden
from wmtp_fn.models.llama import HiddenStates


def ntp_objective(base: nn.Module, spec: AdapterSpec, *, name: str = "lora", chunk_size: int = 4096, train: bool = True):
    """NTP loss sum of a `LlamaForCausalLM` base with `params[name]` bound, computed from the
    hidden states with the chunked linear cross-entropy (no [B, T, V] logits). Batches carry
    an `attention_mask` only when they are not right-padded (see `models.llama.right_padded`)."""
    lm_head = base.lm_head.weight
    trunk = HiddenStates(base)

    def loss_fn(params: TensorDict, batch: dict[str, torch.Tensor]):
        hidden = apply(
            trunk, params[name], spec, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), train=train
        )
        total, _ = ntp_sums_from_hidden(hidden, lm_head, batch["labels"], chunk_size=chunk_size)
        return total.reshape(1), {}

    return loss_fn
