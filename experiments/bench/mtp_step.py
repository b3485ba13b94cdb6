"""Benchmark: the MTP LoRA step, naive all-heads vs one head at a time, against the NTP step.

    python experiments/bench/mtp_step.py --shape sheared-2.7b --heads 1 2 4 8     # on a GPU
    python experiments/bench/mtp_step.py --shape tiny --device cpu --heads 1 2    # smoke test

naive:      logits [B, T, H, V] from all heads, fp32 cross-entropy per head, one backward.
sequential: trunk once; per head: forward on the detached trunk output, chunked CE from the
            hidden states (no logits held), backward into the head's adapter and the trunk
            cotangent; then one trunk backward (`objectives.detached`).
ntp:        the plain Llama (trunk + head 0 = the same layers), chunked CE.
naive-nf4, sequential-nf4: the same over the NF4 (QLoRA) base: `prepare(..., quantize="nf4")`.
Each variant: a fresh random-weight bf16 base, LoRA on all 7 linears of trunk and heads, fused
AdamW on the fp32 masters; median ms/step over blocks timed with CUDA events after warm-up;
peak memory from the allocator. Targets (issue): peak memory at H = 4 <= 1.2x NTP's; tokens/s
>= 0.8 x NTP's x (trunk+1)/(trunk+H).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wmtp_fn.adapters import AdapterSpec, apply  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.losses.cross_entropy import linear_cross_entropy  # noqa: E402
from wmtp_fn.models.base import Base, freeze  # noqa: E402
from wmtp_fn.models.mtp import MTPLlama, mtp_config  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402
from wmtp_fn.objectives.detached import backward_through_detached  # noqa: E402

SHAPES = {
    "sheared-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                         num_key_value_heads=20, vocab_size=32000),
    "mtp-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build(shape: dict, n_future: int, device, dtype) -> MTPLlama:
    """Random MTP base: the shape's layers as trunk + head 0, plus n_future - 1 extra heads."""
    cfg = mtp_config(n_future, **{**shape, "num_hidden_layers": shape["num_hidden_layers"] + n_future - 1},
                     tie_word_embeddings=False, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = MTPLlama(cfg).to(dtype)
    torch.manual_seed(0)  # the same weights for every variant of a shape
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    return freeze(model)


def targets_of(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Head k (1-based) at position t predicts labels[:, t + k]; the last k positions have none."""
    return torch.cat([labels[:, k:], torch.full_like(labels[:, :k], -100)], dim=1)


def naive_loss(model, adapter, spec, ids, labels):
    logits = apply(model, adapter, spec, ids, train=True)  # [B, T, H, V]
    H = logits.shape[2]
    losses = [F.cross_entropy(logits[:, :, k].flatten(0, 1).float(), targets_of(labels, k + 1).flatten(), ignore_index=-100)
              for k in range(H)]
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach()


def sequential_loss(model, adapter, spec, ids, labels, chunk):
    H = model.n_future
    counts = [(targets_of(labels, k + 1) != -100).sum().clamp_min(1) for k in range(H)]

    def heads(m, trunk):
        def branch(k):
            def f(z):
                h = m.head_hidden(trunk, k, z=z)
                nll = linear_cross_entropy(h.flatten(0, 1), m.lm_head.weight, targets_of(labels, k + 1).flatten(), chunk_size=chunk)
                return nll.sum() / (counts[k] * H)
            return f

        objective, values = backward_through_detached(trunk.hidden, [branch(k) for k in range(H)])
        objective.backward()
        return torch.stack(values).sum()

    return apply(model, adapter, spec, ids, train=True, then=heads)


def measure(variant, shape, n_future, batch, seq, device, dtype, chunk, warmup, repeats, rank):
    torch.cuda.empty_cache() if device.type == "cuda" else None
    model = build(shape, n_future, device, dtype)
    base = prepare(Base.of(model, "mtp"), quantize="nf4" if variant.endswith("-nf4") else "")  # slots (over NF4)
    adapter, spec = init_adapter(base, AdapterSpec(rank=rank, alpha=2 * rank), seed=0, device=device)
    leaves = [t.requires_grad_() for t in adapter.values(include_nested=True, leaves_only=True)]
    opt = torch.optim.AdamW(leaves, lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 8] = -100  # a prompt

    def step():
        if variant.startswith("naive"):
            loss = naive_loss(model, adapter, spec, ids, labels)
        else:
            loss = sequential_loss(model, adapter, spec, ids, labels, chunk)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss = step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    ms = statistics.median(times)
    del model, adapter, opt, leaves
    gc.collect()
    return {"variant": variant, "n_future": n_future, "ms": ms, "tokens_per_s": batch * seq / ms * 1e3,
            "peak_gib": peak, "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="sheared-2.7b", choices=sorted(SHAPES))
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["naive", "sequential"])
    p.add_argument("--json", default=None)
    p.add_argument("--keep-going", action="store_true", help="record any failing variant (not only OOM) and go on")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[a.shape]
    rows = []
    for h in a.heads:
        for v in a.variants:
            if v.startswith("naive") and h == 1:
                continue  # H = 1 naive is the full-logits NTP step; the NTP row is sequential H = 1
            try:
                r = measure(v, shape, h, a.batch, a.seq, device, dtype, a.chunk, a.warmup, a.repeats, a.rank)
            except Exception as e:  # OOM, or a kernel missing: recorded, and the other variants still run
                if not isinstance(e, torch.OutOfMemoryError) and not a.keep_going:
                    raise
                r = {"variant": v, "n_future": h, "ms": float("nan"), "tokens_per_s": float("nan"), "peak_gib": float("inf"),
                     "loss": float("nan"), "error": f"{type(e).__name__}: {e}"[:500]}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
    ntp = next((r for r in rows if r["variant"] == "sequential" and r["n_future"] == 1), None)
    trunk = shape["num_hidden_layers"] - 1
    print(f"\n{a.shape}, batch {a.batch} x {a.seq}, r={a.rank}, {device}")
    print("| H | variant | ms/step | tokens/s | peak GiB | tok/s vs target | peak vs NTP |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tgt = mem = ""
        if ntp:
            ideal = ntp["tokens_per_s"] * (trunk + 1) / (trunk + r["n_future"])
            tgt = f"{r['tokens_per_s'] / (0.8 * ideal):.2f}"
            mem = f"{r['peak_gib'] / ntp['peak_gib']:.2f}" if device.type == "cuda" else ""
        print(f"| {r['n_future']} | {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {tgt} | {mem} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
