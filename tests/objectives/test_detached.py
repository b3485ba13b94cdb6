"""Backward through detached branches equals one backward of the summed objective."""

import torch

from wmtp_fn.objectives.detached import backward_through_detached


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    trunk = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scales = [0.5, 2.0, 0.0]  # an inactive head contributes nothing
    return trunk, heads, x, scales


def branch_fn(head, scale):
    return lambda z: scale * torch.tanh(z @ head).pow(2).sum()


def test_same_gradients_as_the_summed_objective():
    trunk, heads, x, scales = toy()
    z = torch.sin(x @ trunk)
    (sum(branch_fn(h, s)(z) for h, s in zip(heads, scales))).backward()
    ref = [t.grad.clone() for t in [trunk, *heads]]
    for t in [trunk, *heads]:
        t.grad = None

    z = torch.sin(x @ trunk)
    objective, values = backward_through_detached(z, [branch_fn(h, s) for h, s in zip(heads, scales)])
    assert trunk.grad is None  # only the heads so far: the trunk waits for the returned objective
    objective.backward()
    for got, want in zip([trunk.grad, *[h.grad for h in heads]], ref):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        zz = torch.sin(x @ trunk)
        assert torch.allclose(torch.stack(values), torch.stack([branch_fn(h, s)(zz) for h, s in zip(heads, scales)]))


def test_no_grad_mode_sums_the_values():
    trunk, heads, x, scales = toy(1)
    with torch.no_grad():
        z = torch.sin(x @ trunk)
        objective, values = backward_through_detached(z, [branch_fn(h, s) for h, s in zip(heads, scales)])
        assert torch.allclose(objective, sum(branch_fn(h, s)(z) for h, s in zip(heads, scales)))
    assert len(values) == 3 and all(h.grad is None for h in heads)


def test_a_trunk_without_grad_still_trains_the_heads():
    trunk, heads, x, scales = toy(2)
    z = torch.sin(x @ trunk.detach())
    objective, _ = backward_through_detached(z, [branch_fn(h, s) for h, s in zip(heads, scales)])
    assert not objective.requires_grad and heads[0].grad is not None and heads[0].grad.abs().sum() > 0
