"""Chunked linear cross-entropy: per-token NLL from hidden states and an unembedding matrix
without ever holding the full ``[N, V]`` logits (forward or backward).

For ``N`` tokens and a vocabulary ``V`` the plain path ``F.cross_entropy(h @ W.T, y)`` keeps
``[N, V]`` logits in the compute dtype, an fp32 copy, and a same-sized gradient — for a 32k
vocabulary and 16k tokens that is several GiB per head. Here the tokens are processed
``chunk_size`` at a time, so peak extra memory is ``O(chunk_size · V)``.

Two backward strategies:
- gradient in forward (the usual case: ``h`` needs a gradient, ``W`` is frozen). The upstream
  gradient of a per-token NLL is a per-token scalar ``g_i``, so
  ``∂/∂h_i = g_i · (softmax_i − onehot(y_i)) W`` and the vector ``(softmax_i − onehot(y_i)) W``
  can be formed while the chunk's logits are at hand. The backward is then one multiply: no
  second pass over the logits and no recomputed matmul. It stores ``[N, d]`` in ``h``'s dtype.
- recompute (``W`` needs a gradient too): the forward keeps the per-token log-sum-exp ``[N]`` and
  the backward recomputes each chunk's logits.
On CUDA the per-chunk elementwise work (upcast, log-sum-exp, softmax − onehot, downcast) is one
compiled kernel pair; elsewhere it runs eagerly with the same math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax dtype: fp32 for half types and fp32, fp64 for fp64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """``h: [c, d]``, ``weight: [V, d]`` -> ``[c, V]`` in the accumulation dtype. The matmul runs
    in the input dtype (bf16 stays bf16, as in the model's own ``lm_head``); only the chunk is
    upcast."""
    return (h @ weight.T).to(_acc_dtype(h.dtype))


def _chunk_nll_and_grad(logits: Tensor, tgt: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk: ``logits [c, V]`` (input dtype), ``tgt [c]`` (any id where invalid), ``valid
    [c]`` -> ``nll [c]``, ``lse [c]`` (accumulation dtype) and ``softmax − onehot [c, V]`` in the
    input dtype, zero on invalid rows. Pure pointwise/reduction code so that it compiles into
    two passes over the logits."""
    x = logits.to(_acc_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    onehot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == tgt.unsqueeze(1)
    picked = torch.where(onehot, x, 0.0).sum(dim=-1)
    nll = torch.where(valid, lse - picked, 0.0)
    grad = torch.where(valid.unsqueeze(1), torch.exp(x - lse.unsqueeze(1)) - onehot.to(x.dtype), 0.0)
    return nll, lse, grad.to(logits.dtype)


_chunk_nll_and_grad_compiled = torch.compile(_chunk_nll_and_grad, dynamic=False, fullgraph=True)


def _chunk_fn(device: torch.device):
    return _chunk_nll_and_grad_compiled if device.type == "cuda" else _chunk_nll_and_grad


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """``(h [N, d], W [V, d] frozen, targets [N]) -> nll [N]``, with ``∂nll_i/∂h_i`` formed in
    the forward pass (see the module docstring)."""

    @staticmethod
    def forward(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int):
        n = h.shape[0]
        nll = torch.empty(n, dtype=_acc_dtype(h.dtype), device=h.device)
        dh = torch.empty_like(h)
        chunk = _chunk_fn(h.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            tgt = targets[s:e]
            valid = tgt != ignore_index
            nll[s:e], _, grad_logits = chunk(h[s:e] @ weight.T, torch.where(valid, tgt, 0), valid)
            dh[s:e] = grad_logits @ weight
        return nll, dh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, dh = output
        ctx.mark_non_differentiable(dh)
        ctx.save_for_backward(dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _grad_dh: Tensor | None):
        (dh,) = ctx.saved_tensors
        return (dh * grad_nll.unsqueeze(1)).to(dh.dtype), None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """``(h [N, d], W [V, d], targets [N]) -> (nll [N] fp32, lse [N] fp32)``; see
    ``linear_cross_entropy``. ``lse`` is an output only so that ``setup_context`` can save it
    (it is marked non-differentiable)."""

    @staticmethod
    def forward(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int):
        n = h.shape[0]
        acc = _acc_dtype(h.dtype)
        nll = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _chunk_logits(h[s:e], weight)
            tgt = targets[s:e]
            valid = tgt != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)
            # Ignored rows gather index 0 (any valid index) and are zeroed below.
            picked = logits.gather(1, torch.where(valid, tgt, 0).unsqueeze(1)).squeeze(1)
            nll[s:e] = torch.where(valid, lse_c - picked, 0.0)
            lse[s:e] = lse_c
        return nll, lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, weight, targets, chunk_size, ignore_index = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.ignore_index = ignore_index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _grad_lse: Tensor | None):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ctx.ignore_index
        # d nll_i / d logits_i = softmax_i − onehot(y_i) on valid rows, 0 on ignored rows.
        acc = lse.dtype
        g = torch.where(valid, grad_nll.to(acc), 0.0)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        n = h.shape[0]
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            hc = h[s:e]
            # In place on the fresh chunk: softmax = exp(logits − lse), no second [c, V] buffer.
            p = _chunk_logits(hc, weight).sub_(lse[s:e].unsqueeze(1)).exp_()
            idx = torch.where(valid[s:e], targets[s:e], 0).unsqueeze(1)
            p.scatter_add_(1, idx, -valid[s:e].to(p.dtype).unsqueeze(1))
            p.mul_(g[s:e].unsqueeze(1))  # grad_logits [c, V] fp32
            if need_h:
                grad_h[s:e] = p.to(h.dtype) @ weight
            if need_w:
                grad_w.addmm_(p.T, hc.to(acc))
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> Tensor:
    """Per-token negative log-likelihood of ``targets`` under logits ``h @ weight.T``.

    h: ``[N, d]`` hidden states (any float dtype; gradients flow to it).
    weight: ``[V, d]`` unembedding, same dtype as ``h`` (typically frozen, may be bf16). If it
        requires grad, its gradient is accumulated in fp32 over the chunks (``[V, d]`` fp32).
    targets: ``[N]`` int64 token ids; ``ignore_index`` marks positions without a loss. Ids must
        lie in ``[0, V)`` (not checked here: that would need a host sync; ``gather`` errors).
    chunk_size: tokens per chunk; peak extra memory ``≈ chunk_size · V · (4 + itemsize)`` bytes.

    Returns ``nll: [N]`` fp32 (fp64 for fp64 inputs), exactly 0 at ignored positions (whose
    gradient is 0 too).
    Logits are computed in the input dtype and upcast per chunk to fp32 for the log-sum-exp.
    Only first-order gradients are supported (the backward is ``once_differentiable``).
    """
    if h.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"linear_cross_entropy expects h [N, d], weight [V, d], targets [N]; got "
            f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if h.shape[0] != targets.shape[0] or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if h.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}; cast one explicitly "
            "(the logits are computed in this common dtype)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64, got {targets.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    targets = targets.long()
    if torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad:
        nll, _ = _LinearCrossEntropyGradInForward.apply(h, weight, targets, chunk_size, ignore_index)
    else:
        nll, _ = _LinearCrossEntropy.apply(h, weight, targets, chunk_size, ignore_index)
    return nll
