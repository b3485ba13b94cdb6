"""Benchmark: the project's LoRA training step against PEFT's, one process, one device.

    python experiments/bench/lora_step.py --shape llama-3.2-1b          # on a GPU
    python experiments/bench/lora_step.py --shape tiny --device cpu     # smoke test (CI)
    python experiments/bench/qlora.py                                   # bf16 vs NF4 vs PEFT QLoRA

QLoRA variants (docs/qlora.md): `ours-nf4*` are the same steps over the NF4 base
(`prepare(..., quantize="nf4")`); `peft-qlora` is the seeds' recipe: `from_pretrained` with
`BitsAndBytesConfig(nf4, double quant, bf16 compute)`, `prepare_model_for_kbit_training`
(which turns on gradient checkpointing), `get_peft_model`; `peft-qlora-nogc` without the
checkpointing. Peak memory is measured from after the model is built (and quantised), so a
base quantised from bf16 weights is not charged for the bf16 copy it was made from.

Peers (`PEERS`): PEFT with fp32 or bf16 adapters, with regional compile of each decoder layer,
and with Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear CE; liger-kernel is a bench-only
dependency) with and without compile, in training mode as Trainer runs them. Every ratio in the
table is against the fastest peer of the run. Our variants are `ours` plus options
(`ours_options`): e.g. `ours-mb70`, `ours-ce4096`, `ours-flash`.

Every variant trains the same random-weight model (bf16 on GPU) on the same batch with fused
AdamW; each is built fresh so its peak memory is its own. Steps are timed with CUDA events
after warm-up, in blocks of back-to-back steps synchronised once per block (as a training
loop that reads metrics at log points runs); the median over blocks is reported. MFU is against a bf16 GEMM ceiling measured in the same
run after a warm-up, the best of several trials at the start and at the end. Before timing, the optimised step's loss and gradients are checked against the plain
eager step (full logits, no compile) on the same batch.

FLOPs per token of a frozen-base LoRA step (no weight gradients for the base):
    4·N_linear + 4·d·V + 3 · (causal attention forward, 2·d·(T+1) per layer)
LoRA's own FLOPs (~6·r·(in+out) per linear) are not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tensordict import TensorDict
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from wmtp_fn.adapters import AdapterSpec, install_slots  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.losses.ntp import ntp_count, ntp_sums  # noqa: E402
from wmtp_fn.models.base import Base, freeze  # noqa: E402
from wmtp_fn.models.layers import checkpoint_layers, compile_layers  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402
from wmtp_fn.objectives import Objective, weighted_sum  # noqa: E402
from wmtp_fn.objectives.ntp import ntp_objective  # noqa: E402
from wmtp_fn.train import adamw  # noqa: E402
from wmtp_fn.schedule import ScheduleConfig  # noqa: E402
from wmtp_fn.train.state import init_train_state  # noqa: E402
from wmtp_fn.train.step import accumulate_grads, make_train_step  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "sheared-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                         num_key_value_heads=20, vocab_size=32000, tie_word_embeddings=False),
    # the 7B MTP release's trunk (a Llama-2-7B), as experiments/bench/mtp_step.py names it
    "mtp-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}
PEERS = ("peft-default", "peft-bf16", "peft-bf16-compiled", "peft-liger", "peft-liger-compiled", "peft-qlora",
         "peft-qlora-nogc")
# Our variants are `ours` plus options joined by "-" (any order), e.g. `ours-mb70-ce8192-flash`:
#   eager (no compile), fullce (full logits, no chunked CE), ac / ac2 (checkpoint every / every 2nd layer),
#   mbNN (partitioner memory budget NN %), autotune (max-autotune-no-cudagraphs), cg (CUDA graphs:
#   mode="reduce-overhead"), nomerge (no merged LoRA A projections, models/fusion.py),
#   nf4 (NF4 base), ceN (CE chunk of N tokens), flash / cudnn / efficient (SDPA backend).
VARIANTS = PEERS + ("ours-eager-fullce", "ours-eager", "ours", "ours-ac", "ours-ac2", "ours-mb70", "ours-mb60", "ours-mb50",
                    "ours-mb30", "ours-autotune", "ours-cg", "ours-nomerge", "ours-flash", "ours-cudnn", "ours-efficient",
                    "ours-nf4-eager", "ours-nf4", "ours-nf4-ac")
ATTENTION = ("flash", "cudnn", "efficient")


def ours_options(variant: str) -> dict:
    """The build options a variant name `ours[-option]...` stands for (see VARIANTS); ValueError
    naming the part it does not know."""
    head, *parts = variant.split("-")
    if head != "ours":
        raise ValueError(f"{variant!r}: our variants start with 'ours'")
    opts = dict(compile_=True, checkpoint=0, full_ce=False, mode=None, memory_budget=None, quantize="", attention="",
                ce_chunk=None, merge_lora_a=True)
    for part in parts:
        if part == "eager":
            opts["compile_"] = False
        elif part == "fullce":
            opts["full_ce"] = True
        elif part in ("ac", "ac2"):
            opts["checkpoint"] = 1 if part == "ac" else 2
        elif re.fullmatch(r"mb\d{1,3}", part) and 0 < int(part[2:]) <= 100:
            opts["memory_budget"] = int(part[2:]) / 100  # the partitioner keeps NN % of what it would save
        elif part == "autotune":
            opts["mode"] = "max-autotune-no-cudagraphs"
        elif part == "cg":
            opts["mode"] = "reduce-overhead"
        elif part == "nomerge":
            opts["merge_lora_a"] = False
        elif part == "nf4":
            opts["quantize"] = "nf4"
        elif part in ATTENTION:
            opts["attention"] = part
        elif re.fullmatch(r"ce[1-9]\d*", part):
            opts["ce_chunk"] = int(part[2:])
        else:
            raise ValueError(f"{variant!r}: unknown option {part!r} (eager, fullce, ac, ac2, mbNN, autotune, cg, nomerge, nf4, "
                             f"ceN, {', '.join(ATTENTION)})")
    return opts


def check_variant(variant: str) -> str:
    """`variant` if it names a peer or a valid combination of our options, else ValueError."""
    if variant not in PEERS:
        ours_options(variant)
    return variant


@dataclass
class Row:
    variant: str
    ms: float
    tokens_per_s: float
    mfu: float
    peak_gib: float
    loss: float
    host_syncs: int
    error: str = ""


# ----------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, *, warmup: int, repeats: int, block: int = 1) -> list[float]:
    """Milliseconds per call after `warmup` calls: `repeats` blocks of `block` back-to-back
    calls, each block timed with CUDA events (perf_counter on CPU) and synchronised once, as
    a training loop that reads metrics only at log points runs (the host may run ahead)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(block):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / block)
        else:
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / block)
    return times


