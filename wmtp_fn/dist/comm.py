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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
