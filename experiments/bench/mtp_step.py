"""Benchmark: the MTP LoRA step, naive all-heads vs one head at a time, against NTP and PEFT.

    python experiments/bench/mtp_step.py --shape sheared-2.7b --heads 1 2 4 8     # on a GPU
    python experiments/bench/mtp_step.py --shape sheared-2.7b --heads 4 \
        --variants ntp naive sequential peft-naive peft-naive-compiled         # with the PEFT peers
    python experiments/bench/mtp_step.py --shape tiny --device cpu --heads 1 2    # smoke test

Our variants (LoRA through `adapters.apply`, fp32 adapter masters, eager):
naive:      logits [B, T, H, V] from all heads, fp32 cross-entropy per head, one backward.
sequential: trunk once; per head: forward on the detached trunk output, chunked CE from the
            hidden states (no logits held), backward into the head's adapter and the trunk
            cotangent; then one trunk backward (`objectives.detached`).
ntp:        the plain Llama (trunk + head 0 = the same layers: an MTP base with one head),
            chunked CE, one backward; measured once, at H = 1, whatever --heads says.
naive-nf4, sequential-nf4: the same over the NF4 (QLoRA) base: `prepare(..., quantize="nf4")`.
(Without an `ntp` row, `sequential` at H = 1 is the NTP reference, as in earlier runs.)

Peers (`PEERS`), PEFT with a hand-written MTP loss:
peft-naive: `get_peft_model` with LoRA on the same 7 linears (trunk, head 0 and the extra
            heads), the same r / alpha / dropout, bf16 adapters (`autocast_adapter_dtype=False`,
            PEFT's fastest eager configuration), training mode; the wrapped MTPLlama's own
            forward gives the all-head logits [B, T, H, V], and `all_heads_ce` (the loss of
            `naive`) is taken over them, one backward.
peft-naive-compiled: the same with regional compile (`layer.compile()`) of every decoder layer
            and extra head, PEFT's LoRA inside.

Each variant: a fresh random-weight bf16 base (the same weights), the same batch, fused torch
AdamW over what it trains; median ms/step over steps timed with CUDA events after warm-up;
peak memory from the allocator over the timed steps. Targets (issue): peak memory at H = 4 <=
1.2x NTP's; tokens/s >= 0.8 x NTP's x (trunk+1)/(trunk+H). Where peers ran at a row's H, the
row also gets its tokens/s and peak memory as multiples of the fastest peer's at that H.
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
from wmtp_fn.adapters.spec import TARGETS  # noqa: E402  (the 7 linears, AdapterSpec's default)
from wmtp_fn.losses.cross_entropy import linear_cross_entropy  # noqa: E402
from wmtp_fn.models.base import Base, freeze  # noqa: E402
from wmtp_fn.models.mtp import MTPLlama, mtp_config  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402
from wmtp_fn.objectives.detached import backward_through_detached  # noqa: E402

OURS = ("ntp", "naive", "sequential", "naive-nf4", "sequential-nf4", "naive-compiled", "sequential-compiled")
PEERS = ("peft-naive", "peft-naive-compiled")
VARIANTS = OURS + PEERS
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


def make_batch(shape: dict, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's batch: ids [batch, seq] (seeded) and labels with the first seq // 8 of each row masked (a prompt)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 8] = -100
    return ids, labels


def all_heads_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The hand-written MTP loss over all-head logits [B, T, H, V] and labels [B, T]: fp32
    cross-entropy of head k (0-based) against labels[t + k + 1], mean over the targets a head
    has, then mean over heads; a scalar."""
    H = logits.shape[2]
    losses = [F.cross_entropy(logits[:, :, k].flatten(0, 1).float(), targets_of(labels, k + 1).flatten(), ignore_index=-100)
              for k in range(H)]
    return torch.stack(losses).mean()


def naive_loss(model, adapter, spec, ids, labels):
    loss = all_heads_ce(apply(model, adapter, spec, ids, train=True), labels)  # logits [B, T, H, V]
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


def ntp_loss(model, adapter, spec, ids, labels, chunk):
    """Plain next-token prediction on a one-head base: trunk + head 0 in one graph, chunked CE, one backward."""
    targets = targets_of(labels, 1).flatten()
    count = (targets != -100).sum().clamp_min(1)

    def head0(m, trunk):
        nll = linear_cross_entropy(m.head_hidden(trunk, 0).flatten(0, 1), m.lm_head.weight, targets, chunk_size=chunk)
        loss = nll.sum() / count
        loss.backward()
        return loss.detach()

    return apply(model, adapter, spec, ids, train=True, then=head0)