def gemm_ceiling(device: torch.device, n: int = 8192, trials: int = 5) -> float:
    """Measured dense bf16 matmul rate (FLOP/s) on random data: after a warm-up of ~100
    matmuls (a cold GPU clocks lower), the best of `trials` medians of 20."""
    if device.type != "cuda":
        n, trials = 512, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = min(statistics.median(time_steps(lambda: a @ b, device, warmup=100 if i == 0 else 5, repeats=20))
               for i in range(trials))
    return 2 * n**3 / (best * 1e-3)


def flops_per_token(cfg: LlamaConfig, seq: int) -> float:
    d, L, ffn = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    n_linear = L * (d * d * 2 + 2 * d * kv + 3 * d * ffn)
    attn_fwd = L * 2 * d * (seq + 1)
    return 4 * n_linear + 4 * d * cfg.vocab_size + 3 * attn_fwd


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


# ----------------------------------------------------------------------------- models


def build_model(cfg: LlamaConfig, state: dict[str, torch.Tensor], device, dtype) -> LlamaForCausalLM:
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.load_state_dict(state)
    return freeze(model)


def adamw_step(pm, batch, lr: float):
    """One training step of a PEFT model: its HF loss, backward, fused AdamW over what it trains."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=params[0].is_cuda)

    def step():
        loss = pm(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def peft_step(model, cfg_kwargs: dict, batch, *, bf16_adapters: bool, lr: float, compile_: bool = False,
              liger: bool = False):
    from peft import LoraConfig, get_peft_model

    if liger:  # on this instance: RMSNorm, RoPE, SwiGLU and the fused linear CE of its forward
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=model)
    pm = get_peft_model(model, LoraConfig(**cfg_kwargs), autocast_adapter_dtype=not bf16_adapters)
    pm.train()  # as Trainer runs it; Liger's fused linear CE replaces the logits only in training mode
    if compile_:  # the same regional compilation as ours: each decoder layer, PEFT's LoRA inside
        for layer in pm.base_model.model.model.layers:
            layer.compile()
    return pm, adamw_step(pm, batch, lr)


@contextmanager
def liger_scope():
    """Liger patches transformers' Llama module globally (RoPE, RMSNorm and MLP classes); undo
    that afterwards so the variants run after a Liger peer in the same process are unchanged."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward
    try:
        yield
    finally:
        for name in set(vars(modeling_llama)) - set(saved):
            delattr(modeling_llama, name)
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = forward


