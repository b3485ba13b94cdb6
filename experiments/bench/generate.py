"""Benchmark: generated tokens/s of the evaluation's generation against plain transformers.

    python experiments/bench/generate.py                                    # GPU: Sheared-2.7B shape
    python experiments/bench/generate.py --shape smollm2-135m
    python experiments/bench/generate.py --base /models/llama --tokenizer /models/llama
    python experiments/bench/generate.py --shape tiny --device cpu --prompts 4 --samples 2 \\
        --max-new-tokens 16                                                 # smoke test (CI)

Variants, each on its own freshly built model of the same weights, one process, one device:

    ours     wmtp_fn.eval.generate: the adapter merged into the weights for the call
             (`adapters.merged_into`), stop sequences checked during generation (what
             `evaluate` runs)
    ours-bound  the same with the adapter bound into the base's LoRA slots instead
    ours-nostops  ours without the stop-sequence check (its cost)
    ours-static  ours with a static KV cache (Sampling.cache="static": on a GPU transformers
             compiles the decoding step)
    peft     transformers generate on a PeftModel holding the same adapter (a PEFT directory)
    merged   transformers generate on the base with the adapter merged into its weights
    merged-static  the same with transformers' static cache (cache_implementation="static")
    base     transformers generate on the base alone (no adapter: the ceiling)

Every variant gets the same HumanEval prompts x samples, in the same left-padded batches
(prompts sorted by length), sampling at temperature 0.8 / top-p 0.95 with top-k off, up to
`--max-new-tokens` or EOS. A random-weight model rarely emits EOS or a stop sequence, so
rows run to the limit and the variants generate (nearly) the same number of tokens;
tokens/s counts each variant's own. Before timing, greedy decoding of a few prompts is
checked to give the same tokens in ours, peft and merged (fp32: exact; bf16: rounding may
flip a near-tie, reported, not fatal).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from wmtp_fn.adapters import AdapterSpec, export_peft, install_slots, merge  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.data.embedded import embedded_tokenizer_path  # noqa: E402
from wmtp_fn.eval.extract import HUMANEVAL_STOPS  # noqa: E402
from wmtp_fn.eval.generate import Sampling, generate, next_token_model  # noqa: E402
from wmtp_fn.eval.prompts import load_humaneval  # noqa: E402
from wmtp_fn.models.base import freeze  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "sheared-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                         num_key_value_heads=20, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
}
VARIANTS = ("ours", "ours-static", "ours-bound", "ours-nostops", "peft", "merged", "merged-static", "base")


def build_model(args, tokenizer) -> LlamaForCausalLM:
    """The same weights every call: a directory's, or a seeded random model of the shape."""
    dtype = getattr(torch, args.dtype)
    if args.base:
        model = LlamaForCausalLM.from_pretrained(args.base, dtype=dtype, attn_implementation="sdpa")
    else:
        cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, attn_implementation="sdpa",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
        model = model.to(dtype)
    return freeze(model.to(args.device))


def make_adapter(model, args):
    """An all-linear adapter with non-zero B (a fresh one would be the identity)."""
    install_slots(model)
    adapter, spec = init_adapter(model, AdapterSpec(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS), seed=0)
    gen = torch.Generator().manual_seed(1)
    return adapter.apply(lambda t: (torch.randn(t.shape, generator=gen) * 0.02).to(t.device)), spec


