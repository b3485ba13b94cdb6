"""bf16 inputs, fp32 math: the chunked cross-entropy against a float64 reference with error
bounds derived from the rounding model, tight enough that softmax/log-sum-exp done in bf16
(no fp32 upcast) fails them.

The inputs are multiples of 1/2 in [-1, 1] and d = 16, so every logit is a multiple of 1/4 with
|z| <= 16: exactly representable in bf16 (8 significant bits) and computed exactly by any
matmul that accumulates in fp32. The float64 reference on the same inputs then differs from a
correct implementation only by fp32 arithmetic in the log-sum-exp and by the documented bf16
rounding of the gradient; a bf16 log-sum-exp is off by up to half a bf16 ulp of |lse| (≈ 2^-9·|lse|,
1e-2 here), two orders of magnitude above the fp32 bound.
"""

import pytest
import torch

from wmtp_fn.losses.cross_entropy import linear_cross_entropy

U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-8  # bf16 unit roundoff (8 significant bits): |bf16(x) − x| <= U16·|x|
N, V, D = 96, 300, 16


def exact_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (N, D), generator=g).double() / 2
    w = torch.randint(-2, 3, (V, D), generator=g).double() / 2
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.2] = -100
    z = h @ w.T
    # The premise of the bounds: the bf16 matmul reproduces the exact logits.
    assert torch.equal((h.bfloat16() @ w.bfloat16().T).double(), z)
    return h, w, t


def reference(h, w, t):
    """float64 NLL and d(Σ nll)/dz = softmax − onehot (0 on ignored rows), from the exact logits."""
    z = h @ w.T
    valid = t != -100
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
    nll = torch.where(valid, lse - picked, 0.0)
    g = torch.softmax(z, dim=1) - torch.nn.functional.one_hot(t.clamp_min(0), V).double()
    g = torch.where(valid.unsqueeze(1), g, 0.0)
    return nll, lse, g, torch.where(valid.unsqueeze(1), torch.softmax(z, dim=1), 0.0)


def nll_bound(lse):
    """fp32 log-sum-exp of exact logits: the sum of V exponentials loses at most (V + 4)·u32
    relative, log and the final subtraction a few u32 of |lse| (+ max |z| <= 16)."""
    return (V + 8) * U32 * (1 + lse.abs() + 16)


@pytest.mark.parametrize("chunk", [7, 32, 1000])
@pytest.mark.parametrize("mode", ["no_grad", "h_grad", "h_and_w_grad"])
def test_bf16_nll_within_fp32_math_bound(chunk, mode):
    h, w, t = exact_inputs()
    hb = h.bfloat16().requires_grad_(mode != "no_grad")
    wb = w.bfloat16().requires_grad_(mode == "h_and_w_grad")
    nll = linear_cross_entropy(hb, wb, t, chunk_size=chunk)
    ref, lse, _, _ = reference(h, w, t)
    assert nll.dtype == torch.float32
    err = (nll.double() - ref).abs()
    bound = nll_bound(lse)
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound[err.argmax()]:.3g}"
    assert (nll[t == -100] == 0).all()


@pytest.mark.parametrize("chunk", [7, 1000])
def test_bf16_grad_h_within_rounding_bound(chunk):
    """∂/∂h = bf16(softmax − onehot) @ W, rounded to bf16: per entry the error is at most
    u16·Σ_v |g_v||W_vj| (rounding g) + fp32 error of the softmax (relative to p, not to g: the
    target entry p_y − 1 can be tiny) and of the accumulation + u16·|∂h| (the output rounding). Both backward strategies (gradient in forward; recompute when W needs a
    gradient) must meet it."""
    h, w, t = exact_inputs(seed=1)
    _, _, g, p = reference(h, w, t)
    want = g @ w
    scale = (g.abs() + p) @ w.abs()
    bound = (U16 + (2 * V + 16) * U32) * scale + U16 * (want.abs() + U16 * scale) + 1e-30
    for w_grad in (False, True):
        hb = h.bfloat16().requires_grad_()
        wb = w.bfloat16().requires_grad_(w_grad)
        linear_cross_entropy(hb, wb, t, chunk_size=chunk).sum().backward()
        err = (hb.grad.double() - want).abs()
        assert hb.grad.dtype == torch.bfloat16
        assert (err <= bound).all(), f"w_grad={w_grad}: max excess {(err / bound).max():.3g}× the bound"


def test_bf16_grad_w_within_fp32_accumulation_bound():
    """∂/∂W = Σ_i g_i ⊗ h_i accumulated in fp32 over the chunks, rounded once to bf16."""
    h, w, t = exact_inputs(seed=2)
    _, _, g, p = reference(h, w, t)
    want = g.T @ h
    scale = (g.abs() + p).T @ h.abs()
    bound = (N + V + 16) * U32 * scale + U16 * (want.abs() + U16 * scale) + 1e-30
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    linear_cross_entropy(hb, wb, t, chunk_size=13).sum().backward()
    err = (wb.grad.double() - want).abs()
    assert (err <= bound).all(), f"max excess {(err / bound).max():.3g}× the bound"
