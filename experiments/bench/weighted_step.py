"""Benchmark: the weighted MTP train steps (Rho-1, verifiable) against the plain MTP step.

    python experiments/bench/weighted_step.py --shape sheared-2.7b --heads 4        # on a GPU
    python experiments/bench/weighted_step.py --shape tiny --device cpu --repeats 2 # smoke test

Every variant is the project's own train step (`train.step.make_train_step` over the
objective the pipeline uses) on one frozen random-weight bf16 MTP base, LoRA r = 16 on all 7
linears of trunk and heads, fused AdamW on the fp32 masters, one micro-batch per step:

mtp:          `objectives.mtp.mtp_objective`, uniform weights (the baseline pipeline).
rho1:         `objectives.rho1.rho1_objective`, micro-batch scope: a no-grad reference
              forward (trunk + head 0, a second adapter bound on the same base) + the MTP step.
rho1_step:    the same with the step-wide scope (a no-grad policy pre-pass over every head too).
verifiable:   `objectives.verifiable.verifiable_objective`: a no-grad critic forward (trunk,
              a critic adapter and an MLP value head bound on the same base) + TD weights + the
              MTP step.

Median ms/step over CUDA events after warm-up; peak memory from the allocator; ratios against
the mtp row. Targets (issues 11, 19): >= 0.7x the MTP step's tokens/s at <= 1.15x its peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mtp_step import SHAPES, build  # noqa: E402

from wmtp_fn.adapters import AdapterSpec, install_slots  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head  # noqa: E402
from wmtp_fn.objectives.mtp import mtp_objective  # noqa: E402
from wmtp_fn.objectives.rho1 import Reference, rho1_objective  # noqa: E402
from wmtp_fn.objectives.verifiable import initial_extra, verifiable_objective  # noqa: E402
from wmtp_fn.schedule import ScheduleConfig  # noqa: E402
from wmtp_fn.train.adamw import AdamWConfig  # noqa: E402
from wmtp_fn.train.state import init_train_state  # noqa: E402
from wmtp_fn.train.step import make_train_step  # noqa: E402

VARIANTS = ("mtp", "rho1", "rho1_step", "verifiable")


def perturbed(adapter: TensorDict, seed: int) -> TensorDict:
    """A trained-looking adapter: B non-zero (a fresh one is the identity)."""
    g = torch.Generator().manual_seed(seed)
    return adapter.apply(lambda t: (torch.randn(t.shape, generator=g) * 0.02).to(t.device))


def objective_and_extra(variant, model, spec, chunk, device):
    if variant == "mtp":
        return mtp_objective(model, spec, chunk_size=chunk, train=True), None
    if variant in ("rho1", "rho1_step"):
        ref, ref_spec = init_adapter(model, spec, seed=1, device=device)
        scope = "step" if variant == "rho1_step" else "micro_batch"
        return rho1_objective(model, spec, reference=Reference(perturbed(ref, 1), ref_spec), ratio=0.7,
                              scope=scope, chunk_size=chunk, train=True), None
    critic, critic_spec = init_adapter(model, spec, seed=2, device=device)
    head_spec = ValueHeadSpec(kind="mlp", d=model.config.hidden_size)
    head = init_value_head("mlp", model.config.hidden_size, seed=2).to(device)
    head = head.apply(lambda t: t + 0.01 * torch.randn_like(t))  # a non-constant critic
    params = TensorDict({"critic": perturbed(critic, 2), "value_head": head}, batch_size=[])
    return verifiable_objective(model, spec, params, critic_spec, head_spec, chunk_size=chunk, train=True), initial_extra(device)


def measure(variant, model, batch, seq, device, chunk, warmup, repeats, rank, vocab, dropout):
    adapter, spec = init_adapter(model, AdapterSpec(rank=rank, alpha=2 * rank, dropout=dropout), seed=0, device=device)
    objective, extra = objective_and_extra(variant, model, spec, chunk, device)
    opt = AdamWConfig(lr=1e-4, max_grad_norm=1.0)
    state = init_train_state(TensorDict({"policy": adapter}, batch_size=[]), opt, seed=0, extra=extra)
    step = make_train_step(objective, opt, ScheduleConfig(kind="constant", warmup_steps=0, total_steps=10**6))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 8] = -100  # a prompt
    micro = [{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}]

    for _ in range(warmup):
        state, metrics = step(state, micro)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, micro)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    ms = statistics.median(times)
    row = {"variant": variant, "ms": ms, "tokens_per_s": batch * seq / ms * 1e3, "peak_gib": peak,
           "loss": float(metrics["loss"])}
    for key in ("overall_ratio", "w_mean", "weight_mean"):
        if key in metrics:
            row[key] = float(metrics[key])
    del state, objective, step
    gc.collect()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="sheared-2.7b", choices=sorted(SHAPES))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of the policy (the pipelines' default)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[a.shape]
    model = build(shape, a.heads, device, dtype)
    install_slots(model)
    rows = []
    for v in a.variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(measure(v, model, a.batch, a.seq, device, a.chunk, a.warmup, a.repeats, a.rank, shape["vocab_size"], a.dropout))
        print(json.dumps(rows[-1]), flush=True)
    ref = next((r for r in rows if r["variant"] == "mtp"), rows[0])
    print(f"\n{a.shape}, H = {a.heads}, batch {a.batch} x {a.seq}, r={a.rank}, dropout {a.dropout}, {device}")
    print("| variant | ms/step | tokens/s | peak GiB | tok/s vs mtp | peak vs mtp |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
              f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