def hf_dir(cfg: LlamaConfig, state: dict[str, torch.Tensor], root: Path) -> Path:
    """The random model as a HuggingFace directory (written once), for `from_pretrained`."""
    from safetensors.torch import save_file

    path = root / "base"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True)
        cfg.save_pretrained(path)
        tied = cfg.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def peft_qlora_step(path: Path, cfg_kwargs: dict, batch, device: torch.device, dtype, *, lr: float,
                    gradient_checkpointing: bool):
    """The seeds' QLoRA: a bitsandbytes NF4 base (double quant, `dtype` compute) loaded by
    transformers, `prepare_model_for_kbit_training`, PEFT LoRA with fp32 adapters, AdamW."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    where = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = LlamaForCausalLM.from_pretrained(str(path), quantization_config=quant, dtype=dtype, device_map=where,
                                             attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    pm = get_peft_model(model, LoraConfig(**cfg_kwargs))
    pm.train()  # what Trainer does: transformers checkpoints layers only in training mode
    return pm, adamw_step(pm, batch, lr)


def our_parts(model, args, *, compile_: bool, checkpoint: int, full_ce: bool, mode: str | None = None,
              memory_budget: float | None = None, quantize: str = "", ce_chunk: int | None = None, attention: str = "",
              merge_lora_a: bool = True):
    record = prepare(Base.of(model, "causal_lm"), targets=TARGETS, quantize=quantize)  # slots (over NF4)
    spec = AdapterSpec(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    adapter, spec = init_adapter(record, spec, seed=0)
    gen = torch.Generator().manual_seed(1)  # the same non-zero B in every variant

    def nonzero_b(name, t):
        return (torch.randn(t.shape, generator=gen) * 1e-3).to(t.device) if name == "lora_B" else t

    adapter = adapter.named_apply(nonzero_b)
    if checkpoint:
        checkpoint_layers(model, every=checkpoint)
    if compile_:
        compile_layers(model, fullgraph=True, mode=mode, memory_budget=memory_budget, merge_lora_a=merge_lora_a)
    if full_ce:
        def loss(params, extra, batch, scale):
            from wmtp_fn.adapters import apply

            logits = apply(model, params["lora"], spec, input_ids=batch["input_ids"], use_cache=False).logits
            total, _ = ntp_sums(logits, batch["labels"])
            return weighted_sum(total.reshape(1), scale), total.reshape(1), {}

        objective = Objective(count=ntp_count, loss=loss)
    else:
        objective = ntp_objective(model, spec, chunk_size=ce_chunk or args.ce_chunk, train=True)
    return TensorDict({"lora": adapter}, batch_size=[]), objective


def our_step(model, args, batch, **options):
    """One of our training steps built with `ours_options`' options."""
    params, objective = our_parts(model, args, **options)
    opt_cfg = adamw.AdamWConfig(lr=args.lr, impl="auto")
    state = init_train_state(params, opt_cfg, seed=0)
    step_fn = make_train_step(objective, opt_cfg, ScheduleConfig(kind="constant"))
    holder = {"state": state}

    def step():
        with attention_backend(options.get("attention", "")):  # compile traces inside it, so its graphs use it too
            holder["state"], metrics = step_fn(holder["state"], [batch])
        return metrics["loss"]

    return step


def attention_backend(name: str):
    """`sdpa_kernel` restricted to one SDPA backend by name ("" = PyTorch's own choice)."""
    if not name:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


# ----------------------------------------------------------------------------- correctness guard


def adapter_grads(cfg, state, args, batch, device, dtype, **kw):
    model = build_model(cfg, state, device, dtype)
    params, objective = our_parts(model, args, **kw)
    params = params.to(device)
    grads, loss, counts, _, _ = accumulate_grads(objective, params, TensorDict(), [batch])
    out = float(loss / counts.sum()), {k: v.double() for k, v in grads.flatten_keys(".").items()}
    del model
    torch._dynamo.reset()
    return out


