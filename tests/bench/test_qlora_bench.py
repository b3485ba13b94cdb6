"""The QLoRA benchmark runs on the CPU at the tiny shape (eager variants; the compiled ones are
the same code with `compile_layers`), and its target arithmetic is right by hand. Timings are
never asserted: they are measured on the GPU and recorded in BENCHMARKS.md."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "qlora.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("qlora_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_bench_measures_bf16_nf4_and_peft_qlora_on_cpu(tmp_path):
    out = load_bench().main([
        "--shapes", "tiny", "--device", "cpu", "--quick", "--batch", "2", "--seq", "32", "--heads", "2",
        "--ntp-variants", "ours-eager,ours-nf4-eager,peft-qlora,peft-qlora-nogc",
        "--json", str(tmp_path / "q.json"),
    ])
    r = out["shapes"]["tiny"]
    ntp = {x["variant"]: x for x in r["ntp"]}
    assert list(ntp) == ["ours-eager", "ours-nf4-eager", "peft-qlora", "peft-qlora-nogc"]
    assert all(not x["error"] and x["tokens_per_s"] > 0 for x in ntp.values())
    # one random model: the NF4 losses are the bf16 one up to the 4-bit error; ours and PEFT's NF4 agree
    assert abs(ntp["ours-nf4-eager"]["loss"] - ntp["ours-eager"]["loss"]) < 0.05
    assert abs(ntp["ours-nf4-eager"]["loss"] - ntp["peft-qlora-nogc"]["loss"]) < 0.01
    mtp = {x["variant"]: x for x in r["mtp"]}
    assert set(mtp) == {"sequential", "sequential-nf4"} and all(x["n_future"] == 2 for x in mtp.values())
    assert abs(mtp["sequential-nf4"]["loss"] - mtp["sequential"]["loss"]) < 0.05
    assert (tmp_path / "q.json").is_file()


def test_targets_by_hand():
    bench = load_bench()
    rows = {
        "ours": {"peak_gib": 40.0, "tokens_per_s": 1000.0},
        "ours-nf4": {"peak_gib": 30.0, "tokens_per_s": 950.0},
        "ours-ac": {"peak_gib": 20.0, "tokens_per_s": 800.0},
        "ours-nf4-ac": {"peak_gib": 8.0, "tokens_per_s": 700.0},
        "peft-qlora": {"peak_gib": 9.0, "tokens_per_s": 350.0},
    }
    t = bench.targets(rows)
    assert t["nf4_vs_bf16_peak"] == 0.75 and t["nf4_vs_bf16_speed"] == 0.95
    assert t["nf4_ac_vs_bf16_ac_peak"] == 0.4 and t["nf4_ac_vs_bf16_ac_speed"] == 0.875
    assert t["nf4_ac_vs_peft_qlora_speed"] == 2.0 and math.isclose(t["nf4_ac_vs_peft_qlora_peak"], 8 / 9)
    assert t["pass_memory_speed"] and t["pass_vs_peft"]  # the checkpointed pair meets 0.45x / 0.8x
    slow = bench.targets({**rows, "ours-nf4-ac": {"peak_gib": 8.0, "tokens_per_s": 600.0}})
    assert not slow["pass_memory_speed"] and slow["pass_vs_peft"]  # 0.75x bf16's speed
    heavy = bench.targets({**rows, "peft-qlora": {"peak_gib": 7.9, "tokens_per_s": 350.0}})
    assert not heavy["pass_vs_peft"]  # more memory than PEFT
    assert math.isnan(bench.targets({})["nf4_vs_bf16_peak"]) and not bench.targets({})["pass_memory_speed"]
