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

import torch
from torch import nn

from wmtp_fn.adapters.nf4 import check_quant_type, quantize_linears
from wmtp_fn.adapters.slots import install_slots
from wmtp_fn.dist.shard import check_mode, fsdp_shard
from wmtp_fn.errors import ConfigError
from wmtp_fn.models.base import Base
from wmtp_fn.models.layers import checkpoint_layers, compile_layers, decoder_layers


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
    shard: str | None = None,
    reshard_after_forward: bool = True,
) -> Base:
    """Install LoRA slots on `targets`, then the per-layer execution options, in place; returns
    the same record. `dynamic=True` compiles for dynamic shapes up front (real batches vary in
    length) instead of recompiling per shape until Dynamo's limit.

    quantize: `"nf4"` first stores all seven linears of every layer in NF4 (QLoRA,
    docs/qlora.md) and returns a record whose fingerprint is the full-precision one plus
    `quant: "nf4"` (informational, like `dtype`: adapters move between the two bases).
    shard: None (one process, or a caller that shards nothing), `"full"` (FSDP2 over the
    default process group, `shard_units`) or `"replicate"` (every rank keeps the whole base).
    An NF4 base cannot be sharded (its 4-bit tensors are buffers, which FSDP2 leaves whole)."""
    if check_quant_type(quantize):
        if shard is not None and check_mode(shard) == "full":
            raise ConfigError("base.quantize='nf4' cannot be combined with dist.shard='full' (FSDP2 does not shard "
                              "the 4-bit buffers); use dist.shard='replicate'")
        quantize_linears(base.module, quantize=quantize)
        base = dataclasses.replace(base, fingerprint={**base.fingerprint, "quant": quantize})
    install_slots(base.module, targets)
    if activation_checkpointing:
        checkpoint_layers(base.module, every=checkpoint_every)
    if compile:
        compile_layers(base.module, fullgraph=True, dynamic=dynamic, memory_budget=memory_budget)
    if shard is not None and check_mode(shard) == "full":
        module = base.module
        device = next(module.parameters()).device
        fsdp_shard(module, shard_units(module), device=device, ignored=replicated_params(module),
                   reshard_after_forward=reshard_after_forward)
    return base


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of a Llama or MTP base, in forward order: the embedding, every decoder
    layer (the trunk, head 0, the MTP extra heads), the final norm — each a module the forward
    pieces (`models.llama`) call, so its hooks run."""
    inner = getattr(module, "model", module)
    return [inner.embed_tokens, *decoder_layers(module), inner.norm]


def replicated_params(module: nn.Module) -> list[torch.nn.Parameter]:
    """What stays out of the sharding: the unembedding weight, which the chunked cross-entropy
    reads directly, outside any forward (none for a bare `LlamaModel`)."""
    head = getattr(module, "lm_head", None)
    return [] if head is None else [head.weight]
