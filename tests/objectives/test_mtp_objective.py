"""The sequential-head MTP objective equals the naive all-heads backward, and NTP at H = 1."""

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots
from wmtp_fn.losses.mtp import mtp_count, mtp_sums
from wmtp_fn.models.base import load_base
from wmtp_fn.models.layers import checkpoint_layers
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.objectives import Objective, component_weights, weighted_sum
from wmtp_fn.objectives.mtp import mtp_objective
from wmtp_fn.objectives.ntp import ntp_objective
from wmtp_fn.train.step import accumulate_grads


def mtp_base(tiny_dir, n_future, *, checkpointing=False):
    mtp = mtp_from_llama(load_base(tiny_dir), n_future)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # extra heads that differ from head 0, so a head mix-up shows
        for p in mtp.extra_heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    install_slots(mtp)
    if checkpointing:
        checkpoint_layers(mtp)
    return mtp


def micro_batches(vocab=128):
    gen = torch.Generator().manual_seed(11)
    out = []
    for rows, t, prompt in ((2, 12, 1), (3, 12, 2)):  # short prompts: unequal token counts per head
        ids = torch.randint(4, vocab, (rows, t), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        labels[0, -2:] = -100  # padding
        out.append({"input_ids": ids, "labels": labels})
    return out


def naive_objective(base, spec, weights_key=None):
    """All-head logits and one backward: the reference."""

    def loss(params, extra, batch, scale):
        logits = apply(base, params["policy"], spec, batch["input_ids"], train=True)
        weighted, _ = mtp_sums(logits, batch["labels"], weights=batch.get(weights_key) if weights_key else None)
        return weighted_sum(weighted, scale), weighted, {}

    return Objective(count=lambda b: mtp_count(b, n_future=base.n_future), loss=loss)


def params_for(base, **spec_kw):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, **spec_kw), seed=0)
    return TensorDict({"policy": randomize(adapter, seed=2)}, batch_size=[]), spec


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sequential_heads_equal_the_naive_backward(tiny_dir, checkpointing):
    base = mtp_base(tiny_dir, 3, checkpointing=checkpointing)
    params, spec = params_for(base, dropout=0.1)
    mbs = micro_batches()
    torch.manual_seed(0)
    ref = accumulate_grads(naive_objective(base, spec), params, TensorDict(), mbs)
    torch.manual_seed(0)
    got = accumulate_grads(mtp_objective(base, spec), params, TensorDict(), mbs)
    assert torch.equal(got.counts, ref.counts)
    assert rel_err(got.loss, ref.loss) < 1e-6
    for (k, g), (_, r) in zip(got.grads.items(True, True), ref.grads.items(True, True)):
        assert r.abs().sum() > 0 and rel_err(g, r) < 1e-5, k
    assert got.metrics["ce"].shape == (3,) and torch.allclose(got.metrics["ce"], got.metrics["wce"])


@pytest.mark.parametrize("kind", ["position", "per_head"])
def test_weighted_heads_equal_the_naive_backward(tiny_dir, kind):
    base = mtp_base(tiny_dir, 2)
    params, spec = params_for(base)
    gen = torch.Generator().manual_seed(3)
    mbs = []
    for mb in micro_batches():
        shape = mb["labels"].shape + ((2,) if kind == "per_head" else ())
        mbs.append({**mb, "w": torch.rand(shape, generator=gen) * 2})
    ref = accumulate_grads(naive_objective(base, spec, "w"), params, TensorDict(), mbs)
    got = accumulate_grads(mtp_objective(base, spec, weights_key="w"), params, TensorDict(), mbs)
    assert rel_err(got.loss, ref.loss) < 1e-6
    for (k, g), (_, r) in zip(got.grads.items(True, True), ref.grads.items(True, True)):
        assert rel_err(g, r) < 1e-5, k
    assert not torch.allclose(got.metrics["ce"], got.metrics["wce"])


def test_one_head_is_the_ntp_objective(tiny_dir):
    llama = load_base(tiny_dir)
    base = mtp_from_llama(llama, 1)
    install_slots(base)
    install_slots(llama)
    params, spec = params_for(base)
    mbs = micro_batches()
    mtp = accumulate_grads(mtp_objective(base, spec), params, TensorDict(), mbs)
    ntp_params = TensorDict({"lora": params["policy"]}, batch_size=[])
    ntp = accumulate_grads(ntp_objective(llama, spec), ntp_params, TensorDict(), mbs)
    assert torch.equal(mtp.counts, ntp.counts)
    assert rel_err(mtp.loss, ntp.loss) < 1e-6
    for (k, g), (_, r) in zip(mtp.grads["policy"].items(True, True), ntp.grads["lora"].items(True, True)):
        assert rel_err(g, r) < 1e-5, k


def test_all_masked_is_a_finite_zero_with_zero_gradients(tiny_dir):
    base = mtp_base(tiny_dir, 2)
    params, spec = params_for(base)
    mb = micro_batches()[0]
    mb = {**mb, "labels": torch.full_like(mb["labels"], -100)}
    got = accumulate_grads(mtp_objective(base, spec), params, TensorDict(), [mb])
    assert float(got.loss) == 0.0 and all(float(g.abs().sum()) == 0.0 for g in got.grads.values(True, True))
    assert component_weights(got.counts).sum() == 0
