"""The benchmark script runs on CPU (tiny shape) and its correctness guard holds there.
Timings are never asserted: they are measured on the GPU and recorded in BENCHMARKS.md."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "lora_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("lora_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_runs_on_cpu_and_the_optimised_step_matches_the_eager_one(tmp_path):
    bench = load_bench()
    out = bench.main([
        "--shape", "tiny", "--device", "cpu", "--variants", "peft-bf16,ours-eager-fullce,ours-eager",
        "--repeats", "1", "--block", "1", "--warmup", "1", "--no-compile", "--json", str(tmp_path / "r.json"),
    ])
    guard = out["guard"]
    assert guard["pass"]
    # In fp32 on the CPU the optimised path (chunked CE, slots, flat leaves) is the eager one up to rounding.
    for key in ("loss_rel_err", "lora_A_grad_rel_err", "lora_B_grad_rel_err"):
        assert guard[f"optimised_fp32_{key}"] < 1e-5, key
    assert [r["variant"] for r in out["rows"]] == ["peft-bf16", "ours-eager-fullce", "ours-eager"]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in out["rows"])
    assert (tmp_path / "r.json").is_file()


def test_flop_count_of_llama_1b_by_hand():
    bench = load_bench()
    from transformers import LlamaConfig

    cfg = LlamaConfig(**bench.SHAPES["llama-3.2-1b"])
    d, ffn, layers, kv, vocab, seq = 2048, 8192, 16, 512, 128256, 2048
    n_linear = layers * (2 * d * d + 2 * d * kv + 3 * d * ffn)  # q,o + k,v + gate,up,down
    want = 4 * n_linear + 4 * d * vocab + 3 * layers * 2 * d * (seq + 1)
    assert bench.flops_per_token(cfg, seq) == want
    assert abs(want / 1e9 - 5.35) < 0.01  # GFLOP/token quoted in BENCHMARKS.md


def test_variant_names_stand_for_their_options():
    bench = load_bench()
    opts = bench.ours_options("ours-mb70-ce8192-flash")
    assert opts == dict(compile_=True, checkpoint=0, full_ce=False, mode=None, memory_budget=0.7, quantize="",
                        attention="flash", ce_chunk=8192, merge_lora_a=True)
    assert bench.ours_options("ours-nomerge")["merge_lora_a"] is False
    assert bench.ours_options("ours-eager-fullce")["compile_"] is False
    assert bench.ours_options("ours-eager-fullce")["full_ce"] is True
    assert bench.ours_options("ours-nf4-ac") == dict(bench.ours_options("ours"), quantize="nf4", checkpoint=1)
    assert bench.ours_options("ours-ac2")["checkpoint"] == 2
    assert bench.ours_options("ours-cg")["mode"] == "reduce-overhead"
    assert bench.ours_options("ours-autotune")["mode"] == "max-autotune-no-cudagraphs"
    assert bench.ours_options("ours-mb100")["memory_budget"] == 1.0
    for name in bench.VARIANTS:  # every listed variant is a peer or parses
        assert bench.check_variant(name) == name


def test_bad_variant_names_are_refused_naming_the_part():
    import pytest

    bench = load_bench()
    for name, part in (("ours-foo", "'foo'"), ("ours-mb0", "'mb0'"), ("ours-mb101", "'mb101'"), ("ours-ce0", "'ce0'"),
                       ("ours-ce", "'ce'"), ("ours-", "''")):
        with pytest.raises(ValueError, match=part):
            bench.ours_options(name)
    with pytest.raises(ValueError, match="start with 'ours'"):
        bench.check_variant("peft-fast")
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--device", "cpu", "--variants", "ours-eager,ours-nope"])


def test_the_ce_chunk_option_reaches_the_objective(monkeypatch):
    bench = load_bench()
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = []
    real = bench.ntp_objective
    monkeypatch.setattr(bench, "ntp_objective", lambda *a, chunk_size, **k: seen.append(chunk_size) or real(*a, chunk_size=chunk_size, **k))
    import argparse

    args = argparse.Namespace(rank=4, ce_chunk=2048)
    for variant, want in (("ours-eager-ce16", 16), ("ours-eager", 2048)):
        model = bench.freeze(LlamaForCausalLM(LlamaConfig(**bench.SHAPES["tiny"])))
        bench.our_parts(model, args, **bench.ours_options(variant))
        assert seen[-1] == want


def test_fastest_peer_is_the_quickest_peft_row_that_ran():
    bench = load_bench()
    row = lambda v, tps, err="": bench.Row(v, 1.0, tps, 0.0, 1.0, 1.0, 0, error=err)  # noqa: E731
    rows = [row("peft-bf16", 10.0), row("ours", 99.0), row("peft-liger", 30.0), row("peft-bf16-compiled", 50.0, "OOM"),
            row("peft-default", 20.0)]
    assert bench.fastest_peer(rows).variant == "peft-liger"
    assert bench.fastest_peer([row("ours", 5.0)]) is None


def test_liger_scope_undoes_patches_of_the_llama_module():
    import pytest
    from transformers.models.llama import modeling_llama

    bench = load_bench()
    norm, rope, forward = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    with pytest.raises(RuntimeError):
        with bench.liger_scope():
            modeling_llama.LlamaRMSNorm = object
            modeling_llama.apply_rotary_pos_emb = None
            modeling_llama.LlamaForCausalLM.forward = lambda self: None
            modeling_llama._liger_added = 1
            raise RuntimeError("a variant failed")
    assert modeling_llama.LlamaRMSNorm is norm and modeling_llama.apply_rotary_pos_emb is rope
    assert modeling_llama.LlamaForCausalLM.forward is forward
    assert not hasattr(modeling_llama, "_liger_added")


def test_attention_option_restricts_sdpa_to_that_backend():
    import torch

    bench = load_bench()
    with bench.attention_backend("flash"):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()  # restored
    with bench.attention_backend(""):
        assert torch.backends.cuda.math_sdp_enabled()
