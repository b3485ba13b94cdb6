"""One function owns the order in which a loaded base is made ready to train.

    (quantise) -> slots -> activation checkpointing -> compile -> (FSDP2 sharding, when distributed)

The order matters: quantisation (QLoRA, `adapters.nf4`) replaces the target linears by NF4
slots, after the fingerprint (taken at load from the full-precision weights) and before
anything wraps the layers; checkpointing wraps a layer's forward and must re-bind the adapter tensors
for the recomputation, so it wraps the slotted layer; compilation must see the checkpointed
forward (it compiles the inner function); sharding comes last because it replaces parameters
with DTensors, which the fingerprint (taken at load) and slot installation must not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from wmtp_fn.adapters.nf4 import check_quant_type, quantize_linears
from wmtp_fn.adapters.slots import install_slots
from wmtp_fn.models.base import Base
from wmtp_fn.models.layers import checkpoint_layers, compile_layers


def prepare(
    base: Base,
    *,
    targets: Sequence[str] | str = "all",
    activation_checkpointing: bool = False,
    checkpoint_every: int = 1,
    compile: bool = False,
    memory_budget: float | None = None,
    dynamic: bool = True,
    quantize: str = "",
) -> Base:
    """Install LoRA slots on `targets`, then the per-layer execution options, in place; returns
    the same record. `quantize="nf4"` first stores all seven linears of every layer in NF4
    (QLoRA, docs/qlora.md) and returns a record whose fingerprint is the full-precision one
    plus `quant: "nf4"` (informational, like `dtype`: adapters move between the two bases). `dynamic=True` compiles for dynamic shapes up front (real batches vary in
    length) instead of recompiling per shape until Dynamo's limit."""
    if check_quant_type(quantize):
        quantize_linears(base.module, quantize=quantize)
        base = dataclasses.replace(base, fingerprint={**base.fingerprint, "quant": quantize})
    install_slots(base.module, targets)
    if activation_checkpointing:
        checkpoint_layers(base.module, every=checkpoint_every)
    if compile:
        compile_layers(base.module, fullgraph=True, dynamic=dynamic, memory_budget=memory_budget)
    # FSDP2: `dist.fsdp.shard(base)` goes here, after everything that reads full weights.
    return base
