"""The FSDP2 step benchmark runs on CPU (tiny shape, a one-rank gloo group it starts itself)
and its two variants agree. Timings are never asserted: they are measured on the GPU.

It runs as the script it is, in its own process: a process group, FSDP2 and their libraries
would otherwise stay in the test process (whose size the HumanEval harness's memory limit
in forked children depends on)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "bench" / "fsdp_step.py"
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_bench_runs_on_cpu_and_both_paths_give_the_same_loss(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}  # not launched: it starts its own group
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32",
         "--warmup", "1", "--repeats", "1", "--block", "1", "--json", str(tmp_path / "r.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in out["rows"]] == ["plain", "fsdp"]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in out["rows"])
    assert out["first_loss"]["plain"] > 0 and out["loss_rel_diff"] < 1e-6
    assert out["ratio"]["tokens_per_s"] > 0
    assert "fsdp / plain: tokens/s" in done.stdout
