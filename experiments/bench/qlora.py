"""Benchmark: QLoRA, one command: bf16 vs NF4 (ours) vs PEFT QLoRA (bitsandbytes), NTP and MTP.

    python experiments/bench/qlora.py --json qlora.json                     # on a GPU (both shapes)
    python experiments/bench/qlora.py --shapes tiny --device cpu --quick     # smoke test

For each shape, in one process: the NTP step (`lora_step.py`) as `ours` (bf16 base, compiled
layers), `ours-nf4` (the same over the NF4 base), both again with activation checkpointing
(`-ac`), and `peft-qlora` (the seeds' recipe: transformers + bitsandbytes NF4, double quant,
`prepare_model_for_kbit_training`, which checkpoints); then the MTP step (`mtp_step.py`,
sequential heads, eager) at H heads, bf16 vs NF4. Each variant is built fresh; peak memory
is the allocator's peak while training (after the build). Targets (issue #17), checked on
the last shape: NF4 peak <= 0.45x bf16's at >= 0.8x its tokens/s; faster than PEFT QLoRA at
no more memory (ours-nf4-ac against peft-qlora: both checkpoint).
Needs bitsandbytes (the `quant` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NTP_VARIANTS = ("ours", "ours-nf4", "ours-ac", "ours-nf4-ac", "peft-qlora")
MTP_VARIANTS = ("sequential", "sequential-nf4")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def targets(ntp: dict[str, dict]) -> dict[str, float | bool]:
    """The issue's targets from the NTP rows of one shape (nan where a row is missing)."""
    get = lambda v, k: ntp.get(v, {}).get(k, float("nan"))  # noqa: E731
    out = {
        "nf4_vs_bf16_peak": ratio(get("ours-nf4", "peak_gib"), get("ours", "peak_gib")),
        "nf4_vs_bf16_speed": ratio(get("ours-nf4", "tokens_per_s"), get("ours", "tokens_per_s")),
        "nf4_ac_vs_bf16_ac_peak": ratio(get("ours-nf4-ac", "peak_gib"), get("ours-ac", "peak_gib")),
        "nf4_ac_vs_bf16_ac_speed": ratio(get("ours-nf4-ac", "tokens_per_s"), get("ours-ac", "tokens_per_s")),
        "nf4_ac_vs_peft_qlora_peak": ratio(get("ours-nf4-ac", "peak_gib"), get("peft-qlora", "peak_gib")),
        "nf4_ac_vs_peft_qlora_speed": ratio(get("ours-nf4-ac", "tokens_per_s"), get("peft-qlora", "tokens_per_s")),
    }
    out["pass_memory_speed"] = any(
        out[f"{p}_peak"] <= 0.45 and out[f"{p}_speed"] >= 0.8 for p in ("nf4_vs_bf16", "nf4_ac_vs_bf16_ac"))
    out["pass_vs_peft"] = out["nf4_ac_vs_peft_qlora_speed"] > 1 and out["nf4_ac_vs_peft_qlora_peak"] <= 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["sheared-2.7b", "mtp-7b"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="MTP heads")
    p.add_argument("--ntp-variants", default=",".join(NTP_VARIANTS))
    p.add_argument("--mtp-variants", nargs="*", default=list(MTP_VARIANTS))
    p.add_argument("--quick", action="store_true", help="one warm-up step and one timed block (smoke test)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    lora_step, mtp_step = load("lora_step"), load("mtp_step")
    device = ["--device", args.device] if args.device else []
    timing = ["--warmup", "1", "--repeats", "1"] if args.quick else ["--warmup", "2", "--repeats", "3"]
    result = {"args": vars(args), "shapes": {}}
    for shape in args.shapes:
        print(f"\n=== {shape}: NTP step", flush=True)
        ntp = lora_step.main([
            "--shape", shape, *device, "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--variants", args.ntp_variants, "--no-guard", "--keep-going", *timing, "--block", "1" if args.quick else "2",
        ])
        mtp = []
        if args.mtp_variants:
            print(f"\n=== {shape}: MTP step, {args.heads} heads", flush=True)
            mtp = mtp_step.main([
                "--shape", shape, *device, "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
                "--heads", str(args.heads), "--variants", *args.mtp_variants, "--keep-going", *timing,
            ])
        rows = {r["variant"]: r for r in ntp["rows"]}
        result["shapes"][shape] = {"ntp": ntp["rows"], "mtp": mtp, "targets": targets(rows)}

    print("\n| shape | step | variant | ms/step | tokens/s | peak GiB | × bf16 speed | × bf16 memory |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape, r in result["shapes"].items():
        ntp = {x["variant"]: x for x in r["ntp"]}
        for x in r["ntp"]:
            ref = ntp.get("ours-ac" if x["variant"].endswith("-ac") or x["variant"] == "peft-qlora" else "ours", {})
            print(f"| {shape} | NTP | {x['variant']} | {x['ms']:.1f} | {x['tokens_per_s']:,.0f} | {x['peak_gib']:.1f} | "
                  f"{ratio(x['tokens_per_s'], ref.get('tokens_per_s', float('nan'))):.2f} | "
                  f"{ratio(x['peak_gib'], ref.get('peak_gib', float('nan'))):.2f} |")
        mtp = {x["variant"]: x for x in r["mtp"]}
        for x in r["mtp"]:
            ref = mtp.get("sequential", {})
            print(f"| {shape} | MTP H={x['n_future']} | {x['variant']} | {x['ms']:.1f} | {x['tokens_per_s']:,.0f} | "
                  f"{x['peak_gib']:.1f} | {ratio(x['tokens_per_s'], ref.get('tokens_per_s', float('nan'))):.2f} | "
                  f"{ratio(x['peak_gib'], ref.get('peak_gib', float('nan'))):.2f} |")
    for shape, r in result["shapes"].items():
        print(f"{shape} targets: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r["targets"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
