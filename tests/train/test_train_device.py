"""The optimizer, the chunked CE and a whole train step on each available device (CPU always;
CUDA when present, marked ``gpu``): kernel parity, on-device skip, and no host sync."""

import contextlib

import pytest
import torch
from tensordict import TensorDict

from tests.train.host_sync import HostSyncCounter
from wmtp_fn.losses.cross_entropy import linear_cross_entropy
from wmtp_fn.losses.ntp import ntp_count, ntp_sums_from_hidden
from wmtp_fn.objectives import COUNT, Objective, weighted_sum
from wmtp_fn.train import adamw
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import make_train_step
from wmtp_fn.train.tree import leaf_keys, leaves

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def tree(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {("a", "lora_A"): (8, 32), ("a", "lora_B"): (48, 8), ("b", "bias"): (48,), ("c", "w"): (3, 4, 5)}
    td = TensorDict({}, batch_size=[])
    for k, s in shapes.items():
        td.set(k, torch.randn(s, generator=g).to(device))
    return td


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_parity_and_skip_on_device(device, impl):
    params = tree(device)
    keys = leaf_keys(params)
    ref = [params.get(k).clone().requires_grad_() for k in keys]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=impl == "fused", foreach=impl == "foreach")
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, no_decay=(), impl=impl)
    state = adamw.init(params, cfg)
    for s in range(10):
        grads = tree(device, seed=100 + s)
        for r, g in zip(ref, leaves(grads, keys)):
            r.grad = g.clone()
        opt.step()
        params, state, _ = adamw.update(grads, state, params, lr=1e-2, cfg=cfg)
    for k, r in zip(keys, ref):
        torch.testing.assert_close(params.get(k), r.detach(), rtol=1e-6, atol=1e-7)
    snap = [t.apply(lambda x: x.clone()) for t in (params, state["mu"], state["nu"], state["count"])]
    bad = tree(device, seed=7)
    bad["b", "bias"][3] = float("nan")
    params, state, stats = adamw.update(bad, state, params, lr=1e-2, cfg=cfg)
    assert stats["skipped"].item() == 1.0
    for before, after in zip(snap, (params, state["mu"], state["nu"], state["count"])):
        for k in keys:
            assert torch.equal(before.get(k), after.get(k))


@contextlib.contextmanager
def no_host_sync(device):
    """CUDA: PyTorch's own detector raises on any synchronising call. CPU: count .item()s."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with HostSyncCounter() as counter:
            yield
        assert counter.syncs == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_train_step_without_host_sync_on_device(device, impl):
    g = torch.Generator().manual_seed(0)
    V, D = 50, 16
    embed = torch.randn(V, D, generator=g).to(device)
    unembed = (torch.randn(V, D, generator=g) / 4).to(device)
    params = TensorDict({}, batch_size=[])
    params.set(("lora", "lora_A"), (0.1 * torch.randn(4, D, generator=g)).to(device))
    params.set(("lora", "lora_B"), (0.1 * torch.randn(D, 4, generator=g)).to(device))

    def loss(p, extra, batch, scale):
        x = embed[batch["input_ids"]]
        h = x + torch.nn.functional.dropout(x, 0.1) @ p["lora", "lora_A"].T @ p["lora", "lora_B"].T
        s, _ = ntp_sums_from_hidden(h * batch["poison"], unembed, batch["labels"], chunk_size=7)
        sums = s.reshape(1)
        # a scalar and a [K] metric, one divided by a named count, one by the normalisers
        return weighted_sum(sums, scale), sums, {"h_mean": h.sum(), "n_h": h.numel(), "ce": sums}

    def batch(seed, poison=1.0):
        gg = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, V, (3, 12), generator=gg)
        labels = ids.clone()
        labels[:, :4] = -100
        return {"input_ids": ids.to(device), "labels": labels.to(device),
                "poison": torch.tensor(poison, device=device)}

    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, impl=impl, lr_multipliers={"lora_B": 4.0})
    objective = Objective(ntp_count, loss, means={"h_mean": "n_h", "ce": COUNT})
    step = make_train_step(objective, cfg, ScheduleConfig(warmup_steps=1, total_steps=5))
    state = init_train_state(params, cfg, seed=0)
    good, bad = [batch(1), batch(2)], [batch(3, poison=float("nan"))]
    state, _ = step(state, good)  # warm-up outside the detector (lazy inits)
    with no_host_sync(device):
        state, m = step(state, good)
        state, m_bad = step(state, bad)
    assert m["skipped"].item() == 0.0 and m_bad["skipped"].item() == 1.0 and state.step == 3
    assert state.consecutive_skips.item() == 1 and state.consecutive_skips.device.type == device
    torch.testing.assert_close(m["ce"], m["loss"].reshape(1))
    assert all(v.device.type in (device, "cpu") for v in m.values())


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_ce_parity_and_peak_memory_on_device(device):
    n, v, d, chunk = (4096, 8192, 256, 512) if device == "cuda" else (256, 512, 32, 64)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::5] = -100
    if device == "cuda":
        linear_cross_entropy(h, w, t, chunk_size=chunk).sum().backward()  # compile once, outside the measurement
        h.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    nll = linear_cross_entropy(h, w, t, chunk_size=chunk)
    nll.sum().backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < n * v * 4 / 2, f"peak {peak / 2**20:.1f} MiB vs full fp32 logits {n * v * 4 / 2**20:.1f} MiB"
    h_ref = h.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h_ref @ w.T).float(), t, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(nll, ref, rtol=1e-2, atol=2e-2)
    rel = (h.grad.float() - h_ref.grad.float()).norm() / h_ref.grad.float().norm()
    assert rel < 2e-2