def check_optimised_against_eager(cfg, state, args, batch, device, dtype) -> dict[str, float]:
    """Loss and adapter gradients against an fp32 eager reference (full logits, no compile):
    the optimised step (compiled layers, chunked CE) in fp32 must match it to 1e-3 (a strict
    check of the machinery); in bf16 its error must stay within 1.5x the error of the plain
    eager bf16 step (+1e-3): bf16 alone is far from fp32 on a random deep model, whose
    per-token gradients nearly cancel."""
    ref_loss, ref = adapter_grads(cfg, state, args, batch, device, torch.float32, compile_=False, checkpoint=False, full_ce=True)
    optimised = dict(compile_=args.compile, checkpoint=args.check_ac, full_ce=False)
    out = {}
    for name, dt, kw in (("optimised_fp32", torch.float32, optimised),
                         ("eager", dtype, dict(compile_=False, checkpoint=False, full_ce=True)),
                         ("optimised", dtype, optimised)):
        loss, g = adapter_grads(cfg, state, args, batch, device, dt, **kw)
        out[f"{name}_loss_rel_err"] = abs(loss - ref_loss) / abs(ref_loss)
        for leaf in ("lora_A", "lora_B"):
            keys = [k for k in ref if k.endswith(leaf)]
            num = sum(float((g[k] - ref[k]).norm() ** 2) for k in keys) ** 0.5
            den = sum(float(ref[k].norm() ** 2) for k in keys) ** 0.5
            out[f"{name}_{leaf}_grad_rel_err"] = num / den
    metrics = ("loss_rel_err", "lora_A_grad_rel_err", "lora_B_grad_rel_err")
    out["pass"] = all(out[f"optimised_fp32_{m}"] <= 1e-3 for m in metrics) and all(
        out[f"optimised_{m}"] <= 1.5 * out[f"eager_{m}"] + 1e-3 for m in metrics
    )
    return out


