"""The one seam between the numerical core and the process group.

The train step, ``evaluate`` and the objectives' ``prepare`` reduce everything that must be
global through a ``Comm``: the per-component normalisers (before any forward), the one flat
gradient, the metric sums, running statistics and step-wide selections. Nothing else in the
core knows whether it runs on one process or many.

A ``Comm`` is anything with ``rank``, ``world_size`` and ``sum_(tensor) -> tensor`` (an
in-place all-reduce sum that returns its argument). Every rank must call ``sum_`` the same
number of times, in the same order, with tensors of the same shape and dtype — as with any
collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed
from torch import Tensor


@runtime_checkable
class Comm(Protocol):
    rank: int
    world_size: int

    def sum_(self, tensor: Tensor) -> Tensor:
        """Replace ``tensor`` in place by its sum over all ranks; return it."""
        ...


@dataclass(frozen=True)
class LocalComm:
    """One process: the sum over ranks is the tensor itself."""

    rank: int = 0
    world_size: int = 1

    def sum_(self, tensor: Tensor) -> Tensor:
        return tensor


LOCAL = LocalComm()


@dataclass(frozen=True)
class GroupComm:
    """One rank of the initialised default `torch.distributed` process group: `sum_` is an
    all-reduce (SUM). Works on any backend the tensors suit: gloo with CPU tensors, NCCL with
    CUDA ones."""

    rank: int
    world_size: int

    def sum_(self, tensor: Tensor) -> Tensor:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def launched() -> bool:
    """Whether this process was started by `torchrun` (or another launcher that sets the
    `WORLD_SIZE`/`RANK` environment of `torch.distributed`'s env:// rendezvous)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def process_comm(device: torch.device) -> tuple[Comm, torch.device]:
    """The run's `Comm` and the device this rank computes on.

    Not launched by torchrun: `(LOCAL, device)`, nothing is initialised. Launched: the default
    process group is initialised once (NCCL for a CUDA `device`, gloo otherwise) and a CUDA
    device becomes `cuda:LOCAL_RANK` (set as the current device), so every rank has its own
    GPU. A world of one is still a process group: the FSDP2 path runs with one rank."""
    if not launched():
        return LOCAL, device
    dist = torch.distributed
    device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), device_id=device if cuda else None)
    return GroupComm(dist.get_rank(), dist.get_world_size()), device


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the rank with `local_rank` on its host: `cuda:<local_rank>` for any CUDA
    `device` (one GPU per rank), else `device` itself."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def backend_for(device: torch.device) -> str:
    """The process-group backend for tensors on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def shutdown() -> None:
    """Destroy the default process group if this process initialised one (the entry point's
    last act; a no-op for a local run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(comm: Comm, device: torch.device | str = "cpu") -> None:
    """Wait until every rank got here: a one-element sum (through the seam, so a `LocalComm`
    returns at once). `device`: where the backend reduces (a CUDA device under NCCL)."""
    if comm.world_size > 1:
        comm.sum_(torch.zeros(1, device=device))


def gathered(value: Tensor, comm: Comm) -> Tensor:
    """Every rank's `value` (an int64 `[]` tensor), `[world_size]` in rank order: a one-hot
    sum, so it needs nothing but `sum_`."""
    table = torch.zeros(comm.world_size, dtype=torch.int64, device=value.device)
    table[comm.rank] = value
    return comm.sum_(table)


def tensor_hash(tensors: Sequence[Tensor]) -> Tensor:
    """An int64 `[]` hash of the exact bits of `tensors` (any float dtypes, one device),
    computed on the device: each tensor's bytes read as int32 (or int16 / uint8 for narrower
    dtypes) words, weighted by a fixed odd multiplier per position and summed with int64
    wrap-around, then mixed in order. Equal bits give equal hashes on every rank; a change in
    any one bit changes it (each word's weight is odd, so a word's change is never a multiple
    of 2**64). Not cryptographic: it guards against ranks drifting apart, not adversaries."""
    device = tensors[0].device if tensors else torch.device("cpu")
    h = torch.zeros((), dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        flat = t.detach().contiguous().reshape(-1)
        words = flat.view(_WORDS.get(flat.element_size(), torch.int32)).to(torch.int64)
        weights = torch.arange(words.numel(), dtype=torch.int64, device=device) * (2 * _MULTIPLIER) + 1
        h = h * _MIX + (words * weights).sum() + i
    return h


_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}  # 8-byte dtypes: two int32 words each
_MULTIPLIER = 0x9E3779B1  # Knuth's golden-ratio multiplier
_MIX = 1_000_003


def check_replicated(tensors: Sequence[Tensor], comm: Comm, *, what: str = "params") -> None:
    """Raise `RuntimeError` unless every rank holds bit-identical `tensors` (compared by
    `tensor_hash`; one `[world_size]` int64 collective and one host sync)."""
    if comm.world_size == 1:
        return
    hashes = gathered(tensor_hash(tensors), comm).cpu()
    if not bool((hashes == hashes[0]).all()):
        differ = [r for r in range(comm.world_size) if hashes[r] != hashes[0]]
        raise RuntimeError(
            f"the {what} differ across ranks (rank(s) {differ} disagree with rank 0); every rank must "
            "apply the same update: was a rank given another checkpoint, seed or batch?"
        )


def replicas_checked(step_fn: Callable, comm: Comm, every: int) -> Callable:
    """`step_fn(state, micro_batches) -> (state, metrics)` that, after every `every`-th step
    (by `state.step`), checks that all ranks hold bit-identical `state.params`
    (`check_replicated`); `every = 0` or a world of one: `step_fn` itself."""
    if every < 0:
        raise ValueError(f"dist.check_every must be >= 0, got {every}")
    if every == 0 or comm.world_size == 1:
        return step_fn

    def step(state, micro_batches):
        state, metrics = step_fn(state, micro_batches)
        if state.step % every == 0:
            check_replicated(list(state.params.values(include_nested=True, leaves_only=True)), comm,
                             what=f"trainable params after step {state.step}")
        return state, metrics

    return step
