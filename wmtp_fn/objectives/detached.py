"""Backward through branches that share a trunk output, one branch at a time.

An MTP step has one trunk and `H` heads that all read its output `z`. Backpropagating the sum
of the heads' losses in one go keeps every head's activations (and, naively, `[B, T, H, V]`
logits) alive at once. Instead each head runs on a detached copy of `z`, is backpropagated
immediately (its graph freed, its adapter gradients accumulated), and the cotangents it sends
to `z` are summed; the trunk is then backpropagated once from `z` with that cotangent. The
gradients are exactly those of `Σ_k objective_k(z)`, and peak memory holds the trunk plus one
head, whatever `H` is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def backward_through_detached(z: Tensor, branches: Sequence[Callable[[Tensor], Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Evaluate `branch(z)` for each branch (a scalar objective), backpropagating each into the
    parameters it reads as it goes.

    Returns `(trunk_objective, values)`: `trunk_objective.backward()` finishes the job (the trunk's
    gradients, with the summed cotangent of the branches); `values` are the branches' detached
    scalars. Without grad mode (or when `z` needs no grad) the branches run on `z` as is and
    `trunk_objective` is their sum.
    """
    if not torch.is_grad_enabled():
        values = [branch(z).detach() for branch in branches]
        return torch.stack(values).sum(), values
    leaf = z.detach().requires_grad_(z.requires_grad)
    values = []
    for branch in branches:
        value = branch(leaf)
        if value.requires_grad:
            # retain_graph: the branches share the part of the graph that casts and scales the
            # bound adapter (bound once for the whole block), which must survive for the next
            # branch; this branch's own activations are still freed as soon as `value` is
            # dropped, since nothing else refers to them. leaf.grad accumulates across branches.
            value.backward(retain_graph=True)
        values.append(value.detach())
    if not z.requires_grad or leaf.grad is None:
        return torch.zeros((), device=z.device, dtype=torch.float32, requires_grad=False), values
    # d/dθ <z(θ), g> = (dz/dθ)ᵀ g: the trunk's backward with the heads' summed cotangent.
    return (z * leaf.grad.to(z.dtype)).sum(), values
