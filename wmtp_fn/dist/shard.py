"""FSDP2 sharding of the frozen base (`torch.distributed.fsdp.fully_shard`).

What is sharded: each unit `models.prepare` hands over (every decoder layer, the MTP heads,
the embedding and the final norm), each its own FSDP2 group, then the root, which holds the
rest. What is not: the trainable pytree (adapters, value head) is no module parameter at all —
it lives in the train state and is bound into the slots by `functional_call` for a call — and
the unembedding weight (`ignored`), which the chunked cross-entropy reads directly, outside
any module's forward; it stays a plain, replicated tensor (with tied embeddings the
embedding is that same tensor and stays replicated too).

How the forward sees full weights: FSDP2's pre-forward hook of a unit all-gathers its
parameters and swaps the plain tensors in (the slots' `weight` included), its post-forward
hook swaps the shards back (`reshard_after_forward`), and the backward all-gathers again
before it needs them. The forward pieces call each unit as a module, never reaching into a
sharded unit's parameters, so the hooks always run. `functional_call` of the adapter leaves
swaps only the slots' `lora_*` buffers, not the base parameters FSDP manages.

The root's forward is never called (the objectives run the units themselves), so the root is
lazily initialised here, once every unit is sharded: the root then owns the shared state and
each unit runs as its own forward "iteration root" (as FSDP2 does for chunked losses).

`mode="replicate"`: nothing is sharded (every rank holds the whole base; only the gradient
all-reduce is distributed) — for small bases, where all-gathers cost more than the memory saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

MODES = ("full", "replicate")


def check_mode(mode: str, *, key: str = "dist.shard") -> str:
    if mode not in MODES:
        raise ValueError(f"{key} is {mode!r}; expected one of {MODES}")
    return mode


def fsdp_shard(
    root: nn.Module,
    units: Sequence[nn.Module],
    *,
    device: torch.device,
    ignored: Iterable[nn.Parameter] = (),
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """`fully_shard` each of `units`, then `root`, over a 1-D mesh of every rank of the default
    process group (on `device`'s type: "cpu" with gloo, "cuda" with NCCL); `ignored`
    parameters stay plain and replicated. Mixed precision: parameters are all-gathered in
    `param_dtype` (None: their own dtype, the run's compute dtype), reductions in fp32 (there
    are none for a frozen base, but the policy is explicit). Returns `root`, sharded in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    ignored = set(ignored)
    for unit in units:
        if any(p in ignored for p in unit.parameters()):
            continue  # a unit sharing an ignored tensor (tied embeddings) stays replicated
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    root._get_fsdp_state()._lazy_init()  # see the module docstring: the root's own forward never runs
    return root


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a sharded FSDP2 parameter outside its unit's forward)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a sharded parameter all-gathered into a new plain tensor (a collective:
    every rank must call it), anything else as it is. What reads base weights outside a
    forward (DoRA's initial magnitudes, a merged export) reads through this."""
    return t.full_tensor() if is_sharded(t) else t
