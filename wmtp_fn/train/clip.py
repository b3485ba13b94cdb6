"""Global-norm gradient clipping without a host synchronisation.

Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (norm of the per-leaf 2-norms,
``coef = max_norm / (norm + 1e-6)`` clamped to 1, multiply in place), but the norm and the
coefficient stay on the device: no ``.item()``, no Python branch on a tensor value. A
non-finite norm therefore propagates into the gradients instead of raising; the optimizer's
skip flag is what guards the update (see ``adamw.update``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.train.tree import leaf_items


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` taken together: ``[]`` fp32 on the first tensor's device.

    ``torch._foreach_norm`` groups by device/dtype and computes every per-leaf norm in one
    launch per group; the final norm-of-norms is one small reduction.
    """
    if len(tensors) == 0:
        raise ValueError("global_norm of an empty list")
    device = tensors[0].device
    norms = torch._foreach_norm(list(tensors), 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))


def clip_tensors_(tensors: Sequence[Tensor], max_norm: float | None) -> Tensor:
    """Scale ``tensors`` in place so their global 2-norm is at most ``max_norm``; returns the norm
    before clipping (``[]`` fp32). ``max_norm`` None or 0 only measures the norm."""
    norm = global_norm(tensors)
    if max_norm:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for device, ts in by_device.items():
            torch._foreach_mul_(ts, coef.to(device, non_blocking=True))
    return norm


def clip_by_global_norm(grads: TensorDict, max_norm: float | None) -> tuple[TensorDict, Tensor]:
    """Clip the gradient pytree ``grads`` **in place** to global 2-norm ``max_norm``.

    Returns ``(grads, norm)`` where ``grads`` is the same (now clipped) TensorDict and ``norm``
    the pre-clip global norm, ``[]`` fp32, still on the device. ``max_norm`` None or 0 disables
    clipping (the norm is still returned).
    """
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"max_norm must be None or >= 0, got {max_norm!r}")
    norm = clip_tensors_(leaf_items(grads)[1], max_norm)
    return grads, norm
