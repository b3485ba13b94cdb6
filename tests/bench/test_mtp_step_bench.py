"""The MTP step benchmark: its PEFT peer computes the same loss and gradients as our naive step
on the same weights and batch (fp32, CPU, tiny shape), against a float64 loop reference; the
script runs end to end on the CPU; the ratio columns are right by hand. Timings are never
asserted: they are measured on the GPU and recorded in BENCHMARKS.md."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from wmtp_fn.adapters import AdapterSpec
from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.adapters.lora import to_flat
from wmtp_fn.models.base import Base
from wmtp_fn.models.prepare import prepare

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "mtp_step.py"
CPU = torch.device("cpu")


def load_bench():
    spec = importlib.util.spec_from_file_location("mtp_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def loop_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """float64 reference: head k (0-based) at (b, t) scores labels[b, t + k + 1]; mean NLL per head over
    the targets it has, then the mean over heads. logits: [B, T, H, V]."""
    B, T, H, _ = logits.shape
    logp = torch.log_softmax(logits.double(), dim=-1)
    per_head = []
    for k in range(H):
        nll = [-float(logp[b, t, k, labels[b, t + k + 1]]) for b in range(B) for t in range(T - k - 1)
               if labels[b, t + k + 1] != -100]
        per_head.append(sum(nll) / len(nll))
    return sum(per_head) / H


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_the_peft_peer_has_our_naive_loss_and_gradients_on_the_same_weights():
    bench = load_bench()
    shape, H, rank = bench.SHAPES["tiny"], 3, 4
    ids, labels = bench.make_batch(shape, 2, 24, CPU)
    with torch.no_grad():
        want = loop_loss(bench.build(shape, H, CPU, torch.float32)(ids), labels)  # the base alone: B = 0 at init

    ours = bench.build(shape, H, CPU, torch.float32)
    adapter, spec = init_adapter(prepare(Base.of(ours, "mtp")), AdapterSpec(rank=rank, alpha=2 * rank), seed=0)
    pm = bench.peft_model(bench.build(shape, H, CPU, torch.float32), rank)
    peft_params = {n: p for n, p in pm.named_parameters() if p.requires_grad}

    def peft_name(key: str) -> str:  # ours `{path}.lora_A` -> PEFT's `base_model.model.{path}.lora_A.default.weight`
        path, _, leaf = key.rpartition(".")
        return f"base_model.model.{path}.{leaf}.default.weight"

    # PEFT adapts the same 7 linears of every layer: trunk, head 0 and the extra heads.
    assert sorted(peft_name(k) for k in to_flat(adapter)) == sorted(peft_params)
    assert any(".extra_heads.1.mlp.down_proj." in n for n in peft_params)

    def step_both(adapter):
        """One backward of each on the same adapter values (ours copied into PEFT): losses and grads by our keys."""
        for key, t in to_flat(adapter).items():
            with torch.no_grad():
                peft_params[peft_name(key)].copy_(t)
            peft_params[peft_name(key)].grad = None
            t.requires_grad_()
        loss_ours = float(bench.naive_loss(ours, adapter, spec, ids, labels))
        loss_peft = float(bench.peft_naive_loss(pm, ids, labels))
        flat = to_flat(adapter)
        return loss_ours, loss_peft, {k: (flat[k].grad, peft_params[peft_name(k)].grad) for k in flat}

    # The first step (B = 0): both losses are the base model's.
    loss_ours, loss_peft, grads = step_both(adapter)
    assert abs(loss_ours - want) / want < 1e-5
    assert abs(loss_peft - want) / want < 1e-5
    for key, (g_ours, g_peft) in grads.items():
        if key.endswith("lora_A"):  # dL/dA = 0 while B = 0
            assert float(g_ours.abs().max()) == 0.0 and float(g_peft.abs().max()) == 0.0, key
        else:
            assert rel_err(g_peft, g_ours) < 1e-5, key

    # Non-zero B (as after training): loss and the gradients of A and B still agree.
    gen = torch.Generator().manual_seed(1)
    trained = adapter.named_apply(
        lambda name, t: 0.05 * torch.randn(t.shape, generator=gen) if name == "lora_B" else t.detach().clone())
    loss_ours, loss_peft, grads = step_both(trained)
    assert abs(loss_ours - want) / want > 1e-4  # B moved the loss: the adapters are in the forward
    assert abs(loss_peft - loss_ours) / loss_ours < 1e-5
    for leaf in ("lora_A", "lora_B"):
        pairs = [(gp, go) for k, (go, gp) in grads.items() if k.endswith(leaf)]
        assert all(float(go.norm()) > 0 for _, go in pairs), leaf
        num = math.sqrt(sum(float((gp.double() - go.double()).norm() ** 2) for gp, go in pairs))
        den = math.sqrt(sum(float(go.double().norm() ** 2) for _, go in pairs))
        assert num / den < 1e-5, leaf


def test_the_bench_runs_ours_and_the_peer_on_cpu_and_pairs_each_row_with_the_peer_at_its_h(tmp_path):
    bench = load_bench()
    rows = bench.main(["--shape", "tiny", "--device", "cpu", "--heads", "1", "2", "--batch", "2", "--seq", "32",
                       "--warmup", "1", "--repeats", "1", "--variants", "ntp", "naive", "sequential", "peft-naive",
                       "--json", str(tmp_path / "m.json")])
    # ntp once at H = 1; naive skipped at H = 1 (that is the full-logits NTP step); the peer at every H.
    assert [(r["variant"], r["n_future"]) for r in rows] == [
        ("ntp", 1), ("sequential", 1), ("peft-naive", 1), ("naive", 2), ("sequential", 2), ("peft-naive", 2)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    peer = {r["n_future"]: r for r in rows if r["variant"] == "peft-naive"}
    for r in rows:
        if r["variant"] == "peft-naive":
            assert "peer" not in r
        else:
            assert r["peer"] == "peft-naive"
            assert r["tok_s_vs_peer"] == pytest.approx(r["tokens_per_s"] / peer[r["n_future"]]["tokens_per_s"])
    assert json.loads((tmp_path / "m.json").read_text())[0]["variant"] == "ntp"


def test_ratios_by_hand():
    bench = load_bench()

    def row(variant, h, tps, peak, **kw):
        return dict(variant=variant, n_future=h, ms=1.0, tokens_per_s=tps, peak_gib=peak, loss=1.0, **kw)

    rows = [row("ntp", 1, 1000.0, 10.0), row("naive", 4, 800.0, 14.0), row("peft-naive", 4, 400.0, 20.0),
            row("peft-naive-compiled", 4, 500.0, 18.0), row("sequential", 2, 900.0, 11.0),
            row("peft-naive-compiled", 2, float("nan"), float("inf"), error="OutOfMemoryError")]
    bench.add_ratios(rows, trunk=31)
    naive = rows[1]
    assert naive["tok_s_vs_target"] == pytest.approx(800 * 35 / (0.8 * 1000 * 32))  # 1.09375
    assert naive["peak_vs_ntp"] == pytest.approx(1.4)
    assert naive["peer"] == "peft-naive-compiled"  # the faster of the two peers at H = 4
    assert naive["tok_s_vs_peer"] == pytest.approx(1.6)
    assert naive["peak_vs_peer"] == pytest.approx(14 / 18)
    assert "peer" not in rows[4]  # the only peer at H = 2 failed
    assert rows[4]["tok_s_vs_target"] == pytest.approx(900 * 33 / (0.8 * 1000 * 32))
    # Without an ntp row, sequential at H = 1 is the NTP reference (earlier runs).
    old = [row("sequential", 1, 1000.0, 10.0), row("sequential", 4, 700.0, 10.5)]
    bench.add_ratios(old, trunk=31)
    assert old[1]["peak_vs_ntp"] == pytest.approx(1.05)
    assert "peer" not in old[1]


def test_an_unknown_variant_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--shape", "tiny", "--device", "cpu", "--variants", "naive", "peft-fast"])
    assert "peft-fast" in capsys.readouterr().err