def hf_generate(model, tokenizer, prompts, sampling: Sampling, seed: int) -> list[list[int]]:
    """Plain transformers generate over the same sorted, left-padded batches as ours."""
    from wmtp_fn.eval.generate import generation_config, batch_seed

    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: dict[int, list[int]] = {}
    config = generation_config(sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    for b in range(0, len(order), sampling.batch_size):
        rows = order[b: b + sampling.batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
        mask = (torch.arange(width, device=device)[None] >= torch.tensor(
            [width - len(encoded[i]) for i in rows], device=device)[:, None]).long()
        torch.manual_seed(batch_seed(seed, b // sampling.batch_size))
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for i, row in zip(rows, got[:, width:].tolist()):
            ended = [j for j, t in enumerate(row) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
            out[i] = row[: ended[0] + 1] if ended else row
    return [out[i] for i in range(len(prompts))]


def variant_runner(name: str, args, tokenizer, peft_dir: Path):
    """A fresh model for `name` and the function generating with it: prompts -> token rows."""
    model = build_model(args, tokenizer)
    adapter, spec = make_adapter(model, args)
    if name.startswith("ours"):
        view = next_token_model(model)

        def run(prompts, sampling, seed):
            if name == "ours-nostops":
                sampling = Sampling(**{**sampling.__dict__, "stops": ()})
            if name == "ours-static":
                sampling = Sampling(**{**sampling.__dict__, "cache": "static"})
            return [list(g.token_ids) for g in generate(view, tokenizer, prompts, sampling, base=model,
                                                        adapter=(adapter, spec), seed=seed,
                                                        merge=name != "ours-bound")]
        return model, run
    plain = build_model(args, tokenizer)  # no slots: what a transformers user has
    del model
    if name == "peft":
        from peft import PeftModel

        plain = PeftModel.from_pretrained(plain, str(peft_dir)).eval()
    elif name in ("merged", "merged-static"):
        plain.load_state_dict(merge(plain.state_dict(), adapter, spec))
    plain.generation_config = GenerationConfig()
    cache = "static" if name.endswith("-static") else "dynamic"
    return plain, lambda prompts, sampling, seed: hf_generate(
        plain, tokenizer, prompts, Sampling(**{**sampling.__dict__, "cache": cache}), seed)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="sheared-2.7b", choices=sorted(SHAPES))
    p.add_argument("--base", default="", help="a HuggingFace Llama directory instead of a random shape")
    p.add_argument("--tokenizer", default="", help="default: --base's, else the embedded one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=164)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=160)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--guard-prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, round-robin; the median is reported")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base or str(embedded_tokenizer_path()))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    problems = load_humaneval()[: args.prompts]
    prompts = [pr.prompt for pr in problems for _ in range(args.samples)]
    # the stops are ours to check (what evaluate runs); the peers' plain generate has none
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, batch_size=args.batch_size,
                        stops=HUMANEVAL_STOPS)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; expected some of {VARIANTS}")

    rows, guard = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        peft_dir = Path(tmp) / "peft"
        model = build_model(args, tokenizer)
        export_peft(*make_adapter(model, args), peft_dir)
        del model
        greedy = Sampling(max_new_tokens=16, batch_size=args.guard_prompts)
        # Every variant's model lives for the whole run, and the timed runs go round-robin,
        # `--repeats` times: clock ramps, allocator growth and other order effects fall on
        # every variant alike instead of on whichever runs first. A row reports the median.
        runners = {}
        for name in dict.fromkeys(variants):
            model, run = variant_runner(name, args, tokenizer, peft_dir)
            if name != "base":
                guard[name] = run([pr.prompt for pr in problems[: args.guard_prompts]], greedy, 0)
            run(prompts[: sampling.batch_size], Sampling(**{**sampling.__dict__, "max_new_tokens": 8}), 0)  # warm-up
            runners[name] = (model, run)
        trials: dict[str, list[tuple[int, float]]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, (_, run) in runners.items():
                sync(args.device)
                start = time.perf_counter()
                tokens = sum(len(r) for r in run(prompts, sampling, 0))
                sync(args.device)
                trials[name].append((tokens, time.perf_counter() - start))
                print(json.dumps({"variant": name, "generated_tokens": tokens,
                                  "tokens_per_s": round(tokens / trials[name][-1][1], 1)}), flush=True)
        for name, got in trials.items():
            rates = sorted(tokens / seconds for tokens, seconds in got)
            rows.append({"variant": name, "generated_tokens": got[0][0], "tokens_per_s": round(rates[len(rates) // 2], 1),
                         "trials_tokens_per_s": [round(tokens / seconds, 1) for tokens, seconds in got]})
        del runners
        gc.collect()
    reference = guard.get("merged") or next(iter(guard.values()), None)
    result = {
        "shape": args.base or args.shape, "device": args.device, "dtype": args.dtype, "prompts": args.prompts,
        "samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "repeats": args.repeats, "rows": rows,
        "guard": {name: toks == reference for name, toks in guard.items()},
    }
    ours = next((r for r in rows if r["variant"] == "ours"), None)
    for r in rows:
        if ours is not None:
            r["ours_speedup"] = round(ours["tokens_per_s"] / r["tokens_per_s"], 3)
    print(json.dumps(result["guard"]))
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
