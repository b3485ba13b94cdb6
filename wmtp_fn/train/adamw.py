"""Functional AdamW over TensorDict pytrees, running on PyTorch's fused / foreach kernels.

optax-style: ``init(params, cfg) -> AdamWState`` and
``update(grads, state, params, *, lr, cfg) -> (params, state, stats)``. The state is plain data:
one TensorDict ``{"mu", "nu", "count"}`` whose three subtrees have exactly the structure of
``params``, so a checkpoint is the state (``train.state.flatten_state`` walks it like any tree).

Donation (as in JAX): ``update`` works **in place** on the buffers it is given — ``params``,
the moments and counts in ``state``, and ``grads`` (clipped in place, and zeroed on a skipped
foreach step) — and returns the same objects. Do not reuse the inputs expecting old values;
clone first if you need them.

Leaves are grouped by (learning-rate multiplier, weight decay on/off, device, dtype); each
group is one kernel call, never a Python loop doing arithmetic per leaf.

Non-finite steps are skipped **on the device**, without a host sync: a 0/1 ``found_inf``
tensor (non-finite global grad norm, or the caller's ``skip`` flag) goes to the fused kernel,
which leaves params and moments untouched when it is 1; the counts are incremented before the
call and decremented by ``found_inf`` after it, exactly as ``torch.optim.adamw`` does for
``GradScaler``. The foreach path reaches the same result arithmetically (see ``_foreach_adamw_``).
A skipped step therefore does not advance a leaf's count, so Adam's bias correction counts
applied updates, not train steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

import torch
from tensordict import TensorDict
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from wmtp_fn.train.clip import clip_tensors_
from functools import lru_cache

from wmtp_fn.train.tree import Key, aligned_leaves, leaf_items, leaf_keys, leaves

_IMPLS = ("auto", "fused", "foreach")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AdamWConfig:
    """Hyper-parameters of AdamW (decoupled weight decay, Loshchilov & Hutter).

    lr: the base learning rate; the schedule scales it and ``update`` receives the result.
    lr_multipliers: leaf-name pattern -> multiplier of the learning rate (LoRA+:
        ``{"lora_B": 16.0}``). A pattern is an ``fnmatch`` pattern matched against the leaf's
        own name (``"lora_B"``) or its dotted path (``"value_head.*"``). A leaf matched by
        patterns with different multipliers is an error; unmatched leaves get 1.
    no_decay: leaf-name patterns (same matching) excluded from weight decay.
    max_grad_norm: clip the global gradient 2-norm to this; None or 0 turns clipping off.
    impl: ``"fused"`` (``torch._fused_adamw_``), ``"foreach"`` (``torch._foreach_*``), or
        ``"auto"`` (fused wherever PyTorch has the kernel for the device and dtype).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    no_decay: tuple[str, ...] = ("lora_magnitude", "bias")
    max_grad_norm: float | None = None
    impl: Literal["auto", "fused", "foreach"] = "auto"

    def __post_init__(self) -> None:
        if not (self.lr >= 0.0):
            raise ValueError(f"AdamWConfig.lr must be >= 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamWConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (self.eps > 0.0):
            raise ValueError(f"AdamWConfig.eps must be > 0, got {self.eps!r}")
        if not (self.weight_decay >= 0.0):
            raise ValueError(f"AdamWConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        for pat, mult in self.lr_multipliers.items():
            if not isinstance(pat, str) or not (mult > 0.0):
                raise ValueError(f"AdamWConfig.lr_multipliers needs str -> float > 0, got {pat!r}: {mult!r}")
        if isinstance(self.no_decay, str) or not all(isinstance(p, str) for p in self.no_decay):
            # ("bias") is a str, not a tuple: iterating it would match single letters.
            raise ValueError(f"AdamWConfig.no_decay must be a tuple of str, got {self.no_decay!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0.0):
            raise ValueError(f"AdamWConfig.max_grad_norm must be None or >= 0, got {self.max_grad_norm!r}")
        if self.impl not in _IMPLS:
            raise ValueError(f"AdamWConfig.impl must be one of {_IMPLS}, got {self.impl!r}")


AdamWState = TensorDict
"""Optimizer state: a TensorDict with three subtrees, each with exactly the structure of ``params``.

``"mu"``: first moments (same shape/dtype/device as each param).
``"nu"``: second moments (same).
``"count"``: per-leaf number of applied updates, ``[]`` float32 on the leaf's device (the
    layout the fused kernel reads; float32 counts are exact up to 2**24 steps).
"""
_STATE_KEYS = ("mu", "nu", "count")


@dataclass(frozen=True)
class ParamGroup:
    """Leaves that share one kernel call."""

    lr_multiplier: float
    decay: bool
    device: torch.device
    dtype: torch.dtype
    keys: tuple[Key, ...]


def init(params: TensorDict, cfg: AdamWConfig) -> AdamWState:
    """Zero moments and counts for ``params`` (a TensorDict of floating-point leaves)."""
    keys = leaf_keys(params)
    if not keys:
        raise ValueError("AdamW.init: params has no leaves")
    for k, t in zip(keys, leaves(params, keys)):
        if not t.is_floating_point():
            raise TypeError(f"AdamW.init: leaf {'.'.join(k)!r} has non-float dtype {t.dtype}")
    groups = param_groups(params, cfg)  # validates patterns and impl="fused" availability early
    for g in groups:
        _resolve_impl(cfg.impl, g)
    return TensorDict(
        {
            "mu": params.apply(lambda t: torch.zeros_like(t, memory_format=torch.preserve_format)),
            "nu": params.apply(lambda t: torch.zeros_like(t, memory_format=torch.preserve_format)),
            "count": params.apply(lambda t: torch.zeros((), dtype=torch.float32, device=t.device)),
        },
        batch_size=[],
    )


def _matches(key: Key, pattern: str) -> bool:
    return fnmatchcase(key[-1], pattern) or fnmatchcase(".".join(key), pattern)


def _lr_multiplier(key: Key, multipliers: tuple[tuple[str, float], ...]) -> float:
    found = {m for pat, m in multipliers if _matches(key, pat)}
    if len(found) > 1:
        raise ValueError(
            f"leaf {'.'.join(key)!r} matches lr_multipliers with different values {sorted(found)}"
        )
    return float(found.pop()) if found else 1.0


def param_groups(params: TensorDict, cfg: AdamWConfig) -> list[ParamGroup]:
    """Partition the leaves of ``params`` into kernel groups (order of first appearance)."""
    keys, values = leaf_items(params)
    return list(_groups(
        tuple(keys),
        tuple((t.device, t.dtype) for t in values),
        tuple(sorted(cfg.lr_multipliers.items())),
        tuple(cfg.no_decay) if cfg.weight_decay > 0.0 else None,
    ))


@lru_cache(maxsize=64)
def _groups(
    keys: tuple[Key, ...], placements: tuple, multipliers: tuple, no_decay: tuple[str, ...] | None
) -> tuple[ParamGroup, ...]:
    """Memoised (a run asks for the same partition every step); no_decay None: no decay at all."""
    groups: dict[tuple, list[Key]] = {}
    for key, (device, dtype) in zip(keys, placements):
        decay = no_decay is not None and not any(_matches(key, p) for p in no_decay)
        gk = (_lr_multiplier(key, multipliers), decay, device, dtype)
        groups.setdefault(gk, []).append(key)
    return tuple(ParamGroup(m, d, dev, dt, tuple(ks)) for (m, d, dev, dt), ks in groups.items())


def _resolve_impl(impl: str, group: ParamGroup) -> str:
    fused_ok = (
        group.device.type in _get_fused_kernels_supported_devices() and group.dtype in _FUSED_DTYPES
    )
    if impl == "fused" and not fused_ok:
        raise ValueError(f"AdamW impl='fused' has no kernel for {group.device.type}/{group.dtype}")
    if impl == "auto":
        return "fused" if fused_ok else "foreach"
    return impl


def update(
    grads: TensorDict,
    state: AdamWState,
    params: TensorDict,
    *,
    lr: float,
    cfg: AdamWConfig,
    skip: Tensor | None = None,
) -> tuple[TensorDict, AdamWState, dict[str, Tensor]]:
    """One AdamW step, in place (see the module docstring on donation).

    grads: same structure as ``params``; clipped in place when ``cfg.max_grad_norm`` is set.
    lr: the (scheduled) base learning rate for this step; a group's rate is
        ``lr · multiplier`` and its decoupled decay is ``p ← p · (1 − lr · multiplier · wd)``.
    skip: optional ``[]`` bool/0-1 device tensor; when true the step is skipped on device
        (used by the train step for a non-finite loss or an empty batch).

    Returns ``(params, state, stats)`` with ``stats = {"grad_norm": [] fp32 (before
    clipping), "skipped": [] fp32 0/1}``; nothing here synchronises with the host.
    """
    if not (lr >= 0.0 and lr < float("inf")):
        raise ValueError(f"AdamW.update: lr must be finite and >= 0, got {lr!r}")
    keys, p_all = leaf_items(params)
    g_all = aligned_leaves(grads, keys, what="AdamW.update: grads")
    for k, g, p in zip(keys, g_all, p_all):
        if g.shape != p.shape:
            raise ValueError(
                f"AdamW.update: grad of {'.'.join(k)!r} has shape {tuple(g.shape)}, param {tuple(p.shape)}"
            )
    position = {k: i for i, k in enumerate(keys)}
    if set(state.keys()) != set(_STATE_KEYS):
        raise KeyError(f"AdamW.update: state has keys {sorted(state.keys())}, expected {list(_STATE_KEYS)}")
    trees = [p_all, g_all] + [aligned_leaves(state[n], keys, what=f"AdamW.update: state[{n!r}]") for n in _STATE_KEYS]

    norm = clip_tensors_(g_all, cfg.max_grad_norm)
    found = ~torch.isfinite(norm)
    if skip is not None:
        found = found | skip.to(norm.device, torch.bool)
    found_inf = found.to(torch.float32)

    beta1, beta2 = cfg.betas
    for group in param_groups(params, cfg):
        kernel = _fused_adamw_ if _resolve_impl(cfg.impl, group) == "fused" else _foreach_adamw_
        idx = [position[k] for k in group.keys]
        kernel(
            *([tree[i] for i in idx] for tree in trees),
            lr=lr * group.lr_multiplier,
            beta1=beta1,
            beta2=beta2,
            weight_decay=cfg.weight_decay if group.decay else 0.0,
            eps=cfg.eps,
            found_inf=found_inf.to(group.device, non_blocking=True),
        )
    return params, state, {"grad_norm": norm, "skipped": found_inf}


def _fused_adamw_(
    p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], count: list[Tensor],
    *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, found_inf: Tensor,
) -> None:
    """One ``torch._fused_adamw_`` launch; the kernel itself returns early when found_inf == 1."""
    torch._foreach_add_(count, 1.0)
    torch._fused_adamw_(
        p, g, m, v, [], count,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
        amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf,
    )
    # Roll back the count of a skipped step, as torch.optim.adam._fused_adam does.
    torch._foreach_sub_(count, [found_inf] * len(count))


def _zero_if_(tensors: list[Tensor], flag: Tensor) -> None:
    """Zero all ``tensors`` in place where the device flag is true, with three launches
    (concatenate, masked fill, copy back) instead of a per-leaf ``torch.where``."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat.masked_fill_(flag.to(torch.bool), 0.0)
    parts = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [s.view(t.shape) for s, t in zip(parts, tensors)])


def _foreach_adamw_(
    p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], count: list[Tensor],
    *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, found_inf: Tensor,
) -> None:
    """AdamW with ``torch._foreach_*`` ops, skip-able on device.

    The arithmetic follows ``torch.optim.adam._multi_tensor_adam``'s capturable branch (bias
    corrections from the count tensors, so no ``.item()``). The skip multiplies every
    coefficient that moves state by ``keep = 1 − found_inf``: with ``keep = 0`` the decay
    factor is exactly 1, the moment coefficients are exactly (1, 0) and the step size is 0, so
    params and moments are bitwise unchanged — provided the gradients are finite, which is why
    a skipped step first zeroes them (``0 · NaN`` would be NaN).
    """
    keep = 1.0 - found_inf  # [] fp32: 1 = apply, 0 = skip
    _zero_if_(g, found_inf)
    # The list overload (as torch.optim uses for found_inf) stays on device; the single-tensor
    # overload reads the scalar with .item() on some backends.
    torch._foreach_add_(count, [keep] * len(count))
    if weight_decay != 0.0:
        torch._foreach_mul_(p, 1.0 - (lr * weight_decay) * keep)
    # m ← m + (1 − β1)·keep·(g − m)   (lerp; keep = 0 leaves m exactly)
    d = torch._foreach_sub(g, m)
    torch._foreach_mul_(d, (1.0 - beta1) * keep)
    torch._foreach_add_(m, d)
    del d
    # v ← (1 − (1 − β2)·keep)·v + (1 − β2)·keep·g²
    torch._foreach_mul_(v, 1.0 - (1.0 - beta2) * keep)
    g2 = torch._foreach_mul(g, (1.0 - beta2) * keep)
    torch._foreach_addcmul_(v, g2, g)
    del g2
    # Bias corrections for all leaves at once, in float64 where the device has it: in fp32,
    # 1 − β2^t loses ~5 digits to cancellation for small t (PyTorch computes it in double).
    hp = torch.float32 if p[0].device.type == "mps" else torch.float64
    t = torch.stack(count).to(hp).clamp_min(1.0)  # a skipped first step leaves count = 0
    bc2_sqrt = torch.sqrt(1.0 - beta2**t).to(p[0].dtype)
    neg_step = ((lr * keep.to(hp)) / (beta1**t - 1.0)).to(p[0].dtype)  # −lr·keep / (1 − β1^t)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, list(bc2_sqrt.unbind()))
    torch._foreach_add_(denom, eps)
    # p += m / (denom / neg_step); a zero step size gives denom = ±inf and an exact ±0 update.
    torch._foreach_div_(denom, list(neg_step.unbind()))
    torch._foreach_addcdiv_(p, m, denom)