def count_host_syncs(step, device: torch.device) -> int:
    """Host-device synchronisations during one step (CUDA sync debug mode)."""
    if device.type != "cuda":
        return 0
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs[:3]:
        print(f"    sync: {str(w.message).splitlines()[0]} ({w.filename}:{w.lineno})")
    return len(syncs)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ce-chunk", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed blocks")
    p.add_argument("--block", type=int, default=4, help="back-to-back steps per timed block")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-compile", dest="compile", action="store_false", help="guard: check the eager step instead")
    p.add_argument("--check-ac", action="store_true", help="guard: also activation checkpointing")
    p.add_argument("--no-guard", dest="guard", action="store_false", help="skip the correctness guard")
    p.add_argument("--profile", default="", help="variants to profile, comma-separated (top kernels by CUDA time)")
    p.add_argument("--trace", default="", help="write a gzipped Chrome trace (CPU+CUDA, 2 steps) of --profile's variant here")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--keep-going", action="store_true", help="record a failing variant and go on to the next")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        try:
            check_variant(v)
        except ValueError as e:
            p.error(f"--variants: {e}; peers are {', '.join(PEERS)}")
    if device.type == "cpu":
        args.seq, args.batch = min(args.seq, 64), min(args.batch, 2)

    cfg = LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa", max_position_embeddings=max(args.seq, 2048))
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device (a 7B model's init on the CPU takes minutes)
        init_model = LlamaForCausalLM(cfg)
    state = {k: v.to("cpu", dtype) for k, v in init_model.state_dict().items()}  # one random model, kept on the CPU
    del init_model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    tokens = args.batch * args.seq

    ceiling = gemm_ceiling(device)
    fpt = flops_per_token(cfg, args.seq)
    guard = check_optimised_against_eager(cfg, state, args, batch, device, dtype) if args.guard else {"pass": True}
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"shape {args.shape} batch {args.batch}x{args.seq} r={args.rank}; GEMM ceiling {ceiling / 1e12:.0f} TFLOP/s; "
          f"{fpt / 1e9:.2f} GFLOP/token; ideal {ceiling / fpt:,.0f} tok/s")
    print("guard vs fp32 eager reference: " + ", ".join(f"{k} {v:.2e}" for k, v in guard.items() if k != "pass")
          + f" -> {'PASS' if guard['pass'] else 'FAIL'}")

    peft_kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(TARGETS))
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="lora_step_")
    for variant in variants:
        try:
            with liger_scope() if variant.startswith("peft-liger") else nullcontext():
                row = run_variant(variant, cfg, state, args, batch, device, dtype, peft_kwargs, Path(scratch.name),
                                  tokens, fpt, ceiling)
        except Exception as e:  # one variant failing (a kernel missing, OOM) must not lose the others
            if not args.keep_going:
                raise
            print(f"  {variant:18s} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            row = Row(variant, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), -1,
                      error=f"{type(e).__name__}: {e}"[:500])
        rows.append(row)
        gc.collect()
        torch._dynamo.reset()
    scratch.cleanup()

    # The GPU is warmest now: measure the ceiling again and keep the better one (MFU against it).
    ceiling = max(ceiling, gemm_ceiling(device))
    for r in rows:
        r.mfu = r.tokens_per_s * fpt / ceiling
    ref = fastest_peer(rows)
    print(f"\nGEMM ceiling (best, warm) {ceiling / 1e12:.0f} TFLOP/s; ratios against the fastest peer: "
          f"{ref.variant if ref else 'none run'}")
    print("| variant | ms/step | tokens/s | MFU | peak GiB | × fastest peer speed | × its memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = f"{r.tokens_per_s / ref.tokens_per_s:.2f}" if ref else "-"
        mem = f"{r.peak_gib / ref.peak_gib:.2f}" if ref and device.type == "cuda" else "-"
        print(f"| {r.variant} | {r.ms:.1f} | {r.tokens_per_s:,.0f} | {r.mfu:.3f} | {r.peak_gib:.1f} | {speed} | {mem} |")
    result = {"args": vars(args), "ceiling_flops": ceiling, "flops_per_token": fpt, "guard": guard,
              "fastest_peer": ref.variant if ref else None, "rows": [asdict(r) for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def count_merges() -> list[int]:
    """Record how many LoRA A projections `models.fusion` merges away in each graph compiled from
    now on (a list that grows), so a run shows that the pass matched this torch's graphs."""
    from wmtp_fn.models import fusion

    counts: list[int] = []
    real = getattr(fusion.merge_shared_lora_a, "__wrapped__", fusion.merge_shared_lora_a)

    def counted(graph):
        counts.append(real(graph))
        return counts[-1]

    counted.__wrapped__ = real
    fusion.merge_shared_lora_a = counted
    return counts


def fastest_peer(rows: list[Row]) -> Row | None:
    """The peer (a PEFT variant) with the most tokens/s among those that ran, or None."""
    peers = [r for r in rows if r.variant in PEERS and not r.error]
    return max(peers, key=lambda r: r.tokens_per_s, default=None)


def run_variant(variant, cfg, state, args, batch, device, dtype, peft_kwargs, scratch: Path, tokens, fpt, ceiling) -> Row:
    """Build `variant` fresh, time it, and return its row (peak memory from after the build)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    if variant.startswith("peft-qlora"):
        model, step = peft_qlora_step(hf_dir(cfg, state, scratch), peft_kwargs, batch, device, dtype, lr=args.lr,
                                      gradient_checkpointing=variant == "peft-qlora")
    else:
        model = build_model(cfg, state, device, dtype)
        if variant.startswith("peft"):
            model, step = peft_step(model, peft_kwargs, batch, bf16_adapters=variant != "peft-default", lr=args.lr,
                                    compile_=variant.endswith("-compiled"), liger=variant.startswith("peft-liger"))
        else:
            step = our_step(model, args, batch, **ours_options(variant))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    merges = count_merges()
    times = time_steps(step, device, warmup=args.warmup, repeats=args.repeats, block=args.block)
    syncs = count_host_syncs(step, device)
    loss = float(step().detach())
    ms = statistics.median(times)
    tps = tokens / (ms * 1e-3)
    row = Row(variant, ms, tps, tps * fpt / ceiling, peak_gib(device), loss, syncs)
    print(f"  {variant:18s} {ms:8.1f} ms  {tps:10,.0f} tok/s  MFU {row.mfu:.3f}  peak {row.peak_gib:6.1f} GiB  loss {loss:.3f}  syncs {syncs}"
          + (f"  A projections merged per graph {merges}" if merges else ""), flush=True)
    if variant in args.profile.split(",") and device.type == "cuda":
        profile_step(step, trace=args.trace)
    del model, step
    return row


def profile_step(step, n: int = 3, trace: str = "") -> None:
    """Top kernels by CUDA time over `n` steps; optionally a CPU+CUDA Chrome trace of 2 steps."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / n
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / n
    print(f"    profile: {len(kernels) / n:,.0f} kernels/step, {busy:.1f} ms/step of kernels, {wall:.1f} ms/step wall "
          f"(profiled), {wall - busy:.1f} ms/step not covered by a kernel")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))
    if trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        Path(trace).unlink()


if __name__ == "__main__":
    main()
