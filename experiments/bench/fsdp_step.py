"""Benchmark: the train step on the plain path against the FSDP2 path, same shape, one process.

    torchrun --nproc_per_node=1 experiments/bench/fsdp_step.py --shape llama-3.2-1b     # on a GPU (NCCL)
    python experiments/bench/fsdp_step.py --shape tiny --device cpu                      # smoke test (gloo)

Both variants train the same random-weight base (bf16 on GPU) with the same LoRA adapter
(`--rank`, all seven linears) on the same batch, through the project's own pieces:
`models.prepare` (slots; with `--fsdp-only` / by default also `shard="full"` for the FSDP2
variant), `objectives.ntp` (chunked CE), `train.step.make_train_step` with the process-group
`Comm`. The FSDP2 variant runs under a world of one: every decoder layer, the embedding and the
norm are DTensors, all-gathered by FSDP2's hooks in each forward and backward — the whole
distributed code path, with nothing to split. Each variant is built fresh and freed before the
next, so its peak memory is its own. Steps are timed as in `lora_step.py` (CUDA events, blocks
of back-to-back steps, the median block). Before timing, the first step's loss of both
variants is compared (the same math: equal up to the order of reductions).

Not launched by torchrun, the script starts a one-rank process group itself (gloo on CPU,
NCCL on a GPU), so the plain `python` command works too.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import sys
from pathlib import Path

import torch
from tensordict import TensorDict
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def _sibling(name: str):
    """A bench script next to this one, loaded by path (the bench directory never joins sys.path,
    where its `generate.py` would shadow other modules)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_lora_step = _sibling("lora_step")
SHAPES, TARGETS = _lora_step.SHAPES, _lora_step.TARGETS
build_model, peak_gib, sync, time_steps = _lora_step.build_model, _lora_step.peak_gib, _lora_step.sync, _lora_step.time_steps

from wmtp_fn.adapters import AdapterSpec  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.dist.comm import LOCAL, launched, process_comm, shutdown  # noqa: E402
from wmtp_fn.dist.shard import is_sharded  # noqa: E402
from wmtp_fn.models.base import Base  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402
from wmtp_fn.objectives.ntp import ntp_objective  # noqa: E402
from wmtp_fn.schedule import ScheduleConfig  # noqa: E402
from wmtp_fn.train import adamw  # noqa: E402
from wmtp_fn.train.state import init_train_state  # noqa: E402
from wmtp_fn.train.step import make_train_step  # noqa: E402

VARIANTS = ("plain", "fsdp")


def one_rank_group_env() -> None:
    """The env:// rendezvous of a one-rank group on a free local port (what torchrun would set)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def make_step(variant: str, cfg: LlamaConfig, state: dict, batch: dict, args, device, dtype, comm):
    """A fresh base of `variant`, prepared, and `step() -> loss` over its train state."""
    model = build_model(cfg, state, device, dtype)
    base = Base(model, "causal_lm", {})  # no fingerprint: nothing here checks one
    prepare(base, targets=TARGETS, activation_checkpointing=args.activation_checkpointing, compile=args.compile,
            shard="full" if variant == "fsdp" else None, reshard_after_forward=not args.no_reshard)
    if variant == "fsdp":
        assert is_sharded(model.model.layers[0].self_attn.q_proj.weight)
    adapter, spec = init_adapter(base, AdapterSpec(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS), seed=0)
    gen = torch.Generator().manual_seed(1)  # a non-zero B, the same in both variants
    adapter = adapter.named_apply(lambda name, t: (torch.randn(t.shape, generator=gen) * 1e-3).to(t.device)
                                  if name == "lora_B" else t)
    objective = ntp_objective(model, spec, chunk_size=args.ce_chunk, train=True)
    opt_cfg = adamw.AdamWConfig(lr=1e-4, impl="auto")
    holder = {"state": init_train_state(TensorDict({"lora": adapter}, batch_size=[]), opt_cfg, seed=0)}
    step_fn = make_train_step(objective, opt_cfg, ScheduleConfig(kind="constant"),
                              comm=comm if variant == "fsdp" else LOCAL)

    def step():
        holder["state"], metrics = step_fn(holder["state"], [batch])
        return metrics["loss"]

    return model, step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default 2048 (64 for --shape tiny)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ce-chunk", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer in both variants")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--no-reshard", action="store_true", help="FSDP2 reshard_after_forward=False")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = 64 if args.shape == "tiny" else 2048

    if not launched():
        one_rank_group_env()
    comm, device = process_comm(torch.device(args.device))
    if comm.world_size != 1:
        raise SystemExit(f"fsdp_step.py compares one rank's paths; run it with --nproc_per_node=1 (got {comm.world_size})")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    tokens = args.batch * args.seq
    with torch.device(device):  # one random base (initialised on the device, fast), kept on the CPU
        torch.manual_seed(0)
        state = {k: v.to(dtype).cpu() for k, v in LlamaForCausalLM(cfg).state_dict().items()}

    rows, first_loss = [], {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; expected {VARIANTS}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model, step = make_step(variant, cfg, state, batch, args, device, dtype, comm)
        first_loss[variant] = float(step())
        times = time_steps(step, device, warmup=args.warmup, repeats=args.repeats, block=args.block)
        sync(device)
        ms = statistics.median(times)
        rows.append({"variant": variant, "ms": ms, "tokens_per_s": tokens / (ms * 1e-3), "peak_gib": peak_gib(device)})
        del model, step
    out = {"shape": args.shape, "device": str(device), "dtype": str(dtype), "batch": args.batch, "seq": args.seq,
           "rank": args.rank, "compile": args.compile, "reshard_after_forward": not args.no_reshard,
           "torch": torch.__version__, "rows": rows, "first_loss": first_loss}
    by = {r["variant"]: r for r in rows}
    if "plain" in by and "fsdp" in by:
        out["ratio"] = {
            "tokens_per_s": by["fsdp"]["tokens_per_s"] / by["plain"]["tokens_per_s"],
            "peak_gib": by["fsdp"]["peak_gib"] / by["plain"]["peak_gib"] if device.type == "cuda" else float("nan"),
        }
        out["loss_rel_diff"] = abs(first_loss["fsdp"] - first_loss["plain"]) / abs(first_loss["plain"])
    print(f"{args.shape} batch {args.batch}x{args.seq} r={args.rank} {dtype} on {device} (torch {torch.__version__})")
    print(f"{'variant':8} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} {'first loss':>11}")
    for r in rows:
        print(f"{r['variant']:8} {r['ms']:9.1f} {r['tokens_per_s']:10,.0f} {r['peak_gib']:9.2f} {first_loss[r['variant']]:11.5f}")
    if "ratio" in out:
        print(f"fsdp / plain: tokens/s {out['ratio']['tokens_per_s']:.3f}, peak memory {out['ratio']['peak_gib']:.3f}, "
              f"first-loss relative difference {out['loss_rel_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    shutdown()
    return out


if __name__ == "__main__":
    main()
