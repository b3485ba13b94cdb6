"""Chunked linear cross-entropy vs the plain full-logits path: values, gradients, gradcheck,
bf16, memory (no [N, V] tensor ever), property tests."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from wmtp_fn.losses.cross_entropy import linear_cross_entropy


def make(n, v, d, dtype=torch.float32, ignore_frac=0.3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(n, d, generator=g)).to(dtype)
    w = torch.randn(v, d, generator=g).to(dtype) / d**0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, t


def assert_rel(a, b, tol):
    """Normwise relative error ‖a − b‖ / ‖b‖ ≤ tol (elementwise relative error is meaningless
    for gradient entries that are sums with cancellation)."""
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def reference(h, w, t):
    """The plain path: full logits (upcast to at least fp32), torch's own cross-entropy."""
    logits = h @ w.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t,
                           ignore_index=-100, reduction="none")


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
@pytest.mark.parametrize("w_grad", [False, True])
def test_fp32_parity_values_and_grads(chunk, w_grad):
    h, w, t = make(64, 50, 24, scale=3.0)
    upstream = torch.rand(64)  # a non-uniform upstream gradient exercises grad_nll
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(w_grad)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(w_grad)
    nll = linear_cross_entropy(h1, w1, t, chunk_size=chunk)
    ref = reference(h2, w2, t)
    assert nll.dtype == torch.float32 and nll.shape == (64,)
    torch.testing.assert_close(nll, ref, rtol=1e-6, atol=1e-6)
    assert (nll[t == -100] == 0).all()
    (nll * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert_rel(h1.grad, h2.grad, 1e-6)
    if w_grad:
        assert_rel(w1.grad, w2.grad, 1e-6)
    else:
        assert w1.grad is None


@pytest.mark.parametrize("chunk", [2, 3, 11])
def test_gradcheck_float64(chunk):
    h, w, t = make(9, 7, 4, dtype=torch.float64, seed=1)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, t, chunk_size=chunk), (h, w))
    w.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda h: linear_cross_entropy(h, w, t, chunk_size=chunk), (h,))


def test_bf16_close_to_fp32_and_to_plain_bf16_path():
    h32, w32, t = make(96, 300, 64, scale=2.0, seed=2)
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16()
    nll = linear_cross_entropy(h, w, t, chunk_size=32)
    assert nll.dtype == torch.float32
    # vs the usual bf16 model path (bf16 logits, upcast for the loss): same rounding of logits
    h_ref = h.detach().clone().requires_grad_()
    ref_bf16 = reference(h_ref, w, t)
    torch.testing.assert_close(nll, ref_bf16, rtol=1e-2, atol=2e-2)
    # vs exact fp32 math on the same (bf16-rounded) inputs
    exact = reference(h.detach().float(), w.float(), t)
    torch.testing.assert_close(nll, exact, rtol=2e-2, atol=5e-2)
    nll.sum().backward()
    ref_bf16.sum().backward()
    assert h.grad.dtype == torch.bfloat16
    rel = (h.grad.float() - h_ref.grad.float()).norm() / h_ref.grad.float().norm()
    assert rel < 2e-2


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_never_materialises_full_logits():
    n, v, d, chunk = 256, 128, 16, 32
    h, w, t = make(n, v, d)
    h.requires_grad_()
    with MaxNumel() as chunked:
        linear_cross_entropy(h, w, t, chunk_size=chunk).sum().backward()
    assert chunked.max_numel <= chunk * v < n * v
    with MaxNumel() as plain:  # the detector does see the plain path's [N, V]
        reference(h, w, t).sum().backward()
    assert plain.max_numel >= n * v


def test_all_ignored_is_zero_with_zero_grad():
    h, w, t = make(10, 9, 5)
    t[:] = -100
    h.requires_grad_()
    w.requires_grad_()
    nll = linear_cross_entropy(h, w, t, chunk_size=4)
    assert torch.equal(nll, torch.zeros(10))
    nll.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_empty_input():
    h, w, t = make(0, 9, 5)
    assert linear_cross_entropy(h, w, t).shape == (0,)


def test_errors():
    h, w, t = make(8, 9, 5)
    with pytest.raises(TypeError, match="bfloat16"):
        linear_cross_entropy(h, w.bfloat16(), t)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError):
        linear_cross_entropy(h[None], w, t)
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(h, w, t.float())


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 30),
    d=st.integers(1, 12),
    chunk=st.integers(1, 50),
    ignore_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 10_000),
)
def test_property_matches_float64_reference(n, v, d, chunk, ignore_frac, scale, seed):
    h, w, t = make(n, v, d, ignore_frac=ignore_frac, seed=seed, scale=scale)
    h.requires_grad_()
    nll = linear_cross_entropy(h, w, t, chunk_size=chunk)
    h64 = h.detach().double().requires_grad_()
    ref = reference(h64, w.double(), t)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    ref.sum().backward()
    # fp32 rounding of softmax − onehot is absolute (≈ 1e-7 per entry, not relative to a tiny
    # gradient of a confident prediction), so the bound has a term on the scale of W.
    err = (h.grad.double() - h64.grad).norm()
    assert err <= 1e-5 * h64.grad.norm() + 1e-6 * n**0.5 * w.double().norm(), float(err)
