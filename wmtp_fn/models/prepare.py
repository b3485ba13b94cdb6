"""One function owns the order in which a loaded base is made ready to train.

    slots -> activation checkpointing -> compile -> (FSDP2 sharding, when distributed)

The order matters: checkpointing wraps a layer's forward and must re-bind the adapter tensors
for the recomputation, so it wraps the slotted layer; compilation must see the checkpointed
forward (it compiles the inner function); sharding comes last because it replaces parameters
with DTensors, which the fingerprint (taken at load) and slot installation must not see.
"""

from __future__ import annotations

from collections.abc import Sequence

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
) -> Base:
    """Install LoRA slots on `targets`, then the per-layer execution options, in place; returns
    the same record. `dynamic=True` compiles for dynamic shapes up front (real batches vary in
    length) instead of recompiling per shape until Dynamo's limit."""
    install_slots(base.module, targets)
    if activation_checkpointing:
        checkpoint_layers(base.module, every=checkpoint_every)
    if compile:
        compile_layers(base.module, fullgraph=True, dynamic=dynamic, memory_budget=memory_budget)
    # FSDP2: `dist.fsdp.shard(base)` goes here, after everything that reads full weights.
    return base
