"""The generation benchmark runs on CPU (tiny shape) and its guard holds there: greedy decoding
with our bound adapter gives the tokens of PEFT's generate and of the merged weights (fp32).
Timings are never asserted; they are measured on the GPU."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "generate.py"


def test_generate_bench_runs_on_cpu_and_every_variant_decodes_alike(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = bench.main(["--shape", "tiny", "--device", "cpu", "--prompts", "3", "--samples", "2",
                      "--max-new-tokens", "8", "--batch-size", "6", "--repeats", "2", "--json", str(tmp_path / "r.json")])
    variants = ["ours", "ours-static", "ours-bound", "ours-nostops", "peft", "merged", "merged-static", "base"]
    assert out["guard"] == {v: True for v in variants if v != "base"}
    assert [r["variant"] for r in out["rows"]] == variants
    assert all(0 < r["generated_tokens"] <= 3 * 2 * 8 for r in out["rows"])
    assert all(len(r["trials_tokens_per_s"]) == 2 for r in out["rows"])
    assert all(r["tokens_per_s"] in r["trials_tokens_per_s"] for r in out["rows"])  # a median of the trials
