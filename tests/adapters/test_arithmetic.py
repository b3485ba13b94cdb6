"""Adapters are data: ordinary TensorDict ops scale, add, average and diff them."""

import torch

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, delta_weights, init, to_flat


def test_tensordict_arithmetic_on_adapters(base, batch):
    a, spec = init(base, AdapterSpec(rank=4, alpha=8.0), seed=0)
    a = randomize(a, seed=1)
    b = randomize(a, seed=2)

    # scaling both factors by c scales every weight update by c²
    da, d2a = delta_weights(a, spec), delta_weights(a * 2, spec)
    assert all(torch.allclose(d2a[k], 4 * da[k], rtol=1e-5, atol=1e-7) for k in da)

    # scaling only B by c scales the update by c: a linear knob on adapter strength
    half = a.named_apply(lambda name, t: t * 0.5 if name == "lora_B" else t)
    dh = delta_weights(half, spec)
    assert all(torch.allclose(dh[k], 0.5 * da[k], rtol=1e-5, atol=1e-7) for k in da)

    # difference and sum are inverse; the average of an adapter with itself is itself
    for x, y in [(b + (a - b), a), ((a + a) / 2, a)]:
        torch.testing.assert_close(to_flat(x), to_flat(y))

    # a zero adapter (0 · a) leaves the base output unchanged; the average of a and b is a new adapter
    with torch.no_grad():
        assert torch.equal(apply(base, a * 0, spec, **batch).logits, base(**batch).logits)
        mid = apply(base, (a + b) / 2, spec, **batch).logits
        out_a = apply(base, a, spec, **batch).logits
    assert rel_err(mid, out_a) > 1e-3