def peft_model(model: MTPLlama, rank: int, *, compile_: bool = False):
    """PEFT LoRA over an MTP base, as the peers run it: the 7 linears of every decoder layer
    (trunk, head 0, extra heads), alpha = 2 r, no dropout, adapters in the base's dtype
    (`autocast_adapter_dtype=False`), training mode; `compile_`: `layer.compile()` on each layer."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    pm = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    pm.train()
    if compile_:
        base = pm.get_base_model()
        for layer in [*base.model.layers, *base.extra_heads]:
            layer.compile()
    return pm


def peft_naive_loss(pm, ids, labels):
    """The peer's step: the PEFT-wrapped MTPLlama's own forward (all-head logits [B, T, H, V]),
    `all_heads_ce`, one backward."""
    loss = all_heads_ce(pm(ids), labels)
    loss.backward()
    return loss.detach()


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def measure(variant, shape, n_future, batch, seq, device, dtype, chunk, warmup, repeats, rank):
    gc.collect()  # the previous variant's model (closures hold it in cycles)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    torch._dynamo.reset()  # a compiled peer's graphs and caches do not carry into the next variant
    model = build(shape, n_future, device, dtype)
    ids, labels = make_batch(shape, batch, seq, device)
    if variant in PEERS:
        model = peft_model(model, rank, compile_=variant.endswith("-compiled"))
        leaves = [p for p in model.parameters() if p.requires_grad]

        def loss_of():
            return peft_naive_loss(model, ids, labels)
    else:
        base = prepare(Base.of(model, "mtp"), quantize="nf4" if variant.endswith("-nf4") else "",  # slots (over NF4)
                       compile=variant.endswith("-compiled"), dynamic=False)  # regional compile of trunk layers and heads
        adapter, spec = init_adapter(base, AdapterSpec(rank=rank, alpha=2 * rank), seed=0, device=device)
        leaves = [t.requires_grad_() for t in adapter.values(include_nested=True, leaves_only=True)]

        def loss_of():
            if variant.startswith("naive"):
                return naive_loss(model, adapter, spec, ids, labels)
            if variant.startswith("ntp"):
                return ntp_loss(model, adapter, spec, ids, labels, chunk)
            return sequential_loss(model, adapter, spec, ids, labels, chunk)
    opt = torch.optim.AdamW(leaves, lr=1e-4, fused=device.type == "cuda")

    def step():
        loss = loss_of()
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
    del model, opt, leaves, loss_of, step
    gc.collect()
    return {"variant": variant, "n_future": n_future, "ms": ms, "tokens_per_s": batch * seq / ms * 1e3,
            "peak_gib": peak, "loss": float(loss)}


def ntp_reference(rows: list[dict]) -> dict | None:
    """The NTP row the targets are against: `ntp`, else `sequential` at H = 1 (earlier runs' NTP row)."""
    ok = [r for r in rows if not r.get("error")]
    return next((r for r in ok if r["variant"] == "ntp"), None) or next(
        (r for r in ok if r["variant"] == "sequential" and r["n_future"] == 1), None)


def fastest_peers(rows: list[dict]) -> dict[int, dict]:
    """Per H: the peer row with the most tokens/s among the peers that ran at that H."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["variant"] in PEERS and not r.get("error"):
            h = r["n_future"]
            if h not in best or r["tokens_per_s"] > best[h]["tokens_per_s"]:
                best[h] = r
    return best


def add_ratios(rows: list[dict], trunk: int) -> None:
    """In place, on each row: `tok_s_vs_target` (tokens/s over 0.8 x NTP's x (trunk+1)/(trunk+H))
    and `peak_vs_ntp` where an NTP reference ran; `peer`, `tok_s_vs_peer` and `peak_vs_peer`
    against the fastest peer at the row's H where peers ran there (our variants only)."""
    ntp = ntp_reference(rows)
    peers = fastest_peers(rows)
    for r in rows:
        if ntp:
            ideal = ntp["tokens_per_s"] * (trunk + 1) / (trunk + r["n_future"])
            r["tok_s_vs_target"] = r["tokens_per_s"] / (0.8 * ideal)
            r["peak_vs_ntp"] = r["peak_gib"] / ntp["peak_gib"]
        peer = peers.get(r["n_future"])
        if peer and r["variant"] not in PEERS:
            r["peer"] = peer["variant"]
            r["tok_s_vs_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["peak_vs_peer"] = r["peak_gib"] / peer["peak_gib"]


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
    p.add_argument("--variants", nargs="+", default=["naive", "sequential"], help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--json", default=None)
    p.add_argument("--keep-going", action="store_true", help="record any failing variant (not only OOM) and go on")
    a = p.parse_args(argv)
    for v in a.variants:
        try:
            check_variant(v)
        except ValueError as e:
            p.error(f"--variants: {e}")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[a.shape]
    runs = [(1, "ntp")] if "ntp" in a.variants else []  # NTP is one head, whatever --heads says
    for h in a.heads:
        for v in a.variants:
            if v == "ntp" or (v.startswith("naive") and h == 1):
                continue  # H = 1 naive is the full-logits NTP step; the NTP rows are ntp / sequential H = 1
            runs.append((h, v))
    rows = []
    for h, v in runs:
        try:
            r = measure(v, shape, h, a.batch, a.seq, device, dtype, a.chunk, a.warmup, a.repeats, a.rank)
        except Exception as e:  # OOM, or a kernel missing: recorded, and the other variants still run
            if not isinstance(e, torch.OutOfMemoryError) and not a.keep_going:
                raise
            r = {"variant": v, "n_future": h, "ms": float("nan"), "tokens_per_s": float("nan"), "peak_gib": float("inf"),
                 "loss": float("nan"), "error": f"{type(e).__name__}: {e}"[:500]}
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append(r)
        print(json.dumps(r), flush=True)
    trunk = shape["num_hidden_layers"] - 1
    add_ratios(rows, trunk)
    cuda = device.type == "cuda"

    def fmt(r, key):
        return f"{r[key]:.2f}" if key in r and (cuda or not key.startswith("peak")) else ""

    print(f"\n{a.shape}, batch {a.batch} x {a.seq}, r={a.rank}, {device}")
    print("| H | variant | ms/step | tokens/s | peak GiB | tok/s vs target | peak vs NTP | fastest peer | tok/s vs peer "
          "| peak vs peer |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['n_future']} | {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
              f"{fmt(r, 'tok_s_vs_target')} | {fmt(r, 'peak_vs_ntp')} | {r.get('peer', '')} | {fmt(r, 'tok_s_vs_peer')} | "
              f"{fmt(r, 'peak_vs_peer')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
